"""Attributes [n, K] → reward [n]: DESIGN.md's five shaping steps.

1. live attributes, optional decorrelation ``a'_k = a_k − λ_k · a_verbosity``;
2. per-attribute normalization: none, running (Welford, updated only when asked, mergeable across ranks), or
   fixed mean/std from a file;
3. ``r = Σ_k w_k a'_k + bias`` (dead outputs always weigh 0);
4. verbosity: the verbosity attribute's weight, and a token-length penalty ``α · max(0, len − L) / L``;
5. optional running reward normalization, then clipping to ``[lo, hi]``.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Callable, Mapping, NoReturn, Sequence

import torch
import yaml

from steer_reward.config import ConfigError, ShapingConfig
from steer_reward.schema import AttributeSchema

logger = logging.getLogger("steer_reward.shaping")

__all__ = ["Moments", "RunningStats", "RewardShaper", "StatsLock", "load_fixed_stats", "lengths_tensor"]


class Moments:
    """(count, mean, M2) of a set of rows, per column; merges exactly (Chan et al.). Shape: ``(K,)`` each."""

    def __init__(self, count: float, mean: torch.Tensor, m2: torch.Tensor) -> None:
        self.count = float(count)
        self.mean = mean.double()
        self.m2 = m2.double()

    @classmethod
    def of(cls, x: torch.Tensor) -> "Moments":
        """Moments of the rows of ``x``. Shape: ``(n, K)``."""
        x = x.double()
        if x.shape[0] == 0:
            return cls(0, torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64))
        mean = x.mean(0)
        return cls(x.shape[0], mean, ((x - mean) ** 2).sum(0))

    def merge(self, other: "Moments") -> "Moments":
        n = self.count + other.count
        if n == 0:
            return Moments(0, self.mean.clone(), self.m2.clone())
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)


MomentsSync = Callable[[Moments], Moments]
"""Turns this process's batch moments into the moments of the whole batch across ranks."""


class StatsLock:
    """A re-entrant lock that pickles as a fresh lock.

    Shapers that share statistics (``with_weights`` clones) share one lock; pickled together they still share one
    (pickle keeps object identity within one dump), so the copies in another process stay consistent too.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> "StatsLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def __reduce__(self) -> tuple:
        return (StatsLock, ())


class RunningStats:
    """Running per-column mean and variance (Welford), identical on every rank when given a ``sync``.

    >>> stats = RunningStats(2)
    >>> stats.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    >>> stats.mean.tolist(), stats.var.tolist()
    ([2.0, 3.0], [1.0, 1.0])
    """

    def __init__(self, size: int) -> None:
        self.moments = Moments(0, torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64))

    @property
    def count(self) -> float:
        return self.moments.count

    @property
    def mean(self) -> torch.Tensor:
        return self.moments.mean

    @property
    def var(self) -> torch.Tensor:
        """Population variance (numpy's default ``ddof=0``)."""
        if self.moments.count == 0:
            return torch.ones_like(self.moments.m2)
        return self.moments.m2 / self.moments.count

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def update(self, x: torch.Tensor, sync: MomentsSync | None = None) -> None:
        """Add the rows of ``x`` (``(n, K)``); with ``sync``, the rows of every rank."""
        batch = Moments.of(x)
        if sync is not None:
            batch = sync(batch)
        self.moments = self.moments.merge(batch)

    def state_dict(self) -> dict:
        return {"count": self.moments.count, "mean": self.moments.mean.tolist(), "m2": self.moments.m2.tolist()}

    def load_state_dict(self, state: Mapping) -> None:
        mean = torch.tensor(state["mean"], dtype=torch.float64)
        if mean.shape != self.moments.mean.shape:
            raise ValueError(f"running stats of size {tuple(mean.shape)} do not fit size {tuple(self.mean.shape)}")
        self.moments = Moments(float(state["count"]), mean, torch.tensor(state["m2"], dtype=torch.float64))


def load_fixed_stats(path: str | Path, schema: AttributeSchema) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) over all K outputs from a JSON/YAML ``{attribute: {mean, std}}``; unlisted: (0, 1)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"shaping.stats_file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"shaping.stats_file {path}: cannot parse ({err})") from None
    mean = torch.zeros(schema.num_outputs, dtype=torch.float64)
    std = torch.ones(schema.num_outputs, dtype=torch.float64)
    for name, entry in (data or {}).items():
        i = schema.index(name)
        try:
            mean[i], std[i] = float(entry["mean"]), float(entry["std"])
        except (TypeError, KeyError, ValueError):
            raise ConfigError(f"shaping.stats_file {path}: {name!r} needs numeric 'mean' and 'std'") from None
        if not std[i] > 0:
            raise ConfigError(f"shaping.stats_file {path}: std of {name!r} must be positive, got {entry['std']}")
    return mean, std


def lengths_tensor(lengths: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    """Completion token counts as a CPU tensor. Shape: ``(n,)``. A ``ValueError`` when they are not ``n`` finite
    numbers >= 0."""
    try:
        tensor = torch.as_tensor(lengths).cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"lengths must be {n} token counts, got {type(lengths).__name__} ({err})") from None
    if tensor.dim() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"lengths must be {n} token counts, got shape {tuple(tensor.shape)} of {tensor.dtype}")
    if len(tensor) != n:
        raise ValueError(f"got {len(tensor)} lengths for {n} samples")
    bad = ~torch.isfinite(tensor.double()) | (tensor < 0)
    if bad.any():
        # A NaN length would give a NaN reward, which TRL's nansum reads as "no reward" for that sample.
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"lengths must be finite token counts >= 0; sample {index} has {tensor[index].item()} "
                         f"({int(bad.sum())} such)")
    return tensor


def _finite_rows(x: torch.Tensor, columns: Sequence[int], what: str) -> torch.Tensor:
    """The rows of ``x`` whose ``columns`` are all finite. One NaN or inf sample (a broken forward, an overflow)
    would otherwise poison the running statistics, and with them every later reward."""
    keep = torch.isfinite(x[:, list(columns)]).all(1)
    dropped = int((~keep).sum())
    if dropped:
        logger.warning("%d sample(s) with non-finite %s left out of the running statistics", dropped, what)
        return x[keep]
    return x


class RewardShaper:
    """Turns attribute scores into scalar rewards; holds the running normalization state.

    >>> from steer_reward.schema import STEERLM9
    >>> shaper = RewardShaper(STEERLM9, ShapingConfig(weights="helpfulness"))
    >>> shaper(torch.tensor([[0, 0, 0, 0, 3.0, 1, 1, 1, 1]]), torch.tensor([10])).tolist()
    [3.0]
    """

    def __init__(self, schema: AttributeSchema, config: ShapingConfig | None = None,
                 sync: MomentsSync | None = None) -> None:
        self.schema = schema
        self.config = config or ShapingConfig()
        self.sync = sync
        """Cross-rank merge of batch moments (set by the DeepSpeed backend); a call's ``sync`` replaces it."""
        self.lock = StatsLock()
        """Held while statistics are read and updated: one shaper may serve several threads (a server's workers,
        TRL's async reward loop), and an update is a read-modify-write of the moments."""
        self.weights = torch.tensor(schema.weight_vector(self.config.weights), dtype=torch.float64)
        self.lambdas = torch.zeros(schema.num_outputs, dtype=torch.float64)
        if self.config.decorrelate:
            if schema.verbosity is None:
                raise ConfigError(f"shaping.decorrelate needs a verbosity attribute; schema {schema.name!r} has none")
            for name, lam in self.config.decorrelate.items():
                if name == schema.verbosity:
                    raise ConfigError("shaping.decorrelate: the verbosity attribute cannot be decorrelated from itself")
                self.lambdas[schema.index(name)] = float(lam)
        self.attribute_stats = RunningStats(schema.num_outputs)
        self.reward_stats = RunningStats(1)
        self.fixed_mean: torch.Tensor | None = None
        self.fixed_std: torch.Tensor | None = None
        if self.config.normalization == "fixed":
            self.fixed_mean, self.fixed_std = load_fixed_stats(self.config.stats_file, schema)

    @property
    def needs_lengths(self) -> bool:
        return self.config.length_penalty.alpha != 0.0

    @property
    def has_running_state(self) -> bool:
        return self.config.normalization == "running" or self.config.reward_normalization == "running"

    @property
    def updates_in_training(self) -> bool:
        """Whether the training faces (TRL callables, OpenRLHF endpoints) add each batch to the running
        statistics: running normalization is on and ``shaping.update_running_stats`` asks for it."""
        return self.config.update_running_stats and self.has_running_state

    def with_weights(self, weights: Mapping[str, float] | str) -> "RewardShaper":
        """A shaper like this one under other weights, sharing this one's normalization state (and its lock)."""
        clone = RewardShaper.__new__(RewardShaper)
        clone.__dict__.update(self.__dict__)
        clone.weights = torch.tensor(self.schema.weight_vector(weights), dtype=torch.float64)
        return clone

    def decorrelated(self, attributes: torch.Tensor) -> torch.Tensor:
        """Step 1. Shape: ``(n, K)`` → ``(n, K)``, float64."""
        a = attributes.double()
        if self.config.decorrelate:
            v = self.schema.index(self.schema.verbosity)
            a = a - self.lambdas[None, :] * a[:, v : v + 1]
        return a

    def normalized(self, a: torch.Tensor, update_stats: bool = False,
                   sync: MomentsSync | None = None) -> torch.Tensor:
        """Step 2 on decorrelated attributes. Shape: ``(n, K)``.

        ``sync`` merges this batch's moments across ranks for this update (default: the shaper's ``sync``).
        """
        mode = self.config.normalization
        if mode == "running":
            with self.lock:  # the update and the statistics this batch is normalized with, as one step
                if update_stats:
                    self.attribute_stats.update(_finite_rows(a, self.schema.live, "attributes"),
                                                sync if sync is not None else self.sync)
                if self.attribute_stats.count == 0:
                    return a
                return (a - self.attribute_stats.mean) / self._denominator(self.attribute_stats.std)
        if mode == "fixed":
            return (a - self.fixed_mean) / self._denominator(self.fixed_std)
        return a

    def _denominator(self, std: torch.Tensor) -> torch.Tensor:
        # A constant attribute (std 0, e.g. after one sample) is centred, not blown up to inf/nan.
        denominator = std + self.config.eps
        return torch.where(denominator > 0, denominator, torch.ones_like(denominator))

    def length_penalty(self, lengths: torch.Tensor) -> torch.Tensor:
        """Step 4's penalty. Shape: ``(n,)``."""
        cfg = self.config.length_penalty
        over = (lengths.double() - cfg.target_tokens).clamp(min=0)
        return cfg.alpha * over / cfg.target_tokens

    def __call__(self, attributes: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None,
                 update_stats: bool = False, sync: MomentsSync | None = None) -> torch.Tensor:
        """Rewards from attributes ``(n, K)`` and completion token lengths ``(n,)``. Shape: ``(n,)``, float32.

        ``update_stats`` adds this batch to the running statistics before normalizing with them; ``sync`` merges
        the batch's moments across ranks for this update (default: the shaper's ``sync``). Updates are atomic: a
        shaper may be called from several threads.
        """
        sync = sync if sync is not None else self.sync
        try:
            lengths = self.checked_lengths(attributes, lengths)
        except Exception as err:  # noqa: BLE001 - refused here, before the merge the other ranks are entering
            self.fail_together(err, update_stats, sync)
        live = list(self.schema.live)  # dead outputs never enter the sum, not even as 0 * nan
        with self.lock:  # both statistics move together, and this batch is shaped with the state it produced
            a = self.normalized(self.decorrelated(attributes.cpu()), update_stats, sync)
            rewards = a[:, live] @ self.weights[live] + self.config.bias
            if self.needs_lengths:
                rewards = rewards - self.length_penalty(lengths)
            if self.config.reward_normalization == "running":
                if update_stats:
                    self.reward_stats.update(_finite_rows(rewards[:, None], (0,), "rewards"), sync)
                if self.reward_stats.count > 0:
                    rewards = (rewards - self.reward_stats.mean[0]) / self._denominator(self.reward_stats.std)[0]
        if self.config.clip is not None:
            lo, hi = (float(c) for c in self.config.clip)
            rewards = rewards.clamp(lo, hi)
        return rewards.float()

    def checked_lengths(self, attributes: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None
                        ) -> torch.Tensor | None:
        """The lengths the length penalty reads, as a CPU tensor ``(n,)`` (None when the penalty is off), once
        ``attributes`` ``(n, K)`` and ``lengths`` fit this shaper; a ``ValueError`` saying what does not otherwise."""
        if attributes.dim() != 2 or attributes.shape[1] != self.schema.num_outputs:
            raise ValueError(f"attributes must have shape (n, {self.schema.num_outputs}), "
                             f"got {tuple(attributes.shape)}")
        if not self.needs_lengths:
            return None
        if lengths is None:
            raise ValueError("the length penalty needs completion token lengths")
        return lengths_tensor(lengths, attributes.shape[0])

    def fail_together(self, error: BaseException, update_stats: bool, sync: MomentsSync | None = None) -> NoReturn:
        """Raise ``error``, which this rank met before this update's first cross-rank merge of statistics.

        The merge is a collective the other ranks are entering; raising here alone would leave them waiting in it
        until the process group's timeout. A ``sync`` that can carry a failure (``RankMomentsSync.fail_together``)
        joins the merge flagged, so every rank raises the same error naming this rank and no statistics move.
        Without a merge (a single process, no update, no running state) it is simply raised.
        """
        sync = sync if sync is not None else self.sync
        carry = getattr(sync, "fail_together", None)
        if update_stats and self.has_running_state and carry is not None:
            # The first merge is of the attributes (K columns) under running normalization, else of the reward (1).
            carry(error, self.schema.num_outputs if self.config.normalization == "running" else 1)
        raise error

    def state_dict(self) -> dict:
        with self.lock:
            return {"attribute_stats": self.attribute_stats.state_dict(),
                    "reward_stats": self.reward_stats.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        with self.lock:
            self.attribute_stats.load_state_dict(state["attribute_stats"])
            self.reward_stats.load_state_dict(state["reward_stats"])
