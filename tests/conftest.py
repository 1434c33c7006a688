"""Shared fixtures: everything offline, the demo models built once per test session into a temporary cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _demo_cache(tmp_path_factory):
    """Demo models go to one cache per test session (or $STEER_REWARD_CACHE when set, to reuse builds)."""
    if "STEER_REWARD_CACHE" not in os.environ:
        os.environ["STEER_REWARD_CACHE"] = str(tmp_path_factory.mktemp("steer_reward_cache"))
    yield


@pytest.fixture(scope="session")
def demo_model_path(_demo_cache) -> str:
    from steer_reward.demo import demo_model_dir

    return str(demo_model_dir())


@pytest.fixture(scope="session")
def demo_policy_path(_demo_cache) -> str:
    from steer_reward.demo import demo_policy_dir

    return str(demo_policy_dir())


@pytest.fixture(scope="session")
def demo_scorer(demo_model_path):
    """A local ``AttributeScorer`` on the demo RM (float32, CPU). Shared: do not mutate."""
    from steer_reward.config import load_config
    from steer_reward.scoring import AttributeScorer

    return AttributeScorer.from_config(load_config({"model": {"path": demo_model_path, "device": "cpu"}}))


@pytest.fixture
def make_reward(demo_scorer):
    """``make_reward({"weights": ...})`` → a ``SteerReward`` on the shared demo scorer with fresh shaping state."""
    from steer_reward.config import load_config
    from steer_reward.reward import SteerReward
    from steer_reward.shaping import RewardShaper

    def make(shaping: dict | None = None) -> SteerReward:
        config = load_config({"model": {"path": "demo"}, "shaping": shaping or {}})
        return SteerReward(demo_scorer, RewardShaper(demo_scorer.schema, config.shaping), config)

    return make


def plain_hf_attributes(model, input_ids) -> torch.Tensor:
    """Reference: a plain Hugging Face forward of one unpadded sequence. Shape: ``(K,)``."""
    with torch.no_grad():
        return model(torch.tensor([list(input_ids)])).logits[0].float()
