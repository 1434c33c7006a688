"""convert-nemo / inspect-nemo on bad input: one clear line, exit 2, and never a folder that looks complete.

Built from the committed Megatron-written fixtures (tests/fixtures/nemo), copied and then damaged.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from steer_reward.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from steer_reward.demo import build_demo_tokenizer

    folder = tmp_path_factory.mktemp("tok300")
    build_demo_tokenizer(vocab_size=300).save_pretrained(folder)
    return str(folder)


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def copy_fixture(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    path = folder / "model_config.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config))


def convert_error(src: Path, tmp_path: Path, tokenizer_dir: str | None, *extra: str) -> str:
    out = tmp_path / "out"
    args = ["convert-nemo", str(src), str(out), "--no-progress", *extra]
    if tokenizer_dir:
        args += ["--tokenizer", tokenizer_dir]
    code, _, err = cli(*args)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("steer-reward convert-nemo: error: "), err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*")), "a failed conversion left a folder"
    return lines[0]


def test_not_a_nemo_checkpoint(tmp_path, tokenizer_dir):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert "already a Hugging Face folder" in convert_error(tmp_path / "hf", tmp_path, tokenizer_dir)
    (tmp_path / "junk.nemo").write_bytes(b"not a tar at all" * 100)
    assert "not a NeMo checkpoint" in convert_error(tmp_path / "junk.nemo", tmp_path, tokenizer_dir)
    assert "does not exist" in convert_error(tmp_path / "missing", tmp_path, tokenizer_dir)


def test_language_model_without_rm_head(tmp_path, tokenizer_dir):
    src = copy_fixture("zarr_fp32", tmp_path)
    for key in ("model.rm_head.weight", "model.rm_head.bias"):
        shutil.rmtree(src / "model_weights" / key)
    assert "no rm_head" in convert_error(src, tmp_path, tokenizer_dir)


def test_config_tensor_shape_mismatch(tmp_path, tokenizer_dir):
    src = copy_fixture("zarr_fp32", tmp_path)
    edit_config(src, ffn_hidden_size=64)
    message = convert_error(src, tmp_path, tokenizer_dir)
    assert "shape mismatch" in message and "linear_fc1" in message
    edit_config(src, ffn_hidden_size=48, num_layers=3)
    assert "num_layers 3" in convert_error(src, tmp_path, tokenizer_dir)


def test_missing_tensors_and_missing_chunks(tmp_path, tokenizer_dir):
    src = copy_fixture("zarr_fp32", tmp_path)
    shutil.rmtree(src / "model_weights" / "model.decoder.final_layernorm.weight")
    assert "missing tensors: model.decoder.final_layernorm.weight" in convert_error(src, tmp_path, tokenizer_dir)
    src = copy_fixture("zarr_bf16", tmp_path)
    (src / "model_weights" / "model.decoder.layers.mlp.linear_fc2.weight" / "1.0.0").unlink()
    assert "missing tensor data" in convert_error(src, tmp_path, tokenizer_dir)


def test_unknown_weight_format(tmp_path, tokenizer_dir):
    src = copy_fixture("zarr_fp32", tmp_path)
    meta = src / "model_weights" / "metadata.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "sharded_backend": "tensorstore_v9"}))
    assert "unknown weight format" in convert_error(src, tmp_path, tokenizer_dir)
    shutil.rmtree(src / "model_weights")
    assert "unknown weight format" in convert_error(src, tmp_path, tokenizer_dir)


def test_inconsistent_tp_shards(tmp_path, tokenizer_dir):
    src = copy_fixture("legacy_tp2", tmp_path)
    edit_config(src, tensor_model_parallel_size=4)
    assert "inconsistent TP shards" in convert_error(src, tmp_path, tokenizer_dir)
    edit_config(src, tensor_model_parallel_size=2)
    shutil.move(src / "mp_rank_01", tmp_path / "moved")
    shutil.copytree(src / "mp_rank_00", src / "mp_rank_02")  # ranks 0 and 2, rank 1 missing
    assert "inconsistent TP shards" in convert_error(src, tmp_path, tokenizer_dir)


def test_replicated_tensors_must_agree_across_tp_shards(tmp_path, tokenizer_dir):
    import torch

    src = copy_fixture("legacy_tp2", tmp_path)
    path = src / "mp_rank_01" / "model_weights.ckpt"
    state = torch.load(path, weights_only=False)
    state["model.decoder.final_layernorm.weight"] += 1
    torch.save(state, path)
    assert "differs between" in convert_error(src, tmp_path, tokenizer_dir)


def test_unmappable_architectures_are_refused(tmp_path, tokenizer_dir):
    src = copy_fixture("zarr_fp32", tmp_path)
    for changes, words in (({"activation": "gelu"}, "SwiGLU"), ({"normalization": "layernorm"}, "RMSNorm"),
                           ({"position_embedding_type": "learned_absolute"}, "rope"),
                           ({"use_avg_pool": True}, "average pooling"),
                           ({"bias": True}, "missing tensors")):
        original = yaml.safe_load((src / "model_config.yaml").read_text())
        edit_config(src, **changes)
        assert words in convert_error(src, tmp_path, tokenizer_dir)
        (src / "model_config.yaml").write_text(yaml.safe_dump(original))
    # A missing `bias` key means biases to NeMo (its default), so the bias-free tensors disagree with it.
    original = yaml.safe_load((src / "model_config.yaml").read_text())
    del original["bias"]
    (src / "model_config.yaml").write_text(yaml.safe_dump(original))
    assert "missing tensors" in convert_error(src, tmp_path, tokenizer_dir)


def test_missing_tokenizer_names_the_flag_and_wrong_tokenizer_is_caught(tmp_path):
    message = convert_error(FIXTURES / "zarr_fp32", tmp_path, None)
    assert "--tokenizer DIR" in message and "tiny-test-tokenizer" in message
    from steer_reward.demo import build_demo_tokenizer

    big = tmp_path / "tok2048"
    build_demo_tokenizer().save_pretrained(big)  # 2048 tokens: more than the 384-row embedding
    assert "not the tokenizer the model was trained with" in convert_error(FIXTURES / "zarr_fp32", tmp_path, str(big))


def test_compressed_nemo_is_refused_with_the_unpack_command(tmp_path, tokenizer_dir):
    packed = tmp_path / "model.nemo"
    with tarfile.open(packed, "w:gz") as tar:
        tar.add(FIXTURES / "zarr_fp32", arcname=".")
    message = convert_error(packed, tmp_path, tokenizer_dir)
    assert "compressed" in message and "tar -xf" in message


def test_existing_output_folder_is_never_overwritten(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("convert-nemo", str(FIXTURES / "zarr_fp32"), str(out), "--tokenizer", tokenizer_dir,
                       "--no-progress")
    assert code == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_conversion_leaves_no_folder(tmp_path, tokenizer_dir, monkeypatch):
    from steer_reward.convert import convert_nemo
    from steer_reward.convert.safetensors_writer import ShardedSafetensorsWriter

    written = []
    original = ShardedSafetensorsWriter.write

    def write_then_die(self, name, tensor):
        written.append(name)
        if len(written) == 5:
            raise KeyboardInterrupt
        return original(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert_nemo(FIXTURES / "zarr_fp32", tmp_path / "out", tokenizer=tokenizer_dir, progress=False)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [], "the partial folder was not removed"


def test_inspect_reports_without_reading_weights(tmp_path, monkeypatch):
    from steer_reward.convert.zarr_format import ZarrReader

    def no_reads(*args, **kwargs):
        raise AssertionError("inspect read a tensor")

    monkeypatch.setattr(ZarrReader, "read", no_reads)
    code, out, err = cli("inspect-nemo", str(FIXTURES / "zarr_fp32"))
    assert code == 0, err
    assert "weight format: zarr" in out and "9 outputs" in out and "conversion memory" in out
    assert "model.decoder.layers.self_attention.linear_qkv.weight  [2, 64, 32]  float32" in out
    assert "all tensors map to Llama" in out
    src = copy_fixture("zarr_fp32", tmp_path)
    shutil.rmtree(src / "model_weights" / "model.rm_head.weight")
    code, out, err = cli("inspect-nemo", str(src))
    assert code == 2 and "no rm_head" in err and "NOT possible" in out
