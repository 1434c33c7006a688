"""A TRL reward function wrapper that keeps the texts of every call (module level, so it pickles)."""

from __future__ import annotations


class CallRecorder:
    """Keeps the (prompts, completions) of every call, then forwards the call to ``func``."""

    def __init__(self, func) -> None:
        self.func = func
        self.__name__ = func.__name__
        self.calls: list[tuple[list, list]] = []

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append((list(prompts), list(completions)))
        return self.func(prompts=prompts, completions=completions, **kwargs)


class AsyncCallRecorder(CallRecorder):
    """``CallRecorder`` for an async reward function (TRL awaits it)."""

    async def __call__(self, prompts, completions, **kwargs):
        self.calls.append((list(prompts), list(completions)))
        return await self.func(prompts=prompts, completions=completions, **kwargs)
