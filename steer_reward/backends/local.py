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

import threading
import warnings
from typing import Sequence

import torch
from torch import nn

from steer_reward.config import BatchingConfig
from steer_reward.formatting import EncodedSample
from steer_reward.forward import find_head, forward_microbatch
from steer_reward.packing import PackedForward
from steer_reward.planning import plan_microbatches
from steer_reward.prefix_sharing import (PrefixSharedForward, PromptGroup, group_by_prompt,
                                         prefix_sharing_unsupported)

__all__ = ["LocalBackend"]


class LocalBackend:
    """Scores encoded samples with an in-process model.

    ``forward_calls`` counts model forwards (all strategies), so callers and tests can check work is not repeated.
    ``prompt_prefills`` counts prompts run through the model: one per prefill of a shared prompt (a prompt-cache hit
    runs none), one per sample whose prompt rides along in a padded or packed row.
    ``strategy`` is the strategy actually in use after any fallback.
    """

    def __init__(self, model: nn.Module, pad_id: int, batching: BatchingConfig | None = None) -> None:
        self.model = model
        self.pad_id = int(pad_id)
        self.batching = batching or BatchingConfig()
        self.head = find_head(model)
        self.num_outputs = int(model.config.num_labels)
        self.forward_calls = 0
        self.prompt_prefills = 0
        # Async faces run scoring in worker threads; the model and the prompt cache take one call at a time.
        self._lock = threading.Lock()
        self.strategy = self._resolve_strategy(self.batching.strategy)
        b = self.batching
        self._prefix = PrefixSharedForward(self.head, b.max_tokens, b.max_batch_size, b.forward_overhead_tokens,
                                           b.prompt_cache_tokens) if self.strategy in ("auto", "prefix") else None
        self._packed = PackedForward(self.head, b.max_tokens, b.max_row_tokens) if self.strategy == "packed" else None

    def set_prompt_cache_tokens(self, tokens: int) -> None:
        """Keep prompt KV caches between calls, up to ``tokens`` prompt tokens (0: none). No-op without prefix
        sharing."""
        if self._prefix is not None:
            self._prefix.cache_tokens = int(tokens)
            if not tokens:
                self._prefix.clear_cache()

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

    # -- plans ----------------------------------------------------------------------------------------------
    def _shared_groups(self, samples: Sequence[EncodedSample]) -> tuple[list[PromptGroup], list[int]]:
        """Prompt groups that go through the prompt cache, and the indices of the samples padded instead."""
        shared, unshared = [], []
        for group in group_by_prompt(samples):
            # An empty prompt has no cache to share. Under auto, a group goes through the cache only when the
            # prompt tokens it saves outweigh the fixed cost of its own prefill and completion forwards (about
            # two more forwards than riding along in the padded micro-batches); a prompt seen once saves nothing.
            # With a prompt cache, a cached prompt costs no prefill at all, and other prompts are kept for
            # completions arriving in later calls (a server's one-sample requests) when one reuse would repay the
            # extra forwards: always with several completions here, and for a lone completion when the prompt is
            # longer than two forwards' overhead (short distinct prompts keep riding in padded micro-batches).
            overhead = 2 * self.batching.forward_overhead_tokens
            saved = (len(group.members) - 1) * len(group.prompt_ids)
            keep_for_later = self._prefix.cache_tokens > 0 and (len(group.members) > 1
                                                                or len(group.prompt_ids) > overhead)
            worth_it = saved > overhead or keep_for_later or self._prefix.is_cached(group.prompt_ids)
            if not group.prompt_ids or (self.strategy == "auto" and not worth_it):
                unshared.extend(group.members)
            else:
                shared.append(group)
        return shared, sorted(unshared)

    def _padded_plan(self, samples: Sequence[EncodedSample], indices: Sequence[int]) -> list[list[int]]:
        batches = plan_microbatches([len(samples[i]) for i in indices], self.batching.max_tokens,
                                    self.batching.max_batch_size)
        return [[indices[j] for j in batch] for batch in batches]

    def plan(self, samples: Sequence[EncodedSample]) -> list[list[int]]:
        """The forwards ``attributes(samples)`` runs, each as the sample indices whose tokens it computes.

        Padded: length-sorted micro-batches. Prefix: per shared prompt one prefill (listing every sample of the
        group, unless its prefill is in the prompt cache) and its completion batches, then padded micro-batches of
        the rest. Packed: the samples of each packed forward. ``len(plan(samples))`` is the number of forwards, so
        ``forward_calls`` can be checked (exact unless one call's own prompts overflow the prompt cache).
        """
        if self.strategy in ("auto", "prefix"):
            shared, unshared = self._shared_groups(samples)
            forwards = []
            for group in shared:
                if not self._prefix.is_cached(group.prompt_ids):  # a cached prompt needs no prefill
                    forwards.append(list(group.members))
                lengths = [len(samples[i].completion_ids) for i in group.members]
                forwards += [[group.members[j] for j in batch] for batch in self._prefix.completion_batches(lengths)]
            return forwards + self._padded_plan(samples, unshared)
        if self.strategy == "packed":
            return [[i for row in rows for i in row] for rows in self._packed.plan([len(s) for s in samples])]
        return self._padded_plan(samples, range(len(samples)))

    # -- running ----------------------------------------------------------------------------------------------
    def run_microbatch(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Attributes of one right-padded micro-batch. Shape: ``(b, K)``."""
        self.forward_calls += 1
        return forward_microbatch(self.model, sequences, self.pad_id, self.head)

    def _padded(self, samples: Sequence[EncodedSample], indices: Sequence[int], out: torch.Tensor) -> None:
        self.prompt_prefills += sum(1 for i in indices if samples[i].prompt_ids)
        for batch in self._padded_plan(samples, indices):
            out[batch] = self.run_microbatch([samples[i].input_ids for i in batch]).cpu()

    def _shared(self, samples: Sequence[EncodedSample], out: torch.Tensor) -> None:
        shared, unshared = self._shared_groups(samples)
        for group in shared:
            before, prefills = self._prefix.forward_calls, self._prefix.prefills
            out[group.members] = self._prefix.score_group(
                group.prompt_ids, [samples[i].completion_ids for i in group.members], self.pad_id).cpu()
            self.forward_calls += self._prefix.forward_calls - before
            self.prompt_prefills += self._prefix.prefills - prefills
        if unshared:
            self._padded(samples, unshared, out)

    def _pack(self, samples: Sequence[EncodedSample], out: torch.Tensor) -> None:
        before = self._packed.forward_calls
        self.prompt_prefills += sum(1 for s in samples if s.prompt_ids)
        out[:] = self._packed.score([s.input_ids for s in samples], self.pad_id).cpu()
        self.forward_calls += self._packed.forward_calls - before

    def attributes(self, samples: Sequence[EncodedSample]) -> torch.Tensor:
        """Attributes of every sample, in input order. Shape: ``(n, K)``, float32 on CPU."""
        out = torch.empty((len(samples), self.num_outputs), dtype=torch.float32)
        if not samples:
            return out
        with self._lock:
            if self.strategy in ("auto", "prefix"):
                self._shared(samples, out)
            elif self.strategy == "packed":
                self._pack(samples, out)
            else:
                self._padded(samples, range(len(samples)), out)
        return out
