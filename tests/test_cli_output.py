"""Output files of the CLI: never the input, never emptied before the input is read, replaced only at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from steer_reward.cli import main
from steer_reward.commands.score import score_file

ROW = {"prompt": "What is 2+2?", "completion": "4"}


def _write_rows(path: Path, n: int) -> bytes:
    path.write_text("".join(json.dumps({**ROW, "id": i}) + "\n" for i in range(n)))
    return path.read_bytes()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("spelling", ["same", "dot-relative", "parent-relative", "symlink", "hardlink"])
def test_score_refuses_an_output_that_is_its_input(tmp_path, monkeypatch, capsys, spelling):
    data = tmp_path / "data"
    data.mkdir()
    source = data / "in.jsonl"
    original = _write_rows(source, 3)
    monkeypatch.chdir(data)
    output = {"same": "in.jsonl", "dot-relative": "./in.jsonl", "parent-relative": "../data/in.jsonl",
              "symlink": "link.jsonl", "hardlink": "hard.jsonl"}[spelling]
    if spelling == "symlink":
        os.symlink("in.jsonl", "link.jsonl")
    if spelling == "hardlink":
        os.link("in.jsonl", "hard.jsonl")
    assert main(["score", "--model", "demo", "--input", "in.jsonl", "--output", output]) == 2
    assert "is the input" in capsys.readouterr().err
    assert source.read_bytes() == original


def test_a_missing_input_leaves_an_existing_output_as_it_was(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    assert main(["score", "--model", "demo", "--input", str(tmp_path / "typo.jsonl"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert out.read_text() == "earlier results\n"


def test_an_interrupted_run_keeps_the_old_output_and_what_was_scored(tmp_path, make_reward, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_rows(source, 5)
    out.write_text("earlier results\n")
    reward = make_reward()
    calls = []

    class Interrupting:
        scorer, config = reward.scorer, reward.config

        def score(self, prompts, completions):
            calls.append(len(prompts))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return reward.score(prompts, completions)

    with pytest.raises(KeyboardInterrupt):
        score_file(Interrupting(), source, out, chunk_size=2, progress=False)
    assert out.read_text() == "earlier results\n"
    partial = tmp_path / "out.jsonl.partial"
    assert [json.loads(line)["id"] for line in partial.read_text().splitlines()] == [0, 1]
    assert "out.jsonl.partial" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def test_a_bad_first_line_leaves_an_existing_output_as_it_was(tmp_path, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("{not json\n" + json.dumps(ROW) + "\n")
    out.write_text("earlier results\n")
    assert main(["score", "--model", "demo", "--input", str(source), "--output", str(out)]) == 2
    assert f"{source}:1: not valid JSON" in capsys.readouterr().err
    assert out.read_text() == "earlier results\n" and _leftovers(tmp_path) == []


def test_output_through_a_symlink_replaces_the_file_it_names(tmp_path):
    source, real = tmp_path / "in.jsonl", tmp_path / "real.jsonl"
    _write_rows(source, 2)
    real.write_text("old\n")
    os.chmod(real, 0o640)
    (tmp_path / "link.jsonl").symlink_to(real)
    assert main(["score", "--model", "demo", "--input", str(source), "--output", str(tmp_path / "link.jsonl")]) == 0
    assert (tmp_path / "link.jsonl").is_symlink()
    assert len(real.read_text().splitlines()) == 2 and (real.stat().st_mode & 0o777) == 0o640
    assert _leftovers(tmp_path) == []


def test_best_of_n_refuses_to_overwrite_its_prompts(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    assert main(["best-of-n", "--policy", "demo", "--model", "demo", "--prompts", str(prompts), "--n", "2",
                 "--output", str(tmp_path / "." / "prompts.jsonl")]) == 2
    assert "is the input" in capsys.readouterr().err
    assert prompts.read_text() == json.dumps({"prompt": "Say hi."}) + "\n"


def test_reselect_refuses_to_draw_over_its_scored_file(tmp_path, capsys):
    scored = tmp_path / "scored.png"
    scored.write_text("{}\n")
    assert main(["reselect", "--scored", str(scored), "--config", "configs/rewards/concise.yaml",
                 "--plot", str(scored)]) == 2
    assert "--plot" in capsys.readouterr().err and scored.read_text() == "{}\n"


def test_openrlhf_func_refuses_to_overwrite_its_config(tmp_path, capsys):
    config = tmp_path / "reward.yaml"
    config.write_text("model: {path: demo}\n")
    assert main(["openrlhf-func", "--config", str(config), "--out", str(config)]) == 2
    assert "is the input" in capsys.readouterr().err and config.read_text() == "model: {path: demo}\n"


@pytest.mark.parametrize("argv", [["calibrate", "--scored", "{f}", "--out", "{f}"],
                                  ["calibrate", "--scored", "s.jsonl", "--config", "{f}", "--out", "{f}"],
                                  ["eval", "--data", "{f}", "--plot", "{f}"],
                                  ["eval", "--data", "{f}", "--scored", "{f}"]], ids=lambda a: "-".join(a[:4:3]))
def test_calibrate_and_eval_refuse_to_overwrite_an_input(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "input.jsonl"
    source.write_text("precious\n")
    assert main([a.format(f=source) for a in argv]) == 2
    assert "is the input" in capsys.readouterr().err and source.read_text() == "precious\n"


def test_export_folded_never_writes_into_the_model_or_a_foreign_folder(tmp_path, demo_model_path, capsys):
    import shutil

    model = shutil.copytree(demo_model_path, tmp_path / "rm")  # a copy: a regression must not spoil the shared one
    model_config = model / "config.json"
    before = model_config.read_bytes()
    assert main(["export-folded", "--model", str(model), "--out", str(tmp_path / "." / "rm")]) == 2
    assert "is the input" in capsys.readouterr().err and model_config.read_bytes() == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export-folded", "--model", "demo", "--out", str(foreign)]) == 2
    assert "other files" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "folded"
    assert main(["export-folded", "--model", "demo", "--out", str(out)]) == 0
    assert main(["export-folded", "--model", "demo", "--config", "configs/rewards/helpfulness.yaml",
                 "--out", str(out)]) == 0  # an earlier export is replaced as a whole
    config = json.loads((out / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["steer_reward"]["weights"]["correctness"] == 0.0
    assert _leftovers(tmp_path) == []
