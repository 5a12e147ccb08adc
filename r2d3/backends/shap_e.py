"""``shap_e``: OpenAI's Shap-E text-to-3D latent diffusion model, through diffusers.

Pieces (the ``openai/shap-e`` diffusers repository, loaded from a local directory, safetensors only):

- ``prior`` (:class:`diffusers.PriorTransformer`) -- the denoiser, and the module LoRA adapts. A sample
  is a latent ``[num_embeddings, embedding_dim]`` = ``[1024, 1024]``; the prior is conditioned on the CLIP
  text embedding through ``proj_embedding`` and predicts ``x_0`` (``prediction_type="sample"``) plus a
  learned-variance half (``clip_embed_dim = 2 * embedding_dim``) that :meth:`ShapEBackend.denoise` drops.
- ``text_encoder`` (:class:`transformers.CLIPTextModelWithProjection`) + ``tokenizer``, frozen. As in
  :class:`diffusers.ShapEPipeline`, a prompt becomes its projected, L2-normalised CLIP embedding times
  ``sqrt(dim)``; the **empty prompt encodes to zeros**, Shap-E's unconditional embedding, so r2d3's
  classifier-free guidance (which uses ``encode_prompts([""])`` as ``uncond``) is exactly Shap-E's.
- ``scheduler`` -- Shap-E ships a ``HeunDiscreteScheduler`` (``beta_schedule="exp"``, 1024 steps,
  ``clip_sample=True``). r2d3's stochastic sampler only runs DDIM / SDE-DPM-Solver++, which do not know the
  "exp" schedule, so :attr:`ShapEBackend.scheduler_config` carries the *same* betas as ``trained_betas``
  (computed by the shipped scheduler class itself; ``alphas_cumprod`` agree exactly) with
  ``prediction_type="sample"`` and ``timestep_spacing="trailing"`` (the first step starts at t = 1023,
  the noisiest training level, as Shap-E's own sampler does). ``clip_sample`` is dropped: the sampler
  needs step means linear in the network output.
- ``shap_e_renderer`` (:class:`diffusers.pipelines.shap_e.ShapERenderer`), frozen: ``params_proj`` turns a
  latent into the weights of the first four layers of an implicit MLP (``mlp``, NeRF density + colour and
  STF signed distance + texture at 3D points in the box [-1, 1]^3).

Why decode goes to Gaussians. Everything downstream of a backend in r2d3 -- the differentiable splat
renderer, every reward (in process or in remote reward actors, which receive Gaussians), PLY / mesh / video
export -- consumes :class:`~r2d3.render.Gaussians`. Turning Shap-E's implicit field into Gaussians once, in
:meth:`ShapEBackend.decode`, keeps a single render / reward / export path instead of a second NeRF
renderer with its own cameras, backgrounds and reward plumbing. The conversion is differentiable in the
latents:

1. the MLP is evaluated exactly as ``ShapERenderer.decode_to_image`` does (weights from ``params_proj``,
   NeRF mode, ``nerf_level="fine"``, no view direction: ``render_with_direction`` is off in diffusers), but
   functionally (``torch.func.functional_call`` with per-sample weights) so gradients reach the latents,
   at the centres of a regular ``resolution^3`` grid of cells covering the renderer's bounding box
   (default 48^3 = 110,592 cells; chunked and activation-checkpointed, so the backward pass holds one
   chunk's activations at a time);
2. one Gaussian per cell: opacity ``1 - exp(-sigma * step)`` (the alpha of a ray crossing the cell in
   Shap-E's volume-rendering quadrature, ``step`` = the cell size in Shap-E units), colour = the NeRF colour
   unchanged (it is what ``decode_to_image`` displays, so our renders look like Shap-E's; the
   sRGB -> linear conversion of Shap-E's mesh export is not applied);
3. shape: tangential standard deviation ``scale_factor`` x the cell size, flattened along the density
   gradient (central differences over the grid, i.e. cheap) to ``normal_ratio`` x that, so the Gaussian's
   shortest axis -- the renderer's surface normal, used by e.g. the ``dnc`` reward -- is the field's
   normal. The normal is differentiable; below a change of optical depth of ~1e-3 per cell it is
   undefined and its normalisation is damped (such short normals turn the Gaussian smoothly towards +z;
   no exploding gradients in flat, empty or uniform regions);
4. cells with opacity below ``min_opacity`` get opacity exactly 0 (``torch.where``: the kept cells keep
   their gradient; a pruned cell's density was ~0, where the renderer MLP's ReLU gives no gradient
   either); with ``max_gaussians`` only the most opaque cells are kept (top-k per asset: a fixed count,
   the kept cells' values stay differentiable).

Frame: Shap-E is z-up (its pan cameras orbit the z axis, the first one on the -y side); r2d3 is y-up with
orbit azimuth 0 on +z (:mod:`r2d3.render.cameras`). Points map as ``(x, y, z) -> world_scale * (x, z, -y)``
(a proper rotation), so Shap-E's up is our up and Shap-E's first pan view is our azimuth-0 view, with the
same handedness. ``world_scale`` defaults to 2.5 / 4 = 0.625: Shap-E's pan cameras sit at distance 4 with a
0.7 rad (40 degree) field of view, ours at 2.5 with 40 degrees, so the default orbit frames an asset as
Shap-E's own renders do (the box [-1, 1]^3 becomes [-0.625, 0.625]^3).

Final sample: r2d3's last stochastic step lands on the noise level of training timestep 0, which for
Shap-E's "exp" schedule is alpha_bar = exp(-12/1024) = 0.988 (noise std ~0.11 on latents in [-1, 1]);
Shap-E's Heun sampler ends with a deterministic jump to zero noise. ``final_x0 = True`` makes r2d3's
samplers do the same: the decoded and rewarded sample is the prior's x_0 prediction at the last state.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from r2d3.pretrained import WEIGHTS_FILE, WeightsError, load_pretrained_dir
from r2d3.backends.base import register_backend
from r2d3.text import PromptEmbeds, hf_word_tokenizer
from r2d3.render.gaussians import Gaussians
from r2d3.render.quaternions import quat_from_z_to

#: the prior's attention and feed-forward linears (diffusers ``BasicTransformerBlock`` names)
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]

#: Shap-E's training scheduler (``openai/shap-e`` ``scheduler/scheduler_config.json``)
SHAP_E_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "HeunDiscreteScheduler",
    "num_train_timesteps": 1024,
    "beta_schedule": "exp",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "sample",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "use_karras_sigmas": True,
    "steps_offset": 0,
}

#: Shap-E's frame (z up) -> r2d3's (y up): (x, y, z) -> (x, z, -y), a rotation (det +1)
SHAP_E_TO_WORLD = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

DECODER_FILE = "r2d3_decoder.json"
_DOWNLOAD = ("Download the diffusers-format Hugging Face repository `openai/shap-e` (model_index.json, "
             "prior/, text_encoder/, tokenizer/, scheduler/, shap_e_renderer/ with their *.safetensors "
             "files; e.g. `huggingface-cli download openai/shap-e --local-dir <dir>` on a machine with "
             "hub access) and pass <dir> as the backend weights (model.weights / weights=<dir>); this "
             "project never downloads weights")


def sampler_scheduler_config(train_config: dict[str, Any]) -> dict[str, Any]:
    """A DDIM / DPM-Solver config (as accepted by :func:`r2d3.diffusion.scheduler_from_config`) with the
    noise schedule of Shap-E's training scheduler config: its betas, computed by its own scheduler class,
    passed as ``trained_betas`` (``alphas_cumprod`` then agree bit for bit)."""
    import diffusers

    config = {k: v for k, v in dict(train_config).items() if not k.startswith("_")}
    class_name = dict(train_config).get("_class_name", "HeunDiscreteScheduler")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise WeightsError(f"unknown scheduler class {class_name!r} in the Shap-E scheduler config")
    betas = cls.from_config(config).betas
    return {
        "num_train_timesteps": int(config.get("num_train_timesteps", len(betas))),
        "trained_betas": [float(b) for b in betas.to(torch.float32)],
        "prediction_type": config.get("prediction_type", "sample"),
        "timestep_spacing": "trailing",
        "steps_offset": 0,
    }


class ShapEBackend:
    """Shap-E behind the :class:`~r2d3.backends.base.Backend` protocol (registry name ``shap_e``).

    ``denoiser`` is the diffusers ``PriorTransformer`` itself (so LoRA keys are the prior's own); its
    forward has the prior's signature, :meth:`denoise` adapts the protocol's ``(x, t, cond)``.
    Decoder options: see the module docstring.
    """

    name = "shap_e"
    lora_target_modules = LORA_TARGET_MODULES
    final_x0 = True  # see "Final sample" in the module docstring

    def __init__(
        self,
        prior: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        renderer: nn.Module,
        train_scheduler_config: dict[str, Any] | None = None,
        resolution: int = 48,
        world_scale: float = 0.625,
        scale_factor: float = 0.6,
        normal_ratio: float = 0.5,
        min_opacity: float = 1e-3,
        max_gaussians: int | None = None,
        query_chunk: int = 32768,
    ):
        if resolution < 2:
            raise ValueError(f"resolution must be >= 2, got {resolution}")
        if not 0 < normal_ratio <= 1:
            raise ValueError(f"normal_ratio must be in (0, 1], got {normal_ratio}")
        if max_gaussians is not None and max_gaussians < 1:
            raise ValueError(f"max_gaussians must be >= 1 or None, got {max_gaussians}")
        self.denoiser = prior
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.renderer = renderer.eval().requires_grad_(False)
        self.train_scheduler_config = dict(train_scheduler_config or SHAP_E_SCHEDULER_CONFIG)
        self.scheduler_config = sampler_scheduler_config(self.train_scheduler_config)
        self.resolution = int(resolution)
        self.world_scale = float(world_scale)
        self.scale_factor = float(scale_factor)
        self.normal_ratio = float(normal_ratio)
        self.min_opacity = float(min_opacity)
        self.max_gaussians = None if max_gaussians is None else int(max_gaussians)
        self.query_chunk = int(query_chunk)
        proj = self.renderer.params_proj.config
        rows = sum(shape[0] for shape in proj.param_shapes)
        if (rows, proj.d_latent) != self.latent_shape:
            raise WeightsError(f"Shap-E prior latent {self.latent_shape} does not match the renderer's "
                               f"params_proj ({rows} rows of {proj.d_latent}); the prior and renderer come "
                               "from different models")

    # ---- protocol ----------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (int(self.denoiser.config.num_embeddings), int(self.denoiser.config.embedding_dim))

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def to(self, device: torch.device | str) -> "ShapEBackend":
        self.denoiser.to(device)
        self.text_encoder.to(device)
        self.renderer.to(device)
        return self

    def decoder_config(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "world_scale": self.world_scale,
                "scale_factor": self.scale_factor, "normal_ratio": self.normal_ratio,
                "min_opacity": self.min_opacity,
                "max_gaussians": self.max_gaussians, "query_chunk": self.query_chunk}

    def _token_ids(self, prompts: list[str]) -> Tensor:
        """CLIP token ids ``[B, L]`` padded with 0 to the model length, as ShapEPipeline feeds them (it sets
        ``pad_token_id = 0``; CLIP's causal attention makes the pooled EOS state independent of padding)."""
        max_len = int(self.text_encoder.config.max_position_embeddings)
        length = min(max_len, int(getattr(self.tokenizer, "model_max_length", None) or max_len))
        rows = self.tokenizer(prompts, truncation=True, max_length=length)["input_ids"]
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row[:length], dtype=torch.long)
        return ids

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """``tokens [B, 1, D]``: the projected CLIP embedding, unit-normalised, times sqrt(D) (ShapEPipeline's
        ``_encode_prompt``); empty / whitespace prompts give zeros, Shap-E's unconditional embedding."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        prompts = list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompt must be a string, got {type(p).__name__}: {p!r}")
        dim = int(self.text_encoder.config.projection_dim)
        device = self.text_encoder.device
        tokens = torch.zeros(len(prompts), 1, dim, device=device)
        real = [i for i, p in enumerate(prompts) if p.strip()]
        if real:
            ids = self._token_ids([prompts[i] for i in real]).to(device)
            emb = self.text_encoder(ids).text_embeds.float()
            emb = emb / torch.linalg.norm(emb, dim=-1, keepdim=True)
            tokens[real, 0] = math.sqrt(dim) * emb
        return PromptEmbeds(tokens, torch.ones(len(prompts), 1, dtype=torch.bool, device=device))

    def denoise(self, x: Tensor, t: Tensor, cond: PromptEmbeds) -> Tensor:
        """The prior's x_0 prediction ``[B, N, D]`` (learned-variance half dropped), differentiable."""
        if x.ndim != 3 or tuple(x.shape[1:]) != self.latent_shape:
            n, d = self.latent_shape
            raise ValueError(f"shap_e denoiser expects latents [B, {n}, {d}], got {tuple(x.shape)}")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        dtype = self.denoiser.dtype
        proj = cond.tokens[:, 0].to(device=x.device, dtype=dtype)
        out = self.denoiser(x.to(dtype), timestep=t.to(x.device), proj_embedding=proj)
        return out.predicted_image_embedding[..., : x.shape[-1]].to(x.dtype)

    # ---- decoding ----------------------------------------------------------------------------
    def _box(self) -> tuple[Tensor, Tensor]:
        volume = self.renderer.volume
        return volume.bbox_min.float(), volume.bbox_max.float()

    def grid_points(self, device: torch.device | str | None = None) -> Tensor:
        """Cell centres ``[R^3, 3]`` in Shap-E coordinates, x slowest and z fastest (the order of diffusers'
        ``volume_query_points``)."""
        lo, hi = self._box()
        r = self.resolution
        axis = (torch.arange(r, dtype=torch.float32) + 0.5) / r
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        return (lo + grid * (hi - lo)).to(device or self.device)

    def mlp_weights(self, latents: Tensor) -> list[dict[str, Tensor]]:
        """Per-sample overrides of the renderer MLP's parameters, from ``params_proj`` (differentiable)."""
        projected = self.renderer.params_proj(latents.to(self.renderer.dtype))
        names = dict(self.renderer.mlp.named_parameters())
        keys = [k for k in projected if k.startswith("nerstf.") and k[len("nerstf."):] in names]
        return [{k[len("nerstf."):]: projected[k][i] for k in keys} for i in range(latents.shape[0])]

    def query_field(self, weights: dict[str, Tensor], points: Tensor) -> tuple[Tensor, Tensor]:
        """NeRF density ``[P]`` and colour ``[P, 3]`` of one asset at Shap-E points ``[P, 3]``: the renderer's
        own MLP forward (fine level, no view direction) with the projected weights."""
        mlp = self.renderer.mlp
        out = torch.func.functional_call(
            mlp, weights, args=(),
            kwargs={"position": points[None].to(mlp.dtype), "direction": None, "ts": None,
                    "nerf_level": "fine", "rendering_mode": "nerf"},
            strict=False)
        return out.density[0, :, 0], out.channels[0]

    def _field_on_grid(self, weights: dict[str, Tensor], points: Tensor) -> tuple[Tensor, Tensor]:
        names = list(weights)
        needs_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights.values())

        def chunk_fn(pts: Tensor, *tensors: Tensor) -> tuple[Tensor, Tensor]:
            return self.query_field(dict(zip(names, tensors)), pts)

        sigmas, colors = [], []
        for start in range(0, points.shape[0], self.query_chunk):
            pts = points[start: start + self.query_chunk]
            if needs_grad:
                s, c = checkpoint(chunk_fn, pts, *weights.values(), use_reentrant=False)
            else:
                s, c = chunk_fn(pts, *weights.values())
            sigmas.append(s)
            colors.append(c)
        return torch.cat(sigmas), torch.cat(colors)

    def decode(self, latents: Tensor) -> Gaussians:
        """Latents ``[B, N, D]`` -> one Gaussian per grid cell (or the ``max_gaussians`` most opaque), in
        r2d3's y-up frame; differentiable in the latents (see the module docstring)."""
        if latents.ndim != 3 or tuple(latents.shape[1:]) != self.latent_shape:
            n, d = self.latent_shape
            raise ValueError(f"shap_e decode expects latents [B, {n}, {d}], got {tuple(latents.shape)}")
        b, r, device = latents.shape[0], self.resolution, latents.device
        dtype = latents.dtype if latents.is_floating_point() else torch.float32
        lo, hi = self._box()
        step = float((hi - lo).mean()) / r  # cell size, Shap-E units
        points = self.grid_points(device)
        fields = [self._field_on_grid(w, points) for w in self.mlp_weights(latents)]
        sigma = torch.stack([f[0] for f in fields]).to(dtype)  # [B, R^3]
        colors = torch.stack([f[1] for f in fields]).to(dtype).clamp(0, 1)  # [B, R^3, 3]
        opacity = -torch.expm1(-sigma.clamp(min=0) * step)
        opacity = torch.where(opacity >= self.min_opacity, opacity, torch.zeros_like(opacity))

        # normal = -grad(sigma), as the change of optical depth per cell; rotate into our frame
        grad = torch.gradient(sigma.reshape(b, r, r, r) * step, dim=(1, 2, 3))
        normal = -torch.stack(grad, dim=-1).reshape(b, r ** 3, 3)
        rot = SHAP_E_TO_WORLD.to(device=device, dtype=dtype)
        normal = F.normalize(normal @ rot.T, dim=-1, eps=1e-3)
        quats = quat_from_z_to(normal)

        means = (self.world_scale * points.to(dtype) @ rot.T).expand(b, -1, -1)
        tangent = self.scale_factor * self.world_scale * step
        scales = torch.tensor([tangent, tangent, tangent * self.normal_ratio], device=device, dtype=dtype)
        scales = scales.expand(b, r ** 3, 3)
        if self.max_gaussians is not None and self.max_gaussians < r ** 3:
            keep = opacity.detach().topk(self.max_gaussians, dim=1).indices  # [B, K]
            pick = lambda x: torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
            return Gaussians(means=pick(means), scales=pick(scales), quats=pick(quats),
                             opacities=torch.gather(opacity, 1, keep), colors=pick(colors))
        return Gaussians(means=means, scales=scales, quats=quats, opacities=opacity, colors=colors)

    # ---- weights -----------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The diffusers ``ShapEPipeline`` layout (loadable by diffusers too) plus ``r2d3_decoder.json``."""
        from diffusers import HeunDiscreteScheduler, ShapEPipeline

        path = Path(path)
        config = {k: v for k, v in self.train_scheduler_config.items() if not k.startswith("_")}
        pipe = ShapEPipeline(prior=self.denoiser, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                             scheduler=HeunDiscreteScheduler.from_config(config),
                             shap_e_renderer=self.renderer)
        pipe.save_pretrained(path, safe_serialization=True)
        (path / DECODER_FILE).write_text(json.dumps(self.decoder_config(), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None, device: str | torch.device = "cpu",
                        **decoder: Any) -> "ShapEBackend":
        """Load a local diffusers-format Shap-E directory (``openai/shap-e`` layout, safetensors only).
        Decoder options come from ``r2d3_decoder.json`` when present, overridden by ``decoder``."""
        from diffusers import PriorTransformer
        from diffusers.pipelines.shap_e import ShapERenderer

        if path is None or str(path) == "":
            raise WeightsError(f"the shap_e backend needs a weights directory. {_DOWNLOAD}.")
        path = Path(path)
        missing = [str(p) for p in _required_files(path) if not p.is_file()]
        text_weights = [path / "text_encoder" / n
                        for n in ("model.safetensors", "model.safetensors.index.json")]
        if not any(p.is_file() for p in text_weights):
            missing.append(str(text_weights[0]))
        if missing:
            raise WeightsError(f"Shap-E weights are missing under {path}: {', '.join(missing)}. {_DOWNLOAD}.")
        rebuild = "huggingface-cli download openai/shap-e --local-dir <dir>"
        prior = load_pretrained_dir(PriorTransformer, path / "prior", "Shap-E prior", rebuild, device)
        renderer = load_pretrained_dir(ShapERenderer, path / "shap_e_renderer", "Shap-E renderer", rebuild,
                                       device)
        try:
            from transformers import AutoTokenizer, CLIPTextModelWithProjection

            text_encoder = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder",
                                                                       use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
            scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
            options = json.loads((path / DECODER_FILE).read_text()) if (path / DECODER_FILE).is_file() else {}
        except Exception as err:  # transformers / tokenizers / json raise several types for bad files
            raise WeightsError(f"could not load Shap-E text encoder, tokenizer or configs from {path} "
                               f"({type(err).__name__}: {err}); the files are corrupt or incomplete. "
                               f"{_DOWNLOAD}.") from err
        options.update(decoder)
        backend = cls(prior, text_encoder, tokenizer, renderer, scheduler, **options)
        return backend.to(device)

    @classmethod
    def random_init(cls, seed: int = 0, hidden: int = 8, embedding_dim: int = 16, num_layers: int = 2,
                    text_dim: int = 16, projection_dim: int = 8,
                    vocab: Sequence[str] = ("a", "red", "blue", "green", "cube", "sphere", "chair"),
                    **decoder: Any) -> "ShapEBackend":
        """A tiny randomly initialised Shap-E from the same classes (tests): the latent is
        ``[4 * hidden, embedding_dim]`` (``params_proj`` maps 4 groups of ``hidden`` rows to the MLP's
        first four weight matrices, as the real model's 4 x 256 = 1024 rows)."""
        from diffusers import PriorTransformer
        from diffusers.pipelines.shap_e import ShapERenderer
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        tokenizer = hf_word_tokenizer(vocab, bos="<|startoftext|>", eos="<|endoftext|>", model_max_length=16)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
            projection_dim=projection_dim,
            pad_token_id=0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
        num_embeddings = 4 * hidden
        # the text-to-3D prior's structure (diffusers' Shap-E conversion script), scaled down
        prior = PriorTransformer(
            num_attention_heads=2, attention_head_dim=embedding_dim // 2, num_layers=num_layers,
            embedding_dim=embedding_dim, num_embeddings=num_embeddings, additional_embeddings=0,
            time_embed_act_fn="gelu", norm_in_type="layer", encoder_hid_proj_type=None, added_emb_type=None,
            time_embed_dim=4 * embedding_dim, embedding_proj_dim=projection_dim,
            clip_embed_dim=2 * embedding_dim)
        with torch.no_grad():  # zero-initialised in diffusers; give the random model a position signal
            prior.positional_embedding.normal_(std=0.02)
        d_posenc = 93  # 3 + 3 * 15 * 2: NeRF position encoding of degrees 0..14
        renderer = ShapERenderer(
            param_names=tuple(f"nerstf.mlp.{i}.weight" for i in range(4)),
            param_shapes=((hidden, d_posenc),) + ((hidden, hidden),) * 3,
            d_latent=embedding_dim, d_hidden=hidden, n_output=12, n_hidden_layers=6, insert_direction_at=4)
        return cls(prior.eval(), text_encoder, tokenizer, renderer, dict(SHAP_E_SCHEDULER_CONFIG), **decoder)


def _required_files(path: Path) -> list[Path]:
    return [
        path / "model_index.json",
        path / "prior" / "config.json",
        path / "prior" / WEIGHTS_FILE,
        path / "shap_e_renderer" / "config.json",
        path / "shap_e_renderer" / WEIGHTS_FILE,
        path / "text_encoder" / "config.json",
        path / "tokenizer" / "tokenizer_config.json",
        path / "scheduler" / "scheduler_config.json",
    ]


#: diffusers' ShapEPipeline defaults (25 steps, guidance 4), on r2d3's DDIM over Shap-E's schedule
SAMPLER_DEFAULTS = {"kind": "ddim", "num_steps": 25, "eta": 1.0, "guidance_scale": 4.0}


@register_backend("shap_e", sampler_defaults=SAMPLER_DEFAULTS)
def _load_shap_e(weights: str | None = None, device: str = "cpu", **decoder: Any) -> ShapEBackend:
    return ShapEBackend.from_pretrained(weights, device=device, **decoder)
