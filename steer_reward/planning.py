"""Micro-batch planning: which sequences run together.

CPU and GPU time scale with the padded tensor (rows × longest row), so sequences are sorted by length and packed
into micro-batches under a padded-token budget, which also bounds peak activation memory by tokens rather than by
sample count. Callers restore input order with the returned indices.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["plan_microbatches", "padded_tokens"]


def padded_tokens(lengths: Sequence[int], batch: Sequence[int]) -> int:
    """Tokens of the right-padded tensor for ``batch`` (indices into ``lengths``)."""
    return max((lengths[i] for i in batch), default=0) * len(batch)


def plan_microbatches(lengths: Sequence[int], max_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Group sample indices into length-sorted micro-batches of at most ``max_tokens`` padded tokens.

    Longest first, so an out-of-memory shows on the first micro-batch. A sequence longer than the budget runs
    alone. Every index appears exactly once.

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
        if current and (max(longest, lengths[i]) * rows_after > max_tokens or rows_after > max_batch_size):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches
