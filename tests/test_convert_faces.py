"""A folder converted from NeMo works on every face with the reward head's bias: the library, ``score`` (CLI), the
server's ``/score``, ``export-folded`` (the constant includes the bias) and the ZeRO-3 backend on 2 ranks.

The model is the committed Megatron-written zarr fixture (tests/fixtures/nemo/zarr_fp32) converted once; its
agreement with Megatron's forward is tested in tests/test_convert_megatron.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steer_reward.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"
PROMPTS = ["What is 2+2?", [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]]
COMPLETIONS = ["4", "Goodbye!"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    from steer_reward.convert import convert_nemo
    from steer_reward.demo import build_demo_tokenizer

    root = tmp_path_factory.mktemp("converted")
    build_demo_tokenizer(vocab_size=300).save_pretrained(root / "tok")
    convert_nemo(FIXTURES / "zarr_fp32", root / "rm", tokenizer=str(root / "tok"), dtype="float32", progress=False)
    return root / "rm"


@pytest.fixture(scope="module")
def reward(converted):
    from steer_reward.reward import SteerReward

    return SteerReward.from_config({"model": {"path": str(converted), "device": "cpu"}})


def test_loader_restores_the_bias_that_plain_transformers_drops(converted, reward):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    config = json.loads((converted / "config.json").read_text())
    assert config["steer_reward"]["score_bias"] is True
    assert config["id2label"]["4"] == "helpfulness" and len(config["id2label"]) == 9
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    with safe_open(str(converted / index["weight_map"]["score.bias"]), framework="pt") as handle:
        bias = handle.get_tensor("score.bias")
    assert bias.abs().min() > 0  # Megatron's random bias, not zeros
    model = reward.scorer.model
    assert model.score.bias is not None
    torch.testing.assert_close(model.score.bias.detach(), bias)
    plain = AutoModelForSequenceClassification.from_pretrained(str(converted)).eval()
    assert plain.score.bias is None
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits + bias, atol=1e-6, rtol=0)


def test_default_template_is_steerlm_byte_for_byte(reward):
    from steer_reward.formatting import RewardFormatter

    tokenizer = reward.scorer.formatter.tokenizer
    assert reward.scorer.formatter.template == "chat_template"
    steerlm = RewardFormatter(tokenizer, "steerlm")
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        assert reward.scorer.formatter.texts(prompt, completion) == steerlm.texts(prompt, completion)
    prompt_text, completion_text = steerlm.texts(PROMPTS[0], COMPLETIONS[0])
    assert prompt_text.startswith("<extra_id_0>System\n") and completion_text == "4\n<extra_id_2>"
    pad = tokenizer.pad_token
    assert pad not in (tokenizer.bos_token, tokenizer.eos_token) and tokenizer.pad_token_id is not None


def test_cli_score_equals_the_library(converted, reward, tmp_path):
    rows = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, COMPLETIONS)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["score", "--model", str(converted), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl"), "--set", "model.device=cpu"])
    assert code == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = reward.score(PROMPTS, COMPLETIONS)
    for row, attributes, value in zip(out, expected.attributes.to_dicts(), expected.rewards.tolist()):
        assert row["reward"] == pytest.approx(value, abs=1e-5)
        for name, v in attributes.items():
            assert row["attributes"][name] == pytest.approx(v, abs=1e-5)


def test_server_score_equals_the_library(converted, reward, tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from steer_reward.server.process import ServerProcess

    with ServerProcess(["--model", str(converted), "--set", "model.device=cpu"], log_path=tmp_path / "log") as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            body = client.post("/score", json={"prompts": PROMPTS, "completions": COMPLETIONS}).json()
    expected = reward.score(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(torch.tensor(body["rewards"]), expected.rewards.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(body["attributes"]["correctness"]),
                               expected.attributes.column("correctness").float(), atol=1e-4, rtol=0)


def test_export_folded_constant_includes_the_head_bias(converted, reward, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from steer_reward.folding import export_folded

    folded = export_folded(reward, tmp_path / "folded")
    weights = reward.shaper.weights.double()
    bias = reward.scorer.model.score.bias.detach().double()
    assert folded.offset == pytest.approx(float(weights @ bias), abs=1e-9)
    assert abs(folded.offset) > 1e-3
    config = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert "score_bias" not in config["steer_reward"] and config["mean"] == pytest.approx(-folded.offset)
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "folded")).eval()
    samples = reward.scorer.encode(PROMPTS, COMPLETIONS)
    expected = reward.score(PROMPTS, COMPLETIONS).rewards
    with torch.no_grad():
        got = torch.stack([plain(torch.tensor([list(s.input_ids)])).logits[0, 0] for s in samples]) + folded.offset
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-5, rtol=0)
    # The in-memory model keeps its biased head after the export.
    assert reward.scorer.model.score.bias is not None


@pytest.mark.slow
def test_zero3_two_ranks_scores_with_the_bias(converted, reward, tmp_path):
    pytest.importorskip("deepspeed")
    from test_deepspeed import failure, launch

    proc = launch("zero3_converted.py", str(converted), str(tmp_path))
    assert proc.returncode == 0, failure(proc)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["head_has_bias"]
        prompts = [p for p, _ in report["pairs"]]
        completions = [c for _, c in report["pairs"]]
        expected = reward.scorer.score(prompts, completions).values
        torch.testing.assert_close(torch.tensor(report["attributes"]), expected.float(), atol=1e-4, rtol=0)
