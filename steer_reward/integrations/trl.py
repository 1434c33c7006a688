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

Running statistics move on training batches only (TRL scores evaluation batches with the same functions), and
under data parallel each update merges the batch's moments over all ranks, so every rank holds the same state.

Length penalty source: when TRL passes ``completion_ids`` the penalty counts the **policy's** completion tokens
the way TRL counts them (``policy_lengths``); otherwise the reward model's own completion tokens.

AsyncGRPO sums its reward functions with weight 1 and scores in a spawned process: per-attribute functions and
functions that update running statistics refuse to be sent there.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import TrainerCallback

from steer_reward.config import ConfigError
from steer_reward.monitors import monitor_scored_batch, monitor_shaped_batch
from steer_reward.distributed import data_parallel_sync
from steer_reward.reward import ScoredBatch

__all__ = [
    "SteerRewardFunc",
    "AsyncSteerRewardFunc",
    "SharedAttributeForward",
    "AttributeRewardFunc",
    "AsyncAttributeRewardFunc",
    "attribute_reward_funcs",
    "policy_lengths",
    "calling_trainer",
    "is_eval_call",
    "steer_reward_of",
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


def _is_tool_message(message: Any) -> bool:
    return isinstance(message, Mapping) and message.get("role") == "tool"


def policy_lengths(completion_ids: Sequence[Sequence[int]] | None, completions: Sequence | None = None, *,
                   eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
                   unpadded: bool = False) -> list[int] | None:
    """The policy's completion token counts as TRL counts them, from the ``completion_ids`` it passes to reward
    functions; None when it passed none.

    TRL counts a completion's tokens through its first end-of-sequence token, EOS included (GRPO's and RLOO's
    ``completion_mask``, OnlineDPO's ``truncate_right`` mask), less the tool results it inserts (its ``tool_mask``,
    which it does not pass to reward functions):

    - ``unpadded`` rows (GRPO/RLOO: each completion already cut after its first EOS) count whole, whatever the
      policy's pad token is;
    - with ``eos_token_ids``, a row counts through the first of them (whole when none occurs): right for padded
      rows (OnlineDPO) and unpadded ones alike;
    - rows right-padded with ``pad_token_id`` but no ``eos_token_ids`` are refused: the pad may be the EOS itself
      (OnlineDPO makes it so when the tokenizer has none), and TRL counts that one;
    - a completion holding tool results (a ``"tool"`` message) is refused: its ids hold the tool results' tokens,
      and without TRL's tool mask they cannot be told from the policy's.
    """
    if completion_ids is None:
        return None
    for i, completion in enumerate(completions or ()):
        if not isinstance(completion, (str, Mapping)) and any(_is_tool_message(m) for m in completion):
            raise ValueError(
                f"completion {i} holds tool results: TRL leaves their tokens out of a completion's length (its tool "
                "mask) but passes reward functions the completion ids with them in and no mask, so the length "
                "penalty cannot count the policy's own tokens; set shaping.length_penalty.alpha: 0 and steer length "
                "with the verbosity weight"
            )
    eos = set(eos_token_ids or ())
    if not eos and pad_token_id is not None and not unpadded:
        raise ValueError(
            "completion rows padded with policy_pad_token_id: TRL counts each through its end-of-sequence token, "
            "and the pad may be that token; pass policy_eos_token_id as well (the policy's generation_config "
            "eos_token_id)"
        )
    lengths = []
    for ids in completion_ids:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        first_eos = next((i for i, t in enumerate(ids) if t in eos), None)
        lengths.append(len(ids) if first_eos is None else first_eos + 1)
    return lengths


def _token_ids(ids: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if ids is None:
        return None
    return (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)


# -- who is calling: a trainer's training step, its evaluation, or neither ---------------------------------------

def calling_trainer(log_metric: Callable | None) -> Any | None:
    """The trainer behind a TRL reward call, or None when the call did not come from one.

    GRPOTrainer and RLOOTrainer pass their own bound ``_log_metric`` as ``log_metric`` (TRL 1.16
    ``_calculate_rewards``), so its ``__self__`` is the trainer. OnlineDPO and AsyncGRPO's rollout worker pass none.
    """
    trainer = getattr(log_metric, "__self__", None)
    if trainer is None:
        return None
    from transformers import Trainer

    return trainer if isinstance(trainer, Trainer) else None


def is_eval_call(trainer: Any | None) -> bool:
    """Whether ``trainer`` is scoring an evaluation batch, by the test TRL itself uses to pick its metrics' mode
    (``"train" if self.model.training else "eval"``): its evaluation loop puts the model in eval mode."""
    return trainer is not None and not trainer.model.training


def _spawned_by_trl() -> bool:
    """Whether the object being pickled now is bound for a process that TRL is spawning (AsyncGRPO's rollout
    worker): multiprocessing marks the pickling done for a spawn, and a TRL frame is on the stack."""
    from multiprocessing.context import get_spawning_popen

    if get_spawning_popen() is None:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).split(".")[0] == "trl":
            return True
        frame = frame.f_back
    return False


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


# -- the order of cross-rank merges among async faces -------------------------------------------------------------

class _MergeTurns:
    """Async faces reach the cross-rank merge (a collective) in the order TRL started them, on every rank alike.

    TRL awaits its async reward functions together, so their scoring finishes in whatever order it happens to on
    each rank; merging in finishing order would pair one function's statistics with another's across ranks. A turn
    is taken when a face is called (TRL starts the coroutines in list order, the same on every rank) and the merge
    waits for it. Only updates that merge across ranks take turns.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._issued = 0
        self._finished = 0

    def take(self, sync: Any) -> "_MergeTurn":
        if sync is None:
            return _MergeTurn(self, None)
        with self._lock:
            self._issued += 1
            return _MergeTurn(self, self._issued - 1)

    async def reached(self, turn: int) -> None:
        while self._finished != turn:
            await asyncio.sleep(0.001)

    def finish(self) -> None:
        with self._lock:
            self._finished += 1


class _MergeTurn:
    """One face's place among ``_MergeTurns`` (``number`` None: no cross-rank merge, nothing to wait for)."""

    def __init__(self, turns: _MergeTurns, number: int | None) -> None:
        self.turns = turns
        self.number = number

    async def reached(self) -> None:
        if self.number is not None:
            await self.turns.reached(self.number)

    async def release(self) -> None:
        """Give the turn to the next face, after waiting for this one (also when this face failed early)."""
        if self.number is not None:
            await self.turns.reached(self.number)
            self.number = None
            self.turns.finish()


_MERGE_TURNS = _MergeTurns()


# -- what every face does with a TRL call ------------------------------------------------------------------------

_PER_ATTRIBUTE_IN_ASYNC_GRPO = (
    "per-attribute reward functions cannot run in AsyncGRPO's rollout process: AsyncGRPO sums reward functions with "
    "weight 1 (it has no reward_weights), so the attribute weights, verbosity's negative one among them, would be "
    "lost; pass [reward.for_trl()] (one shaped reward) instead"
)
_STATS_IN_ASYNC_GRPO = (
    "this reward updates running statistics, but AsyncGRPO scores in a spawned rollout process whose statistics "
    "never reach the trainer or its checkpoints: set shaping.update_running_stats: false or build the function "
    "with update_stats=False (statistics stay as loaded), use shaping.normalization: fixed with a stats_file, or "
    "train with GRPOTrainer"
)


class _TrlFace(_LazyReward):
    """What the shaped and per-attribute faces share: when a call updates running statistics (training batches
    only, merged across ranks), which lengths the penalty reads, and what may not be sent to AsyncGRPO."""

    def __init__(self, reward: Any, policy_pad_token_id: int | None = None,
                 policy_eos_token_id: int | Sequence[int] | None = None, update_stats: bool | None = None) -> None:
        super().__init__(reward)
        self.policy_pad_token_id = policy_pad_token_id
        self.policy_eos_token_ids = _token_ids(policy_eos_token_id)
        self.update_stats = reward.shaper.updates_in_training if update_stats is None else bool(update_stats)

    def _plan(self, completions: Sequence, completion_ids: Sequence | None,
              log_metric: Callable | None) -> tuple[bool, Any, list[int] | None, Exception | None]:
        """(update statistics?, the cross-rank merge for that update, the policy's completion lengths, why this
        call cannot go on).

        The last is not raised here: the other ranks are about to score and merge in this call, so the face hands it
        to ``SteerReward.fail_together`` at the point where it would join them, which ends the call on every rank.
        """
        trainer = calling_trainer(log_metric)
        # TRL scores evaluation batches with the same reward functions; only training batches move the statistics.
        update = self.update_stats and not is_eval_call(trainer)
        # Every rank calls each reward function once per generation batch with the same ``update``, so the merge
        # (a collective) is safe here; it is resolved now because the trainer creates the process group after the
        # reward is built.
        sync = data_parallel_sync(self.reward.shaper.sync, tag=self._merge_tag) if update else None
        try:
            lengths = policy_lengths(completion_ids, completions, eos_token_ids=self.policy_eos_token_ids,
                                     pad_token_id=self.policy_pad_token_id, unpadded=trainer is not None)
            if lengths is not None and len(lengths) != len(completions):
                raise ValueError(f"got {len(lengths)} completion_ids for {len(completions)} completions")
        except Exception as err:  # noqa: BLE001 - it must reach the other ranks (see the docstring)
            if isinstance(err, ValueError) and not self.reward.shaper.needs_lengths:
                return update, sync, None, None  # only the length monitors read them; the RM's counts will do
            return update, sync, None, err
        return update, sync, lengths, None

    @property
    def _merge_tag(self) -> str:
        return str(getattr(self, "__name__", type(self).__name__))

    def _spawn_problem(self) -> str | None:
        running = self._reward is None or self._reward.shaper.has_running_state  # None: already a pickled copy
        return _STATS_IN_ASYNC_GRPO if self.update_stats and running else None

    def __getstate__(self) -> dict:
        # AsyncGRPO pickles its reward functions into a spawned rollout process: refuse there what cannot be right.
        if _spawned_by_trl():
            problem = self._spawn_problem()
            if problem is not None:
                raise ConfigError(problem)
        return super().__getstate__()


# -- one callable: the shaped reward ------------------------------------------------------------------------------

class SteerRewardFunc(_TrlFace):
    """The shaped reward as a TRL reward function.

    >>> func = reward.for_trl()  # doctest: +SKIP
    >>> GRPOTrainer(model=policy, reward_funcs=[func], ...)  # doctest: +SKIP

    Per-attribute batch means go to ``log_metric`` as ``<name>/<attribute>``, per-sample attributes to
    ``log_extra`` as ``<name>/<attribute>`` columns of the completions table, the batch's Spearman correlations
    with completion length as ``<name>/length_spearman/<reward|attribute>`` (``steer_reward.monitors``). Running
    statistics move on training batches only, merged across ranks under data parallel. ``policy_eos_token_id``
    (or, for GRPO/RLOO, nothing) lets the length penalty count the policy's tokens as TRL does (see
    ``policy_lengths``); ``policy_pad_token_id`` matters only for trainers that pad completion rows (OnlineDPO).
    """

    def __init__(self, reward: Any, name: str | None = None, policy_pad_token_id: int | None = None,
                 update_stats: bool | None = None, log_attributes: bool = True,
                 policy_eos_token_id: int | Sequence[int] | None = None) -> None:
        super().__init__(reward, policy_pad_token_id, policy_eos_token_id, update_stats)
        self.__name__ = name or unique_name("steer_reward")
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
        update, sync, lengths, error = self._plan(completions, completion_ids, log_metric)
        if error is not None:
            self.reward.fail_together(error, "before scoring", update, sync)
        scored = self.reward.score(prompts, completions, lengths=lengths, update_stats=update, sync=sync)
        return self._finish(scored, log_metric, log_extra, lengths)


class AsyncSteerRewardFunc(SteerRewardFunc):
    """``SteerRewardFunc`` whose ``__call__`` is a coroutine: TRL awaits async reward functions together, so a
    remote scorer's HTTP requests overlap with the other reward functions."""

    async def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                       log_metric: Callable | None = None, log_extra: Callable | None = None,
                       **_: Any) -> list[float]:
        update, sync, lengths, error = self._plan(completions, completion_ids, log_metric)
        turn = _MERGE_TURNS.take(sync)
        try:
            attributes, failure = await _scored_or_failed(self.reward, prompts, completions, error)
            await turn.reached()
            if failure is not None:  # carried into this face's merge, in its turn like every other merge
                self.reward.fail_together(*failure, update, sync)
            rewards = self.reward.rewards(attributes, lengths, update, sync)
        finally:
            await turn.release()
        return self._finish(ScoredBatch(attributes, rewards), log_metric, log_extra, lengths)


async def _scored_or_failed(reward: Any, prompts: Sequence, completions: Sequence,
                            error: Exception | None) -> tuple[Any, tuple[Exception, str] | None]:
    """(attributes, None), or (None, (the error, the ``fail_together`` stage it stopped at)) for an async face to
    carry into its merge when its turn comes: raising at once would leave the other ranks waiting in that merge."""
    if error is not None:
        return None, (error, "before scoring")
    try:
        return await reward.ascore_attributes(prompts, completions), None
    except Exception as err:  # noqa: BLE001 - a failure on this rank alone must reach the others
        return None, (err, "scoring")


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


class SharedAttributeForward(_TrlFace):
    """The scoring step shared by a group of per-attribute functions.

    The first function to ask about a batch runs the forward (and, for a training batch, updates running
    statistics once); the others of the group reuse that result. A function asking twice about the same key means
    a new batch with the same texts, which is scored (and counted) again.
    """

    def __init__(self, reward: Any, members: Sequence[str], policy_pad_token_id: int | None = None,
                 update_stats: bool | None = None, policy_eos_token_id: int | Sequence[int] | None = None) -> None:
        shaping = reward.config.shaping
        if shaping.reward_normalization != "none" or shaping.clip is not None:
            raise ConfigError(
                "per-attribute TRL functions cannot apply shaping.reward_normalization or shaping.clip (they act on "
                "the weighted sum, which TRL forms itself): turn them off, or use reward.for_trl() for one shaped "
                "reward (TRL's scale_rewards / multi_objective_aggregation normalize per group)"
            )
        super().__init__(reward, policy_pad_token_id, policy_eos_token_id, update_stats)
        self.members = tuple(members)
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._result: tuple[torch.Tensor, torch.Tensor] | None = None
        self._served: set[str] = set()
        self._task: asyncio.Task | None = None

    @property
    def _merge_tag(self) -> str:
        return ",".join(self.members)

    def _spawn_problem(self) -> str | None:
        return _PER_ATTRIBUTE_IN_ASYNC_GRPO

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(_lock=None, _key=None, _result=None, _served=set(), _task=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _shape(self, attributes: Any, lengths: list[int] | None, update: bool,
               sync: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(decorrelated, normalized attributes ``(n, K)`` float64, completion lengths ``(n,)``)."""
        shaper = self.reward.shaper
        values = shaper.normalized(shaper.decorrelated(attributes.values), update, sync)
        lengths_t = torch.as_tensor(lengths if lengths is not None else attributes.completion_lengths)
        return values, lengths_t

    def _cached(self, member: str, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._key == key and member not in self._served and self._result is not None:
            self._served.add(member)
            return self._result
        return None

    def _store(self, member: str, key: tuple, result: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._key, self._result, self._served, self._task = key, result, {member}, None

    def attributes(self, member: str, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None,
                   log_metric: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shaped attributes ``(n, K)`` and lengths ``(n,)`` of this batch, scoring it only once per group."""
        key = _batch_key(prompts, completions)
        with self._lock:
            hit = self._cached(member, key)
            if hit is not None:
                return hit
            update, sync, lengths, error = self._plan(completions, completion_ids, log_metric)
            scores = self.reward.score_attributes(prompts, completions, update_stats=update, sync=sync, error=error)
            result = self._shape(scores, lengths, update, sync)
            self._store(member, key, result)
            return result

    async def aattributes(self, member: str, prompts: Sequence, completions: Sequence,
                          completion_ids: Sequence | None,
                          log_metric: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``attributes`` for async functions awaited together: the first starts one scoring task, the others of
        the group await that same task."""
        key = _batch_key(prompts, completions)
        if self._key == key and member not in self._served and self._task is not None:
            self._served.add(member)
            return await self._task
        update, sync, lengths, error = self._plan(completions, completion_ids, log_metric)
        turn = _MERGE_TURNS.take(sync)

        async def run() -> tuple[torch.Tensor, torch.Tensor]:
            try:
                attributes, failure = await _scored_or_failed(self.reward, prompts, completions, error)
                await turn.reached()
                if failure is not None:  # carried into this group's merge, in its turn like every other merge
                    self.reward.fail_together(*failure, update, sync)
                return self._shape(attributes, lengths, update, sync)
            finally:
                await turn.release()

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
        return self._values(self.shared.attributes(self.__name__, prompts, completions, completion_ids, log_metric),
                            log_metric)


class AsyncAttributeRewardFunc(AttributeRewardFunc):
    """``AttributeRewardFunc`` for an async (remote) reward: the group's functions await one shared request."""

    async def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                       log_metric: Callable | None = None, **_: Any) -> list[float]:
        return self._values(await self.shared.aattributes(self.__name__, prompts, completions, completion_ids,
                                                          log_metric), log_metric)


def attribute_reward_funcs(reward: Any, prefix: str = "", policy_pad_token_id: int | None = None,
                           update_stats: bool | None = None, asynchronous: bool | None = None,
                           policy_eos_token_id: int | Sequence[int] | None = None
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
    shared = SharedAttributeForward(reward, members, policy_pad_token_id, update_stats, policy_eos_token_id)
    cls = AsyncAttributeRewardFunc if (reward.is_async if asynchronous is None else asynchronous) \
        else AttributeRewardFunc
    funcs = [cls(shared, attribute, member) for attribute, member in zip(names, members)]
    weights = [float(reward.shaper.weights[k]) for k in schema.live]
    if with_penalty:
        funcs.append(cls(shared, None, members[-1]))
        weights.append(1.0)
    return funcs, weights


# -- normalization state in trainer checkpoints -------------------------------------------------------------------

def steer_reward_of(face: Any) -> Any:
    """The ``SteerReward`` behind any face of it: the reward itself, ``SteerRewardFunc`` /
    ``AsyncSteerRewardFunc``, ``AttributeRewardFunc`` / ``AsyncAttributeRewardFunc``, ``SharedAttributeForward``."""
    if isinstance(face, AttributeRewardFunc):
        face = face.shared
    if isinstance(face, _LazyReward):
        return face.reward
    return face


def _check_face(face: Any) -> None:
    from steer_reward.reward import SteerReward

    if not isinstance(face, (SteerReward, _LazyReward, AttributeRewardFunc)):
        raise TypeError(
            f"ShaperStateCallback needs a SteerReward or one of its TRL functions (reward.for_trl(), an item of "
            f"reward.trl_attribute_funcs()[0]), got {type(face).__name__}"
        )


def _generation_cycle(args: Any) -> int:
    """Training micro-steps fed by one TRL generation: ``steps_per_generation × num_iterations`` (GRPO/RLOO
    ``_prepare_inputs`` regenerates when its step counter is a multiple of that); 1 for other trainers."""
    steps = int(getattr(args, "steps_per_generation", None) or 1)
    return max(1, steps * int(getattr(args, "num_iterations", None) or 1))


class ShaperStateCallback(TrainerCallback):
    """Saves the shaper's running normalization state into every trainer checkpoint folder
    (``checkpoint-N/steer_reward_state.json``) and restores it when training resumes from such a checkpoint.

    Pass it as ``callbacks=[ShaperStateCallback(reward)]``: a ``SteerReward`` or any of this module's functions
    built from it. The TRL functions merge running statistics across ranks under data parallel (and the DeepSpeed
    backend always does), so rank 0 writes; on resume rank 0 reads and sends its state to every rank.
    ``resume_from`` names a checkpoint folder or state file explicitly (e.g. a checkpoint outside ``output_dir``).

    Generation boundaries: GRPO/RLOO score one generation batch for ``steps_per_generation × num_iterations``
    training micro-steps, and a run resumed from a checkpoint inside that cycle generates and scores the batch
    again. A mid-cycle checkpoint therefore holds the statistics as of the cycle's start (before that batch was
    counted), so the resumed run counts each generation batch once: the regenerated batch replaces the one the
    checkpoint interrupted. Rewards after resuming equal an uninterrupted run's only from a checkpoint at a
    boundary (``save_steps × gradient_accumulation_steps`` a multiple of the cycle), since a mid-cycle resume
    trains on fresh completions.
    """

    def __init__(self, reward: Any, resume_from: str | Path | None = None) -> None:
        _check_face(reward)
        self.reward = reward
        self.resume_from = resume_from
        self.restored_from: Path | None = None
        self._micro_steps = 0  # mirrors GRPO/RLOO's own step counter (``_step``): one per training_step call
        self._cycle_start_state: dict | None = None

    @property
    def shaper(self) -> Any:
        return steer_reward_of(self.reward).shaper

    def _count_micro_step(self, args: Any) -> None:
        self._micro_steps += 1
        if self._micro_steps % _generation_cycle(args) == 0:
            self._cycle_start_state = self.shaper.state_dict()  # the next step generates and scores anew

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._count_micro_step(args)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._count_micro_step(args)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        mid_cycle = self._micro_steps % _generation_cycle(args) != 0 and self._cycle_start_state is not None
        snapshot = self._cycle_start_state if mid_cycle else self.shaper.state_dict()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_FILE).write_text(json.dumps(snapshot))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restore(args, state)
        if self._micro_steps % _generation_cycle(args) == 0:
            self._cycle_start_state = self.shaper.state_dict()  # the first step generates (TRL's step counter is 0)

    def _restore(self, args: Any, state: Any) -> None:
        from steer_reward.distributed import broadcast_from_rank0, rank, shared_error

        # Rank 0 reads and every rank loads what rank 0 read: a rank that cannot see the checkpoint (a node-local
        # disk) must not start from its own fresh statistics while the others resume, and an error must reach
        # every rank rather than leave the others waiting in the broadcast or the next collective.
        found = self._read_state(args, state) if rank() == 0 else None
        found = broadcast_from_rank0(found)
        if found is None:
            return
        if "error" in found:
            raise shared_error(found.get("type", "FileNotFoundError"), found["error"])
        self.shaper.load_state_dict(found["state"])
        self.restored_from = Path(found["path"])

    def _read_state(self, args: Any, state: Any) -> dict | None:
        """``{"state", "path"}`` of the checkpoint to resume from, ``{"error", "type"}``, or None when not
        resuming. Under several ranks a file that cannot be read is an ``{"error"}`` too: rank 0 must still join
        the broadcast the others wait in, and every rank then raises it."""
        # Trainer has already loaded trainer_state.json when resuming, so global_step names the checkpoint.
        if self.resume_from is not None:
            path = Path(self.resume_from)
            path = path / STATE_FILE if path.is_dir() else path
            if not path.is_file():
                return {"error": f"no steer-reward shaper state at {path}"}
        elif state.global_step > 0:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not path.is_file():
                return None
        else:
            return None
        try:
            return {"state": json.loads(path.read_text()), "path": str(path)}
        except Exception as err:  # noqa: BLE001 - every rank waits in the broadcast for what rank 0 read
            from steer_reward.distributed import shared_type_name, world_size

            if world_size() < 2:
                raise
            cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            return {"error": f"rank 0 cannot read the steer-reward shaper state {path} ({cause})",
                    "type": shared_type_name(err)}
