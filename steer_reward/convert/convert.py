"""``convert_nemo``: a NeMo SteerLM regression reward model → a Hugging Face ``LlamaForSequenceClassification``
folder that steer-reward scores exactly as NeMo does (the reward head's bias included).

Tensor by tensor: each source tensor (or one layer of a stacked tensor) is read, split/cast, and appended to a
streaming safetensors shard before the next is read, so memory stays within a small multiple of the largest
tensor. Everything is written into a temporary sibling folder that is renamed to ``out`` only at the end: an
interrupted or failed conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steer_reward.convert.formats import open_weights
from steer_reward.convert.mapping import plan_conversion
from steer_reward.convert.nemo_config import read_nemo_config
from steer_reward.convert.safetensors_writer import ShardedSafetensorsWriter, parse_size
from steer_reward.convert.source import NemoCheckpointError, open_source
from steer_reward.convert.tokenizer import STEERLM_CHAT_TEMPLATE, choose_pad_token, resolve_tokenizer
from steer_reward.schema import STEERLM9

__all__ = ["ConversionResult", "convert_nemo", "METADATA_KEY", "id2label_for"]

METADATA_KEY = "steer_reward"
"""config.json key with how the folder was made; ``score_bias: true`` tells steer-reward's loader to restore the
head's bias (``steer_reward.modeling``)."""
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class ConversionResult:
    out: Path
    format: str
    num_labels: int
    labels: list[str]
    vocab_size: int
    parameters: int
    shards: int
    pad_token: str
    pad_added: bool
    tokenizer_source: str


def id2label_for(num_labels: int, reward_model_type: str | None) -> list[str]:
    """Attribute names in head order: SteerLM's 9 (NeMo-Aligner's HelpSteer order) for a 9-output regression
    head, ``reward`` for a single output, generic ``LABEL_i`` otherwise (set ``model.schema`` when scoring)."""
    if num_labels == STEERLM9.num_outputs and reward_model_type in ("regression", None):
        return list(STEERLM9.names)
    if num_labels == 1:
        return ["reward"]
    return [f"LABEL_{i}" for i in range(num_labels)]


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise NemoCheckpointError(f"--dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def convert_nemo(src: str | os.PathLike, out: str | os.PathLike, tokenizer: str | None = None,
                 dtype: str = "bfloat16", shard_size: str | int = "5GB", progress: bool = True) -> ConversionResult:
    """Convert the NeMo reward model at ``src`` (``.nemo`` tar or unpacked folder) into the HF folder ``out``.

    ``tokenizer``: a Hugging Face tokenizer folder, needed when the checkpoint does not bundle its tokenizer
    (Llama-3 reward models). Raises ``NemoCheckpointError`` with one clear line for anything it cannot convert.
    """
    torch_dtype = _dtype(dtype)
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as err:
        raise NemoCheckpointError(f"--shard-size: {err}") from None
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NemoCheckpointError(f"{out} already exists and is not empty; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with open_source(src) as source:
            cfg = read_nemo_config(source)
            reader = open_weights(source, cfg.tensor_parallel, cfg.pipeline_parallel)
            try:
                result = _convert(source, cfg, reader, tmp, tokenizer, torch_dtype, dtype, shard_bytes, progress)
            finally:
                reader.close()
        if out.exists():
            out.rmdir()  # an empty folder the user made beforehand
        os.rename(tmp, out)
        result.out = out
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert(source, cfg, reader, tmp: Path, tokenizer_dir: str | None, torch_dtype: torch.dtype, dtype: str,
             shard_bytes: int, progress: bool) -> ConversionResult:
    from tqdm.auto import tqdm

    tok, tok_source = resolve_tokenizer(source, cfg, tokenizer_dir, tmp / ".tokenizer-files")
    pad_token, pad_added = choose_pad_token(tok)
    vocab = len(tok)
    plan = plan_conversion(reader, cfg, vocab, extra_rows=1 if pad_added else 0)
    if pad_added:
        tok.add_special_tokens({"pad_token": pad_token})
    else:
        tok.pad_token = pad_token
    tok.chat_template = STEERLM_CHAT_TEMPLATE

    writer = ShardedSafetensorsWriter(tmp, [(o.name, o.shape) for o in plan.outputs], torch_dtype, shard_bytes)
    bar = tqdm(total=len(plan.outputs), unit="tensor", desc="convert-nemo", disable=not progress, file=sys.stderr)
    try:
        for step in plan.steps:
            bar.set_postfix_str(step.label, refresh=False)
            produced = step.run()
            if len(produced) != len(step.outputs):
                raise RuntimeError(f"{step.label}: made {len(produced)} tensors for {len(step.outputs)} outputs")
            for output, tensor in zip(step.outputs, produced):
                writer.write(output.name, tensor)
                bar.update(1)
            del produced
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    writer.finish()

    labels = id2label_for(plan.num_labels, cfg.reward_model_type)
    hf_config = cfg.hf_config(
        vocab_size=vocab + (1 if pad_added else 0), num_labels=plan.num_labels, dtype=dtype,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    setattr(hf_config, METADATA_KEY, {
        "converted_from": "nemo",
        "weight_format": reader.format,
        "template": "steerlm",
        "score_bias": True,
        "note": "score.bias holds NeMo's rm_head bias; steer-reward loads it, plain Transformers drops it",
        "reward_model_type": cfg.reward_model_type,
        "attribute_weights": cfg.attribute_weights,
    })
    hf_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(tmp / ".tokenizer-files", ignore_errors=True)
    parameters = sum(_numel(o.shape) for o in plan.outputs)
    return ConversionResult(tmp, reader.format, plan.num_labels, labels, hf_config.vocab_size, parameters,
                            len(writer.shards), pad_token, pad_added, tok_source)


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n

