"""Best-of-n rejection sampling: n sampled candidates per prompt from a causal LM, scored, the best kept.

Every candidate is written with all of its attributes, its policy token count and its reward, plus the chosen
index and the schema's attribute names, so ``steer_reward.reselect`` can pick again under other weights without
running any model. The length penalty counts the **policy's** generated tokens (up to and including its first
end-of-sequence token), as in the TRL faces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from steer_reward.formatting import Prompt, normalize_messages

__all__ = ["SamplingConfig", "PolicySampler", "best_of_n_rows", "write_best_of_n", "load_policy"]


@dataclass
class SamplingConfig:
    n: int = 8
    """Candidates per prompt."""
    max_new_tokens: int = 128
    """Longest candidate, in policy tokens."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    seed: int = 0
    """Candidates of prompt i are drawn after ``torch.manual_seed(seed + i)``: reproducible whatever the batch."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def load_policy(path: str, device: str = "auto") -> tuple[Any, Any]:
    """(causal LM in eval mode, tokenizer) from a local folder, or the random demo policy for ``"demo"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steer_reward.modeling import ModelLoadError, resolve_device

    if path == "demo":
        from steer_reward.demo import demo_policy_dir

        path = str(demo_policy_dir())
    if not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"policy folder {path!r} is not a local Hugging Face model folder (or use --policy demo)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(resolve_device(device)).eval()
    return model, tokenizer


class PolicySampler:
    """Samples candidates from a causal LM, templating prompts with the policy's own chat template when it has
    one (its generation prompt appended), else reading the raw prompt text."""

    def __init__(self, model: Any, tokenizer: Any, sampling: SamplingConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or SamplingConfig()
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(normalize_messages(prompt), add_generation_prompt=True,
                                                      tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in normalize_messages(prompt))
        return self.tokenizer(text)["input_ids"]

    def _cut(self, ids: list[int]) -> list[int]:
        """Generated ids up to and including the first end-of-sequence id (padding after it dropped)."""
        for i, token in enumerate(ids):
            if token in self.eos_ids:
                return ids[: i + 1]
        return ids

    @torch.inference_mode()
    def sample(self, prompt: Prompt, index: int) -> list[list[int]]:
        """The n candidates' generated token ids for prompt number ``index``."""
        s = self.sampling
        device = next(self.model.parameters()).device
        ids = torch.tensor([self.prompt_ids(prompt)], device=device)
        torch.manual_seed(s.seed + index)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=s.temperature,
                                  top_p=s.top_p, max_new_tokens=s.max_new_tokens, num_return_sequences=s.n,
                                  pad_token_id=self.pad_id)
        return [self._cut(row) for row in out[:, ids.shape[1]:].tolist()]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def best_of_n_rows(reward: Any, sampler: PolicySampler, rows: Iterable[dict], prompt_key: str = "prompt",
                   progress: bool = True) -> Iterator[dict]:
    """For each input row, the row plus ``candidates`` (text, attributes, completion_tokens, reward, and the
    reward model's ``prompt_truncated_tokens`` / ``completion_truncated_tokens`` to fit ``model.max_length``),
    ``chosen`` (index of the highest reward), ``chosen_text``, ``schema`` and ``attribute_names``."""
    from tqdm import tqdm

    schema = reward.schema
    rows = list(rows)
    for index, row in enumerate(tqdm(rows, desc=f"best-of-{sampler.sampling.n}", unit="prompt",
                                     disable=not progress)):
        prompt = row[prompt_key]
        generated = sampler.sample(prompt, index)
        texts = [sampler.decode(ids) for ids in generated]
        lengths = [len(ids) for ids in generated]
        scored = reward.score([prompt] * len(texts), texts, lengths=lengths)
        rewards = scored.rewards.tolist()
        chosen = max(range(len(rewards)), key=rewards.__getitem__)
        cuts = zip(scored.attributes.prompt_truncated.tolist(), scored.attributes.completion_truncated.tolist())
        yield {
            **row,
            "candidates": [{"text": t, "attributes": a, "completion_tokens": n, "reward": r,
                            "prompt_truncated_tokens": p, "completion_truncated_tokens": c}
                           for t, a, n, r, (p, c) in zip(texts, scored.attributes.to_dicts(), lengths, rewards,
                                                         cuts)],
            "chosen": chosen,
            "chosen_text": texts[chosen],
            "schema": schema.name,
            "attribute_names": list(schema.names),
        }


def write_best_of_n(reward: Any, sampler: PolicySampler, rows: Iterable[dict], output: str | Path,
                    prompt_key: str = "prompt", progress: bool = True) -> int:
    """Run best-of-n over ``rows`` into the JSONL ``output``, one line per prompt as soon as it is done."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with output.open("w", encoding="utf-8") as out:
        for result in best_of_n_rows(reward, sampler, rows, prompt_key, progress):
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            written += 1
    return written
