"""The chat templates of actor (policy) models, read backwards: templated text → conversation turns.

OpenRLHF hands the reward model text the ACTOR templated (DESIGN.md "OpenRLHF 0.11"); the reward model needs the
conversation back to template it its own way. Each ``ChatFamily`` reads one family of templates:

============  ==========================================================================================
llama3        Llama-3/3.1/3.2/3.3: ``<|start_header_id|>role<|end_header_id|>\\n\\n…<|eot_id|>``; the
              3.1+ system block ("Cutting Knowledge Date … Today Date …") is template text, not a system turn
chatml        Qwen2/2.5/3, QwQ, Phi-4 and other ChatML templates: ``<|im_start|>role\\n…<|im_end|>``
mistral       Mistral/Mixtral ``[INST] … [/INST] …</s>`` (v1-v7, ``[SYSTEM_PROMPT]``) and Llama-2 ``<<SYS>>``
gemma         Gemma 1-3: ``<start_of_turn>user\\n…<end_of_turn>``, role ``model`` is the assistant
phi3          Phi-3/3.5 (and Zephyr): ``<|user|>\\n…<|end|>``
deepseek      DeepSeek-V3/R1 and the R1 distills: ``<｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜>``
============  ==========================================================================================

``ActorTemplate.from_tokenizer`` renders a probe conversation with the actor tokenizer's own chat template to
learn which family it is, its generation prompt and its end tokens, and checks that the family's reader gets the
probe back; without it the family is recognised from the markup of the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from steer_reward.errors import InputError

__all__ = ["Turn", "ChatFamily", "FAMILIES", "detect_family", "family_named", "ActorTemplate",
           "strip_reasoning", "THINK_OPEN", "THINK_CLOSE"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
"""The reasoning block of Qwen3, QwQ and DeepSeek-R1 responses."""


@dataclass(frozen=True)
class Turn:
    """One turn read back from templated text."""

    role: str
    content: str
    closed: bool
    """False when the text ends inside this turn: a generation prompt (an assistant header, maybe with a prefill
    such as ``<think>\\n``) or a response still being written."""


@dataclass(frozen=True)
class ChatFamily:
    """How one family of chat templates marks turns."""

    name: str
    markers: tuple[str, ...]
    """Strings only this family's markup holds; any of them in a text means the text is this family's."""
    header: re.Pattern
    """The opening of an assistant turn: what the generation prompt is, and where a response starts."""
    end_tokens: tuple[str, ...]
    """What closes an assistant turn (end-of-turn and end-of-sequence tokens)."""
    begin_tokens: tuple[str, ...]
    """Beginning-of-sequence tokens the template puts first."""
    read: Callable[[str], list[Turn]] = field(repr=False)
    """Templated text (begin tokens removed) → its turns, in order."""

    def present(self, text: str) -> bool:
        return any(marker in text for marker in self.markers)

    def turns(self, text: str) -> list[Turn]:
        return self.read(strip_begin(text, self.begin_tokens))


def strip_begin(text: str, begin_tokens: Sequence[str]) -> str:
    """``text`` without leading beginning-of-sequence tokens (and the space a sentencepiece decode puts after)."""
    changed = True
    while changed:
        changed = False
        for token in begin_tokens:
            if token and text.startswith(token):
                text, changed = text[len(token):], True
    return text


def _find_end(body: str, ends: Sequence[str]) -> int:
    positions = [p for p in (body.find(e) for e in ends) if p >= 0]
    return min(positions) if positions else -1


def _delimited(start: str, ends: tuple[str, ...], roles: dict[str, str] | None = None) -> Callable[[str], list[Turn]]:
    """A reader for templates where every turn opens with ``start`` (role in group 1) and closes with one of
    ``ends``. Text outside turns (newlines between them) is template text."""
    pattern = re.compile(start)
    roles = roles or {}

    def read(text: str) -> list[Turn]:
        matches = list(pattern.finditer(text))
        turns = []
        for i, match in enumerate(matches):
            last = i + 1 == len(matches)
            body = text[match.end(): len(text) if last else matches[i + 1].start()]
            end = _find_end(body, ends)
            content, closed = (body[:end], True) if end >= 0 else (body, not last)
            role = match.group(1)
            turns.append(Turn(roles.get(role, role), content, closed))
        return turns

    return read


_LLAMA31_PREAMBLE = re.compile(r"\A(?:Environment: ipython\n)?(?:Tools: [^\n]*\n\n)?Cutting Knowledge Date: [^\n]*\n"
                               r"Today Date: [^\n]*\n\n")


def _read_llama3(text: str) -> list[Turn]:
    turns = _delimited(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n", ("<|eot_id|>", "<|eom_id|>"))(text)
    if turns and turns[0].role == "system":
        # Llama-3.1+ templates open every conversation with a system block of their own: knowledge cut-off and
        # date, then the user's system message (often none). Only the user's message is a system turn.
        system = _LLAMA31_PREAMBLE.sub("", turns[0].content, count=1)
        turns = ([Turn("system", system, turns[0].closed)] if system.strip() else []) + turns[1:]
    return turns


_MISTRAL_SPLIT = re.compile(r"(\[INST\]|\[/INST\])")
_MISTRAL_SYSTEM = re.compile(r"\A\s*\[SYSTEM_PROMPT\](.*?)\[/SYSTEM_PROMPT\]", re.DOTALL)
_LLAMA2_SYSTEM = re.compile(r"\A\s*<<SYS>>\n(.*?)\n<</SYS>>\n\n(.*)\Z", re.DOTALL)


def _read_mistral(text: str) -> list[Turn]:
    turns: list[Turn] = []
    system = _MISTRAL_SYSTEM.match(text)
    if system:
        turns.append(Turn("system", system.group(1), True))
        text = text[system.end():]
    pieces = _MISTRAL_SPLIT.split(text)
    # pieces: [before, "[INST]", user, "[/INST]", assistant, "[INST]", ...]
    for i in range(1, len(pieces), 2):
        marker, body, last = pieces[i], pieces[i + 1], i + 2 >= len(pieces)
        if marker == "[INST]":
            user = body.strip()
            llama2 = _LLAMA2_SYSTEM.match(user) if not any(t.role == "user" for t in turns) else None
            if llama2:  # Llama-2 puts the system message inside the first [INST]
                turns.append(Turn("system", llama2.group(1), True))
                user = llama2.group(2).strip()
            turns.append(Turn("user", user, True))
        else:
            end = body.find("</s>")
            if end >= 0:
                turns.append(Turn("assistant", body[:end].strip(), True))
            else:
                turns.append(Turn("assistant", body if last else body.strip(), not last))
    return turns


_DEEPSEEK_USER, _DEEPSEEK_ASSISTANT, _DEEPSEEK_EOS = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
_DEEPSEEK_SPLIT = re.compile(f"({re.escape(_DEEPSEEK_USER)}|{re.escape(_DEEPSEEK_ASSISTANT)})")


def _read_deepseek(text: str) -> list[Turn]:
    pieces = _DEEPSEEK_SPLIT.split(text)
    # The system message is the bare text between the begin token and the first <｜User｜>.
    turns = [Turn("system", pieces[0], True)] if pieces[0].strip() else []
    for i in range(1, len(pieces), 2):
        marker, body, last = pieces[i], pieces[i + 1], i + 2 >= len(pieces)
        if marker == _DEEPSEEK_USER:
            turns.append(Turn("user", body, True))
            continue
        end = body.find(_DEEPSEEK_EOS)
        content, closed = (body[:end], True) if end >= 0 else (body, not last)
        turns.append(Turn("assistant", content, closed))
    return turns


FAMILIES: tuple[ChatFamily, ...] = (
    ChatFamily("llama3", ("<|start_header_id|>",), re.compile(r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n"),
               ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"), ("<|begin_of_text|>",), _read_llama3),
    ChatFamily("chatml", ("<|im_start|>",), re.compile(r"<\|im_start\|>assistant(?:\n|<\|im_sep\|>)"),
               ("<|im_end|>", "<|endoftext|>"), (),
               _delimited(r"<\|im_start\|>(\w+)(?:\n|<\|im_sep\|>)", ("<|im_end|>",))),
    ChatFamily("gemma", ("<start_of_turn>",), re.compile(r"<start_of_turn>model\n"), ("<end_of_turn>", "<eos>"),
               ("<bos>",), _delimited(r"<start_of_turn>(\w+)\n", ("<end_of_turn>",), {"model": "assistant"})),
    ChatFamily("deepseek", (_DEEPSEEK_USER, _DEEPSEEK_ASSISTANT), re.compile(re.escape(_DEEPSEEK_ASSISTANT)),
               (_DEEPSEEK_EOS,), ("<｜begin▁of▁sentence｜>",), _read_deepseek),
    ChatFamily("phi3", ("<|user|>", "<|assistant|>", "<|system|>"), re.compile(r"<\|assistant\|>\n?"),
               ("<|end|>", "<|endoftext|>", "</s>"), ("<s>",),
               _delimited(r"<\|(system|user|assistant)\|>\n?", ("<|end|>", "</s>", "<|endoftext|>"))),
    ChatFamily("mistral", ("[INST]", "[/INST]"), re.compile(r"\[/INST\]"), ("</s>",), ("<s>",), _read_mistral),
)
"""The families, in the order markup is recognised (the most specific markers first)."""


def detect_family(text: str) -> ChatFamily | None:
    """The family whose markup ``text`` holds, or None for plain text."""
    return next((family for family in FAMILIES if family.present(text)), None)


def family_named(name: str) -> ChatFamily:
    return next(family for family in FAMILIES if family.name == name)


def strip_reasoning(reply: str, *, keep_reasoning: bool = False) -> str:
    """``reply`` without a leading ``<think>…</think>`` block.

    An unfinished block (generation stopped while reasoning) leaves an empty answer. With ``keep_reasoning``
    only an EMPTY block is removed: Qwen3's template writes ``<think>\\n\\n</think>\\n\\n`` itself when thinking
    is off, which is template text, not something the policy said.

    >>> strip_reasoning("<think>\\n2+2 is 4\\n</think>\\n\\nFour.")
    'Four.'
    """
    body = reply.lstrip()
    if not body.startswith(THINK_OPEN):
        return reply
    end = body.find(THINK_CLOSE)
    if end < 0:
        return reply if keep_reasoning else ""
    if keep_reasoning and body[len(THINK_OPEN):end].strip():
        return reply
    return body[end + len(THINK_CLOSE):].lstrip("\n")


_PROBE = ("SYSTEM-PROBE-3f1", "USER-PROBE-7a2", "ASSISTANT-PROBE-c94", "USER-PROBE-e05", "ASSISTANT-PROBE-b68")


@dataclass(frozen=True)
class ActorTemplate:
    """What the actor tokenizer's own chat template says about the queries OpenRLHF will send."""

    family: ChatFamily | None
    """The family of the template; None when the tokenizer has no chat template (plain-text prompts)."""
    generation_prompt: str
    """What ``add_generation_prompt=True`` appends, from the assistant header on (e.g. ``<|im_start|>assistant\\n``
    or, for Qwen3 with thinking off, ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``); '' for plain."""
    end_tokens: tuple[str, ...]
    """The actor's EOS and the special tokens its template puts after an assistant turn."""
    begin_tokens: tuple[str, ...]
    """The actor's BOS token, when it has one."""
    source: str

    @classmethod
    def from_tokenizer(cls, path: str, tokenizer=None) -> "ActorTemplate":
        """Load the tokenizer folder ``path`` (no download) and read its chat template; ``InputError`` when the
        template is not one of ``FAMILIES`` or does not read back."""
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as err:
                raise InputError(f"server.actor_tokenizer: cannot load a tokenizer from {path!r} ({err})") from None
        eos = getattr(tokenizer, "eos_token", None)
        bos = getattr(tokenizer, "bos_token", None)
        begin = tuple(t for t in (bos,) if t)
        if not getattr(tokenizer, "chat_template", None):
            return cls(None, "", tuple(t for t in (eos,) if t), begin, path)
        system, user, answer, user2, answer2 = _PROBE
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                    {"role": "assistant", "content": answer}, {"role": "user", "content": user2}]
        try:
            prompt = _render(tokenizer, messages, True)
        except Exception:  # noqa: BLE001 - templates without a system role (Gemma 2) raise on it
            messages = messages[1:]
        try:
            prompt = _render(tokenizer, messages, True)
            full = _render(tokenizer, messages + [{"role": "assistant", "content": answer2}], False)
        except Exception as err:  # noqa: BLE001 - a template error is the user's to fix, in one line
            raise InputError(f"server.actor_tokenizer {path!r}: its chat template cannot render a user/assistant "
                             f"conversation ({type(err).__name__}: {err})") from None
        family = detect_family(prompt)
        if family is None:
            raise InputError(
                f"server.actor_tokenizer {path!r}: its chat template is none of the families steer-reward reads "
                f"({', '.join(f.name for f in FAMILIES)}); it renders {prompt[-120:]!r}. Leave actor_tokenizer "
                f"unset only if the prompts carry one of those templates")
        headers = list(family.header.finditer(prompt))
        if not headers:
            raise InputError(f"server.actor_tokenizer {path!r}: the {family.name} template's generation prompt has "
                             f"no assistant header: {prompt[-120:]!r}")
        tail = full[full.rfind(answer2) + len(answer2):] if answer2 in full else ""
        specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in tail]
        ends = tuple(dict.fromkeys([*(t for t in (eos,) if t), *specials]))
        template = cls(family, prompt[headers[-1].start():], ends, begin, path)
        template._check(prompt, tail, messages)
        return template

    def _check(self, prompt: str, tail: str, messages: list[dict]) -> None:
        """The family's reader must get the probe back from a query built like OpenRLHF's: the templated prompt,
        the answer, and what the template closes an answer with."""
        from steer_reward.server.openrlhf import QueryParser

        answer2 = _PROBE[4]
        generated = answer2 + tail
        if THINK_OPEN in self.generation_prompt and THINK_CLOSE not in self.generation_prompt:
            generated = f"REASONING-PROBE\n{THINK_CLOSE}\n\n{generated}"  # DeepSeek-R1 opens the block itself
        try:
            parsed = QueryParser(self, strip_reasoning=True).parse(prompt + generated, prompt)
        except InputError as err:
            raise InputError(f"server.actor_tokenizer {self.source!r}: the {self.family.name} reader cannot read "
                             f"this chat template back ({err})") from None
        last_user = messages[-1]["content"]
        if parsed.response != answer2 or not isinstance(parsed.prompt, list) or not parsed.prompt \
                or parsed.prompt[-1]["role"] != "user" or last_user not in parsed.prompt[-1]["content"]:
            raise InputError(f"server.actor_tokenizer {self.source!r}: the {self.family.name} reader does not read "
                             f"this chat template back: got {parsed.prompt!r} and response {parsed.response!r}")


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
