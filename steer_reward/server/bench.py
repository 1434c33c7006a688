"""``steer-reward bench --workload openrlhf-client``: OpenRLHF's GRPO reward-request pattern against
(a) ``steer-reward serve``, (b) a serve_rm.py-style baseline (``server/baseline.py``) and (c) in-process batched
scoring, on the same model and texts, in one run.

The pattern (OpenRLHF >= 0.9.1): every sample is its own request, sent as soon as it is generated, all in
flight at once; ``n_samples_per_prompt`` samples share each prompt; each request opens its own aiohttp session
(as ``openrlhf/utils/agent.py`` does). Samples finish generation in no particular order, so requests are sent in
a seeded random order. Throughputs are ratios measured in one run, on one machine.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run_openrlhf_client_bench", "bench_model_dir", "shape_model_dir", "grpo_workload", "drive_requests",
           "prompt_prefills"]

BENCH_MODEL_VERSION = "v1"


def bench_model_dir() -> Path:
    """A ~28M-parameter random-weight Llama-shaped SteerLM-style RM (hidden 512, 8 layers, 9 outputs) with the
    demo tokenizer, built once into the demo cache."""
    from steer_reward.demo import STEERLM_LABELS, _build_atomically, build_demo_tokenizer, cache_dir

    def build(folder: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForSequenceClassification

        tokenizer = build_demo_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, num_labels=9,
            id2label=dict(enumerate(STEERLM_LABELS)), label2id={n: i for i, n in enumerate(STEERLM_LABELS)},
            architectures=["LlamaForSequenceClassification"],
        )
        torch.manual_seed(0)
        LlamaForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _build_atomically(cache_dir() / f"bench-rm-28m-{BENCH_MODEL_VERSION}", build)


def shape_model_dir(name: str, dtype: str = "bfloat16", device: str = "cpu") -> Path:
    """A folder holding a random-weight reward model of a named bench shape (``shape:NAME``, e.g. llama3-8b on a
    GPU) with the demo tokenizer, built once into the demo cache, so the servers can load it like a checkpoint."""
    from steer_reward.bench.shapes import build_shape_model
    from steer_reward.demo import _build_atomically, build_demo_tokenizer, cache_dir

    def build(folder: Path) -> None:
        tokenizer = build_demo_tokenizer()
        model = build_shape_model(name, dtype=dtype, device=device)
        if model.config.vocab_size < len(tokenizer):  # small test shapes: every tokenizer id must embed
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.architectures = ["LlamaForSequenceClassification"]
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _build_atomically(cache_dir() / f"bench-shape-{name}-{dtype}-{BENCH_MODEL_VERSION}", build)


def grpo_workload(tokenizer: Any, prompts: int, group_size: int, prompt_tokens: int, completion_tokens: int,
                  seed: int = 0) -> list[dict]:
    """``prompts × group_size`` OpenRLHF request bodies (one sample each), in a seeded random order.

    Texts are windows of the bundled LLMBar sample's tokens; the prompt is templated with the tokenizer's chat
    template (as the actor does with --data.apply_chat_template) and the query ends with the actor's EOS.
    """
    from steer_reward.demo import sample_rows

    corpus = " ".join(t for r in sample_rows() for t in (r["prompt"], r["chosen"], r["rejected"]))
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)

    def window(length: int) -> str:
        start = rng.randrange(0, max(1, len(ids) - length))
        return tokenizer.decode(ids[start:start + length]).strip()

    eos = tokenizer.eos_token or ""
    bodies = []
    for _ in range(prompts):
        templated = tokenizer.apply_chat_template([{"role": "user", "content": window(prompt_tokens)}],
                                                  add_generation_prompt=True, tokenize=False)
        for _ in range(group_size):
            bodies.append({"query": [templated + window(completion_tokens) + eos], "prompts": [templated],
                           "labels": [None]})
    rng.shuffle(bodies)
    return bodies


async def drive_requests(url: str, bodies: list[dict], in_flight: int) -> tuple[list[float], list[float], float]:
    """(rewards in body order, latencies, wall seconds), ``in_flight`` requests at a time."""
    import aiohttp

    semaphore = asyncio.Semaphore(in_flight)
    timeout = aiohttp.ClientTimeout(total=600)

    async def one(body: dict) -> tuple[float, float]:
        async with semaphore:
            start = time.perf_counter()
            async with aiohttp.ClientSession(timeout=timeout) as session:  # agent.py: a session per request
                async with session.post(url, json=body) as response:
                    response.raise_for_status()
                    reply = await response.json()
            return reply["rewards"][0], time.perf_counter() - start

    start = time.perf_counter()
    results = await asyncio.gather(*(one(b) for b in bodies))
    return [r for r, _ in results], [t for _, t in results], time.perf_counter() - start


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def prompt_prefills(url: str) -> float | None:
    """Prompts a server ran through its model so far (``steer_reward_prompt_prefills_total``, summed over
    replicas); None when the server does not report it."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=60) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    values = [s.value for f in text_string_to_metric_families(text) if f.name == "steer_reward_prompt_prefills"
              for s in f.samples]
    return sum(values) if values else None


def _serve(name: str, server: Any, bodies: list[dict], in_flight: int, log: Any) -> dict:
    with server:
        before = prompt_prefills(server.url)  # the warm-up's samples are among the timed ones: count both
        asyncio.run(drive_requests(server.url + "/get_reward", bodies[:4], 4))  # warm-up, not timed
        rewards, latencies, seconds = asyncio.run(drive_requests(server.url + "/get_reward", bodies, in_flight))
        after = prompt_prefills(server.url)
    result = {"requests_per_s": len(bodies) / seconds, "seconds": seconds, "p50_ms": 1000 * _quantile(latencies, 0.5),
              "p99_ms": 1000 * _quantile(latencies, 0.99), "rewards": rewards,
              "prompt_prefills": None if before is None or after is None else after - before}
    print(f"  {name}: {result['requests_per_s']:.2f} req/s", file=log, flush=True)
    return result


def run_openrlhf_client_bench(args: Any) -> dict:
    """Run the three measurements and print throughputs and ratios; returns the numbers (also as JSON when
    ``args.json`` is set: a path to write, or true for stdout)."""
    import torch

    from steer_reward.quiet import quiet_transformers
    from steer_reward.config import parse_override
    from steer_reward.reward import SteerReward
    from steer_reward.server.openrlhf import parse_query
    from steer_reward.server.process import ServerProcess, free_port

    def opt(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    quiet_transformers()
    dtype, device = opt("dtype", "bfloat16"), opt("device", "cpu")
    model = opt("model", None) or str(bench_model_dir())
    if model.startswith("shape:"):
        model = str(shape_model_dir(model.split(":", 1)[1], dtype, device))
    prompts, group = int(opt("prompts", 16)), int(opt("group_size", 8))
    prompt_tokens, completion_tokens = int(opt("prompt_tokens", 600)), int(opt("completion_tokens", 150))
    in_flight = int(opt("in_flight", 64))
    overrides = dict(parse_override(o) for o in opt("overrides", []))
    overrides.update({"model.path": model, "model.dtype": dtype, "model.device": device})
    config = opt("config", None)

    reward = SteerReward.from_config(config, overrides=overrides)
    params = sum(p.numel() for p in reward.scorer.model.parameters())
    bodies = grpo_workload(reward.scorer.tokenizer, prompts, group, prompt_tokens, completion_tokens)
    log = sys.stderr
    print(f"OpenRLHF GRPO pattern: {prompts} prompts x {group} samples = {len(bodies)} one-sample requests, "
          f"{in_flight} in flight, prompts ~{prompt_tokens} and completions ~{completion_tokens} tokens; "
          f"model {model} ({params / 1e6:.1f}M parameters, {dtype}, {device})", file=log, flush=True)

    # (c) in-process batched scoring of the same samples (parsed exactly as the server parses them)
    parsed = [parse_query(b["query"][0], b["prompts"][0]) for b in bodies]
    reward.score([p.prompt for p in parsed[:4]], [p.response for p in parsed[:4]])  # warm-up
    start = time.perf_counter()
    in_process = reward.score([p.prompt for p in parsed], [p.response for p in parsed]).rewards.tolist()
    in_seconds = time.perf_counter() - start
    results: dict[str, Any] = {"in_process": {"requests_per_s": len(bodies) / in_seconds, "seconds": in_seconds}}
    print(f"  (c) in-process batched: {results['in_process']['requests_per_s']:.2f} samples/s", file=log, flush=True)
    del reward

    serve_args = (["--config", config] if config else []) + ["--model", model] + [
        a for k, v in overrides.items() if k != "model.path" for a in ("--set", f"{k}={v}")]
    logs = Path(tempfile.mkdtemp(prefix="steer-reward-bench-"))
    server = ServerProcess(serve_args, log_path=logs / "server.log")
    results["server"] = _serve("(a) steer-reward serve", server, bodies, in_flight, log)
    port = free_port()
    baseline = ServerProcess(command=[sys.executable, "-m", "steer_reward.server.baseline", "--model", model,
                                      "--dtype", dtype, "--device", device, "--port", str(port)], port=port,
                             log_path=logs / "baseline.log")
    results["baseline"] = _serve("(b) serve_rm-style baseline", baseline, bodies, in_flight, log)

    a, b, c = (results[k]["requests_per_s"] for k in ("server", "baseline", "in_process"))
    diff = float(torch.tensor(results["server"]["rewards"]).sub(torch.tensor(in_process)).abs().max())
    summary = {
        "workload": {"prompts": prompts, "group_size": group, "requests": len(bodies), "in_flight": in_flight,
                     "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "model": {"path": model, "parameters": params, "dtype": dtype, "device": device},
        "requests_per_s": {"server": a, "baseline": b, "in_process": c},
        "latency_ms": {k: {"p50": results[k]["p50_ms"], "p99": results[k]["p99_ms"]} for k in ("server", "baseline")},
        "server_over_baseline": a / b, "server_over_in_process": a / c,
        "max_abs_reward_diff_server_vs_in_process": diff,
        "prompt_prefills_server": results["server"]["prompt_prefills"],
    }
    target = getattr(args, "json", None)
    rows = [("(a) steer-reward serve", a, results["server"]), ("(b) serve_rm-style baseline", b, results["baseline"])]
    # With --json, stdout carries only the JSON object; the table goes to the log.
    print(f"\n{'':<32}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}\n"
          + "".join(f"{name:<32}{rate:>9.2f}{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}\n" for name, rate, r in rows)
          + f"{'(c) in-process batched':<32}{c:>9.2f}\n\n"
          f"(a)/(b) = {a / b:.2f}x   (a)/(c) = {100 * a / c:.0f}%   max |reward (a) - (c)| = {diff:.2e}",
          file=log if target is True else sys.stdout)
    if target:
        text = json.dumps(summary, indent=2)
        if isinstance(target, str):
            Path(target).write_text(text + "\n")
        else:
            print(text)
    return summary
