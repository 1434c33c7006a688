"""Attribute schemas, weight presets and YAML configs (every shipped config loads)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from steer_reward.config import ConfigError, apply_overrides, load_config, parse_override
from steer_reward.schema import STEERLM9, SchemaError, resolve_schema, schema_from_id2label

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_steerlm_presets_match_the_model_cards():
    assert STEERLM9.weight_vector("steerlm-70b") == [0, 0, 0, 0, 0.65, 0.8, 0.45, 0.55, -0.4]
    assert STEERLM9.weight_vector("steerlm-70b-v1") == [0, 0, 0, 0, 0.65, 0.8, 0.45, 0, 0]
    assert STEERLM9.weight_vector("nemotron-340b") == [0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33]
    assert STEERLM9.weight_vector("helpfulness") == [0, 0, 0, 0, 1.0, 0, 0, 0, 0]
    # Never NeMo-Aligner's 1/9 average: no weights means the current model-card preset.
    assert STEERLM9.weight_vector(None) == STEERLM9.weight_vector("steerlm-70b")


def test_preset_with_overrides():
    vector = STEERLM9.weight_vector({"preset": "steerlm-70b", "verbosity": -1.2})
    assert vector[8] == -1.2 and vector[5] == 0.8


@pytest.mark.parametrize("weights, message", [
    ({"helpfulnes": 1.0}, "did you mean 'helpfulness'"),
    ({"helpfulness": float("nan")}, "finite"),
    ({"helpfulness": float("inf")}, "finite"),
    ({"toxicity": 1.0}, "not a trained output"),
    ({"helpfulness": "high"}, "must be a number"),
    ("steerlm70b", "did you mean 'steerlm-70b'"),
])
def test_bad_weights_are_clear_errors(weights, message):
    with pytest.raises(SchemaError, match=message):
        STEERLM9.weight_vector(weights)


def test_resolve_schema():
    generic = {i: f"LABEL_{i}" for i in range(9)}
    assert resolve_schema("auto", generic, 9) is STEERLM9
    named = {0: "helpfulness", 1: "harmlessness", 2: "verbosity_score"}
    schema = resolve_schema("auto", named, 3)
    assert schema.names == ("helpfulness", "harmlessness", "verbosity_score")
    assert schema.verbosity == "verbosity_score" and schema.live == (0, 1, 2)
    with pytest.raises(SchemaError, match="head has 5 outputs but schema 'steerlm9' expects 9"):
        resolve_schema("steerlm9", None, 5)
    with pytest.raises(SchemaError, match="cannot tell what the 4 outputs"):
        resolve_schema("auto", {i: f"LABEL_{i}" for i in range(4)}, 4)
    with pytest.raises(SchemaError, match="did you mean 'steerlm9'"):
        resolve_schema("steerlm", None, 9)
    assert schema_from_id2label({"1": "b", "0": "a"}).names == ("a", "b")


def test_unknown_key_names_the_key_and_the_closest():
    with pytest.raises(ConfigError, match=r"'shaping.normalisation'.*did you mean 'normalization'"):
        load_config({"shaping": {"normalisation": "running"}})
    with pytest.raises(ConfigError, match=r"'modle'.*did you mean 'model'"):
        load_config({"modle": {}})


@pytest.mark.parametrize("data, message", [
    ({"backend": "gpu"}, "backend"),
    ({"batching": {"max_tokens": "lots"}}, "batching.max_tokens must be a number"),
    ({"batching": {"max_tokens": 1.5}}, "must be an integer"),
    ({"batching": {"max_tokens": 0}}, "must be positive"),
    ({"shaping": {"normalization": "fixed"}}, "stats_file"),
    ({"shaping": {"clip": [1, 0]}}, "lo < hi"),
    ({"shaping": {"bias": float("nan")}}, "finite"),
    ({"model": {"trust_remote_code": "yes"}}, "true or false"),
    ({"model": "demo"}, "model must be a mapping"),
])
def test_bad_values_are_clear_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data)


def test_overrides_use_dotted_names_and_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"shaping": {"weights": "steerlm-70b"}}))
    config = load_config(path, dict([parse_override("shaping.weights.verbosity=-1.0"),
                                     parse_override("batching.max_tokens=2048"),
                                     parse_override("shaping.clip=[-1, 1]")]))
    assert config.shaping.weights == {"preset": "steerlm-70b", "verbosity": -1.0}
    assert config.batching.max_tokens == 2048 and config.shaping.clip == [-1, 1]
    assert apply_overrides({}, {"model.path": "demo"}) == {"model": {"path": "demo"}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("no-equals-sign")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def _load_any_config(path: Path) -> None:
    if path.parent.name == "rewards":
        config = load_config(path)
        schema = STEERLM9  # the shipped reward configs are written for SteerLM-shaped heads
        vector = schema.weight_vector(config.shaping.weights)
        assert any(w != 0 for w in vector) and all(math.isfinite(w) for w in vector)
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        assert data["zero_optimization"]["stage"] == 3
        for key, value in data["zero_optimization"].items():
            if key.endswith("bucket_size") or key.endswith("threshold"):
                assert isinstance(value, int), f"{path}: {key} must be an int (DeepSpeed ignores other types)"
    elif path.suffix in (".yaml", ".yml"):
        from accelerate.commands.config.config_args import ClusterConfig

        ClusterConfig.from_yaml_file(str(path))
    else:
        raise AssertionError(f"no loader for shipped config {path}")


SHIPPED = sorted(p for p in CONFIGS.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_every_shipped_config_loads(path):
    _load_any_config(path)


def test_shipped_reward_configs_exist():
    names = {p.name for p in (CONFIGS / "rewards").glob("*.yaml")}
    assert {"steerlm-70b.yaml", "nemotron-340b.yaml", "helpfulness.yaml", "concise.yaml",
            "correctness-first.yaml"} <= names


# -- numeric fields: finite and in range, one error naming the key ----------------------------------------------------

def _numeric_fields(cls: type = None, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted key, int | float) of every numeric field, walked from the dataclasses themselves."""
    import dataclasses
    import typing

    from steer_reward.config import SteerRewardConfig

    cls = cls or SteerRewardConfig
    found = []
    for name, tp in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        tp = args[0]
        if dataclasses.is_dataclass(tp):
            found += _numeric_fields(tp, f"{prefix}{name}.")
        elif tp in (int, float):
            found.append((f"{prefix}{name}", tp))
    return found


NUMERIC = _numeric_fields()


def test_every_numeric_field_has_a_declared_range():
    from steer_reward.config import NUMERIC_LIMITS

    assert len(NUMERIC) >= 20
    missing = [key for key, _ in NUMERIC if key not in NUMERIC_LIMITS]
    assert not missing, f"add a Limit for {missing} to steer_reward.config.NUMERIC_LIMITS"
    assert set(NUMERIC_LIMITS) <= {key for key, _ in NUMERIC}


def _bad_values(key: str, tp: type) -> list:
    from steer_reward.config import NUMERIC_LIMITS

    limit = NUMERIC_LIMITS[key]
    below = limit.lo if limit.lo_open else limit.lo - 1
    bad = ["abc", True, [1], float("nan"), float("inf"), -float("inf"), 10**30, 10**400, below, limit.hi + 1]
    return bad + ([1.5] if tp is int else [])


@pytest.mark.parametrize("key, tp", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_numeric_fields_refuse_non_finite_and_out_of_range_values(key, tp):
    from steer_reward.config import NUMERIC_LIMITS

    limit = NUMERIC_LIMITS[key]
    for value in _bad_values(key, tp):
        with pytest.raises(ConfigError, match=rf"^{key} must be ") as caught:
            load_config({}, {key: value})
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
    for value in (limit.hi, limit.hi / 2 if limit.lo_open else limit.lo):  # values at the bounds load
        assert getattr(load_config({}, {key: tp(value)}), key.split(".")[0]) is not None


@pytest.mark.parametrize("key", ["shaping.weights.helpfulness", "shaping.decorrelate.helpfulness"])
@pytest.mark.parametrize("value", ["abc", None, True, float("nan"), float("inf"), 10**400, 1e7],
                         ids=["string", "null", "bool", "nan", "inf", "10**400", "1e7"])
def test_coefficients_are_finite_numbers(key, value):
    with pytest.raises(ConfigError, match=rf"^{key} must be "):
        load_config({}, {key: value})


def test_coefficients_and_clip_bounds_that_load():
    config = load_config({}, {"shaping.weights.verbosity": -1, "shaping.decorrelate.helpfulness": 0.2,
                              "shaping.clip": [-float("inf"), 5]})
    assert config.shaping.decorrelate == {"helpfulness": 0.2} and config.shaping.clip[1] == 5
    load_config({"shaping": {"weights": {"preset": "steerlm-70b", "helpfulness": 1e6}}})


@pytest.mark.parametrize("clip, message", [
    (["a", 1], r"shaping.clip\[0\] must be a number"),
    ([0, float("nan")], r"shaping.clip\[1\] must be a number"),
    ([True, 2], r"shaping.clip\[0\] must be a number"),
    ([1, 2, 3], r"shaping.clip must be \[lo, hi\]"),
    ([2, 2], "lo < hi"),
])
def test_clip_bounds(clip, message):
    with pytest.raises(ConfigError, match=message):
        load_config({}, {"shaping.clip": clip})


def test_a_nan_decorrelation_no_longer_makes_every_reward_nan():
    """The adversarial case: λ = NaN was accepted and turned every reward into NaN."""
    with pytest.raises(ConfigError, match="shaping.decorrelate.helpfulness must be a finite number"):
        load_config({}, dict([parse_override("shaping.decorrelate.helpfulness=.nan")]))
