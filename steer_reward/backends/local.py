"""The in-process backend: one model on one device, input order restored.

Strategies (``BatchingConfig.strategy``):

- ``padded``: length-sorted, right-padded micro-batches under a padded-token budget (``plan_microbatches``).
- ``prefix`` / ``auto``: samples that share prompt ids run the prompt once and their completions against its KV
  cache (``prefix_sharing``); samples whose prompt is not shared take the padded path. With ``auto`` this is the
  default because it computes the fewest tokens (DESIGN.md, Performance: ~56 % of the FLOPs at G=8).
- ``packed``: padding-free rows with a block-diagonal mask (``packing``), no sharing.

Every fast path is exact against a plain forward of each sequence alone (tests/test_fastpath.py). Models the fast
paths cannot run exactly fall back to ``padded``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from steer_reward.config import BatchingConfig
from steer_reward.formatting import EncodedSample
from steer_reward.forward import find_head, forward_microbatch
from steer_reward.packing import PackedForward
from steer_reward.planning import plan_microbatches
from steer_reward.prefix_sharing import PrefixSharedForward, group_by_prompt, prefix_sharing_unsupported

__all__ = ["LocalBackend"]


class LocalBackend:
    """Scores encoded samples with an in-process model.

    ``forward_calls`` counts model forwards (all strategies), so callers and tests can check work is not repeated.
    ``strategy`` is the strategy actually in use after any fallback.
    """

    def __init__(self, model: nn.Module, pad_id: int, batching: BatchingConfig | None = None) -> None:
        self.model = model
        self.pad_id = int(pad_id)
        self.batching = batching or BatchingConfig()
        self.head = find_head(model)
        self.num_outputs = int(model.config.num_labels)
        self.forward_calls = 0
        self.strategy = self._resolve_strategy(self.batching.strategy)
        b = self.batching
        self._prefix = PrefixSharedForward(self.head, b.max_tokens, b.max_batch_size, b.forward_overhead_tokens) \
            if self.strategy in ("auto", "prefix") else None
        self._packed = PackedForward(self.head, b.max_tokens, b.max_row_tokens) if self.strategy == "packed" else None

    def _resolve_strategy(self, asked: str) -> str:
        if asked == "padded":
            return asked
        reason = prefix_sharing_unsupported(self.model, self.head)
        if reason is None:
            return asked
        if asked != "auto":
            warnings.warn(f"batching.strategy={asked!r} cannot run exactly on this model ({reason}); "
                          "using padded micro-batches", stacklevel=3)
        return "padded"

    # -- padded path (public API kept: plan / run_microbatch) -------------------------------------------------
    def plan(self, samples: Sequence[EncodedSample]) -> list[list[int]]:
        return plan_microbatches([len(s) for s in samples], self.batching.max_tokens, self.batching.max_batch_size)

    def run_microbatch(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Attributes of one right-padded micro-batch. Shape: ``(b, K)``."""
        self.forward_calls += 1
        return forward_microbatch(self.model, sequences, self.pad_id, self.head)

    def _padded(self, samples: Sequence[EncodedSample], indices: Sequence[int], out: torch.Tensor) -> None:
        subset = [samples[i] for i in indices]
        for batch in self.plan(subset):
            out[[indices[j] for j in batch]] = self.run_microbatch([subset[j].input_ids for j in batch]).cpu()

    # -- fast paths -------------------------------------------------------------------------------------------
    def _shared(self, samples: Sequence[EncodedSample], out: torch.Tensor) -> None:
        unshared: list[int] = []
        for group in group_by_prompt(samples):
            # Under auto, a prompt seen once gains nothing from its cache (two forwards instead of one): it is
            # padded with the rest. An empty prompt has no cache to share.
            if (len(group.members) < 2 and self.strategy == "auto") or not group.prompt_ids:
                unshared.extend(group.members)
                continue
            before = self._prefix.forward_calls
            out[group.members] = self._prefix.score_group(
                group.prompt_ids, [samples[i].completion_ids for i in group.members], self.pad_id).cpu()
            self.forward_calls += self._prefix.forward_calls - before
        if unshared:
            self._padded(samples, sorted(unshared), out)

    def _pack(self, samples: Sequence[EncodedSample], out: torch.Tensor) -> None:
        before = self._packed.forward_calls
        out[:] = self._packed.score([s.input_ids for s in samples], self.pad_id).cpu()
        self.forward_calls += self._packed.forward_calls - before

    def attributes(self, samples: Sequence[EncodedSample]) -> torch.Tensor:
        """Attributes of every sample, in input order. Shape: ``(n, K)``, float32 on CPU."""
        out = torch.empty((len(samples), self.num_outputs), dtype=torch.float32)
        if not samples:
            return out
        if self.strategy in ("auto", "prefix"):
            self._shared(samples, out)
        elif self.strategy == "packed":
            self._pack(samples, out)
        else:
            self._padded(samples, range(len(samples)), out)
        return out
