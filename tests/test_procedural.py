"""The procedural dataset: determinism, geometry on the analytic surfaces, splat orientation, the
prompt grammar and its train/held-out split."""

from __future__ import annotations

import math

import pytest
import torch

from r2d3.data import procedural as P
from r2d3.data.procedural import (
    COLORS,
    HALF_EXTENT,
    HELDOUT_COMBOS,
    PATTERNS,
    PRIMARY_COLORS,
    SHAPE_ASPECTS,
    SHAPES,
    SIZES,
    ProceduralShapes,
    PromptParseError,
    ShapeAttributes,
    build_gaussians,
    from_attributes,
    from_prompt,
    parse_prompt,
    shape_dimensions,
    split_attributes,
    split_combos,
    split_prompts,
)
from r2d3.render.gaussians import Gaussians

N = 256


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of unit (w, x, y, z) quaternions (written independently of the library)."""
    w, x, y, z = q.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def splat_normals(g: Gaussians) -> torch.Tensor:
    """Each Gaussian's shortest axis, from its rotation and scales."""
    rot = quat_to_matrix(g.quats)
    shortest = g.scales.argmin(-1)
    return torch.gather(rot, -1, shortest[..., None, None].expand(*shortest.shape, 3, 1))[..., 0]


def upright(
    shape: str, aspect: str = "regular", size: str = "medium", seed: int = 0, n: int = N, **kw
) -> Gaussians:
    attrs = ShapeAttributes(shape, "red", size=size, aspect=aspect)
    gen = torch.Generator().manual_seed(seed)
    return from_attributes(attrs, n, gen, yaw_deg=0.0, tilt_deg=0.0, **kw).gaussians


# ------------------------------------------------------------------------------------------------
# determinism and basic contract


def test_dataset_is_deterministic_by_seed_and_index():
    a, b = ProceduralShapes(N, seed=3), ProceduralShapes(N, seed=3)
    s1, s2 = a[5], b[5]
    assert s1.prompt == s2.prompt and s1.attributes == s2.attributes
    for name in ("means", "scales", "quats", "opacities", "colors"):
        assert torch.equal(getattr(s1.gaussians, name), getattr(s2.gaussians, name))
    other = ProceduralShapes(N, seed=4)[5]
    assert not torch.equal(other.gaussians.means, s1.gaussians.means)
    # the vectorised batch path gives exactly the per-index samples
    batch = a.batch([5, 0, 7])
    assert torch.equal(batch.gaussians.means[0], s1.gaussians.means[0])
    assert batch.prompts[1] == a[0].prompt and batch.prompts[2] == a[7].prompt
    assert a[-1].prompt == a[len(a) - 1].prompt


def test_sample_is_deterministic_given_generator():
    ds = ProceduralShapes(N)
    x = ds.sample(6, torch.Generator().manual_seed(1))
    y = ds.sample(6, torch.Generator().manual_seed(1))
    assert x.prompts == y.prompts and torch.equal(x.gaussians.colors, y.gaussians.colors)


def test_fixed_number_of_gaussians_and_validate_passes():
    for n in (17, 512):
        batch = ProceduralShapes(n).sample(16, torch.Generator().manual_seed(0))
        g = batch.gaussians
        assert g.means.shape == (16, n, 3) and g.opacities.shape == (16, n)
        assert g.means.dtype == torch.float32
        checked = g.validate()
        assert torch.allclose(checked.quats, g.quats, atol=1e-6)  # already unit
        assert ((g.opacities >= 0.9) & (g.opacities <= 1.0)).all()
        assert ((g.colors >= 0) & (g.colors <= 1)).all()
        assert len(batch.prompts) == len(batch.attributes) == 16


def test_dataloader_collate():
    ds = ProceduralShapes(N, length=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ProceduralShapes.collate)
    batches = list(loader)
    assert [b.gaussians.batch_size for b in batches] == [2, 2, 1]
    assert batches[0].prompts == [ds[0].prompt, ds[1].prompt]
    with pytest.raises(IndexError):
        ds[5]


# ------------------------------------------------------------------------------------------------
# geometry


def test_sphere_points_on_surface_and_normals_radial():
    (r,) = shape_dimensions("sphere", size="large")
    g = upright("sphere", size="large")
    radius = g.means.norm(dim=-1)
    assert torch.allclose(radius, torch.full_like(radius, r), atol=1e-5)
    normals = splat_normals(g)
    assert torch.allclose(normals.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert torch.allclose(normals, g.means / r, atol=1e-4)  # outward and parallel to the position


def test_cube_points_on_faces_with_face_normals():
    a, b, c = shape_dimensions("cube", "wide")
    g = upright("cube", "wide")
    rel = g.means[0] / torch.tensor([a, b, c])
    assert (rel.abs() <= 1 + 1e-5).all()
    assert torch.allclose(rel.abs().amax(-1), torch.ones(1), atol=1e-5)  # on the boundary
    face_axis = rel.abs().argmax(-1)
    face_sign = rel.gather(-1, face_axis[:, None]).sign()
    expected = torch.zeros_like(rel).scatter_(-1, face_axis[:, None], face_sign)
    assert torch.allclose(splat_normals(g)[0], expected, atol=1e-4)


def test_cube_faces_get_points_in_proportion_to_area():
    a, b, c = shape_dimensions("cube", "flat")
    g = upright("cube", "flat", n=4096)
    rel = g.means[0] / torch.tensor([a, b, c])
    on_top_or_bottom = (rel[:, 1].abs() > 1 - 1e-5).float().mean()
    expected = (a * c) / (a * c + a * b + b * c)
    assert abs(on_top_or_bottom - expected) < 0.01


def test_cylinder_side_and_caps_cover_in_proportion_to_area():
    r, h = shape_dimensions("cylinder", "wide")
    g = upright("cylinder", "wide", n=4096)
    x, y, z = g.means[0].unbind(-1)
    rho = torch.hypot(x, z)
    on_side = (rho - r).abs() < 1e-5
    on_cap = (y.abs() - h).abs() < 1e-5
    assert (on_side | on_cap).all()
    assert (y.abs() <= h + 1e-5).all() and (rho <= r + 1e-5).all()
    cap_fraction = (on_cap & ~on_side).float().mean()
    expected = (2 * math.pi * r * r) / (2 * math.pi * r * r + 4 * math.pi * r * h)
    assert abs(cap_fraction - expected) < 0.01
    normals = splat_normals(g)[0]
    side_normals = torch.stack([x / rho, torch.zeros_like(x), z / rho], -1)
    cap_normals = torch.stack([torch.zeros_like(y), y.sign(), torch.zeros_like(y)], -1)
    side_only = on_side & ~on_cap
    assert torch.allclose(normals[side_only], side_normals[side_only], atol=1e-4)
    assert torch.allclose(normals[on_cap & ~on_side], cap_normals[on_cap & ~on_side], atol=1e-4)


def test_cone_points_on_lateral_surface_or_base():
    r, h = shape_dimensions("cone", "tall")
    g = upright("cone", "tall")
    x, y, z = g.means[0].unbind(-1)
    rho = torch.hypot(x, z)
    lateral = (rho - r * (h - y) / (2 * h)).abs() < 1e-5
    base = (y + h).abs() < 1e-5
    assert (lateral | base).all()
    normals = splat_normals(g)[0]
    slant = math.hypot(r, 2 * h)
    expected = torch.stack([2 * h * x / rho, torch.full_like(x, r), 2 * h * z / rho], -1) / slant
    only = lateral & ~base & (rho > 1e-3)
    assert torch.allclose(normals[only], expected[only], atol=1e-4)
    assert torch.allclose(normals[base & ~lateral], torch.tensor([0.0, -1.0, 0.0]), atol=1e-4)


def test_torus_points_satisfy_the_implicit_equation():
    big, small = shape_dimensions("torus", size="large")
    g = upright("torus", size="large", n=2048)
    x, y, z = g.means[0].unbind(-1)
    ring = torch.hypot(x, y)  # the ring stands upright in the xy plane
    implicit = (ring - big) ** 2 + z**2 - small**2
    assert implicit.abs().max() < 1e-5
    centre = torch.stack([x * big / ring, y * big / ring, torch.zeros_like(z)], -1)
    expected = (g.means[0] - centre) / small
    assert torch.allclose(splat_normals(g)[0], expected, atol=1e-4)
    # area-uniform on a torus: the outer half (cos phi > 0) holds (pi R + 2 r) / (2 pi R) of the area
    outer = (ring > big).float().mean()
    assert abs(outer - (math.pi * big + 2 * small) / (2 * math.pi * big)) < 0.02


def test_capsule_points_at_radius_from_its_axis_segment():
    r, h = shape_dimensions("capsule", size="small")
    g = upright("capsule", size="small")
    p = g.means[0]
    nearest_on_axis = torch.stack([torch.zeros(len(p)), p[:, 1].clamp(-h, h), torch.zeros(len(p))], -1)
    offset = p - nearest_on_axis
    assert torch.allclose(offset.norm(dim=-1), torch.full((len(p),), r), atol=1e-5)
    assert torch.allclose(splat_normals(g)[0], offset / r, atol=1e-4)


def test_pyramid_points_on_the_boundary_with_face_normals():
    a, h = shape_dimensions("pyramid", "tall")
    g = upright("pyramid", "tall")
    slant = math.hypot(2 * h, a)
    planes = [(torch.tensor([0.0, -1.0, 0.0]), h)]  # base: -y <= h
    for nx, nz in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        normal = torch.tensor([2 * h * nx, a, 2 * h * nz]) / slant
        planes.append((normal, float(normal @ torch.tensor([0.0, h, 0.0]))))  # through the apex
    normals = torch.stack([n for n, _ in planes])
    offsets = torch.tensor([d for _, d in planes])
    signed = g.means[0] @ normals.T - offsets  # <= 0 inside, 0 on a face
    assert signed.max() < 1e-5
    assert torch.allclose(signed.max(-1).values, torch.zeros(1), atol=1e-5)
    face = signed.argmax(-1)
    assert torch.allclose(splat_normals(g)[0], normals[face], atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_shortest_axis_is_the_unit_outward_normal_for_every_shape(shape):
    aspect = SHAPE_ASPECTS[shape][-1]
    g = upright(shape, aspect)
    normals = splat_normals(g)[0]
    assert torch.allclose(normals.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert (g.scales[0].argmin(-1) == 2).all()
    # thin along the normal: a tenth of the larger tangential scale
    assert torch.allclose(g.scales[0, :, 2], P.NORMAL_SCALE_RATIO * g.scales[0, :, 1], rtol=1e-5)
    p = g.means[0]
    if shape == "torus":
        ring = torch.hypot(p[:, 0], p[:, 1])
        big = shape_dimensions("torus")[0]
        outward = p - torch.stack([p[:, 0] * big / ring, p[:, 1] * big / ring, torch.zeros_like(ring)], -1)
    else:  # every other shape is convex around the origin
        outward = p
    assert ((normals * outward).sum(-1) > 0).all()


def test_tangential_scale_follows_point_spacing():
    g = upright("sphere", size="large", n=512)
    (r,) = shape_dimensions("sphere", size="large")
    spacing = math.sqrt(4 * math.pi * r * r / 512)
    assert torch.allclose(g.scales[0, :, 1], torch.full((512,), P.TANGENT_SCALE * spacing), rtol=1e-5)
    assert torch.allclose(g.scales[0, :, 0], g.scales[0, :, 1])  # no edges on a sphere
    cube = upright("cube", n=512)
    narrowed = cube.scales[0, :, 0] < cube.scales[0, :, 1] - 1e-7
    assert narrowed.any() and not narrowed.all()  # only splats near an edge are narrowed
    assert (cube.scales[0, :, 0] >= P.EDGE_MIN_SCALE * cube.scales[0, :, 1] - 1e-7).all()


def test_pose_is_yaw_then_tilt():
    attrs = ShapeAttributes("cube", "blue", aspect="wide")
    base = from_attributes(attrs, N, torch.Generator().manual_seed(2), yaw_deg=0.0, tilt_deg=0.0).gaussians
    turned = from_attributes(attrs, N, torch.Generator().manual_seed(2), yaw_deg=90.0, tilt_deg=0.0).gaussians
    rot_y = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # 90 degrees about +y
    assert torch.allclose(turned.means[0], base.means[0] @ rot_y.T, atol=1e-5)
    assert torch.allclose(splat_normals(turned)[0], splat_normals(base)[0] @ rot_y.T, atol=1e-4)
    tilted = from_attributes(attrs, N, torch.Generator().manual_seed(2), yaw_deg=0.0, tilt_deg=10.0).gaussians
    assert torch.allclose(tilted.means.norm(dim=-1), base.means.norm(dim=-1), atol=1e-5)  # a rigid motion
    assert not torch.allclose(tilted.means, base.means, atol=1e-3)


def test_objects_fit_the_box_and_sizes_are_ordered():
    g = ProceduralShapes(64).sample(200, torch.Generator().manual_seed(5)).gaussians
    assert g.means.abs().max() <= HALF_EXTENT + 1e-5
    for shape in SHAPES:
        for aspect in SHAPE_ASPECTS[shape]:
            dims = [shape_dimensions(shape, aspect, size) for size in SIZES]
            assert dims[0][0] < dims[1][0] < dims[2][0]
            large = build_gaussians([ShapeAttributes(shape, "red", size="large", aspect=aspect)], 256,
                                    torch.Generator().manual_seed(0), tilt_deg=P.MAX_TILT_DEG)
            assert large.means.abs().max() <= HALF_EXTENT + 1e-5
            horizontal, vertical = large.means[..., [0, 2]].norm(dim=-1), large.means[..., 1].abs()
            assert torch.maximum(horizontal, vertical).max() > 0.85 * HALF_EXTENT  # large really fills it


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="num_gaussians"):
        ProceduralShapes(0)
    with pytest.raises(ValueError, match="split"):
        ProceduralShapes(split="validation")
    with pytest.raises(ValueError, match="shading"):
        ProceduralShapes(shading=2.0)
    with pytest.raises(ValueError, match="at least one"):
        build_gaussians([])
    with pytest.raises(ValueError, match="tangent_scale"):
        build_gaussians([ShapeAttributes("cube", "red")], tangent_scale=0.0)
    with pytest.raises(ValueError, match="unknown shape"):
        P.sample_surface("cube3d", torch.ones(1, 3), 8)


# ------------------------------------------------------------------------------------------------
# colours and patterns


def palette(name: str) -> torch.Tensor:
    return torch.tensor(COLORS[name])


def test_solid_two_tone_and_striped_colours_without_shading():
    gen = torch.Generator().manual_seed(0)
    pose = dict(yaw_deg=0.0, tilt_deg=0.0, shading=0.0)
    solid = from_prompt("a tall green cylinder", 512, gen, **pose).gaussians
    assert torch.allclose(solid.colors[0], palette("green").expand(512, 3))

    two = from_prompt("a red and yellow cube", 512, gen, **pose).gaussians
    top = two.means[0, :, 1] > 1e-4
    bottom = two.means[0, :, 1] < -1e-4
    assert torch.allclose(two.colors[0][top], palette("red").expand(int(top.sum()), 3))  # first colour on top
    assert torch.allclose(two.colors[0][bottom], palette("yellow").expand(int(bottom.sum()), 3))

    striped = from_prompt("a tall blue cylinder with white stripes", 2048, gen, **pose).gaussians
    is_white = (striped.colors[0] - palette("white")).abs().amax(-1) < 1e-6
    is_blue = (striped.colors[0] - palette("blue")).abs().amax(-1) < 1e-6
    assert (is_white | is_blue).all()
    # 7 equal bands along y, 3 of them stripes; the caps (blue, in the end bands) add a little blue
    assert 0.3 < is_white.float().mean() < 3 / 7 + 0.01
    y = striped.means[0, :, 1]
    h = shape_dimensions("cylinder", "tall")[1]
    middle_band = y.abs() < h / 7 - 1e-3  # band 3 of 0..6: bands 1, 3, 5 are the stripes
    assert is_white[middle_band].all()
    end_bands = y.abs() > 5 * h / 7 + 1e-3
    assert is_blue[end_bands].all()


def test_torus_stripes_go_around_the_ring():
    g = from_prompt("a purple torus with orange stripes", 2048, torch.Generator().manual_seed(0),
                    yaw_deg=0.0, tilt_deg=0.0, shading=0.0).gaussians
    angle = torch.atan2(g.means[0, :, 1], g.means[0, :, 0])
    is_orange = (g.colors[0] - palette("orange")).abs().amax(-1) < 1e-6
    count = P.NUM_TORUS_STRIPE_SEGMENTS
    segment = ((angle + math.pi) / (2 * math.pi) * count).long() % count
    assert torch.equal(is_orange, segment % 2 == 1)


def test_shading_only_changes_brightness():
    flat = upright("sphere", n=512, shading=0.0)
    shaded = upright("sphere", n=512)
    ratio = shaded.colors[0] / flat.colors[0]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)  # one factor for all channels
    assert ratio.min() >= 1 - P.SHADING - 1e-5 and ratio.max() <= 1 + 1e-5
    assert ratio.max() - ratio.min() > 0.5 * P.SHADING  # it is actually lit from one side


# ------------------------------------------------------------------------------------------------
# prompts and splits


def test_prompts_follow_the_templates():
    attrs = ShapeAttributes("cylinder", "blue", "striped", "white", "small", "tall")
    assert attrs.prompt(0) == "a small tall blue cylinder with white stripes"
    assert attrs.prompt(1) == "small tall cylinder, blue with white stripes"
    assert ShapeAttributes("cube", "red", "two-tone", "yellow").prompt(0) == "a red and yellow cube"
    assert ShapeAttributes("torus", "orange").prompt(0) == "an orange torus"
    assert ShapeAttributes("torus", "orange").prompt(1) == "torus, orange"
    with pytest.raises(ValueError, match="template"):
        attrs.prompt(2)


def test_every_prompt_parses_back_to_its_attributes():
    for split in ("train", "heldout"):
        for attrs in split_attributes(split):
            for template in range(P.NUM_TEMPLATES):
                assert parse_prompt(attrs.prompt(template)) == attrs
    assert parse_prompt("Small TORUS, Red!") == ShapeAttributes("torus", "red", size="small")
    assert parse_prompt("a blue ball") == ShapeAttributes("sphere", "blue")


def test_dataset_samples_are_consistent_with_their_attributes():
    ds = ProceduralShapes(16, seed=1)
    batch = ds.sample(200, torch.Generator().manual_seed(0))
    for prompt, attrs in zip(batch.prompts, batch.attributes):
        assert parse_prompt(prompt) == attrs
        assert attrs.split == "train"
    seen = {a.shape for a in batch.attributes}, {a.pattern for a in batch.attributes}
    assert seen == (set(SHAPES), set(PATTERNS))


@pytest.mark.parametrize(
    "prompt",
    [
        "a red", "a red cube sphere", "a red cube with stripes", "a red cube with white stripes and blue",
        "a shiny red cube", "a white cube", "a wide sphere", "a red and blue and green cube",
        "a small large red cube",
    ],  # fmt: skip
)
def test_bad_prompts_raise_naming_the_prompt(prompt):
    with pytest.raises(PromptParseError, match="cannot parse"):
        parse_prompt(prompt)


def test_invalid_attributes_raise():
    with pytest.raises(ValueError, match="white"):
        ShapeAttributes("cube", "white")
    with pytest.raises(ValueError, match="shape"):
        ShapeAttributes("dodecahedron", "red")
    with pytest.raises(ValueError, match="aspect"):
        ShapeAttributes("sphere", "red", aspect="tall")
    with pytest.raises(ValueError, match="color2"):
        ShapeAttributes("cube", "red", "solid", "blue")
    with pytest.raises(ValueError, match="color2"):
        ShapeAttributes("cube", "red", "two-tone", "red")
    with pytest.raises(ValueError, match="color2"):
        ShapeAttributes("cube", "red", "two-tone", "white")  # white only as stripes
    assert ShapeAttributes("cube", "red", "striped", "white").color2 == "white"


def test_splits_are_disjoint_and_held_out_compositions_are_learnable():
    train, held = set(split_prompts("train")), set(split_prompts("heldout"))
    assert train and held and not train & held
    assert train | held == set(split_prompts("all"))
    combos = split_combos("all")
    assert len(combos) == len(SHAPES) * len(PRIMARY_COLORS) * len(PATTERNS)
    assert 0.10 <= len(HELDOUT_COMBOS) / len(combos) <= 0.15
    train_combos = set(split_combos("train"))
    for s, c, p in HELDOUT_COMBOS:  # every pair of a held-out combination is seen in training
        assert any(t[:2] == (s, c) for t in train_combos)
        assert any((t[0], t[2]) == (s, p) for t in train_combos)
        assert any(t[1:] == (c, p) for t in train_combos)
    held_ds = ProceduralShapes(32, split="heldout")
    assert all(held_ds[i].attributes.split == "heldout" for i in range(20))
    assert split_prompts("train", templates=[0])[0].startswith("a ")


def test_vocabulary_covers_every_prompt_word():
    words = {w.strip(",") for p in split_prompts("all") for w in p.split()}
    assert words == set(P.VOCABULARY)


def test_dataset_constructors_use_its_settings():
    ds = ProceduralShapes(48, shading=0.0, max_tilt_deg=0.0)
    sample = ds.from_prompt("a large pink capsule", torch.Generator().manual_seed(0))
    assert sample.gaussians.num_gaussians == 48 and sample.prompt == "a large pink capsule"
    assert torch.allclose(sample.gaussians.colors[0], palette("pink").expand(48, 3))  # no shading
    attrs = ShapeAttributes("cone", "brown", "two-tone", "black", "small", "wide")
    other = ds.from_attributes(attrs, template=1)
    assert other.prompt == "small wide cone, brown and black"
    assert other.attributes.to_dict()["color2"] == "black"
    surface = P.sample_surface("sphere", torch.ones(2, 1), 8, torch.Generator().manual_seed(0))
    assert surface.points.shape == (2, 8, 3)
    with pytest.raises(ValueError, match="length"):
        ProceduralShapes(length=0)
    with pytest.raises(ValueError, match="at least one index"):
        ds.batch([])
    with pytest.raises(ValueError, match="n must be"):
        ds.sample(0)
    with pytest.raises(ValueError, match="num_gaussians"):
        build_gaussians([attrs], 0)
    for field, value in (("pattern", "dotted"), ("size", "huge")):
        with pytest.raises(ValueError, match=field):
            ShapeAttributes(**{"shape": "cube", "color": "red", field: value})
