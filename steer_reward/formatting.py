"""(prompt, completion) → token ids for the reward model.

The prompt part and the completion part are tokenized separately and concatenated, so every completion of a
group shares byte-identical prompt ids (what prefix sharing needs), and a prompt is tokenized once however many
completions it has. Over-long inputs lose prompt tokens from the left; the completion's end, where the score is
read, is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "STEERLM_SYSTEM_PROMPT",
    "EncodedSample",
    "FormattingError",
    "RewardFormatter",
    "normalize_messages",
    "completion_text",
]

STEERLM_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)

Prompt = str | Sequence[dict]
Completion = str | Sequence[dict]


class FormattingError(ValueError):
    """A prompt or completion that cannot be turned into model input, with the reason."""


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of one (prompt, completion) for the reward model."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    prompt_truncated: int = 0
    """Prompt tokens dropped from the left to fit ``max_length``."""
    completion_truncated: int = 0
    """Completion tokens dropped from the left because the completion alone exceeds ``max_length``."""

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.completion_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def normalize_messages(prompt: Prompt) -> list[dict]:
    """A prompt as a list of ``{"role", "content"}`` messages (a string is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict):
        prompt = [prompt]
    if not isinstance(prompt, Sequence):
        raise FormattingError(f"a prompt must be a string or a list of messages, got {type(prompt).__name__}")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise FormattingError(f"prompt message {i} must be a mapping with 'role' and 'content', got {message!r}")
        if not isinstance(message["content"], str):
            raise FormattingError(f"prompt message {i}: content must be a string, got {message['content']!r}")
        messages.append({"role": str(message["role"]), "content": message["content"]})
    return messages


def completion_text(completion: Completion) -> str:
    """The text of a completion given as a string or as TRL's ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, Sequence) and all(isinstance(m, dict) and "content" in m for m in completion):
        parts = [m["content"] for m in completion]
        if not all(isinstance(p, str) for p in parts):
            raise FormattingError(f"completion content must be strings, got {parts!r}")
        return "".join(parts)
    raise FormattingError(
        f"a completion must be a string or a list of {{'role', 'content'}} messages, got {completion!r:.200}"
    )


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RewardFormatter:
    """Turns (prompt, completion) pairs into ``EncodedSample``s for one reward model.

    Templates: ``chat_template`` (the RM tokenizer's own), ``steerlm`` (``<extra_id_*>``, score read at the final
    ``<extra_id_2>``, no BOS/EOS) and ``raw`` (BOS + prompt + completion).
    """

    def __init__(self, tokenizer: Any, template: str = "chat_template", max_length: int = 4096,
                 system_prompt: str | None = None) -> None:
        if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise FormattingError(
                "the reward model's tokenizer has no chat template; set model.template to 'steerlm' or 'raw'"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = int(max_length)
        self.system_prompt = STEERLM_SYSTEM_PROMPT if system_prompt is None else system_prompt

    # -- text -----------------------------------------------------------------------------------------------
    def _steerlm_prompt(self, messages: list[dict]) -> str:
        system = self.system_prompt
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        text = f"<extra_id_0>System\n{system}\n"
        for message in messages:
            role = "Assistant" if message["role"] == "assistant" else "User"
            text += f"<extra_id_1>{role}\n{message['content']}\n"
        return text + "<extra_id_1>Assistant\n"

    def _chat_texts(self, messages: list[dict], response: str) -> tuple[str, str]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )
        # Templates that re-render earlier turns differently once an answer follows (some strip reasoning)
        # break the prefix property; fall back to the longest common prefix so the full text stays exact.
        cut = len(prompt) if full.startswith(prompt) else _common_prefix_length(prompt, full)
        return full[:cut], full[cut:]

    def prompt_text(self, prompt: Prompt) -> str:
        """The templated prompt part (everything before the completion)."""
        messages = normalize_messages(prompt)
        if self.template == "steerlm":
            return self._steerlm_prompt(messages)
        if self.template == "raw":
            return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def texts(self, prompt: Prompt, completion: Completion) -> tuple[str, str]:
        """(prompt text, completion text) whose concatenation is what the reward model reads."""
        response = completion_text(completion)
        if self.template == "chat_template":
            return self._chat_texts(normalize_messages(prompt), response)
        if self.template == "steerlm":
            return self.prompt_text(prompt), f"{response}\n<extra_id_2>"
        return self.prompt_text(prompt), response

    # -- ids ------------------------------------------------------------------------------------------------
    def _ids(self, text: str) -> tuple[int, ...]:
        # Templated text already holds BOS where the template wants it; special tokens here would double it.
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    def _prompt_ids(self, text: str) -> tuple[int, ...]:
        ids = self._ids(text)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if self.template == "raw" and bos is not None and (not ids or ids[0] != bos):
            ids = (bos,) + ids
        return ids

    def fit(self, prompt_ids: tuple[int, ...], completion_ids: tuple[int, ...]) -> EncodedSample:
        """Left-truncate the prompt (keeping a leading BOS) so the sample fits ``max_length``."""
        completion_cut = max(0, len(completion_ids) - self.max_length)
        completion_ids = completion_ids[completion_cut:]
        room = self.max_length - len(completion_ids)
        if len(prompt_ids) <= room:
            return EncodedSample(prompt_ids, completion_ids, 0, completion_cut)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if room >= 2 and bos is not None and prompt_ids[0] == bos:
            kept = prompt_ids[:1] + prompt_ids[len(prompt_ids) - room + 1:]
        else:
            kept = prompt_ids[len(prompt_ids) - room:] if room else ()
        return EncodedSample(kept, completion_ids, len(prompt_ids) - len(kept), completion_cut)

    def encode(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> list[EncodedSample]:
        """Encode a batch; each distinct prompt is templated and tokenized once.

        >>> samples = formatter.encode(["2+2?"] * 2, ["4", "four"])  # doctest: +SKIP
        >>> samples[0].prompt_ids == samples[1].prompt_ids  # doctest: +SKIP
        True
        """
        if len(prompts) != len(completions):
            raise FormattingError(f"got {len(prompts)} prompts but {len(completions)} completions")
        prompt_cache: dict[str, tuple[int, ...]] = {}
        samples = []
        for prompt, completion in zip(prompts, completions):
            ptext, ctext = self.texts(prompt, completion)
            if ptext not in prompt_cache:
                prompt_cache[ptext] = self._prompt_ids(ptext)
            sample = self.fit(prompt_cache[ptext], self._ids(ctext))
            if len(sample) == 0:
                raise FormattingError(
                    f"prompt {json.dumps(prompt)[:80]} with completion {json.dumps(completion)[:80]} has no tokens "
                    "to score; use a template that adds tokens (chat_template, steerlm) or a non-empty text"
                )
            samples.append(sample)
        return samples
