"""Layouts derived from the committed Megatron-written fixtures by following NeMo's documented conventions:

- pipeline parallelism: NeMo's ``tp_rank_XX_pp_rank_YYY/model_weights.ckpt`` (``NLPSaveRestoreConnector.save_to``),
  where each stage numbers its layers from 0, the embedding lives on the first stage and the final norm, the
  output layer and the reward head on the last — built here by splitting the real TP=2 Megatron shards by layer;
- a tokenizer bundled in the checkpoint as ``nemo:<file>`` artifacts (``vocab_file`` / ``merge_file``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import yaml

from test_convert_megatron import (FIXTURES, convert, megatron_reference, steer_reward_outputs,  # noqa: F401
                                   tokenizer_dir)


def split_pipeline(src: Path, dst: Path, stages: int) -> None:
    config = yaml.safe_load((src / "model_config.yaml").read_text())
    layers, tp = config["num_layers"], config["tensor_model_parallel_size"]
    per_stage = layers // stages
    dst.mkdir()
    config["pipeline_model_parallel_size"] = stages
    (dst / "model_config.yaml").write_text(yaml.safe_dump(config))
    for t in range(tp):
        state = torch.load(src / f"mp_rank_{t:02d}" / "model_weights.ckpt", weights_only=False)
        for p in range(stages):
            part = {}
            for key, value in state.items():
                match = re.match(r"model\.decoder\.layers\.(\d+)\.(.+)", key)
                if match:
                    layer = int(match.group(1))
                    if layer // per_stage == p:
                        part[f"model.decoder.layers.{layer - p * per_stage}.{match.group(2)}"] = value
                elif key.startswith("model.embedding."):
                    if p == 0:
                        part[key] = value
                elif p == stages - 1:
                    part[key] = value
            folder = dst / f"tp_rank_{t:02d}_pp_rank_{p:03d}"
            folder.mkdir()
            torch.save(part, folder / "model_weights.ckpt")


def test_legacy_tensor_and_pipeline_parallel_layout(tmp_path, tokenizer_dir):
    split_pipeline(FIXTURES / "legacy_tp2", tmp_path / "pp", stages=2)
    result = convert(tmp_path / "pp", tmp_path / "hf", tokenizer_dir)
    assert result.format == "legacy"
    sequences, expected = megatron_reference(FIXTURES / "legacy_tp2")
    torch.testing.assert_close(steer_reward_outputs(tmp_path / "hf", sequences), expected, atol=1e-4, rtol=0)


def test_tokenizer_bundled_as_nemo_artifacts(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    src = tmp_path / "nemo"
    shutil.copytree(FIXTURES / "zarr_fp32", src)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    files = tokenizer.backend_tokenizer.model.save(str(tmp_path))  # vocab.json, merges.txt of the BPE model
    names = {}
    for path in files:
        name = f"5f3a_{Path(path).name}"  # NeMo stores artifacts as <hash>_<name>
        shutil.copy(path, src / name)
        names[Path(path).suffix] = f"nemo:{name}"
    config = yaml.safe_load((src / "model_config.yaml").read_text())
    config["tokenizer"] = {"library": "huggingface", "type": "gpt2", "vocab_file": names[".json"],
                           "merge_file": names[".txt"], "model": None}
    (src / "model_config.yaml").write_text(yaml.safe_dump(config))
    result = convert(src, tmp_path / "hf", None)
    assert result.tokenizer_source == "bundled in the checkpoint"
    converted = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "What is the capital of France?"
    ids = converted(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    sequences, expected = megatron_reference(FIXTURES / "zarr_fp32")
    torch.testing.assert_close(steer_reward_outputs(tmp_path / "hf", sequences), expected, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == len(converted)
