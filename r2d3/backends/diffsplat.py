"""``diffsplat``: DiffSplat's text-to-3D model on PixArt-Σ, the base model of the Nabla-R2D3 paper.

DiffSplat generates an object as four *splatter images*: one 256 x 256 map of Gaussian parameters per
fixed input camera, stored as SDXL-VAE latents. Three pieces, built here from diffusers/transformers
classes so that DiffSplat's released checkpoints load with strict key and shape matching:

* **Multi-view transformer** (:class:`MultiViewPixArtTransformer`): diffusers' PixArt-Σ transformer with
  the self-attention of every block spanning the tokens of all views of an object (cross-view attention;
  cross-attention to the T5 prompt stays per view). Its input is the 4-channel view latent concatenated
  with the 6-channel Plücker rays of that view's camera (10 channels); its output has 8 channels, the
  epsilon prediction and a learned-variance half that sampling ignores. Parameter names are those of
  ``PixArtTransformer2DModel``, which DiffSplat's ``PixArtTransformerMV2DModel`` also keeps.
* **GSVAE** (:class:`GSVAE`): an SDXL ``AutoencoderKL`` whose input and output convolutions carry 12
  channels (RGB 3, scale 3, rotation 4, opacity 1, depth 1, all in [-1, 1]), plus the distilled tiny
  decoder DiffSplat trains alongside it (an ``AutoencoderTiny`` decoder with a 12-channel output).
* **Gaussians from splatter images** (:meth:`DiffSplatBackend.decode`): each pixel of each view becomes
  one Gaussian, placed by unprojecting its depth (offset by the camera distance) along the ray of the
  fixed input camera; colour, opacity and scale are affine maps of the [-1, 1] channels.

Conventions reproduced because the released weights were trained with them: the input cameras orbit at
radius 1.4 and elevation 10 deg with azimuths 0/90/180/270, normalised focal 1422.222 / 1024; Plücker
rays use DiffSplat's pixel coordinate ``j / (W - 1)`` shifted by half a normalised unit (its "bug = True"
convention, off-centre rays) while depth unprojection uses ``j / (W - 1)`` centred on 0.5; scales map
u = (x + 1) / 2 to ``scale_min * u + scale_max * (1 - u)``. Quaternions are the decoder's raw channels, as
DiffSplat's renderer takes them: rendering normalises them (r2d3's default, ``render.quaternions=unit``) or
uses them as they are (``render.quaternions=raw``, the paper setups); exported files hold unit quaternions.

Sampling settings of the paper (20-step first-order SDE-DPM-Solver++ on PixArt-Σ's linear schedule,
CFG 5, empty negative prompt) are this backend's defaults; see ``configs/`` for the alignment setups.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from r2d3.backends.base import register_backend
from r2d3.backends.diffsplat_modules import (DEFAULT_SCHEDULER_CONFIG, GS_CHANNELS, GSVAE, LATENT_CHANNELS,
                                             PLUCKER_CHANNELS, MultiViewPixArtTransformer, input_c2w,
                                             plucker_rays, unproject_depth)
from r2d3.backends.diffsplat_weights import (BACKEND_FILE, GSVAE_DIR, GSVAE_WEIGHTS, LAYOUT_HELP, TEXT_ENCODER_DIR,
                                             TINY_CONFIG, TOKENIZER_DIR, TRANSFORMER_DIR, VAE_CONFIG, read_json,
                                             load_gsvae, load_text_encoder, load_transformer)
from r2d3.pretrained import WeightsError
from r2d3.render.gaussians import Gaussians
from r2d3.text import PromptEmbeds, hf_word_tokenizer, module_fingerprint

#: PEFT targets of the paper's LoRA (attention, feed-forward, caption/timestep projections, patch embedding)
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_out", "ff.net.0.proj", "ff.net.2", "proj",
                       "linear", "linear_1", "linear_2"]
#: the fixed input cameras and Gaussian activations of the released model
DEFAULT_GEOMETRY: dict[str, Any] = {
    "num_views": 4,
    "input_res": 256,
    "fxfy": 1422.222 / 1024,
    "elevation_deg": 10.0,
    "azimuths_deg": [0.0, 90.0, 180.0, 270.0],
    "distance": 1.4,
    "scale_min": 0.0005,
    "scale_max": 0.02,
}
MAX_PROMPT_TOKENS = 300  # PixArt-Σ's T5 sequence length


class DiffSplatBackend:
    """DiffSplat-PixArt-Σ behind the backend protocol (registry name ``diffsplat``).

    Latents are ``[B, V * 4, h, w]`` (views stacked on the channel axis, as the paper stores them).
    The text encoder is loaded on first use, so jobs that read precomputed prompt embeddings only
    pay for it once (the empty negative prompt).

    Subclasses swap the denoiser and text encoder (:class:`~r2d3.backends.diffsplat_sd15.DiffSplatSD15Backend`)
    through the class attributes below, :meth:`_network` and :meth:`encode_prompts`; the GSVAE, the cameras,
    decoding and the weight layout are shared."""

    name = "diffsplat"
    lora_target_modules = LORA_TARGET_MODULES
    #: the paper decodes the last stochastic step's latent (PixArt's linear schedule ends nearly clean)
    final_x0 = False
    #: where the denoiser sits in a weights directory, and how it loads
    denoiser_dir = TRANSFORMER_DIR
    load_denoiser = staticmethod(load_transformer)
    #: the text encoder: ``load_text_encoder`` kind and its precision unless backend.json says otherwise
    text_encoder_kind = "t5"
    default_text_encoder_dtype = "bfloat16"
    default_scheduler_config = DEFAULT_SCHEDULER_CONFIG
    layout_help = LAYOUT_HELP

    def __init__(self, denoiser: nn.Module, gsvae: GSVAE, text_encoder: Any = None,
                 tokenizer: Any = None, scheduler_config: dict[str, Any] | None = None,
                 geometry: dict[str, Any] | None = None, tiny_decoder: bool = False,
                 text_encoder_loader: Any = None, text_encoder_device: str | None = None):
        self.denoiser = denoiser
        self.gsvae = gsvae.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config or self.default_scheduler_config)
        self.geometry = {**DEFAULT_GEOMETRY, **(geometry or {})}
        self.tiny_decoder = tiny_decoder
        self._text_encoder, self._tokenizer, self._text_loader = text_encoder, tokenizer, text_encoder_loader
        self.text_encoder_device = text_encoder_device  # e.g. "cpu": keep T5-XXL (9.5 GB bf16) off the GPU
        cfg = denoiser.config
        expected_in, out = LATENT_CHANNELS + PLUCKER_CHANNELS, cfg.out_channels or cfg.in_channels
        if cfg.in_channels != expected_in or out not in (LATENT_CHANNELS, 2 * LATENT_CHANNELS):
            raise WeightsError(f"DiffSplat denoiser must take {expected_in} input channels (latent + Plücker) "
                               f"and give 4 or 8; its config has in_channels={cfg.in_channels}, out_channels={out}")
        self.num_views = int(self.geometry["num_views"])
        if len(self.geometry["azimuths_deg"]) != self.num_views:
            raise ValueError(f"geometry: {len(self.geometry['azimuths_deg'])} azimuths for {self.num_views} views")
        denoiser.set_num_views(self.num_views)
        self.c2w = input_c2w(self.geometry)
        res = int(cfg.sample_size)
        # Plücker rays at the input resolution, bilinearly resized to the latent grid (as DiffSplat)
        full = plucker_rays(self.c2w, self.geometry["fxfy"], int(self.geometry["input_res"]))
        self.plucker = F.interpolate(full, size=(res, res), mode="bilinear", align_corners=False)

    # ---- protocol ------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        res = int(self.denoiser.config.sample_size)
        return (self.num_views * LATENT_CHANNELS, res, res)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def to(self, device: torch.device | str) -> "DiffSplatBackend":
        self.denoiser.to(device)
        self.gsvae.to(device)
        self.c2w, self.plucker = self.c2w.to(device), self.plucker.to(device)
        if self._text_encoder is not None:
            self._text_encoder.to(self.text_encoder_device or device)
        return self

    @property
    def text_encoder(self) -> nn.Module:
        """The text encoder (loaded on first use)."""
        return self._text()[0]

    def encoder_fingerprint(self) -> str:
        """The T5 encoder's weights and the prompt casing: embeddings cached before prompts were lowercased
        are refused rather than mixed with lowercased ones."""
        return f"{module_fingerprint(self.text_encoder)}-lowercased"

    def _text(self) -> tuple[Any, Any]:
        if self._text_encoder is None:
            if self._text_loader is None:
                raise WeightsError("this DiffSplat backend has no text encoder; load it with a weights directory "
                                   "holding text_encoder/ and tokenizer/, or pass precomputed prompt embeddings")
            self._text_encoder, self._tokenizer = self._text_loader()
            self._text_encoder.to(self.text_encoder_device or self.device)
        return self._text_encoder, self._tokenizer

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """T5 embeddings padded to 300 tokens with their attention mask. Prompts are lowercased, as DiffSplat
        trained (its embedding script encodes ``t.lower()``; PixArt-Σ's pipeline lowercases too; T5's
        vocabulary is case-sensitive); PixArt's optional caption cleaning is not applied."""
        encoder, tokenizer = self._text()
        batch = tokenizer([p.lower() for p in prompts], padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True,
                          add_special_tokens=True, return_tensors="pt").to(encoder.device)
        mask = batch.attention_mask.bool()
        # padded positions are masked out of the cross-attention; zeroing them changes no output and lets
        # the embedding cache store only the real tokens (T5 gives padding non-zero features)
        tokens = encoder(batch.input_ids, attention_mask=batch.attention_mask)[0].float() * mask[..., None]
        return PromptEmbeds(tokens.to(self.device), mask.to(self.device))

    def denoise(self, x: Tensor, t: Tensor, cond: PromptEmbeds) -> Tensor:
        """``[B, V*4, h, w]`` -> epsilon ``[B, V*4, h, w]`` (the learned-variance half is dropped)."""
        return self._views_out(x, t, cond)[:, :LATENT_CHANNELS].reshape(x.shape)

    @property
    def extra_output_channels(self) -> int:
        """Channels of :meth:`denoise_full` beyond the model output: the learned-variance half (PixArt-Σ's
        8-channel output), 0 for a 4-channel denoiser (SD1.5)."""
        cfg = self.denoiser.config
        learned_variance = (cfg.out_channels or cfg.in_channels) == 2 * LATENT_CHANNELS
        return self.num_views * LATENT_CHANNELS if learned_variance else 0

    def denoise_full(self, x: Tensor, t: Tensor, cond: PromptEmbeds) -> Tensor:
        """The network's whole output ``[B, 2 * V*4, h, w]``: epsilon (as :meth:`denoise`), then the
        learned-variance half in the same view order. What the reference code's proximal term regularises
        (``algo.proximal_outputs=full``); a denoiser with a 4-channel output has no such half."""
        if not self.extra_output_channels:
            raise ValueError(f"{self.name}'s denoiser has no learned-variance half: its full output is the model "
                             f"output (use algo.proximal_outputs=model)")
        out = self._views_out(x, t, cond)
        return torch.cat([out[:, :LATENT_CHANNELS].reshape(x.shape), out[:, LATENT_CHANNELS:].reshape(x.shape)], 1)

    def _views_out(self, x: Tensor, t: Tensor, cond: PromptEmbeds) -> Tensor:
        """The denoiser's per-view output ``[(B V), C, h, w]`` in ``x``'s dtype."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"{self.name} denoiser expects latents [B, {', '.join(map(str, self.latent_shape))}], "
                             f"got {tuple(x.shape)}")
        b, v = x.shape[0], self.num_views
        dtype = self.denoiser.dtype
        views = x.reshape(b * v, LATENT_CHANNELS, *x.shape[-2:])
        plucker = self.plucker.to(x.device, x.dtype).repeat(b, 1, 1, 1)
        t = (t.expand(b) if t.ndim == 0 else t).to(x.device)
        out = self._network(torch.cat([views, plucker], dim=1).to(dtype),
                            cond.tokens.to(x.device, dtype).repeat_interleave(v, dim=0),
                            cond.mask.to(x.device).repeat_interleave(v, dim=0), t.repeat_interleave(v))
        return out.to(x.dtype)

    def _network(self, inputs: Tensor, tokens: Tensor, mask: Tensor, t: Tensor) -> Tensor:
        """One denoiser call on per-view inputs ``[(B V), 10, h, w]`` with per-view prompt tokens."""
        return self.denoiser(inputs, encoder_hidden_states=tokens, encoder_attention_mask=mask.to(inputs.dtype),
                             timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                             return_dict=False)[0]

    def splatter_images(self, latents: Tensor) -> Tensor:
        """Latents ``[B, V*4, h, w]`` -> splatter images ``[B, V, 12, H, W]`` in [-1, 1] (differentiable)."""
        b, v = latents.shape[0], self.num_views
        z = latents.reshape(b * v, LATENT_CHANNELS, *latents.shape[-2:]).to(self.gsvae.vae.dtype)
        images = self.gsvae.decode(z, tiny=self.tiny_decoder).float()
        return images.reshape(b, v, GS_CHANNELS, *images.shape[-2:])

    def decode(self, latents: Tensor) -> Gaussians:
        """One Gaussian per splatter-image pixel: ``V * H * W`` Gaussians per object."""
        g = self.splatter_images(latents)
        b = g.shape[0]
        flat = lambda y: y.permute(0, 1, 3, 4, 2).reshape(b, -1, y.shape[2])  # noqa: E731
        u_scale = (g[:, :, 3:6] + 1) / 2
        scales = self.geometry["scale_min"] * u_scale + self.geometry["scale_max"] * (1 - u_scale)
        depth = g[:, :, 11] + self.c2w[:, :3, 3].norm(dim=-1).to(g)[None, :, None, None]
        means = unproject_depth(depth, self.c2w, self.geometry["fxfy"]).reshape(b, -1, 3)
        return Gaussians(
            means=means,
            scales=flat(scales),
            quats=flat(g[:, :, 6:10]),  # raw (module docstring); Gaussians.validate normalises them
            opacities=flat((g[:, :, 10:11] + 1) / 2)[..., 0],
            colors=flat((g[:, :, 0:3] + 1) / 2),
        )

    # ---- weights -------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the layout :meth:`from_pretrained` reads (text encoder and tokenizer when loaded)."""
        path = Path(path)
        self.denoiser.save_pretrained(path / self.denoiser_dir, safe_serialization=True)
        (path / GSVAE_DIR).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.gsvae.state_dict().items()}, path / GSVAE_DIR / GSVAE_WEIGHTS)
        (path / GSVAE_DIR / VAE_CONFIG).write_text(json.dumps(self.gsvae.vae_config, indent=2, default=list))
        (path / GSVAE_DIR / TINY_CONFIG).write_text(json.dumps(self.gsvae.tiny_config, indent=2, default=list))
        if self._text_encoder is not None:
            self._text_encoder.save_pretrained(path / TEXT_ENCODER_DIR, safe_serialization=True)
            self._tokenizer.save_pretrained(path / TOKENIZER_DIR)
        meta = {"name": self.name, "scheduler": self.scheduler_config, "geometry": self.geometry,
                "tiny_decoder": self.tiny_decoder, "text_encoder_device": self.text_encoder_device}
        if self._text_encoder is not None:  # the precision it was saved in, not the release default
            meta["text_encoder_dtype"] = str(self._text_encoder.dtype).removeprefix("torch.")
        (path / BACKEND_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, weights: str | None = None, device: str = "cpu") -> "DiffSplatBackend":
        """The registry's factory: :meth:`from_pretrained`, with an error naming the layout without weights."""
        if weights is None:
            raise WeightsError(f"the {cls.name} backend needs model.weights=<directory>. {cls.layout_help}")
        return cls.from_pretrained(weights, device=device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", dtype: str | None = None) -> "DiffSplatBackend":
        """Load DiffSplat from a local directory (layout in :attr:`layout_help`); strict key/shape matching.

        Optional ``backend.json`` keys: ``dtype`` (the denoiser's and GSVAE's precision, default float32;
        LoRA adapters train in float32 regardless), ``text_encoder_dtype`` (default
        :attr:`default_text_encoder_dtype`; PixArt-Σ's T5-XXL in bfloat16 takes 9.5 GB instead of 19 GB, and it
        only encodes prompts, which are cached), ``text_encoder_device`` (e.g. ``"cpu"``), ``tiny_decoder``
        (decode with the distilled decoder), ``scheduler`` and ``geometry`` (defaults: the released model's)."""
        path = Path(path)
        meta = read_json(path / BACKEND_FILE, "DiffSplat backend settings") if (path / BACKEND_FILE).is_file() else {}
        torch_dtype = getattr(torch, dtype or meta.get("dtype", "float32"))
        denoiser = cls.load_denoiser(path / cls.denoiser_dir)
        gsvae = load_gsvae(path / GSVAE_DIR, cls.layout_help)

        text_dtype = getattr(torch, meta.get("text_encoder_dtype", cls.default_text_encoder_dtype), None)
        if not isinstance(text_dtype, torch.dtype) or not text_dtype.is_floating_point:
            raise WeightsError(f"{path / BACKEND_FILE}: text_encoder_dtype must be a floating torch dtype such as "
                               f"'bfloat16', got {meta.get('text_encoder_dtype')!r}")

        def text() -> tuple[Any, Any]:
            return load_text_encoder(path, text_dtype, cls.text_encoder_kind)

        if torch_dtype != torch.float32:
            denoiser, gsvae = denoiser.to(torch_dtype), gsvae.to(torch_dtype)
        backend = cls(denoiser, gsvae, scheduler_config=meta.get("scheduler"),
                      geometry=meta.get("geometry"), tiny_decoder=bool(meta.get("tiny_decoder", False)),
                      text_encoder_loader=text, text_encoder_device=meta.get("text_encoder_device"))
        return backend.to(device)


def tiny_diffsplat(text_dim: int = 16, vocab: Sequence[str] = (), seed: int = 0, sample_size: int = 4,
                   num_views: int = 4, **geometry: Any) -> DiffSplatBackend:
    """A small randomly initialised DiffSplat from the same classes (tests, smoke runs): a 1-layer
    transformer on ``sample_size``² latents, a 2-level GSVAE (splatter images of 2 * sample_size) and a
    1-layer T5 with a word-level tokenizer over ``vocab``."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = MultiViewPixArtTransformer(
        num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS + PLUCKER_CHANNELS, out_channels=8,
        num_layers=1, cross_attention_dim=16, sample_size=sample_size, patch_size=2, caption_channels=text_dim,
        norm_type="ada_norm_single", use_additional_conditions=False)
    vae = {"block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 4,
           "latent_channels": LATENT_CHANNELS, "sample_size": 2 * sample_size, "scaling_factor": 0.13025}
    tiny = {"encoder_block_out_channels": [8], "decoder_block_out_channels": [8, 8], "num_encoder_blocks": [1],
            "num_decoder_blocks": [1, 1], "upsampling_scaling_factor": 2}
    gsvae = GSVAE(vae, tiny)
    tokenizer = hf_word_tokenizer(vocab, eos="</s>")  # T5 appends EOS
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2, pad_token_id=0, eos_token_id=2)).eval().requires_grad_(False)
    return DiffSplatBackend(transformer.eval().requires_grad_(False), gsvae, encoder, tokenizer,
                            geometry=tiny_geometry(num_views, sample_size, geometry))


def tiny_geometry(num_views: int, sample_size: int, geometry: dict[str, Any]) -> dict[str, Any]:
    """Input cameras for a tiny model: ``num_views`` evenly spaced azimuths, splatter images of
    ``8 * sample_size`` pixels, then the caller's overrides."""
    return {"num_views": num_views, "azimuths_deg": [360.0 * i / num_views for i in range(num_views)],
            "input_res": 8 * sample_size, **geometry}


#: the paper's sampling: 20-step first-order SDE-DPM-Solver++, CFG 5 (module docstring)
SAMPLER_DEFAULTS = {"kind": "sde-dpmsolver++", "num_steps": 20, "eta": 1.0, "guidance_scale": 5.0}


register_backend(DiffSplatBackend.name, sampler_defaults=SAMPLER_DEFAULTS)(DiffSplatBackend.load)


__all__ = ["DiffSplatBackend", "tiny_diffsplat"]
