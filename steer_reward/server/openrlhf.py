"""OpenRLHF's remote-reward protocol: actor-templated queries in, ``{"rewards", "scores", "extra_logs"}`` out.

OpenRLHF 0.11 (``openrlhf/utils/agent.py``) posts ``{"query": [q], "prompts": [p], "labels": [l]}`` where
``q = actor_tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)``: the prompt as the ACTOR
templated it, the response, and the actor's end-of-turn/EOS token. ``p`` is the dataset prompt (templated by the
actor with ``--data.apply_chat_template``); ``prompt_ids`` are its tokens, LEFT-TRUNCATED when the prompt is longer
than OpenRLHF's prompt budget, so ``q`` may start inside ``p``. The reward model needs the conversation and the
response back, to template them its own way. ``QueryParser`` finds where the response starts:

1. ``q`` starts with ``p``: right after it;
2. ``q`` starts with a suffix of ``p`` (a left-truncated prompt): after the longest such suffix, when it holds
   the prompt's final assistant header (plain prompts: 16 characters or all of ``p``);
3. otherwise, chat prompts: after the assistant header that follows the prompt's last user message in ``q``;
4. no ``p`` sent: ``q``'s own last assistant turn.

The conversation is read from the full ``p`` (``actor_templates``; a plain prompt is its own text), the reply is
the text after the assistant header (a prefill such as ``<think>\\n`` in the generation prompt included) without
trailing end-of-turn/EOS tokens, and a leading reasoning block is dropped under ``server.strip_reasoning``.

OpenRLHF fails the training step on any error reply and on a missing or non-numeric value, so every sample gets
a finite reward: one that cannot be scored gets ``server.fallback_reward`` and ``reward_failed`` = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from steer_reward.errors import InputError
from steer_reward.server.actor_templates import ActorTemplate, ChatFamily, detect_family, strip_begin, strip_reasoning

__all__ = ["ParsedQuery", "QueryParser", "parse_query", "strip_end_tokens", "SampleFailure", "openrlhf_reply",
           "empty_reply", "reward_scores", "check_openrlhf_options", "END_TOKENS", "FAILURE_REASONS"]

END_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>", "<eos>", "<end_of_turn>",
              "<|end|>", "<|eom_id|>", "<｜end▁of▁sentence｜>")
"""End-of-turn / end-of-sequence markers of common actor tokenizers (Llama-3, Qwen/ChatML, Llama-2/Mistral,
Gemma, Phi-3, DeepSeek)."""

BEGIN_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<｜begin▁of▁sentence｜>")

_MAX_TURN_GAP = 64
"""Most characters of template text between a user message's end and the next assistant header."""

PLAIN_MIN_OVERLAP = 16
"""Characters a left-truncated plain prompt must share with the query before the split is trusted."""

FAILURE_REASONS = ("query", "format", "non_finite", "forward")
"""Why a sample got the fallback reward: its query could not be read, it could not be formatted or encoded for
the reward model (over-long under ``model.overlong: reject`` included), its reward was NaN/inf, or the model's
forward failed on it alone (a poison sample, out of memory even alone)."""

SCORES_MODES = ("sigmoid", "reward")
SCORE_EPS = 1e-6
"""``sigmoid`` scores stay within [eps, 1 − eps]: OpenRLHF keeps a group only when min < mean < max, and a score
rounded to exactly 1.0 (float32 rounds sigmoid(17) there) would drop it from the default range (0, 1)."""


@dataclass(frozen=True)
class ParsedQuery:
    """One OpenRLHF query split back into what the reward model formats."""

    prompt: str | list[dict]
    """The conversation: ``[{"role", "content"}]`` for chat-templated text, the plain text otherwise."""
    response: str
    """The actor's response, end-of-turn/EOS tokens removed (and its reasoning, under strip_reasoning)."""
    template: str
    """Which actor template family was read (see ``actor_templates``), or plain."""


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


def _overlap(prompt: str, query: str) -> int:
    """Length of the longest suffix of ``prompt`` that is a prefix of ``query`` (KMP failure function over
    ``query[:len(prompt)] + separator + prompt``; O(len(prompt)))."""
    head = query[: len(prompt)]
    text: list[Any] = [*head, None, *prompt]  # None matches no character
    fail = [0] * len(text)
    for i in range(1, len(text)):
        k = fail[i - 1]
        while k and text[i] != text[k]:
            k = fail[k - 1]
        if text[i] == text[k]:
            k += 1
        fail[i] = k
    return fail[-1]


class QueryParser:
    """Reads OpenRLHF queries of one actor: ``parse(query, prompt) -> ParsedQuery``; ``InputError`` when a query
    cannot be read (the caller answers that sample with the fallback reward).

    ``actor``: the actor tokenizer's template (``ActorTemplate.from_tokenizer``); None recognises the family from
    each prompt's markup. ``end_tokens``: more end markers to strip (the reward model's EOS).
    """

    def __init__(self, actor: ActorTemplate | None = None, end_tokens: Sequence[str] = (),
                 strip_reasoning: bool = True) -> None:
        self.actor = actor
        self.strip_reasoning = strip_reasoning
        self.end_tokens = tuple(dict.fromkeys(t for t in (*(actor.end_tokens if actor else ()), *end_tokens) if t))
        self.begin_tokens = tuple(dict.fromkeys((*(actor.begin_tokens if actor else ()), *BEGIN_TOKENS)))

    def family(self, text: str) -> ChatFamily | None:
        """The family to read ``text`` with: the actor's when its markup is there, else plain; without an actor
        template, whichever family's markup ``text`` holds."""
        if self.actor is not None:
            family = self.actor.family
            return family if family is not None and family.present(text) else None
        return detect_family(text)

    def parse(self, query: str, prompt: str | None = None) -> ParsedQuery:
        for text, name in ((query, "the query"), (prompt or "", "the prompt")):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InputError(f"{name} holds an unpaired UTF-16 surrogate at character {err.start}") from None
        if not query.strip():
            raise InputError("the query is empty; it must hold the prompt and the response")
        prompt = prompt or None
        family = self.family(prompt if prompt is not None else query)
        if family is None:
            return self._plain(query, prompt)
        return self._chat(query, prompt, family)

    # -- plain text ------------------------------------------------------------------------------------------
    def _plain(self, query: str, prompt: str | None) -> ParsedQuery:
        if prompt is None:
            raise InputError("cannot split the query into prompt and response: no prompt was sent and it has no "
                             "chat markup; send the templated prompt in 'prompts' (OpenRLHF does)")
        cut = self._prompt_cut(query, prompt, min_overlap=min(len(prompt), PLAIN_MIN_OVERLAP))
        if cut is None:
            raise InputError(f"the query does not start with its prompt (nor with a left-truncated end of it), and "
                             f"the prompt has no chat markup to find the response by: prompt {prompt[:60]!r}…, "
                             f"query {query[:60]!r}…")
        conversation = strip_begin(prompt, self.begin_tokens)
        if not conversation.strip():
            raise InputError(f"the prompt {prompt[:40]!r} holds no text once its begin-of-sequence token is removed; "
                             f"a prompt needs text (the same rule as /score)")
        return ParsedQuery(conversation, self._reply(query[cut:], None), "plain")

    def _prompt_cut(self, query: str, prompt: str, min_overlap: int) -> int | None:
        """Where the response starts when ``query`` begins with ``prompt`` or with a suffix of it (OpenRLHF keeps
        the prompt's LAST tokens; a token cut inside a character decodes to U+FFFD)."""
        if query.startswith(prompt):
            return len(prompt)
        skipped = len(query) - len(query.lstrip("\ufffd"))
        overlap = _overlap(prompt, query[skipped:])
        return skipped + overlap if overlap >= max(min_overlap, 1) else None

    # -- chat templates --------------------------------------------------------------------------------------
    def _chat(self, query: str, prompt: str | None, family: ChatFamily) -> ParsedQuery:
        if prompt is None:
            turns = family.turns(query)
            if len(turns) < 2 or turns[-1].role != "assistant":
                raise InputError(f"the {family.name} query must end with an assistant turn after at least one other "
                                 f"turn; got roles {[t.role for t in turns]}")
            return ParsedQuery(self._messages(turns[:-1], family), self._reply(turns[-1].content, family),
                               family.name)
        turns = family.turns(prompt)
        prefill = ""
        if turns and turns[-1].role == "assistant" and not turns[-1].closed:
            prefill = turns[-1].content  # the generation prompt's open assistant turn (e.g. "<think>\n")
            turns = turns[:-1]
        if not turns:
            raise InputError(f"the {family.name} prompt {prompt[:80]!r} holds no conversation turns")
        headers = list(family.header.finditer(prompt))
        last_header = headers[-1].start() if headers else 0
        cut = self._prompt_cut(query, prompt, min_overlap=len(prompt) - last_header)
        if cut is not None:
            generated = query[cut:]
        else:
            start = self._header_after_last_user(query, turns, family)
            if start is None:
                raise InputError(f"the query does not start with its prompt (nor with a left-truncated end of it) and "
                                 f"holds no {family.name} assistant header after the prompt's last user message")
            generated = query[start:]
            if prefill and generated.startswith(prefill):
                generated = generated[len(prefill):]
        return ParsedQuery(self._messages(turns, family), self._reply(prefill + generated, family), family.name)

    @staticmethod
    def _header_after_last_user(query: str, turns: list, family: ChatFamily) -> int | None:
        """End of the assistant header that opens the response: the header right after the first place the
        query holds the end of the prompt's last user message (not a later one: a response may quote the
        message, or repeat template markup), or, without a user message, the last header in the query."""
        users = [t.content.strip() for t in turns if t.role == "user" and t.content.strip()]
        if not users:
            matches = list(family.header.finditer(query))
            return matches[-1].end() if matches else None
        anchor = users[-1][-200:]
        position = query.find(anchor)
        while position >= 0:
            match = family.header.search(query, position + len(anchor))
            if match and match.start() - (position + len(anchor)) <= _MAX_TURN_GAP:
                return match.end()
            position = query.find(anchor, position + 1)
        return None

    def _messages(self, turns: list, family: ChatFamily) -> list[dict]:
        messages = []
        for turn in turns:
            content = turn.content
            if turn.role == "assistant":
                content = strip_reasoning(strip_end_tokens(content, family.end_tokens),
                                          keep_reasoning=not self.strip_reasoning)
            messages.append({"role": turn.role, "content": content})
        return messages

    def _reply(self, text: str, family: ChatFamily | None) -> str:
        text = strip_end_tokens(text, (*self.end_tokens, *(family.end_tokens if family else ())))
        if family is not None:
            text = strip_reasoning(text, keep_reasoning=not self.strip_reasoning)
            if family.name == "mistral":
                text = text.strip(" ")  # "[/INST] Hello </s>": Llama-2's template spaces, not the answer's
        return text


def parse_query(query: str, prompt: str | None = None, end_tokens: Sequence[str] = (), *,
                actor: ActorTemplate | None = None, strip_reasoning: bool = True) -> ParsedQuery:
    """Recover (conversation, response) from one OpenRLHF query; ``prompt`` is the request's ``prompts`` entry.

    >>> q = "<|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\nHello<|eot_id|>"
    >>> parse_query(q).prompt, parse_query(q).response
    ([{'role': 'user', 'content': 'Hi'}], 'Hello')
    """
    return QueryParser(actor, end_tokens, strip_reasoning).parse(query, prompt)


# -- replies ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleFailure:
    """A sample answered with the fallback reward."""

    index: int
    reason: str
    """One of ``FAILURE_REASONS``."""
    message: str


def check_openrlhf_options(server: Any) -> None:
    """``ConfigError`` for server.openrlhf_scores / server.fallback_reward values the OpenRLHF faces cannot use."""
    from steer_reward.config import ConfigError
    from steer_reward.schema import closest

    if server.openrlhf_scores not in SCORES_MODES:
        raise ConfigError(f"server.openrlhf_scores: {server.openrlhf_scores!r} is not one of {list(SCORES_MODES)}"
                          f"{closest(server.openrlhf_scores, SCORES_MODES)}")
    if not math.isfinite(server.fallback_reward):
        raise ConfigError(f"server.fallback_reward must be a finite number, got {server.fallback_reward}")


def reward_scores(rewards: Sequence[float], mode: str) -> list[float]:
    """The reply's ``scores`` for ``rewards`` (see ``ServerConfig.openrlhf_scores``)."""
    if mode == "reward":
        return [float(r) for r in rewards]
    out = []
    for r in rewards:
        s = 1.0 / (1.0 + math.exp(-r)) if r >= 0 else math.exp(r) / (1.0 + math.exp(r))  # no overflow either way
        out.append(min(max(s, SCORE_EPS), 1.0 - SCORE_EPS))
    return out


def openrlhf_reply(n: int, live_names: Sequence[str], scored: Any | None, scored_index: Sequence[int],
                   failures: Sequence[SampleFailure], fallback: float = 0.0, scores: str = "sigmoid") -> dict:
    """The reply OpenRLHF reads, one finite number per sample in every list.

    ``scored``: a ``ScoredBatch`` of the samples at ``scored_index`` (None when none was scored); ``failures``:
    the others. A scored sample whose reward is NaN/inf becomes a failure here too. ``extra_logs`` holds one list
    per live attribute, ``prompt_truncated_tokens`` and ``reward_failed`` (0/1); a failed sample logs 0 for the
    attributes. ``failures`` in the reply lists ``{"index", "reason", "error"}`` for people reading replies
    (OpenRLHF ignores the key).
    """
    failed = {f.index: f for f in failures}
    rewards = [float(fallback)] * n
    logs: dict[str, list[float]] = {name: [0.0] * n for name in live_names}
    truncated = [0.0] * n
    if scored is not None:
        values = scored.rewards.tolist()
        attributes = scored.attributes
        columns = {name: attributes.column(name).tolist() for name in live_names}
        cut = attributes.prompt_truncated.tolist()
        for row, i in enumerate(scored_index):
            value = float(values[row])
            if not math.isfinite(value):
                failed[i] = SampleFailure(i, "non_finite", f"the reward is {value}")
                continue
            rewards[i] = value
            truncated[i] = float(cut[row])
            for name in live_names:
                v = float(columns[name][row])
                logs[name][i] = v if math.isfinite(v) else 0.0
    logs["prompt_truncated_tokens"] = truncated
    logs["reward_failed"] = [1.0 if i in failed else 0.0 for i in range(n)]
    return {"rewards": rewards, "scores": reward_scores(rewards, scores), "extra_logs": logs,
            "failures": [{"index": f.index, "reason": f.reason, "error": f.message}
                         for f in sorted(failed.values(), key=lambda f: f.index)]}


def empty_reply(live_names: Sequence[str]) -> dict:
    """The reply to an empty query list (OpenRLHF 0.9.1-0.11.1 send those to all but the first URL)."""
    return openrlhf_reply(0, live_names, None, [], [])
