"""The colocated ZeRO-3 backend: the reward model sharded across the training ranks, never a hang.

What ZeRO-3 inference needs (DESIGN.md, "DeepSpeed ZeRO-3", verified on CPU with gloo):

- the model is loaded already partitioned (``HfDeepSpeedConfig`` active during ``from_pretrained``), wrapped by
  ``deepspeed.initialize`` with a stage-3 config that has no optimizer, int bucket sizes nested under
  ``zero_optimization`` (TRL's ``prepare_deepspeed`` writes dotted top-level keys DeepSpeed ignores), and no
  ``"auto"`` values;
- parameters are gathered by forward hooks, so the forward goes through the engine: the engine's module is
  ``LastTokenHead``, which reads the head at each sequence's last real token (the local backend's head path), or
  runs one ragged forward of the local backend's plan (prefix sharing over many groups per forward);
- every forward is a collective: ranks agree on the count of each kind of forward (prefill, completion, padded)
  with one all-reduce MAX, and short ranks, including ranks with no samples at all, run dummy forwards of that kind
  whose results are discarded. A rank that failed before it could score (its samples failed to encode, or the
  caller's arguments were refused: ``DeepSpeedAttributeScorer.fail_together``) says so in the same all-reduce, so
  every rank raises the same error naming it at once, still in step, instead of waiting in a collective until the
  process-group timeout. A forward
  that fails part-way on one rank (an out-of-memory) cannot be made good: that rank refuses every later call
  instead of issuing collectives that no longer pair with the other ranks' (a hang, or wrong tensors under NCCL).

Inside an ``accelerate`` DeepSpeed run (TRL trainers) the trainer's process group is reused and the offload and
precision settings come from its DeepSpeed plugin; standalone, the backend joins the launch's process group itself
with ``deepspeed.timeout_s``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, NoReturn, Sequence

import torch
from torch import nn

from steer_reward.config import BatchingConfig, ConfigError, SteerRewardConfig
from steer_reward.distributed import (DistributedError, RankMomentsSync, agreed_failure, all_reduce_max,
                                      collective, ensure_process_group, local_device, rank, skip_cpu_shm_build,
                                      world_size)
from steer_reward.formatting import EncodedSample, RewardFormatter
from steer_reward.forward import find_head, pad_right, pool_last_token, read_outputs
from steer_reward.planning import key_value_shape, plan_microbatches, rope_alone_from
from steer_reward.ragged import RaggedLayout, Segment, run_ragged
from steer_reward.scoring import AttributeScores, AttributeScorer

__all__ = [
    "LastTokenHead",
    "ZeroInferenceBackend",
    "DeepSpeedAttributeScorer",
    "build_deepspeed_scorer",
    "inference_config",
    "trainer_deepspeed_config",
]

_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}
_BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "stage3_max_live_parameters", "stage3_max_reuse_distance", "allgather_bucket_size",
                "sub_group_size", "stage3_model_persistence_threshold")
_TRAINING_ONLY = ("optimizer", "scheduler")


class LastTokenHead(nn.Module):
    """The engine's module: backbone → hidden state at each row's last real token → head.

    ``forward.pool_last_token`` (the local backend's head path) as a module so that DeepSpeed's hooks
    gather every parameter (backbone and head) during the engine's forward. With ``ragged`` it runs one ragged
    forward instead (``ragged.run_ragged``, the local backend's fast path) and reads the head at each segment's
    last token. Both call the same modules in the same order — embedding, every layer, final norm, head — so every
    forward of every kind issues the same sequence of parameter all-gathers. Models without a standard head
    (custom code) run their own forward. Output ``.logits`` shape: ``(b, K)`` (``(segments, K)`` when ragged).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._head = find_head(model)

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                ragged: RaggedLayout | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        if ragged is not None:
            return SequenceClassifierOutput(logits=self._head.head(run_ragged(self._head.backbone, ragged)))
        if self._head is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        return SequenceClassifierOutput(logits=pool_last_token(self._head, input_ids, attention_mask))


FORWARD_KINDS = ("prefill", "completion", "padded")
"""Kinds of forward whose counts ranks agree on: ragged prefill, ragged completion, right-padded micro-batch."""


SCORING_FAILED = "a rank could not start this scoring call, so no rank scored this batch"
"""What every rank says when the count agreement carried a rank's failure (``distributed.agreed_failure``)."""


class ZeroInferenceBackend:
    """Scores encoded samples with a ZeRO-3 engine; a collective on every call.

    Runs the local backend's plan (``prefix_sharing.GroupScorer``: ragged prefill and completion forwards, many
    prompt groups per forward) when the model supports it, else padded micro-batches. ``forward_calls`` counts real
    forwards, ``dummy_calls`` the discarded ones run to match other ranks; ``kind_calls`` counts both per kind.
    """

    def __init__(self, engine: Any, pad_id: int, num_outputs: int, batching: BatchingConfig | None = None,
                 device: torch.device | str = "cpu", timeout_s: float | None = None) -> None:
        from steer_reward.backends.local import attention_call_tokens, ragged_budget, resolve_strategy
        from steer_reward.prefix_sharing import GroupScorer

        self.engine = engine
        self.pad_id = int(pad_id)
        self.num_outputs = int(num_outputs)
        self.batching = batching or BatchingConfig()
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.forward_calls = 0
        self.dummy_calls = 0
        self.kind_calls = dict.fromkeys(FORWARD_KINDS, 0)
        self.out_of_step: str | None = None
        """Why this rank's collectives no longer match the other ranks' (a call failed between the count agreement
        and its last forward), or None."""
        module = getattr(engine, "module", None)
        model = getattr(module, "model", None)
        head = find_head(model) if model is not None else None
        self.strategy = resolve_strategy(self.batching.strategy, model, head, stacklevel=4) if model is not None \
            else "padded"
        self.groups = None
        self._config = getattr(model, "config", None)
        if self.strategy != "padded":
            b = self.batching
            self.groups = GroupScorer(self._ragged_forward, ragged_budget(b, self._config, self.strategy),
                                      b.forward_overhead_tokens, b.prompt_cache_tokens,
                                      attention_call_tokens(self.device))

    def plan(self, samples: Sequence[EncodedSample]) -> list[list[int]]:
        """The real forwards ``attributes(samples)`` runs on this rank, each as the samples it computes."""
        plan, batches, _ = self._plan_kinds(samples)
        return [f.samples for f in plan.forwards] if plan is not None else batches

    def run_microbatch(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Attributes of one micro-batch. Shape: ``(b, K)``, float32.

        ``no_grad`` rather than ``inference_mode``: ZeRO-3 keeps gathered (persistent) parameters in
        ``param.data`` between forwards, and ones gathered under ``inference_mode`` become inference tensors that
        autograd later rejects when train and eval forwards mix (snowflakedb/ArcticTraining#265). The reward model is
        never trained, so this is a precaution; both modes pass the 2-rank scoring and GRPO tests here.
        """
        input_ids, attention_mask = pad_right(sequences, self.pad_id, self.device)
        with torch.no_grad(), collective("a ZeRO-3 forward (parameter all-gather)", self.timeout_s):
            return read_outputs(self.engine(input_ids=input_ids, attention_mask=attention_mask)).float()

    def _ragged_forward(self, layout: RaggedLayout) -> torch.Tensor:
        """Scores at each segment's last token of one ragged forward through the engine. Shape: ``(segments, K)``."""
        kind = "completion" if layout.is_completion else "prefill"
        self.forward_calls += 1
        self.kind_calls[kind] += 1
        with torch.no_grad(), collective(f"a ZeRO-3 {kind} forward (parameter all-gather)", self.timeout_s):
            return read_outputs(self.engine(ragged=layout)).float()

    def _dummy(self, kind: str) -> None:
        """One discarded forward of ``kind`` on a single pad token (a completion reads a one-token zero prompt)."""
        self.dummy_calls += 1
        self.kind_calls[kind] += 1
        if kind == "padded":
            self.run_microbatch([(self.pad_id,)])
            return
        prompt_kv = {}
        segment = Segment((self.pad_id,))
        if kind == "completion":
            kv_heads, head_dim = key_value_shape(self._config)
            dtype = next(self.engine.module.parameters()).dtype
            zeros = torch.zeros((1, kv_heads, 1, head_dim), dtype=dtype, device=self.device)
            prompt_kv = {"dummy": [(zeros, zeros)] * self._config.num_hidden_layers}
            segment = Segment((self.pad_id,), start=1, prompt="dummy")
        with torch.no_grad(), collective(f"a ZeRO-3 {kind} forward (parameter all-gather)", self.timeout_s):
            self.engine(ragged=RaggedLayout([segment], prompt_kv=prompt_kv))

    def attributes(self, samples: Sequence[EncodedSample], error: BaseException | None = None) -> torch.Tensor:
        """Attributes of every sample, in input order. Shape: ``(n, K)``, float32 on CPU.

        Every rank runs the same number of forwards of each kind (DESIGN.md: unequal counts hang ZeRO-3): one
        all-reduce MAX agrees on the counts, and on whether any rank's ``error`` (this rank failed before it could
        score: a sample that failed to encode, a refused argument) stops the call everywhere; then a rank with fewer
        forwards of a kind, or none, runs one-token dummy forwards of that kind. A call that fails after the
        agreement (a forward stopped part-way) leaves this rank out of step with the others, whose collectives it
        will never join: every later call raises ``DistributedError`` at once.
        """
        if self.out_of_step is not None:
            # Any collective now would pair with another rank's different one: a hang, or under NCCL bytes read as
            # the wrong tensor. Refuse without joining any.
            raise DistributedError(
                f"rank {rank()} of {world_size()}: an earlier scoring call failed in the middle of its ZeRO-3 "
                f"collectives ({self.out_of_step}), so this rank is out of step with the others and cannot score "
                "again; restart the job"
            )
        plan, batches, mine = None, [], [0, 0, 0]
        if error is None:
            try:  # planning runs before the agreement: a failure here must reach the other ranks through it too
                plan, batches, mine = self._plan_kinds(samples)
            except Exception as err:  # noqa: BLE001 - any failure here must reach the other ranks
                plan, batches, mine, error = None, [], [0, 0, 0], err
        with self._in_step():
            agreed = all_reduce_max(mine + [int(error is not None)], self.device, self.timeout_s,
                                    "agreeing on the forward counts (all-reduce MAX)")
            failure = agreed_failure(error, SCORING_FAILED, self.timeout_s) if agreed[-1] else None
        if failure is not None:
            raise failure from error  # every rank raises it here, still in step
        out = torch.empty((len(samples), self.num_outputs), dtype=torch.float32)
        with self._in_step():
            if plan is not None:
                self.groups.run(samples, plan, out)
            for batch in batches:
                out[batch] = self.run_microbatch([samples[i].input_ids for i in batch]).cpu()
                self.forward_calls += 1
                self.kind_calls["padded"] += 1
            for kind, have, need in zip(FORWARD_KINDS, mine, agreed):
                for _ in range(need - have):
                    self._dummy(kind)
        return out

    def _plan_kinds(self, samples: Sequence[EncodedSample]) -> tuple[Any, list[list[int]], list[int]]:
        """(the group plan or None, the padded micro-batches, this rank's forward count of each kind)."""
        if self.groups is not None:
            plan = self.groups.plan(samples, self.strategy)
            return plan, [], [sum(f.kind == kind for f in plan.forwards) for kind in FORWARD_KINDS[:2]] + [0]
        batches = plan_microbatches([len(s) for s in samples], self.batching.max_tokens,
                                    self.batching.max_batch_size, rope_alone_from(self._config))
        return None, batches, [0, 0, len(batches)]

    @contextlib.contextmanager
    def _in_step(self) -> Iterator[None]:
        """Mark this rank out of step when the block fails: a forward that stopped part-way (an out-of-memory, a
        lost peer) leaves the other ranks inside collectives this rank will never join."""
        try:
            yield
        except BaseException as err:
            self.out_of_step = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise

    def partition_numel(self) -> tuple[int, int]:
        """(parameter elements this rank holds, elements of the whole model)."""
        held = total = 0
        for param in self.engine.module.parameters():
            held += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
            total += getattr(param, "ds_numel", param.numel())
        return held, total


class DeepSpeedAttributeScorer(AttributeScorer):
    """``AttributeScorer`` over a ZeRO-3 backend; every call is a collective, even with no samples.

    ``moments_sync`` merges running statistics across ranks (``SteerReward`` hands it to the shaper).
    """

    def __init__(self, formatter: RewardFormatter, backend: ZeroInferenceBackend, schema: Any, model: Any = None,
                 moments_sync: RankMomentsSync | None = None) -> None:
        super().__init__(formatter, backend, schema, model=model)
        self.moments_sync = moments_sync or RankMomentsSync(backend.device, backend.timeout_s)

    def score_encoded(self, samples: Sequence[EncodedSample]) -> AttributeScores:
        # The base class skips the backend for an empty batch; here that rank would leave the others waiting.
        values = self.backend.attributes(samples)
        return AttributeScores.from_samples(values, self.schema.names, samples)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> AttributeScores:
        """Attributes of each (prompt, completion), in input order; a collective.

        A batch that fails to encode on this rank still joins the count agreement, flagged, so that every rank
        raises the same error within one all-reduce instead of the others waiting out the process-group timeout.
        """
        try:
            samples, error = self.encode(prompts, completions), None
        except Exception as err:  # noqa: BLE001 - any failure here must reach the other ranks
            samples, error = [], err
        values = self.backend.attributes(samples, error=error)
        return AttributeScores.from_samples(values, self.schema.names, samples)

    def fail_together(self, error: BaseException) -> NoReturn:
        """Join the scoring call the other ranks are making, flagged with ``error`` (this rank failed before it
        could score, e.g. on a refused argument), instead of leaving them waiting in it: every rank raises the same
        error naming this rank, and the ranks stay in step for the next call."""
        self.backend.attributes([], error=error)
        raise error  # not reached: a flagged agreement raises on every rank


# --------------------------------------------------------------------------------------------------- configs


def _model_dims(folder: Path, trust_remote_code: bool) -> tuple[int, Any]:
    """(hidden size, checkpoint dtype) read from config.json, for bucket sizes and ``dtype: auto``."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    hidden = getattr(text_config, "hidden_size", None) or getattr(hf_config, "hidden_size", None) or 4096
    return int(hidden), getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)


def _bucket_defaults(hidden: int) -> dict:
    # TRL's prepare_deepspeed sizes, as ints and nested (DESIGN.md). A small persistence threshold keeps only
    # norms and biases whole, so every weight matrix is actually sharded.
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


def inference_config(dtype: str, hidden: int, offload_params: bool = False) -> dict:
    """A ZeRO-3 inference config: stage 3, no optimizer, int nested buckets, precision from ``dtype``.

    ``train_micro_batch_size_per_gpu`` is required by ``deepspeed.initialize`` even when nothing trains.
    """
    zero = {"stage": 3, **_bucket_defaults(hidden)}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _no_auto(value: Any, key: str) -> None:
    if value == "auto":
        raise ConfigError(f"deepspeed config: {key} is 'auto'; only a trainer resolves 'auto', give a number")


def normalize_inference_config(raw: Mapping, dtype: str, hidden: int, source: str = "deepspeed config") -> dict:
    """Validate a user's ZeRO-3 JSON and make it one DeepSpeed accepts for inference.

    Dotted top-level keys, an optimizer or scheduler, a stage other than 3, or a precision that contradicts
    ``model.dtype`` are errors; batch-size and bucket ``"auto"`` values become numbers, bucket sizes ints.
    """
    cfg = copy.deepcopy(dict(raw))
    dotted = [k for k in cfg if "." in k]
    if dotted:
        raise ConfigError(f"{source}: dotted keys {dotted} are ignored by DeepSpeed; nest them, e.g. "
                          f'"zero_optimization": {{"{dotted[0].split(".", 1)[1]}": ...}}')
    training = [k for k in _TRAINING_ONLY if cfg.get(k)]
    if training:
        raise ConfigError(f"{source}: {training} configure training; a reward model's inference config has none")
    zero = dict(cfg.get("zero_optimization") or {})
    if zero.get("stage") != 3:
        raise ConfigError(f"{source}: zero_optimization.stage must be 3 for backend: deepspeed "
                          f"(got {zero.get('stage')!r}); use backend: local for an unsharded model")
    for key, value in _bucket_defaults(hidden).items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    for key in _BUCKET_KEYS:
        if key in zero:
            _no_auto(zero[key], f"zero_optimization.{key}")
            zero[key] = int(zero[key])
    cfg["zero_optimization"] = zero
    # Batch sizes only satisfy DeepSpeed's consistency check here; nothing trains.
    cfg.pop("train_batch_size", None)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if cfg.get(key, "auto") == "auto":
            cfg[key] = 1
    if cfg.get("gradient_clipping") == "auto":
        cfg.pop("gradient_clipping")
    for name in ("bf16", "fp16"):
        section = dict(cfg.get(name) or {})
        wanted = _PRECISION.get(dtype) == name
        enabled = section.get("enabled", False)
        if enabled == "auto":
            enabled = wanted
        if bool(enabled) != wanted:
            raise ConfigError(f"{source}: {name}.enabled is {enabled} but model.dtype is {dtype!r}; make them agree "
                              f"(model.dtype: {'bfloat16' if name == 'bf16' else 'float16'} runs {name})")
        section["enabled"] = wanted
        cfg[name] = section
    for key, value in cfg.items():
        _no_auto(value, key)
    return cfg


def trainer_deepspeed_config() -> dict | None:
    """The DeepSpeed config of the surrounding ``accelerate`` DeepSpeed run (a TRL trainer's), or None.

    The trainer's plugin when its ``AcceleratorState`` exists; before that (a reward built before the trainer,
    the usual order since the trainer takes the reward function) what ``accelerate launch`` put in the environment.
    """
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return None
    if AcceleratorState._shared_state:  # reading AcceleratorState() when empty would create one
        plugin = AcceleratorState().deepspeed_plugin
        return None if plugin is None else plugin.deepspeed_config
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if config_file and config_file != "None" and Path(config_file).is_file():
        return json.loads(Path(config_file).read_text())
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return {
        "zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")),
                              "offload_param": {"device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                                                                         "none")}},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }


def _precision_of(ds_config: Mapping) -> str:
    for name, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if (ds_config.get(name) or {}).get("enabled") is True:
            return dtype
    return "float32"


def _resolve_dtype(config: SteerRewardConfig, checkpoint_dtype: Any, trainer: Mapping | None) -> str:
    if config.model.dtype != "auto":
        return config.model.dtype
    if trainer is not None:
        return _precision_of(trainer)
    name = str(checkpoint_dtype).replace("torch.", "") if checkpoint_dtype is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def build_ds_config(config: SteerRewardConfig, hidden: int, dtype: str, trainer: Mapping | None) -> dict:
    """The engine's config: the user's file, else one derived from the trainer's plugin, else the default."""
    if config.deepspeed.config_file:
        path = Path(config.deepspeed.config_file)
        if not path.is_file():
            raise ConfigError(f"deepspeed.config_file {str(path)!r} does not exist")
        try:
            raw = json.loads(path.read_text())
        except ValueError as err:
            raise ConfigError(f"deepspeed.config_file {path}: not valid JSON ({err})") from None
        return normalize_inference_config(raw, dtype, hidden, source=f"deepspeed.config_file {path}")
    offload = config.deepspeed.offload_params
    if trainer is not None:
        # Follow the trainer's choice of parameter offload; its optimizer, batch sizes and "auto"s are not ours.
        trainer_offload = ((trainer.get("zero_optimization") or {}).get("offload_param") or {}).get("device")
        offload = offload or trainer_offload in ("cpu", "nvme")
    return inference_config(dtype, hidden, offload)


# --------------------------------------------------------------------------------------------------- loading


@contextlib.contextmanager
def zero3_loading(ds_config: Mapping) -> Iterator[None]:
    """``from_pretrained`` inside this block builds the model partitioned (``zero.Init``), never whole on a rank.

    Transformers keeps the active ``HfDeepSpeedConfig`` behind a module-level weakref; a trainer relies on its
    own (e.g. generation's ``synced_gpus``), so the previous one is put back afterwards.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    previous = hf_deepspeed._hf_deepspeed_config_weak_ref
    active = hf_deepspeed.HfDeepSpeedConfig(dict(ds_config))
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous
        del active


def build_deepspeed_scorer(config: SteerRewardConfig) -> DeepSpeedAttributeScorer:
    """A ZeRO-3 scorer for ``config`` (``backend: deepspeed``). A collective: every rank must call it."""
    from steer_reward.errors import require_extra

    if config.model.adapter:
        raise ConfigError("model.adapter cannot be merged into a ZeRO-3 sharded model; merge the adapter once with "
                          "backend: local and save the merged checkpoint, then point model.path at it")
    if config.model.device_map is not None:
        raise ConfigError("model.device_map spreads one model over devices itself; backend 'deepspeed' shards it with "
                          "ZeRO-3 instead: remove model.device_map (or use backend: local)")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise assumes CUDA
    deepspeed = require_extra("deepspeed", "deepspeed")
    from steer_reward.modeling import model_folder, load_reward_model
    from steer_reward.schema import resolve_schema

    skip_cpu_shm_build()
    timeout_s = config.deepspeed.timeout_s
    if not ensure_process_group(timeout_s):
        timeout_s = None  # a trainer's group keeps its own timeout (accelerate's InitProcessGroupKwargs)
    device = local_device()
    folder = model_folder(config.model.path)
    hidden, checkpoint_dtype = _model_dims(folder, config.model.trust_remote_code)
    trainer = trainer_deepspeed_config()
    dtype = _resolve_dtype(config, checkpoint_dtype, trainer)
    ds_config = build_ds_config(config, hidden, dtype, trainer)
    model_config = dataclasses.replace(config.model, path=str(folder), dtype=dtype, device=str(device))
    with zero3_loading(ds_config), collective("loading the sharded reward model", timeout_s):
        model, tokenizer, _ = load_reward_model(model_config)
    num_outputs = int(model.config.num_labels)
    schema = resolve_schema(config.model.schema, getattr(model.config, "id2label", None), num_outputs)
    with collective("deepspeed.initialize", timeout_s):
        engine, *_ = deepspeed.initialize(model=LastTokenHead(model), config=ds_config)
    engine.eval()
    formatter = RewardFormatter.from_config(tokenizer, config.model)
    backend = ZeroInferenceBackend(engine, tokenizer.pad_token_id, num_outputs, config.batching, device, timeout_s)
    return DeepSpeedAttributeScorer(formatter, backend, schema, model=engine.module.model)
