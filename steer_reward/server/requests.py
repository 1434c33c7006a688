"""Reading and checking request bodies: every problem becomes an ``ApiError`` with a status and a message.

OpenRLHF retries a failed request 5 times and then silently drops the reward, so a client must be able to see
what was wrong from the reply alone: every error names the field (and the item index) at fault.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from steer_reward.schema import closest

__all__ = ["ApiError", "read_json", "parse_json", "check_unicode", "ScoreRequest", "RewardRequest", "parse_score_request",
           "parse_reward_request"]


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def _reject_constant(name: str) -> Any:
    raise ApiError(400, f"the body holds {name}, which is not valid JSON; send finite numbers")


MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects accepted in a body. Valid bodies nest 4 levels (messages in a list of
prompts); the limit keeps every later walk of the body (checks, logging) far from Python's recursion limit."""


async def read_json(request: Any, max_bytes: int) -> Any:
    """The request body as JSON, refusing a wrong content type or a compressed body (415), an oversize body
    (413), bytes that are not UTF-8 or JSON, NaN/Infinity literals, integers too long to read, nesting deeper
    than ``MAX_JSON_DEPTH`` (400)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported; send the JSON body uncompressed")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length {declared!r} is not a number") from None
        if declared_bytes > max_bytes:
            raise ApiError(413, f"the body has {declared_bytes} bytes; the limit is {max_bytes} "
                                f"(server.max_body_bytes); send fewer or shorter samples per request")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise ApiError(413, f"the body exceeds {max_bytes} bytes (server.max_body_bytes); send fewer or "
                                f"shorter samples per request")
    return parse_json(bytes(body))


def parse_json(body: bytes) -> Any:
    """``body`` as JSON, with every problem an ``ApiError`` 400 (see ``read_json``)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the body is not UTF-8 (byte {err.start}); JSON must be UTF-8 encoded") from None
    if not text.strip():
        raise ApiError(400, "the body is empty; send a JSON object")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise ApiError(400, f"the body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # an integer longer than Python's int/str conversion limit (4300 digits)
        raise ApiError(400, f"the body holds a number that cannot be read ({err}); send ordinary numbers") from None
    _check_tree(data)
    return data


def _check_tree(data: Any) -> None:
    """Refuse nesting deeper than ``MAX_JSON_DEPTH``; iterative, so no body can exhaust the stack here."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"the body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))


def check_unicode_tree(data: Any) -> None:
    """Refuse strings (keys included) that are not valid Unicode, naming where.

    JSON may spell an unpaired surrogate (``"\\ud800"``); Python keeps it in the string, and tokenizers then
    fail deep inside the model code.
    """
    stack: list[tuple[Any, str]] = [(data, "body")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            check_unicode(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                check_unicode(key, f"a key of {where}")
                stack.append((item, key if where == "body" else f"{where}.{key}"))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))


def check_unicode(text: str, where: str) -> None:
    """``ApiError`` 400 when ``text`` holds an unpaired UTF-16 surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, f"{where} holds an unpaired UTF-16 surrogate ({text[err.start]!r} at character "
                            f"{err.start}); strings must be valid Unicode") from None


def _require_object(data: Any, allowed: tuple[str, ...], endpoint: str) -> Mapping:
    if not isinstance(data, dict):
        raise ApiError(422, f"{endpoint} takes a JSON object with keys {list(allowed)}, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise ApiError(422, f"{endpoint}: unknown key {key!r}{closest(key, allowed)}; allowed: {list(allowed)}")
    return data


def _require_list(data: Mapping, key: str, endpoint: str, max_items: int, required: bool = True) -> list | None:
    if key not in data or data[key] is None:
        if required:
            raise ApiError(422, f"{endpoint}: missing required key {key!r}")
        return None
    value = data[key]
    if not isinstance(value, list):
        raise ApiError(422, f"{endpoint}: {key!r} must be a list, got {type(value).__name__}")
    if len(value) > max_items:
        raise ApiError(413, f"{endpoint}: {key!r} has {len(value)} items; the limit is {max_items} per request "
                            f"(server.max_items_per_request)")
    return value


def _check_message_list(value: Any, where: str) -> None:
    if not value:
        raise ApiError(422, f"{where} is an empty message list")
    for j, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ApiError(422, f"{where}[{j}] must be an object with string 'role' and 'content'")


def _check_prompt(value: Any, where: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise ApiError(422, f"{where} is an empty string; a prompt needs text")
        return
    if isinstance(value, list):
        _check_message_list(value, where)
        return
    raise ApiError(422, f"{where} must be a string or a list of messages, got {type(value).__name__}")


def _check_completion(value: Any, where: str) -> None:
    # An empty completion is allowed: a policy can stop at once, and its reward must still come back.
    if isinstance(value, str):
        return
    if isinstance(value, list):
        _check_message_list(value, where)
        for j, message in enumerate(value):
            if message["role"] != "assistant":
                raise ApiError(422, f"{where}[{j}] has role {message['role']!r}; a completion is the assistant's "
                                    f"reply, so its messages must have role 'assistant' (put other turns in the "
                                    f"prompt)")
        return
    raise ApiError(422, f"{where} must be a string or a list of messages, got {type(value).__name__}")


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)  # an int beyond float's range raises OverflowError
    except OverflowError:
        return False


@dataclass
class ScoreRequest:
    prompts: list
    completions: list
    weights: dict | None
    preset: str | None


def parse_score_request(data: Any, max_items: int) -> ScoreRequest:
    """Check a ``POST /score`` body: ``{"prompts", "completions", "weights"?, "preset"?}``."""
    check_unicode_tree(data)
    data = _require_object(data, ("prompts", "completions", "weights", "preset"), "/score")
    prompts = _require_list(data, "prompts", "/score", max_items)
    completions = _require_list(data, "completions", "/score", max_items)
    if len(prompts) != len(completions):
        raise ApiError(422, f"/score: got {len(prompts)} prompts but {len(completions)} completions; "
                            f"send one prompt per completion")
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        _check_prompt(prompt, f"prompts[{i}]")
        _check_completion(completion, f"completions[{i}]")
    weights = data.get("weights")
    if weights is not None:
        if not isinstance(weights, dict) or not weights:
            raise ApiError(422, "/score: 'weights' must be a non-empty object {attribute: number}")
        for name, w in weights.items():
            if not _is_finite_number(w):
                shown = repr(w) if len(repr(w)) <= 40 else f"{repr(w)[:20]}... ({len(repr(w))} characters)"
                raise ApiError(422, f"/score: weight for {name!r} must be a finite number, got {shown}")
    preset = data.get("preset")
    if preset is not None and (not isinstance(preset, str) or not preset):
        raise ApiError(422, f"/score: 'preset' must be a preset name, got {preset!r}")
    return ScoreRequest(prompts, completions, weights, preset)


@dataclass
class RewardRequest:
    queries: list[str]
    prompts: list[str] | None


REWARD_REQUEST_KEYS = ("query", "prompts", "labels")
"""The keys of OpenRLHF's ``/get_reward`` body that the server reads; any other key is ignored."""


def parse_reward_request(data: Any, max_items: int) -> RewardRequest:
    """Check a ``POST /get_reward`` body in OpenRLHF's shape: ``{"query", "prompts"?, "labels"?}``.

    Only the shape of the whole request is checked here (a wrong shape is a 4xx). What one sample holds (an empty
    or unparseable query, text that is not valid Unicode) is that sample's failure, answered with the fallback
    reward by the caller, because OpenRLHF fails the training step on any error status. Unknown keys are ignored:
    a field a newer OpenRLHF adds must not stop a run.
    """
    if not isinstance(data, dict):
        raise ApiError(422, f"/get_reward takes a JSON object with keys {list(REWARD_REQUEST_KEYS)}, got "
                            f"{type(data).__name__}")
    if data.get("query") is None:
        near = [k for k in data if k not in REWARD_REQUEST_KEYS and closest(k, ("query",))]
        hint = f" (the body has {near[0]!r}: a misspelling?)" if near else ""
        raise ApiError(422, f"/get_reward: missing required key 'query'{hint}")
    queries = _require_list(data, "query", "/get_reward", max_items)
    prompts = _require_list(data, "prompts", "/get_reward", max_items, required=False)
    labels = _require_list(data, "labels", "/get_reward", max_items, required=False)
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise ApiError(422, f"query[{i}] must be a string, got {type(query).__name__}")
    if prompts is not None:
        if len(prompts) != len(queries):
            raise ApiError(422, f"/get_reward: got {len(queries)} queries but {len(prompts)} prompts")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ApiError(422, f"prompts[{i}] must be a string, got {type(prompt).__name__}")
    if labels is not None and len(labels) != len(queries):
        raise ApiError(422, f"/get_reward: got {len(queries)} queries but {len(labels)} labels")
    return RewardRequest(queries, prompts)
