"""The DLoRAL restorer: SD-2.1 UNet with an 8-channel conv_in, CFR and two LoRAs, one step.

For frame t with previous frame t-1 (the reference's pair), in latent space:
    aligned_prev = warp(z[t-1], flow(t -> t-1))              # CFR step 1
    fused        = CFR(z[t], aligned_prev)                    # CFR retrieval + gate
    eps          = UNet(cat[aligned_prev, fused], t=1, text)  # one step, both LoRAs active
    z_hat[t]     = fused - eps
With CFR `off` the UNet sees cat[z[t], z[t]]: no information crosses frames. The pretrained
`tiny` profile starts with CFR's output projection and the UNet's conv_out at zero, so
z_hat[t] = z[t] until training moves them (dloral.model.backbone).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dloral.devices import to_device
from dloral.model import lora, vae_tiles
from dloral.model.backbone import TINY_PRETRAINED, Backbone, build_backbone
from dloral.model.cfr import CrossFrameRetrieval
from dloral.model.config import ADAPTERS, CONV_IN_BIASES, STAGES, DLoRALConfig
from dloral.model.spynet import ZERO_FLOW, load_spynet_file, zero_flow
from dloral.model.vae_tiles import VAETiles
from dloral.weights import SPYNET_FILE, locate_spynet, sha256

log = logging.getLogger(__name__)


def widen_conv_in(unet: nn.Module, frames: int = 2, bias: str = "pretrained") -> None:
    """conv_in takes [previous, current] latents: the pretrained kernel copied to both halves.

    bias "pretrained" keeps the pretrained conv_in bias; "random" keeps the new Conv2d's default
    init (uniform in +-1/sqrt(fan_in), from the global torch RNG), as the reference does."""
    if bias not in CONV_IN_BIASES:
        raise ValueError(f"bias must be one of {CONV_IN_BIASES}; got {bias!r}")
    old = unet.conv_in
    new = nn.Conv2d(
        old.in_channels * frames, old.out_channels, old.kernel_size, old.stride, old.padding
    )
    with torch.no_grad():
        new.weight.copy_(torch.cat([old.weight] * frames, dim=1))
        if bias == "pretrained":
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)


class DLoRAL(nn.Module):
    """UNet (+C-LoRA, D-LoRA), frozen VAE and text encoder, and the CFR module."""

    def __init__(
        self,
        cfg: DLoRALConfig | None = None,
        backbone: Backbone | None = None,
        *,
        load_spynet: bool = True,
    ):
        """load_spynet=False leaves SPyNet at its random init whatever `cfg.cfr.spynet` says:
        for loaders of a checkpoint that holds SPyNet (they set `spynet_weights` themselves)."""
        super().__init__()
        self.cfg = cfg = cfg or DLoRALConfig()
        # Found before the backbone is built: a missing file fails fast.
        spynet_file = (
            locate_spynet(cfg.cfr.spynet_path) if load_spynet and cfg.pretrained_spynet() else None
        )
        bb = backbone or build_backbone(
            cfg.profile, cfg.sd21_path, cfg.random_init, cfg.seed, cfg.tiny_init, cfg.tiny_vae_path
        )
        self.profile, self.weights = bb.profile, bb.weights
        self.vae_weights, self.vae_sha256 = bb.vae_weights, bb.vae_sha256
        self.tokenizer = bb.tokenizer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            widen_conv_in(bb.unet, bias=cfg.conv_in_bias)
            self.lora_targets = lora.add_adapters(
                bb.unet, {"consistency": cfg.consistency, "detail": cfg.detail}
            )
            self.cfr = CrossFrameRetrieval(cfg.cfr)
        if bb.weights == TINY_PRETRAINED:  # CFR adds nothing yet: the one step is the identity
            nn.init.zeros_(self.cfr.cross_attn_module.proj_out.weight)
            nn.init.zeros_(self.cfr.cross_attn_module.proj_out.bias)
        # Where SPyNet's weights came from: "random-init", "zero-flow", or a file (and its sha256).
        self.spynet_weights, self.spynet_sha256 = "random-init", None
        if bb.weights == TINY_PRETRAINED and cfg.cfr.spynet == "auto":
            # The tiny profile has no trained SPyNet: a random one would hand CFR a previous
            # frame moved by random flow. With zero flow CFR sees it where it was (no alignment).
            zero_flow(self.cfr.spynet)
            self.spynet_weights = ZERO_FLOW
        if spynet_file is not None:
            load_spynet_file(self.cfr.spynet, spynet_file)
            self.spynet_weights, self.spynet_sha256 = str(spynet_file), sha256(spynet_file)
            published = SPYNET_FILE.rsplit("-", 1)[1].removesuffix(".pth")  # sha256 prefix
            if spynet_file.name == SPYNET_FILE and not self.spynet_sha256.startswith(published):
                log.warning(
                    "SPyNet %s: sha256 %s is not the published file's (%s...)",
                    spynet_file,
                    self.spynet_sha256,
                    published,
                )
            log.info("SPyNet: %s", spynet_file)
        self.unet, self.vae, self.text_encoder = bb.unet, bb.vae, bb.text_encoder
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.register_buffer(
            "timestep", torch.tensor([cfg.timestep], dtype=torch.long), persistent=False
        )
        self.set_stage("inference")

    # ----- stages and adapters ------------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        """Which parameters train. As the reference's training loop: both LoRAs are active in
        every stage; `consistency` trains C-LoRA and CFR (SPyNet stays frozen), `detail` trains
        D-LoRA only; the widened conv_in trains in both (`train_conv_in`). `inference`: none."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}; got {stage!r}")
        if lora.is_merged(self.unet) and stage != "inference":
            raise RuntimeError("LoRAs are merged into the UNet; unmerge before training")
        self.stage = stage
        self.requires_grad_(False)
        lora.set_active(self.unet, ADAPTERS)
        if stage == "consistency":
            lora.set_trainable(self.unet, "consistency", True)
            self.cfr.cross_attn_module.requires_grad_(True)
        elif stage == "detail":
            lora.set_trainable(self.unet, "detail", True)
        if stage != "inference" and self.cfg.train_conv_in:
            self.unet.conv_in.base_layer.requires_grad_(True)
        self.train(stage != "inference")
        self.vae.eval()
        self.text_encoder.eval()

    def merge_lora(self) -> None:
        """Fold both LoRAs into the UNet for inference; output unchanged, cost of a plain UNet."""
        self.set_stage("inference")
        lora.merge(self.unet, ADAPTERS)

    def unmerge_lora(self) -> None:
        lora.unmerge(self.unet)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ----- the method's steps -----------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, texts: list[str]) -> torch.Tensor:
        """Text -> (B, 77, D) embeddings; done once per clip by the pipeline."""
        ids = self.tokenizer(texts).to(self.text_encoder.device)
        return self.text_encoder(ids)[0].to(self.unet.dtype)

    def encode(
        self,
        frames: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        sample: bool = True,
        tiles: VAETiles | None = None,
    ) -> torch.Tensor:
        """frames (N, 3, H, W) in [0, 1] -> scaled latents (N, 4, H/8, W/8).

        `tiles`: the reference's tiled VAE (dloral.model.vae_tiles; inference only) for frames
        above its encoder tile; None: the VAE as it is set (whole, or diffusers' tiling).

        sample=True draws from the posterior as the reference does, seeded by `generator`: one
        generator for the batch, or one per frame (each frame's noise then depends on its own
        generator only, not on the batch it came in)."""
        x = (frames * 2 - 1).to(self.vae.dtype)
        dist = vae_tiles.encode(self.vae, x, tiles) if tiles else self.vae.encode(x).latent_dist
        if sample:
            shape, dtype = dist.mean.shape, dist.mean.dtype
            if isinstance(generator, Sequence):
                if len(generator) != shape[0]:
                    raise ValueError(f"{len(generator)} generators for {shape[0]} frames")
                noise = torch.stack(
                    [
                        torch.randn(shape[1:], generator=g, dtype=dtype, device=g.device)
                        for g in generator
                    ]
                )
            else:
                noise = torch.randn(
                    shape,
                    generator=generator,
                    dtype=dtype,
                    device=generator.device if generator is not None else "cpu",
                )
            # drawn on the host (the same noise on any device), copied without a sync
            z = dist.mean + dist.std * to_device(noise, dist.mean.device)
        else:
            z = dist.mean
        return z * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor, tiles: VAETiles | None = None) -> torch.Tensor:
        """Scaled latents -> frames in [0, 1]; `tiles` as in `encode`."""
        z = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        x = vae_tiles.decode(self.vae, z, tiles) if tiles else self.vae.decode(z).sample
        return (x.clamp(-1, 1) + 1) / 2

    def restore_latent(
        self,
        current: torch.Tensor,
        previous: torch.Tensor,
        current_lq: torch.Tensor,
        previous_lq: torch.Tensor,
        prompt_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """One diffusion step for a batch of (previous, current) pairs -> restored latents.

        current/previous: (B, 4, h, w) latents; *_lq: (B, 3, 8h, 8w) upsampled LQ in [0, 1]."""
        if self.cfg.cfr.variant == "off":
            fused, first = current, current
        else:
            fused, first = self.cfr(current, previous, current_lq, previous_lq)
        if prompt_embeds.shape[0] != current.shape[0]:
            prompt_embeds = prompt_embeds.expand(current.shape[0], -1, -1)
        eps = self.unet(
            torch.cat([first, fused], dim=1),
            self.timestep.expand(current.shape[0]),
            encoder_hidden_states=prompt_embeds,
        ).sample
        return fused - eps

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """restore_latent, the computation that trains: what a DistributedDataParallel wrapper
        calls, so that the backward averages its gradients over the processes."""
        return self.restore_latent(*args, **kwargs)

    def describe(self) -> dict[str, Any]:
        """What this model is made of, for provenance in results."""
        return {
            "profile": self.profile,
            "backbone_weights": self.weights,
            **({"vae_weights": self.vae_weights} if self.vae_weights else {}),
            **({"vae_sha256": self.vae_sha256} if self.vae_sha256 else {}),
            "cfr_variant": self.cfg.cfr.variant,
            "cfr_topk": self.cfg.cfr.topk,
            "spynet": self.spynet_weights,
            "spynet_sha256": self.spynet_sha256,
            "lora_rank": {a: getattr(self.cfg, a).rank for a in ADAPTERS},
            "timestep": self.cfg.timestep,
        }
