"""Running normalization statistics of ``/get_reward``: one update per model batch, a warm-up, a state file.

OpenRLHF sends every sample as its own request. Updating the statistics per request would give the first sample
exactly the bias (its own mean, zero spread), normalize the members of one GRPO group with different statistics
and make rewards depend on arrival order. Here the statistics are updated once per model batch of the
``DynamicBatcher``, with all ``/get_reward`` samples of that batch, and every sample of the batch is shaped with
the same statistics (this batch included), exactly as ``SteerReward.score(..., update_stats=True)`` on that batch.

Warm-up: until ``server.stats_warmup_samples`` samples have been seen, scored samples are held (at most
``server.stats_warmup_wait_ms``) and then added and shaped all together, so the first rewards are normalized with
the statistics of many samples instead of one or two. The state (``SteerReward.state_dict``) is loaded from
``server.state_file`` at start and written there atomically every ``server.state_save_s`` and at shutdown.
``/score`` never updates the statistics (it only reads them).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Sequence

from steer_reward.config import ConfigError
from steer_reward.scoring import AttributeScores

__all__ = ["TRAINING", "TrainingStatistics"]

logger = logging.getLogger("steer_reward.server")

TRAINING = "training"
"""The batcher tag of requests whose samples update the statistics (``/get_reward``)."""

_STATE_VERSION = 1


class TrainingStatistics:
    """Updates ``reward``'s running statistics once per model batch and shapes that batch's samples with them.

    ``finish`` is the ``DynamicBatcher``'s per-batch hook (worker thread): each ``TRAINING`` part becomes a
    ``ScoredBatch``, or, during the warm-up, a ``concurrent.futures.Future`` of one.
    """

    def __init__(self, reward: Any, warmup_samples: int = 64, warmup_wait_s: float = 2.0,
                 state_file: str | Path | None = None, save_every_s: float = 30.0) -> None:
        self.reward = reward
        self.warmup_samples = max(0, int(warmup_samples))
        self.warmup_wait_s = max(0.0, float(warmup_wait_s))
        self.state_file = Path(state_file) if state_file else None
        self.save_every_s = float(save_every_s)
        self._lock = threading.Lock()
        self._held: list[tuple[AttributeScores, Future]] = []
        self._timer: threading.Timer | None = None
        self._dirty = False
        self._last_save = time.monotonic()
        self.updates = 0
        """Statistics updates so far (one per model batch holding /get_reward samples, one per warm-up flush)."""
        if self.state_file is not None and self.state_file.exists():
            self.load()

    @property
    def samples_seen(self) -> int:
        """Samples in the running statistics."""
        shaper = self.reward.shaper
        if shaper.config.normalization == "running":
            return int(shaper.attribute_stats.count)
        return int(shaper.reward_stats.count)

    @property
    def warming_up(self) -> bool:
        return self.samples_seen < self.warmup_samples

    # -- the batcher's hook (worker thread) ---------------------------------------------------------------
    def finish(self, parts: Sequence[Any]) -> list[Any]:
        """Results for one batch's ``BatchPart``s: non-training parts unchanged, training ones shaped."""
        results: list[Any] = [part.scores for part in parts]
        training = [i for i, part in enumerate(parts) if part.tag == TRAINING]
        if not training:
            return results
        with self._lock:
            if self.warming_up:
                for i in training:
                    future: Future = Future()
                    self._held.append((parts[i].scores, future))
                    results[i] = future
                held = sum(len(scores) for scores, _ in self._held)
                if self.samples_seen + held >= self.warmup_samples:
                    self._flush_locked()
                elif self._timer is None:
                    self._timer = threading.Timer(self.warmup_wait_s, self._flush_on_timer)
                    self._timer.daemon = True
                    self._timer.start()
            else:
                for i, scored in zip(training, self._update_and_shape([parts[i].scores for i in training])):
                    results[i] = scored
            self._save_if_due_locked()
        return results

    def _update_and_shape(self, parts: list[AttributeScores]) -> list[Any]:
        """One statistics update with all rows of ``parts``, then every row shaped with the result."""
        from steer_reward.reward import ScoredBatch

        merged = parts[0] if len(parts) == 1 else AttributeScores.concat(parts)
        rewards = self.reward.rewards(merged, update_stats=True)
        self.updates += 1
        self._dirty = True
        out, offset = [], 0
        for scores in parts:
            out.append(ScoredBatch(scores, rewards[offset:offset + len(scores)]))
            offset += len(scores)
        return out

    def _flush_locked(self) -> None:
        """Add and shape every held sample (end of the warm-up, or its wait ran out)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        if not held:
            return
        try:
            scored = self._update_and_shape([scores for scores, _ in held])
        except BaseException as err:  # noqa: BLE001 - the held requests get the error instead of hanging
            for _, future in held:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(held, scored):
            if not future.done():  # a cancelled future: that client left
                future.set_result(result)
        logger.info("running statistics: %d samples after the warm-up flush", self.samples_seen)

    def _flush_on_timer(self) -> None:
        with self._lock:
            self._timer = None
            self._flush_locked()
            self._save_if_due_locked()

    # -- persistence ---------------------------------------------------------------------------------------
    def load(self) -> None:
        """Read ``state_file`` into the reward's running statistics; a file that does not fit is a ConfigError."""
        path = self.state_file
        try:
            data = json.loads(path.read_text())
            if data.get("version") != _STATE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {_STATE_VERSION}")
            self.reward.load_state_dict(data["shaping"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"server.state_file {str(path)!r} cannot be loaded ({err}); move it away to start "
                              f"the statistics afresh") from None
        logger.warning("running statistics loaded from %s (%d samples)", path, self.samples_seen)

    def save(self) -> None:
        """Write the state to ``state_file`` atomically (a temporary file renamed over it)."""
        if self.state_file is None:
            return
        state = {"version": _STATE_VERSION, "samples": self.samples_seen, "saved_at": time.time(),
                 "shaping": self.reward.state_dict()}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.state_file)
        self._dirty = False
        self._last_save = time.monotonic()

    def _save_if_due_locked(self) -> None:
        if self._dirty and self.state_file is not None and time.monotonic() - self._last_save >= self.save_every_s:
            try:
                self.save()
            except OSError as err:  # a full disk must not fail the rewards; the next save tries again
                logger.error("cannot write server.state_file %s: %s", self.state_file, err)

    def close(self) -> None:
        """Shape whatever is still held, and write the state (shutdown)."""
        with self._lock:
            self._flush_locked()
            if self._dirty:
                try:
                    self.save()
                except OSError as err:
                    logger.error("cannot write server.state_file %s: %s", self.state_file, err)
