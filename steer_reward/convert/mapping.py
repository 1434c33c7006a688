"""Megatron-Core GPT reward model tensors → ``LlamaForSequenceClassification`` tensors, as a plan of steps.

The mapping is NeMo's own (``scripts/checkpoint_converters/convert_llama_nemo_to_hf.py``):

- ``linear_qkv.weight`` ``[(heads + 2·groups)·head_dim, hidden]`` is laid out per query group as
  ``[q × heads/groups, k, v]`` (each ``head_dim`` rows): viewed as ``[groups, heads/groups + 2, head_dim, hidden]``
  it splits into q/k/v without any RoPE permutation (Megatron and HF Llama both rotate halves);
- ``linear_fc1`` = ``[gate; up]``, ``linear_fc2`` → ``down_proj``, ``linear_proj`` → ``o_proj``;
- ``linear_qkv.layer_norm_weight`` (or ``input_layernorm.weight``) → ``input_layernorm``,
  ``linear_fc1.layer_norm_weight`` (or ``pre_mlp_layernorm.weight``) → ``post_attention_layernorm``;
- the embedding loses Megatron's vocabulary padding, ``output_layer`` (the language-model head) is dropped,
  ``rm_head.weight`` / ``rm_head.bias`` → ``score.weight`` / ``score.bias``.

Every tensor in the checkpoint is accounted for: it is mapped, or it is the dropped ``output_layer`` or an
``_extra_state``; anything else is an error, as is any shape that disagrees with ``model_config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from steer_reward.convert.formats import TensorInfo, WeightReader, is_ignored_key
from steer_reward.convert.nemo_config import NemoModelConfig
from steer_reward.convert.source import NemoCheckpointError

__all__ = ["OutputTensor", "ConversionStep", "ConversionPlan", "plan_conversion", "HEAD_KEYS"]

HEAD_KEYS = ("model.rm_head.weight", "model.rm_head.bias")
_INPUT_NORM = ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
_POST_NORM = ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
_DROPPED = ("model.output_layer.weight", "model.output_layer.bias")


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]


@dataclass
class ConversionStep:
    """One source read (a tensor, or one layer of a stacked tensor) and the output tensors made from it."""

    label: str
    outputs: list[OutputTensor]
    run: Callable[[], list[torch.Tensor]]
    """Reads the source and returns the outputs in ``outputs`` order (views of the read tensor where possible)."""
    source_bytes: int


@dataclass
class ConversionPlan:
    steps: list[ConversionStep]
    num_labels: int
    embedding_rows: int
    """Rows of the checkpoint's (padded) embedding."""
    dropped: list[str] = field(default_factory=list)
    """Source tensors deliberately not converted (the language-model output layer)."""

    @property
    def outputs(self) -> list[OutputTensor]:
        return [o for step in self.steps for o in step.outputs]

    @property
    def largest_source_bytes(self) -> int:
        return max(step.source_bytes for step in self.steps)


class _Layers:
    """Finds a layer's tensor whether the checkpoint stacks layers (``layers.<name>`` with a leading layer axis)
    or keeps one key per layer (``layers.<i>.<name>``)."""

    def __init__(self, reader: WeightReader, num_layers: int) -> None:
        self.reader = reader
        self.num_layers = num_layers
        self.used: set[str] = set()

    def find(self, names: tuple[str, ...], layer: int) -> tuple[str, int | None, TensorInfo] | None:
        for name in names:
            per_layer = f"model.decoder.layers.{layer}.{name}"
            if per_layer in self.reader.tensors:
                self.used.add(per_layer)
                return per_layer, None, self.reader.tensors[per_layer]
            stacked = f"model.decoder.layers.{name}"
            if stacked in self.reader.tensors:
                info = self.reader.tensors[stacked]
                if not info.shape or info.shape[0] != self.num_layers:
                    raise NemoCheckpointError(f"config/tensor shape mismatch: {stacked} stacks {info.shape[:1]} layers "
                                              f"but model_config.yaml has num_layers {self.num_layers}")
                self.used.add(stacked)
                return stacked, layer, TensorInfo(info.shape[1:], info.dtype)
        return None


def _expect(key: str, info: TensorInfo, shape: tuple[int, ...]) -> None:
    if tuple(info.shape) != tuple(shape):
        raise NemoCheckpointError(f"config/tensor shape mismatch: {key} has shape {tuple(info.shape)}, "
                                  f"model_config.yaml implies {tuple(shape)}")


def plan_conversion(reader: WeightReader, cfg: NemoModelConfig, vocab_size: int | None,
                    extra_rows: int = 0) -> ConversionPlan:
    """The steps that turn ``reader``'s tensors into the HF model's, checked against ``cfg``.

    ``vocab_size``: tokenizer length the embedding is trimmed to (None: keep every row, for inspection).
    ``extra_rows``: zero rows appended after it (a pad token added to the tokenizer).
    """
    tensors = reader.tensors
    hidden, heads, groups, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    hpg, ffn = cfg.heads_per_group, cfg.ffn_hidden_size
    for key in HEAD_KEYS[:1]:
        if key not in tensors:
            raise NemoCheckpointError(
                "no rm_head in the checkpoint: this is a language model, not a NeMo reward model (a reward model "
                "holds model.rm_head.weight and model.rm_head.bias)")
    if HEAD_KEYS[1] not in tensors:
        raise NemoCheckpointError("missing tensors: model.rm_head.bias (NeMo-Aligner's reward head always has one)")
    head_w, head_b = tensors[HEAD_KEYS[0]], tensors[HEAD_KEYS[1]]
    if len(head_w.shape) != 2 or head_w.shape[1] != hidden:
        raise NemoCheckpointError(f"config/tensor shape mismatch: model.rm_head.weight has shape {head_w.shape}, "
                                  f"expected (num_attributes, {hidden})")
    num_labels = head_w.shape[0]
    if cfg.num_attributes is not None and cfg.num_attributes != num_labels:
        raise NemoCheckpointError(f"config/tensor shape mismatch: regression.num_attributes is {cfg.num_attributes} "
                                  f"but model.rm_head.weight has {num_labels} rows")
    _expect(HEAD_KEYS[1], head_b, (num_labels,))

    emb_key = "model.embedding.word_embeddings.weight"
    if emb_key not in tensors:
        raise NemoCheckpointError(f"missing tensors: {emb_key}")
    emb = tensors[emb_key]
    if len(emb.shape) != 2 or emb.shape[1] != hidden:
        raise NemoCheckpointError(f"config/tensor shape mismatch: {emb_key} has shape {emb.shape}, "
                                  f"expected (vocab, {hidden})")
    rows = emb.shape[0]
    keep = rows if vocab_size is None else vocab_size
    if keep > rows:
        raise NemoCheckpointError(f"the tokenizer has {keep} tokens but the embedding has only {rows} rows: "
                                  "this is not the tokenizer the model was trained with")
    margin = cfg.make_vocab_size_divisible_by * cfg.tensor_parallel
    if rows - keep >= max(margin, 1) and vocab_size is not None:
        raise NemoCheckpointError(
            f"the tokenizer has {keep} tokens but the embedding has {rows} rows, more than Megatron's padding "
            f"(to a multiple of make_vocab_size_divisible_by × TP = {margin}) explains: wrong tokenizer?")

    steps: list[ConversionStep] = []

    def read(key: str, index: int | None) -> torch.Tensor:
        return reader.read(key, index)

    def add(label: str, outputs: list[tuple[str, tuple]], run: Callable, info: TensorInfo) -> None:
        steps.append(ConversionStep(label, [OutputTensor(n, tuple(s)) for n, s in outputs], run, info.nbytes))

    def embed_run() -> list[torch.Tensor]:
        weight = read(emb_key, None)[:keep]
        if extra_rows:
            weight = torch.cat([weight, weight.new_zeros(extra_rows, hidden)])
        return [weight]

    add("embedding", [("model.embed_tokens.weight", (keep + extra_rows, hidden))], embed_run, emb)

    layers = _Layers(reader, cfg.num_layers)
    qkv_rows = (heads + 2 * groups) * hd
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}"

        def need(names: tuple[str, ...], shape: tuple, optional: bool = False):
            found = layers.find(names, layer)
            if found is None:
                if optional:
                    return None
                raise NemoCheckpointError(f"missing tensors: layer {layer} has no {' / '.join(names)}")
            key, index, info = found
            _expect(f"{key}[{layer}]" if index is not None else key, info, shape)
            return key, index, info

        def simple(found, name: str):
            key, index, info = found
            add(f"layer {layer} {name}", [(f"{prefix}.{name}", info.shape)], lambda k=key, i=index: [read(k, i)],
                info)

        def qkv_run(key, index, bias):
            fused = read(key, index)
            view = fused.view(groups, hpg + 2, hd, *([hidden] if not bias else []))
            tail = () if bias else (hidden,)
            return [view[:, :hpg].reshape(heads * hd, *tail), view[:, hpg].reshape(groups * hd, *tail),
                    view[:, hpg + 1].reshape(groups * hd, *tail)]

        def qkv(found, bias: bool):
            key, index, info = found
            suffix = "bias" if bias else "weight"
            tail = () if bias else (hidden,)
            outputs = [(f"{prefix}.self_attn.{p}_proj.{suffix}", (n * hd, *tail))
                       for p, n in (("q", heads), ("k", groups), ("v", groups))]
            add(f"layer {layer} qkv {suffix}", outputs, lambda k=key, i=index, b=bias: qkv_run(k, i, b), info)

        def fc1(found, bias: bool):
            key, index, info = found
            suffix = "bias" if bias else "weight"
            tail = () if bias else (hidden,)
            outputs = [(f"{prefix}.mlp.{p}_proj.{suffix}", (ffn, *tail)) for p in ("gate", "up")]
            add(f"layer {layer} fc1 {suffix}", outputs, lambda k=key, i=index: list(read(k, i).chunk(2, dim=0)), info)

        simple(need(_INPUT_NORM, (hidden,)), "input_layernorm.weight")
        qkv(need(("self_attention.linear_qkv.weight",), (qkv_rows, hidden)), bias=False)
        simple(need(("self_attention.linear_proj.weight",), (hidden, heads * hd)), "self_attn.o_proj.weight")
        simple(need(_POST_NORM, (hidden,)), "post_attention_layernorm.weight")
        fc1(need(("mlp.linear_fc1.weight",), (2 * ffn, hidden)), bias=False)
        simple(need(("mlp.linear_fc2.weight",), (hidden, ffn)), "mlp.down_proj.weight")
        if cfg.bias:
            qkv(need(("self_attention.linear_qkv.bias",), (qkv_rows,)), bias=True)
            simple(need(("self_attention.linear_proj.bias",), (hidden,)), "self_attn.o_proj.bias")
            fc1(need(("mlp.linear_fc1.bias",), (2 * ffn,)), bias=True)
            simple(need(("mlp.linear_fc2.bias",), (hidden,)), "mlp.down_proj.bias")

    norm_key = "model.decoder.final_layernorm.weight"
    if norm_key not in tensors:
        raise NemoCheckpointError(f"missing tensors: {norm_key}")
    _expect(norm_key, tensors[norm_key], (hidden,))
    add("final norm", [("model.norm.weight", (hidden,))], lambda: [read(norm_key, None)], tensors[norm_key])
    add("reward head weight", [("score.weight", (num_labels, hidden))], lambda: [read(HEAD_KEYS[0], None)], head_w)
    add("reward head bias", [("score.bias", (num_labels,))], lambda: [read(HEAD_KEYS[1], None)], head_b)

    used = layers.used | {emb_key, norm_key, *HEAD_KEYS}
    dropped = [k for k in tensors if k in _DROPPED]
    unmapped = sorted(k for k in tensors if k not in used and k not in dropped and not is_ignored_key(k))
    if unmapped:
        hint = ""
        if any(k.endswith("bias") for k in unmapped) and not cfg.bias:
            hint = " (biases in the checkpoint but model_config.yaml has bias: false)"
        raise NemoCheckpointError(f"config/tensor mismatch: {len(unmapped)} tensor(s) have no counterpart in a Llama "
                                  f"model: {', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}{hint}")
    return ConversionPlan(steps, num_labels, rows, dropped)
