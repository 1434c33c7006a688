"""Megatron's ``torch_dist`` distributed checkpoints, read with ``torch.distributed.checkpoint`` and no process
group.

The folder holds ``__<rank>_<n>.distcp`` data files and a ``.metadata`` pickle listing, per key, the global shape
and the saved chunks (one per layer and tensor-parallel shard). A read asks DCP's resharding helper
(``create_read_items_for_chunk_list``) for the saved chunks that overlap one window — a whole tensor or one layer
of a stacked one — and copies them into that window only, so a 75 GB stacked tensor is never in memory at once.

``.metadata`` is unpickled with an allow-list (DCP's own metadata classes, ``torch.Size``, dtypes): reading a
checkpoint never runs code from it. Files are opened through the checkpoint source, so a packed ``.nemo`` tar is
read in place.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from typing import Any

import torch

from steer_reward.convert.formats import TensorInfo, WeightReader, is_ignored_key
from steer_reward.convert.source import CheckpointSource, NemoCheckpointError

__all__ = ["TorchDistReader"]

_SAFE_BUILTINS = {"set", "frozenset", "slice", "tuple", "list", "dict", "int", "float", "str", "bytes", "bool",
                  "complex", "bytearray", "range"}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: its own classes and plain data only."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        elif module == "torch.serialization" and name == "_get_layout":
            # How TensorProperties pickles its layout: a lookup of torch.<layout name>, nothing else.
            return super().find_class(module, name)
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                   (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        elif module == "collections" and name in ("OrderedDict", "defaultdict"):
            return super().find_class(module, name)
        elif module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        raise NemoCheckpointError(f"model_weights/.metadata refers to {module}.{name}, which a torch_dist "
                                  "checkpoint's metadata never holds; refusing to unpickle it")


def _reader_class():
    """A ``FileSystemReader`` whose files come from a ``CheckpointSource`` and whose metadata is unpickled safely."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import FileSystemBase
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SourceFileSystem(FileSystemBase):
        def __init__(self, source: CheckpointSource) -> None:
            self.source = source

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            if "r" not in mode:
                raise PermissionError("a checkpoint source is read-only")
            handle = self.source.open(str(path))
            try:
                yield handle
            finally:
                handle.close()

        def concat_path(self, path, suffix):
            return f"{path}/{suffix}" if str(path) else str(suffix)

        def rename(self, path, new_path):
            raise PermissionError("a checkpoint source is read-only")

        def init_path(self, path):
            return str(path)

        def mkdir(self, path):
            raise PermissionError("a checkpoint source is read-only")

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return True

        def exists(self, path) -> bool:
            return self.source.exists(str(path))

        def rm_file(self, path):
            raise PermissionError("a checkpoint source is read-only")

    class SourceReader(FileSystemReader):
        def __init__(self, source: CheckpointSource, root: str) -> None:
            super().__init__(root)
            self.fs = SourceFileSystem(source)
            self.path = root

        def read_metadata(self, *args: Any, **kwargs: Any):
            with self.fs.create_stream(self.fs.concat_path(self.path, ".metadata"), "rb") as handle:
                metadata = _MetadataUnpickler(io.BytesIO(handle.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SourceReader


class TorchDistReader(WeightReader):
    format = "torch_dist"

    def __init__(self, source: CheckpointSource, root: str) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        super().__init__()
        if not source.exists(f"{root}/.metadata"):
            raise NemoCheckpointError(f"missing tensors: {root}/.metadata (the torch_dist index) is not in the "
                                      "checkpoint")
        self.reader = _reader_class()(source, root)
        try:
            self.metadata = self.reader.read_metadata()
        except (pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise NemoCheckpointError(f"{root}/.metadata cannot be read ({err})") from None
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata) and not is_ignored_key(key):
                self.tensors[key] = TensorInfo(tuple(md.size), md.properties.dtype)

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.metadata.state_dict_metadata[key]
        shape = list(md.size)
        offsets = [0] * len(shape)
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{key}: layer {index} out of range {shape[0]}")
            offsets[0], shape[0] = index, 1
        window = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(shape))
        out = torch.empty(shape, dtype=md.properties.dtype)
        items = create_read_items_for_chunk_list(key, md, [window])
        covered = sum(_numel(item.lengths) for item in items)
        if covered != out.numel():
            raise NemoCheckpointError(f"missing tensor data: the saved chunks of {key} cover {covered} of "
                                      f"{out.numel()} elements" + (f" of layer {index}" if index is not None else ""))

        class WindowPlanner(DefaultLoadPlanner):
            """Every read item lands in ``out`` at its offset inside the window."""

            def resolve_tensor(self, read_item):
                view = out
                for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                    view = view.narrow(dim, start, length)
                return view

            def commit_tensor(self, read_item, tensor):
                pass

        self.reader.read_data(LoadPlan(items), WindowPlanner()).wait()
        return out[0] if index is not None else out

    def describe(self) -> str:
        files = {info.relative_path for info in self.metadata.storage_data.values()}
        return f"torch_dist ({len(files)} data files)"


def _numel(size: Any) -> int:
    n = 1
    for d in size:
        n *= int(d)
    return n
