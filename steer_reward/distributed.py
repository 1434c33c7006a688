"""Rank helpers for a colocated reward model: process-group setup, agreeing on counts, merging statistics.

Every function here is a collective when more than one rank runs: all ranks must call it, in the same order. A
collective that cannot complete (a rank died, or never started) raises ``DistributedError`` after the process
group's timeout instead of hanging forever.

A rank that fails on its own (a bad argument, a sample that cannot be encoded) before a collective the other ranks
are entering must not leave them waiting there until that timeout: it joins the collective anyway, flagged, and
every rank raises the same error naming it (``agreed_failure``). The flag rides a collective the call makes anyway
(the ZeRO-3 count agreement, the statistics merge); only the failure path adds one, to gather the messages.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from datetime import timedelta
from typing import Iterator, NoReturn, Sequence

import torch

from steer_reward.config import ConfigError
from steer_reward.formatting import FormattingError
from steer_reward.shaping import Moments

__all__ = [
    "DistributedError",
    "LAUNCH_ENV",
    "is_distributed",
    "rank",
    "world_size",
    "local_device",
    "ensure_process_group",
    "all_reduce_max",
    "agreed_failure",
    "shared_error",
    "shared_type_name",
    "gather_moments",
    "merge_in_rank_order",
    "RankMomentsSync",
    "collective_device",
    "data_parallel_sync",
    "broadcast_from_rank0",
]

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun / deepspeed / accelerate launch set for every rank."""


class DistributedError(RuntimeError):
    """A collective across ranks failed or timed out: a rank died, hung, or was never started."""


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def local_device() -> torch.device:
    """This rank's accelerator (``cuda:LOCAL_RANK``), or the CPU when there is no GPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@contextlib.contextmanager
def collective(what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Turn a failed collective into a ``DistributedError`` that says which rank saw it and what to check."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:
        if not is_communication_error(err):
            raise  # a model or input bug inside the block stays what it is
        limit = f" within {timeout_s:g} s" if timeout_s is not None else ""
        raise DistributedError(
            f"rank {os.environ.get('RANK', rank())} of {os.environ.get('WORLD_SIZE', world_size())}: {what} did not "
            f"complete{limit}: another rank died, hangs, or was never started ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err


def is_communication_error(err: BaseException) -> bool:
    """Whether ``err`` came from the process group (a peer gone, a timeout) rather than from the computation.

    torch raises ``DistError`` subclasses for store and backend failures, but gloo's transport errors (a peer's
    socket closed, a receive timed out) arrive as plain ``RuntimeError`` naming gloo.
    """
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(err).lower()
    # gloo's pairs closed after a timeout answer every later collective with "Application timeout caused pair closure".
    markers = ("gloo", "nccl", "timed out", "connection reset", "connection closed", "pair closure")
    return any(marker in text for marker in markers)


def skip_cpu_shm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory comm op (~40 s per fresh machine).

    Gloo carries the few small collectives a reward model needs; the op only speeds up large CPU all-reduces.
    Must run before DeepSpeed first creates its comm backend (``init_distributed``, ``deepspeed.initialize``, or
    accelerate's ``PartialState`` under DeepSpeed).
    """
    if torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def ensure_process_group(timeout_s: float) -> bool:
    """Join the process group of a distributed launch; reuse it when one exists (accelerate, a trainer).

    Returns True when this call created the group. A process without launcher variables is a ``ConfigError``:
    ZeRO-3 shards the model across ranks, which only a distributed launch provides.
    """
    if is_distributed():
        return False
    missing = [name for name in LAUNCH_ENV if name not in os.environ]
    if missing:
        raise ConfigError(
            f"backend: deepspeed shards the reward model across ranks and needs a distributed launch, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Launch with "
            "`torchrun --nproc_per_node N script.py` (or `deepspeed`, or `accelerate launch` with a DeepSpeed "
            "config), or use backend: local for a single process"
        )
    import deepspeed

    skip_cpu_shm_build()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with collective(f"joining the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                    timeout_s):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s))
    return True


def all_reduce_max(values: Sequence[int], device: torch.device | str = "cpu", timeout_s: float | None = None,
                   what: str = "agreeing on counts (all-reduce MAX)") -> list[int]:
    """The element-wise largest of ``values`` over all ranks, in one all-reduce (``values`` in a single process)."""
    if not is_distributed():
        return [int(v) for v in values]
    tensor = torch.tensor([int(v) for v in values], dtype=torch.long, device=device)
    with collective(what, timeout_s):
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]


_SHARED_TYPES = {cls.__name__: cls for cls in (FormattingError, ConfigError, ValueError, TypeError, FileNotFoundError,
                                                PermissionError, IsADirectoryError, NotADirectoryError)}
"""Error types every rank may raise again by name from one line of text: the user errors a rank can meet alone."""


def shared_type_name(error: BaseException) -> str:
    """The name of the nearest type of ``error`` that every rank may raise again (``shared_error``), or its own."""
    return next((cls.__name__ for cls in type(error).__mro__ if cls.__name__ in _SHARED_TYPES), type(error).__name__)


def shared_error(type_name: str, text: str) -> Exception:
    """An error of the type named ``type_name`` (``DistributedError`` for a type not in ``_SHARED_TYPES``)."""
    return _SHARED_TYPES.get(type_name, DistributedError)(text)


def agreed_failure(error: BaseException | None, what: str, timeout_s: float | None = None) -> Exception:
    """The error every rank raises once a collective's failure flag said some rank failed; a collective itself
    (an all-gather of the failing ranks' messages, run only on this failure path).

    ``error`` is this rank's own failure, or None. Every rank gets the same text, ``"<what> (rank r: Type:
    message; ...)"``, naming each failing rank and its cause; its type is the failures' own when they all share one
    of ``_SHARED_TYPES`` (a ``FormattingError`` stays one, so the CLI and trainers report it as a user error; a
    ``ValueError`` subclass becomes a ``ValueError``), else ``DistributedError``. Raise it ``from error`` so the
    failing rank keeps its own traceback.
    """
    local = None
    if error is not None:
        local = (type(error).__name__, shared_type_name(error), str(error).splitlines()[0] if str(error) else "")
    reports: list = [local]
    if is_distributed():
        reports = [None] * world_size()
        with collective("gathering the failing ranks' errors (all-gather)", timeout_s):
            torch.distributed.all_gather_object(reports, local)
    failed = [(r, report) for r, report in enumerate(reports) if report is not None]
    detail = "; ".join(f"rank {r}: {name}: {message}" for r, (name, _, message) in failed)
    shared = {kind for _, (_, kind, _) in failed}
    return shared_error(shared.pop() if len(shared) == 1 else "", f"{what} ({detail})")


MERGE_FAILED = "a rank failed before merging the running statistics, so no rank updated them or shaped this batch"
"""What every rank says when the statistics merge carried a rank's failure (``gather_moments``)."""


def _pack(moments: Moments, tag: float, failed: bool = False) -> torch.Tensor:
    """``[tag, failed, count, mean..., m2...]``. Shape: ``(3 + 2K,)``, float64."""
    head = torch.tensor([tag, float(failed), moments.count], dtype=torch.float64)
    return torch.cat([head, moments.mean.double().cpu(), moments.m2.double().cpu()])


def _unpack(packed: torch.Tensor) -> tuple[float, bool, Moments]:
    size = (packed.numel() - 3) // 2
    packed = packed.cpu()
    moments = Moments(float(packed[2]), packed[3 : 3 + size].clone(), packed[3 + size :].clone())
    return float(packed[0]), bool(packed[1]), moments


def gather_moments(moments: Moments, device: torch.device | str = "cpu", timeout_s: float | None = None,
                   tag: str | None = None, error: BaseException | None = None) -> list[Moments]:
    """Every rank's moments, in rank order (``[moments]`` in a single process).

    ``tag`` names what the moments are of; ranks that reach this collective for different things (their calls
    out of order) raise a ``DistributedError`` instead of merging one thing's statistics into another's.
    ``error``: this rank failed before it could merge (its ``moments`` are then empty ones of the right size); every
    rank raises ``agreed_failure`` instead of merging, and no rank's statistics move.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return [moments]
    local = _pack(moments, float(zlib.crc32(tag.encode())) if tag else 0.0, error is not None).to(device)
    parts = [torch.empty_like(local) for _ in range(world_size())]
    with collective("gathering running statistics (all-gather)", timeout_s):
        torch.distributed.all_gather(parts, local)
    unpacked = [_unpack(p) for p in parts]
    if any(failed for _, failed, _ in unpacked):
        raise agreed_failure(error, MERGE_FAILED, timeout_s) from error
    if len({t for t, _, _ in unpacked}) > 1:
        raise DistributedError(
            f"rank {rank()}: the ranks merged the running statistics of different things at once ({tag or 'untagged'} "
            "here): statistic updates ran in different orders on different ranks; call reward functions in the "
            "same order on every rank"
        )
    return [m for _, _, m in unpacked]


def merge_in_rank_order(parts: Sequence[Moments]) -> Moments:
    """Chan merge of ``parts`` left to right. Every rank merging the same list in the same order gets
    bit-identical results, which a tree reduction across ranks would not guarantee."""
    if not parts:
        raise ValueError("no moments to merge")
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    return total


class RankMomentsSync:
    """The shaper's ``sync``: this rank's batch moments → the moments of the batch over all ranks.

    A collective: ``RewardShaper`` calls it on every rank whenever statistics are updated, which the training
    faces do on every rank with the same ``update_stats``.
    """

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float | None = None,
                 tag: str | None = None) -> None:
        self.device = device
        self.timeout_s = timeout_s
        self.tag = tag
        """What the merged moments are of (a reward function's name): ranks merging different things fail loudly."""
        self.calls = 0

    def __call__(self, moments: Moments) -> Moments:
        self.calls += 1
        return merge_in_rank_order(gather_moments(moments, self.device, self.timeout_s, self.tag))

    def fail_together(self, error: BaseException, size: int) -> NoReturn:
        """Join the merge the other ranks are making (``size`` columns, as theirs) flagged with this rank's
        ``error``, instead of leaving them waiting in it: every rank raises the same error naming this rank."""
        self.calls += 1
        empty = torch.zeros(size, dtype=torch.float64)
        gather_moments(Moments(0, empty, empty), self.device, self.timeout_s, self.tag, error=error)
        raise error  # not reached: a flagged merge raises on every rank


def collective_device() -> torch.device:
    """Where the default process group's collectives take their tensors: the CPU under gloo (or a
    ``cpu:gloo,cuda:nccl`` group), this rank's GPU under NCCL."""
    backend = str(torch.distributed.get_backend()).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return local_device()


def data_parallel_sync(sync: RankMomentsSync | None = None, tag: str | None = None) -> RankMomentsSync | None:
    """``sync`` when given, else a ``RankMomentsSync`` (tagged ``tag``) over the default process group when this
    process is one of several ranks, else None.

    Resolved at each update rather than when a reward is built: a trainer initializes the group after the user
    has built the reward. Only callers that every rank reaches together may use it (TRL calls each reward function
    on every rank once per generation batch).
    """
    if sync is not None:
        return sync
    if not is_distributed() or world_size() < 2:
        return None
    return RankMomentsSync(collective_device(), tag=tag)


def broadcast_from_rank0(value: object) -> object:
    """Rank 0's ``value`` on every rank (``value`` itself in a single process); a collective."""
    if not is_distributed() or world_size() < 2:
        return value
    payload = [value if rank() == 0 else None]
    with collective("receiving rank 0's state (broadcast)"):
        torch.distributed.broadcast_object_list(payload, src=0, device=collective_device())
    return payload[0]
