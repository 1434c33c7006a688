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

__all__ = ["ApiError", "read_json", "ScoreRequest", "RewardRequest", "parse_score_request", "parse_reward_request"]


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def _reject_constant(name: str) -> Any:
    raise ApiError(400, f"the body holds {name}, which is not valid JSON; send finite numbers")


async def read_json(request: Any, max_bytes: int) -> Any:
    """The request body as JSON, refusing a wrong content type (415), an oversize body (413), bytes that are not
    UTF-8 or JSON (400), and NaN/Infinity literals (400)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
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
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the body is not UTF-8 (byte {err.start}); JSON must be UTF-8 encoded") from None
    if not text.strip():
        raise ApiError(400, "the body is empty; send a JSON object")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None


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
        return
    raise ApiError(422, f"{where} must be a string or a list of messages, got {type(value).__name__}")


@dataclass
class ScoreRequest:
    prompts: list
    completions: list
    weights: dict | None
    preset: str | None


def parse_score_request(data: Any, max_items: int) -> ScoreRequest:
    """Check a ``POST /score`` body: ``{"prompts", "completions", "weights"?, "preset"?}``."""
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
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ApiError(422, f"/score: weight for {name!r} must be a finite number, got {w!r}")
    preset = data.get("preset")
    if preset is not None and (not isinstance(preset, str) or not preset):
        raise ApiError(422, f"/score: 'preset' must be a preset name, got {preset!r}")
    return ScoreRequest(prompts, completions, weights, preset)


@dataclass
class RewardRequest:
    queries: list[str]
    prompts: list[str] | None


def parse_reward_request(data: Any, max_items: int) -> RewardRequest:
    """Check a ``POST /get_reward`` body in OpenRLHF's shape: ``{"query", "prompts"?, "labels"?}``."""
    data = _require_object(data, ("query", "prompts", "labels"), "/get_reward")
    queries = _require_list(data, "query", "/get_reward", max_items)
    prompts = _require_list(data, "prompts", "/get_reward", max_items, required=False)
    labels = _require_list(data, "labels", "/get_reward", max_items, required=False)
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise ApiError(422, f"query[{i}] must be a string, got {type(query).__name__}")
        if not query.strip():
            raise ApiError(422, f"query[{i}] is an empty string; it must hold the prompt and the response")
    if prompts is not None:
        if len(prompts) != len(queries):
            raise ApiError(422, f"/get_reward: got {len(queries)} queries but {len(prompts)} prompts")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ApiError(422, f"prompts[{i}] must be a string, got {type(prompt).__name__}")
    if labels is not None and len(labels) != len(queries):
        raise ApiError(422, f"/get_reward: got {len(queries)} queries but {len(labels)} labels")
    return RewardRequest(queries, prompts)
