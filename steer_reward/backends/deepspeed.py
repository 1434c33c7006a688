"""The colocated ZeRO-3 backend: the reward model sharded across the training ranks, never a hang.

What ZeRO-3 inference needs (DESIGN.md, "DeepSpeed ZeRO-3", verified on CPU with gloo):

- the model is loaded already partitioned (``HfDeepSpeedConfig`` active during ``from_pretrained``), wrapped by
  ``deepspeed.initialize`` with a stage-3 config that has no optimizer, int bucket sizes nested under
  ``zero_optimization`` (TRL's ``prepare_deepspeed`` writes dotted top-level keys DeepSpeed ignores), and no
  ``"auto"`` values;
- parameters are gathered by forward hooks, so the forward goes through the engine: the engine's module is
  ``LastTokenHead``, which reads the head at each sequence's last real token (the local backend's head path);
- every forward is a collective: ranks agree on the micro-batch count (all-reduce MAX) and short ranks, including
  ranks with no samples at all, run dummy micro-batches whose results are discarded.

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
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from steer_reward.config import BatchingConfig, ConfigError, SteerRewardConfig
from steer_reward.distributed import (RankMomentsSync, all_reduce_max, collective, ensure_process_group,
                                      local_device, skip_cpu_shm_build)
from steer_reward.formatting import EncodedSample, RewardFormatter
from steer_reward.forward import find_head, pad_right, pool_last_token, read_outputs
from steer_reward.planning import plan_microbatches
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
    gather every parameter (backbone and head) during the engine's forward. Models without a standard head
    (custom code) run their own forward. Output ``.logits`` shape: ``(b, K)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._head = find_head(model)

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        if self._head is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        return SequenceClassifierOutput(logits=pool_last_token(self._head, input_ids, attention_mask))


class ZeroInferenceBackend:
    """Scores encoded samples with a ZeRO-3 engine; a collective on every call.

    ``forward_calls`` counts real micro-batches, ``dummy_calls`` the discarded ones run to match other ranks.
    """

    def __init__(self, engine: Any, pad_id: int, num_outputs: int, batching: BatchingConfig | None = None,
                 device: torch.device | str = "cpu", timeout_s: float | None = None) -> None:
        self.engine = engine
        self.pad_id = int(pad_id)
        self.num_outputs = int(num_outputs)
        self.batching = batching or BatchingConfig()
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.forward_calls = 0
        self.dummy_calls = 0

    def plan(self, samples: Sequence[EncodedSample]) -> list[list[int]]:
        return plan_microbatches([len(s) for s in samples], self.batching.max_tokens, self.batching.max_batch_size)

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

    def attributes(self, samples: Sequence[EncodedSample]) -> torch.Tensor:
        """Attributes of every sample, in input order. Shape: ``(n, K)``, float32 on CPU.

        Every rank runs the same number of forwards (DESIGN.md: unequal counts hang ZeRO-3), so a rank with fewer
        micro-batches, or none, runs one-token dummy batches until all ranks are done.
        """
        plan = self.plan(samples)
        rounds = all_reduce_max(len(plan), self.device, self.timeout_s)
        out = torch.empty((len(samples), self.num_outputs), dtype=torch.float32)
        for batch in plan:
            out[batch] = self.run_microbatch([samples[i].input_ids for i in batch]).cpu()
            self.forward_calls += 1
        for _ in range(rounds - len(plan)):
            self.run_microbatch([(self.pad_id,)])
            self.dummy_calls += 1
        return out

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


def padded_strategy_note(batching: BatchingConfig) -> str | None:
    """A warning when ``batching.strategy`` asks for a fast path this backend does not run (it runs padded
    length-sorted micro-batches only: prefix sharing and packing are local-backend strategies)."""
    strategy = getattr(batching, "strategy", "auto")
    if strategy in ("auto", "padded"):
        return None
    return (f"batching.strategy: {strategy!r} is not available with backend: deepspeed; ZeRO-3 scoring runs padded "
            "length-sorted micro-batches")


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

    note = padded_strategy_note(config.batching)
    if note:
        warnings.warn(note, stacklevel=2)
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
