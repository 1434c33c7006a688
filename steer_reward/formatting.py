"""(prompt, completion) → token ids for the reward model.

The prompt part and the completion part are tokenized separately and concatenated, so every completion of a
group shares byte-identical prompt ids (what prefix sharing needs), and a prompt is tokenized once however many
completions it has.

Over-long inputs follow ``model.overlong`` (``RewardFormatter.fit``): the prompt loses tokens from the left first,
but keeps a leading BOS and at least its last ``max_length // 4`` tokens (its last turn and the assistant header
the model reads a response after); past that, ``truncate`` cuts the completion's start (its end, where the score
is read, is always kept) and ``reject`` refuses the sample. Every cut is reported per sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "STEERLM_SYSTEM_PROMPT",
    "EncodedSample",
    "FormattingError",
    "OVERLONG_POLICIES",
    "RewardFormatter",
    "check_unicode",
    "normalize_messages",
    "completion_text",
]

STEERLM_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)

Prompt = str | Sequence[dict]
Completion = str | Sequence[dict]


OVERLONG_POLICIES = ("truncate", "reject")


class FormattingError(ValueError):
    """A prompt or completion that cannot be turned into model input, with the reason.

    ``index`` is the sample's position in the ``encode`` call (None when the error is not about one sample) and
    ``reason`` the message without the ``sample N:`` prefix, so callers can name the sample their own way (the
    CLI names the input line).
    """

    def __init__(self, reason: str, index: int | None = None) -> None:
        self.reason = reason
        self.index = index
        super().__init__(reason if index is None else f"sample {index}: {reason}")


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of one (prompt, completion) for the reward model."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    prompt_truncated: int = 0
    """Prompt tokens dropped from the left to fit ``max_length``."""
    completion_truncated: int = 0
    """Completion tokens dropped from the left (its start) to fit ``max_length`` (``overlong: truncate``)."""

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
            raise FormattingError(f"prompt message {i} must be a mapping with 'role' and 'content', "
                                  f"got {message!r:.200}")
        if not isinstance(message["content"], str):
            raise FormattingError(f"prompt message {i}: content must be a string, got {message['content']!r:.200}")
        if not isinstance(message["role"], str):
            raise FormattingError(f"prompt message {i}: role must be a string, got {message['role']!r:.200}")
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
            raise FormattingError(f"completion content must be strings, got {parts!r:.200}")
        return "".join(parts)
    raise FormattingError(
        f"a completion must be a string or a list of {{'role', 'content'}} messages, got {completion!r:.200}"
    )


def check_unicode(text: str, what: str) -> None:
    """A ``FormattingError`` for text that is not valid Unicode: JSON's ``"\\ud800"`` escape decodes to a lone
    surrogate, which no tokenizer can encode (it fails with a bare ``TypeError``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FormattingError(f"the {what} holds a lone surrogate {text[err.start]!r} at character {err.start}, "
                              "which is not valid Unicode (an unpaired \\ud800-\\udfff escape)") from None


def _template_errors() -> tuple[type[BaseException], ...]:
    """What a chat template or a tokenizer raises for input it refuses (e.g. a template's ``raise_exception``
    when roles do not alternate): turned into a ``FormattingError`` naming the sample."""
    try:
        from jinja2 import TemplateError
    except ImportError:  # no chat templates without jinja2
        return (TypeError, ValueError)
    return (TemplateError, TypeError, ValueError)


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
                 system_prompt: str | None = None, overlong: str = "truncate") -> None:
        if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise FormattingError(
                "the reward model's tokenizer has no chat template; set model.template to 'steerlm' or 'raw'"
            )
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {list(OVERLONG_POLICIES)}, got {overlong!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = int(max_length)
        self.overlong = overlong
        self.system_prompt = STEERLM_SYSTEM_PROMPT if system_prompt is None else system_prompt
        self._refused = _template_errors()

    @classmethod
    def from_config(cls, tokenizer: Any, model_config: Any) -> "RewardFormatter":
        """The formatter a ``ModelConfig`` describes (template, max_length, system prompt, overlong policy): the
        one place every backend builds it, so every face follows the same ``model.overlong``."""
        return cls(tokenizer, model_config.template, model_config.max_length, model_config.system_prompt,
                   model_config.overlong)

    @property
    def prompt_reserve(self) -> int:
        """Prompt tokens (a leading BOS included) kept before a completion is cut: ``max_length // 4``."""
        return self.max_length // 4

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
        """Cut a sample to ``max_length`` tokens under the ``overlong`` policy.

        The prompt loses tokens from the left first, keeping a leading BOS, down to ``prompt_reserve`` tokens (or
        all of it when shorter). Only then is the completion cut, from the left: its end, where the score is read,
        is always kept. Why a reserve rather than dropping the whole prompt for a very long completion: a
        sequence without BOS, question or assistant header is outside everything the reward model was trained
        on, so its score would say nothing about this response to this prompt; its last turn and the header
        cost a quarter of the window at most. ``reject`` raises instead of cutting the completion.
        """
        limit = self.max_length
        if len(prompt_ids) + len(completion_ids) <= limit:
            return EncodedSample(prompt_ids, completion_ids)
        prompt_keep = max(limit - len(completion_ids), min(len(prompt_ids), self.prompt_reserve))
        completion_cut = max(0, len(completion_ids) - (limit - prompt_keep))
        if completion_cut and self.overlong == "reject":
            raise FormattingError(
                f"the completion has {len(completion_ids)} tokens and the prompt {len(prompt_ids)}: with the "
                f"prompt cut to {prompt_keep} tokens at most {limit - prompt_keep} completion tokens fit "
                f"model.max_length {limit} (model.overlong is 'reject'; 'truncate' scores its last "
                f"{limit - prompt_keep} tokens and reports the cut)"
            )
        completion_ids = completion_ids[completion_cut:]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if prompt_keep >= len(prompt_ids):
            kept = prompt_ids
        elif prompt_keep >= 1 and bos is not None and prompt_ids[0] == bos:
            kept = prompt_ids[:1] + prompt_ids[len(prompt_ids) - prompt_keep + 1:]
        else:
            kept = prompt_ids[len(prompt_ids) - prompt_keep:] if prompt_keep else ()
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
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                samples.append(self._encode_one(prompt, completion, prompt_cache))
            except FormattingError as err:
                raise FormattingError(err.reason, index=i) from None
            except self._refused as err:  # the template or tokenizer refused this sample's text
                raise FormattingError(f"{type(err).__name__}: {err}", index=i) from err
        return samples

    def _encode_one(self, prompt: Prompt, completion: Completion, prompt_cache: dict) -> EncodedSample:
        ptext, ctext = self.texts(prompt, completion)
        if ptext not in prompt_cache:
            check_unicode(ptext, "prompt")
            prompt_cache[ptext] = self._prompt_ids(ptext)
        check_unicode(ctext, "completion")
        sample = self.fit(prompt_cache[ptext], self._ids(ctext))
        if len(sample) == 0:
            raise FormattingError(
                f"prompt {json.dumps(prompt)[:80]} with completion {json.dumps(completion)[:80]} has no tokens "
                "to score; use a template that adds tokens (chat_template, steerlm) or a non-empty text"
            )
        return sample
