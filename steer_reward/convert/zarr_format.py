"""Megatron's ``zarr`` distributed checkpoints, read without the zarr package.

Megatron-Core's zarr strategy (``dist_checkpointing/strategies/zarr.py``, removed in core 0.16) writes one zarr v2
array per key: a folder with a ``.zarray`` JSON (``compressor: null``, ``filters: null``, C order; dtype ``"<f4"``
etc., or the non-standard ``"bfloat16"`` it patches in) and one raw chunk file per (layer, tensor-parallel shard),
named by chunk coordinates joined with ``.`` (or ``/`` when ``dimension_separator`` says so). An uncompressed
chunk is the C-order bytes of the whole chunk (edge chunks included), so ``torch.frombuffer`` reads it.
"""

from __future__ import annotations

import itertools
import json
import math

import torch

from steer_reward.convert.formats import TensorInfo, WeightReader, is_ignored_key
from steer_reward.convert.source import CheckpointSource, NemoCheckpointError

__all__ = ["ZarrReader", "ZARR_DTYPES"]

ZARR_DTYPES = {
    "bfloat16": torch.bfloat16, "<f4": torch.float32, "<f2": torch.float16, "<f8": torch.float64,
    "|u1": torch.uint8, "|i1": torch.int8, "<i4": torch.int32, "<i8": torch.int64, "|b1": torch.bool,
}


class ZarrReader(WeightReader):
    format = "zarr"

    def __init__(self, source: CheckpointSource, root: str) -> None:
        super().__init__()
        self.source = source
        self.root = root
        self.arrays: dict[str, dict] = {}
        for name in source.listdir(root):
            if is_ignored_key(name) or not source.exists(f"{root}/{name}/.zarray"):
                continue
            try:
                meta = json.loads(source.read_text(f"{root}/{name}/.zarray"))
            except ValueError as err:
                raise NemoCheckpointError(f"{root}/{name}/.zarray is not valid JSON ({err})") from None
            self._check(name, meta)
            self.arrays[name] = meta
            self.tensors[name] = TensorInfo(tuple(meta["shape"]), ZARR_DTYPES[meta["dtype"]])

    @staticmethod
    def _check(name: str, meta: dict) -> None:
        where = f"zarr array {name}"
        if meta.get("zarr_format") != 2:
            raise NemoCheckpointError(f"{where}: zarr_format {meta.get('zarr_format')!r}; Megatron writes v2")
        if meta.get("compressor") is not None or meta.get("filters"):
            raise NemoCheckpointError(f"{where}: compressed or filtered chunks ({meta.get('compressor')}); Megatron "
                                      "writes raw chunks and only those are read")
        if meta.get("order", "C") != "C":
            raise NemoCheckpointError(f"{where}: Fortran-order chunks are not read")
        if meta.get("dtype") not in ZARR_DTYPES:
            raise NemoCheckpointError(f"{where}: dtype {meta.get('dtype')!r} is not one of {sorted(ZARR_DTYPES)}")
        if len(meta.get("shape", ())) != len(meta.get("chunks", ())):
            raise NemoCheckpointError(f"{where}: shape and chunks have different ranks")

    def _read_chunk(self, key: str, coords: tuple, chunks: list[int], dtype: torch.dtype, sep: str) -> torch.Tensor:
        """One chunk, read straight into a tensor's memory. Shape: ``chunks``."""
        name = sep.join(str(c) for c in coords)
        rel = f"{self.root}/{key}/{name}"
        if not self.source.exists(rel):
            raise NemoCheckpointError(f"missing tensor data: zarr chunk {key}/{name} is not in the checkpoint "
                                      "(an incomplete copy?)")
        chunk = torch.empty(chunks, dtype=dtype)
        buffer = memoryview(chunk.reshape(-1).view(torch.uint8).numpy())
        with self.source.open(rel) as handle:
            filled = handle.readinto(buffer)
            extra = handle.read(1)
        if filled != len(buffer) or extra:
            raise NemoCheckpointError(f"zarr chunk {key}/{name} does not hold {len(buffer)} bytes (one raw "
                                      f"{list(chunks)} chunk)")
        return chunk

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        meta = self.arrays[key]
        shape, chunks = list(meta["shape"]), list(meta["chunks"])
        dtype = ZARR_DTYPES[meta["dtype"]]
        sep = meta.get("dimension_separator") or "."
        # The region to read, per dimension: [lo, hi).
        region = [(0, n) for n in shape]
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{key}: layer {index} out of range {shape[0]}")
            region[0] = (index, index + 1)
        out_shape = [hi - lo for lo, hi in region]
        grids = [range(lo // c, math.ceil(hi / c)) if hi > lo else range(0) for (lo, hi), c in zip(region, chunks)]
        if not shape:  # a 0-d array is one chunk named "0"
            grids = [range(1)]
        coords_list = list(itertools.product(*grids))
        whole = len(coords_list) == 1 and list(chunks) == out_shape and all(
            c * size == lo for c, size, (lo, _) in zip(coords_list[0], chunks, region))
        out = None if whole else torch.empty(out_shape, dtype=dtype)
        for coords in coords_list:
            chunk = self._read_chunk(key, coords if shape else (0,), chunks, dtype, sep)
            if whole:  # the chunk is exactly the window (one layer, TP 1): no copy
                out = chunk
                break
            src, dst = [], []
            for c, size, (lo, hi) in zip(coords, chunks, region):
                start, stop = max(c * size, lo), min((c + 1) * size, hi)
                src.append(slice(start - c * size, stop - c * size))
                dst.append(slice(start - lo, stop - lo))
            out[tuple(dst)] = chunk[tuple(src)]
        return out[0] if index is not None else out

