"""``inspect_nemo``: what a NeMo checkpoint holds and what converting it takes, without reading any weights."""

from __future__ import annotations

import os
from dataclasses import dataclass

from steer_reward.convert.formats import TensorInfo, is_ignored_key, open_weights
from steer_reward.convert.mapping import plan_conversion
from steer_reward.convert.nemo_config import NemoModelConfig, read_nemo_config
from steer_reward.convert.source import open_source

__all__ = ["CheckpointReport", "inspect_nemo", "MEMORY_FACTOR"]

MEMORY_FACTOR = 3
"""Peak conversion memory ≈ this × the largest source tensor (read buffer, dtype cast, split copy); measured
below that on the synthetic benchmark (``benchmarks/convert_memory.py``)."""


@dataclass
class CheckpointReport:
    location: str
    format: str
    config: NemoModelConfig
    tensors: dict[str, TensorInfo]
    parameters: int
    """Parameters the converted model will have (padding rows and the dropped output layer excluded when the
    vocabulary is unknown: here the embedding counts its padded rows)."""
    checkpoint_bytes: int
    largest_tensor: tuple[str, int]
    num_labels: int
    problem: str | None
    """Why conversion would fail, when the tensors disagree with the config (None: they agree)."""

    @property
    def memory_needed(self) -> int:
        return MEMORY_FACTOR * self.largest_tensor[1]

    def text(self) -> str:
        c = self.config
        lines = [
            f"checkpoint: {self.location}",
            f"weight format: {self.format}",
            f"reward model: {c.reward_model_type or 'unspecified'}, {self.num_labels} outputs"
            + (" (merge_attributes: true in NeMo; converted raw)" if c.merge_attributes else ""),
            f"architecture: {c.num_layers} layers, hidden {c.hidden_size}, ffn {c.ffn_hidden_size}, "
            f"{c.num_attention_heads} heads / {c.num_query_groups} query groups, head_dim {c.head_dim}, "
            f"rope base {c.rotary_base:g}" + (f", rope scaling {c.rope_scaling}" if c.rope_scaling else "")
            + f", rmsnorm eps {c.layernorm_epsilon:g}, bias {c.bias}",
            f"trained with tensor parallel {c.tensor_parallel}, pipeline parallel {c.pipeline_parallel}, "
            f"vocab padded to a multiple of {c.make_vocab_size_divisible_by} x TP",
            f"tokenizer: {c.tokenizer.get('library', '?')} {c.tokenizer.get('type') or c.tokenizer.get('model') or ''}",
            f"parameters: {self.parameters:,} ({_gb(self.parameters * 2)} in bf16, {_gb(self.parameters * 4)} in fp32)",
            f"stored tensors: {_gb(self.checkpoint_bytes)}; largest: {self.largest_tensor[0]} "
            f"({_gb(self.largest_tensor[1])})",
            f"conversion memory: about {_gb(self.memory_needed)} ({MEMORY_FACTOR} x the largest tensor or layer "
            "slice read at once)",
            "conversion: " + (f"NOT possible: {self.problem}" if self.problem else "all tensors map to Llama"),
            "tensors:",
        ]
        for key, info in sorted(self.tensors.items()):
            lines.append(f"  {key}  {list(info.shape)}  {str(info.dtype).replace('torch.', '')}")
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def inspect_nemo(src: str | os.PathLike) -> CheckpointReport:
    """Format, config, tensors (shapes, dtypes), parameter count and conversion memory of the checkpoint at
    ``src``. Reads ``model_config.yaml`` and the weight index only."""
    from steer_reward.convert.source import NemoCheckpointError

    with open_source(src) as source:
        cfg = read_nemo_config(source)
        reader = open_weights(source, cfg.tensor_parallel, cfg.pipeline_parallel)
        try:
            tensors = dict(reader.tensors)
            problem, parameters, num_labels = None, 0, 0
            try:
                plan = plan_conversion(reader, cfg, vocab_size=None)
                parameters = sum(_numel(o.shape) for o in plan.outputs)
                num_labels = plan.num_labels
                largest = max(((s.label, s.source_bytes) for s in plan.steps), key=lambda x: x[1])
            except NemoCheckpointError as err:
                problem = str(err)
                largest = max(((k, i.nbytes) for k, i in tensors.items()), key=lambda x: x[1], default=("-", 0))
            stored = sum(i.nbytes for k, i in tensors.items() if not is_ignored_key(k))
            return CheckpointReport(str(src), reader.describe(), cfg, tensors, parameters, stored, largest,
                                    num_labels, problem)
        finally:
            reader.close()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
