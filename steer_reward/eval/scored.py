"""Scoring preference data once, and the scored file that caches it (``steer-reward eval --scored``).

The file is JSONL: a header line, then one line per preference row with every response's attributes (all K
outputs) and reward-model token count. Every weight vector is evaluated from it without a model. It is reused only
when it was written for the same data (row count, ids and a content hash per row), with the same attribute
schema and the same scoring settings (``model.*`` fields that change the attributes); anything else is an
``InputError`` saying what differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch

from steer_reward.config import SteerRewardConfig
from steer_reward.errors import InputError
from steer_reward.eval.pairs import PreferenceData
from steer_reward.schema import BUILTIN_SCHEMAS, AttributeSchema, schema_from_stored

__all__ = ["FORMAT", "SCORING_KEYS", "ScoredPreferences", "score_preferences", "write_scored", "read_scored",
           "scoring_settings", "check_same_scoring", "read_scored_attributes", "is_demo_model"]

FORMAT = "steer-reward/scored-preferences/v1"
"""Value of the header's ``format`` field."""

SCORING_KEYS = ("schema", "template", "system_prompt", "max_length", "overlong", "dtype", "adapter")
"""``model.*`` fields that change the attributes a model gives (device and batching do not: every strategy is
exact to 1e-4 in fp32)."""


@dataclass
class ScoredPreferences:
    """Attributes of every response of a preference data set, flattened: row i owns responses
    ``offsets[i] .. offsets[i+1]-1``, the first of them the chosen one."""

    schema: AttributeSchema
    values: torch.Tensor
    """Shape: ``(N, K)`` float64, N responses."""
    lengths: torch.Tensor
    """Reward-model completion tokens per response. Shape: ``(N,)`` int64."""
    truncated: torch.Tensor
    """Whether the response's prompt or completion was cut to fit ``model.max_length``. Shape: ``(N,)`` bool."""
    offsets: list[int]
    """Start of each row's responses, plus N at the end. Length: rows + 1."""
    ids: list[str]
    subsets: list[str]
    settings: dict
    """Scoring settings it was made with (``model.path`` and ``SCORING_KEYS``)."""

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @cached_property
    def row_of(self) -> torch.Tensor:
        """Row of each response. Shape: ``(N,)``."""
        sizes = torch.tensor([b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])])
        return torch.repeat_interleave(torch.arange(len(sizes)), sizes)

    @cached_property
    def chosen_index(self) -> torch.Tensor:
        """Response index of each row's chosen response. Shape: ``(rows,)``."""
        return torch.tensor(self.offsets[:-1])

    @cached_property
    def subset_names(self) -> list[str]:
        """Subsets in order of first appearance."""
        return list(dict.fromkeys(self.subsets))

    @cached_property
    def subset_codes(self) -> torch.Tensor:
        """Index into ``subset_names`` of each row's subset. Shape: ``(rows,)``."""
        code = {name: i for i, name in enumerate(self.subset_names)}
        return torch.tensor([code[s] for s in self.subsets])


def scoring_settings(config: SteerRewardConfig) -> dict:
    """The ``model.*`` fields that decide the attributes, plus the model path."""
    model = config.model
    path = model.path
    if path is not None and path != "demo" and not path.startswith("shape:"):
        path = os.path.abspath(path)  # the same folder named two ways is the same model
    return {"path": path, **{key: getattr(model, key) for key in SCORING_KEYS}}


def is_demo_model(path: str | None) -> bool:
    """Whether ``path`` is the random-weight demo reward model ("demo", or its cache folder)."""
    if path is None:
        return False
    if path == "demo":
        return True
    from steer_reward.demo import DEMO_VERSION, cache_dir

    return os.path.abspath(path) == os.path.abspath(cache_dir() / f"demo-rm-{DEMO_VERSION}")


def check_same_scoring(configs: Sequence[tuple[str, SteerRewardConfig]]) -> None:
    """Every config must score like the first: the data is scored once for all of them."""
    (first_name, first), rest = configs[0], configs[1:]
    reference = scoring_settings(first)
    for name, config in rest:
        settings = scoring_settings(config)
        for key, value in settings.items():
            if key == "path" and (value is None or reference["path"] is None):
                continue
            if value != reference[key]:
                raise InputError(
                    f"config {name!r} sets model.{key}={value!r} but {first_name!r} has {reference[key]!r}: the data "
                    "is scored once, so compared configs may differ only in their shaping section"
                )


def score_preferences(reward: Any, data: PreferenceData, chunk_rows: int = 64,
                      progress: bool = True) -> ScoredPreferences:
    """Score every response of ``data`` with ``reward``'s scorer (the only model forwards of an evaluation)."""
    from tqdm import tqdm

    values, lengths, truncated, offsets = [], [], [], [0]
    rows = data.rows
    with tqdm(total=len(rows), unit="row", desc="scoring", disable=not progress) as bar:
        for start in range(0, len(rows), chunk_rows):
            chunk = rows[start:start + chunk_rows]
            prompts = [p for r in chunk for p in r.prompts]
            completions = [c for r in chunk for c in r.completions]
            scores = reward.scorer.score(prompts, completions)
            values.append(scores.values.double())
            lengths.append(scores.completion_lengths)
            truncated.append((scores.prompt_truncated > 0) | (scores.completion_truncated > 0))
            for r in chunk:
                offsets.append(offsets[-1] + len(r.completions))
            bar.update(len(chunk))
    return ScoredPreferences(reward.schema, torch.cat(values), torch.cat(lengths).long(), torch.cat(truncated),
                             offsets, [r.id for r in rows], [r.subset for r in rows],
                             scoring_settings(reward.config))


def write_scored(path: str | Path, scored: ScoredPreferences, data: PreferenceData) -> None:
    """Write the scored file (to a temporary name first, so an interrupted run leaves no half file behind)."""
    path = Path(path)
    schema = scored.schema
    header = {"format": FORMAT, "data": os.path.basename(data.path), "rows": scored.num_rows,
              "schema": schema.name, "attribute_names": list(schema.names), "live": list(schema.live),
              "verbosity": schema.verbosity, "scoring": scored.settings,
              "random_weights": is_demo_model(scored.settings.get("path"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8") as out:
        out.write(json.dumps(header) + "\n")
        for i, row in enumerate(data.rows):
            lo, hi = scored.offsets[i], scored.offsets[i + 1]
            responses = [{"attributes": dict(zip(schema.names, scored.values[j].tolist())),
                          "completion_tokens": int(scored.lengths[j]), "truncated": bool(scored.truncated[j])}
                         for j in range(lo, hi)]
            out.write(json.dumps({"id": row.id, "subset": row.subset, "key": row.key(),
                                  "chosen": responses[0], "rejected": responses[1:]}) + "\n")
    tmp.replace(path)


def _schema(header: dict, where: str) -> AttributeSchema:
    names = header.get("attribute_names")
    name = header.get("schema")
    if not isinstance(names, list) or not isinstance(name, str):
        raise InputError(f"{where}: the header has no schema / attribute_names")
    return schema_from_stored(name, names, where)


def _mismatch(path: Path, what: str) -> InputError:
    return InputError(f"scored file {path} {what}; give another --scored path (or delete this one) to score again")


def read_scored_attributes(path: str | Path) -> tuple[AttributeSchema, torch.Tensor]:
    """(schema, attributes of every response ``(N, K)``) of a scored file, without the data it was made from."""
    from steer_reward.jsonl import read_jsonl

    path = Path(path)
    lines = iter(read_jsonl(path))
    first = next(lines, None)
    if first is None or first[1].get("format") != FORMAT:
        raise InputError(f"{path}: not a scored-preferences file written by steer-reward eval")
    schema = _schema(first[1], f"{path}:1")
    values = []
    for number, line in lines:
        try:
            for response in [line["chosen"], *line["rejected"]]:
                values.append([float(response["attributes"][n]) for n in schema.names])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path}:{number}: malformed scored row ({type(err).__name__}: {err})") from None
    if not values:
        raise InputError(f"{path}: no scored rows")
    return schema, torch.tensor(values, dtype=torch.float64)


def read_scored(path: str | Path, data: PreferenceData, config: SteerRewardConfig | None = None) -> ScoredPreferences:
    """Read a scored file and check it belongs to ``data`` and to ``config``'s scoring settings."""
    from steer_reward.jsonl import read_jsonl

    path = Path(path)
    lines = iter(read_jsonl(path))
    first = next(lines, None)
    if first is None:
        raise _mismatch(path, "is empty")
    header = first[1]
    if header.get("format") != FORMAT:
        found = header.get("format", "no 'format' header")
        raise _mismatch(path, f"is not a scored-preferences file written by steer-reward eval ({found}; expected "
                              f"{FORMAT!r})")
    schema = _schema(header, f"{path}:1")
    settings = header.get("scoring") or {}
    if config is not None:
        wanted = scoring_settings(config)
        if wanted["schema"] not in ("auto", schema.name) and not (wanted["schema"] == "id2label"
                                                                   and schema.name not in BUILTIN_SCHEMAS):
            raise _mismatch(path, f"was scored with schema {schema.name!r}, but model.schema is {wanted['schema']!r}")
        for key, value in wanted.items():
            if key == "schema" or (key == "path" and value is None):
                continue
            if settings.get(key) != value:
                raise _mismatch(path, f"was scored with model.{key}={settings.get(key)!r}, this run asks for {value!r}")
    if header.get("rows") != len(data.rows):
        raise _mismatch(path, f"holds {header.get('rows')} rows but {data.path} has {len(data.rows)}")
    values, lengths, truncated, offsets, ids, subsets = [], [], [], [0], [], []
    for row, (number, line) in zip(data.rows, lines):
        where = f"{path}:{number}"
        if line.get("key") != row.key() or str(line.get("id")) != row.id:
            raise _mismatch(path, f"does not match {data.path}: its line {number} (id {line.get('id')!r}) is not "
                                  f"the data's line {row.line} (id {row.id!r}), or their texts differ")
        try:
            responses = [line["chosen"], *line["rejected"]]
            for response in responses:
                attributes = response["attributes"]
                values.append([float(attributes[n]) for n in schema.names])
                lengths.append(int(response["completion_tokens"]))
                truncated.append(bool(response.get("truncated", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{where}: malformed scored row ({type(err).__name__}: {err})") from None
        if len(responses) != len(row.completions):
            raise _mismatch(path, f"line {number} has {len(responses)} responses, the data row has "
                                  f"{len(row.completions)}")
        offsets.append(len(values))
        ids.append(row.id)
        subsets.append(row.subset)
    if len(ids) != len(data.rows) or next(lines, None) is not None:
        raise _mismatch(path, f"does not hold exactly the {len(data.rows)} rows its header promises")
    return ScoredPreferences(schema, torch.tensor(values, dtype=torch.float64), torch.tensor(lengths),
                             torch.tensor(truncated), offsets, ids, subsets, settings)
