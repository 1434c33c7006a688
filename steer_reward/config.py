"""Configuration: YAML files and dicts into dataclasses, one dataclass per concern.

Every option is a dataclass field with its documentation right under it. Unknown keys are an error that names the
key and the closest valid one; ``--set a.b=value`` overrides address the same dotted names.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import yaml

from steer_reward.schema import closest

__all__ = [
    "ConfigError",
    "Limit",
    "NUMERIC_LIMITS",
    "check_numbers",
    "check_section_numbers",
    "ModelConfig",
    "BatchingConfig",
    "LengthPenaltyConfig",
    "ShapingConfig",
    "DeepSpeedConfig",
    "RemoteConfig",
    "VllmConfig",
    "ServerConfig",
    "SteerRewardConfig",
    "load_config",
    "apply_overrides",
    "parse_override",
]

BACKENDS = ("local", "deepspeed", "remote", "vllm")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    path: str | None = None
    """Local Hugging Face folder of a ``*ForSequenceClassification`` reward model, or "demo" for the embedded
    random-weight demo model."""
    schema: str = "auto"
    """What the head's outputs mean: "auto", "id2label" (read the checkpoint's labels) or a built-in schema
    ("steerlm9", "armorm19")."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16, float16 or auto (the checkpoint's own)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    template: str = "chat_template"
    """How (prompt, completion) becomes text: chat_template (the RM tokenizer's), steerlm (the <extra_id_*>
    template of SteerLM reward models) or raw (prompt + completion)."""
    system_prompt: str | None = None
    """System turn for the steerlm template; None uses SteerLM's standard system prompt."""
    max_length: int = 4096
    """Longest token sequence the model scores; longer samples follow ``overlong``."""
    overlong: str = "truncate"
    """What every face (library, CLI, TRL, server, OpenRLHF) does with a sample longer than ``max_length``.
    The prompt is cut first, from the left, keeping a leading BOS, down to its last ``max_length // 4`` tokens
    (never to nothing: without its last turn and the assistant header the model would judge a bare text
    fragment); that is reported as ``prompt_truncated``. A completion that still does not fit: ``truncate``
    scores its end (where the score is read), cutting its start, and reports ``completion_truncated`` per
    sample; ``reject`` refuses the sample with an error naming it and its lengths."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own Python code (ArmoRM-style models need it). Off unless asked."""
    allow_pickle: bool = False
    """Allow loading pickle (.bin) weights; safetensors only by default."""
    adapter: str | None = None
    """Folder of a PEFT/LoRA adapter merged into the model at load."""
    device_map: Any = None
    """Spread the model over several devices (Hugging Face/Accelerate ``device_map``): ``auto``, ``balanced``,
    ``sequential`` or {module name: device}, so a model larger than one GPU can be served without vLLM (layers run
    one device after another; no tensor parallelism). Replaces ``device``; needs ``accelerate``; not with
    ``backend: deepspeed`` (ZeRO-3 shards the model itself)."""


@dataclass
class BatchingConfig:
    max_tokens: int = 16384
    """Token budget of one forward; bounds peak memory. Padded micro-batches count rows × longest row; ragged
    forwards count their real tokens plus the prompt keys and values they hold (``planning.kv_token_cost`` each)."""
    max_batch_size: int = 256
    """Most sequences in one forward."""
    strategy: str = "auto"
    """How a batch runs (local and deepspeed backends): ``auto`` (ragged forwards; the prompts several samples share
    run once, in prefill forwards that also carry whole samples, and their completions in completion forwards,
    unless running everything whole is cheaper), ``prefix`` (every prompt shared), ``packed`` (every sample whole in
    ragged forwards, no sharing) or ``padded`` (length-bucketed, right-padded micro-batches). Models ragged forwards
    cannot run exactly (custom code, sliding-window or flash attention, ``dynamic`` or ``longrope`` rotary scaling)
    use ``padded``, with a warning when another strategy was asked for. ``auto`` and ``prefix`` share a prompt
    only where its forwards fit ``max_tokens``."""
    max_row_tokens: int = 2048
    """Token budget of one forward for ``strategy: packed`` (the smaller of this and ``max_tokens``)."""
    forward_overhead_tokens: int = 128
    """Fixed cost of one forward, in tokens, when the planner trades tokens computed against more forwards."""
    prompt_cache_tokens: int = 0
    """Prompt KV caches kept between scoring calls (least recently used dropped first), in prompt tokens, so a
    prompt whose completions arrive in different calls runs once. 0 keeps none; ``steer-reward serve`` uses
    ``server.prompt_cache_tokens``. Memory: 2 · layers · kv_heads · head_dim · dtype bytes per token."""


@dataclass
class LengthPenaltyConfig:
    alpha: float = 0.0
    """Penalty scale: reward −= alpha · max(0, len − target_tokens) / target_tokens. 0 turns it off."""
    target_tokens: int = 512
    """Completion length (tokens) above which the penalty starts."""


@dataclass
class ShapingConfig:
    weights: Any = None
    """A preset name, or {attribute: weight}, optionally with preset: NAME to start from a preset. None uses the
    schema's first preset."""
    bias: float = 0.0
    """Constant added to the weighted sum."""
    decorrelate: dict | None = None
    """{attribute: lambda}: a'_k = a_k − lambda_k · a_verbosity before weighting (ArmoRM's rule)."""
    normalization: str = "none"
    """Per-attribute normalization before weighting: none, running (Welford statistics) or fixed (stats_file)."""
    stats_file: str | None = None
    """JSON/YAML file {attribute: {mean: m, std: s}} for normalization: fixed."""
    update_running_stats: bool = True
    """With running normalization, whether the training faces update the statistics on every call."""
    length_penalty: LengthPenaltyConfig = field(default_factory=LengthPenaltyConfig)
    """Token-length penalty on the completion."""
    reward_normalization: str = "none"
    """Normalization of the final scalar: none or running (Welford over rewards)."""
    clip: list | None = None
    """[lo, hi] to clip the final reward to, or None."""
    eps: float = 1e-6
    """Added to standard deviations before dividing."""


@dataclass
class DeepSpeedConfig:
    config_file: str | None = None
    """A DeepSpeed JSON for ZeRO-3 inference; None builds one (stage 3, no optimizer)."""
    offload_params: bool = False
    """Offload the RM's parameters to CPU memory."""
    timeout_s: float = 1800.0
    """Distributed timeout: a dead rank ends in an error after this long instead of hanging. Applies when the
    backend creates the process group (standalone launch); inside a trainer the trainer's group and its timeout
    are reused."""


@dataclass
class RemoteConfig:
    urls: list = field(default_factory=list)
    """Reward servers (``http://HOST:PORT``), tried round-robin."""
    token: str | None = None
    """Bearer token; None reads token_env."""
    token_env: str = "STEER_REWARD_TOKEN"
    """Environment variable holding the bearer token."""
    timeout_s: float = 180.0
    """Per-request timeout."""
    retries: int = 5
    """Tries per request before giving up with an error."""
    backoff_s: float = 0.5
    """First retry delay; it doubles per try (with jitter, capped at 10 s). A 503's Retry-After is honoured."""
    idle_timeout_s: float = 4.0
    """How long an idle keep-alive connection is kept for reuse. Shorter than the server's
    ``server.keep_alive_s`` (and any proxy's), so the client never sends on a connection the server is closing."""


@dataclass
class VllmConfig:
    tensor_parallel_size: int = 1
    """GPUs one vLLM engine spreads the model over (tensor parallelism; the head is replicated)."""
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory vLLM may take (weights plus KV cache); on vLLM's CPU build, the share of CPU
    memory it reserves."""
    enforce_eager: bool = False
    """Skip CUDA graphs (faster start, slower steps)."""
    engine_args: dict = field(default_factory=dict)
    """Further ``vllm.LLM`` keyword arguments, e.g. {max_num_seqs: 256, enable_prefix_caching: true}."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind; loopback unless opened on purpose."""
    port: int = 8000
    """Port to listen on."""
    max_wait_ms: float = 5.0
    """Longest a request waits for a batch to fill."""
    max_batch_tokens: int = 32768
    """Token budget of one batch across requests."""
    max_queue: int = 4096
    """Pending samples past which requests get 503 with Retry-After."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted."""
    max_items_per_request: int = 1024
    """Most samples in one request."""
    token_env: str = "STEER_REWARD_TOKEN"
    """Environment variable holding the bearer token required by the server (unset: no auth)."""
    prompt_cache_tokens: int = 16384
    """Prompt KV caches the server keeps between batches (LRU, in prompt tokens): OpenRLHF sends each sample
    alone, so the samples of one prompt often land in different batches; with the cache the prompt still runs
    once. 0 keeps none. Overrides ``batching.prompt_cache_tokens`` in the server."""
    actor_tokenizer: str | None = None
    """OpenRLHF faces (``/get_reward``, the ``openrlhf-func`` file): local folder of the actor's (policy's)
    tokenizer. Its own chat template fixes which template family the queries are parsed with, the generation
    prompt and the end tokens; the template is checked at startup. None: the family is recognised from the markup
    of each prompt (Llama-3, ChatML/Qwen, Mistral/Llama-2 ``[INST]``, Gemma, Phi-3, DeepSeek, or plain text)."""
    strip_reasoning: bool = True
    """OpenRLHF faces: score the answer without a leading ``<think>…</think>`` reasoning block (Qwen3, DeepSeek-R1,
    QwQ); a response still inside its reasoning (no ``</think>``) is scored as an empty answer. False scores the
    response exactly as the policy generated it, reasoning included."""
    fallback_reward: float = 0.0
    """OpenRLHF faces: the reward answered for a sample that cannot be scored (unparseable query, formatting
    error, over-long input under ``model.overlong: reject``, non-finite reward), with ``reward_failed`` = 1 in its
    ``extra_logs`` and the failure counted in ``/metrics``. OpenRLHF stops training on any error reply, so a
    failure is never an error status. 0.0 is neutral for normalized rewards; choose a value at the low end of the
    reward range to penalize samples that cannot be scored."""
    fallback_streak_limit: int = 32
    """OpenRLHF faces: consecutive samples whose forward fails (a poison sample, out of memory even alone) that
    are answered with ``fallback_reward``. Past it, with no successful forward in between, the model itself is
    taken for broken: ``/get_reward`` answers 500 and ``/health`` 503, so training stops loudly instead of
    learning from constants."""
    openrlhf_scores: str = "sigmoid"
    """What the OpenRLHF reply's ``scores`` carry. OpenRLHF 0.11 reads ``scores`` only for dynamic filtering
    (``--algo.dynamic_filtering_enable`` keeps a prompt's samples when min < mean score < max, default range
    (0, 1)) and logs them as ``score``; training uses ``rewards`` only. ``sigmoid``: 1 / (1 + exp(−reward)), kept
    within [1e-6, 1 − 1e-6], so the default range keeps every group (to filter, give the range on this scale: it
    is compared with the mean of a group's scores); ``reward``: the reward itself (then give the range in reward
    units: with the default range, every group whose mean reward is outside (0, 1) is dropped)."""
    replicas: int = 0
    """Scoring replicas behind this one URL, on Ray Serve (``pip install 'steer-reward[ray]'``); 0 serves one
    in-process model without Ray. OpenRLHF sends empty lists to every ``--reward.remote_url`` but the first, so
    scale sits behind one URL."""
    min_replicas: int | None = None
    """With ``max_replicas``: Ray Serve autoscales the replicas between the two (starting at ``replicas``) by the
    requests each holds."""
    max_replicas: int | None = None
    """Upper autoscaling limit; see ``min_replicas``."""
    replica_gpus: float = 0.0
    """GPUs each replica holds; with more than one, set ``model.device_map: auto`` to spread the model over them."""
    replica_cpus: float = 1.0
    """CPUs each replica holds (on CPU-only machines also its torch threads)."""
    replica_max_ongoing: int = 256
    """Requests one replica holds at once (Ray Serve's max_ongoing_requests). A prompt whose replica is this full
    goes to the least-loaded other replica."""
    affinity: bool = True
    """Route the samples of one prompt to the same replica, so its prompt cache hits (rendezvous hashing of the
    prompt; least-loaded when that replica is full or gone). False: least-loaded routing only."""
    gateway_replicas: int = 1
    """Gateway replicas that read the prompt of each request and route it (light: no model)."""
    replica_retries: int = 3
    """Tries of a request whose replica died while holding it (Ray Serve replaces the replica)."""
    replica_timeout_s: float = 170.0
    """Longest a gateway waits for a replica's reply, retries included, before answering 503 (under OpenRLHF's
    180 s client timeout, so OpenRLHF retries instead of dropping the reward)."""
    ray_address: str | None = None
    """Ray cluster to join (``auto``, or ``ray://HOST:10001``); None starts a local Ray instance."""
    read_timeout_s: float = 30.0
    """Longest a client may take to send a request's headers (from its first byte, or from the connection's
    opening) and, separately, its body (from the end of the headers). Past it: 408 and the connection is closed,
    so a stalled or slow client cannot hold a connection (or a shutdown) for as long as it likes."""
    keep_alive_s: float = 75.0
    """How long an idle keep-alive connection stays open. Longer than the idle timeout of common clients (httpx
    5 s, aiohttp 15 s, steer-reward's client 4 s), so a client never reuses a connection the server is closing."""
    shutdown_grace_s: float = 20.0
    """On SIGTERM: requests in flight are answered for up to this long; waiting requests still unscored at 3/4
    of it get 503 with Retry-After (clients retry elsewhere); whatever is left at the end is cut."""
    oom_recovery_s: float = 60.0
    """After an out-of-memory error halves the batch token budget, the budget doubles back (up to
    ``max_batch_tokens``) after each such period without another one."""
    stats_warmup_samples: int = 64
    """With running normalization, /get_reward samples are held (up to ``stats_warmup_wait_ms``) until this many
    have been scored, then shaped together with the statistics of all of them; afterwards the statistics update
    once per model batch. 0: no warm-up."""
    stats_warmup_wait_ms: float = 2000.0
    """Longest a /get_reward request is held during the warm-up before the samples held so far are shaped."""
    state_file: str | None = None
    """JSON file holding the running normalization statistics: loaded at start when it exists, written every
    ``state_save_s`` after updates and at shutdown (atomically), so a restarted server continues the statistics."""
    state_save_s: float = 30.0
    """Least time between two writes of ``state_file``."""


@dataclass
class SteerRewardConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The reward model and how text is formatted for it."""
    backend: str = "local"
    """Where the model runs: local, deepspeed (ZeRO-3, colocated), remote (HTTP) or vllm (vLLM's pooling runner)."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """Micro-batch planning."""
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    """Attributes → scalar reward."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Options of backend: deepspeed."""
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    """Options of backend: remote."""
    vllm: VllmConfig = field(default_factory=VllmConfig)
    """Options of backend: vllm."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """Options of ``steer-reward serve``."""

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("model.dtype", self.model.dtype, ("float32", "bfloat16", "float16", "auto"))
        _check_choice("model.template", self.model.template, ("chat_template", "steerlm", "raw"))
        _check_choice("model.overlong", self.model.overlong, ("truncate", "reject"))
        _check_choice("batching.strategy", self.batching.strategy, ("auto", "padded", "prefix", "packed"))
        _check_choice("shaping.normalization", self.shaping.normalization, ("none", "running", "fixed"))
        _check_choice("shaping.reward_normalization", self.shaping.reward_normalization, ("none", "running"))
        if self.shaping.normalization == "fixed" and not self.shaping.stats_file:
            raise ConfigError("shaping.normalization is 'fixed' but shaping.stats_file is not set")
        check_numbers(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Limit:
    """The values a numeric config field accepts: finite, ``lo`` (exclusive when ``lo_open``) to ``hi``."""

    lo: float
    hi: float
    lo_open: bool = False

    def describe(self) -> str:
        if self.lo == 1 or (self.lo == 0 and self.lo_open):
            low = "positive"
        elif self.lo == 0:
            low = "0 or more"
        else:
            low = f"at least {_plain(self.lo)}"
        return f"{low} and at most {_plain(self.hi)}"

    def accepts(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        return math.isfinite(value) and above and value <= self.hi


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _show(value: Any) -> str:
    """A value for an error message, a huge one shortened."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:12]}... ({len(text)} characters)"


MAX_COUNT = 2**31 - 1
"""Largest token, sample, byte or item count accepted (also keeps counts inside int32 tensors)."""
MAX_COEFFICIENT = 1e6
"""Largest magnitude of a shaping coefficient (weight, bias, λ, α): attributes are O(1), so anything larger is a
typo, and products would overflow the float32 rewards."""
MAX_SECONDS = 1e7
"""Longest timeout accepted (about 116 days): larger ones overflow the timers they are handed to."""

NUMERIC_LIMITS: dict[str, Limit] = {
    "model.max_length": Limit(1, MAX_COUNT),
    "batching.max_tokens": Limit(1, MAX_COUNT),
    "batching.max_batch_size": Limit(1, MAX_COUNT),
    "batching.max_row_tokens": Limit(1, MAX_COUNT),
    "batching.forward_overhead_tokens": Limit(0, MAX_COUNT),
    "batching.prompt_cache_tokens": Limit(0, MAX_COUNT),
    "shaping.bias": Limit(-MAX_COEFFICIENT, MAX_COEFFICIENT),
    "shaping.length_penalty.alpha": Limit(-MAX_COEFFICIENT, MAX_COEFFICIENT),  # negative: a length bonus
    "shaping.length_penalty.target_tokens": Limit(1, MAX_COUNT),
    "shaping.eps": Limit(0, 1),
    "deepspeed.timeout_s": Limit(0, MAX_SECONDS, lo_open=True),
    "remote.timeout_s": Limit(0, MAX_SECONDS, lo_open=True),
    "remote.retries": Limit(1, 1000),
    "remote.backoff_s": Limit(0, 3600),
    "remote.idle_timeout_s": Limit(0, MAX_SECONDS, lo_open=True),
    "server.port": Limit(1, 65535),
    "server.max_wait_ms": Limit(0, MAX_SECONDS),
    "server.max_batch_tokens": Limit(1, MAX_COUNT),
    "server.max_queue": Limit(1, MAX_COUNT),
    "server.max_body_bytes": Limit(1, MAX_COUNT),
    "server.max_items_per_request": Limit(1, MAX_COUNT),
    "server.prompt_cache_tokens": Limit(0, MAX_COUNT),
    "server.fallback_reward": Limit(-MAX_COEFFICIENT, MAX_COEFFICIENT),
    "server.fallback_streak_limit": Limit(0, MAX_COUNT),
    "server.read_timeout_s": Limit(0, MAX_SECONDS, lo_open=True),
    "server.keep_alive_s": Limit(0, MAX_SECONDS, lo_open=True),
    "server.shutdown_grace_s": Limit(0, MAX_SECONDS, lo_open=True),
    "server.oom_recovery_s": Limit(0, MAX_SECONDS, lo_open=True),
    "server.stats_warmup_samples": Limit(0, MAX_COUNT),
    "server.stats_warmup_wait_ms": Limit(0, MAX_SECONDS),
    "server.state_save_s": Limit(0, MAX_SECONDS, lo_open=True),
    "server.replicas": Limit(0, MAX_COUNT),
    "server.min_replicas": Limit(0, MAX_COUNT),
    "server.max_replicas": Limit(1, MAX_COUNT),
    "server.replica_gpus": Limit(0, MAX_COUNT),
    "server.replica_cpus": Limit(0, MAX_COUNT),
    "server.replica_max_ongoing": Limit(1, MAX_COUNT),
    "server.gateway_replicas": Limit(1, MAX_COUNT),
    "server.replica_retries": Limit(1, 1000),
    "server.replica_timeout_s": Limit(0, MAX_SECONDS, lo_open=True),
    "vllm.tensor_parallel_size": Limit(1, 1024),
    "vllm.gpu_memory_utilization": Limit(0, 1, lo_open=True),
}
"""Range of every numeric field by dotted key (tests check every int/float field has an entry). A numeric field
missing here must still be finite, 0 or more and at most ``MAX_COUNT``."""
DEFAULT_LIMIT = Limit(0, MAX_COUNT)

COEFFICIENT_MAPS = {"shaping.weights": Limit(-MAX_COEFFICIENT, MAX_COEFFICIENT),
                    "shaping.decorrelate": Limit(-MAX_COEFFICIENT, MAX_COEFFICIENT)}
"""Mapping fields whose values are numbers: {attribute: coefficient}."""


def _number(key: str, value: Any, limit: Limit) -> float:
    """``value`` as a float within ``limit``, or a ``ConfigError`` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {_show(value)}")
    if not limit.accepts(number):
        raise ConfigError(f"{key} must be {limit.describe()}, got {_show(value)}")
    return number


def _numeric_fields(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, type) of every int/float field of a config dataclass, nested sections included."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        tp, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(value, f"{key}.")
        elif tp in (int, float) and value is not None:
            yield key, value, tp


def check_section_numbers(section: Any, prefix: str) -> None:
    """``check_numbers`` for one section built on its own (``ServerConfig(...)``), keys under ``prefix``."""
    for key, value, _ in _numeric_fields(section, f"{prefix}."):
        _number(key, value, NUMERIC_LIMITS.get(key, DEFAULT_LIMIT))


def check_numbers(config: "SteerRewardConfig") -> None:
    """Every numeric field finite and in range (``NUMERIC_LIMITS``), every coefficient of ``shaping.weights`` /
    ``shaping.decorrelate`` a finite number, ``shaping.clip`` two numbers with lo < hi (±inf allowed: one-sided).
    A NaN weight or λ would make every reward NaN, silently."""
    for key, value, _ in _numeric_fields(config):
        _number(key, value, NUMERIC_LIMITS.get(key, DEFAULT_LIMIT))
    for key, limit in COEFFICIENT_MAPS.items():
        section, name = key.split(".")
        mapping = getattr(getattr(config, section), name)
        if isinstance(mapping, Mapping):
            for attribute, value in mapping.items():
                if not (key == "shaping.weights" and attribute == "preset"):
                    _number(f"{key}.{attribute}", value, limit)
    clip = config.shaping.clip
    if clip is not None:
        if len(clip) != 2:
            raise ConfigError(f"shaping.clip must be [lo, hi], got {clip!r}")
        bounds = []
        for i, value in enumerate(clip):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"shaping.clip[{i}] must be a number (.inf for no bound), got {value!r}")
            bounds.append(float(value))
        if not bounds[0] < bounds[1]:
            raise ConfigError(f"shaping.clip must be [lo, hi] with lo < hi, got {clip!r}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}{closest(value, choices)}")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else Any), optional
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key} may not be null")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    base = typing.get_origin(tp) or tp
    if base is Any:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if base in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {_show(value)}")
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{key} must be an integer, got {value!r}")
            return int(value)  # ranges: check_numbers
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            raise ConfigError(f"{key} must be a finite number, got {_show(value)}") from None
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if base is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return list(value)
    if base is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in valid:
            raise ConfigError(f"unknown config key {dotted!r}{closest(str(key), valid)}; valid keys here: {valid}")
        kwargs[key] = _coerce(dotted, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"shaping.weights.verbosity=-1.0"`` → ``("shaping.weights.verbosity", -1.0)``; values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({err})") from None
    return key.strip(), value


def apply_overrides(data: Mapping, overrides: Mapping[str, Any] | None) -> dict:
    """A copy of the raw config ``data`` with dotted-key ``overrides`` applied.

    Overriding one attribute of a preset-named ``shaping.weights`` keeps the preset's other weights.
    """
    result = copy.deepcopy(dict(data))
    for dotted, value in (overrides or {}).items():
        parts = dotted.split(".")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if isinstance(child, str) and ".".join(parts[: depth + 1]) == "shaping.weights":
                child = {"preset": child}
            elif child is None and ".".join(parts[: depth + 1]) == "shaping.weights":
                child = {}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node[part] = child
            node = child
        node[parts[-1]] = value
    return result


def load_config(source: str | Path | Mapping | SteerRewardConfig | None = None,
                overrides: Mapping[str, Any] | None = None) -> SteerRewardConfig:
    """A ``SteerRewardConfig`` from a YAML path, a dict or a config, with dotted ``overrides`` applied.

    >>> load_config({"shaping": {"weights": "helpfulness"}}).shaping.weights
    'helpfulness'
    """
    if isinstance(source, SteerRewardConfig):
        source = source.to_dict()
    if source is None:
        data: Mapping = {}
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    elif isinstance(source, Mapping):
        data = source
    else:
        raise ConfigError(f"config must be a YAML path or a mapping, got {type(source).__name__}")
    return _build(SteerRewardConfig, apply_overrides(data, overrides))
