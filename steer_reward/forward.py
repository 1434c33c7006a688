"""One micro-batch of token sequences through a reward model → attributes [b, K].

Two ways to read a head:

- **head path** for Transformers' own ``*ForSequenceClassification`` classes with a ``score`` head: run the
  backbone on the right-padded batch, gather each sequence's hidden state at its last real token (from the
  attention mask), apply ``score``. This never confuses a real token equal to the pad id with padding (HF's
  pooling would), and it is the seam the fast paths (prefix sharing, packing) reuse.
- **output path** for anything else (custom code such as ArmoRM): the model's own forward with an attention
  mask, reading ``output.rewards`` when present, else ``output.logits``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ModelHead", "find_head", "pad_right", "pool_last_token", "forward_microbatch", "read_outputs"]


class ModelHead:
    """The backbone and linear head of a standard Transformers sequence-classification model."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        self.backbone = backbone
        self.head = head


def find_head(model: nn.Module) -> ModelHead | None:
    """``ModelHead`` for Transformers' own decoder ``*ForSequenceClassification`` classes, else None."""
    cls = type(model)
    if not cls.__name__.endswith("ForSequenceClassification") or not cls.__module__.startswith("transformers."):
        return None
    head = getattr(model, "score", None)
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module):
        return None
    return ModelHead(backbone, head)


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``. Shape: ``(b, longest)`` each."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


def read_outputs(output: object) -> torch.Tensor:
    """Attributes from a model output: ``.rewards`` (ArmoRM-style) when present, else ``.logits``."""
    values = getattr(output, "rewards", None)
    if values is None:
        values = getattr(output, "logits", None)
    if values is None and isinstance(output, (tuple, list)):
        values = output[0]
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"model output {type(output).__name__} has neither .rewards nor .logits")
    if values.dim() == 1:
        values = values[:, None]
    return values


def pool_last_token(head: ModelHead, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Backbone on a right-padded batch → hidden state at each row's last real token → head. Shape: ``(b, K)``.

    ``use_cache=False``: a scoring forward reads no cache afterwards, and Transformers would otherwise keep every
    layer's keys and values of the whole batch until the forward ends (as much memory again as the activations).
    """
    hidden = head.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # Under a device_map the last layer may sit on another device than the inputs.
    last = (attention_mask.sum(dim=1) - 1).to(hidden.device)
    return head.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


@torch.inference_mode()
def forward_microbatch(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int,
                       head: ModelHead | None = None) -> torch.Tensor:
    """Attributes of each sequence in one right-padded forward. Shape: ``(len(sequences), K)``, float32."""
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_right(sequences, pad_id, device)
    if head is not None:
        return pool_last_token(head, input_ids, attention_mask).float()
    return read_outputs(model(input_ids=input_ids, attention_mask=attention_mask)).float()
