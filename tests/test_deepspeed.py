"""backend: deepspeed — ZeRO-3 scoring on 2 CPU ranks (gloo) against a single-process plain HF forward.

Multi-rank checks run worker scripts from tests/dist/ under ``torch.distributed.run`` with their own timeout, one
launch per group of checks; the parent builds the demo model first so ranks never race to build it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import plain_hf_attributes

pytest.importorskip("deepspeed")

DIST = Path(__file__).parent / "dist"
LAUNCH_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script: str, *args: str, nproc: int = 2, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``tests/dist/<script>`` on ``nproc`` CPU ranks; a hang fails the test at ``timeout``."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # --standalone: the launcher binds its own free port (no pick-then-bind race with other jobs on the machine).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(DIST / script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def worker(name: str):
    """A worker script under tests/dist/ as a module, for its constants and helpers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"dist_{name}", DIST / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def failure(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"


# ------------------------------------------------------------------------------------------- 2 ranks, scoring


@pytest.fixture(scope="module")
def zero3_run(demo_model_path, tmp_path_factory):
    """One 2-rank run of tests/dist/zero3_scoring.py; its two rank reports."""
    out = tmp_path_factory.mktemp("zero3")
    proc = launch("zero3_scoring.py", str(out))
    assert proc.returncode == 0, failure(proc)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


SCENARIO_NAMES = ["3_vs_17", "empty_vs_37", "groups_split_across_ranks", "singles_vs_groups"]


def scenario_pairs(scenario: str, rank: int) -> list[tuple[str, str]]:
    scoring = worker("zero3_scoring")
    if scenario in scoring.GROUP_SCENARIOS:
        return scoring.group_scenario(scenario, rank)
    names = list(scoring.SCENARIOS)
    offset = sum(sum(scoring.SCENARIOS[name]) for name in names[: names.index(scenario)])
    return scoring.shard(scoring.all_pairs(), scoring.SCENARIOS[scenario], rank, offset)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_zero3_scores_equal_plain_hf_forward_with_uneven_ranks(zero3_run, demo_scorer, scenario):
    from steer_reward.formatting import RewardFormatter

    formatter = RewardFormatter(demo_scorer.tokenizer, "chat_template", 96)
    for report in zero3_run:
        assert report["strategy"] == "auto"
        run = report[scenario]
        mine = scenario_pairs(scenario, report["rank"])
        expected_ids = [list(s.input_ids) for s in formatter.encode([p for p, _ in mine], [c for _, c in mine])]
        assert run["input_ids"] == expected_ids
        assert len(run["attributes"]) == len(mine)
        if expected_ids:
            reference = torch.stack([plain_hf_attributes(demo_scorer.model, ids) for ids in expected_ids])
            torch.testing.assert_close(torch.tensor(run["attributes"]), reference, atol=1e-4, rtol=0)
    # Plans differ between ranks; every rank still ran the same number of forwards of every kind.
    planned = [r[scenario]["planned"] for r in zero3_run]
    assert planned[0] != planned[1]
    assert [r[scenario]["forward_calls"] for r in zero3_run] == planned
    kinds = [r[scenario]["kind_calls"] for r in zero3_run]
    assert kinds[0] == kinds[1], kinds
    assert [r[scenario]["forward_calls"] + r[scenario]["dummy_calls"] for r in zero3_run] == [sum(kinds[0].values())] * 2
    if scenario != "3_vs_17":  # groups went through prompt prefills and completion forwards
        assert kinds[0]["completion"] > 0 and kinds[0]["padded"] == 0


@pytest.mark.slow
def test_zero3_prompt_cached_on_one_rank_only(zero3_run, demo_scorer):
    """Rank 0 scores completions of a prompt it has cached (a completion forward, no prefill), rank 1 the same
    prompt uncached (whole sequences in a prefill forward): each runs a dummy of the kind it lacks, and every score
    equals a plain forward."""
    from steer_reward.formatting import RewardFormatter

    scoring = worker("zero3_scoring")
    formatter = RewardFormatter(demo_scorer.tokenizer, "chat_template", 96)
    for name in scoring.CACHE_SCENARIOS:
        for report in zero3_run:
            mine = scoring.group_scenario(name, report["rank"])
            ids = [s.input_ids for s in formatter.encode([p for p, _ in mine], [c for _, c in mine])]
            if ids:
                reference = torch.stack([plain_hf_attributes(demo_scorer.model, i) for i in ids])
                torch.testing.assert_close(torch.tensor(report[name]["attributes"]), reference, atol=1e-4, rtol=0)
        assert zero3_run[0][name]["kind_calls"] == zero3_run[1][name]["kind_calls"]
    hit, miss = (r["prompt_cache_hit_vs_miss"] for r in zero3_run)
    assert hit["cache_hits"] == 1 and miss["cache_hits"] == 0
    assert hit["kind_calls"] == {"prefill": 1, "completion": 1, "padded": 0}
    assert hit["forward_calls"] == miss["forward_calls"] == hit["dummy_calls"] == miss["dummy_calls"] == 1


@pytest.mark.slow
def test_zero3_a_sample_that_fails_to_encode_stops_every_rank_at_once(zero3_run):
    scoring = worker("zero3_scoring")
    first, second = (r["bad_sample"] for r in zero3_run)
    assert first["error"] == second["error"] == "FormattingError"
    assert first["message"] == second["message"]
    assert "rank 1: FormattingError" in first["message"] and str(scoring.BAD_COMPLETION) in first["message"]
    assert max(first["elapsed_s"], second["elapsed_s"]) < 30  # not the 120 s process-group timeout
    # The ranks stayed in step: the statistics rounds after it ran (checked in the statistics test).


@pytest.mark.slow
def test_zero3_each_rank_holds_half_the_parameters(zero3_run, demo_scorer):
    total = sum(p.numel() for p in demo_scorer.model.parameters())
    for report in zero3_run:
        assert report["numel"]["total"] == total
        # Norm weights stay whole (below the persistence threshold) but are still split in ds_tensor.
        assert abs(report["numel"]["held"] - total / 2) <= 0.01 * total, report["numel"]
        assert report["module_numel_plain"] < 0.05 * total  # outside forward the module holds no full weights


@pytest.mark.slow
def test_zero3_running_stats_identical_on_ranks_and_equal_single_process(zero3_run):
    from steer_reward.shaping import Moments
    STATS_ROUNDS = worker("zero3_scoring").STATS_ROUNDS

    first, second = zero3_run
    assert first["state"] == second["state"]  # bit-identical, not just close
    assert first["sync_calls"] == second["sync_calls"] == 2 * len(STATS_ROUNDS)  # attributes and rewards
    everything = torch.tensor(first["stats_attributes"] + second["stats_attributes"], dtype=torch.float64)
    expected = Moments.of(everything)
    stats = first["state"]["attribute_stats"]
    assert stats["count"] == expected.count == sum(sum(c) for c in STATS_ROUNDS)
    torch.testing.assert_close(torch.tensor(stats["mean"], dtype=torch.float64), expected.mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.tensor(stats["m2"], dtype=torch.float64), expected.m2, atol=1e-8, rtol=1e-10)
    # Rank 0's saved state restores on every rank and shapes identically.
    assert first["restored_state"] == second["restored_state"] == first["state"]
    assert first["restored_rewards"] == second["restored_rewards"]


@pytest.mark.slow
def test_grpo_two_steps_under_accelerate_zero3_with_colocated_reward(demo_model_path, demo_policy_path, tmp_path):
    pytest.importorskip("trl")
    config = Path(__file__).parents[1] / "configs/deepspeed/accelerate_zero3.yaml"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(free_port()), str(DIST / "zero3_grpo.py"),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, failure(proc)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["zero_stage"] == 3 and report["steps"] == 2
        assert len(report["reward_means"]) == 2 and report["finite"]
        for part in ("policy_numel", "rm_numel"):  # policy and reward model both sharded across the 2 ranks
            held, total = report[part]["held"], report[part]["total"]
            assert abs(held - total / 2) <= 0.01 * total, (part, report[part])
        assert report["state"]["attribute_stats"]["count"] == 2 * 2 * 4  # 2 steps x 2 ranks x 4 completions
    assert reports[0]["state"] == reports[1]["state"]


@pytest.mark.slow
def test_grpo_zero3_launch_script_runs_tiny(demo_model_path, demo_policy_path, tmp_path):
    """The shipped launch command (train_examples/grpo_trl_zero3.sh) on 2 CPU ranks with the demo models."""
    pytest.importorskip("trl")
    script = Path(__file__).parents[1] / "train_examples/grpo_trl_zero3.sh"
    env = dict(os.environ, NUM_PROCESSES="2", MAIN_PROCESS_PORT=str(free_port()), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(script), "--tiny", "--report-to", "none", "--output-dir", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, failure(proc)
    assert "rewards/steer_reward/mean" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ faults


@pytest.mark.slow
def test_absent_peer_is_a_clear_error_within_the_timeout(demo_model_path, tmp_path):
    TIMEOUT_S = worker("zero3_dead_peer").TIMEOUT_S

    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="2", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(DIST / "zero3_dead_peer.py"), "absent", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 3, failure(proc)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["error"] == "DistributedError"
    assert "rank 0 of 2" in result["message"] and "never started" in result["message"]
    assert result["elapsed_s"] < TIMEOUT_S * 3
    assert time.monotonic() - start < LAUNCH_TIMEOUT_S


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dies", "stalls"])
def test_dead_or_stalled_peer_ends_in_a_clear_error(demo_model_path, tmp_path, mode):
    TIMEOUT_S = worker("zero3_dead_peer").TIMEOUT_S

    proc = launch("zero3_dead_peer.py", mode, str(tmp_path))
    assert proc.returncode != 0, failure(proc)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["error"] == "DistributedError", failure(proc)
    assert "all-reduce MAX" in result["message"]
    assert result["elapsed_s"] < TIMEOUT_S * 3


@pytest.mark.slow
def test_retry_after_a_forward_failed_part_way_on_one_rank_is_refused(demo_model_path, tmp_path):
    TIMEOUT_S = worker("zero3_dead_peer").TIMEOUT_S

    proc = launch("zero3_dead_peer.py", "fails_mid_forward", str(tmp_path))
    assert proc.returncode != 0, failure(proc)
    failed, waiting = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (1, 0))
    assert failed["error"] == "DistributedError", failure(proc)
    assert "out of step" in failed["message"] and "OutOfMemoryError" in failed["message"]
    assert failed["elapsed_s"] < 1  # refused without waiting in any collective
    assert waiting["error"] == "DistributedError" and "forward" in waiting["message"], failure(proc)
    assert waiting["elapsed_s"] < TIMEOUT_S * 3


def test_without_a_distributed_launch_is_a_config_error(monkeypatch, demo_model_path):
    from steer_reward.backends.deepspeed import build_deepspeed_scorer
    from steer_reward.config import ConfigError, load_config
    from steer_reward.distributed import LAUNCH_ENV, is_distributed

    if is_distributed():
        pytest.skip("a process group already exists in this test process")
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="needs a distributed launch.*torchrun"):
        build_deepspeed_scorer(load_config({"backend": "deepspeed", "model": {"path": demo_model_path}}))


def test_adapter_with_zero3_is_a_config_error(demo_model_path):
    from steer_reward.backends.deepspeed import build_deepspeed_scorer
    from steer_reward.config import ConfigError, load_config

    config = load_config({"backend": "deepspeed", "model": {"path": demo_model_path, "adapter": "lora"}})
    with pytest.raises(ConfigError, match="merge the adapter"):
        build_deepspeed_scorer(config)


# ---------------------------------------------------------------------------------- configs, in one process


def test_default_inference_config_is_stage3_no_optimizer_int_nested_buckets():
    from steer_reward.backends.deepspeed import inference_config

    cfg = inference_config("float32", hidden=64)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and "optimizer" not in cfg
    assert all(isinstance(zero[k], int) for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                                  "stage3_param_persistence_threshold"))
    assert not any("." in k for k in cfg)
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    offloaded = inference_config("bfloat16", 64, offload_params=True)
    assert offloaded["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert inference_config("bfloat16", 64)["bf16"] == {"enabled": True}


def test_shipped_inference_json_normalizes():
    from steer_reward.backends.deepspeed import normalize_inference_config

    raw = json.loads((Path(__file__).parents[1] / "configs/deepspeed/zero3_inference.json").read_text())
    cfg = normalize_inference_config(raw, "float32", hidden=64)
    assert cfg["zero_optimization"]["stage"] == 3
    assert all(v != "auto" for v in cfg["zero_optimization"].values())


def test_user_json_auto_values_become_numbers():
    from steer_reward.backends.deepspeed import normalize_inference_config

    raw = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
           "bf16": {"enabled": "auto"},
           "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 5e8,
                                 "stage3_param_persistence_threshold": "auto"}}
    cfg = normalize_inference_config(raw, "bfloat16", hidden=64)
    assert "train_batch_size" not in cfg and "gradient_clipping" not in cfg
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["bf16"]["enabled"] is True
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64 and zero["stage3_prefetch_bucket_size"] == 500_000_000
    assert all(type(zero[k]) is int for k in zero if k != "stage")


@pytest.mark.parametrize("raw, message", [
    ({"zero_optimization": {"stage": 2}}, "stage must be 3"),
    ({"zero_optimization": {"stage": 3}, "zero_optimization.reduce_bucket_size": 10}, "dotted keys.*nest"),
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}, "optimizer"),
    ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, "bf16.enabled is True but model.dtype"),
    ({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "auto"}}, "only a trainer resolves"),
])  # fmt: skip
def test_user_json_that_cannot_work_is_a_clear_error(raw, message):
    from steer_reward.backends.deepspeed import normalize_inference_config
    from steer_reward.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        normalize_inference_config(raw, "float32", hidden=64)


def test_config_from_trainer_plugin_follows_offload_and_drops_training_keys():
    from steer_reward.backends.deepspeed import build_ds_config
    from steer_reward.config import load_config

    trainer = {"train_batch_size": "auto", "gradient_clipping": "auto", "optimizer": {"type": "AdamW"},
               "bf16": {"enabled": True},
               "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "stage3_prefetch_bucket_size":
                                     "auto"}}
    cfg = build_ds_config(load_config({"backend": "deepspeed"}), hidden=64, dtype="float32", trainer=trainer)
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "optimizer" not in cfg and "auto" not in json.dumps(cfg)
    assert cfg["bf16"]["enabled"] is False  # model.dtype decides the RM's precision, not the policy's


# ------------------------------------------------------------------------------------- pieces, one process


def test_last_token_head_equals_plain_hf_forward(demo_scorer):
    from steer_reward.backends.deepspeed import LastTokenHead
    from steer_reward.forward import pad_right

    samples = demo_scorer.encode(["Hi", "Name three colors of the rainbow, please."], ["Hello!", "Red, green, blue."])
    input_ids, mask = pad_right([s.input_ids for s in samples], demo_scorer.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        got = LastTokenHead(demo_scorer.model)(input_ids=input_ids, attention_mask=mask).logits
    reference = torch.stack([plain_hf_attributes(demo_scorer.model, s.input_ids) for s in samples])
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_rank_order_merge_equals_moments_of_all_rows():
    from steer_reward.distributed import RankMomentsSync, merge_in_rank_order
    from steer_reward.shaping import Moments

    torch.manual_seed(0)
    rows = torch.randn(23, 9, dtype=torch.float64)
    parts = [Moments.of(rows[:0]), Moments.of(rows[:5]), Moments.of(rows[5:])]  # an empty rank included
    merged = merge_in_rank_order(parts)
    expected = Moments.of(rows)
    assert merged.count == 23
    torch.testing.assert_close(merged.mean, expected.mean)
    torch.testing.assert_close(merged.m2, expected.m2)
    # One process: the sync is the identity.
    sync = RankMomentsSync()
    same = sync(parts[1])
    assert same.count == 5 and torch.equal(same.mean, parts[1].mean) and sync.calls == 1


def test_collective_turns_only_communication_failures_into_distributed_errors():
    from steer_reward.distributed import DistributedError, collective

    with pytest.raises(DistributedError, match="all-reduce did not complete within 5 s.*never started"):
        with collective("an all-reduce", 5):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    with pytest.raises(DistributedError):
        with collective("joining"):
            raise torch.distributed.DistStoreError("Timed out after 9 seconds waiting for clients. 1/2 clients joined.")
    with pytest.raises(DistributedError, match="pair closure"):  # every collective after a gloo timeout
        with collective("an all-gather"):
            raise RuntimeError("Application timeout caused pair closure")
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes") as info:  # a model bug stays a model bug
        with collective("a forward"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (3x64 and 32x9)")
    assert not isinstance(info.value, DistributedError)


def test_trainer_settings_are_read_from_accelerate_launch_env(monkeypatch):
    from accelerate.state import AcceleratorState

    from steer_reward.backends.deepspeed import build_ds_config, trainer_deepspeed_config
    from steer_reward.config import load_config

    # What every TrainingArguments does on construction: no trainer state yet, as when the reward is built first.
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert trainer_deepspeed_config() is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    trainer = trainer_deepspeed_config()
    assert trainer["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    cfg = build_ds_config(load_config({"backend": "deepspeed"}), hidden=64, dtype="float32", trainer=trainer)
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu" and cfg["bf16"]["enabled"] is False


class EngineStub:
    """One process stands in for a ZeRO-3 engine: calls its module (the engine's forward does the same)."""

    def __init__(self, model) -> None:
        from steer_reward.backends.deepspeed import LastTokenHead

        self.module = LastTokenHead(model)

    def __call__(self, **kwargs):
        return self.module(**kwargs)


@pytest.mark.parametrize("strategy", ["auto", "padded"])
def test_zero3_backend_runs_the_local_plan_and_dummy_forwards_of_each_kind(demo_scorer, monkeypatch, strategy):
    """The ZeRO-3 backend's plan and dummies in one process: agreed counts above this rank's own run dummy
    forwards of each kind (a completion dummy reads a one-token zero prompt), whose results are discarded."""
    from steer_reward.backends import deepspeed as ds
    from steer_reward.config import BatchingConfig

    samples = demo_scorer.encode(["Name a color.", "Hi", "Name a color.", "Name a color."],
                                 ["Red.", "Hello!", "Blue, or green.", ""])
    backend = ds.ZeroInferenceBackend(EngineStub(demo_scorer.model), demo_scorer.tokenizer.pad_token_id, 9,
                                      BatchingConfig(strategy=strategy, forward_overhead_tokens=0))
    assert backend.strategy == strategy
    mine = dict(backend.kind_calls)
    monkeypatch.setattr(ds, "all_reduce_max", lambda values, device, timeout, what: [v + 2 for v in values[:3]] + [0])
    got = backend.attributes(samples)
    reference = torch.stack([plain_hf_attributes(demo_scorer.model, s.input_ids) for s in samples])
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)
    planned = len(backend.plan(samples))
    assert backend.forward_calls == planned and backend.dummy_calls == 6
    ran = {k: backend.kind_calls[k] - mine[k] for k in mine}
    assert sum(ran.values()) == planned + 6 and all(n >= 2 for n in ran.values())
    if strategy == "auto":
        assert ran["completion"] == 3 and ran["padded"] == 2


def test_zero3_backend_falls_back_to_padded_for_models_ragged_forwards_cannot_run(demo_scorer):
    from steer_reward.backends.deepspeed import ZeroInferenceBackend
    from steer_reward.config import BatchingConfig

    model = demo_scorer.model
    previous = model.config._attn_implementation
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.warns(UserWarning, match="using padded micro-batches"):
            backend = ZeroInferenceBackend(EngineStub(model), 0, 9, BatchingConfig(strategy="prefix"))
    finally:
        model.config._attn_implementation = previous
    assert backend.strategy == "padded" and backend.groups is None


def test_zero3_encoding_failure_in_one_process_raises_the_agreed_error():
    from steer_reward.backends.deepspeed import SCORING_FAILED
    from steer_reward.distributed import DistributedError, agreed_failure
    from steer_reward.errors import InputError
    from steer_reward.formatting import FormattingError

    failure = agreed_failure(FormattingError("bad one"), SCORING_FAILED)
    assert type(failure) is FormattingError
    assert str(failure).endswith("no rank scored this batch (rank 0: FormattingError: bad one)")
    failure = agreed_failure(KeyError("x"), SCORING_FAILED)
    assert type(failure) is DistributedError and "rank 0: KeyError: 'x'" in str(failure)
    failure = agreed_failure(InputError("line 3"), SCORING_FAILED)  # a ValueError subclass: a ValueError everywhere
    assert type(failure) is ValueError and "rank 0: InputError: line 3" in str(failure)


class FailingEngine(EngineStub):
    """An engine whose ``fail_at``-th forward stops part-way, like an out-of-memory in one rank's layer."""

    def __init__(self, model, fail_at: int) -> None:
        super().__init__(model)
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return super().__call__(**kwargs)


def test_zero3_rank_whose_forward_failed_part_way_refuses_later_calls(demo_scorer, monkeypatch):
    """A forward that stops part-way leaves the other ranks inside collectives this rank never joins: a later call
    must raise at once, without any collective, instead of pairing its all-reduce with another rank's parameter
    all-gather. An encoding failure, which every rank raises at the agreement, leaves the ranks in step."""
    from steer_reward.backends import deepspeed as ds
    from steer_reward.config import BatchingConfig
    from steer_reward.distributed import DistributedError
    from steer_reward.formatting import FormattingError

    samples = demo_scorer.encode(["Name a color."] * 3 + ["Hi"], ["Red.", "Blue.", "Green, or teal.", "Hello!"])
    engine = FailingEngine(demo_scorer.model, fail_at=3)
    backend = ds.ZeroInferenceBackend(engine, demo_scorer.tokenizer.pad_token_id, 9,
                                      BatchingConfig(strategy="prefix", forward_overhead_tokens=0))
    agreements = []
    monkeypatch.setattr(ds, "all_reduce_max", lambda values, device, timeout, what: agreements.append(values) or values)
    with pytest.raises(FormattingError):
        backend.attributes([], error=FormattingError("bad one"))
    reference = torch.stack([plain_hf_attributes(demo_scorer.model, s.input_ids) for s in samples])
    torch.testing.assert_close(backend.attributes(samples), reference, atol=1e-4, rtol=0)  # still scores
    with pytest.raises(torch.OutOfMemoryError):
        backend.attributes(samples)
    before = (len(agreements), engine.calls)
    with pytest.raises(DistributedError, match=r"failed in the middle .*\(OutOfMemoryError: CUDA out of memory"):
        backend.attributes(samples)
    assert (len(agreements), engine.calls) == before  # nothing joined, nothing run


def test_zero3_planning_failure_rides_the_count_agreement_and_leaves_the_rank_in_step(demo_scorer, monkeypatch):
    """Planning runs before the count agreement: a failure there is flagged in it (every rank raises it), and the
    rank stays in step, as for a sample that fails to encode; a refused argument joins the same way."""
    from steer_reward.backends import deepspeed as ds
    from steer_reward.config import BatchingConfig
    from steer_reward.distributed import DistributedError
    from steer_reward.scoring import AttributeScores

    samples = demo_scorer.encode(["Name a color."] * 2, ["Red.", "Blue."])
    backend = ds.ZeroInferenceBackend(EngineStub(demo_scorer.model), demo_scorer.tokenizer.pad_token_id, 9,
                                      BatchingConfig(strategy="prefix", forward_overhead_tokens=0))
    agreements = []
    monkeypatch.setattr(ds, "all_reduce_max", lambda values, device, timeout, what: agreements.append(values) or values)
    real_plan = backend.groups.plan
    monkeypatch.setattr(backend.groups, "plan", lambda *a: (_ for _ in ()).throw(KeyError("a plan bug")))
    with pytest.raises(DistributedError, match=r"no rank scored this batch \(rank 0: KeyError: 'a plan bug'\)"):
        backend.attributes(samples)
    assert agreements == [[0, 0, 0, 1]] and backend.out_of_step is None
    monkeypatch.setattr(backend.groups, "plan", real_plan)
    scorer = ds.DeepSpeedAttributeScorer(demo_scorer.formatter, backend, demo_scorer.schema)
    with pytest.raises(ValueError, match=r"no rank scored this batch \(rank 0: ValueError: got 1 lengths"):
        scorer.fail_together(ValueError("got 1 lengths for 2 samples"))
    assert agreements[-1] == [0, 0, 0, 1] and backend.out_of_step is None
    scores = scorer.score(["Name a color."] * 2, ["Red.", "Blue."])
    assert isinstance(scores, AttributeScores) and agreements[-1][-1] == 0
    reference = torch.stack([plain_hf_attributes(demo_scorer.model, s.input_ids) for s in samples])
    torch.testing.assert_close(scores.values, reference, atol=1e-4, rtol=0)
