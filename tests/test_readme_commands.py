"""The README's commands, read from its code blocks and run as written, as on a fresh machine: no W&B login, no
WANDB_MODE, an empty HOME. A command added to or changed in the README is run here or must say why not.

Only three rewrites, all stated: reward-model and policy paths under ``/models/`` become ``demo`` (an actor
tokenizer there becomes the demo policy's folder); of the set-up
chain only its ``steer-reward demo`` runs (a test cannot reinstall the package); the test command runs with
``--collect-only`` (running the suite inside the suite would recurse).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

CLI_RUN = {"score", "demo", "best-of-n", "reselect", "export-folded", "openrlhf-func", "eval", "calibrate"}
"""Subcommands whose README examples run with the demo models."""
NOT_RUN = {
    "steer-reward inspect-nemo": "needs a NeMo checkpoint; tests/test_convert_*.py convert tiny ones",
    "steer-reward convert-nemo": "needs a NeMo checkpoint; tests/test_convert_*.py convert tiny ones",
    "steer-reward serve": "a server that runs until stopped; tests/test_server.py and tests/test_client.py start it",
    "steer-reward bench": "a benchmark taking minutes; tests/test_bench.py runs small workloads",
    "python benchmarks/gpu_bench.py": "needs a GPU",
    "ray start": "starts a Ray cluster node (multi-node set-up)",
    "serve start": "Ray Serve's own CLI on a running cluster; tests/test_ray_serve.py serves through Ray",
    "serve run": "Ray Serve's own CLI on a running cluster; tests/test_ray_serve.py serves through Ray",
    "python train_examples/grpo_trl.py --reward-config": "needs real checkpoints; its --tiny form runs here",
    "train_examples/grpo_trl_zero3.sh --reward-model": "needs GPUs and real checkpoints; its --tiny form runs here",
}
"""Commands not run here, by how they start, and why."""


def readme_commands() -> list[str]:
    """Every shell command in README.md's ```bash blocks (continuations joined, comments dropped), in order."""
    commands, block = [], None
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            continue
        if block != "bash":
            continue
        text = line.split(" # ", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if commands and commands[-1].endswith("\\"):
            commands[-1] = commands[-1][:-1].rstrip() + " " + text.strip()
        elif text:
            commands.append(text.strip())
    return commands


def _kind(command: str) -> str:
    if "pip install" in command:
        return "setup"
    if "python -m pytest" in command:
        return "tests"
    if "--tiny" in command:
        return "training"
    for prefix in NOT_RUN:
        if command.startswith(prefix):
            return "not run"
    words = shlex.split(command)
    if words[0] == "steer-reward" and words[1] in CLI_RUN:
        return "cli"
    return "unknown"


def test_every_readme_command_is_run_or_says_why_not():
    commands = readme_commands()
    assert len(commands) >= 10
    unknown = [c for c in commands if _kind(c) == "unknown"]
    assert not unknown, f"add these README commands to a test here (or to NOT_RUN with a reason): {unknown}"
    for kind in ("setup", "tests", "training", "cli", "not run"):
        assert any(_kind(c) == kind for c in commands), kind


def fresh_machine_env(home: Path) -> dict[str, str]:
    """This environment minus any W&B set-up or DeepSpeed accelerator choice, with an empty HOME, and the
    interpreter's folder first on PATH (as an activated virtual environment has it)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WANDB_") and k not in ("DS_ACCELERATOR", "NETRC", "XDG_CONFIG_HOME")}
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def workspace(tmp_path) -> Path:
    """An empty folder to run in, with the repository's folders the commands name linked in."""
    for name in ("configs", "train_examples", "steer_reward"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                    for p in ("Say hi.", "Name a color.")))
    pairs = (ROOT / "tests/data/llmbar/llmbar_rewardbench_style_first60.jsonl").read_text().splitlines()[:8]
    (tmp_path / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    return tmp_path


def _run(command: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=fresh_machine_env(cwd / "home"),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, f"{command}\n{result.stderr[-4000:]}"
    return result


def _demo_models(command: str) -> str:
    from steer_reward.demo import demo_policy_dir

    command = re.sub(r"--actor-tokenizer /models/\S+", f"--actor-tokenizer {demo_policy_dir()}", command)
    return re.sub(r"/models/\S+", "demo", command)


@pytest.mark.slow
def test_readme_cli_commands_run_with_the_demo_models(workspace):
    ran = []
    for command in readme_commands():
        kind = _kind(command)
        if kind == "setup":
            for part in command.split("&&"):
                if part.strip().startswith("steer-reward"):
                    ran.append(part.strip())
                    assert "chosen wins" in _run(part, workspace).stdout
        elif kind == "cli":
            ran.append(command)
            _run(_demo_models(command), workspace)
    assert {shlex.split(c)[1] for c in ran} == CLI_RUN
    assert len((workspace / "scored.jsonl").read_text().splitlines()) == 2  # best-of-n's (after score's)
    for written in ("picks.png", "rm-folded/config.json", "reward_func.py", "llmbar.scored.jsonl",
                    "calibrated.yaml", "calibration.png"):
        assert (workspace / written).stat().st_size > 0, written


def _suite_command() -> str:
    """The README's test command: the one run after activating the environment (the others pick files to run)."""
    (command,) = [c for c in readme_commands() if _kind(c) == "tests" and "&&" in c]
    return command


@pytest.mark.slow
def test_readme_test_command_collects_the_suite():
    runnable = _suite_command().split("&&")[-1].strip()  # the activation before it belongs to the set-up
    assert runnable.startswith("python -m pytest")
    result = _run(f"{runnable} --collect-only -p no:cacheprovider", ROOT)
    assert re.fullmatch(r"\d+ tests collected in [\d.]+s", result.stdout.strip().splitlines()[-1]), result.stdout[-500:]
    with open(ROOT / ".ci/run", encoding="utf-8") as ci:
        assert runnable in [line.strip() for line in ci], ".ci/run runs the README's test command"


TARGETED = [c for c in readme_commands() if _kind(c) == "tests" and c != _suite_command()]


@pytest.mark.parametrize("command", TARGETED, ids=[f"targeted-{i}" for i in range(len(TARGETED))])
def test_readme_targeted_test_commands_select_tests(command):
    """The README's commands that run part of the suite (sizes set by environment variables) name test files and
    selections that exist: each collects at least one test."""
    result = _run(f"{command} --collect-only -q -p no:cacheprovider", ROOT)
    assert re.search(r"^\d+ tests? collected", result.stdout, re.M) or re.search(
        r"^\d+/\d+ tests collected", result.stdout, re.M), result.stdout[-800:]


TRAINING = [c for c in readme_commands() if _kind(c) == "training"]


@pytest.mark.slow
@pytest.mark.parametrize("command", TRAINING, ids=[re.search(r"train_examples/(\S+)", c).group(1) for c in TRAINING])
def test_readme_training_examples_run_without_any_account(workspace, command):
    result = _run(command, workspace, timeout=900)
    if "--report-to none" not in command:
        assert "no W&B login found" in result.stderr and "logging offline" in result.stderr
        assert list((workspace / "wandb").glob("offline-run-*")), "an offline W&B run"
