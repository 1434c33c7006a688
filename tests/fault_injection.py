"""Faults for the server tests, on the real demo reward model.

- ``poison_model``: a forward pre-hook on the model's input embeddings raises when the poison token is in the
  input, so any batch holding a poison sample really fails inside the model's forward, wherever it is batched.
- ``MemoryCappedScorer``: the real scorer, except that a call over ``cap_tokens`` tokens raises
  ``torch.OutOfMemoryError``, as a device with that little memory would.
- Run as a script, a reward server with those faults (``ServerProcess(command=[python, this file, ...])``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

POISON = "<extra_id_2>"
"""A special token of the demo tokenizer that the chat template never writes: only a poison text holds it."""


def poison_model(scorer: Any, marker: str = POISON) -> int:
    """Make the real model's forward raise on any input holding ``marker``'s token id; returns that id."""
    token_id = scorer.tokenizer.convert_tokens_to_ids(marker)

    def refuse(module, args):
        if (args[0] == token_id).any():
            raise RuntimeError(f"device-side assert: the input holds the poison token {marker!r}")

    scorer.model.get_input_embeddings().register_forward_pre_hook(refuse)
    return token_id


class MemoryCappedScorer:
    """The real scorer behind a memory cap: a call over ``cap_tokens`` tokens raises ``torch.OutOfMemoryError``."""

    def __init__(self, scorer: Any, cap_tokens: int) -> None:
        self.scorer = scorer
        self.cap_tokens = cap_tokens
        self.calls: list[int] = []
        """Tokens of each call, for the tests."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scorer, name)

    def score_encoded(self, samples: Sequence[Any]) -> Any:
        tokens = sum(len(s) for s in samples)
        self.calls.append(tokens)
        if tokens > self.cap_tokens:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate activations for {tokens} tokens "
                                         f"(cap {self.cap_tokens})")
        return self.scorer.score_encoded(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a steer-reward server with injected faults (tests only)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--poison", action="store_true", help=f"forwards holding {POISON} raise")
    parser.add_argument("--memory-cap", type=int, help="scorer calls over this many tokens raise OutOfMemoryError")
    args = parser.parse_args(argv)

    from steer_reward.commands.serve import reserve_port
    from steer_reward.reward import SteerReward
    from steer_reward.server.app import create_app
    from steer_reward.server.transport import serve

    sock = reserve_port("127.0.0.1", args.port)
    reward = SteerReward.from_config(args.config)
    if args.poison:
        poison_model(reward.scorer)
    if args.memory_cap:
        reward.scorer = MemoryCappedScorer(reward.scorer, args.memory_cap)
    app = create_app(reward, reward.config.server)
    serve(app, app.state.service, "127.0.0.1", args.port, sock=sock)


def command(config: str | Path, port: int, *extra: str) -> list[str]:
    """The ``ServerProcess`` command running this script."""
    return [sys.executable, str(Path(__file__).resolve()), "--config", str(config), "--port", str(port), *extra]


if __name__ == "__main__":
    main()
