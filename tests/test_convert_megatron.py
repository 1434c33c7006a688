"""convert-nemo against Megatron-Core's own forward (not against our own inverse mapping).

Tiny GPT reward models (GQA, RoPE, SwiGLU, RMSNorm, a 9-output ``rm_head`` with bias) are built and saved by
Megatron-Core itself (tests/fixtures/nemo/megatron_checkpoint.py), with Megatron's outputs at each sequence's last
token recorded. Each is converted and scored through steer-reward's own path (one right-padded micro-batch, the
head read at the last real token); the outputs must match Megatron's within 1e-4 in fp32.

- torch_dist: built live with the dev extra's megatron-core (one subprocess per session, two variants);
- zarr (fp32 and bf16) and legacy ``mp_rank_XX`` with real tensor parallelism 2 (2 gloo ranks): committed
  fixtures written by Megatron (megatron-core 0.15.3 + zarr 2.x for zarr; see make_fixtures.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"
GENERATOR = FIXTURES / "megatron_checkpoint.py"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """The tokenizer the fixtures were sized for: 300 tokens (Megatron pads the embedding to 384 / 512 rows)."""
    from steer_reward.demo import build_demo_tokenizer

    folder = tmp_path_factory.mktemp("tok300")
    tokenizer = build_demo_tokenizer(vocab_size=300)
    assert len(tokenizer) == 300
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def torch_dist_checkpoints(tmp_path_factory) -> Path:
    pytest.importorskip("megatron.core", reason="megatron-core (dev extra) builds the torch_dist fixtures")
    out = tmp_path_factory.mktemp("megatron-torch-dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(GENERATOR), str(out), "--backend", "torch_dist", "--variant", "base",
                           "--variant", "bias-rope31", "--port", "0"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


def megatron_reference(folder: Path) -> tuple[list[list[int]], torch.Tensor]:
    ref = json.loads((folder / "megatron_outputs.json").read_text())
    return ref["sequences"], torch.tensor(ref["outputs"])


def steer_reward_outputs(hf_folder: Path, sequences, dtype: str = "float32") -> torch.Tensor:
    """Scores through steer-reward's loader and head path: one padded micro-batch, last real token."""
    from steer_reward.config import ModelConfig
    from steer_reward.forward import find_head, forward_microbatch
    from steer_reward.modeling import load_reward_model

    model, tokenizer, _ = load_reward_model(ModelConfig(path=str(hf_folder), device="cpu", dtype=dtype))
    return forward_microbatch(model, sequences, tokenizer.pad_token_id, find_head(model))


def convert(src, out: Path, tokenizer_dir: str, dtype: str = "float32"):
    from steer_reward.convert import convert_nemo

    return convert_nemo(src, out, tokenizer=tokenizer_dir, dtype=dtype, progress=False)


@pytest.mark.parametrize("name", ["zarr_fp32", "legacy_tp2"])
def test_committed_megatron_fixture_matches_megatron_forward(name, tmp_path, tokenizer_dir):
    result = convert(FIXTURES / name, tmp_path / "hf", tokenizer_dir)
    assert result.format == {"zarr_fp32": "zarr", "legacy_tp2": "legacy"}[name]
    sequences, expected = megatron_reference(FIXTURES / name)
    got = steer_reward_outputs(tmp_path / "hf", sequences)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_zarr_bfloat16_arrays_read_and_score(tmp_path, tokenizer_dir):
    """Megatron's non-standard "bfloat16" zarr dtype; Megatron ran in bf16, so bf16-level agreement."""
    from steer_reward.convert import inspect_nemo

    report = inspect_nemo(FIXTURES / "zarr_bf16")
    assert report.tensors["model.decoder.layers.self_attention.linear_qkv.weight"].dtype == torch.bfloat16
    convert(FIXTURES / "zarr_bf16", tmp_path / "hf", tokenizer_dir, dtype="bfloat16")
    sequences, expected = megatron_reference(FIXTURES / "zarr_bf16")
    got = steer_reward_outputs(tmp_path / "hf", sequences)  # bf16 weights, exact in fp32
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("variant", ["base", "bias-rope31"])
def test_live_torch_dist_matches_megatron_forward(variant, torch_dist_checkpoints, tmp_path, tokenizer_dir):
    src = torch_dist_checkpoints / variant
    result = convert(src, tmp_path / "hf", tokenizer_dir)
    assert result.format == "torch_dist" and result.num_labels == 9
    sequences, expected = megatron_reference(src)
    torch.testing.assert_close(steer_reward_outputs(tmp_path / "hf", sequences), expected, atol=1e-4, rtol=0)


def test_rope_scaling_and_bias_matter_so_the_comparison_can_fail(torch_dist_checkpoints, tmp_path, tokenizer_dir):
    """Without the Llama-3.1 RoPE scaling, or without the head's bias, the outputs visibly differ."""
    src = torch_dist_checkpoints / "bias-rope31"
    convert(src, tmp_path / "hf", tokenizer_dir)
    sequences, expected = megatron_reference(src)
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    config_path.write_text(json.dumps(config))
    assert (steer_reward_outputs(tmp_path / "hf", sequences) - expected).abs().max() > 1e-3
    config["steer_reward"]["score_bias"] = False
    config_path.write_text(json.dumps(config))
    assert (steer_reward_outputs(tmp_path / "hf", sequences) - expected).abs().max() > 1e-2


def test_packed_nemo_tar_is_read_in_place(torch_dist_checkpoints, tmp_path, tokenizer_dir):
    src = torch_dist_checkpoints / "base"
    packed = tmp_path / "model.nemo"
    with tarfile.open(packed, "w:") as tar:  # NeMo packs the folder's content under ./
        for path in sorted(src.rglob("*")):
            tar.add(path, arcname="./" + str(path.relative_to(src)), recursive=False)
    convert(packed, tmp_path / "hf", tokenizer_dir)
    sequences, expected = megatron_reference(src)
    torch.testing.assert_close(steer_reward_outputs(tmp_path / "hf", sequences), expected, atol=1e-4, rtol=0)


def test_layer_slices_equal_whole_stacked_tensors(torch_dist_checkpoints):
    """Reading one layer of a stacked tensor reads exactly that layer (torch_dist and zarr readers)."""
    from steer_reward.convert.formats import open_weights
    from steer_reward.convert.source import open_source

    for src in (torch_dist_checkpoints / "base", FIXTURES / "zarr_fp32"):
        with open_source(src) as source:
            reader = open_weights(source)
            key = "model.decoder.layers.mlp.linear_fc1.weight"
            whole = reader.read(key)
            assert whole.shape[0] == 2
            for layer in range(2):
                assert torch.equal(reader.read(key, layer), whole[layer])
