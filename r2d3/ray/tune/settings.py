"""The sweep's own settings (the ``sweep:`` section of a space file, ``sweep.key=value`` overrides) and the
names shared by the sweep's modules."""

# ruff: noqa: UP045, RUF009  (Optional[...] and opt()/section() defaults: r2d3.config's dataclass idiom, read by
# OmegaConf and by r2d3.config.describe, which prints Optional[int] as "int or null" in --help)

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from r2d3.cli import describe
from r2d3.config import ConfigError, opt, section

#: The metric Tune optimises (maximised) and ASHA compares.
METRIC = "guarded_score"
#: The same score, reported only by a trial's final evaluation after its full run (the winner is the best of these).
FINAL_METRIC = f"final_{METRIC}"
#: ASHA's time axis: alignment epochs (every forwarded result carries it).
TIME_ATTR = "epoch"
#: Top-level key of a space file that holds :class:`SweepSettings` instead of a search dimension.
RESERVED = "sweep"


class SpaceError(ConfigError):
    """A bad search space or sweep setting; the message names the key and the file."""


@dataclass
class SchedulerSettings:
    name: str = opt("asha", "asha (asynchronous successive halving on guarded_score) | fifo (no early stopping)")
    max_t: Optional[int] = opt(None, "asha: epochs a trial may run; default: train.epochs")
    grace_period: Optional[int] = opt(None, "asha: epochs before a trial can be stopped; default: "
                                            "sweep.eval_every (its first held-out evaluation)")
    reduction_factor: float = opt(2.0, "asha: keep the best 1/reduction_factor of the trials at each rung")


@dataclass
class GuardSettings:
    max_drift: Optional[float] = opt(0.04, "largest held-out prior drift (heldout/drift_rgb_l2_mean) allowed "
                                           "(null: no drift guard)")
    max_acc_drop: Optional[float] = opt(5.0, "largest drop of held-out colour or shape accuracy below the base "
                                             "model, in percentage points (null: no prompt-following guard)")
    penalty: float = opt(1.0, "a guarded trial scores at most base reward - penalty; keep it above the "
                              "reward's range")


@dataclass
class SweepSettings:
    num_samples: int = opt(1, "trials drawn from the space (with grid entries: repeats of the whole grid)")
    eval_every: Optional[int] = opt(None, "held-out evaluation every N epochs in each trial; default: eval.every "
                                          "when set, else train.epochs // 4")
    max_concurrent: int = opt(0, "trials running at once (0: as many as the cluster's resources allow)")
    trial_cpus: float = opt(0.05, "CPUs held by each trial's driver function (its Train workers reserve "
                                  "scale.cpus_per_worker each on top)")
    seed: Optional[int] = opt(0, "random state of the search (null: a fresh draw every sweep)")
    retry_errored: bool = opt(False, "when restoring, rerun trials that errored (their Train runs resume from "
                                     "their last checkpoint)")
    scheduler: SchedulerSettings = section(SchedulerSettings, "early stopping")
    guard: GuardSettings = section(GuardSettings, "the guarded objective (see r2d3.ray.tune.guarded_score)")


def describe_settings() -> list[str]:
    """``--help`` lines of the sweep settings (``sweep.key``)."""
    return describe(SweepSettings, prefix=f"{RESERVED}.")


def parse_settings(data: Any, source: str = "<space>", overrides: Sequence[str] = ()) -> SweepSettings:
    """:class:`SweepSettings` from a space file's ``sweep`` mapping and ``sweep.key=value`` ``overrides``."""
    bad = [o for o in overrides if "=" not in o or not o.startswith(f"{RESERVED}.")]
    if bad:
        raise SpaceError(f"sweep overrides must look like {RESERVED}.key=value, got: {' '.join(bad)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepSettings), OmegaConf.create(data or {}))
        cli = OmegaConf.from_dotlist([o[len(RESERVED) + 1:] for o in overrides])
        settings: SweepSettings = OmegaConf.to_object(OmegaConf.merge(merged, cli))  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise SpaceError(f"{source}: invalid {RESERVED} settings: {err}") from None
    s, g = settings.scheduler, settings.guard
    checks = [
        (settings.num_samples >= 1, f"{RESERVED}.num_samples must be >= 1, got {settings.num_samples}"),
        (settings.eval_every is None or settings.eval_every >= 1,
         f"{RESERVED}.eval_every must be >= 1, got {settings.eval_every}"),
        (settings.max_concurrent >= 0, f"{RESERVED}.max_concurrent must be >= 0"),
        (settings.trial_cpus >= 0, f"{RESERVED}.trial_cpus must be >= 0"),
        (s.name in ("asha", "fifo"), f"{RESERVED}.scheduler.name must be asha or fifo, got {s.name!r}"),
        (s.reduction_factor > 1, f"{RESERVED}.scheduler.reduction_factor must be > 1, got {s.reduction_factor}"),
        (s.grace_period is None or s.grace_period >= 1, f"{RESERVED}.scheduler.grace_period must be >= 1"),
        (s.max_t is None or s.max_t >= 1, f"{RESERVED}.scheduler.max_t must be >= 1"),
        (g.max_drift is None or g.max_drift > 0, f"{RESERVED}.guard.max_drift must be > 0"),
        (g.max_acc_drop is None or g.max_acc_drop >= 0, f"{RESERVED}.guard.max_acc_drop must be >= 0"),
        (g.penalty > 0, f"{RESERVED}.guard.penalty must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise SpaceError(f"{source}: {message}")
    return settings
