"""A quiet CLI: no warnings from libraries a command does not use (DeepSpeed's accelerator note above all)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from steer_reward.demo import DEMO_WARNING

PROGRESS = re.compile(r"^scoring: .*row")


def _run(args: list[str], tmp_path: Path, cache: Path) -> subprocess.CompletedProcess:
    # No DS_ACCELERATOR (a fresh shell has none: DeepSpeed then detects, and logs, the CPU fallback) and a fresh
    # demo cache, so the demo model is built here: save_pretrained is what makes Accelerate import DeepSpeed.
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["STEER_REWARD_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "steer_reward.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    # tqdm redraws with carriage returns: each redraw is one progress line.
    return [part for line in result.stderr.splitlines() for part in line.split("\r") if part.strip()]


def test_help_prints_nothing_on_stderr(tmp_path):
    result = _run(["--help"], tmp_path, tmp_path / "cache")
    assert result.returncode == 0 and "score" in result.stdout
    assert result.stderr == ""


def test_score_with_the_demo_model_prints_only_its_own_output(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "What is 2+2?", "completion": "4"}) + "\n")
    result = _run(["score", "--model", "demo", "--input", "in.jsonl", "--output", "out.jsonl"], tmp_path,
                  tmp_path / "fresh-cache")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "wrote 1 rows to out.jsonl\n"  # DeepSpeed's note went to stdout
    others = [line for line in _stderr_lines(result) if line != DEMO_WARNING and not PROGRESS.match(line)]
    assert others == [], others
    assert (tmp_path / "fresh-cache").is_dir()  # the demo model was built in this run
