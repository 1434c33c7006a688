"""Micro-batch planning: which sequences run together.

CPU and GPU time scale with the padded tensor (rows × longest row), so sequences are sorted by length and packed
into micro-batches under a padded-token budget, which also bounds peak activation memory by tokens rather than by
sample count. Ragged forwards (``steer_reward.ragged``) have no padding: they are filled up to the budget
(``fill_forwards``), and prompt keys and values held across forwards count against it (``kv_token_cost``). Callers
restore input order with the returned indices.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["plan_microbatches", "padded_tokens", "fill_forwards", "kv_token_cost", "key_value_shape",
           "rope_alone_from"]


def padded_tokens(lengths: Sequence[int], batch: Sequence[int]) -> int:
    """Tokens of the right-padded tensor for ``batch`` (indices into ``lengths``)."""
    return max((lengths[i] for i in batch), default=0) * len(batch)


def plan_microbatches(lengths: Sequence[int], max_tokens: int, max_batch_size: int,
                      alone_from: int | None = None) -> list[list[int]]:
    """Group sample indices into length-sorted micro-batches of at most ``max_tokens`` padded tokens.

    Longest first, so an out-of-memory shows on the first micro-batch. A sequence longer than the budget runs
    alone, and so does one of ``alone_from`` tokens or more (``rope_alone_from``). Every index appears exactly once.

    >>> plan_microbatches([5, 1, 4, 2], max_tokens=8, max_batch_size=4)
    [[0], [2, 3], [1]]
    """
    if max_tokens <= 0 or max_batch_size <= 0:
        raise ValueError("max_tokens and max_batch_size must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        # Sorted descending: the first member of a batch is its longest row.
        rows_after = len(current) + 1
        alone = alone_from is not None and (longest >= alone_from or lengths[i] >= alone_from)
        if current and (alone or max(longest, lengths[i]) * rows_after > max_tokens or rows_after > max_batch_size):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


def fill_forwards(lengths: Sequence[int], max_tokens: int, max_items: int) -> list[list[int]]:
    """Padding-free forwards: first-fit decreasing bins of at most ``max_tokens`` tokens and ``max_items`` sequences.

    A ragged forward costs its real tokens only, so fewer, fuller forwards are always cheaper. A sequence longer
    than the budget runs alone. Every index appears exactly once.

    >>> fill_forwards([5, 3, 4, 2], max_tokens=8, max_items=4)
    [[0, 1], [2, 3]]
    """
    if max_tokens <= 0 or max_items <= 0:
        raise ValueError("max_tokens and max_items must be positive")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free and len(bins[b]) < max_items:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


def kv_token_cost(config) -> float:
    """Memory of one token's keys and values in every layer, in tokens of forward activations.

    A prompt's cache is held while its completions run, so it counts against the same budget as the activations of
    a forward: ``2 · layers · kv_heads · head_dim`` values per cached token against ``2 · d + 3 · d_ff`` live values
    per token at a forward's peak (residual, normed input, and the MLP's gate, up and product). About 1.5 for
    Llama shapes.
    """
    kv_heads, head_dim = key_value_shape(config)
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim
    return kv / (2 * config.hidden_size + 3 * config.intermediate_size)


def key_value_shape(config) -> tuple[int, int]:
    """(key/value heads, head dimension) of a decoder config: grouped-query heads and an explicit ``head_dim``
    when the config sets them, else one key/value head per query head of ``hidden_size / heads``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim


def rope_alone_from(config) -> int | None:
    """Length from which a sequence must run in a forward of its own, or None.

    Transformers' ``dynamic`` (NTK) and ``longrope`` rotary embeddings choose their frequencies from the largest
    position id of the whole forward (``modeling_rope_utils.dynamic_rope_update``): a short sequence batched with one
    past the original context would be scored with the long one's frequencies, its reward depending on its batch
    mates. Sequences below the returned length get the unscaled frequencies whatever they run with; longer ones run
    alone, as in a plain forward of each. (``dynamic`` also keeps the largest length seen until a forward shorter
    than the original context resets it; a forward alone is what a plain forward of that sequence computes.)
    """
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return None
    # One set of parameters, or one per layer type.
    one_set = "rope_type" in params or "type" in params
    sets = [params] if one_set else [p for p in params.values() if isinstance(p, dict)]
    limits = []
    for p in sets:
        kind = str(p.get("rope_type", p.get("type")) or "default")
        if "dynamic" in kind:  # the update resets below, and scales from, max_position_embeddings
            limits.append(int(config.max_position_embeddings))
        elif kind == "longrope":  # long factors once the forward's length exceeds the original context
            original = (p.get("original_max_position_embeddings")
                        or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
            limits.append(int(original) + 1)
    return min(limits) if limits else None
