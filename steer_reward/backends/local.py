"""The in-process backend: length-sorted micro-batches through a model on one device, input order restored."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from steer_reward.config import BatchingConfig
from steer_reward.formatting import EncodedSample
from steer_reward.forward import find_head, forward_microbatch
from steer_reward.planning import plan_microbatches

__all__ = ["LocalBackend"]


class LocalBackend:
    """Scores encoded samples with an in-process model.

    ``forward_calls`` counts model forwards, so callers and tests can check work is not repeated.
    """

    def __init__(self, model: nn.Module, pad_id: int, batching: BatchingConfig | None = None) -> None:
        self.model = model
        self.pad_id = int(pad_id)
        self.batching = batching or BatchingConfig()
        self.head = find_head(model)
        self.num_outputs = int(model.config.num_labels)
        self.forward_calls = 0

    def plan(self, samples: Sequence[EncodedSample]) -> list[list[int]]:
        return plan_microbatches([len(s) for s in samples], self.batching.max_tokens, self.batching.max_batch_size)

    def run_microbatch(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Attributes of one micro-batch. Shape: ``(b, K)``."""
        self.forward_calls += 1
        return forward_microbatch(self.model, sequences, self.pad_id, self.head)

    def attributes(self, samples: Sequence[EncodedSample]) -> torch.Tensor:
        """Attributes of every sample, in input order. Shape: ``(n, K)``, float32 on CPU."""
        out = torch.empty((len(samples), self.num_outputs), dtype=torch.float32)
        for batch in self.plan(samples):
            out[batch] = self.run_microbatch([samples[i].input_ids for i in batch]).cpu()
        return out
