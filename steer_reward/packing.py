"""Padding-free batches: several sequences concatenated in one row, each attending only to itself.

A packed row carries per-sequence ``position_ids`` (restarting at 0) and a block-diagonal causal 4-D mask, so
every sequence sees exactly what a plain forward of it alone sees. Each sequence's score is read at its own last
token before the head — HF's sequence-classification pooling would return one score per row (DESIGN.md,
Performance), so it is never used here.

Attention inside a row is computed densely (SDPA with a mask) on CPU: rows are kept to ``max_row_tokens`` so
the masked-out blocks stay a small share of the work. Same architecture requirements as prefix sharing
(``prefix_sharing.prefix_sharing_unsupported``): the backbone must read an explicit 4-D mask and position ids.
"""

from __future__ import annotations

from typing import Sequence

import torch

from steer_reward.forward import ModelHead
from steer_reward.planning import plan_microbatches
from steer_reward.prefix_sharing import additive_mask

__all__ = ["pack_rows", "block_causal_mask", "PackedForward"]


def pack_rows(lengths: Sequence[int], max_row_tokens: int) -> list[list[int]]:
    """First-fit-decreasing packing of sequence indices into rows of at most ``max_row_tokens`` tokens.

    A sequence longer than the limit gets a row of its own. Every index appears exactly once.

    >>> pack_rows([5, 3, 4, 2], max_row_tokens=8)
    [[0, 1], [2, 3]]
    """
    if max_row_tokens <= 0:
        raise ValueError("max_row_tokens must be positive")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_row_tokens - lengths[i])
    return rows


def block_causal_mask(segment_lengths: Sequence[int], row_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and positions of one packed row.

    Returns ``mask`` of shape ``(row_length, row_length)`` (True = may attend: same segment, key not after
    query) and ``position_ids`` of shape ``(row_length,)`` restarting at 0 in each segment. The padded tail is
    one more segment, so its queries see themselves and never produce an all-masked (NaN) row.
    """
    used = sum(segment_lengths)
    segments = list(segment_lengths) + ([row_length - used] if row_length > used else [])
    segment_id = torch.repeat_interleave(torch.arange(len(segments)), torch.as_tensor(segments))
    position_ids = torch.cat([torch.arange(n) for n in segments])
    causal = torch.ones((row_length, row_length), dtype=torch.bool).tril()
    return causal & (segment_id[:, None] == segment_id[None, :]), position_ids


class PackedForward:
    """Scores sequences packed into rows; several rows per forward under a padded-token budget.

    ``max_tokens`` bounds rows × longest row of one forward (peak activation memory), ``max_row_tokens`` the
    length of one packed row (the dense attention work of a row grows with its square).
    """

    def __init__(self, head: ModelHead, max_tokens: int, max_row_tokens: int) -> None:
        self.head = head
        self.max_tokens = int(max_tokens)
        self.max_row_tokens = int(max_row_tokens)
        self.forward_calls = 0

    def plan(self, lengths: Sequence[int]) -> list[list[list[int]]]:
        """Forwards, each a list of rows, each a list of sequence indices."""
        rows = pack_rows(lengths, self.max_row_tokens)
        row_lengths = [sum(lengths[i] for i in row) for row in rows]
        return [[rows[r] for r in batch]
                for batch in plan_microbatches(row_lengths, self.max_tokens, len(rows) or 1)]

    def _forward(self, rows: list[list[Sequence[int]]], pad_id: int) -> list[torch.Tensor]:
        """Pooled hidden states of each sequence of each row. Shape: ``(len(row), d)`` per row."""
        weight = next(self.head.backbone.parameters())
        device = weight.device
        width = max(sum(len(s) for s in row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.empty((len(rows), 1, width, width), dtype=torch.bool)
        positions = torch.empty((len(rows), width), dtype=torch.long)
        ends: list[torch.Tensor] = []
        for r, row in enumerate(rows):
            lengths = [len(s) for s in row]
            input_ids[r, : sum(lengths)] = torch.as_tensor([t for s in row for t in s], dtype=torch.long)
            mask[r, 0], positions[r] = block_causal_mask(lengths, width)
            ends.append(torch.as_tensor(lengths).cumsum(0) - 1)
        self.forward_calls += 1
        hidden = self.head.backbone(input_ids=input_ids.to(device), attention_mask=additive_mask(mask.to(device), weight.dtype),
                                    position_ids=positions.to(device)).last_hidden_state
        return [hidden[r, e.to(hidden.device)] for r, e in enumerate(ends)]  # device_map: last layer elsewhere

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """Attributes of each sequence, in input order. Shape: ``(n, K)``, float32."""
        lengths = [len(s) for s in sequences]
        if any(n == 0 for n in lengths):
            raise ValueError("cannot score an empty sequence")
        pooled: torch.Tensor | None = None
        for batch in self.plan(lengths):
            for row, states in zip(batch, self._forward([[sequences[i] for i in row] for row in batch], pad_id)):
                if pooled is None:
                    pooled = states.new_empty((len(sequences), states.shape[-1]))
                pooled[row] = states
        return self.head.head(pooled).float()
