"""Folding the shaping weights into the reward head: one output, for PPO loops that read ``model.score``.

DESIGN.md "Shaping": steps 1–3 are linear in the head's outputs ``a = W h + b`` (``W``: ``(K, hidden)``), so

    r = Σ_k w'_k (a'_k − μ_k) + bias,   a' = D a,   w'_k = w_k / (σ_k + eps)

with ``D`` the decorrelation matrix (``a'_k = a_k − λ_k a_verbosity``) and (μ, σ) the fixed normalization (0, 1
without it) is ``r = (w'ᵀ D W) h + c`` with the constant ``c = w'ᵀ D b − w'ᵀ μ + bias``. The folded head is the
``(1, hidden)`` row ``w'ᵀ D W``.

Running statistics change during training, the length penalty needs the completion length, and reward
normalization / clipping are not linear: none of them fold, and folding refuses them.

The constant ``c``: Llama-family heads and OpenRLHF's reward loader have a ``score`` head **without bias**, so
``c`` cannot live in the weights. A head that has a bias (a checkpoint converted from NeMo, whose ``score.bias``
the loader restores) contributes ``w'ᵀ D b`` to ``c`` like any other. It is written to ``config.json`` as
``steer_reward.reward_offset`` and as OpenRLHF's ``mean = −c``, ``std = 1``. OpenRLHF computes ``(r − mean) / std``
when its reward normalization is on, but under transformers 5.x it reads those values into buffers that are only
set when ZeRO-3 initializes the model; otherwise they hold uninitialized memory (rewards up to ~1e38 measured).
So OpenRLHF's normalization stays off, and ``logits[:, 0]`` of the exported model is the reward minus ``c``: a
constant shift that changes no GRPO/RLOO group-relative advantage and no pairwise preference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steer_reward.config import ConfigError
from steer_reward.forward import find_head

__all__ = ["FoldedHead", "fold_head", "check_foldable", "export_folded", "FOLDED_METADATA_KEY"]

FOLDED_METADATA_KEY = "steer_reward"
"""config.json key holding how the folded head was made (weights, offset, source schema)."""


@dataclass
class FoldedHead:
    """A one-output linear reward head equal to the shaped reward up to ``offset``."""

    weight: torch.Tensor
    """Shape: ``(1, hidden)``, float64."""
    offset: float
    """The constant ``c``: shaped reward = ``weight @ h + offset``."""


def check_foldable(shaping: Any) -> None:
    """Raise ``ConfigError`` naming every shaping step that does not fold into a linear head."""
    problems = []
    if shaping.normalization == "running":
        problems.append("shaping.normalization: running (statistics change during training; export them as a "
                        "stats_file and use normalization: fixed)")
    if shaping.length_penalty.alpha != 0:
        problems.append("shaping.length_penalty.alpha != 0 (needs the completion length, not a hidden state)")
    if shaping.reward_normalization != "none":
        problems.append(f"shaping.reward_normalization: {shaping.reward_normalization} (not linear in the head)")
    if shaping.clip is not None:
        problems.append("shaping.clip (not linear)")
    if problems:
        raise ConfigError("cannot fold this reward into a linear head: " + "; ".join(problems))


def _head_of(model: nn.Module) -> nn.Linear:
    head = find_head(model)
    if head is None or not isinstance(head.head, nn.Linear):
        raise ConfigError(
            f"folding needs a Transformers *ForSequenceClassification model with a linear 'score' head; "
            f"{type(model).__name__} has none (models with their own code, such as ArmoRM's gating head, do not fold)"
        )
    return head.head


def fold_head(reward: Any) -> FoldedHead:
    """The folded head of a ``SteerReward`` whose scorer holds an in-process model (``scorer.model``)."""
    shaper = reward.shaper
    check_foldable(shaper.config)
    model = getattr(reward.scorer, "model", None)
    if model is None:
        raise ConfigError("folding needs the reward model in this process (backend: local)")
    head = _head_of(model)
    W = head.weight.detach().double().cpu()  # (K, hidden)
    b = head.bias.detach().double().cpu() if head.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    K = shaper.schema.num_outputs
    if W.shape[0] != K:
        raise ConfigError(f"the head has {W.shape[0]} outputs but the schema has {K}")
    D = torch.eye(K, dtype=torch.float64)
    if shaper.config.decorrelate:
        D[:, shaper.schema.index(shaper.schema.verbosity)] -= shaper.lambdas
    w = shaper.weights.clone()
    mu = torch.zeros(K, dtype=torch.float64)
    if shaper.config.normalization == "fixed":
        # Same arithmetic as RewardShaper.normalized: divide by (std + eps).
        w = w / (shaper.fixed_std + shaper.config.eps)
        mu = shaper.fixed_mean
    row = w @ D  # (K,)
    weight = (row @ W)[None, :]
    offset = float(row @ b - w @ mu + shaper.config.bias)
    return FoldedHead(weight, offset)


def export_folded(reward: Any, out_dir: str | Path, tokenizer: Any = None) -> FoldedHead:
    """Save the reward model with its head replaced by the folded one-output head into ``out_dir``.

    The result is a standard ``*ForSequenceClassification`` checkpoint with ``num_labels=1`` and a bias-free
    ``score`` head: loadable by ``AutoModelForSequenceClassification`` and by OpenRLHF's reward loader. The model
    in memory is restored afterwards (the head is swapped, not copied, so a large model is not duplicated).
    """
    folded = fold_head(reward)
    model = reward.scorer.model
    head = _head_of(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    new_head = nn.Linear(head.in_features, 1, bias=False, dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        new_head.weight.copy_(folded.weight.to(head.weight.dtype))
    schema = reward.schema
    config = model.config
    saved = {k: getattr(config, k, None) for k in ("id2label", "label2id", "mean", "std", FOLDED_METADATA_KEY)}
    try:
        model.score = new_head
        config.num_labels = 1
        config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
        # OpenRLHF's RewardModel reads config.mean/std and returns (r - mean) / std with normalization on.
        config.mean, config.std = -folded.offset, 1.0
        setattr(config, FOLDED_METADATA_KEY, {
            "reward_offset": folded.offset,
            "schema": schema.name,
            "attributes": list(schema.names),
            "weights": shaper_weights(reward),
            "normalization": reward.shaper.config.normalization,
            "decorrelate": reward.shaper.config.decorrelate,
            "bias": reward.shaper.config.bias,
            "note": "logits[:, 0] + reward_offset is the shaped reward",
        })
        model.save_pretrained(out_dir)
    finally:
        model.score = head
        config.num_labels = head.out_features
        for key, value in saved.items():
            if value is None and hasattr(config, key):
                delattr(config, key)
            elif value is not None:
                setattr(config, key, value)
    (tokenizer or reward.scorer.tokenizer).save_pretrained(out_dir)
    (out_dir / "steer_reward_folded.json").write_text(json.dumps(
        {"reward_offset": folded.offset, "source_config": reward.config.to_dict()}, indent=2, default=str))
    return folded


def shaper_weights(reward: Any) -> dict[str, float]:
    """The reward's weights over live attributes, ``{attribute: weight}``."""
    schema, weights = reward.schema, reward.shaper.weights
    return {schema.names[k]: float(weights[k]) for k in schema.live}
