"""Alignment algorithms, each a loss over stored trajectories: nabla_gfn, ddpo, refl, draft."""

from r2d3.algos import ddpo, draft, nabla_gfn, refl  # noqa: F401  (registration)
from r2d3.algos.base import (
    Algorithm,
    SampleBatch,
    available_algorithms,
    build_algorithm,
    stratified_transitions,
)

__all__ = ["Algorithm", "SampleBatch", "available_algorithms", "build_algorithm",
           "stratified_transitions"]
