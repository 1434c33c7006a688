"""The embedded demo models: seeded tiny Llama-architecture models and an offline-trained tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the bundled LLMBar sample, the models are
built from configs with a fixed seed, and all are saved with ``save_pretrained`` into a cache folder on first use
(``$STEER_REWARD_CACHE``, default ``~/.cache/steer_reward``). **The weights are random**: scores from the demo
models show the plumbing, not quality.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

__all__ = [
    "DEMO_WARNING",
    "DEMO_POLICY_WARNING",
    "cache_dir",
    "demo_model_dir",
    "demo_policy_dir",
    "build_demo_tokenizer",
    "sample_rows",
]

DEMO_VERSION = "v1"
DEMO_WARNING = "note: --model demo is a tiny reward model with RANDOM weights; its scores mean nothing."
DEMO_POLICY_WARNING = "note: --policy demo is a tiny causal LM with RANDOM weights; its text is gibberish."

# Llama-3's chat layout (BOS, header ids, <|eot_id|>) so tests exercise the same template shape as real RMs.
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<extra_id_0>", "<extra_id_1>", "<extra_id_2>",
]  # fmt: skip
STEERLM_LABELS = ["quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence",
                  "complexity", "verbosity"]


def cache_dir() -> Path:
    return Path(os.environ.get("STEER_REWARD_CACHE", Path.home() / ".cache" / "steer_reward"))


def sample_rows() -> list[dict]:
    """The bundled LLMBar sample: ``{"id", "subset", "prompt", "chosen", "rejected"}`` rows."""
    text = resources.files("steer_reward").joinpath("data/llmbar_sample.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_demo_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained offline on the bundled sample, with a Llama-3-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [t for row in sample_rows() for t in (row["prompt"], row["chosen"], row["rejected"])]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    wrapped.chat_template = LLAMA3_STYLE_TEMPLATE
    return wrapped


def _build_atomically(target: Path, build) -> Path:
    """Build into a temporary sibling and rename, so concurrent processes (ranks, workers) never see half a model."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _llama_config(tokenizer, **kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **kwargs,
    )


def demo_model_dir() -> Path:
    """Folder of the demo reward model (built on first use): ``LlamaForSequenceClassification``, 9 SteerLM
    outputs, ~0.5M parameters, seed 0."""

    def build(folder: Path) -> None:
        import torch
        from transformers import LlamaForSequenceClassification

        tokenizer = build_demo_tokenizer()
        config = _llama_config(tokenizer, num_labels=9, id2label=dict(enumerate(STEERLM_LABELS)),
                               label2id={n: i for i, n in enumerate(STEERLM_LABELS)},
                               architectures=["LlamaForSequenceClassification"])
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
        with torch.no_grad():  # outputs of order 1, like SteerLM's 0-4 scale
            model.score.weight.normal_(0.0, 0.1)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _build_atomically(cache_dir() / f"demo-rm-{DEMO_VERSION}", build)


def demo_policy_dir() -> Path:
    """Folder of the demo policy (built on first use): a tiny random ``LlamaForCausalLM`` sharing the demo
    tokenizer, seed 1."""

    def build(folder: Path) -> None:
        import torch
        from transformers import GenerationConfig, LlamaForCausalLM

        tokenizer = build_demo_tokenizer()
        torch.manual_seed(1)
        model = LlamaForCausalLM(_llama_config(tokenizer, architectures=["LlamaForCausalLM"]))
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _build_atomically(cache_dir() / f"demo-policy-{DEMO_VERSION}", build)
