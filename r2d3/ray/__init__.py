"""The Ray seam: the only package in r2d3 that imports Ray (Train for alignment; Data/Tune build on it)."""
