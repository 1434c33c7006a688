#!/usr/bin/env python
"""Peak memory of ``convert-nemo`` on a synthetic checkpoint of a few hundred MB, measured as resident memory (RSS).

Writes a bf16 zarr checkpoint in Megatron's layout (one raw chunk per layer and stacked keys, like Megatron's zarr
writer; random values, nothing to score) and a word-level tokenizer of the same vocabulary, then converts it in a
child process that samples its own RSS every 2 ms. Prints one JSON object: checkpoint size, the largest tensor
read at once, the RSS before the conversion and its peak during it, and peak increase / largest tensor — the
"small multiple" the converter promises (``steer_reward.convert.inspect.MEMORY_FACTOR``).

    python benchmarks/convert_memory.py                 # ~370 MB checkpoint (8 layers, hidden 1024, vocab 32000)
    python benchmarks/convert_memory.py --layers 4 --keep /tmp/synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_zarr_array(folder: Path, shape: list[int], chunks: list[int], dtype: str, seed: int) -> int:
    """One zarr v2 array the way Megatron writes it: raw C-order chunks, no compressor. Returns its bytes."""
    import itertools
    import math

    import torch

    folder.mkdir(parents=True)
    meta = {"chunks": chunks, "compressor": None, "dtype": dtype, "fill_value": None, "filters": None,
            "order": "C", "shape": shape, "zarr_format": 2}
    (folder / ".zarray").write_text(json.dumps(meta))
    torch_dtype = {"bfloat16": torch.bfloat16, "<f4": torch.float32}[dtype]
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for coords in itertools.product(*[range(math.ceil(n / c)) for n, c in zip(shape, chunks)]):
        chunk = (0.02 * torch.randn(chunks, generator=gen)).to(torch_dtype)
        data = chunk.reshape(-1).view(torch.uint8).numpy().tobytes()
        (folder / ".".join(map(str, coords))).write_bytes(data)
        total += len(data)
    return total


def write_synthetic(root: Path, layers: int, hidden: int, ffn: int, heads: int, groups: int, vocab: int) -> int:
    import yaml

    head_dim = hidden // heads
    config = {"mcore_gpt": True, "num_layers": layers, "hidden_size": hidden, "ffn_hidden_size": ffn,
              "num_attention_heads": heads, "num_query_groups": groups, "kv_channels": None,
              "encoder_seq_length": 4096, "position_embedding_type": "rope", "rotary_base": 500000,
              "normalization": "rmsnorm", "activation": "fast-swiglu", "bias": False,
              "make_vocab_size_divisible_by": 128, "tensor_model_parallel_size": 1, "reward_model_type": "regression",
              "regression": {"num_attributes": 9}, "tokenizer": {"library": "huggingface", "type": "synthetic"}}
    root.mkdir(parents=True)
    (root / "model_config.yaml").write_text(yaml.safe_dump(config))
    weights = root / "model_weights"
    weights.mkdir()
    (weights / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1,
                                                       "common_backend": "torch", "common_backend_version": 1}))
    padded = -(-vocab // 128) * 128
    qkv = (heads + 2 * groups) * head_dim
    arrays = {
        "model.embedding.word_embeddings.weight": ([padded, hidden], [padded, hidden]),
        "model.output_layer.weight": ([padded, hidden], [padded, hidden]),
        "model.decoder.final_layernorm.weight": ([hidden], [hidden]),
        "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight": ([layers, hidden], [1, hidden]),
        "model.decoder.layers.self_attention.linear_qkv.weight": ([layers, qkv, hidden], [1, qkv, hidden]),
        "model.decoder.layers.self_attention.linear_proj.weight": ([layers, hidden, heads * head_dim],
                                                                   [1, hidden, heads * head_dim]),
        "model.decoder.layers.mlp.linear_fc1.layer_norm_weight": ([layers, hidden], [1, hidden]),
        "model.decoder.layers.mlp.linear_fc1.weight": ([layers, 2 * ffn, hidden], [1, ffn, hidden]),
        "model.decoder.layers.mlp.linear_fc2.weight": ([layers, hidden, ffn], [1, hidden, ffn]),
    }
    total = 0
    for i, (key, (shape, chunks)) in enumerate(arrays.items()):
        total += write_zarr_array(weights / key, shape, chunks, "bfloat16", seed=i)
    total += write_zarr_array(weights / "model.rm_head.weight", [9, hidden], [9, hidden], "<f4", seed=100)
    total += write_zarr_array(weights / "model.rm_head.bias", [9], [9], "<f4", seed=101)
    return total


def write_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    words = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


CHILD = r"""
import json, os, sys, threading, time
from steer_reward.convert import convert_nemo
import transformers, safetensors, tqdm  # imported before the baseline is taken

def rss():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
peak = [0]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
src, out, tok, dtype = sys.argv[1:5]
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(tok)  # the tokenizer's own memory is not the converter's
baseline = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
convert_nemo(src, out, tokenizer=tok, dtype=dtype, progress=False)
seconds = time.perf_counter() - start
done.set(); thread.join()
print(json.dumps({"baseline_rss": baseline, "peak_rss": max(peak[0], rss()), "seconds": seconds}))
"""


def measure(layers: int = 8, hidden: int = 1024, ffn: int = 4096, heads: int = 16, groups: int = 4,
            vocab: int = 32000, dtype: str = "bfloat16", keep: str | None = None) -> dict:
    """Build the synthetic checkpoint, convert it in a child process, return the measured numbers."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(keep) if keep else Path(scratch)
        src, tok, out = root / "nemo", root / "tokenizer", root / "hf"
        checkpoint_bytes = write_synthetic(src, layers, hidden, ffn, heads, groups, vocab)
        write_tokenizer(tok, vocab)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(tok), dtype],
                              capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-4000:])
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        from steer_reward.convert import inspect_nemo

        report = inspect_nemo(src)
        output_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    largest = report.largest_tensor[1]
    increase = child["peak_rss"] - child["baseline_rss"]
    return {"checkpoint_mb": round(checkpoint_bytes / 1e6, 1), "output_mb": round(output_bytes / 1e6, 1),
            "largest_tensor": report.largest_tensor[0], "largest_tensor_mb": round(largest / 1e6, 1),
            "baseline_rss_mb": round(child["baseline_rss"] / 1e6, 1), "peak_rss_mb": round(child["peak_rss"] / 1e6, 1),
            "peak_increase_mb": round(increase / 1e6, 1),
            "peak_increase_over_largest_tensor": round(increase / largest, 2),
            "seconds": round(child["seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--keep", help="folder to build in and keep (default: a temporary one)")
    args = parser.parse_args()
    print(json.dumps(measure(args.layers, args.hidden, args.ffn, vocab=args.vocab, dtype=args.dtype, keep=args.keep)))


if __name__ == "__main__":
    main()
