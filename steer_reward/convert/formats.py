"""The weight formats of a NeMo checkpoint, detected from its files, behind one reader interface.

- ``torch_dist`` and ``zarr``: Megatron-Core distributed checkpoints in ``model_weights/`` (its ``metadata.json``
  names the backend). Tensors have their global shapes; per-layer tensors are stacked with a leading layer axis.
- ``legacy``: NeMo's pre-distributed layout (``nlp_overrides.NLPSaveRestoreConnector.save_to``):
  ``model_weights.ckpt`` (one rank), ``mp_rank_XX/model_weights.ckpt`` (tensor parallel) or
  ``tp_rank_XX_pp_rank_YYY/model_weights.ckpt`` (pipeline parallel): ``torch.save``'d state dicts, one per rank.

A reader lists every tensor (``tensors``: shapes and dtypes, nothing read) and reads one at a time, or one layer
of a stacked tensor, so memory stays within a small multiple of the largest tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from steer_reward.convert.source import CheckpointSource, NemoCheckpointError

__all__ = ["TensorInfo", "WeightReader", "open_weights", "WEIGHTS_DIR", "is_ignored_key"]

WEIGHTS_DIR = "model_weights"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def is_ignored_key(key: str) -> bool:
    """Entries that carry no weights: Transformer Engine / fp8 ``_extra_state``."""
    return "_extra_state" in key


class WeightReader:
    """One checkpoint's tensors by Megatron key (``model.decoder.layers.self_attention.linear_qkv.weight``...)."""

    format: str = ""

    def __init__(self) -> None:
        self.tensors: dict[str, TensorInfo] = {}

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor ``key``, or its slice ``[index]`` along the first (layer) axis. Shape: ``shape`` or
        ``shape[1:]``. Only that slice is read."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.format

    def close(self) -> None:
        pass


def _detect(source: CheckpointSource) -> str:
    if source.exists(f"{WEIGHTS_DIR}/metadata.json"):
        try:
            meta = json.loads(source.read_text(f"{WEIGHTS_DIR}/metadata.json"))
        except ValueError as err:
            raise NemoCheckpointError(f"{WEIGHTS_DIR}/metadata.json is not valid JSON ({err})") from None
        backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
        if backend in ("torch_dist", "zarr"):
            return backend
        raise NemoCheckpointError(f"unknown weight format: {WEIGHTS_DIR}/metadata.json names sharded_backend "
                                  f"{backend!r}; this converter reads torch_dist and zarr")
    if source.is_dir(WEIGHTS_DIR):
        names = source.listdir(WEIGHTS_DIR)
        if ".metadata" in names:
            return "torch_dist"
        if any(source.exists(f"{WEIGHTS_DIR}/{n}/.zarray") for n in names):
            return "zarr"
    if source.exists("model_weights.ckpt") or any(
            n.startswith(("mp_rank_", "tp_rank_")) for n in source.listdir("")):
        return "legacy"
    raise NemoCheckpointError(
        f"unknown weight format in {source.location}: no {WEIGHTS_DIR}/ distributed checkpoint (metadata.json), "
        "no model_weights.ckpt and no mp_rank_XX/ or tp_rank_XX_pp_rank_YYY/ folders"
    )


def open_weights(source: CheckpointSource, tensor_parallel: int | None = None,
                 pipeline_parallel: int | None = None) -> WeightReader:
    """The reader for the weight format ``source`` holds. The parallel sizes (from ``model_config.yaml``) are
    checked against a legacy checkpoint's rank files; distributed checkpoints do not depend on them."""
    fmt = _detect(source)
    if fmt == "torch_dist":
        from steer_reward.convert.torch_dist_format import TorchDistReader

        return TorchDistReader(source, WEIGHTS_DIR)
    if fmt == "zarr":
        from steer_reward.convert.zarr_format import ZarrReader

        return ZarrReader(source, WEIGHTS_DIR)
    from steer_reward.convert.legacy_format import LegacyReader

    return LegacyReader(source, tensor_parallel, pipeline_parallel)
