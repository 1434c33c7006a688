"""The runnable training examples in --tiny mode: end to end on CPU with the demo models, wandb offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str], tmp_path: Path) -> tuple[str, Path]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / "train_examples" / script), "--tiny", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "one offline wandb run expected"
    return proc.stdout + proc.stderr, runs[0]


@pytest.mark.slow
def test_grpo_example_per_attribute_logs_every_attribute_to_wandb(tmp_path):
    out, run = _run("grpo_trl.py", ["--per-attribute", "--output-dir", str(tmp_path / "grpo")], tmp_path)
    logged = run.read_bytes()
    for name in ("helpfulness", "correctness", "coherence", "complexity", "verbosity"):
        assert f"rewards/{name}/mean".encode() in logged
    assert "RANDOM" in out
    assert (tmp_path / "grpo" / "checkpoint-2" / "steer_reward_state.json").is_file()


@pytest.mark.slow
def test_rloo_example_logs_shaped_reward_and_attribute_means(tmp_path):
    _, run = _run("rloo_trl.py", ["--output-dir", str(tmp_path / "rloo")], tmp_path)
    logged = run.read_bytes()
    assert b"rewards/steer_reward/mean" in logged and b"steer_reward/helpfulness" in logged


@pytest.mark.slow
def test_best_of_n_example(tmp_path):
    out, run = _run("best_of_n.py", ["--output", str(tmp_path / "scored.jsonl")], tmp_path)
    assert "file's choice" in out and "concise" in out
    assert len((tmp_path / "scored.jsonl").read_text().splitlines()) == 4
    assert b"reselect" in run.read_bytes()


# -- W&B without an account: offline unless the user set W&B up ------------------------------------------------------

@pytest.fixture
def wandb_mode(tmp_path, monkeypatch):
    """train_examples/wandb_mode.py on a machine with no W&B set-up (empty HOME, no WANDB_* variables)."""
    import importlib.util

    for name in [k for k in os.environ if k.startswith("WANDB_")] + ["NETRC"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("wandb_mode", ROOT / "train_examples" / "wandb_mode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_wandb_setup_means_offline_with_a_note(wandb_mode, capsys):
    assert wandb_mode.wandb_setup() is None
    wandb_mode.offline_unless_configured("none")
    wandb_mode.offline_unless_configured(["tensorboard"])
    assert "WANDB_MODE" not in os.environ
    wandb_mode.offline_unless_configured("wandb")
    assert os.environ["WANDB_MODE"] == "offline"
    assert capsys.readouterr().err.count("no W&B login found") == 1


@pytest.mark.parametrize("setup", ["api-key", "mode", "netrc", "settings"])
def test_a_configured_wandb_is_left_alone(wandb_mode, tmp_path, monkeypatch, capsys, setup):
    if setup == "api-key":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    elif setup == "mode":
        monkeypatch.setenv("WANDB_MODE", "disabled")
    elif setup == "netrc":
        (tmp_path / ".netrc").write_text("machine example.org login a password b\n")
        assert wandb_mode.wandb_setup() is None  # another host's entry is no W&B login
        (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    else:
        (tmp_path / ".config" / "wandb").mkdir(parents=True)
        (tmp_path / ".config" / "wandb" / "settings").write_text("[default]\nmode = online\n")
    assert wandb_mode.wandb_setup() is not None
    wandb_mode.offline_unless_configured("wandb")
    assert os.environ.get("WANDB_MODE") != "offline" and capsys.readouterr().err == ""
