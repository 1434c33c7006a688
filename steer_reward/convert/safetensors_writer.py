"""Streaming sharded safetensors: every tensor's shape is known before any is read, so each shard's header is
written first and tensors are appended one at a time as they are converted — nothing is held back in memory.

Format (safetensors' spec): 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}, "__metadata__": {...}}`` padded with spaces to a multiple of 8, then the raw little-endian bytes.
The index (``model.safetensors.index.json``) maps every tensor to its shard, as Transformers expects.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO, Sequence

import torch

__all__ = ["ShardedSafetensorsWriter", "parse_size", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def parse_size(text: str | int) -> int:
    """``"5GB"`` → bytes (decimal units like Transformers' ``max_shard_size``; ``GiB`` for binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


class ShardedSafetensorsWriter:
    """Writes ``entries`` (name, shape) of one ``dtype`` into shards of at most ``shard_size`` bytes (a tensor
    larger than that gets a shard of its own), in the given order; ``write`` must follow that order."""

    def __init__(self, folder: str | Path, entries: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 shard_size: int) -> None:
        self.folder = Path(folder)
        self.dtype = dtype
        element = torch.empty((), dtype=dtype).element_size()
        shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        current = 0
        for name, shape in entries:
            nbytes = element * _numel(shape)
            if shards[-1] and current + nbytes > shard_size:
                shards.append([])
                current = 0
            shards[-1].append((name, tuple(shape), nbytes))
            current += nbytes
        total = len(shards)
        self.shards = [(f"model-{i + 1:05d}-of-{total:05d}.safetensors", s) for i, s in enumerate(shards)]
        self.order = [(file, name, shape) for file, s in self.shards for name, shape, _ in s]
        self.total_size = sum(n for _, s in self.shards for _, _, n in s)
        self._next = 0
        self._handle: BinaryIO | None = None
        self._file: str | None = None

    def _open(self, file: str) -> None:
        entries = dict(self.shards)[file]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, nbytes in entries:
            header[name] = {"dtype": _DTYPE_NAMES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self._handle = open(self.folder / file, "wb")
        self._handle.write(struct.pack("<Q", len(blob)))
        self._handle.write(blob)
        self._file = file

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (cast to the writer's dtype). Shape: the planned shape for ``name``."""
        file, expected, shape = self.order[self._next]
        if name != expected or tuple(tensor.shape) != shape:
            raise RuntimeError(f"conversion wrote {name} {tuple(tensor.shape)} where {expected} {shape} was planned")
        if self._file != file:
            self._close_current()
            self._open(file)
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        assert self._handle is not None
        if data.numel():
            self._handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def _close_current(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> dict:
        """Close the last shard and write the index; every planned tensor must have been written."""
        if self._next != len(self.order):
            raise RuntimeError(f"only {self._next} of {len(self.order)} planned tensors were written")
        self._close_current()
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": {name: file for file, name, _ in self.order}}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return index

    def abort(self) -> None:
        self._close_current()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
