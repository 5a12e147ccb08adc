"""2D rewards on rendered views, one signature: ``reward(render, prompts) -> Tensor [B]``.

Registered rewards (see :func:`available_rewards`): ``dnc`` (depth–normal consistency, geometry),
``normal_estimator`` (rendered normals vs a pluggable monocular normal estimator, e.g. Marigold),
``colorfulness`` (analytic image reward), ``clip_tiny`` (a small image–text model trained in this
repo) and the real pretrained models of :mod:`r2d3.rewards.clip_models` (``clip_score``,
``laion_aesthetic``, ``hpsv2``, ``pickscore``; weights from local files) and ``image_reward`` (ImageReward,
BLIP-based, :mod:`r2d3.rewards.image_reward`; converted local weights). Build one, or a weighted sum, from a config spec with :func:`build_reward`.
"""

from r2d3.rewards.base import (Reward, WeightedSum, available_rewards, build_reward, load_reward, register_reward,
                               reward_terms)
from r2d3.rewards.clip_models import (
    ClipScoreReward,
    HPSv2Reward,
    LaionAestheticReward,
    PickScoreReward,
)
from r2d3.rewards.clip_tiny import ClipTinyModel, ClipTinyReward, load_clip_tiny
from r2d3.rewards.geometry import DepthNormalConsistency, depth_normal_consistency, depth_to_normal
from r2d3.rewards.image import Colorfulness, colorfulness
from r2d3.rewards.normal_estimator import MarigoldNormalEstimator, NormalEstimatorReward
from r2d3.rewards.image_reward import ImageRewardReward

__all__ = [
    "ClipScoreReward",
    "ClipTinyModel",
    "ClipTinyReward",
    "Colorfulness",
    "DepthNormalConsistency",
    "HPSv2Reward",
    "ImageRewardReward",
    "LaionAestheticReward",
    "MarigoldNormalEstimator",
    "NormalEstimatorReward",
    "PickScoreReward",
    "Reward",
    "WeightedSum",
    "load_reward",
    "available_rewards",
    "build_reward",
    "reward_terms",
    "colorfulness",
    "depth_normal_consistency",
    "depth_to_normal",
    "load_clip_tiny",
    "register_reward",
]
