"""Training-time monitors: does the reward (or one of its attributes) track completion length?

Length is the classic reward hack: a policy that learns "longer scores higher" raises the reward without getting
better. Per training step these monitors compute the Spearman correlation between completion length and the
reward, and between length and each live attribute (plus the length penalty's term when it is on):

- ``length_correlations`` computes them for one batch; ``log_length_correlations`` sends them to TRL's
  ``log_metric`` as ``<prefix>/length_spearman/reward`` and ``<prefix>/length_spearman/<attribute>``, so they
  reach every logger TRL reports to (wandb included). The TRL faces call it once per batch.
- ``LengthCorrelationWindow`` keeps the last N scored samples for the reward server, whose requests carry one
  sample each (OpenRLHF); its correlations become Prometheus gauges.
- ``RewardMonitorCallback`` (a transformers ``TrainerCallback``) reads the logged correlations and warns once
  when the reward's stays above a threshold for ``patience`` logged steps in a row, naming the attribute that
  drives it: the one with the largest ``w_k · ρ_k`` (weight times its length correlation), i.e. the term pushing
  the reward towards length the most.

TRL averages ``log_metric`` values over processes and over the steps between two logs, so with several processes
the logged value is the mean of per-process correlations, and a "step" of the callback is one log
(``logging_steps``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import TrainerCallback

from steer_reward.decorrelation import spearman_columns

__all__ = [
    "METRIC",
    "REWARD_SERIES",
    "PENALTY_SERIES",
    "length_correlations",
    "log_length_correlations",
    "LengthCorrelationWindow",
    "LengthCorrelationAlarm",
    "RewardMonitorCallback",
    "SERVER_WINDOW",
    "monitor_scored_batch",
    "monitor_shaped_batch",
]

logger = logging.getLogger("steer_reward.monitors")

METRIC = "length_spearman"
"""Metric name segment: ``<prefix>/length_spearman/<series>``."""
REWARD_SERIES = "reward"
PENALTY_SERIES = "length_penalty"
"""Series of the length penalty's term (``−penalty``), when the penalty is on."""


def length_correlations(lengths: Sequence[int] | torch.Tensor, rewards: Sequence[float] | torch.Tensor,
                        attributes: torch.Tensor | None = None, names: Sequence[str] = (),
                        penalty: torch.Tensor | None = None) -> dict[str, float]:
    """``{"reward": ρ, <attribute>: ρ_k, ..., "length_penalty"?: ρ}``: Spearman correlation of each series with
    ``lengths`` over one batch. ``attributes`` has shape ``(n, len(names))``; ``penalty`` ``(n,)`` is the amount
    subtracted. A constant series gives 0; fewer than 2 samples or a non-finite value give nan.

    >>> length_correlations([3, 5, 9], [0.1, 0.4, 0.2])
    {'reward': 0.5}
    """
    lengths_t = torch.as_tensor(lengths).double()
    columns = [torch.as_tensor(rewards).double().reshape(-1, 1)]
    keys = [REWARD_SERIES]
    if attributes is not None and len(names):
        columns.append(torch.as_tensor(attributes).double().reshape(len(lengths_t), len(names)))
        keys += list(names)
    if penalty is not None:
        columns.append(-torch.as_tensor(penalty).double().reshape(-1, 1))
        keys.append(PENALTY_SERIES)
    values = spearman_columns(torch.cat(columns, 1), lengths_t)
    return dict(zip(keys, values.tolist()))


def _live(schema: Any, values: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    live = list(schema.live)
    return [schema.names[k] for k in live], torch.as_tensor(values)[:, live]


def log_length_correlations(log_metric: Callable[[str, float], Any] | None, prefix: str,
                            lengths: Sequence[int] | torch.Tensor, rewards: Sequence[float] | torch.Tensor,
                            attributes: torch.Tensor, schema: Any, penalty: torch.Tensor | None = None
                            ) -> dict[str, float]:
    """Compute one batch's correlations over the live attributes of ``attributes`` ``(n, K)`` and send each to
    ``log_metric`` as ``<prefix>/length_spearman/<series>`` (nan values are not sent: TRL would average them in).
    Returns them; does nothing but compute when ``log_metric`` is None."""
    names, live = _live(schema, attributes)
    correlations = length_correlations(lengths, rewards, live, names, penalty)
    if log_metric is not None:
        for series, value in correlations.items():
            if math.isfinite(value):
                log_metric(f"{prefix}/{METRIC}/{series}", value)
    return correlations


class LengthCorrelationWindow:
    """The last ``window`` scored samples (length, reward, live attributes) and their length correlations, for a
    server whose requests carry too few samples each to correlate. Thread-safe; correlations are recomputed
    only after new samples arrive."""

    def __init__(self, names: Sequence[str], window: int = 1024) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2, got {window}")
        self.names = list(names)
        self.window = window
        self._rows: deque[list[float]] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._cached: dict[str, float] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, lengths: Sequence[int] | torch.Tensor, rewards: Sequence[float] | torch.Tensor,
            attributes: torch.Tensor) -> None:
        """Add n samples: ``lengths`` ``(n,)``, ``rewards`` ``(n,)``, ``attributes`` ``(n, len(names))``."""
        rows = torch.cat([torch.as_tensor(lengths).double().reshape(-1, 1),
                          torch.as_tensor(rewards).double().reshape(-1, 1),
                          torch.as_tensor(attributes).double().reshape(-1, len(self.names))], 1).tolist()
        with self._lock:
            self._rows.extend(rows)
            self._cached = None

    def correlations(self) -> dict[str, float]:
        """``{"reward": ρ, <attribute>: ρ_k}`` over the window (nan while it holds fewer than 2 samples)."""
        with self._lock:
            if self._cached is None:
                if len(self._rows) < 2:
                    self._cached = {k: math.nan for k in [REWARD_SERIES, *self.names]}
                else:
                    table = torch.tensor(list(self._rows), dtype=torch.float64)
                    self._cached = length_correlations(table[:, 0], table[:, 1], table[:, 2:], self.names)
            return dict(self._cached)


class LengthCorrelationAlarm:
    """Counts consecutive steps whose reward/length correlation is above ``threshold`` and gives a warning
    message once, at the ``patience``-th. A step below the threshold (or without a value) resets the count."""

    def __init__(self, threshold: float = 0.3, patience: int = 5, weights: Mapping[str, float] | None = None) -> None:
        if not -1 <= threshold <= 1:
            raise ValueError(f"threshold must be a correlation in [-1, 1], got {threshold}")
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.threshold = threshold
        self.patience = patience
        self.weights = dict(weights or {})
        self.streak = 0
        self.fired = False

    def driver(self, correlations: Mapping[str, float]) -> tuple[str, float] | None:
        """(series, ρ) of the term pushing the reward towards length most: the largest ``w_k·ρ_k`` with the
        weights known (the length penalty's term has weight 1), else the largest ``ρ_k``."""
        candidates = {k: v for k, v in correlations.items() if k != REWARD_SERIES and math.isfinite(v)}
        if self.weights:
            candidates = {k: v for k, v in candidates.items() if k == PENALTY_SERIES or self.weights.get(k, 0.0)}

            def push(k: str) -> float:
                return candidates[k] * (1.0 if k == PENALTY_SERIES else self.weights[k])
        else:
            def push(k: str) -> float:
                return candidates[k]
        if not candidates:
            return None
        best = max(candidates, key=push)
        return best, candidates[best]

    def update(self, correlations: Mapping[str, float], step: int | None = None) -> str | None:
        """Feed one step's correlations; returns the warning the one time the alarm fires, else None."""
        value = correlations.get(REWARD_SERIES, math.nan)
        if value is None or not math.isfinite(value) or value <= self.threshold:
            self.streak = 0
            return None
        self.streak += 1
        if self.fired or self.streak < self.patience:
            return None
        self.fired = True
        where = f" (step {step})" if step is not None else ""
        message = (f"the reward's Spearman correlation with completion length has been above {self.threshold:g} for "
                   f"{self.streak} logged steps{where}, now {value:.2f}: the policy may be gaming length.")
        driver = self.driver(correlations)
        if driver is not None:
            name, rho = driver
            weight = "" if name == PENALTY_SERIES or name not in self.weights else f", weight {self.weights[name]:g}"
            message += f" Driven most by {name!r} (its length correlation {rho:.2f}{weight})."
        return message


def _weights_of(reward: Any) -> dict[str, float]:
    """Live attribute weights of a ``SteerReward`` or a TRL face wrapping one."""
    reward = getattr(reward, "reward", reward)  # TRL faces hold the SteerReward as .reward
    reward = getattr(getattr(reward, "shared", None), "reward", reward)  # per-attribute functions
    shaper = reward.shaper
    return {shaper.schema.names[k]: float(shaper.weights[k]) for k in shaper.schema.live}


class RewardMonitorCallback(TrainerCallback):
    """Warns once when the reward tracks completion length for ``patience`` logged steps.

    Reads the ``<prefix>/length_spearman/reward`` values the TRL faces log (one alarm per prefix, i.e. per reward
    function) and, through ``logging`` (logger ``steer_reward.monitors``) on the main process, names the attribute
    that drives the correlation. Pass ``reward`` (a ``SteerReward`` or one of its TRL functions) so the driver is
    weighed by the shaping weights.

    >>> trainer = GRPOTrainer(..., callbacks=[RewardMonitorCallback(threshold=0.3, patience=5, reward=reward)])
    ... # doctest: +SKIP
    """

    def __init__(self, threshold: float = 0.3, patience: int = 5, reward: Any = None,
                 weights: Mapping[str, float] | None = None) -> None:
        self.threshold = threshold
        self.patience = patience
        self.weights = dict(weights) if weights is not None else (_weights_of(reward) if reward is not None else {})
        LengthCorrelationAlarm(threshold, patience)  # checks the arguments now, not at the first log
        self.alarms: dict[str, LengthCorrelationAlarm] = {}
        self.warnings: list[str] = []
        """Every warning given, in order."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not logs:
            return
        suffix = f"/{METRIC}/{REWARD_SERIES}"
        for key in logs:
            if not key.endswith(suffix) or key.startswith("eval_"):
                continue
            prefix = key[: -len(suffix)]
            start = f"{prefix}/{METRIC}/"
            correlations = {k[len(start):]: float(v) for k, v in logs.items()
                            if k.startswith(start) and isinstance(v, (int, float))}
            alarm = self.alarms.setdefault(prefix, LengthCorrelationAlarm(self.threshold, self.patience,
                                                                          self.weights))
            message = alarm.update(correlations, getattr(state, "global_step", None))
            if message is not None and getattr(state, "is_world_process_zero", True):
                message = f"{prefix}: {message}"
                self.warnings.append(message)
                logger.warning(message)


# -- what the faces call ------------------------------------------------------------------------------------------

SERVER_WINDOW = 1024
"""Samples the reward server correlates over (OpenRLHF sends one sample per request)."""


def monitor_scored_batch(log_metric: Callable[[str, float], Any] | None, prefix: str, attributes: Any,
                         rewards: torch.Tensor, shaper: Any, lengths: Sequence[int] | None = None) -> dict[str, float]:
    """The shaped-reward TRL face: one batch's ``AttributeScores`` and rewards ``(n,)``; ``lengths`` the policy's
    completion tokens when TRL passed them (else the reward model's)."""
    lengths_t = torch.as_tensor(lengths if lengths is not None else attributes.completion_lengths)
    penalty = shaper.length_penalty(lengths_t) if shaper.needs_lengths else None
    return log_length_correlations(log_metric, prefix, lengths_t, rewards, attributes.values, shaper.schema, penalty)


def monitor_shaped_batch(log_metric: Callable[[str, float], Any] | None, prefix: str, values: torch.Tensor,
                         lengths: torch.Tensor, shaper: Any) -> dict[str, float]:
    """The per-attribute TRL face: ``values`` ``(n, K)`` are the decorrelated, normalized attributes TRL weighs
    itself; the reward is their weighted sum minus the length penalty (TRL's ``reward_weights`` are the shaping
    weights)."""
    live = list(shaper.schema.live)
    rewards = values[:, live] @ shaper.weights[live]
    penalty = shaper.length_penalty(lengths) if shaper.needs_lengths else None
    if penalty is not None:
        rewards = rewards - penalty
    return log_length_correlations(log_metric, prefix, lengths, rewards, values, shaper.schema, penalty)
