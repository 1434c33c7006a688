"""The converted model's tokenizer: bundled in the ``.nemo`` or given with ``--tokenizer DIR``; a pad token that
never occurs in real text; SteerLM's template as its chat template.

NeMo bundles tokenizer files as ``<hash>_<name>`` next to ``model_config.yaml`` and names them ``nemo:<file>`` in
its ``tokenizer`` section (``model`` for a SentencePiece model, ``vocab_file`` / ``merge_file`` for a GPT-2 style
BPE). Llama-3 reward models usually bundle nothing and name a Hugging Face tokenizer id instead: that one has to
be given as a local folder (nothing is downloaded).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from steer_reward.convert.nemo_config import NemoModelConfig
from steer_reward.convert.source import CheckpointSource, NemoCheckpointError
from steer_reward.formatting import STEERLM_SYSTEM_PROMPT

__all__ = ["resolve_tokenizer", "choose_pad_token", "STEERLM_CHAT_TEMPLATE", "ADDED_PAD_TOKEN"]

ADDED_PAD_TOKEN = "<|steer_reward_pad|>"

# SteerLM's reward template (DESIGN.md "Formatting", NeMo-Aligner's regression data) as a chat template, so the
# tokenizer's own template produces exactly the text of steer-reward's ``steerlm`` template: the prompt ends with
# "<extra_id_1>Assistant\n", a final assistant turn ends with "\n<extra_id_2>" (where the score is read), no BOS.
STEERLM_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + STEERLM_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}"
    "{%- set turns = messages -%}{%- endif -%}"
    "{{ '<extra_id_0>System\\n' + system + '\\n' }}"
    "{%- for message in turns -%}"
    "{{ '<extra_id_1>' + ('Assistant' if message['role'] == 'assistant' else 'User') + '\\n' }}"
    "{{ message['content'] + '\\n' }}"
    "{%- if loop.last and message['role'] == 'assistant' and not add_generation_prompt -%}"
    "{{ '<extra_id_2>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<extra_id_1>Assistant\\n' }}{%- endif -%}"
)


def _bundled(source: CheckpointSource, value: Any) -> str | None:
    """The archive path of a ``nemo:<file>`` reference, when the file is in the checkpoint."""
    if not isinstance(value, str) or not value.startswith("nemo:"):
        return None
    name = value[len("nemo:"):]
    return name if source.exists(name) else None


def _load_bundled(source: CheckpointSource, cfg: NemoModelConfig, workdir: Path) -> Any | None:
    section = cfg.tokenizer
    library = str(section.get("library", "")).lower()
    model = _bundled(source, section.get("model"))
    vocab = _bundled(source, section.get("vocab_file"))
    merges = _bundled(source, section.get("merge_file"))
    if model is None and vocab is None:
        return None

    def extract(name: str, target: str) -> str:
        path = workdir / target
        with source.open(name) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return str(path)

    try:
        # The files under their standard names in one folder, loaded with from_pretrained: the same call on every
        # Transformers version (the constructors' argument names changed in 5.x).
        if model is not None and library in ("sentencepiece", ""):
            from transformers import LlamaTokenizer

            # Llama-2-era SteerLM models bundle a SentencePiece model; NeMo reads it with legacy=True by default.
            extract(model, "tokenizer.model")
            return LlamaTokenizer.from_pretrained(str(workdir), legacy=bool(section.get("sentencepiece_legacy", True)),
                                                  add_bos_token=False, add_eos_token=False)
        if vocab is not None and merges is not None:
            from transformers import GPT2TokenizerFast

            extract(vocab, "vocab.json")
            extract(merges, "merges.txt")
            return GPT2TokenizerFast.from_pretrained(str(workdir))
    except (ImportError, OSError, ValueError) as err:
        raise NemoCheckpointError(f"cannot build the bundled tokenizer ({library or 'unknown library'}, "
                                  f"{model or vocab}): {err}; pass a Hugging Face tokenizer folder with --tokenizer "
                                  "DIR") from None
    return None


def resolve_tokenizer(source: CheckpointSource, cfg: NemoModelConfig, tokenizer_dir: str | None,
                      workdir: Path) -> tuple[Any, str]:
    """(tokenizer, where it came from). ``--tokenizer DIR`` wins over bundled files, which are extracted into
    ``workdir`` (kept until the tokenizer is saved)."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        folder = Path(tokenizer_dir).expanduser()
        if not folder.is_dir():
            raise NemoCheckpointError(f"--tokenizer {tokenizer_dir!r} is not a folder")
        try:
            return AutoTokenizer.from_pretrained(str(folder)), f"--tokenizer {folder}"
        except (OSError, ValueError) as err:
            raise NemoCheckpointError(f"cannot load a tokenizer from --tokenizer {folder}: {err}") from None
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = _load_bundled(source, cfg, workdir)
    if tokenizer is not None:
        return tokenizer, "bundled in the checkpoint"
    named = cfg.tokenizer.get("type") or cfg.tokenizer.get("model")
    hint = f" (model_config.yaml names {named!r}; download that tokenizer)" if named else ""
    raise NemoCheckpointError(f"the checkpoint does not bundle its tokenizer{hint}: pass its Hugging Face tokenizer "
                              "folder with --tokenizer DIR")


def choose_pad_token(tokenizer: Any) -> tuple[str, bool]:
    """(pad token, whether it had to be added). Never BOS/EOS/UNK or a token of ordinary text: an existing
    special pad token, else the first reserved special token (Llama-3 ships 250), else a new one."""
    ordinary = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, None}
    if tokenizer.pad_token not in ordinary:
        return tokenizer.pad_token, False
    added = sorted(((i, t.content) for i, t in tokenizer.added_tokens_decoder.items() if t.special),
                   key=lambda item: item[0])
    for wanted in ("pad", "reserved"):
        for _, content in added:
            if wanted in content.lower() and content not in ordinary:
                return content, False
    return ADDED_PAD_TOKEN, True
