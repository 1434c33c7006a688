"""Attribute schemas: what each output of a multi-attribute reward head means.

A schema names the K outputs of the head, says which of them were trained ("live"), their value range, and the
published weight presets that collapse them to one scalar. NeMo-Aligner averages all 9 SteerLM outputs when no
weights are given, mixing in the 4 untrained ones; here the schema always says which outputs carry signal and
weights over dead outputs are refused.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = [
    "AttributeSchema",
    "SchemaError",
    "STEERLM9",
    "ARMORM19",
    "BUILTIN_SCHEMAS",
    "schema_from_id2label",
    "schema_from_stored",
    "resolve_schema",
    "closest",
]


class SchemaError(ValueError):
    """A schema, weight vector or preset that cannot be used, with the reason."""


def closest(name: str, choices: Sequence[str]) -> str:
    """A ' (did you mean X?)' hint for ``name`` among ``choices``, or '' when nothing is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


@dataclass(frozen=True)
class AttributeSchema:
    """Names and meaning of the K outputs of a multi-attribute reward head.

    >>> STEERLM9.live_names
    ('helpfulness', 'correctness', 'coherence', 'complexity', 'verbosity')
    """

    name: str
    names: tuple[str, ...]
    """One name per head output, in output order."""
    live: tuple[int, ...]
    """Indices of the outputs that were trained; the others carry nothing."""
    value_range: tuple[float, float] | None = None
    """Range the live outputs were trained on (SteerLM: 0-4), or None when unknown."""
    presets: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Named weight vectors, ``{preset: {attribute: weight}}``; attributes left out weigh 0."""
    verbosity: str | None = None
    """Name of the attribute that measures length/verbosity, for the verbosity controls."""

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise SchemaError(f"schema {self.name!r}: attribute names must be unique, got {list(self.names)}")
        for i in self.live:
            if not 0 <= i < len(self.names):
                raise SchemaError(f"schema {self.name!r}: live index {i} out of range for {len(self.names)} outputs")
        if self.verbosity is not None and self.verbosity not in self.names:
            raise SchemaError(f"schema {self.name!r}: verbosity attribute {self.verbosity!r} is not an output")

    @property
    def num_outputs(self) -> int:
        return len(self.names)

    @property
    def live_names(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.live)

    def index(self, attribute: str) -> int:
        if attribute not in self.names:
            raise SchemaError(
                f"unknown attribute {attribute!r}{closest(attribute, self.names)}; "
                f"schema {self.name!r} has {list(self.names)}"
            )
        return self.names.index(attribute)

    def weight_vector(self, weights: Mapping[str, float] | str | None = None) -> list[float]:
        """Weights over all K outputs from a preset name or ``{attribute: weight}``.

        ``None`` means the schema's first preset (the model card's current recommendation). A mapping may hold
        ``preset: NAME`` and then override some of that preset's weights. Weights must be finite and may only
        name live attributes.
        """
        if isinstance(weights, Mapping) and "preset" in weights:
            merged = dict(self.weight_dict(str(weights["preset"])))
            merged.update({k: v for k, v in weights.items() if k != "preset"})
            weights = merged
        if weights is None:
            if not self.presets:
                raise SchemaError(
                    f"schema {self.name!r} has no weight presets: give shaping.weights as {{attribute: weight}} "
                    f"over {list(self.live_names)}"
                )
            weights = next(iter(self.presets))
        if isinstance(weights, str):
            if weights not in self.presets:
                raise SchemaError(
                    f"unknown weight preset {weights!r}{closest(weights, list(self.presets))}; "
                    f"schema {self.name!r} has presets {list(self.presets)}"
                )
            weights = self.presets[weights]
        if not isinstance(weights, Mapping):
            raise SchemaError(f"weights must be a preset name or a mapping {{attribute: weight}}, got {weights!r}")
        vector = [0.0] * self.num_outputs
        for attribute, w in weights.items():
            i = self.index(str(attribute))
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise SchemaError(f"weight for {attribute!r} must be a number, got {w!r}") from None
            if not math.isfinite(w):
                raise SchemaError(f"weight for {attribute!r} must be finite, got {w}")
            if w != 0.0 and i not in self.live:
                raise SchemaError(
                    f"attribute {attribute!r} is not a trained output of schema {self.name!r} and carries no "
                    f"signal; live attributes: {list(self.live_names)}"
                )
            vector[i] = w
        return vector

    def weight_dict(self, weights: Mapping[str, float] | str | None = None) -> dict[str, float]:
        """``weight_vector`` as ``{attribute: weight}`` over the live attributes."""
        vector = self.weight_vector(weights)
        return {self.names[i]: vector[i] for i in self.live}


_STEERLM_NAMES = (
    "quality", "toxicity", "humor", "creativity",
    "helpfulness", "correctness", "coherence", "complexity", "verbosity",
)  # fmt: skip

STEERLM9 = AttributeSchema(
    name="steerlm9",
    names=_STEERLM_NAMES,
    live=(4, 5, 6, 7, 8),
    value_range=(0.0, 4.0),
    presets={
        # Llama3-70B-SteerLM-RM model card (current revision).
        "steerlm-70b": {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45, "complexity": 0.55,
                        "verbosity": -0.4},
        # Same card, earlier revision.
        "steerlm-70b-v1": {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45},
        # Nemotron-4-340B-Reward model card.
        "nemotron-340b": {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46, "complexity": 0.47,
                          "verbosity": -0.33},
        # HelpSteer2's default single objective.
        "helpfulness": {"helpfulness": 1.0},
    },
    verbosity="verbosity",
)

# ArmoRM-Llama3-8B-v0.1 objectives, in head order. HelpSteer objectives (indices 0-4) map to 0-4 as r*5-0.5.
_ARMORM_NAMES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
    "code-explanation", "code-instruction-following", "code-readability",
)  # fmt: skip

ARMORM19 = AttributeSchema(
    name="armorm19",
    names=_ARMORM_NAMES,
    live=tuple(range(19)),
    value_range=None,
    presets={
        "helpsteer": {"helpsteer-helpfulness": 0.65, "helpsteer-correctness": 0.8, "helpsteer-coherence": 0.45,
                      "helpsteer-complexity": 0.55, "helpsteer-verbosity": -0.4},
        "helpfulness": {"helpsteer-helpfulness": 1.0},
    },
    verbosity="helpsteer-verbosity",
)

BUILTIN_SCHEMAS: dict[str, AttributeSchema] = {s.name: s for s in (STEERLM9, ARMORM19)}


def schema_from_id2label(id2label: Mapping[int | str, str], name: str = "id2label") -> AttributeSchema:
    """A schema read from a checkpoint's ``config.id2label``: every output live, no presets.

    A ``verbosity`` output (any name containing "verbosity") is recognised for the verbosity controls.
    """
    labels = {int(k): str(v) for k, v in id2label.items()}
    names = tuple(labels[i] for i in range(len(labels)))
    verbosity = next((n for n in names if "verbosity" in n.lower()), None)
    return AttributeSchema(name=name, names=names, live=tuple(range(len(names))), verbosity=verbosity)


def schema_from_stored(name: str, names: Sequence[str], where: str) -> AttributeSchema:
    """The schema a scored file (or a server's ``/info``) names: the built-in schema of that name, whose attribute
    names must then be the stored ones, or an all-live schema over the stored names. ``where`` prefixes errors."""
    builtin = BUILTIN_SCHEMAS.get(name)
    if builtin is not None:
        if tuple(names) != builtin.names:
            raise SchemaError(f"{where}: attribute names do not match built-in schema {name!r}")
        return builtin
    return schema_from_id2label(dict(enumerate(names)), name=name)


def _is_generic_labels(id2label: Mapping[int | str, str]) -> bool:
    return all(str(v) == f"LABEL_{int(k)}" for k, v in id2label.items())


def resolve_schema(spec: str, id2label: Mapping[int | str, str] | None, num_outputs: int) -> AttributeSchema:
    """The schema named by ``spec`` ("auto", "id2label" or a built-in name), checked against the head size.

    "auto" reads a SteerLM-shaped head (9 outputs with generic labels, or SteerLM's names) as ``steerlm9``,
    otherwise the checkpoint's ``id2label``.
    """
    if spec == "auto":
        if id2label and not _is_generic_labels(id2label):
            labels = schema_from_id2label(id2label)
            for builtin in BUILTIN_SCHEMAS.values():
                if labels.names == builtin.names:
                    return builtin
            schema = labels
        elif num_outputs == STEERLM9.num_outputs:
            schema = STEERLM9
        else:
            raise SchemaError(
                f"cannot tell what the {num_outputs} outputs of this head mean: its config has no id2label names. "
                f"Set model.schema to one of {sorted(BUILTIN_SCHEMAS)}, or save id2label in the checkpoint"
            )
    elif spec == "id2label":
        if not id2label:
            raise SchemaError("model.schema is 'id2label' but the checkpoint's config has no id2label")
        schema = schema_from_id2label(id2label)
    elif spec in BUILTIN_SCHEMAS:
        schema = BUILTIN_SCHEMAS[spec]
    else:
        choices = ["auto", "id2label", *BUILTIN_SCHEMAS]
        raise SchemaError(f"unknown schema {spec!r}{closest(spec, choices)}; choose one of {choices}")
    if schema.num_outputs != num_outputs:
        raise SchemaError(
            f"the model's head has {num_outputs} outputs but schema {schema.name!r} expects {schema.num_outputs} "
            f"({list(schema.names)}); pick a schema that matches the checkpoint (model.schema: id2label reads its "
            f"labels)"
        )
    return schema
