"""Named model shapes: random-weight Llama reward models built from a config with a fixed seed (no download).

``shape:NAME`` on the bench command line builds one of these. Only the shape matters for speed; the weights are
seeded so two runs (and the paths compared within one run) see the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelShape", "SHAPES", "build_shape_model", "non_embedding_params"]


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    description: str


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(64, 176, 2, 4, 2, 512, "2 layers, d=64: for tests"),
    "cpu-30m": ModelShape(512, 1536, 8, 8, 8, 8192, "~27M non-embedding + 4M embedding parameters, Llama layout"),
    "llama3-8b": ModelShape(4096, 14336, 32, 32, 8, 128256, "Llama-3-8B layout (GQA 32/8), for GPUs"),
}


def non_embedding_params(model) -> int:
    """Parameters outside the token embedding (the N of the 2·N·T FLOPs rule)."""
    embedding = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding


def build_shape_model(name: str, num_labels: int = 9, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """A seeded random ``LlamaForSequenceClassification`` of the named shape, in eval mode.

    The pad id is the last vocabulary id; benchmark workloads draw token ids below it, so padding is never
    confused with a real token.
    """
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from steer_reward.errors import InputError

    if name not in SHAPES:
        from steer_reward.schema import closest

        raise InputError(f"unknown model shape {name!r}{closest(name, list(SHAPES))}; known: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=8192, rope_theta=500000.0,
        num_labels=num_labels, pad_token_id=shape.vocab_size - 1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    # Built directly in the target dtype on the target device: an 8B model is never materialized in fp32 on CPU.
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForSequenceClassification(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
