"""OpenRLHF 0.11.2's own client code (``openrlhf/utils/agent.py``, loaded by path) against the real server and
against a ``reward_func`` file written by ``steer-reward openrlhf-func``: rewards equal in-process ``SteerReward``
on the same texts; a sample that cannot be scored gets the fallback reward in a 200 reply (OpenRLHF stops the
training step on any error reply), flagged per sample and counted in /metrics.

The rollout engine is OpenRLHF's vLLM seam (``await engine.generate(prompt_ids, sampling_params)``) served by
the real demo policy through ``transformers.generate``: vLLM does not run here, everything after it is OpenRLHF's.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("aiohttp")
pytest.importorskip("fastapi")
from openrlhf_harness import OPENRLHF_DIR, ModuleSwap, load_agent  # noqa: E402

if OPENRLHF_DIR is None:
    pytest.skip("openrlhf is not installed (pip install --no-deps openrlhf==0.11.2)", allow_module_level=True)

from steer_reward.reward import SteerReward  # noqa: E402
from steer_reward.server.openrlhf import reward_scores  # noqa: E402
from steer_reward.server.process import ServerProcess  # noqa: E402

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Tell me a joke about cats."}],
]
N_SAMPLES = 4  # per prompt, like --rollout.n_samples_per_prompt
FALLBACK = -1.5
MAX_LENGTH = 512


@pytest.fixture(scope="module")
def agent_module():
    """``openrlhf/utils/agent.py`` by path (its package ``__init__`` pulls ray/vLLM-era deps we do not install)."""
    swap = ModuleSwap()
    yield load_agent(swap)
    swap.restore()


@dataclass
class SamplingParams:
    """The fields of vLLM's SamplingParams that agent.py reads."""

    max_tokens: int | None = 24
    logprobs: int | None = None
    seed: int = 0


@dataclass
class PolicyEngine:
    """OpenRLHF's engine seam, generating with a real (tiny, random) causal LM."""

    model: object
    tokenizer: object
    calls: list = field(default_factory=list)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        tok = self.tokenizer
        banned = [[i] for i in tok.all_special_ids if i != tok.eos_token_id]  # keep the text parseable
        torch.manual_seed(sampling_params.seed + len(self.calls))
        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt_token_ids]), max_new_tokens=min(sampling_params.max_tokens,
                                      24), do_sample=True, top_k=50, bad_words_ids=banned,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        ids = out[0, len(prompt_token_ids):].tolist()
        self.calls.append(ids)
        finish = "stop" if ids and ids[-1] == tok.eos_token_id else "length"
        output = SimpleNamespace(token_ids=ids, text=tok.decode(ids, skip_special_tokens=True), finish_reason=finish,
                                 logprobs=None)
        return SimpleNamespace(outputs=[output])


@pytest.fixture(scope="module")
def actor(demo_policy_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_policy_path)
    return PolicyEngine(AutoModelForCausalLM.from_pretrained(demo_policy_path).eval(), tokenizer)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, demo_model_path):
    path = tmp_path_factory.mktemp("openrlhf") / "reward.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": demo_model_path, "device": "cpu", "max_length": MAX_LENGTH, "overlong": "reject"},
        "shaping": {"weights": "steerlm-70b"}, "server": {"fallback_reward": FALLBACK}}))
    return path


@pytest.fixture(scope="module")
def reference(config_path):
    return SteerReward.from_config(config_path)


@pytest.fixture(scope="module")
def server(config_path, tmp_path_factory, demo_policy_path):
    log = tmp_path_factory.mktemp("openrlhf-log") / "server.log"
    with ServerProcess(["--config", str(config_path), "--actor-tokenizer", demo_policy_path],
                       log_path=log) as process:
        yield process


async def _rollouts(executor, actor, prompts):
    """One sample per request, all in flight at once: OpenRLHF's pattern since 0.9.1."""
    tasks = [executor.execute(prompt, None, SamplingParams(seed=i), 512, actor.tokenizer, actor)
             for i, prompt in enumerate(prompts)]
    return await asyncio.gather(*tasks)


def _check_against_reference(outputs, prompts, actor, reference):
    for output, prompt in zip(outputs, prompts):
        assert output["reward"] is not None, "OpenRLHF got no reward (see its log line)"
    responses = []
    for output in outputs:
        start, end = output["action_ranges"][0]
        ids = output["observation_tokens"][start:end]
        if ids and ids[-1] == actor.tokenizer.eos_token_id:
            ids = ids[:-1]
        responses.append(actor.tokenizer.decode(ids, skip_special_tokens=False))
    messages = [m for m in MESSAGES for _ in range(N_SAMPLES)]
    expected = reference.score(messages, responses)
    got = torch.tensor([o["reward"][0] for o in outputs])
    torch.testing.assert_close(got, expected.rewards, atol=1e-4, rtol=1e-4)
    # scores: the reward through a logistic, inside OpenRLHF's default dynamic-filtering range (0, 1)
    torch.testing.assert_close(torch.tensor([o["scores"][0] for o in outputs]),
                               torch.tensor(reward_scores(expected.rewards.tolist(), "sigmoid")), atol=1e-4, rtol=1e-4)
    for name in reference.schema.live_names:
        logged = torch.tensor([o["extra_logs"][name][0] for o in outputs])
        torch.testing.assert_close(logged, expected.attributes.column(name), atol=1e-4, rtol=1e-4)
    assert all(o["extra_logs"]["reward_failed"] == [0.0] for o in outputs)


def _templated_prompts(actor):
    return [actor.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
            for m in MESSAGES for _ in range(N_SAMPLES)]


def test_openrlhf_client_gets_in_process_rewards_from_the_server(agent_module, actor, server, reference):
    executor = agent_module.SingleTurnAgentExecutor(remote_rm_url=server.url + "/get_reward")
    prompts = _templated_prompts(actor)
    outputs = asyncio.run(_rollouts(executor, actor, prompts))
    _check_against_reference(outputs, prompts, actor, reference)


def test_openrlhf_client_with_plain_prompts(agent_module, actor, server, reference):
    """Without --data.apply_chat_template the prompt is plain text: response = query[len(prompt):]."""
    executor = agent_module.SingleTurnAgentExecutor(remote_rm_url=server.url + "/get_reward")
    prompts = ["Question: what is 2+2?\nAnswer:", "Write one word about the sea:"]
    outputs = asyncio.run(_rollouts(executor, actor, prompts))
    responses = []
    for output in outputs:
        start, end = output["action_ranges"][0]
        ids = [i for i in output["observation_tokens"][start:end] if i != actor.tokenizer.eos_token_id]
        responses.append(actor.tokenizer.decode(ids))
    expected = reference.score(prompts, responses)
    torch.testing.assert_close(torch.tensor([o["reward"][0] for o in outputs]), expected.rewards, atol=1e-4,
                               rtol=1e-4)


def test_empty_query_list_gets_empty_rewards(server):
    import httpx

    reply = httpx.post(server.url + "/get_reward", json={"query": [], "prompts": [], "labels": []}, timeout=30)
    assert reply.status_code == 200 and reply.json()["rewards"] == []


def _samples_that_cannot_be_scored(demo_policy_path):
    """(query, prompt, reason) OpenRLHF could send that no reward can be computed for."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_policy_path)
    chat = tokenizer.apply_chat_template(MESSAGES[0], add_generation_prompt=True, tokenize=False)
    long_answer = "The quick brown fox jumps over the lazy dog. " * 120  # > MAX_LENGTH tokens on its own
    return [
        ("", "Question:", "query"),  # an empty query
        ("Question: 2+2? Answer: 4", "Something else", "query"),  # plain prompt that the query does not hold
        ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "", "query"),  # ends on a user turn
        ("<s> hello", "<s>", "query"),  # a prompt that is only a BOS token: /score refuses it too
        ("Question: hi \ud800 Answer: x", "Question: hi \ud800 Answer:", "query"),  # not valid Unicode
        (chat + long_answer + "<|eot_id|>", chat, "format"),  # over-long under model.overlong: reject
    ]


def _metric(text: str, name: str, **labels) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}{{{selector}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_samples_that_cannot_be_scored_get_the_fallback_through_openrlhfs_client(agent_module, server,
                                                                                 demo_policy_path):
    """OpenRLHF's own HTTP client (5 tries, then None and a crashed step) gets a 200 reply with a finite reward
    for each, flagged reward_failed, counted per reason in /metrics; no request was answered with an error."""
    import httpx

    before = httpx.get(server.url + "/metrics", timeout=30).text
    executor = agent_module.SingleTurnAgentExecutor(remote_rm_url=server.url + "/get_reward")
    cases = _samples_that_cannot_be_scored(demo_policy_path)
    live = None
    for query, prompt, reason in cases:
        replies = asyncio.run(executor._fetch_rewards_via_http([query], [prompt], [None]))
        reply = replies[0]
        assert reply["rewards"] == [FALLBACK], (query[:40], reply)
        assert reply["scores"] == reward_scores([FALLBACK], "sigmoid")
        assert reply["extra_logs"]["reward_failed"] == [1.0]
        assert [f["reason"] for f in reply["failures"]] == [reason], reply["failures"]
        live = live or set(reply["extra_logs"])
        assert set(reply["extra_logs"]) == live  # the same keys in every reply: OpenRLHF averages them
        assert all(math.isfinite(v[0]) for v in reply["extra_logs"].values())
    after = httpx.get(server.url + "/metrics", timeout=30).text
    for reason in ("query", "format"):
        counted = _metric(after, "steer_reward_reward_failures_total", reason=reason) - \
            _metric(before, "steer_reward_reward_failures_total", reason=reason)
        assert counted == sum(1 for c in cases if c[2] == reason), reason
    requests = _metric(after, "steer_reward_requests_total", code="200", endpoint="/get_reward") - \
        _metric(before, "steer_reward_requests_total", code="200", endpoint="/get_reward")
    assert requests == len(cases)  # one try each: nothing was retried
    for code in ("422", "413", "500"):
        assert _metric(after, "steer_reward_requests_total", code=code, endpoint="/get_reward") == 0


def test_a_failed_sample_does_not_disturb_the_others_in_its_request(server, reference, demo_policy_path):
    import httpx

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_policy_path)
    chat = tokenizer.apply_chat_template(MESSAGES[1], add_generation_prompt=True, tokenize=False)
    queries = [chat + "Seven.<|eot_id|>", "Question: 2+2? Answer: 4", chat + "Eleven.<|eot_id|>"]
    prompts = [chat, "Something else", chat]
    reply = httpx.post(server.url + "/get_reward", json={"query": queries, "prompts": prompts,
                                                         "labels": [None] * 3}, timeout=60).json()
    expected = reference.score([MESSAGES[1]] * 2, ["Seven.", "Eleven."]).rewards
    torch.testing.assert_close(torch.tensor([reply["rewards"][0], reply["rewards"][2]]), expected, atol=1e-4,
                               rtol=1e-4)
    assert reply["rewards"][1] == FALLBACK
    assert reply["extra_logs"]["reward_failed"] == [0.0, 1.0, 0.0]


def test_unknown_fields_of_a_newer_openrlhf_are_ignored(server, reference):
    import httpx

    body = {"query": ["Question: 2+2?\nAnswer: 4"], "prompts": ["Question: 2+2?\nAnswer:"], "labels": [None],
            "datasources": ["math"], "images": [None], "request_id": "abc"}
    reply = httpx.post(server.url + "/get_reward", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    expected = reference.score(["Question: 2+2?\nAnswer:"], [" 4"]).rewards
    torch.testing.assert_close(torch.tensor(reply.json()["rewards"]), expected, atol=1e-4, rtol=1e-4)


def test_reward_func_file_from_the_cli(agent_module, actor, reference, config_path, tmp_path):
    from steer_reward.cli import main

    out = tmp_path / "reward_func.py"
    assert main(["openrlhf-func", "--config", str(config_path), "--out", str(out)]) == 0
    executor = agent_module.SingleTurnAgentExecutor(remote_rm_url=str(out))
    assert executor.reward_func is not None
    prompts = _templated_prompts(actor)
    outputs = asyncio.run(_rollouts(executor, actor, prompts))
    _check_against_reference(outputs, prompts, actor, reference)
    # loaded once per process: the module-level singleton holds one SteerReward
    module_reward = executor.reward_func.__globals__["_REWARD"]
    assert module_reward._reward is not None
    assert executor.reward_func([], [], []) == {"rewards": [], "scores": [], "failures": [], "extra_logs": {
        **{n: [] for n in reference.schema.live_names}, "prompt_truncated_tokens": [], "reward_failed": []}}
    # a sample it cannot read gets the fallback reward instead of an exception (which OpenRLHF turns into a
    # missing reward and a crashed step)
    reply = asyncio.run(executor._fetch_rewards_via_func(["Question: 2+2? Answer: 4"], ["Something else"], [None]))[0]
    assert reply["rewards"] == [FALLBACK] and reply["extra_logs"]["reward_failed"] == [1.0]
