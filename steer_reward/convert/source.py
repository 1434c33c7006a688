"""Where a NeMo checkpoint's files come from: an unpacked ``.nemo`` folder or the ``.nemo`` tar itself.

A ``.nemo`` file is a tar of the folder (``model_config.yaml``, ``model_weights/``, bundled ``<hash>_<name>``
files). A 70B checkpoint is ~140 GB, so a tar is read **in place**: every member is a seekable window into the
tar file, nothing is extracted. That needs an uncompressed tar (what NeMo writes today); a compressed one would be
decompressed from its start for every read, so it is refused with the command that unpacks it.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from steer_reward.modeling import ModelLoadError

__all__ = ["NemoCheckpointError", "CheckpointSource", "open_source"]


class NemoCheckpointError(ModelLoadError):
    """A NeMo checkpoint that cannot be read or converted exactly, with the reason."""


CONFIG_NAME = "model_config.yaml"


class CheckpointSource:
    """Files of one NeMo checkpoint, addressed by POSIX paths relative to the checkpoint's root."""

    def __init__(self, location: str) -> None:
        self.location = location

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def is_dir(self, rel: str) -> bool:
        raise NotImplementedError

    def listdir(self, rel: str) -> list[str]:
        """Names directly under folder ``rel`` (files and folders), sorted."""
        raise NotImplementedError

    def size(self, rel: str) -> int:
        raise NotImplementedError

    def open(self, rel: str) -> BinaryIO:
        """A seekable binary file object; close it after use."""
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        with self.open(rel) as handle:
            return handle.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def close(self) -> None:
        pass

    def __enter__(self) -> "CheckpointSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderSource(CheckpointSource):
    """An unpacked ``.nemo`` folder."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.root = root

    def _path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def is_dir(self, rel: str) -> bool:
        return self._path(rel).is_dir()

    def listdir(self, rel: str) -> list[str]:
        return sorted(os.listdir(self._path(rel)))

    def size(self, rel: str) -> int:
        return self._path(rel).stat().st_size

    def open(self, rel: str) -> BinaryIO:
        return open(self._path(rel), "rb")


class TarSource(CheckpointSource):
    """A packed ``.nemo`` (uncompressed tar), read in place."""

    def __init__(self, path: Path, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], root: str) -> None:
        super().__init__(str(path))
        self.path = path
        self.tar = tar
        self.root = root
        self.members = members
        self.dirs: dict[str, set[str]] = {}
        for name in members:
            parts = PurePosixPath(name).parts
            for depth in range(len(parts)):
                parent = "/".join(parts[:depth])
                self.dirs.setdefault(parent, set()).add(parts[depth])

    def _name(self, rel: str) -> str:
        return "/".join(p for p in (self.root, rel) if p)

    def exists(self, rel: str) -> bool:
        name = self._name(rel)
        return name in self.members or name in self.dirs

    def is_dir(self, rel: str) -> bool:
        return self._name(rel) in self.dirs

    def listdir(self, rel: str) -> list[str]:
        return sorted(self.dirs.get(self._name(rel), ()))

    def size(self, rel: str) -> int:
        return self.members[self._name(rel)].size

    def open(self, rel: str) -> BinaryIO:
        member = self.members.get(self._name(rel))
        if member is None or not member.isfile():
            raise FileNotFoundError(f"{self.path}: no file {rel!r} in the archive")
        handle = self.tar.extractfile(member)
        assert handle is not None
        return handle  # tarfile's member window: seekable, reads straight from the tar

    def close(self) -> None:
        self.tar.close()


def _tar_source(path: Path) -> TarSource:
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00":
        raise NemoCheckpointError(
            f"{path} is a compressed archive; reading a 100+ GB checkpoint from it would decompress it again for "
            f"every tensor. Unpack it first (mkdir DIR && tar -xf {path} -C DIR) and convert the folder"
        )
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.TarError as err:
        raise NemoCheckpointError(f"{path} is not a NeMo checkpoint: neither a folder nor a .nemo tar "
                                  f"({err})") from None
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        name = str(PurePosixPath(member.name))
        if name.startswith("/") or ".." in PurePosixPath(name).parts:
            continue  # never address anything outside the archive's own tree
        if member.isfile():
            members[name.removeprefix("./")] = member
    configs = sorted((n for n in members if PurePosixPath(n).name == CONFIG_NAME), key=lambda n: n.count("/"))
    if not configs:
        tar.close()
        raise NemoCheckpointError(f"{path} is not a NeMo checkpoint: the archive holds no {CONFIG_NAME}")
    root = str(PurePosixPath(configs[0]).parent)
    return TarSource(path, tar, members, "" if root == "." else root)


def open_source(src: str | os.PathLike) -> CheckpointSource:
    """The checkpoint at ``src`` (folder or ``.nemo`` tar), checked to hold a ``model_config.yaml``."""
    path = Path(src).expanduser()
    if not path.exists():
        raise NemoCheckpointError(f"{path} does not exist")
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            hint = ""
            if (path / "config.json").is_file():
                hint = " (it has a config.json: it is already a Hugging Face folder, use it directly)"
            raise NemoCheckpointError(f"{path} is not a NeMo checkpoint: it has no {CONFIG_NAME}{hint}")
        return FolderSource(path)
    return _tar_source(path)

