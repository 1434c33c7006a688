"""Prefix sharing: each unique prompt runs once, its completions run against the prompt's KV cache.

GRPO / RLOO / best-of-n score G completions per prompt, and the formatter gives every completion of a prompt
byte-identical ``prompt_ids`` (DESIGN.md, Formatting). Scoring a group then costs one prompt prefill plus the
completion tokens, instead of G full sequences. The result is exact: a completion token at position ``P + i``
attends to the P prompt keys and to completion keys ``0..i`` with the same rotary positions as in a plain
forward of ``prompt + completion``.

Supported architectures: decoder models whose Transformers ``*ForSequenceClassification`` class has a ``score``
head (``find_head``), with full (non-sliding) causal attention, rotary positions and the ``sdpa`` or ``eager``
attention implementation, which take an explicit 4-D mask: ``model_type`` llama (SteerLM-RM's HF conversion),
mistral, qwen2, qwen3. Anything else (custom code such as ArmoRM, sliding-window layers, flash-attention) is
reported by ``prefix_sharing_unsupported`` and the backend falls back to padded micro-batches.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from steer_reward.formatting import EncodedSample
from steer_reward.forward import ModelHead
from steer_reward.planning import plan_min_padding

__all__ = [
    "PREFIX_SHARING_MODEL_TYPES",
    "PromptGroup",
    "group_by_prompt",
    "prefix_sharing_unsupported",
    "PrefixSharedForward",
    "additive_mask",
]

PREFIX_SHARING_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose attention reads the explicit 4-D mask, position ids and cache exactly as used here."""

_MASK_ATTENTION = ("sdpa", "eager")


@dataclass
class PromptGroup:
    """Samples that share one prompt (identical ``prompt_ids``; a prompt that is a prefix of another is distinct)."""

    prompt_ids: tuple[int, ...]
    members: list[int] = field(default_factory=list)
    """Sample indices, in input order."""


def group_by_prompt(samples: Sequence[EncodedSample]) -> list[PromptGroup]:
    """Groups of samples with identical prompt ids, adjacent or not, in order of first appearance.

    >>> [g.members for g in group_by_prompt([EncodedSample((1, 2), (3,)), EncodedSample((1,), (2, 3)),
    ...                                      EncodedSample((1, 2), (4,))])]
    [[0, 2], [1]]
    """
    groups: dict[tuple[int, ...], PromptGroup] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.prompt_ids, PromptGroup(sample.prompt_ids)).members.append(index)
    return list(groups.values())


def prefix_sharing_unsupported(model: nn.Module, head: ModelHead | None) -> str | None:
    """Why prefix sharing cannot run on ``model`` exactly, or None when it can."""
    if head is None:
        return f"{type(model).__name__} is not a Transformers *ForSequenceClassification model with a score head"
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in PREFIX_SHARING_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(PREFIX_SHARING_MODEL_TYPES)}"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in _MASK_ATTENTION:
        return f"attention implementation {attention!r} does not take a 4-D mask (use sdpa or eager)"
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if sliding or any(kind != "full_attention" for kind in layer_types):
        return "sliding-window attention layers would see a different context once the prompt is cached"
    return None


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean may-attend mask as the additive bias both ``sdpa`` and ``eager`` read (eager adds the mask to
    the scores, so a boolean mask would be added as 0/1). Same shape as ``allowed``."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def _cache_kwarg(backbone: nn.Module) -> str:
    """The backbone's cache argument: ``cache`` in Transformers 5.x, ``past_key_values`` before."""
    parameters = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _cache_tensors(output: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a forward's cache. Shape: ``(1, kv_heads, P, head_dim)`` each."""
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    if cache is None:
        raise RuntimeError("the backbone returned no KV cache although use_cache=True was passed")
    return [(layer.keys, layer.values) for layer in cache.layers]


class PrefixSharedForward:
    """Scores prompt groups: one prompt prefill, then the completions in length-sorted batches against its cache.

    ``max_tokens`` bounds the padded completion tokens of one completion batch (rows × longest completion) and
    ``max_batch_size`` its rows; within that, cuts trade padding against ``overhead_tokens`` per forward
    (``plan_min_padding``). The prompt cache is broadcast over the rows, not copied per completion.

    With ``cache_tokens > 0`` the prefills of recent prompts are kept between calls (least recently used dropped
    first, bounded in prompt tokens), so the completions of one prompt arriving in different calls (a server
    batching OpenRLHF's one-sample requests) still run the prompt once.
    """

    def __init__(self, head: ModelHead, max_tokens: int, max_batch_size: int, overhead_tokens: int = 0,
                 cache_tokens: int = 0) -> None:
        self.head = head
        self.max_tokens = int(max_tokens)
        self.max_batch_size = int(max_batch_size)
        self.overhead_tokens = int(overhead_tokens)
        self.cache_kwarg = _cache_kwarg(head.backbone)
        self.forward_calls = 0
        self.cache_tokens = int(cache_tokens)
        self.cache_hits = 0
        self.prefills = 0
        """Prompt prefills run (a prompt-cache hit runs none)."""
        self._cache: OrderedDict[tuple[int, ...], tuple[torch.Tensor, list]] = OrderedDict()
        self._cached_tokens = 0

    def is_cached(self, prompt_ids: Sequence[int]) -> bool:
        """Whether the next ``score_group`` of this prompt skips its prefill."""
        return tuple(prompt_ids) in self._cache

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_tokens = 0

    def _remember(self, key: tuple[int, ...], prefill: tuple[torch.Tensor, list]) -> None:
        if not 0 < len(key) <= self.cache_tokens:
            return
        self._cache[key] = prefill
        self._cached_tokens += len(key)
        while self._cached_tokens > self.cache_tokens:
            evicted, _ = self._cache.popitem(last=False)
            self._cached_tokens -= len(evicted)

    def _cached_prefill(self, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        key = tuple(prompt_ids)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return hit
        prefill = self._prefill(prompt_ids)
        self._remember(key, prefill)
        return prefill

    @property
    def device(self) -> torch.device:
        return next(self.head.backbone.parameters()).device

    def _prefill(self, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Last hidden state of the prompt (shape ``(d,)``) and its KV cache."""
        from transformers import DynamicCache

        input_ids = torch.as_tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        self.forward_calls += 1
        self.prefills += 1
        # No mask: a lone unpadded sequence takes SDPA's is_causal kernel.
        output = self.head.backbone(input_ids=input_ids, use_cache=True,
                                    **{self.cache_kwarg: DynamicCache(config=self.head.backbone.config)})
        return output.last_hidden_state[0, -1], _cache_tensors(output)

    def _completion_batch(self, prompt_length: int, kv: list[tuple[torch.Tensor, torch.Tensor]],
                          completions: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """Last hidden state of each completion read against the prompt cache. Shape: ``(b, d)``."""
        from transformers import DynamicCache

        rows, longest = len(completions), max(len(c) for c in completions)
        input_ids = torch.full((rows, longest), pad_id, dtype=torch.long)
        for row, ids in enumerate(completions):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        device = self.device
        positions = torch.arange(prompt_length, prompt_length + longest, device=device)[None]
        # Query i (absolute position P+i) sees every prompt key and completion keys 0..i. Right padding sits
        # after each row's real tokens, so the causal part already hides it from real queries; one mask
        # broadcasts over the rows.
        mask = torch.ones((1, 1, longest, prompt_length + longest), dtype=torch.bool, device=device)
        mask[0, 0, :, prompt_length:] = torch.ones((longest, longest), dtype=torch.bool, device=device).tril()
        mask = additive_mask(mask, kv[0][0].dtype)
        cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                             for k, v in kv])
        self.forward_calls += 1
        hidden = self.head.backbone(input_ids=input_ids.to(device), attention_mask=mask, position_ids=positions,
                                    use_cache=True, **{self.cache_kwarg: cache}).last_hidden_state
        # Under a device_map the last layer may sit on another device than the inputs.
        last = torch.as_tensor([len(c) - 1 for c in completions], device=hidden.device)
        return hidden[torch.arange(rows, device=hidden.device), last]

    def completion_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Completion forwards after the prefill, as indices into the group's completions (empty ones need none)."""
        nonempty = [i for i, n in enumerate(lengths) if n]
        plan = plan_min_padding([lengths[i] for i in nonempty], self.max_tokens, self.max_batch_size,
                                self.overhead_tokens)
        return [[nonempty[j] for j in batch] for batch in plan]

    @torch.inference_mode()
    def score_group(self, prompt_ids: Sequence[int], completions: Sequence[Sequence[int]],
                    pad_id: int) -> torch.Tensor:
        """Attributes of ``prompt + completion`` for each completion. Shape: ``(G, K)``, float32.

        An empty completion is scored at the prompt's last token, as a plain forward of the prompt would be.
        """
        if not prompt_ids:
            raise ValueError("prefix sharing needs a non-empty prompt; score prompt-less samples unshared")
        prompt_hidden, kv = self._cached_prefill(prompt_ids)
        pooled = prompt_hidden.new_empty((len(completions), prompt_hidden.shape[-1]))
        for i in range(len(completions)):
            if not completions[i]:
                pooled[i] = prompt_hidden
        for members in self.completion_batches([len(c) for c in completions]):
            pooled[members] = self._completion_batch(len(prompt_ids), kv, [completions[i] for i in members], pad_id)
        return self.head.head(pooled).float()
