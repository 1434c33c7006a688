"""Quieting libraries whose own output would interleave with steer-reward's (progress bars, load reports).

Used by the CLI commands and by the parts of the library that load models on their own (benchmarks, Ray Serve
replicas), so it lives here rather than in the CLI's ``commands`` package.
"""

from __future__ import annotations

__all__ = ["quiet_transformers"]


def quiet_transformers() -> None:
    """Transformers' own loading bars would interleave with ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
