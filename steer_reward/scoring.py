"""Scoring: (prompts, completions) → ``AttributeScores`` through formatting, planning and a backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from steer_reward.formatting import Completion, EncodedSample, Prompt, RewardFormatter
from steer_reward.schema import AttributeSchema

__all__ = ["AttributeScores", "SampleBackend", "AttributeScorer"]


@dataclass
class AttributeScores:
    """Per-attribute scores of n samples, in input order."""

    values: torch.Tensor
    """Shape: ``(n, K)``, float32; column k is attribute ``names[k]``."""
    names: tuple[str, ...]
    completion_lengths: torch.Tensor
    """Completion tokens the reward model read. Shape: ``(n,)``, int64."""
    prompt_truncated: torch.Tensor
    """Prompt tokens dropped from the left to fit ``model.max_length``. Shape: ``(n,)``, int64."""
    completion_truncated: torch.Tensor
    """Completion tokens dropped from its start to fit ``model.max_length`` (``model.overlong: truncate``; see
    ``RewardFormatter.fit``): the score of such a sample judged only the completion's end. Shape: ``(n,)``,
    int64."""

    def __len__(self) -> int:
        return self.values.shape[0]

    def column(self, name: str) -> torch.Tensor:
        return self.values[:, self.names.index(name)]

    def to_dicts(self) -> list[dict[str, float]]:
        """One ``{attribute: value}`` per sample."""
        return [dict(zip(self.names, row)) for row in self.values.tolist()]

    @classmethod
    def from_samples(cls, values: torch.Tensor, names: Sequence[str],
                     samples: Sequence[EncodedSample]) -> "AttributeScores":
        return cls(
            values=values.float(),
            names=tuple(names),
            completion_lengths=torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.long),
            prompt_truncated=torch.tensor([s.prompt_truncated for s in samples], dtype=torch.long),
            completion_truncated=torch.tensor([s.completion_truncated for s in samples], dtype=torch.long),
        )

    @classmethod
    def concat(cls, parts: Sequence["AttributeScores"]) -> "AttributeScores":
        if not parts:
            raise ValueError("nothing to concatenate")
        return cls(
            values=torch.cat([p.values for p in parts]),
            names=parts[0].names,
            completion_lengths=torch.cat([p.completion_lengths for p in parts]),
            prompt_truncated=torch.cat([p.prompt_truncated for p in parts]),
            completion_truncated=torch.cat([p.completion_truncated for p in parts]),
        )


class SampleBackend(Protocol):
    """What a token-level backend provides: attributes of encoded samples, in input order."""

    num_outputs: int

    def attributes(self, samples: Sequence[EncodedSample]) -> torch.Tensor: ...


class AttributeScorer:
    """Formatter + backend: scores (prompt, completion) pairs with a multi-attribute reward model.

    >>> scorer = AttributeScorer.from_config(load_config({"model": {"path": "demo"}}))  # doctest: +SKIP
    >>> scorer.score(["Hi"], ["Hello!"]).values.shape  # doctest: +SKIP
    torch.Size([1, 9])
    """

    def __init__(self, formatter: RewardFormatter, backend: SampleBackend, schema: AttributeSchema,
                 model: Any = None) -> None:
        if backend.num_outputs != schema.num_outputs:
            raise ValueError(f"backend gives {backend.num_outputs} outputs, schema {schema.name!r} "
                             f"expects {schema.num_outputs}")
        self.formatter = formatter
        self.backend = backend
        self.schema = schema
        self.model = model
        """The in-process model, when there is one (for folding heads and generation)."""

    @property
    def tokenizer(self) -> Any:
        return self.formatter.tokenizer

    @classmethod
    def from_config(cls, config: Any) -> "AttributeScorer":
        """A local-backend scorer for a ``SteerRewardConfig``."""
        from steer_reward.backends.local import LocalBackend
        from steer_reward.modeling import load_reward_model
        from steer_reward.schema import resolve_schema

        model, tokenizer, _ = load_reward_model(config.model)
        schema = resolve_schema(config.model.schema, getattr(model.config, "id2label", None),
                                int(model.config.num_labels))
        formatter = RewardFormatter.from_config(tokenizer, config.model)
        backend = LocalBackend(model, tokenizer.pad_token_id, config.batching)
        return cls(formatter, backend, schema, model=model)

    def encode(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> list[EncodedSample]:
        return self.formatter.encode(prompts, completions)

    def score_encoded(self, samples: Sequence[EncodedSample]) -> AttributeScores:
        if not samples:
            return AttributeScores.from_samples(torch.empty((0, self.schema.num_outputs)), self.schema.names, [])
        return AttributeScores.from_samples(self.backend.attributes(samples), self.schema.names, samples)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> AttributeScores:
        """Attributes of each (prompt, completion), in input order."""
        return self.score_encoded(self.encode(prompts, completions))
