"""Previews for people: multi-view PNG grids and turntable GIF/MP4 files.

Images are channels-first floats in [0, 1] everywhere in r2d3 (``[V, 3, H, W]`` per asset, see
:class:`~r2d3.render.output.RenderOutput`); this module is the one place that turns them into
8-bit pictures. A grid has one row per asset and one column per view, with optional text (a
prompt above each row, a view name above each column, a caption on top) so a preview can be read
without the run's logs. All files are written atomically.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from r2d3.render import render_gaussians
from r2d3.render.cameras import Cameras, orbit_cameras
from r2d3.render.gaussians import Gaussians
from r2d3.render.output import RenderOutput
from r2d3.storage import atomic_path, atomic_write_bytes

Channel = Literal["rgb", "alpha", "depth", "normal"]
FrameLike = Union[Tensor, np.ndarray, Image.Image]
RenderFn = Callable[..., RenderOutput]


class VideoBackendUnavailableError(RuntimeError):
    """MP4 was requested but neither imageio-ffmpeg nor PyAV is installed."""


# ---------------------------------------------------------------------------------------------
# tensors -> pixels


def to_uint8(images: Tensor | np.ndarray) -> np.ndarray:
    """Channels-first floats in [0, 1] ``[..., C, H, W]`` (C = 1 or 3) -> ``uint8`` ``[..., H, W, 3]``.

    Values are clamped (a renderer may overshoot by rounding) and single-channel images become grey.
    """
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if x.ndim < 3 or x.shape[-3] not in (1, 3):
        raise ValueError(f"expected channels-first images [..., 1 or 3, H, W], got shape {list(x.shape)}")
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf")
    x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def render_output_images(output: RenderOutput, channel: Channel = "rgb") -> Tensor:
    """A viewable ``[B, V, 3, H, W]`` image in [0, 1] from one channel of a :class:`RenderOutput`.

    ``alpha`` is shown in grey, ``normal`` maps camera-space [-1, 1] to [0, 1] (white where empty),
    and ``depth`` is shown near = dark, far = light per asset (white where empty), so geometry
    problems (holes, inside-out normals, floaters) are visible at a glance.
    """
    if channel == "rgb":
        return output.rgb.detach().clamp(0, 1)
    alpha = output.alpha.detach()
    hit = alpha > 1e-3
    if channel == "alpha":
        return alpha.clamp(0, 1).expand(*alpha.shape[:2], 3, *alpha.shape[-2:])
    if channel == "normal":
        shown = output.normal.detach() * 0.5 + 0.5
        return torch.where(hit, shown, torch.ones_like(shown)).clamp(0, 1)
    if channel == "depth":
        depth = output.depth.detach()
        big = torch.finfo(depth.dtype).max
        flat_hit = hit.flatten(1)
        near = torch.where(flat_hit, depth.flatten(1), big).amin(1).clamp(max=1e30)
        far = torch.where(flat_hit, depth.flatten(1), -big).amax(1).clamp(min=-1e30)
        shape = (-1,) + (1,) * (depth.ndim - 1)
        span = (far - near).clamp(min=1e-6).view(shape)
        shown = 0.15 + 0.7 * (depth - near.view(shape)) / span
        shown = torch.where(hit, shown, torch.ones_like(shown)).clamp(0, 1)
        return shown.expand(*shown.shape[:2], 3, *shown.shape[-2:])
    raise ValueError(f"unknown channel {channel!r}; expected one of rgb, alpha, depth, normal")


def _as_rows(images: RenderOutput | Tensor | np.ndarray, channel: Channel) -> Tensor:
    """Normalise grid input to ``[R, V, C, H, W]``."""
    if isinstance(images, RenderOutput):
        return render_output_images(images, channel)
    x = torch.as_tensor(images)
    if x.ndim == 3:
        return x[None, None]
    if x.ndim == 4:
        return x[None]
    if x.ndim == 5:
        return x
    raise ValueError(
        "expected images [3, H, W], [V, 3, H, W] or [R, V, 3, H, W] (or a RenderOutput), "
        f"got shape {list(x.shape)}"
    )


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels (a word longer than a line gets its own line)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate, font=font) > max_width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def make_grid(
    images: RenderOutput | Tensor | np.ndarray,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    caption: str | None = None,
    channel: Channel = "rgb",
    padding: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
    font_size: int | None = None,
) -> Image.Image:
    """Tile views into one picture: rows are assets, columns are views.

    Args:
        images: a :class:`RenderOutput` (``channel`` picks rgb/alpha/depth/normal) or floats in [0, 1]
            shaped ``[V, 3, H, W]`` (one row), ``[R, V, 3, H, W]`` (R rows) or ``[3, H, W]``.
        row_labels: one text per row (e.g. the prompt), drawn above the row and word-wrapped.
        col_labels: one text per column (e.g. ``"az 90"``), drawn once above the first row.
        caption: a title above everything (e.g. the run name and step).
        padding: pixels between cells and around the border.
        background: the 8-bit RGB colour of padding and text strips.
        font_size: text height in pixels; default scales with the cell height.
    """
    rows = _as_rows(images, channel)
    num_rows, num_cols, _, h, w = rows.shape
    pixels = to_uint8(rows)  # [R, V, H, W, 3]
    if row_labels is not None and len(row_labels) != num_rows:
        raise ValueError(f"got {len(row_labels)} row labels for {num_rows} rows")
    if col_labels is not None and len(col_labels) != num_cols:
        raise ValueError(f"got {len(col_labels)} column labels for {num_cols} columns")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")

    font_size = font_size or max(10, min(24, h // 9))
    font = _font(font_size)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = font_size + max(2, font_size // 4)
    width = num_cols * w + (num_cols + 1) * padding
    text_width = width - 2 * padding - 4

    def strip(text: str | None) -> list[str]:
        return _wrap(scratch, text, font, text_width) if text else []

    caption_lines = strip(caption)
    row_lines = [strip(label) for label in row_labels] if row_labels is not None else [[]] * num_rows
    col_strip = line_height if col_labels is not None else 0
    height = padding + len(caption_lines) * line_height + col_strip
    height += sum(len(lines) * line_height + h + padding for lines in row_lines)

    canvas = Image.new("RGB", (width, height), tuple(background))
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0) if sum(background) > 3 * 127 else (255, 255, 255)
    y = padding
    for line in caption_lines:
        draw.text((padding + 2, y), line, fill=ink, font=font)
        y += line_height
    if col_labels is not None:
        for c, label in enumerate(col_labels):
            x0 = padding + c * (w + padding)
            tw = draw.textlength(label, font=font)
            draw.text((x0 + max(0.0, (w - tw) / 2), y), label, fill=ink, font=font)
        y += col_strip
    for r in range(num_rows):
        for line in row_lines[r]:
            draw.text((padding + 2, y), line, fill=ink, font=font)
            y += line_height
        for c in range(num_cols):
            canvas.paste(Image.fromarray(pixels[r, c]), (padding + c * (w + padding), y))
        y += h + padding
    return canvas


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of a Pillow image (for object stores such as s3)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_preview_grid(
    images: RenderOutput | Tensor | np.ndarray, path: str | os.PathLike[str], **grid_kwargs: Any
) -> Path:
    """:func:`make_grid` written to ``path`` as a PNG, atomically; returns the path.

    Raises :class:`~r2d3.storage.OutputError` naming ``path`` if it cannot be written.
    """
    return atomic_write_bytes(path, encode_png(make_grid(images, **grid_kwargs)))


# ---------------------------------------------------------------------------------------------
# turntables


def _frames_to_pil(frames: Tensor | np.ndarray | Sequence[FrameLike]) -> list[Image.Image]:
    """Frames as channels-first floats ``[F, 3, H, W]``, ``uint8`` ``[F, H, W, 3]``, or a list of images."""
    if isinstance(frames, (Tensor, np.ndarray)):
        if frames.ndim != 4:
            shape = list(frames.shape)
            raise ValueError(f"expected frames [F, 3, H, W] (float) or [F, H, W, 3] (uint8), got {shape}")
        frames = list(frames)
    out: list[Image.Image] = []
    for i, frame in enumerate(frames):
        if isinstance(frame, Image.Image):
            out.append(frame.convert("RGB"))
        elif isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.shape[2:] == (3,):
            out.append(Image.fromarray(frame))  # already 8-bit, channels-last [H, W, 3]
        elif isinstance(frame, (Tensor, np.ndarray)):
            out.append(Image.fromarray(to_uint8(frame)))
        else:
            raise TypeError(f"frame {i}: expected a tensor, array or PIL image, got {type(frame).__name__}")
    if not out:
        raise ValueError("a turntable needs at least one frame")
    if any(f.size != out[0].size for f in out):
        raise ValueError(f"all frames must have the same size, got {sorted({f.size for f in out})}")
    return out


def encode_gif(frames: Tensor | np.ndarray | Sequence[FrameLike], fps: float = 12.0, loop: int = 0) -> bytes:
    """Animated GIF bytes (``loop=0`` repeats forever). Consecutive identical frames are merged by
    Pillow into one longer frame, which plays back identically."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    images = _frames_to_pil(frames)
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:],
        duration=max(10, round(1000.0 / fps)), loop=loop,
    )  # fmt: skip
    return buffer.getvalue()


def mp4_available() -> bool:
    """Whether an MP4 encoder (imageio-ffmpeg or PyAV) is installed."""
    return any(importlib.util.find_spec(m) is not None for m in ("imageio_ffmpeg", "av"))


def _write_mp4(images: list[Image.Image], path: Path, fps: float) -> None:
    # H.264 with yuv420p needs even sizes: pad by replicating the last row/column instead of resizing.
    arrays = [np.asarray(im) for im in images]
    h, w = arrays[0].shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    stack = np.stack([np.pad(a, pad, mode="edge") for a in arrays])
    import imageio.v3 as iio

    if importlib.util.find_spec("av") is not None:
        iio.imwrite(path, stack, plugin="pyav", codec="libx264", fps=fps, out_pixel_format="yuv420p")
    else:
        iio.imwrite(
            path, stack, plugin="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1
        )


def save_turntable(
    frames: Tensor | np.ndarray | Sequence[FrameLike],
    path: str | os.PathLike[str],
    fps: float = 12.0,
    loop: int = 0,
) -> Path:
    """Write frames as an animation; the format follows the suffix of ``path`` (``.gif`` or ``.mp4``).

    GIF needs only Pillow. MP4 needs ``imageio-ffmpeg`` or ``av`` (PyAV); without either,
    :class:`VideoBackendUnavailableError` is raised before anything is written. Atomic like every export.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return atomic_write_bytes(path, encode_gif(frames, fps=fps, loop=loop))
    if suffix == ".mp4":
        if not mp4_available():
            raise VideoBackendUnavailableError(
                f"cannot write {str(path)!r}: MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg) or PyAV "
                "(pip install av); write a .gif turntable instead"
            )
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        images = _frames_to_pil(frames)
        with atomic_path(path) as tmp:
            _write_mp4(images, tmp, fps)
        return path
    raise ValueError(f"unsupported turntable format {path.suffix!r} for {str(path)!r}; use .gif or .mp4")


#: fraction of the frame's half-height the asset's bounding sphere fills in framed views
DEFAULT_FILL = 0.9


def framed(gaussians: Gaussians, fov_deg: float, fill: float = DEFAULT_FILL) -> tuple[Gaussians, float]:
    """The asset moved to the origin and the orbit distance at which its bounding sphere fills ``fill`` of
    the frame: preview cameras fit the object, whatever its size or offset (the reward cameras keep
    their fixed distance). The sphere bounds the centres of splats with opacity > 0.05, padded by two of
    their largest standard deviations."""
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    visible = gaussians.opacities[0] > 0.05
    if not visible.any():
        visible = torch.ones_like(visible)
    means = gaussians.means[0][visible]
    lo, hi = means.min(dim=0).values, means.max(dim=0).values
    center = (lo + hi) / 2
    radius = ((means - center).norm(dim=-1) + 2 * gaussians.scales[0][visible].max(dim=-1).values).max()
    radius = float(radius.clamp_min(1e-3))
    distance = radius / (fill * math.sin(math.radians(fov_deg) / 2))
    moved = Gaussians(gaussians.means - center, gaussians.scales, gaussians.quats, gaussians.opacities,
                      gaussians.colors)
    return moved, distance


@torch.no_grad()
def render_turntable(
    gaussians: Gaussians,
    render_fn: RenderFn | None = None,
    num_frames: int = 24,
    elevation_deg: float = 20.0,
    distance: float | None = None,
    fov_deg: float = 40.0,
    size: int = 256,
    background: Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    views_per_call: int = 8,
) -> Tensor:
    """Render one asset (``B == 1``) from ``num_frames`` evenly spaced azimuths: ``[F, 3, size, size]``.

    ``distance=None`` frames the asset (:func:`framed`: centred, filling the frame); a number orbits the
    origin at that distance. ``render_fn(gaussians, cameras, background=...) -> RenderOutput`` defaults
    to :func:`r2d3.render.render_gaussians`. Views are rendered ``views_per_call`` at a time so long
    turntables at high resolution stay within memory on a laptop. A preview grid is a turntable with
    as many frames as views.
    """
    if gaussians.batch_size != 1:
        raise ValueError(f"render_turntable renders one asset, got a batch of {gaussians.batch_size}")
    if num_frames < 1 or views_per_call < 1:
        raise ValueError(f"num_frames and views_per_call must be >= 1, got {num_frames}, {views_per_call}")
    if distance is None:
        gaussians, distance = framed(gaussians, fov_deg)
    render_fn = render_fn or render_gaussians
    azimuths = torch.arange(num_frames, dtype=torch.float64) * (360.0 / num_frames)
    cams = orbit_cameras(
        elevation_deg, azimuths.tolist(), distance=distance, fov_deg=fov_deg, width=size, height=size,
        dtype=gaussians.means.dtype, device=gaussians.means.device,
    )  # fmt: skip
    background = torch.as_tensor(background, dtype=gaussians.means.dtype, device=gaussians.means.device)
    frames = []
    for start in range(0, num_frames, views_per_call):
        chunk = slice(start, min(start + views_per_call, num_frames))
        sub = Cameras(cams.viewmats[chunk][None], cams.Ks[chunk][None], cams.width, cams.height)
        frames.append(render_fn(gaussians, sub, background=background).rgb[0])
    return torch.cat(frames).clamp(0, 1)
