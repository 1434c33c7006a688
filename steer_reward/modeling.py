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

__all__ = ["ModelLoadError", "model_folder", "resolve_device", "resolve_dtype", "load_reward_model", "load_tokenizer",
           "restore_score_bias", "SCORE_BIAS_FLAG"]

SCORE_BIAS_FLAG = ("steer_reward", "score_bias")
"""config.json ``steer_reward.score_bias: true``: the checkpoint's ``score`` head has a bias (``score.bias`` in its
safetensors) that Transformers' bias-free ``score`` would drop; written by ``steer-reward convert-nemo``."""

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
    device_map = _device_map(config.device_map)
    device = resolve_device(config.device) if device_map is None else None
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder),
            dtype=resolve_dtype(config.dtype),
            trust_remote_code=config.trust_remote_code,
            use_safetensors=None if config.allow_pickle else True,
            **({} if device_map is None else {"device_map": device_map}),
        )
    except ValueError as err:
        raise ModelLoadError(f"cannot load {folder}: {err}") from None
    head = getattr(model, "score", None)
    restore_score_bias(model, folder)
    if device_map is not None and getattr(model, "score", None) is not head:
        _place_like(model.score, head)
    if config.adapter:
        model = _merge_adapter(model, config.adapter)
    if device is not None:  # a device_map has placed every module already (Accelerate moves the activations)
        model.to(device)
    model.eval()
    return model, load_tokenizer(folder, config.trust_remote_code), folder


def _device_map(value: Any) -> Any:
    """``model.device_map`` checked for ``from_pretrained``: None, a strategy or device name, or {module: device}."""
    if value is None:
        return None
    if not isinstance(value, (str, dict)) or not value:
        raise ModelLoadError(f"model.device_map must be auto, balanced, sequential, a device or {{module: device}}, "
                             f"got {value!r}")
    try:
        import accelerate  # noqa: F401 - Transformers places a device_map with Accelerate
    except ImportError:
        raise ModelLoadError("model.device_map needs accelerate: pip install accelerate") from None
    return value


def _place_like(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """Put a replaced head where the device_map put the old one, with the Accelerate hook that moves its input there
    when the model is spread over several devices."""
    device = old.weight.device
    new.to(device)
    if hasattr(old, "_hf_hook"):
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        add_hook_to_module(new, AlignDevicesHook(execution_device=device, io_same_device=True))


def _merge_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError("model.adapter needs peft: pip install 'steer-reward[trl]'") from None
    if not Path(adapter).is_dir():
        raise ModelLoadError(f"adapter folder {adapter!r} does not exist")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def _wants_score_bias(model_config: Any) -> bool:
    section, key = SCORE_BIAS_FLAG
    meta = getattr(model_config, section, None)
    return isinstance(meta, dict) and bool(meta.get(key))


def _read_safetensors(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The named tensors from a folder's safetensors (sharded with an index, or one file)."""
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = {name: weight_map.get(name) for name in names}
    else:
        files = {name: "model.safetensors" for name in names}
    missing = [n for n, f in files.items() if f is None or not (folder / f).is_file()]
    if missing:
        raise ModelLoadError(f"{folder}/config.json says the score head has a bias, but the weights hold no "
                             f"{', '.join(missing)}; re-run the conversion")
    out = {}
    for name, file in files.items():
        with safe_open(str(folder / file), framework="pt") as handle:
            out[name] = handle.get_tensor(name)
    return out


def restore_score_bias(model: torch.nn.Module, folder: str | Path) -> None:
    """Give ``model.score`` back the bias its checkpoint holds when config.json says so (``SCORE_BIAS_FLAG``).

    Transformers' Llama-family ``score`` is ``Linear(bias=False)`` and skips ``score.bias`` when loading, which
    would shift every output by NeMo's ``rm_head`` bias. The head is replaced by a biased ``Linear`` loaded from
    the safetensors directly (``(K, hidden)`` + ``(K,)``: small), so this also holds when ``from_pretrained``
    returned ZeRO-3-partitioned parameters: the new head is an ordinary module that ``deepspeed.initialize``
    partitions with the rest. No-op for checkpoints without the flag.
    """
    from torch import nn

    if not _wants_score_bias(getattr(model, "config", None)):
        return
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear):
        raise ModelLoadError(f"{folder}/config.json says the score head has a bias, but {type(model).__name__} has "
                             "no linear 'score' head")
    if head.bias is not None:
        return
    tensors = _read_safetensors(Path(folder), ("score.weight", "score.bias"))
    weight, bias = tensors["score.weight"], tensors["score.bias"]
    if tuple(weight.shape) != (head.out_features, head.in_features) or tuple(bias.shape) != (head.out_features,):
        raise ModelLoadError(f"{folder}: score.weight {tuple(weight.shape)} / score.bias {tuple(bias.shape)} do not "
                             f"match the model's head ({head.out_features}, {head.in_features})")
    dtype = getattr(head.weight, "ds_tensor", head.weight).dtype
    biased = nn.Linear(head.in_features, head.out_features, bias=True, dtype=dtype)
    with torch.no_grad():
        biased.weight.copy_(weight.to(dtype))
        biased.bias.copy_(bias.to(dtype))
    model.score = biased
