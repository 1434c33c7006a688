"""NeMo's legacy (pre-distributed) weights: one ``torch.save``'d state dict per model-parallel rank, merged here.

Layout (NeMo ``nlp_overrides.NLPSaveRestoreConnector.save_to`` and ``utils/model_utils.inject_model_parallel_rank``):
``model_weights.ckpt`` for one rank, ``mp_rank_XX/model_weights.ckpt`` per tensor-parallel rank, and
``tp_rank_XX_pp_rank_YYY/model_weights.ckpt`` with pipeline parallelism, where each stage numbers its layers from 0.

Tensor-parallel shards are merged the way Megatron-Core's parallel layers split them
(``tensor_parallel/layers.py``): column-parallel ``linear_qkv`` / ``linear_fc1`` / ``output_layer`` and the
vocab-parallel embedding on dim 0, row-parallel ``linear_proj`` / ``linear_fc2`` / ``rm_head`` (NeMo-Aligner's
``RewardModelHead`` is a ``RowParallelLinear``) on dim 1, norms and row-parallel biases replicated. A gated
``linear_fc1`` holds ``[gate_r; up_r]`` on rank r, so the merged tensor is ``[gate_0..gate_T; up_0..up_T]``, not
a plain concatenation.

The files are read lazily and without running pickled code: ``data.pkl`` is unpickled with tensors rebuilt as
references into the zip (nothing else is constructed; ``_extra_state`` blobs become opaque placeholders), and
each tensor's bytes are read from its storage record only when asked for.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from steer_reward.convert.formats import TensorInfo, WeightReader, is_ignored_key
from steer_reward.convert.source import CheckpointSource, NemoCheckpointError

__all__ = ["LegacyReader", "TP_SPLIT"]

CKPT_NAME = "model_weights.ckpt"
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")

# How each tensor is split across tensor-parallel ranks: ("cat", dim), "swiglu" or "replicated". Keys are the
# name after "model." (global tensors) or after "model.decoder.layers.<i>." (per-layer tensors).
TP_SPLIT: dict[str, Any] = {
    "embedding.word_embeddings.weight": ("cat", 0),
    "output_layer.weight": ("cat", 0),
    "decoder.final_layernorm.weight": "replicated",
    "decoder.final_layernorm.bias": "replicated",
    "rm_head.weight": ("cat", 1),
    "rm_head.bias": "replicated",
    "self_attention.linear_qkv.weight": ("cat", 0),
    "self_attention.linear_qkv.bias": ("cat", 0),
    "self_attention.linear_qkv.layer_norm_weight": "replicated",
    "self_attention.linear_qkv.layer_norm_bias": "replicated",
    "self_attention.linear_proj.weight": ("cat", 1),
    "self_attention.linear_proj.bias": "replicated",
    "mlp.linear_fc1.weight": "swiglu",
    "mlp.linear_fc1.bias": "swiglu",
    "mlp.linear_fc1.layer_norm_weight": "replicated",
    "mlp.linear_fc1.layer_norm_bias": "replicated",
    "mlp.linear_fc2.weight": ("cat", 1),
    "mlp.linear_fc2.bias": "replicated",
    "input_layernorm.weight": "replicated",
    "input_layernorm.bias": "replicated",
    "pre_mlp_layernorm.weight": "replicated",
    "pre_mlp_layernorm.bias": "replicated",
}


@dataclass(frozen=True)
class _LazyTensor:
    """A tensor inside a torch zip checkpoint: storage record, dtype, and the view's offset/size/stride."""

    record: str
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Opaque:
    """Stands for any pickled object that is not a tensor (``_extra_state`` blobs); constructs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Opaque":
        return _Opaque()


class _StateDict(dict):
    """Stands for ``OrderedDict``: a state dict pickles its ``_metadata`` attribute too, so it needs a __dict__."""


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, *args: Any) -> Any:
    if not isinstance(storage, tuple) or storage[0] != "storage":
        return _Opaque()
    _, record, dtype = storage
    return _LazyTensor(record, dtype, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: Any, *args: Any) -> Any:
    return data


class _LazyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, prefix: str) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return _StateDict
        return _Opaque  # anything else (BytesIO blobs, codecs) becomes an inert placeholder

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            return _Opaque()
        storage_type, key = pid[1], pid[2]
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else None
        if dtype is None:
            raise NemoCheckpointError(f"a tensor storage of type {storage_type!r} is not a plain dtype storage")
        return ("storage", f"{self.prefix}/data/{key}", dtype)


class _RankFile:
    """One rank's ``model_weights.ckpt``: its lazy state dict and the zip to read bytes from."""

    def __init__(self, source: CheckpointSource, rel: str) -> None:
        self.rel = rel
        self.handle = source.open(rel)
        try:
            self.zip = zipfile.ZipFile(self.handle)
        except zipfile.BadZipFile:
            self.handle.close()
            raise NemoCheckpointError(f"{rel} is not a torch zip checkpoint (saved by torch < 1.6?); re-save it with "
                                      "a current torch") from None
        pkl = [n for n in self.zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise NemoCheckpointError(f"{rel} has no data.pkl: not a torch.save checkpoint")
        prefix = pkl[0].rsplit("/", 1)[0]
        try:
            state = _LazyUnpickler(self.zip.read(pkl[0]), prefix).load()
        except (pickle.UnpicklingError, AttributeError, TypeError, ValueError, EOFError, IndexError) as err:
            raise NemoCheckpointError(f"{rel} cannot be read as a state dict ({type(err).__name__}: {err})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise NemoCheckpointError(f"{rel} does not hold a state dict")
        self.state = {str(k): v for k, v in state.items()}

    def read(self, key: str) -> torch.Tensor:
        lazy = self.state[key]
        element = torch.empty((), dtype=lazy.dtype).element_size()
        span = 1 + sum((n - 1) * s for n, s in zip(lazy.size, lazy.stride)) if all(lazy.size) else 0
        with self.zip.open(lazy.record) as record:
            record.seek(lazy.offset * element)
            data = bytearray(record.read(span * element))
        if len(data) != span * element:
            raise NemoCheckpointError(f"{self.rel}: tensor {key} is truncated")
        flat = torch.frombuffer(data, dtype=lazy.dtype) if span else torch.empty(0, dtype=lazy.dtype)
        return flat.as_strided(lazy.size, lazy.stride).contiguous()

    def close(self) -> None:
        self.zip.close()
        self.handle.close()


def _rank_files(source: CheckpointSource) -> dict[tuple[int, int], str]:
    """{(tp rank, pp rank): relative path of its model_weights.ckpt}."""
    if source.exists(CKPT_NAME):
        return {(0, 0): CKPT_NAME}
    files = {}
    for name in source.listdir(""):
        mp = re.fullmatch(r"mp_rank_(\d+)", name)
        tp_pp = re.fullmatch(r"tp_rank_(\d+)_pp_rank_(\d+)", name)
        rank = (int(mp.group(1)), 0) if mp else (int(tp_pp.group(1)), int(tp_pp.group(2))) if tp_pp else None
        if rank is None:
            continue
        if not source.exists(f"{name}/{CKPT_NAME}"):
            raise NemoCheckpointError(f"missing tensors: {name}/ has no {CKPT_NAME}")
        files[rank] = f"{name}/{CKPT_NAME}"
    return files


class LegacyReader(WeightReader):
    format = "legacy"

    def __init__(self, source: CheckpointSource, expected_tp: int | None = None,
                 expected_pp: int | None = None) -> None:
        super().__init__()
        files = _rank_files(source)
        tp = 1 + max(t for t, _ in files)
        pp = 1 + max(p for _, p in files)
        missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in files]
        if missing:
            raise NemoCheckpointError(f"inconsistent TP shards: found {sorted(files.values())} but rank files "
                                      f"{missing} (tp, pp) are missing")
        for name, found, expected in (("tensor_model_parallel_size", tp, expected_tp),
                                      ("pipeline_model_parallel_size", pp, expected_pp)):
            if expected is not None and found != expected:
                raise NemoCheckpointError(f"inconsistent TP shards: model_config.yaml says {name} {expected} but "
                                          f"the checkpoint has {found} rank(s) of weights")
        self.tp, self.pp = tp, pp
        self.ranks = {rank: _RankFile(source, rel) for rank, rel in sorted(files.items())}
        # Global key -> [(rank file, local key)] per tensor-parallel rank.
        self.parts: dict[str, list[tuple[_RankFile, str]]] = {}
        offset = 0
        for stage in range(pp):
            stage_layers = set()
            for t in range(tp):
                rank = self.ranks[(t, stage)]
                for key, value in rank.state.items():
                    if is_ignored_key(key):
                        continue
                    if not isinstance(value, _LazyTensor):
                        raise NemoCheckpointError(f"{rank.rel}: {key} is not a tensor")
                    local, match = key, _LAYER.match(key)
                    if match:
                        stage_layers.add(int(match.group(1)))
                        key = f"model.decoder.layers.{offset + int(match.group(1))}.{match.group(2)}"
                    self.parts.setdefault(key, []).append((rank, local))
            offset += len(stage_layers)
        for key, parts in self.parts.items():
            if len(parts) != tp:
                raise NemoCheckpointError(f"inconsistent TP shards: {key} is in {len(parts)} of {tp} "
                                          "tensor-parallel ranks")
            self.tensors[key] = self._merged_info(key, parts)

    def _split(self, key: str) -> Any:
        match = _LAYER.match(key)
        suffix = match.group(2) if match else key.removeprefix("model.")
        split = TP_SPLIT.get(suffix)
        if split is None and self.tp > 1:
            raise NemoCheckpointError(f"cannot merge the tensor-parallel shards of {key}: its split is not known")
        return split or "replicated"

    def _merged_info(self, key: str, parts: list) -> TensorInfo:
        infos = [rank.state[local] for rank, local in parts]
        dtypes = {i.dtype for i in infos}
        split = self._split(key)
        shapes = [i.size for i in infos]
        if len(dtypes) > 1:
            raise NemoCheckpointError(f"inconsistent TP shards: {key} has dtypes {sorted(map(str, dtypes))}")
        if split == "replicated" or self.tp == 1:
            if len(set(shapes)) > 1:
                raise NemoCheckpointError(f"inconsistent TP shards: replicated {key} has shapes {shapes}")
            return TensorInfo(shapes[0], infos[0].dtype)
        dim = 0 if split == "swiglu" else split[1]
        others = {s[:dim] + s[dim + 1:] for s in shapes}
        if len(others) > 1 or len({s[dim] for s in shapes}) > 1 or any(len(s) <= dim for s in shapes):
            raise NemoCheckpointError(f"inconsistent TP shards: {key} has shapes {shapes} across ranks")
        if split == "swiglu" and shapes[0][0] % 2:
            raise NemoCheckpointError(f"inconsistent TP shards: gated {key} has an odd first dim {shapes[0][0]}")
        merged = list(shapes[0])
        merged[dim] = sum(s[dim] for s in shapes)
        return TensorInfo(tuple(merged), infos[0].dtype)

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        if index is not None:
            raise NemoCheckpointError(f"{key}: legacy checkpoints hold per-layer tensors, not stacked ones")
        parts = self.parts[key]
        shards = [rank.read(local) for rank, local in parts]
        split = self._split(key)
        if split == "replicated" or self.tp == 1:
            for (rank, _), shard in zip(parts[1:], shards[1:]):
                if not torch.equal(shard, shards[0]):
                    raise NemoCheckpointError(f"inconsistent TP shards: replicated {key} differs between "
                                              f"{parts[0][0].rel} and {rank.rel}")
            return shards[0]
        if split == "swiglu":
            halves = [s.chunk(2, dim=0) for s in shards]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return torch.cat(shards, dim=split[1])

    def describe(self) -> str:
        return f"legacy (tensor parallel {self.tp}, pipeline parallel {self.pp}: {len(self.ranks)} rank files)"

    def close(self) -> None:
        for rank in self.ranks.values():
            rank.close()

