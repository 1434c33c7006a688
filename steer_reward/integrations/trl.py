"""``SteerReward`` as TRL 1.16 reward functions (GRPOTrainer, RLOOTrainer, OnlineDPO).

TRL's contract (DESIGN.md "TRL 1.16"): a reward function is called with keyword arguments ``prompts``,
``completions``, ``completion_ids``, ``trainer_state``, ``log_extra``, ``log_metric`` and the dataset's other
columns, and returns one float (or None) per completion. Its metrics are logged as ``rewards/<__name__>/mean``,
so each instance gets its own ``__name__``; async ``__call__`` methods are awaited together; functions must
pickle (AsyncGRPO ships them to a spawned process), so these are classes, not closures, and pickle as their
config + weights + normalization state, rebuilding the model lazily in the new process.

Two shapes:

- ``SteerRewardFunc`` / ``AsyncSteerRewardFunc``: one callable returning the shaped reward.
- ``attribute_reward_funcs``: one callable per live attribute (plus one for the length penalty when it is on),
  all sharing **one** forward per batch, with the config's weights as TRL's ``reward_weights``, so TRL's own
  weighting, ``multi_objective_aggregation`` and per-attribute logging apply.

Length penalty source: when TRL passes ``completion_ids`` the penalty counts the **policy's** completion tokens
(non-pad ids); otherwise the reward model's own completion tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import TrainerCallback

from steer_reward.config import ConfigError
from steer_reward.monitors import monitor_scored_batch, monitor_shaped_batch

__all__ = [
    "SteerRewardFunc",
    "AsyncSteerRewardFunc",
    "SharedAttributeForward",
    "AttributeRewardFunc",
    "AsyncAttributeRewardFunc",
    "attribute_reward_funcs",
    "policy_lengths",
    "ShaperStateCallback",
    "STATE_FILE",
]

STATE_FILE = "steer_reward_state.json"
"""Name of the shaper-state file the callback writes into each trainer checkpoint folder."""

_names_lock = threading.Lock()
_names_used: dict[str, itertools.count] = {}


def unique_name(base: str) -> str:
    """``base`` the first time in this process, then ``base_2``, ``base_3``…: TRL merges the metrics of
    reward functions that share a ``__name__``."""
    with _names_lock:
        counter = _names_used.setdefault(base, itertools.count(1))
        n = next(counter)
    return base if n == 1 else f"{base}_{n}"


def policy_lengths(completion_ids: Sequence[Sequence[int]] | None, pad_token_id: int | None) -> list[int] | None:
    """The policy's completion token counts from TRL's ``completion_ids``, or None when TRL passed none.

    GRPO/RLOO pass unpadded id lists; OnlineDPO passes padded rows, so pad ids are not counted when the
    policy's ``pad_token_id`` is known.
    """
    if completion_ids is None:
        return None
    lengths = []
    for ids in completion_ids:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        lengths.append(len(ids) if pad_token_id is None else sum(1 for t in ids if t != pad_token_id))
    return lengths


# -- pickling: config + weights + state, model rebuilt lazily ------------------------------------------------------

def _reward_spec(reward: Any) -> dict:
    """What rebuilds ``reward`` in another process: its config, its shaper's weights and normalization state."""
    if reward.config.backend == "deepspeed":
        # A spawned process (AsyncGRPO's reward worker) is not a rank of the training job: a ZeRO-3 reward
        # rebuilt there could never join the collectives and would hang the job.
        raise TypeError(
            "a backend: deepspeed reward cannot be sent to another process (it is sharded across the training "
            "ranks); for AsyncGRPO use backend: remote (steer-reward serve) or backend: local"
        )
    return {"config": reward.config.to_dict(), "weights": reward.shaper.weights.tolist(),
            "state": reward.shaper.state_dict()}


def _rebuild_reward(spec: Mapping) -> Any:
    from steer_reward.reward import SteerReward

    reward = SteerReward.from_config(spec["config"])
    reward.shaper.weights = torch.tensor(spec["weights"], dtype=torch.float64)
    reward.shaper.load_state_dict(spec["state"])
    return reward


class _LazyReward:
    """Holds a ``SteerReward``; pickles as a spec and loads the model again on first use after unpickling."""

    def __init__(self, reward: Any) -> None:
        self._reward = reward
        self._spec: dict | None = None

    @property
    def reward(self) -> Any:
        if self._reward is None:
            self._reward = _rebuild_reward(self._spec)
        return self._reward

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_spec"] = _reward_spec(self._reward) if self._reward is not None else self._spec
        state["_reward"] = None
        return state


# -- one callable: the shaped reward ------------------------------------------------------------------------------

class SteerRewardFunc(_LazyReward):
    """The shaped reward as a TRL reward function.

    >>> func = reward.for_trl()  # doctest: +SKIP
    >>> GRPOTrainer(model=policy, reward_funcs=[func], ...)  # doctest: +SKIP

    Per-attribute batch means go to ``log_metric`` as ``<name>/<attribute>``, per-sample attributes to
    ``log_extra`` as ``<name>/<attribute>`` columns of the completions table, the batch's Spearman correlations
    with completion length as ``<name>/length_spearman/<reward|attribute>`` (``steer_reward.monitors``).
    """

    def __init__(self, reward: Any, name: str | None = None, policy_pad_token_id: int | None = None,
                 update_stats: bool | None = None, log_attributes: bool = True) -> None:
        super().__init__(reward)
        self.__name__ = name or unique_name("steer_reward")
        self.policy_pad_token_id = policy_pad_token_id
        self.update_stats = reward.shaper.updates_in_training if update_stats is None else bool(update_stats)
        self.log_attributes = log_attributes

    def _finish(self, scored: Any, log_metric: Callable | None, log_extra: Callable | None,
                lengths: list[int] | None = None) -> list[float]:
        if self.log_attributes:
            _log_attributes(self.__name__, scored.attributes, self.reward.schema, log_metric, log_extra)
            monitor_scored_batch(log_metric, self.__name__, scored.attributes, scored.rewards, self.reward.shaper,
                                 lengths)
        return scored.rewards.tolist()

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable | None = None, log_extra: Callable | None = None, **_: Any) -> list[float]:
        lengths = policy_lengths(completion_ids, self.policy_pad_token_id)
        scored = self.reward.score(prompts, completions, lengths=lengths, update_stats=self.update_stats)
        return self._finish(scored, log_metric, log_extra, lengths)


class AsyncSteerRewardFunc(SteerRewardFunc):
    """``SteerRewardFunc`` whose ``__call__`` is a coroutine: TRL awaits async reward functions together, so a
    remote scorer's HTTP requests overlap with the other reward functions."""

    async def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                       log_metric: Callable | None = None, log_extra: Callable | None = None,
                       **_: Any) -> list[float]:
        lengths = policy_lengths(completion_ids, self.policy_pad_token_id)
        scored = await self.reward.ascore(prompts, completions, lengths=lengths, update_stats=self.update_stats)
        return self._finish(scored, log_metric, log_extra, lengths)


def _log_attributes(prefix: str, attributes: Any, schema: Any, log_metric: Callable | None,
                    log_extra: Callable | None) -> None:
    for k in schema.live:
        name = schema.names[k]
        column = attributes.values[:, k]
        if log_metric is not None and len(column):
            log_metric(f"{prefix}/{name}", float(column.mean()))
        if log_extra is not None:
            log_extra(f"{prefix}/{name}", column.tolist())


# -- one callable per attribute, one forward per batch ------------------------------------------------------------

def _batch_key(prompts: Sequence, completions: Sequence) -> tuple:
    """Content key of one TRL call. Content, not list identity, so wrappers that copy the lists still share; a
    function asking again about a key it was already served means a new batch with the same texts."""
    digest = hashlib.sha1(json.dumps([prompts, completions], default=str, sort_keys=True).encode()).hexdigest()
    return len(prompts), digest


class SharedAttributeForward(_LazyReward):
    """The scoring step shared by a group of per-attribute functions.

    The first function to ask about a batch runs the forward (and updates running statistics once); the others
    of the group reuse that result. A function asking twice about the same key means a new batch with the same
    texts, which is scored (and counted) again.
    """

    def __init__(self, reward: Any, members: Sequence[str], policy_pad_token_id: int | None = None,
                 update_stats: bool | None = None) -> None:
        super().__init__(reward)
        shaping = reward.config.shaping
        if shaping.reward_normalization != "none" or shaping.clip is not None:
            raise ConfigError(
                "per-attribute TRL functions cannot apply shaping.reward_normalization or shaping.clip (they act on "
                "the weighted sum, which TRL forms itself): turn them off, or use reward.for_trl() for one shaped "
                "reward (TRL's scale_rewards / multi_objective_aggregation normalize per group)"
            )
        self.members = tuple(members)
        self.policy_pad_token_id = policy_pad_token_id
        self.update_stats = reward.shaper.updates_in_training if update_stats is None else bool(update_stats)
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._result: tuple[torch.Tensor, torch.Tensor] | None = None
        self._served: set[str] = set()
        self._task: asyncio.Task | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(_lock=None, _key=None, _result=None, _served=set(), _task=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _shape(self, attributes: Any, lengths: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(decorrelated, normalized attributes ``(n, K)`` float64, completion lengths ``(n,)``)."""
        shaper = self.reward.shaper
        values = shaper.normalized(shaper.decorrelated(attributes.values), self.update_stats)
        lengths_t = torch.as_tensor(lengths if lengths is not None else attributes.completion_lengths)
        return values, lengths_t

    def _cached(self, member: str, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._key == key and member not in self._served and self._result is not None:
            self._served.add(member)
            return self._result
        return None

    def _store(self, member: str, key: tuple, result: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._key, self._result, self._served, self._task = key, result, {member}, None

    def attributes(self, member: str, prompts: Sequence, completions: Sequence,
                   completion_ids: Sequence | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shaped attributes ``(n, K)`` and lengths ``(n,)`` of this batch, scoring it only once per group."""
        key = _batch_key(prompts, completions)
        with self._lock:
            hit = self._cached(member, key)
            if hit is not None:
                return hit
            scores = self.reward.scorer.score(prompts, completions)
            result = self._shape(scores, policy_lengths(completion_ids, self.policy_pad_token_id))
            self._store(member, key, result)
            return result

    async def aattributes(self, member: str, prompts: Sequence, completions: Sequence,
                          completion_ids: Sequence | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``attributes`` for async functions awaited together: the first starts one scoring task, the others of
        the group await that same task."""
        key = _batch_key(prompts, completions)
        if self._key == key and member not in self._served and self._task is not None:
            self._served.add(member)
            return await self._task

        async def run() -> tuple[torch.Tensor, torch.Tensor]:
            scored = await self.reward.ascore(prompts, completions)
            return self._shape(scored.attributes, policy_lengths(completion_ids, self.policy_pad_token_id))

        self._key, self._result, self._served = key, None, {member}
        self._task = asyncio.ensure_future(run())
        return await self._task


class AttributeRewardFunc:
    """One attribute (decorrelated and normalized as configured, unweighted) as a TRL reward function; with
    ``attribute=None``, minus the length penalty. TRL's ``reward_weights`` apply the weights. The group's first
    function logs the batch's length correlations as ``steer_reward/length_spearman/<reward|attribute>``."""

    def __init__(self, shared: SharedAttributeForward, attribute: str | None, name: str | None = None) -> None:
        self.shared = shared
        self.attribute = attribute
        self.__name__ = name or unique_name(attribute or "length_penalty")

    def _values(self, result: tuple[torch.Tensor, torch.Tensor], log_metric: Callable | None = None) -> list[float]:
        values, lengths = result
        shaper = self.shared.reward.shaper
        if log_metric is not None and self.__name__ == self.shared.members[0]:
            monitor_shaped_batch(log_metric, "steer_reward", values, lengths, shaper)
        if self.attribute is None:
            return (-shaper.length_penalty(lengths)).float().tolist()
        return values[:, shaper.schema.index(self.attribute)].float().tolist()

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable | None = None, **_: Any) -> list[float]:
        return self._values(self.shared.attributes(self.__name__, prompts, completions, completion_ids), log_metric)


class AsyncAttributeRewardFunc(AttributeRewardFunc):
    """``AttributeRewardFunc`` for an async (remote) reward: the group's functions await one shared request."""

    async def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                       log_metric: Callable | None = None, **_: Any) -> list[float]:
        return self._values(await self.shared.aattributes(self.__name__, prompts, completions, completion_ids),
                            log_metric)


def attribute_reward_funcs(reward: Any, prefix: str = "", policy_pad_token_id: int | None = None,
                           update_stats: bool | None = None, asynchronous: bool | None = None
                           ) -> tuple[list[AttributeRewardFunc], list[float]]:
    """(functions, reward_weights): one function per live attribute, then one for the length penalty when it is
    on (weight 1). ``shaping.bias`` is a constant and is left out: it changes no group-relative advantage.

    >>> funcs, weights = reward.trl_attribute_funcs()  # doctest: +SKIP
    >>> GRPOConfig(reward_weights=weights, ...); GRPOTrainer(reward_funcs=funcs, ...)  # doctest: +SKIP
    """
    schema = reward.schema
    names = [schema.names[k] for k in schema.live]
    with_penalty = reward.shaper.needs_lengths
    members = [unique_name(prefix + n) for n in names]
    if with_penalty:
        members.append(unique_name(prefix + "length_penalty"))
    shared = SharedAttributeForward(reward, members, policy_pad_token_id, update_stats)
    cls = AsyncAttributeRewardFunc if (reward.is_async if asynchronous is None else asynchronous) \
        else AttributeRewardFunc
    funcs = [cls(shared, attribute, member) for attribute, member in zip(names, members)]
    weights = [float(reward.shaper.weights[k]) for k in schema.live]
    if with_penalty:
        funcs.append(cls(shared, None, members[-1]))
        weights.append(1.0)
    return funcs, weights


# -- normalization state in trainer checkpoints -------------------------------------------------------------------

class ShaperStateCallback(TrainerCallback):
    """Saves the shaper's running normalization state into every trainer checkpoint folder
    (``checkpoint-N/steer_reward_state.json``) and restores it when training resumes from such a checkpoint.

    Pass it as ``callbacks=[ShaperStateCallback(reward)]`` (a ``SteerReward`` or one of this module's functions).
    Running statistics are synced across ranks, so rank 0 writes and every rank reads. ``resume_from`` names a
    checkpoint folder or state file explicitly (e.g. a checkpoint outside ``output_dir``).
    """

    def __init__(self, reward: Any, resume_from: str | Path | None = None) -> None:
        self.reward = reward
        self.resume_from = resume_from
        self.restored_from: Path | None = None

    @property
    def shaper(self) -> Any:
        target = self.reward.reward if isinstance(self.reward, _LazyReward) else self.reward
        return target.shaper

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_FILE).write_text(json.dumps(self.shaper.state_dict()))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Trainer has already loaded trainer_state.json when resuming, so global_step names the checkpoint.
        if self.resume_from is not None:
            path = Path(self.resume_from)
            path = path / STATE_FILE if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"no steer-reward shaper state at {path}")
        elif state.global_step > 0:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not path.is_file():
                return
        else:
            return
        self.shaper.load_state_dict(json.loads(path.read_text()))
        self.restored_from = path

