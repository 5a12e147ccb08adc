"""The Ray-free parts of r2d3's jobs: alignment (:mod:`.align`), held-out evaluation (:mod:`.evaluate`)
and asset regeneration (:mod:`.regenerate`). :mod:`r2d3.ray` runs them at scale."""
