"""OpenRLHF's remote-reward protocol: actor-templated queries in, ``{"rewards", "scores", "extra_logs"}`` out.

OpenRLHF 0.11 (``openrlhf/utils/agent.py``) posts ``{"query": [q], "prompts": [p], "labels": [l]}`` where
``q = actor_tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)``: the prompt as the ACTOR
templated it, the response, and the actor's end-of-turn/EOS token. ``p`` is the dataset prompt (templated by the
actor with ``--data.apply_chat_template``). The reward model needs the conversation and the response back, to
template them its own way, so this module recovers them:

1. when ``q`` starts with ``p`` (the usual case) the response is ``q[len(p):]`` and the conversation is ``p``
   parsed as Llama-3 or ChatML turns, or ``p`` itself when it carries no chat markup (plain prompts);
2. otherwise the whole query is parsed as turns and its last assistant turn is the response.

Trailing end-of-turn/EOS tokens of the actor are stripped from the response.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from steer_reward.errors import InputError

__all__ = ["ParsedQuery", "parse_query", "parse_turns", "strip_end_tokens", "openrlhf_reply", "END_TOKENS"]

END_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>", "<eos>", "<end_of_turn>",
              "<|end|>", "<|eom_id|>")
"""End-of-turn / end-of-sequence markers of common actor tokenizers (Llama-3, Qwen/ChatML, Llama-2/Mistral,
Gemma, Phi-3)."""

BEGIN_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")

_LLAMA3_TURN = re.compile(r"<\|start_header_id\|>(.*?)<\|end_header_id\|>\n\n(.*?)(?=<\|eot_id\|>|<\|eom_id\|>|"
                          r"<\|start_header_id\|>|\Z)(?:<\|eot_id\|>|<\|eom_id\|>)?", re.DOTALL)
_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?=<\|im_end\|>|<\|im_start\|>|\Z)(?:<\|im_end\|>\n?)?",
                          re.DOTALL)
_TEMPLATES = (("llama3", "<|start_header_id|>", _LLAMA3_TURN), ("chatml", "<|im_start|>", _CHATML_TURN))


@dataclass(frozen=True)
class ParsedQuery:
    """One OpenRLHF query split back into what the reward model formats."""

    prompt: str | list[dict]
    """The conversation: ``[{"role", "content"}]`` for chat-templated text, the plain text otherwise."""
    response: str
    """The actor's response, end-of-turn/EOS tokens removed."""
    template: str
    """Which actor template was recognised: llama3, chatml or plain."""


def strip_end_tokens(text: str, extra: Sequence[str] = ()) -> str:
    """``text`` without trailing end-of-turn/EOS markers (and the newline ChatML puts after ``<|im_end|>``).

    A newline that the response itself ends with (no marker after it) is kept.
    """
    markers = tuple(m for m in (*extra, *END_TOKENS) if m)
    while True:
        core = text.rstrip("\n")
        marker = next((m for m in markers if core.endswith(m)), None)
        if marker is None:
            return text
        text = core[: -len(marker)]


def _strip_begin(text: str) -> str:
    changed = True
    while changed:
        changed = False
        for marker in BEGIN_TOKENS:
            if text.startswith(marker):
                text, changed = text[len(marker):], True
    return text


def parse_turns(text: str) -> tuple[str, list[dict]] | None:
    """(template, turns) when ``text`` is Llama-3 or ChatML markup; None for plain text.

    An open turn at the end (``...assistant<|end_header_id|>\\n\\n`` with nothing after it, i.e. a generation
    prompt) is kept with empty content, so callers can tell a prompt from a finished conversation.
    """
    for name, marker, pattern in _TEMPLATES:
        if marker in text:
            body = _strip_begin(text)
            turns = [{"role": m.group(1).strip(), "content": m.group(2)} for m in pattern.finditer(body)]
            if turns:
                return name, turns
    return None


def parse_query(query: str, prompt: str | None = None, end_tokens: Sequence[str] = ()) -> ParsedQuery:
    """Recover (conversation, response) from one OpenRLHF query; ``prompt`` is the request's ``prompts`` entry.

    >>> q = "<|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\nHello<|eot_id|>"
    >>> parse_query(q).prompt, parse_query(q).response
    ([{'role': 'user', 'content': 'Hi'}], 'Hello')
    """
    if prompt and query.startswith(prompt):
        response = strip_end_tokens(query[len(prompt):], end_tokens)
        parsed = parse_turns(prompt)
        if parsed is None:
            return ParsedQuery(_strip_begin(prompt), response, "plain")
        template, turns = parsed
        if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"].strip():
            turns = turns[:-1]  # the generation prompt's open assistant header
        if not turns:
            raise InputError(f"the prompt {prompt[:80]!r} holds no conversation turns")
        return ParsedQuery(turns, response, template)
    parsed = parse_turns(query)
    if parsed is None:
        hint = ("it does not start with its prompt" if prompt else "no prompt was sent")
        raise InputError(f"cannot split the query into prompt and response: {hint} and it has no Llama-3 or ChatML "
                         f"chat markup; send the templated prompt in 'prompts' (OpenRLHF does)")
    template, turns = parsed
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise InputError(f"the {template} query must end with an assistant turn after at least one other turn; "
                         f"got roles {[t['role'] for t in turns]}")
    return ParsedQuery(turns[:-1], strip_end_tokens(turns[-1]["content"], end_tokens), template)


def _finite(values: Sequence[float]) -> list[float]:
    # JSON has no NaN/inf; a NaN reward would crash OpenRLHF's JSON parser, so it is sent as null.
    return [v if math.isfinite(v) else None for v in values]


def openrlhf_reply(scored: Any, live_names: Sequence[str]) -> dict:
    """The reply OpenRLHF reads from a ``ScoredBatch``: rewards, scores (the same) and per-attribute lists.

    ``extra_logs`` holds one list per live attribute plus ``prompt_truncated_tokens`` (always present, so every
    reply has the same keys for OpenRLHF to average).
    """
    rewards = _finite(scored.rewards.tolist())
    attributes = scored.attributes
    logs = {name: _finite(attributes.column(name).tolist()) for name in live_names}
    logs["prompt_truncated_tokens"] = [float(t) for t in attributes.prompt_truncated.tolist()]
    return {"rewards": rewards, "scores": list(rewards), "extra_logs": logs}


def empty_reply(live_names: Sequence[str]) -> dict:
    """The reply to an empty query list (OpenRLHF 0.9.1-0.11.1 send those to all but the first URL)."""
    return {"rewards": [], "scores": [], "extra_logs": {**{n: [] for n in live_names}, "prompt_truncated_tokens": []}}
