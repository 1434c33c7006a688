"""steer-reward: a multi-attribute reward model (SteerLM, ArmoRM, any *ForSequenceClassification) as the reward
of an RLHF loop.

>>> from steer_reward import SteerReward
>>> reward = SteerReward.from_config("configs/rewards/steerlm-70b.yaml", model="demo")  # doctest: +SKIP
"""

from steer_reward.config import SteerRewardConfig, load_config
from steer_reward.reward import ScoredBatch, SteerReward
from steer_reward.schema import STEERLM9, AttributeSchema
from steer_reward.scoring import AttributeScorer, AttributeScores
from steer_reward.shaping import RewardShaper, RunningStats

__all__ = [
    "AttributeSchema",
    "AttributeScorer",
    "AttributeScores",
    "RewardShaper",
    "RunningStats",
    "STEERLM9",
    "ScoredBatch",
    "SteerReward",
    "SteerRewardConfig",
    "load_config",
]
__version__ = "0.1.0"
