"""Reward sources (reward models, Python functions) and the pipeline that combines them for RL."""

from rufus.rewards.pipeline import RewardPipeline, RunningMoments, build_reward_pipeline
from rufus.rewards.sources import FunctionReward, ModelReward, RewardError, load_reward_function

__all__ = [
    "FunctionReward",
    "ModelReward",
    "RewardError",
    "RewardPipeline",
    "RunningMoments",
    "build_reward_pipeline",
    "load_reward_function",
]
