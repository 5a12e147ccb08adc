"""Data for r2d3: prompt sources (:mod:`r2d3.data.prompts`) and the procedural 3D dataset of coloured
primitives used to pretrain the embedded default (:mod:`r2d3.data.procedural`)."""
