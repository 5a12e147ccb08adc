"""A procedural text-to-3D dataset: coloured primitives as surface Gaussian splats, with prompts.

The embedded default model is pretrained on this data, and evaluation uses its structured
attributes as labels, so three things matter more than realism:

- **A closed, deterministic grammar** (:mod:`~r2d3.data.procedural.grammar`): every object is
  described by a :class:`ShapeAttributes`, its prompt is a pure function of the attributes and a
  template index, :func:`parse_prompt` inverts it, and a fixed set of (shape, colour, pattern)
  combinations (:data:`HELDOUT_COMBOS`) is held out to measure prompt-following on new compositions.
- **Clean targets** (:mod:`~r2d3.data.procedural.shapes`): exactly ``num_gaussians`` flat,
  surface-tangent Gaussians spread uniformly by area over the analytic surface, with a mild baked
  shading so flat-shaded renders still read as 3D.
- **Speed** (:mod:`~r2d3.data.procedural.dataset`): generation is vectorised, so the dataset
  (:class:`ProceduralShapes`) is built on the fly, deterministically by (split, seed, index), and
  nothing is stored on disk.

Everything public is re-exported here: ``from r2d3.data.procedural import X``.
"""

from r2d3.data.procedural.dataset import (
    ProceduralBatch,
    ProceduralSample,
    ProceduralShapes,
    build_gaussians,
    from_attributes,
    from_prompt,
)
from r2d3.data.procedural.grammar import (
    ASPECTS,
    COLOR_NAMES,
    COLORS,
    HELDOUT_COMBOS,
    HELDOUT_FRACTION,
    NUM_TEMPLATES,
    PATTERNS,
    PRIMARY_COLORS,
    SHAPE_ASPECTS,
    SHAPES,
    SIZES,
    SPLITS,
    VOCABULARY,
    PromptParseError,
    ShapeAttributes,
    parse_prompt,
    split_attributes,
    split_combos,
    split_prompts,
)
from r2d3.data.procedural.shapes import (
    EDGE_MIN_SCALE,
    EDGE_SCALE_RATIO,
    HALF_EXTENT,
    LIGHT_DIRECTION,
    MAX_TILT_DEG,
    NORMAL_SCALE_RATIO,
    NUM_STRIPE_BANDS,
    NUM_TORUS_STRIPE_SEGMENTS,
    SHADING,
    SIZE_SCALES,
    TANGENT_SCALE,
    SurfaceSample,
    sample_surface,
    shape_dimensions,
)
from r2d3.render.quaternions import splat_quats

__all__ = [
    "ASPECTS",
    "COLORS",
    "COLOR_NAMES",
    "EDGE_MIN_SCALE",
    "EDGE_SCALE_RATIO",
    "HALF_EXTENT",
    "HELDOUT_COMBOS",
    "HELDOUT_FRACTION",
    "LIGHT_DIRECTION",
    "MAX_TILT_DEG",
    "NORMAL_SCALE_RATIO",
    "NUM_STRIPE_BANDS",
    "NUM_TEMPLATES",
    "NUM_TORUS_STRIPE_SEGMENTS",
    "PATTERNS",
    "PRIMARY_COLORS",
    "SHADING",
    "SHAPES",
    "SHAPE_ASPECTS",
    "SIZES",
    "SIZE_SCALES",
    "SPLITS",
    "TANGENT_SCALE",
    "VOCABULARY",
    "ProceduralBatch",
    "ProceduralSample",
    "ProceduralShapes",
    "PromptParseError",
    "ShapeAttributes",
    "SurfaceSample",
    "build_gaussians",
    "from_attributes",
    "from_prompt",
    "parse_prompt",
    "sample_surface",
    "shape_dimensions",
    "splat_quats",
    "split_attributes",
    "split_combos",
    "split_prompts",
]
