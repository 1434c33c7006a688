"""``steer-reward bench`` end to end on tiny workloads: the report's keys and the fast path's fidelity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steer_reward.bench.roofline import useful_flops
from steer_reward.bench.workloads import WorkloadSpec, build_workload, parse_range
from steer_reward.cli import main
from steer_reward.formatting import EncodedSample

TINY = ["--prompt-tokens", "20-60", "--completion-tokens", "0-30", "--repeats", "1", "--json"]


def bench_json(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, *TINY]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_grpo_on_shape_reports_every_path(capsys):
    report = bench_json(capsys, "--model", "shape:tiny", "--prompts", "2", "--group-size", "4")
    for path in ("trl", "bucketed", "steer"):
        assert report["paths"][path]["tokens_per_s"] > 0
    assert report["paths"]["steer"]["strategy"] == "auto"
    for key in ("speedup_vs_trl", "speedup_vs_bucketed", "roofline_fraction", "gemm_gflops"):
        assert report[key] > 0
    assert report["workload"]["samples"] == 8
    assert report["workload"]["unique_tokens"] < report["workload"]["tokens"]
    assert report["max_abs_diff"] < 1e-4
    assert max(report["max_abs_diff_by_path"].values()) < 1e-4
    # The spread of the repeats, the CPU-time ratios, and every path's peak CPU memory.
    for path in report["paths"].values():
        assert path["seconds_spread"]["min"] == path["seconds"] <= path["seconds_spread"]["max"]
        assert path["peak_memory_mb"] > 0 and path["cpu_seconds"] > 0
    assert report["memory_vs_bucketed"] > 0
    assert report["cpu_time"]["roofline_fraction"] > 0 and report["cpu_time"]["speedup_vs_trl"] > 0
    assert report["paths"]["steer"]["forwards"] == 2  # one prefill, one completion forward


def test_cpu_peak_allocated_sees_what_a_run_holds_at_once():
    import torch

    from steer_reward.bench.run import cpu_peak_allocated

    def hold_two():
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**20)
        del a
        return b.sum() + torch.ones(2**19).sum()  # peak: 4 + 4 MiB, then 4 + 2

    assert 7.9 <= cpu_peak_allocated(hold_two) <= 8.5


def test_bench_mixed_on_demo_with_config_override(capsys):
    report = bench_json(capsys, "--workload", "mixed", "--model", "demo", "--prompts", "3", "--group-size", "3",
                        "--set", "batching.strategy=packed")
    assert report["workload"]["samples"] == 3 + 1 + 3
    assert report["paths"]["steer"]["strategy"] == "packed"
    assert "packed" not in report["paths"]  # already the steer path
    assert report["max_abs_diff"] < 1e-4


def test_bench_rejects_unknown_shape_with_hint(capsys):
    assert main(["bench", "--model", "shape:cpu-30", *TINY]) == 2
    assert "did you mean 'cpu-30m'" in capsys.readouterr().err


def test_parser_leaves_openrlhf_client_defaults_to_the_server_bench():
    """The server benchmark fills its own defaults, so every generic option must parse to None when not given."""
    from steer_reward.cli import build_parser

    args = build_parser().parse_args(["bench", "--workload", "openrlhf-client", "--in-flight", "7"])
    assert args.in_flight == 7 and args.func.__module__ == "steer_reward.commands.bench"
    for name in ("model", "config", "device", "dtype", "prompts", "group_size", "prompt_tokens",
                 "completion_tokens"):
        assert getattr(args, name) is None, name
    assert args.overrides == [] and args.json is False


def test_workload_shapes_and_ranges():
    spec = WorkloadSpec("grpo", 3, 4, (5, 9), (0, 3), vocab_size=10, excluded=(9,), seed=1)
    samples = build_workload(spec)
    assert len(samples) == 12 and len({s.prompt_ids for s in samples}) == 3
    assert all(9 not in s.input_ids and 5 <= len(s.prompt_ids) <= 9 for s in samples)
    assert parse_range("256-1024") == (256, 1024) and parse_range("7") == (7, 7)
    with pytest.raises(ValueError):
        parse_range("0-5")


def test_useful_flops_counts_a_shared_prompt_once():
    # One sequence of T tokens: 2·N·T + 2·L·d·T(T+1)/... per DESIGN.md (context = position + 1).
    alone = useful_flops([EncodedSample((1, 2, 3), (4,))], non_embedding_params=10, layers=2, hidden=4)
    assert alone == 2 * 10 * 4 + 4 * 2 * 4 * (1 + 2 + 3 + 4)
    shared = useful_flops([EncodedSample((1, 2, 3), (4,)), EncodedSample((1, 2, 3), (5,))], 10, 2, 4)
    assert shared == alone + 2 * 10 + 4 * 2 * 4 * 4


@pytest.mark.slow
def test_gpu_bench_script_runs_end_to_end_on_cpu_at_a_tiny_shape(tmp_path, demo_model_path):
    """benchmarks/gpu_bench.py, every part (paths with MFU, the compiled variant, the server pattern), at a tiny shape
    on the CPU; the GPU numbers themselves come from running it on a GPU."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_bench.py"
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(script), "--device", "cpu", "--model", "shape:tiny", "--dtype", "float32",
           "--prompts", "2", "--group-size", "3", "--prompt-tokens", "20-40", "--completion-tokens", "0-12",
           "--repeats", "1", "--compile", "--compile-backend", "eager", "--server-prompts", "1",
           "--server-prompt-tokens", "40", "--server-completion-tokens", "10", "--server-in-flight", "2",
           "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    scoring = report["scoring"]
    assert set(scoring["mfu_by_path"]) == {"trl", "bucketed", "steer", "packed", "steer_compiled"}
    assert max(scoring["max_abs_diff_by_path"].values()) < 1e-4
    assert report["server"]["requests_per_s"]["server"] > 0 and report["server"]["requests_per_s"]["baseline"] > 0
    assert json.loads(proc.stdout) == report


@pytest.mark.slow
def test_zero3_bench_on_two_cpu_ranks(capsys, monkeypatch):
    """steer-reward bench --backend deepspeed launches its ranks itself; every path agrees with TRL's."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("trl")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    report = bench_json(capsys, "--backend", "deepspeed", "--model", "shape:tiny", "--prompts", "3",
                        "--group-size", "3")
    assert set(report["paths"]) == {"trl_zero3", "padded_zero3", "steer_zero3"}
    assert report["workload"]["ranks"] == 2 and report["workload"]["samples"] == 9
    assert max(p["max_abs_diff_vs_trl"] for p in report["paths"].values()) < 1e-4
    assert report["steer_strategy"] == "auto" and report["speedup_vs_padded_zero3"] > 0


def test_zero3_bench_refuses_what_it_cannot_run(capsys):
    assert main(["bench", "--backend", "deepspeed", "--model", "demo", *TINY]) == 2
    assert "shape:NAME" in capsys.readouterr().err
