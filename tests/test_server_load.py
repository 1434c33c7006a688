"""Load: 64 concurrent clients × 20 one-sample requests against the real server; every reply must equal the
in-process score of its own sample (0 lost, 0 mismatched). Prints p50/p99 latency and throughput."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch
import yaml

pytest.importorskip("fastapi")

from steer_reward.demo import sample_rows  # noqa: E402
from steer_reward.reward import SteerReward  # noqa: E402
from steer_reward.server.process import ServerProcess  # noqa: E402

CLIENTS, REQUESTS = 64, 20  # sustained load: the soak in test_server_faults.py


@pytest.mark.slow
def test_64_clients_x_20_requests_every_reply_is_its_own_score(demo_model_path, tmp_path):
    config = tmp_path / "load.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": demo_model_path, "device": "cpu", "max_length": 512}}))
    rows = sample_rows()
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    expected = SteerReward.from_config(config).score(prompts, completions).rewards
    n = len(prompts)

    async def client(http, c, latencies, results, failures):
        for j in range(REQUESTS):
            k = (c * REQUESTS + j * 7) % n  # clients interleave over the sample pool
            start = time.perf_counter()
            try:
                reply = await http.post("/score", json={"prompts": [prompts[k]], "completions": [completions[k]]})
            except httpx.HTTPError as err:
                failures.append(f"client {c} request {j}: {type(err).__name__}")
                continue
            latencies.append(time.perf_counter() - start)
            if reply.status_code != 200:
                failures.append(f"client {c} request {j}: {reply.status_code} {reply.text[:200]}")
                continue
            results.append((k, reply.json()["rewards"][0]))

    async def run(url):
        latencies, results, failures = [], [], []
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            start = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(client(http, c, latencies, results, failures)
                                                    for c in range(CLIENTS))), timeout=600)
            return latencies, results, failures, time.perf_counter() - start

    with ServerProcess(["--config", str(config)], log_path=tmp_path / "server.log") as server:
        latencies, results, failures, seconds = asyncio.run(run(server.url))
        metrics = httpx.get(server.url + "/metrics", timeout=30).text

    assert not failures, failures[:5]
    assert len(results) == CLIENTS * REQUESTS  # 0 lost
    got = torch.tensor([r for _, r in results])
    want = expected[[k for k, _ in results]]
    mismatched = int((~torch.isclose(got, want, atol=1e-4, rtol=1e-4)).sum())
    assert mismatched == 0, f"{mismatched} replies differ from their own sample's in-process score"
    lat = torch.tensor(latencies)
    batch_count = next(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("steer_reward_batch_samples_count"))
    print(f"\nload: {len(results)} requests in {seconds:.1f} s ({len(results) / seconds:.0f} req/s), "
          f"p50 {lat.quantile(0.5) * 1000:.1f} ms, p99 {lat.quantile(0.99) * 1000:.1f} ms, "
          f"{len(results) / batch_count:.1f} samples per model batch")
    assert batch_count < len(results)  # requests were merged into batches
