"""Extensions without forking: modules named in ``R2D3_PLUGINS`` are imported before a registry is read.

A new reward, algorithm or backend registers itself when its module is imported
(:func:`~r2d3.rewards.register_reward`, :func:`~r2d3.algos.base.register_algorithm`,
:func:`~r2d3.backends.base.register_backend`). ``R2D3_PLUGINS=mypkg.rewards,mypkg.algos`` makes every
r2d3 process import those modules the first time it looks a name up, which covers the processes a
job starts itself: Ray Train workers, render/reward actors and Tune trials inherit the variable
(through the job's runtime environment on a cluster), so a config naming ``reward=my_reward`` works
on one machine and on a cluster alike. See docs/architecture.md for a walkthrough.
"""

from __future__ import annotations

import importlib
import os

#: the environment variable listing plugin modules (comma-separated import paths)
PLUGINS_ENV = "R2D3_PLUGINS"
_loaded: set[str] = set()


def load_plugins() -> None:
    """Import every module in ``R2D3_PLUGINS`` not imported yet; a name that cannot be imported is an
    ``ImportError`` naming it and the variable."""
    for name in (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",")):
        if name and name not in _loaded:
            try:
                importlib.import_module(name)
            except ImportError as err:
                raise ImportError(f"{PLUGINS_ENV} names {name!r}, which cannot be imported: {err}") from err
            _loaded.add(name)
