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
