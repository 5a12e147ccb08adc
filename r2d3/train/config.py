"""The alignment job's configuration: the sections of :mod:`r2d3.config` and the algorithm's own
option group (``algo``, whose class follows ``algo.name``: :data:`r2d3.algos.base.ALGORITHM_VARIANTS`).

It lives above the algorithms because it composes their option classes; everything below it takes
only the sections it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r2d3.algos.base import ALGORITHM_VARIANTS
from r2d3.algos.nabla_gfn import NablaGFNConfig
from r2d3.config import (
    AlgoConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RenderConfig,
    RunConfig,
    SamplerConfig,
    ScaleConfig,
    TrainConfig,
    reward_option,
    section,
    variant_section,
)


@dataclass
class AlignConfig:
    run: RunConfig = section(RunConfig, "run directory, seeds, checkpoints, logging")
    model: ModelConfig = section(ModelConfig, "backend and LoRA")
    sampler: SamplerConfig = section(SamplerConfig, "stochastic sampler")
    render: RenderConfig = section(RenderConfig, "reward cameras and renders")
    reward: Any = reward_option()
    algo: AlgoConfig = variant_section(NablaGFNConfig, ALGORITHM_VARIANTS,
                                       "alignment algorithm; its options depend on algo.name")
    train: TrainConfig = section(TrainConfig, "optimisation")
    data: DataConfig = section(DataConfig, "prompts")
    eval: EvalConfig = section(EvalConfig, "held-out evaluation")
    scale: ScaleConfig = section(ScaleConfig, "Ray scale-out")
