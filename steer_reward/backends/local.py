"""The in-process backend: one model on one device, input order restored.

Strategies (``BatchingConfig.strategy``):

- ``padded``: length-sorted, right-padded micro-batches under a padded-token budget (``plan_microbatches``).
- ``prefix`` / ``auto``: ragged forwards (``prefix_sharing``): samples that share prompt ids run the prompt once,
  in a prefill forward with other prompts, and their completions against its keys and values in completion
  forwards with other groups' completions; samples whose prompt is not shared run whole in the prefill forwards.
  ``auto`` shares only when it saves work (DESIGN.md, Performance: ~56 % of the FLOPs at G=8).
- ``packed``: ragged forwards of whole sequences, no sharing.

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
from steer_reward.forward import ModelHead, find_head, forward_microbatch
from steer_reward.planning import kv_token_cost, plan_microbatches, rope_alone_from
from steer_reward.prefix_sharing import ForwardBudget, GroupScorer, prefix_sharing_unsupported
from steer_reward.ragged import RaggedLayout, run_ragged

__all__ = ["LocalBackend", "ragged_budget", "attention_call_tokens", "resolve_strategy"]


def ragged_budget(batching: BatchingConfig, config, strategy: str) -> ForwardBudget:
    """The budget of one ragged forward. ``packed`` keeps its rows to ``max_row_tokens``."""
    tokens = batching.max_tokens if strategy != "packed" else min(batching.max_tokens, batching.max_row_tokens)
    return ForwardBudget(tokens, batching.max_batch_size, kv_token_cost(config))


def attention_call_tokens(device: torch.device) -> int:
    """Fixed cost of one fused attention call, in tokens of self-attention (``ragged.plan_attention_buckets``).

    A CPU call costs tens of microseconds, so segments run one call each unless they are tiny; a GPU kernel launch
    is worth a few hundred tokens of attention, so segments of similar length share a padded call.
    """
    return 16 if device.type == "cpu" else 256


def resolve_strategy(asked: str, model: nn.Module, head: ModelHead | None, stacklevel: int = 3) -> str:
    """The strategy that runs: ``asked``, or ``padded`` (with a warning unless ``auto``) for models the ragged
    forwards cannot run exactly."""
    if asked == "padded":
        return asked
    reason = prefix_sharing_unsupported(model, head)
    if reason is None:
        return asked
    if asked != "auto":
        warnings.warn(f"batching.strategy={asked!r} cannot run exactly on this model ({reason}); "
                      "using padded micro-batches", stacklevel=stacklevel)
    return "padded"


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
        self._whole_prompts = 0
        # Async faces run scoring in worker threads; the model and the prompt cache take one call at a time.
        self._lock = threading.Lock()
        self.strategy = resolve_strategy(self.batching.strategy, model, self.head, stacklevel=4)
        self.groups: GroupScorer | None = None
        if self.strategy != "padded":
            b = self.batching
            device = next(model.parameters()).device
            self.groups = GroupScorer(self._ragged_forward, ragged_budget(b, model.config, self.strategy),
                                      b.forward_overhead_tokens, b.prompt_cache_tokens, attention_call_tokens(device))

    @property
    def prompt_prefills(self) -> int:
        """Prompts run through the model so far (the server's ``steer_reward_prompt_prefills_total``)."""
        return self._whole_prompts + (self.groups.prefills if self.groups is not None else 0)

    def set_prompt_cache_tokens(self, tokens: int) -> None:
        """Keep prompt KV caches between calls, up to ``tokens`` prompt tokens (0: none). No-op without prefix
        sharing. Waits for a scoring call in flight: its plan reads cached prompts until it ends."""
        if self.groups is not None and self.strategy != "packed":
            with self._lock:
                self.groups.set_cache_tokens(tokens)

    # -- plans ----------------------------------------------------------------------------------------------
    def _padded_plan(self, samples: Sequence[EncodedSample], indices: Sequence[int]) -> list[list[int]]:
        batches = plan_microbatches([len(samples[i]) for i in indices], self.batching.max_tokens,
                                    self.batching.max_batch_size, rope_alone_from(self.model.config))
        return [[indices[j] for j in batch] for batch in batches]

    def plan(self, samples: Sequence[EncodedSample]) -> list[list[int]]:
        """The forwards ``attributes(samples)`` runs, each as the sample indices whose tokens it computes.

        Padded: length-sorted micro-batches. Ragged strategies: prefill forwards (listing every sample of each
        group whose prompt they run, and the samples they run whole) and completion forwards, in order.
        ``len(plan(samples))`` is the number of forwards, so ``forward_calls`` can be checked (exact unless one
        call's own prompts overflow the prompt cache).
        """
        if self.groups is not None:
            return [f.samples for f in self.groups.plan(samples, self.strategy).forwards]
        return self._padded_plan(samples, range(len(samples)))

    # -- running ----------------------------------------------------------------------------------------------
    def run_microbatch(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Attributes of one right-padded micro-batch. Shape: ``(b, K)``."""
        self.forward_calls += 1
        return forward_microbatch(self.model, sequences, self.pad_id, self.head)

    def _ragged_forward(self, layout: RaggedLayout) -> torch.Tensor:
        """Scores at the last token of each segment of one ragged forward. Shape: ``(segments, K)``."""
        self.forward_calls += 1
        return self.head.head(run_ragged(self.head.backbone, layout)).float()

    def attributes(self, samples: Sequence[EncodedSample]) -> torch.Tensor:
        """Attributes of every sample, in input order. Shape: ``(n, K)``, float32 on CPU."""
        out = torch.empty((len(samples), self.num_outputs), dtype=torch.float32)
        if not samples:
            return out
        with self._lock, torch.inference_mode():
            if self.groups is not None:
                self.groups.run(samples, self.groups.plan(samples, self.strategy), out)
            else:
                self._whole_prompts += sum(1 for s in samples if s.prompt_ids)
                for batch in self._padded_plan(samples, range(len(samples))):
                    out[batch] = self.run_microbatch([samples[i].input_ids for i in batch]).cpu()
        return out
