"""``diffsplat_sd15``: DiffSplat's text-to-3D model on Stable Diffusion 1.5, the paper's second base model.

The same object representation as :mod:`r2d3.backends.diffsplat` (four splatter images from the fixed input
cameras, Gaussians by depth unprojection; shared code), with SD1.5's pieces in place of PixArt-Σ's:

* **Multi-view UNet** (:class:`~r2d3.backends.diffsplat_modules.MultiViewUNet`): SD1.5's
  ``UNet2DConditionModel`` with cross-view self-attention in every transformer block. Its input is the
  4-channel view latent with the 6-channel Plücker rays (``conv_in`` widened to 10 channels) and its output
  the 4-channel epsilon prediction, on 32 x 32 latents of the 256 x 256 splatter images.
* **GSVAE**: SD1.5's ``AutoencoderKL`` (scaling factor 0.18215) with 12-channel input and output, and its
  distilled tiny decoder (DiffSplat's ``gsvae_gobj265k_sd`` release).
* **Text**: SD1.5's CLIP ViT-L/14 text model, last hidden state of the prompt padded to 77 tokens with no
  attention mask (every position is attended to, as SD1.5 and DiffSplat's SD pipeline do). CLIP's tokenizer
  lowercases by itself, so prompts are passed as given.

Schedule and sampler, as DiffSplat trains and samples this model: SD1.5's scaled-linear schedule with its
"common tricks" (trailing timestep spacing, betas rescaled to zero terminal SNR), epsilon prediction, and
20-step SDE-DPM-Solver++ at CFG 7.5 with the empty negative prompt. The official Nabla-R2D3 code covers only
the PixArt-Σ model; the alignment settings of ``cluster/configs/diffsplat_sd15_aesthetic.yaml`` carry the
PixArt-Σ setup over (docs/fidelity.md).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from r2d3.backends.base import register_backend
from r2d3.backends.diffsplat import DiffSplatBackend, tiny_geometry
from r2d3.backends.diffsplat_modules import (GSVAE, LATENT_CHANNELS, PLUCKER_CHANNELS, SD15_SCHEDULER_CONFIG,
                                             MultiViewUNet)
from r2d3.backends.diffsplat_weights import SD15_LAYOUT_HELP, UNET_DIR, load_unet
from r2d3.text import PromptEmbeds, hf_word_tokenizer, module_fingerprint

#: PEFT targets: the transformer blocks' attention and feed-forward layers, their in/out projections and the
#: timestep embedding (the PixArt-Σ setup's choice carried over to the UNet; its convolutions stay frozen)
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                       "linear_1", "linear_2"]


class DiffSplatSD15Backend(DiffSplatBackend):
    """DiffSplat-SD1.5 behind the backend protocol (registry name ``diffsplat_sd15``); layout in
    :data:`~r2d3.backends.diffsplat_weights.SD15_LAYOUT_HELP`."""

    name = "diffsplat_sd15"
    lora_target_modules = LORA_TARGET_MODULES
    denoiser_dir = UNET_DIR
    load_denoiser = staticmethod(load_unet)
    text_encoder_kind = "clip"
    default_text_encoder_dtype = "float32"  # CLIP-L is 123 M parameters; SD1.5 runs it in full precision
    default_scheduler_config = SD15_SCHEDULER_CONFIG
    layout_help = SD15_LAYOUT_HELP

    def encoder_fingerprint(self) -> str:
        return module_fingerprint(self.text_encoder)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """CLIP's last hidden state over the prompt padded to the tokenizer's length (77), no attention mask."""
        encoder, tokenizer = self._text()
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(encoder.device)
        tokens = encoder(ids)[0].float()
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=self.device)
        return PromptEmbeds(tokens.to(self.device), mask)

    def _network(self, inputs: Tensor, tokens: Tensor, mask: Tensor, t: Tensor) -> Tensor:
        if not bool(mask.all()):  # SD1.5 attends to every position; a masked cache row is not its embedding
            raise ValueError("DiffSplat-SD1.5 takes unmasked CLIP embeddings (77 tokens, all attended to); got "
                             "embeddings with masked positions")
        return self.denoiser(inputs, t, encoder_hidden_states=tokens, return_dict=False)[0]


def tiny_diffsplat_sd15(text_dim: int = 16, vocab: Sequence[str] = (), seed: int = 0, sample_size: int = 4,
                        num_views: int = 4, max_tokens: int = 12, **geometry: Any) -> DiffSplatSD15Backend:
    """A small randomly initialised DiffSplat-SD1.5 from the same classes (tests, smoke runs): a 2-level UNet
    with one cross-attention level on ``sample_size``² latents, a 2-level GSVAE with SD1.5's scaling factor and
    a 1-layer CLIP text model with a word-level tokenizer over ``vocab`` (CLIP's start/end tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = MultiViewUNet(
        sample_size=sample_size, in_channels=LATENT_CHANNELS + PLUCKER_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=text_dim,
        attention_head_dim=4)
    vae = {"block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 4,
           "latent_channels": LATENT_CHANNELS, "sample_size": 2 * sample_size, "scaling_factor": 0.18215}
    tiny = {"encoder_block_out_channels": [8], "decoder_block_out_channels": [8, 8], "num_encoder_blocks": [1],
            "num_decoder_blocks": [1, 1], "upsampling_scaling_factor": 2}
    tokenizer = hf_word_tokenizer(vocab, bos="<|startoftext|>", eos="<|endoftext|>", model_max_length=max_tokens)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_tokens, pad_token_id=0, bos_token_id=2,
        eos_token_id=3)).eval().requires_grad_(False)
    return DiffSplatSD15Backend(unet.eval().requires_grad_(False), GSVAE(vae, tiny), encoder, tokenizer,
                                geometry=tiny_geometry(num_views, sample_size, geometry))


#: DiffSplat's own SD1.5 sampling: 20-step SDE-DPM-Solver++, CFG 7.5 (module docstring)
SAMPLER_DEFAULTS = {"kind": "sde-dpmsolver++", "num_steps": 20, "eta": 1.0, "guidance_scale": 7.5}


register_backend(DiffSplatSD15Backend.name, sampler_defaults=SAMPLER_DEFAULTS)(DiffSplatSD15Backend.load)


__all__ = ["DiffSplatSD15Backend", "tiny_diffsplat_sd15"]
