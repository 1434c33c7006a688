"""Prefix sharing over many prompt groups per forward: each unique prompt runs once, its completions run against
the prompt's keys and values.

GRPO / RLOO / best-of-n score G completions per prompt, and the formatter gives every completion of a prompt
byte-identical ``prompt_ids`` (DESIGN.md, Formatting). Scoring a group then costs one prompt prefill plus the
completion tokens, instead of G full sequences. Forwards are ragged (``steer_reward.ragged``): one **prefill
forward** runs the prompts of several groups — and, filling its token budget, whole sequences whose prompt is not
shared — and keeps the prompts' keys and values; **completion forwards** then run the completions of several groups,
each against its own prompt. A completion token at position ``P + i`` attends to the P prompt keys and to completion
keys ``0..i`` with the same rotary positions as in a plain forward of ``prompt + completion``, so every score is
exact.

The plan runs in **waves**: the prompts of one prefill forward are held while their completions run, then released.
A wave's held keys and values count against ``max_tokens`` with ``planning.kv_token_cost``, so the peak memory of a
wave stays within the budget that bounds a padded micro-batch.

Supported architectures: decoder models whose Transformers ``*ForSequenceClassification`` class has a ``score``
head (``find_head``), with full (non-sliding) causal attention, rotary positions and the ``sdpa`` or ``eager``
attention implementation: ``model_type`` llama (SteerLM-RM's HF conversion), mistral, qwen2, qwen3. Anything else
(custom code such as ArmoRM, sliding-window layers, flash-attention, rotary scaling that follows the longest position
of a forward) is reported by ``prefix_sharing_unsupported`` and the backend falls back to padded micro-batches.
"""

from __future__ import annotations

from collections import ChainMap, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from steer_reward.formatting import EncodedSample
from steer_reward.forward import ModelHead
from steer_reward.planning import fill_forwards, rope_alone_from
from steer_reward.ragged import LayerKV, RaggedLayout, Segment, plain_attention_implementation

__all__ = [
    "PREFIX_SHARING_MODEL_TYPES",
    "PromptGroup",
    "group_by_prompt",
    "prefix_sharing_unsupported",
    "ForwardBudget",
    "PlannedForward",
    "GroupPlan",
    "plan_group_forwards",
    "GroupScorer",
]

PREFIX_SHARING_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose attention reads position ids and calls the registered attention function as used here."""

_RAGGED_ATTENTION = ("sdpa", "eager")


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
    """Why ragged forwards (prefix sharing, packing) cannot run on ``model`` exactly, or None when they can."""
    if head is None:
        return f"{type(model).__name__} is not a Transformers *ForSequenceClassification model with a score head"
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in PREFIX_SHARING_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(PREFIX_SHARING_MODEL_TYPES)}"
    # The model's own implementation, also while another thread's ragged forward has switched it.
    attention = (plain_attention_implementation(config) if hasattr(config, "_attn_implementation") else None) or "eager"
    if attention not in _RAGGED_ATTENTION:
        return f"attention implementation {attention!r} is not sdpa or eager"
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if sliding or any(kind != "full_attention" for kind in layer_types):
        return "sliding-window attention layers would see a different context once the prompt is cached"
    if rope_alone_from(config) is not None:
        return ("its rotary frequencies follow the longest position of a forward (rope_type dynamic or longrope), "
                "so sequences sharing one would change each other's scores")
    return None


# ------------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class ForwardBudget:
    """Limits of one ragged forward."""

    max_tokens: int
    """Tokens of a forward plus the prompt keys and values held meanwhile, in tokens (``kv_cost`` each)."""
    max_segments: int
    """Sequences in one forward (``batching.max_batch_size``)."""
    kv_cost: float = 1.5
    """``planning.kv_token_cost`` of the model: one held prompt token's keys and values, in forward tokens."""


@dataclass
class PlannedForward:
    """One ragged forward of a plan."""

    kind: str
    """``prefill`` (prompts and whole sequences, causal inside each) or ``completion`` (against held prompts)."""
    segments: list[Segment]
    scored: list[list[int]]
    """Per segment, the samples whose score is read at its last token."""
    samples: list[int]
    """Every sample whose tokens this forward computes (a prefill lists all members of its prompts' groups)."""
    wave: int = -1
    """Forwards of one wave share held prompts; -1: a prefill of whole sequences only."""

    @property
    def tokens(self) -> int:
        return sum(len(s.tokens) for s in self.segments)


@dataclass
class GroupPlan:
    forwards: list[PlannedForward]
    from_cache: list[tuple[tuple[int, ...], list[int]]] = field(default_factory=list)
    """(prompt, samples with an empty completion) scored from a cached prompt without any forward."""

    def cost(self, overhead_tokens: int) -> float:
        """Tokens computed plus ``overhead_tokens`` per forward."""
        return sum(f.tokens for f in self.forwards) + overhead_tokens * len(self.forwards)


def plan_group_forwards(samples: Sequence[EncodedSample], shared: Sequence[PromptGroup], unshared: Sequence[int],
                        budget: ForwardBudget, cached: Callable[[tuple[int, ...]], bool] = lambda p: False
                        ) -> GroupPlan:
    """Waves of one prefill forward and its completion forwards, then prefill forwards of the remaining samples.

    A wave holds the prompts of as many ``shared`` groups (in order) as fit ``max_tokens / (1 + kv_cost)`` prompt
    tokens — the prefill's activations plus the keys and values it keeps — and leave room for the wave's longest
    completion next to those keys and values; it fills the rest of its prefill forward with whole ``unshared``
    sequences, longest first. Its completions follow in group order, split into forwards of
    ``max_tokens − kv_cost · held`` tokens. Prompts for which ``cached`` is true need no prefill. So every forward
    stays within ``max_tokens`` unless one group alone does not fit (``GroupScorer.split`` runs those whole) or a
    sequence alone is longer.
    """
    max_tokens, max_segments, kv_cost = budget.max_tokens, budget.max_segments, budget.kv_cost
    if max_tokens <= 0 or max_segments <= 0:
        raise ValueError("max_tokens and max_batch_size must be positive")
    wave_tokens = max_tokens / (1 + kv_cost)
    waves: list[list[PromptGroup]] = []
    held = longest = 0
    for group in shared:
        cost = 0 if cached(group.prompt_ids) else len(group.prompt_ids)
        completion = max((len(samples[i].completion_ids) for i in group.members), default=0)
        if (not waves or held + cost > wave_tokens or len(waves[-1]) >= max_segments
                or kv_cost * (held + cost) + max(longest, completion) > max_tokens):
            waves.append([])
            held = longest = 0
        waves[-1].append(group)
        held += cost
        longest = max(longest, completion)
    pending = sorted(unshared, key=lambda i: (-len(samples[i]), i))
    plan = GroupPlan([])
    for number, wave in enumerate(waves):
        prefilled = [g for g in wave if not cached(g.prompt_ids)]
        held = sum(len(g.prompt_ids) for g in prefilled)
        segments = [Segment(g.prompt_ids, keep=g.prompt_ids) for g in prefilled]
        scored = [[i for i in g.members if not samples[i].completion_ids] for g in prefilled]
        members = [i for g in prefilled for i in g.members]
        room = max_tokens - (1 + kv_cost) * held
        for i in list(pending):
            if len(segments) >= max_segments:
                break
            if len(samples[i]) <= room:
                segments.append(Segment(samples[i].input_ids))
                scored.append([i])
                members.append(i)
                room -= len(samples[i])
                pending.remove(i)
        if segments:
            plan.forwards.append(PlannedForward("prefill", segments, scored, members, number))
        plan.from_cache += [(g.prompt_ids, [i for i in g.members if not samples[i].completion_ids])
                            for g in wave if cached(g.prompt_ids)]
        room = max(max_tokens - kv_cost * held, 1)
        current: PlannedForward | None = None
        for group in wave:
            for i in group.members:
                completion = samples[i].completion_ids
                if not completion:
                    continue
                if current is None or (current.tokens + len(completion) > room
                                       or len(current.segments) >= max_segments):
                    current = PlannedForward("completion", [], [], [], number)
                    plan.forwards.append(current)
                current.segments.append(Segment(completion, start=len(group.prompt_ids), prompt=group.prompt_ids))
                current.scored.append([i])
                current.samples.append(i)
    for batch in fill_forwards([len(samples[i]) for i in pending], max_tokens, max_segments):
        indices = [pending[j] for j in batch]
        plan.forwards.append(PlannedForward("prefill", [Segment(samples[i].input_ids) for i in indices],
                                            [[i] for i in indices], indices))
    return plan


# ------------------------------------------------------------------------------------------------- running


class GroupScorer:
    """Plans and runs ragged forwards for one model; ``forward(layout) → (segments, K)`` scores of each segment's
    last token (an in-process backbone and head, or a ZeRO-3 engine).

    With ``cache_tokens > 0`` the keys, values and prompt-end scores of recent prompts are kept between calls
    (least recently used dropped first, bounded in prompt tokens), so the completions of one prompt arriving in
    different calls (a server batching OpenRLHF's one-sample requests) still run the prompt once.
    """

    def __init__(self, forward: Callable[[RaggedLayout], torch.Tensor], budget: ForwardBudget,
                 overhead_tokens: int = 0, cache_tokens: int = 0, call_tokens: int = 16) -> None:
        self.forward = forward
        self.budget = budget
        self.overhead_tokens = int(overhead_tokens)
        self.cache_tokens = int(cache_tokens)
        self.call_tokens = int(call_tokens)
        self.cache_hits = 0
        self.prefills = 0
        """Prompts run through the model: one per prefill of a shared prompt (a prompt-cache hit runs none), one per
        sample with a prompt that runs whole."""
        self._cache: OrderedDict[tuple[int, ...], tuple[LayerKV, torch.Tensor]] = OrderedDict()
        self._cached_tokens = 0

    # -- prompt cache ---------------------------------------------------------------------------------------
    def is_cached(self, prompt_ids: Sequence[int]) -> bool:
        """Whether a prompt's prefill is kept from an earlier call."""
        return tuple(prompt_ids) in self._cache

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_tokens = 0

    def set_cache_tokens(self, tokens: int) -> None:
        self.cache_tokens = int(tokens)
        while self._cached_tokens > self.cache_tokens:
            evicted, _ = self._cache.popitem(last=False)
            self._cached_tokens -= len(evicted)

    def _remember(self, key: tuple[int, ...], kv: LayerKV, scores: torch.Tensor) -> None:
        if not 0 < len(key) <= self.cache_tokens or key in self._cache:
            return
        # Copies: the forward's views would hold every prompt of its wave.
        self._cache[key] = ([(k.clone(), v.clone()) for k, v in kv], scores.clone())
        self._cached_tokens += len(key)
        self.set_cache_tokens(self.cache_tokens)

    # -- planning ---------------------------------------------------------------------------------------------
    def split(self, samples: Sequence[EncodedSample], strategy: str) -> tuple[list[PromptGroup], list[int]]:
        """Prompt groups that go through a prompt prefill, and the samples that run whole.

        ``prefix`` shares every non-empty prompt, ``packed`` none. ``auto`` shares a prompt that several samples
        use or that is cached, and — with a prompt cache — a long prompt whose completions may arrive in later
        calls (one reuse repays its extra completion forward); then keeps the cheaper of that plan and running
        everything whole, counting tokens computed plus ``overhead_tokens`` per forward. Neither shares a prompt
        whose forwards would not fit the budget (``fits_budget``): its samples run whole, in less memory.
        """
        groups = group_by_prompt(samples)
        if strategy == "packed":
            return [], list(range(len(samples)))
        if strategy == "prefix":
            shared = [g for g in groups if g.prompt_ids]
        else:
            overhead = 2 * self.overhead_tokens
            shared = [g for g in groups if g.prompt_ids and (
                len(g.members) > 1 or self.is_cached(g.prompt_ids)
                or (self.cache_tokens > 0 and len(g.prompt_ids) > overhead))]
        shared = [g for g in shared if self.fits_budget(g, samples)]
        chosen = {id(g) for g in shared}
        unshared = sorted(i for g in groups if id(g) not in chosen for i in g.members)
        return shared, unshared

    def fits_budget(self, group: PromptGroup, samples: Sequence[EncodedSample]) -> bool:
        """Whether sharing ``group``'s prompt keeps its forwards within ``max_tokens``: the prefill with the keys and
        values it keeps (``(1 + kv_cost) · P``), and its longest completion next to them (``kv_cost · P + C``).
        A cached prompt needs no prefill and its keys and values count against the cache's own budget.

        Running the group's samples whole instead never needs more memory (``P + C`` per sample), so a prompt that
        does not fit is not shared even under ``prefix``.
        """
        if self.is_cached(group.prompt_ids):
            return True
        prompt, budget = len(group.prompt_ids), self.budget
        longest = max((len(samples[i].completion_ids) for i in group.members), default=0)
        prefill, completion = (1 + budget.kv_cost) * prompt, budget.kv_cost * prompt + longest
        return max(prefill, completion) <= budget.max_tokens

    def plan(self, samples: Sequence[EncodedSample], strategy: str) -> GroupPlan:
        shared, unshared = self.split(samples, strategy)
        plan = plan_group_forwards(samples, shared, unshared, self.budget, self.is_cached)
        if strategy == "auto" and shared and not any(self.is_cached(g.prompt_ids) for g in shared):
            whole = plan_group_forwards(samples, [], range(len(samples)), self.budget)
            if whole.cost(self.overhead_tokens) <= plan.cost(self.overhead_tokens):
                return whole
        return plan

    # -- running ----------------------------------------------------------------------------------------------
    def layout(self, forward: PlannedForward, prompt_kv=None) -> RaggedLayout:
        return RaggedLayout(forward.segments, call_tokens=self.call_tokens, prompt_kv=prompt_kv or {})

    def run(self, samples: Sequence[EncodedSample], plan: GroupPlan, out: torch.Tensor) -> None:
        """Score every sample of ``plan`` into ``out`` ``(n, K)``, in input order."""
        held: dict[tuple[int, ...], LayerKV] = {}
        cached_kv = {key: kv for key, (kv, _) in self._cache.items()}
        from_cache = set()
        for key, members in plan.from_cache:
            from_cache.add(key)
            if members:
                out[members] = self._cache[key][1].to(out.dtype).cpu()
        wave = None
        for forward in plan.forwards:
            if forward.wave != wave:
                held.clear()  # the previous wave's completions are done: release its prompts
                wave = forward.wave
            layout = self.layout(forward, ChainMap(held, cached_kv) if forward.kind == "completion" else None)
            scores = self.forward(layout)
            for segment, rows, row_scores in zip(forward.segments, forward.scored, scores):
                if rows:
                    out[rows] = row_scores.to(out.dtype).cpu()
                if forward.kind == "prefill":
                    self.prefills += 1 if segment.keep is not None else sum(1 for i in rows if samples[i].prompt_ids)
                if segment.keep is not None:
                    held[segment.keep] = layout.kept[segment.keep]
                    self._remember(segment.keep, held[segment.keep], row_scores)
                elif segment.prompt is not None and segment.prompt not in held:
                    from_cache.add(segment.prompt)
        for key in from_cache:
            if key in self._cache:
                self._cache.move_to_end(key)
        self.cache_hits += len(from_cache)
