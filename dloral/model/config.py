"""The model's settings as plain dataclasses: what the [model] table of a training config and
the upscale options hold, checked on construction. No torch here, so a config is read and
checked in a fraction of a second; the modules that build the model import these.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from dloral.config import build

PROFILES = ("tiny", "sd21")  # backbone profiles (dloral.model.backbone)
COLOR_FIXES = ("adain", "wavelet", "none")  # dloral.model.colorfix


CFR_VARIANTS = ("full", "no_gate", "off")
SPYNET_SOURCES = ("auto", "pretrained", "random")


@dataclass
class CFRConfig:
    variant: str = "full"
    topk: int | None = None  # None: every key position (the released code); k: the paper's top-k
    heads: int = 9
    embed_dim: int = 64
    temperature: float = 3000.0
    latent_channels: int = 4
    max_block_elems: int = 2**23  # similarity entries computed at once (memory bound)
    spynet: str = "auto"  # pretrained | random | auto (pretrained for sd21 with real weights)
    spynet_path: str | None = None  # the SPyNet file or its folder; else $DLORAL_SPYNET_WEIGHTS

    def __post_init__(self):
        if self.variant not in CFR_VARIANTS:
            raise ValueError(f"cfr.variant must be one of {CFR_VARIANTS}; got {self.variant!r}")
        if self.spynet not in SPYNET_SOURCES:
            raise ValueError(f"cfr.spynet must be one of {SPYNET_SOURCES}; got {self.spynet!r}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"cfr.topk must be a positive integer or None; got {self.topk}")


ADAPTERS = ("consistency", "detail")
REFERENCE_PATTERNS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
    "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip


@dataclass
class LoRAConfig:
    rank: int = 4
    alpha: float = 8.0
    targets: list[str] | None = None  # explicit module names; None: the reference's rule
    patterns: list[str] = field(default_factory=lambda: list(REFERENCE_PATTERNS))

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {self.rank}")


STAGES = ("consistency", "detail", "inference")
CONV_IN_BIASES = ("pretrained", "random")
TINY_INITS = ("pretrained", "random")  # dloral.model.backbone.build_tiny


@dataclass
class DLoRALConfig:
    profile: str = "tiny"
    random_init: bool = False  # sd21 only: full-size architecture with random weights
    sd21_path: str | None = None
    seed: int = 0  # initialisation of everything built at random (tiny backbone, CFR, LoRA A)
    timestep: int = 1  # the reference's fixed one-step timestep
    train_conv_in: bool = True  # the reference trains the widened conv_in in both stages
    conv_in_bias: str = "pretrained"  # or random: the new conv's own init, as the reference
    # tiny only. pretrained: the VAE trained on the embedded training clips (`dloral-exp data
    # prepare`), a UNet and CFR whose one step starts as the identity; random: all random-init
    tiny_init: str = "pretrained"
    tiny_vae_path: str | None = None  # that VAE file or its folder; None: $DLORAL_TINY_VAE,
    # then the embedded data folder ($DLORAL_DATA_DIR, default data/embedded)
    cfr: CFRConfig = field(default_factory=CFRConfig)
    consistency: LoRAConfig = field(default_factory=LoRAConfig)
    detail: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}; got {self.profile!r}")
        if self.random_init and self.profile != "sd21":
            raise ValueError('random_init is for the sd21 profile (tiny: tiny_init = "random")')
        if self.tiny_init not in TINY_INITS:
            raise ValueError(f"tiny_init must be one of {TINY_INITS}; got {self.tiny_init!r}")
        if self.conv_in_bias not in CONV_IN_BIASES:
            raise ValueError(
                f"conv_in_bias must be one of {CONV_IN_BIASES}; got {self.conv_in_bias!r}"
            )

    def pretrained_spynet(self) -> bool:
        """Whether SPyNet loads BasicVSR's weights (`cfr.spynet`; `auto`: for sd21 with real
        weights, not for tiny or sd21 random_init). With CFR off training still uses SPyNet
        (the temporal loss warps the GT with its flow); inference does not (see
        dloral.upscale._build)."""
        if self.cfr.spynet == "auto":
            return self.profile == "sd21" and not self.random_init
        return self.cfr.spynet == "pretrained"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DLoRALConfig:
        """Typed construction of the [model] table; missing keys take their defaults."""
        return build(cls, data, "model")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# The VAE's tiling (UpscaleOptions.tile). None, the default, is the reference's tiled VAE
# (src/my_utils/vaehook.py, dloral.model.vae_tiles): a frame above a tile plus twice its padding
# is cut into tiles that run the encoder or decoder in step, sharing every GroupNorm's
# statistics; test_DLoRAL.py's tiles are 1024 pixels for the encoder (padding 32: frames above
# 1088 pixels) and 224 latent positions for the decoder (padding 11: outputs above 1968 pixels).
# A number is diffusers' tiling (blended tiles, each normalised on its own), 0 the whole frame.
VAE_ENCODER_TILE = 1024  # the reference's --vae_encoder_tiled_size, pixels
VAE_DECODER_TILE = 224  # the reference's --vae_decoder_tiled_size, latent positions
VAE_TILES_WAIT = ("auto", "device", "host")  # UpscaleOptions.vae_tiles_wait


def vae_tile_setting(tile: int | None) -> int | str:
    """The `tile` option as a record states it."""
    if tile is None:
        return "the reference's tiled VAE (tiles in step, shared GroupNorm)"
    return tile


FIRST_FRAME = ("self", "skip")
SIZE_TO_8 = ("pad", "lanczos")
PREVIOUS = ("carry", "reencode")
UPSAMPLE_ON = ("device", "host")


@dataclass
class UpscaleOptions:
    scale: int = 4
    color_fix: str = "adain"  # the reference's default
    batch_size: int = 4  # frames encoded/restored/decoded together
    # None: the reference's tiled VAE, with tiles of vae_encoder_tile pixels (encoder) and
    # vae_decoder_tile latent positions (decoder); N: diffusers' tiles of N output pixels (a
    # multiple of 32), each normalised on its own, where a side exceeds N; 0: never tiled
    tile: int | None = None
    vae_encoder_tile: int = VAE_ENCODER_TILE
    vae_decoder_tile: int = VAE_DECODER_TILE
    # where the reference's VAE tiles wait between GroupNorm steps: device (no copies), host
    # (one tile on the device at a time, the reference's way), auto (the device unless a batch
    # would not fit there: dloral.model.memory.where_vae_tiles_wait). The same frames either way
    vae_tiles_wait: str = "auto"
    process_size: int = 512  # LQ whose short side is below process_size // scale is enlarged first
    sample_latent: bool = True  # draw from the VAE posterior as the reference does
    seed: int = 0
    latent_tile: int = 96  # CFR + UNet on tiles above this many latent pixels squared; 0: never
    latent_overlap: int = 32  # overlap of neighbouring latent tiles (the reference's 32)
    tile_batch: int = 1  # latent tiles restored per CFR + UNet call (stacked along the batch)
    first_frame: str = "self"  # self: frame 0 paired with itself; skip: no output for frame 0
    size_to_8: str = "pad"  # pad: replicate-pad to a multiple of 8; lanczos: the reference
    # carry: each frame is VAE-encoded once, its latent carried to the next pair; reencode: the
    # previous frame is encoded again for every pair (the reference's test script)
    previous: str = "carry"
    channels_last: bool = False  # UNet and VAE weights in channels_last memory format
    # CUDA: copy each batch's output to pinned host memory without waiting, delivering it after
    # the next batch is queued (one batch later); no effect on CPU, where outputs are on the host
    overlap_copy: bool = False
    # device: the LQ batch goes to the device and is upsampled there (PIL's kernel as matrix
    # products on CUDA); host: PIL upsamples on the host and the 4x frames are copied over (the
    # reference's test script). The same on CPU, where both are PIL.
    upsample_on: str = "device"

    def __post_init__(self):
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1; got {self.scale}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {COLOR_FIXES}; got {self.color_fix!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.tile and (self.tile < 64 or self.tile % 32):
            raise ValueError(
                f"tile must be 0 or a multiple of 32 >= 64 (diffusers' VAE tiling blends "
                f"tiles of a multiple of 4 latent positions); got {self.tile}"
            )
        if self.vae_encoder_tile < 64 or self.vae_encoder_tile % 8:
            # the tiles are shrunk to an even share rounded up to a multiple of 32, 16 or 8 that
            # stays within this size: a multiple of 8 keeps every tile edge on the latent grid
            # (the reference's own hook fails on other sizes)
            raise ValueError(
                f"vae_encoder_tile must be a multiple of 8 >= 64 (pixels); "
                f"got {self.vae_encoder_tile}"
            )
        if self.vae_tiles_wait not in VAE_TILES_WAIT:
            raise ValueError(
                f"vae_tiles_wait must be one of {VAE_TILES_WAIT}; got {self.vae_tiles_wait!r}"
            )
        if self.vae_decoder_tile < 8:
            raise ValueError(
                f"vae_decoder_tile must be >= 8 (latent positions); got {self.vae_decoder_tile}"
            )
        if self.tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1; got {self.tile_batch}")
        if self.latent_tile < 0:
            raise ValueError(f"latent_tile must be >= 0 (0: no tiling); got {self.latent_tile}")
        if self.latent_tile and not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError(
                f"latent_overlap must be in [0, latent_tile={self.latent_tile}); "
                f"got {self.latent_overlap}"
            )
        if self.first_frame not in FIRST_FRAME:
            raise ValueError(f"first_frame must be one of {FIRST_FRAME}; got {self.first_frame!r}")
        if self.size_to_8 not in SIZE_TO_8:
            raise ValueError(f"size_to_8 must be one of {SIZE_TO_8}; got {self.size_to_8!r}")
        if self.previous not in PREVIOUS:
            raise ValueError(f"previous must be one of {PREVIOUS}; got {self.previous!r}")
        if self.upsample_on not in UPSAMPLE_ON:
            raise ValueError(f"upsample_on must be one of {UPSAMPLE_ON}; got {self.upsample_on!r}")
