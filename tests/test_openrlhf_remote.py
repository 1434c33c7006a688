"""OpenRLHF 0.11.2's own client code (``openrlhf/utils/agent.py``, loaded by path) against the real server and
against a ``reward_func`` file written by ``steer-reward openrlhf-func``: rewards equal in-process ``SteerReward``
on the same texts.

The rollout engine is OpenRLHF's vLLM seam (``await engine.generate(prompt_ids, sampling_params)``) served by
the real demo policy through ``transformers.generate``: vLLM does not run here, everything after it is OpenRLHF's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("aiohttp")
pytest.importorskip("fastapi")
openrlhf_spec = importlib.util.find_spec("openrlhf")
if openrlhf_spec is None:
    pytest.skip("openrlhf is not installed (pip install --no-deps openrlhf==0.11.2)", allow_module_level=True)

from steer_reward.reward import SteerReward  # noqa: E402
from steer_reward.server.process import ServerProcess  # noqa: E402

OPENRLHF_DIR = Path(openrlhf_spec.submodule_search_locations[0])
MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Tell me a joke about cats."}],
]
N_SAMPLES = 4  # per prompt, like --rollout.n_samples_per_prompt


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def agent_module():
    """``openrlhf/utils/agent.py`` by path (its package ``__init__`` pulls ray/vLLM-era deps we do not install)."""
    saved = {k: sys.modules.get(k) for k in ("openrlhf.utils.logging_utils", "openrlhf_agent_under_test")}
    _load_by_path("openrlhf.utils.logging_utils", OPENRLHF_DIR / "utils" / "logging_utils.py")
    module = _load_by_path("openrlhf_agent_under_test", OPENRLHF_DIR / "utils" / "agent.py")
    yield module
    for key, value in saved.items():
        if value is None:
            sys.modules.pop(key, None)
        else:
            sys.modules[key] = value


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
    path.write_text(yaml.safe_dump({"model": {"path": demo_model_path, "device": "cpu"},
                                    "shaping": {"weights": "steerlm-70b"}}))
    return path


@pytest.fixture(scope="module")
def reference(config_path):
    return SteerReward.from_config(config_path)


@pytest.fixture(scope="module")
def server(config_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("openrlhf-log") / "server.log"
    with ServerProcess(["--config", str(config_path)], log_path=log) as process:
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
    torch.testing.assert_close(torch.tensor([o["scores"][0] for o in outputs]), expected.rewards, atol=1e-4,
                               rtol=1e-4)
    for name in reference.schema.live_names:
        logged = torch.tensor([o["extra_logs"][name][0] for o in outputs])
        torch.testing.assert_close(logged, expected.attributes.column(name), atol=1e-4, rtol=1e-4)


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
    assert executor.reward_func([], [], []) == {"rewards": [], "scores": [], "extra_logs": {
        **{n: [] for n in reference.schema.live_names}, "prompt_truncated_tokens": []}}
