"""CLI round trips on the real data in tests/data, and clean errors (no tracebacks) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steer_reward.cli import main

DATA = Path(__file__).resolve().parent / "data"
LLMBAR = DATA / "llmbar" / "llmbar_rewardbench_style_first60.jsonl"
HELPSTEER = DATA / "helpsteer2_sample" / "helpsteer2_rows_from_test-rm.jsonl"


def _rows(path):
    return [json.loads(line) for line in Path(path).open(encoding="utf-8") if line.strip()]


def test_score_preference_pairs_round_trip(tmp_path, demo_model_path, make_reward, capsys):
    subset = tmp_path / "pairs.jsonl"
    rows = _rows(LLMBAR)[:30]
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", demo_model_path, "--config", "configs/rewards/steerlm-70b.yaml",
                 "--input", str(subset), "--output", str(out), "--chunk-size", "7"]) == 0
    scored = _rows(out)
    assert len(scored) == 30
    reward = make_reward({"weights": "steerlm-70b"})
    expected = reward.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    for row, got, attrs, value in zip(rows, scored, expected.attributes.to_dicts(), expected.rewards.tolist()):
        assert got["id"] == row["id"] and got["chosen"] == row["chosen"]  # input fields kept, order kept
        assert set(got["chosen_attributes"]) == set(reward.schema.names)
        assert got["chosen_attributes"]["correctness"] == pytest.approx(attrs["correctness"], abs=1e-4)
        assert got["chosen_reward"] == pytest.approx(value, abs=1e-4)
        assert "rejected_reward" in got and "rejected_attributes" in got


def test_score_helpsteer_rows_with_the_steerlm_template_and_overrides(tmp_path, demo_model_path, make_reward):
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", demo_model_path, "--input", str(HELPSTEER), "--output", str(out),
                 "--set", "model.template=steerlm", "--set", "shaping.weights=helpfulness"]) == 0
    scored = _rows(out)
    assert len(scored) == 8
    for row in scored:
        assert row["reward"] == pytest.approx(row["attributes"]["helpfulness"], abs=1e-6)


def test_messages_rows_and_empty_completion(tmp_path, demo_model_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n"
                    + json.dumps({"prompt": "say nothing", "completion": ""}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", demo_model_path, "--input", str(path), "--output", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["reward"])) for r in rows)


def test_bad_line_names_its_number_and_keeps_what_was_scored(tmp_path, demo_model_path, capsys):
    path = tmp_path / "in.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c"})
    path.write_text("\n".join([good, good, good, "{not json", good]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", demo_model_path, "--input", str(path), "--output", str(out),
                 "--chunk-size", "2"]) == 2
    assert f"{path}:4: not valid JSON" in capsys.readouterr().err
    assert len(_rows(out)) == 3  # the three rows before the bad line were scored and written
    path.write_text(json.dumps({"prompt": "p"}) + "\n")
    assert main(["score", "--model", demo_model_path, "--input", str(path), "--output", str(out)]) == 2
    assert ":1: a row needs prompt+completion" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "/does/not/exist"], "does not exist"),
    (["--set", "shaping.weights.corectness=1.0"], "did you mean 'correctness'"),
    (["--set", "shaping.weights.helpfulness=.nan"], "finite"),
    (["--set", "shaping.normalisation=running"], "did you mean 'normalization'"),
    (["--config", "missing.yaml"], "does not exist"),
    (["--set", "shaping.decorrelate.helpfulness=abc"], "shaping.decorrelate.helpfulness must be a number"),
    (["--set", "batching.max_batch_size=1000000000000000000000000000000"],
     "batching.max_batch_size must be positive and at most"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, demo_model_path, args, message):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    argv = ["score", "--model", demo_model_path, "--input", str(path), "--output", str(tmp_path / "o.jsonl")] + args
    result = subprocess.run([sys.executable, "-m", "steer_reward.cli", *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_demo_command_prints_the_table(capsys):
    assert main(["demo"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err
    for preset in ("steerlm-70b", "nemotron-340b", "helpfulness"):
        assert preset in captured.out
    assert "40 LLMBar preference pairs" in captured.out
