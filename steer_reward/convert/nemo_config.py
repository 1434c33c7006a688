"""``model_config.yaml`` of a NeMo GPT reward model → the checked facts a conversion needs → a Hugging Face
``LlamaConfig``.

Defaults follow NeMo's own (``MegatronBaseModel.build_transformer_config``: a missing ``bias`` means biases,
``activation`` defaults to gelu, ``normalization`` to LayerNorm, ``position_embedding_type`` to learned absolute),
so a key left out is read the way NeMo read it. Everything a Llama config cannot express exactly is refused with
the key that says so: a converted reward model that scores differently from NeMo would be silently wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from steer_reward.convert.source import CONFIG_NAME, CheckpointSource, NemoCheckpointError

__all__ = ["NemoModelConfig", "read_nemo_config", "parse_nemo_config", "padded_vocab_size"]

_INTERPOLATION = re.compile(r"^\$\{\.?(?:model\.)?([A-Za-z0-9_]+)\}$")

# Keys whose non-default value changes the network in a way a Llama config cannot express.
_REFUSED_IF_TRUE = {
    "apply_embedding_scaling": "embeddings scaled by sqrt(hidden) (Gemma-style)",
    "qk_layernorm": "layer norms on queries and keys",
    "multi_latent_attention": "multi-latent attention",
    "rotary_interleaved": "interleaved rotary embeddings (HF Llama rotates halves)",
    "layernorm_zero_centered_gamma": "zero-centered norm weights",
    "apply_residual_connection_post_layernorm": "residuals taken after the norm",
    "use_avg_pool": "average pooling over the sequence (HF sequence classification reads the last token)",
    "output_sequence": "one output per token (a critic, not a reward model)",
}


@dataclass
class NemoModelConfig:
    """What the conversion reads from ``model_config.yaml``, with NeMo's defaults applied."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    """``kv_channels``, or hidden_size / num_attention_heads when null (NeMo's rule)."""
    rotary_base: float
    rope_scaling: dict | None
    """Hugging Face ``rope_parameters`` beyond the base: Llama-3.1 (``scale_positional_embedding``) or linear
    (``seq_len_interpolation_factor``); None for plain RoPE."""
    layernorm_epsilon: float
    bias: bool
    """Biases in every linear layer (Megatron's ``add_bias_linear``, NeMo key ``bias``)."""
    max_position_embeddings: int
    make_vocab_size_divisible_by: int
    tensor_parallel: int
    pipeline_parallel: int
    reward_model_type: str | None
    num_attributes: int | None
    merge_attributes: bool = False
    attribute_weights: list | None = None
    tokenizer: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def hf_config(self, vocab_size: int, num_labels: int, dtype: str, **extra: Any) -> Any:
        """The ``LlamaConfig`` of the converted ``LlamaForSequenceClassification``."""
        from transformers import LlamaConfig

        rope = {"rope_type": "default", "rope_theta": float(self.rotary_base)}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.layernorm_epsilon,
            rope_parameters=rope, attention_bias=self.bias, mlp_bias=self.bias, hidden_act="silu",
            tie_word_embeddings=False, num_labels=num_labels, architectures=["LlamaForSequenceClassification"],
            dtype=dtype, **extra,
        )


def _resolve(raw: Mapping[str, Any], value: Any, depth: int = 0) -> Any:
    """Resolve NeMo's simple ``${.key}`` / ``${model.key}`` interpolations between top-level keys."""
    if isinstance(value, str) and depth < 8:
        match = _INTERPOLATION.match(value.strip())
        if match and match.group(1) in raw:
            return _resolve(raw, raw[match.group(1)], depth + 1)
    return value


def _get(raw: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return _resolve(raw, raw.get(key, default))


def _int(raw: Mapping[str, Any], key: str, default: Any = None, required: bool = True) -> int | None:
    value = _get(raw, key, default)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value <= 0:
        raise NemoCheckpointError(f"{CONFIG_NAME}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _float(raw: Mapping[str, Any], key: str, default: Any) -> float:
    value = _get(raw, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NemoCheckpointError(f"{CONFIG_NAME}: {key} must be a number, got {value!r}")
    return float(value)


def _rope_scaling(raw: Mapping[str, Any]) -> dict | None:
    if _get(raw, "scale_positional_embedding", False):
        if _get(raw, "seq_len_interpolation_factor") not in (None, 1, 1.0):
            raise NemoCheckpointError(f"{CONFIG_NAME}: both scale_positional_embedding and "
                                      "seq_len_interpolation_factor are set; NeMo applies both, Llama configs only one")
        # NeMo's apply_rope_scaling (nemo/collections/common/parts/utils.py) with NeMo's defaults is the
        # Llama-3.1 rule Hugging Face calls rope_type "llama3".
        return {"rope_type": "llama3", "factor": _float(raw, "scale_factor", 8),
                "low_freq_factor": _float(raw, "low_freq_factor", 1),
                "high_freq_factor": _float(raw, "high_freq_factor", 4),
                "original_max_position_embeddings": _int(raw, "old_context_len", 8192)}
    factor = _get(raw, "seq_len_interpolation_factor")
    if factor not in (None, 1, 1.0):
        # Megatron's RotaryEmbedding divides positions by the factor: HF's linear scaling.
        return {"rope_type": "linear", "factor": float(factor)}
    return None


def parse_nemo_config(raw: Mapping[str, Any]) -> NemoModelConfig:
    """Check ``raw`` (the YAML mapping) and read it; refuses what a Llama config cannot express exactly."""
    if not isinstance(raw, Mapping):
        raise NemoCheckpointError(f"{CONFIG_NAME} is not a mapping of model settings")
    if "model" in raw and "num_layers" not in raw and isinstance(raw["model"], Mapping):
        raw = raw["model"]  # a training config with the model section nested
    if not _get(raw, "mcore_gpt", True):
        raise NemoCheckpointError(f"{CONFIG_NAME}: mcore_gpt is false: this is a pre-Megatron-Core NeMo GPT "
                                  "checkpoint, whose tensor names this converter does not read")
    position = str(_get(raw, "position_embedding_type", "learned_absolute"))
    if position != "rope":
        raise NemoCheckpointError(f"{CONFIG_NAME}: position_embedding_type is {position!r}; only rope maps to Llama")
    if _float(raw, "rotary_percentage", 1.0) != 1.0:
        raise NemoCheckpointError(f"{CONFIG_NAME}: rotary_percentage is {_get(raw, 'rotary_percentage')}; "
                                  "Llama rotates every channel (1.0)")
    normalization = str(_get(raw, "normalization", "LayerNorm")).lower()
    if normalization != "rmsnorm":
        raise NemoCheckpointError(f"{CONFIG_NAME}: normalization is {_get(raw, 'normalization', 'LayerNorm')!r}; "
                                  "Llama uses RMSNorm, a LayerNorm model cannot be converted exactly")
    activation = str(_get(raw, "activation", "gelu"))
    if activation not in ("swiglu", "fast-swiglu"):
        raise NemoCheckpointError(f"{CONFIG_NAME}: activation is {activation!r}; Llama's MLP is SwiGLU "
                                  "(swiglu / fast-swiglu)")
    for key, what in _REFUSED_IF_TRUE.items():
        if _get(raw, key, False):
            raise NemoCheckpointError(f"{CONFIG_NAME}: {key} is set ({what}); a Llama config cannot express it")
    if _get(raw, "num_moe_experts") not in (None, 0, 1):
        raise NemoCheckpointError(f"{CONFIG_NAME}: num_moe_experts is {_get(raw, 'num_moe_experts')!r}; only dense "
                                  "models convert to Llama")
    if _get(raw, "window_size"):
        raise NemoCheckpointError(f"{CONFIG_NAME}: window_size is {_get(raw, 'window_size')!r}; sliding-window "
                                  "attention does not convert to Llama")
    bias = bool(_get(raw, "bias", True))
    if _get(raw, "qkv_bias", False) and not bias:
        raise NemoCheckpointError(f"{CONFIG_NAME}: qkv_bias without bias: Llama's attention_bias also biases "
                                  "o_proj, so query/key/value-only biases cannot be expressed")
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    groups = _int(raw, "num_query_groups", heads, required=False) or heads
    if heads % groups:
        raise NemoCheckpointError(f"{CONFIG_NAME}: num_attention_heads {heads} is not a multiple of "
                                  f"num_query_groups {groups}")
    head_dim = _int(raw, "kv_channels", None, required=False)
    if head_dim is None:
        if hidden % heads:
            raise NemoCheckpointError(f"{CONFIG_NAME}: kv_channels is null and hidden_size {hidden} is not a "
                                      f"multiple of num_attention_heads {heads}")
        head_dim = hidden // heads
    regression = _get(raw, "regression") or {}
    num_attributes = regression.get("num_attributes") if isinstance(regression, Mapping) else None
    seq = _int(raw, "max_position_embeddings", None, required=False) or _int(raw, "encoder_seq_length", 4096)
    tokenizer = _get(raw, "tokenizer") or {}
    return NemoModelConfig(
        num_layers=_int(raw, "num_layers"), hidden_size=hidden, ffn_hidden_size=_int(raw, "ffn_hidden_size"),
        num_attention_heads=heads, num_query_groups=groups, head_dim=head_dim,
        rotary_base=_float(raw, "rotary_base", 10000), rope_scaling=_rope_scaling(raw),
        layernorm_epsilon=_float(raw, "layernorm_epsilon", 1e-5), bias=bias, max_position_embeddings=seq,
        make_vocab_size_divisible_by=_int(raw, "make_vocab_size_divisible_by", 128),
        tensor_parallel=_int(raw, "tensor_model_parallel_size", 1),
        pipeline_parallel=_int(raw, "pipeline_model_parallel_size", 1),
        reward_model_type=_get(raw, "reward_model_type"),
        num_attributes=int(num_attributes) if isinstance(num_attributes, int) else None,
        merge_attributes=bool(regression.get("merge_attributes", False)) if isinstance(regression, Mapping) else False,
        attribute_weights=regression.get("attribute_weights") if isinstance(regression, Mapping) else None,
        tokenizer=dict(tokenizer) if isinstance(tokenizer, Mapping) else {},
        raw=dict(raw),
    )


def read_nemo_config(source: CheckpointSource) -> NemoModelConfig:
    try:
        raw = yaml.safe_load(source.read_text(CONFIG_NAME))
    except yaml.YAMLError as err:
        raise NemoCheckpointError(f"{source.location}/{CONFIG_NAME} is not valid YAML ({err})") from None
    return parse_nemo_config(raw)


def padded_vocab_size(vocab: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's vocabulary padding (NeMo ``_vocab_size_with_padding``): up to a multiple of divisible_by × TP."""
    multiple = divisible_by * tensor_parallel
    return ((vocab + multiple - 1) // multiple) * multiple
