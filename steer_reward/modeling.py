"""Loading a multi-attribute reward model and its tokenizer from a local folder.

Safetensors only unless pickle files are allowed, no remote code unless asked, an optional PEFT adapter merged at
load. Every failure says what is wrong with the folder and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from steer_reward.config import ModelConfig

__all__ = ["ModelLoadError", "model_folder", "resolve_device", "resolve_dtype", "load_reward_model", "load_tokenizer"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A reward model folder that cannot be loaded, with the reason."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"model.device: {device!r} is not a device ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device is {device!r} but CUDA is not available; use cpu or auto")
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype | str:
    return "auto" if dtype == "auto" else _DTYPES[dtype]


def model_folder(path: str | None) -> Path:
    """The local folder behind ``model.path`` (building the demo model for "demo"), checked."""
    if path is None:
        raise ModelLoadError("no reward model given: set model.path in the config or pass --model PATH|demo")
    if path == "demo":
        from steer_reward.demo import demo_model_dir

        return demo_model_dir()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            f"reward model folder {str(folder)!r} does not exist (models are loaded from local folders only; "
            "download the checkpoint first, or use --model demo)"
        )
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    return folder


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a tokenizer from {folder}: {err}") from None
    if tokenizer.pad_token_id is None:
        # Padding is masked and the score is read at the last real token, so any id works as padding.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    names = os.listdir(folder)
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return
    if any(n.endswith(".bin") or n.endswith(".pt") for n in names):
        if allow_pickle:
            return
        raise ModelLoadError(
            f"{folder} holds only pickle weights (.bin), which can run code when loaded; convert them to "
            "safetensors, or set model.allow_pickle: true if you trust the source"
        )
    raise ModelLoadError(f"{folder} has no weights (*.safetensors)")


def load_reward_model(config: ModelConfig) -> tuple[torch.nn.Module, Any, Path]:
    """(model in eval mode on its device, tokenizer, folder) for ``config``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = model_folder(config.path)
    try:
        hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=config.trust_remote_code)
    except ValueError as err:
        hint = "" if config.trust_remote_code else " (if the checkpoint ships its own code, set " \
                                                    "model.trust_remote_code: true)"
        raise ModelLoadError(f"cannot read {folder}/config.json: {err}{hint}") from None
    architectures = getattr(hf_config, "architectures", None) or []
    has_auto_map = "AutoModelForSequenceClassification" in (getattr(hf_config, "auto_map", None) or {})
    if not any(a.endswith("ForSequenceClassification") for a in architectures) and not has_auto_map:
        raise ModelLoadError(
            f"{folder} is not a sequence-classification reward model (architectures: {architectures}); "
            "steer-reward needs a *ForSequenceClassification checkpoint whose head gives one output per attribute"
        )
    _check_weights(folder, config.allow_pickle)
    device = resolve_device(config.device)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder),
            dtype=resolve_dtype(config.dtype),
            trust_remote_code=config.trust_remote_code,
            use_safetensors=None if config.allow_pickle else True,
        )
    except ValueError as err:
        raise ModelLoadError(f"cannot load {folder}: {err}") from None
    if config.adapter:
        model = _merge_adapter(model, config.adapter)
    model.to(device).eval()
    return model, load_tokenizer(folder, config.trust_remote_code), folder


def _merge_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError("model.adapter needs peft: pip install 'steer-reward[trl]'") from None
    if not Path(adapter).is_dir():
        raise ModelLoadError(f"adapter folder {adapter!r} does not exist")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()
