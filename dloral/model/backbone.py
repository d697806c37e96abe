"""Backbone profiles behind one builder: `tiny` (SD-2.1-shaped, small) and `sd21`.

`tiny` starts where a real run starts (`tiny_init = "pretrained"`): its VAE is the autoencoder
trained on the embedded training clips (dloral.model.tiny_vae, found by
dloral.weights.locate_tiny_vae), and its UNet's output layer is zero, so the one step returns
the encoded input, as SD 2.1's one step nearly does. `tiny_init = "random"` is every weight
random (recorded as "random-init"), for tests of the code path.

`sd21` is Stable Diffusion 2.1-base in diffusers layout, from a local folder or the Hugging Face
cache, never downloaded at run time. `sd21` with `random_init=True` builds the full-size
architecture with random weights for latency/memory benchmarks; such outputs are labelled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dloral.model.config import PROFILES, TINY_INITS
from dloral.weights import WeightsMissing, locate_tiny_vae, sha256

log = logging.getLogger(__name__)

SD21_REPO = "stabilityai/stable-diffusion-2-1-base"
SD21_ENV = "DLORAL_SD21_PATH"
SD21_FILES = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
)

# Structure of SD 2.1-base (diffusers configs). `tiny` keeps the block types, VAE factor 8 and
# 4 latent channels, with small widths and one layer per block.
SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
)
SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
SD21_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
    bos_token_id=49406,
    eos_token_id=49407,
)
TINY_UNET = {
    **SD21_UNET,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "attention_head_dim": (2, 2, 4, 4),
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
TINY_VAE = {
    **SD21_VAE,
    "block_out_channels": (16, 16, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 256,
}
TINY_TEXT = {
    **SD21_TEXT,
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
    "bos_token_id": 998,
    "eos_token_id": 999,
}


TINY_VAE_FORMAT = "dloral-tiny-vae/1"  # the file dloral.model.tiny_vae trains and saves
# The file's metadata is this one key holding sorted JSON (format, config, info): safetensors
# writes a metadata map in no fixed order, and the same VAE must be the same bytes.
TINY_VAE_META = "dloral"


class BackboneNotFound(WeightsMissing):
    """Weights for a profile are not on this machine; the message says where to put them."""


class HashTokenizer:
    """Word-hash tokenizer for random-init text encoders (no vocabulary files offline).

    Deterministic: the same text gives the same ids on every machine. Only for `tiny` and
    `--random-init`; real SD 2.1 uses its CLIP tokenizer.
    """

    def __init__(self, vocab_size: int, model_max_length: int = 77):
        self.vocab_size = vocab_size
        self.model_max_length = model_max_length
        self.bos, self.eos = vocab_size - 2, vocab_size - 1

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            words = re.findall(r"[a-z0-9]+", text.lower())
            ids = [1 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words]
            ids = [self.bos, *ids[: self.model_max_length - 2], self.eos]
            rows.append(ids + [self.eos] * (self.model_max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class ClipTokenizer:
    """SD 2.1's CLIP tokenizer, padded to max length as the reference does."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tok(
            texts,
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids


@dataclass
class Backbone:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: HashTokenizer | ClipTokenizer
    profile: str
    # what was actually loaded: "random-init", "tiny-pretrained-vae" (tiny: the VAE from
    # vae_weights, the rest random with a UNet that starts as the identity), or the folder of
    # the weights
    weights: str
    vae_weights: str | None = None  # tiny: the VAE file loaded, and its sha256
    vae_sha256: str | None = None

    @property
    def random_init(self) -> bool:
        return self.weights == "random-init"


TINY_PRETRAINED = "tiny-pretrained-vae"


def new_tiny_vae(config: dict | None = None) -> nn.Module:
    """An untrained VAE of `config` (default TINY_VAE; the global torch RNG draws it)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or TINY_VAE))


def load_tiny_vae(file: str | os.PathLike) -> nn.Module:
    """The tiny VAE saved by `save_tiny_vae`; a file that is not one is a ValueError naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(file)
    how = "`dloral-exp data prepare` rebuilds it when it differs from the data's manifest"
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(file)
    except Exception as err:  # a truncated or foreign file: safetensors' own error types vary
        raise ValueError(f"{file}: not a readable tiny VAE file ({err}); {how}") from err
    try:
        fields = json.loads(meta[TINY_VAE_META]) if TINY_VAE_META in meta else meta
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: unreadable {TINY_VAE_META!r} metadata ({err}); {how}") from err
    if fields.get("format") != TINY_VAE_FORMAT:
        raise ValueError(
            f"{file}: format {fields.get('format')!r}, expected {TINY_VAE_FORMAT!r}; {how}"
        )
    config = fields["config"]
    if set(config) != set(TINY_VAE):
        raise ValueError(f"{file}: config keys {sorted(config)} are not the tiny VAE's; {how}")
    vae = new_tiny_vae(config)
    try:
        vae.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{file}: weights do not fit the tiny VAE ({err}); {how}") from err
    return vae.eval()


def start_as_identity(unet: nn.Module) -> None:
    """Zero the UNet's output conv: it predicts no noise, so the one step z - eps returns z."""
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()


def build_tiny(
    seed: int = 0, init: str = "pretrained", tiny_vae_path: str | os.PathLike | None = None
) -> Backbone:
    """The tiny backbone: random weights from `seed`, then (init "pretrained") the trained VAE
    and an identity one step. The VAE file is found before anything is built."""
    if init not in TINY_INITS:
        raise ValueError(f"tiny_init must be one of {TINY_INITS}; got {init!r}")
    file = locate_tiny_vae(tiny_vae_path) if init == "pretrained" else None
    bb = build_random(TINY_UNET, TINY_VAE, TINY_TEXT, "tiny", seed)
    if file is None:
        return bb
    bb.vae = load_tiny_vae(file)
    start_as_identity(bb.unet)
    bb.weights, bb.vae_weights, bb.vae_sha256 = TINY_PRETRAINED, str(file), sha256(file)
    log.info("tiny VAE: %s", file)
    return bb


def _random_text_encoder(cfg: dict) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**cfg))


def build_random(unet_cfg: dict, vae_cfg: dict, text_cfg: dict, profile: str, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = _random_text_encoder(text_cfg)
    tok = HashTokenizer(text_cfg["vocab_size"], text_cfg["max_position_embeddings"])
    return Backbone(unet, vae, text, tok, profile, "random-init")


def locate_sd21(path: str | os.PathLike | None = None) -> Path:
    """Find SD 2.1-base: explicit path, then $DLORAL_SD21_PATH, then the Hugging Face cache."""
    looked = []
    for candidate, origin in ((path, "--sd21-path"), (os.environ.get(SD21_ENV), f"${SD21_ENV}")):
        if candidate:
            folder = Path(candidate).expanduser()
            missing = [f for f in SD21_FILES if not (folder / f).is_file()]
            if not missing:
                return folder
            looked.append(f"{folder} (from {origin}): missing {', '.join(missing)}")
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(SD21_REPO, local_files_only=True))
        missing = [f for f in SD21_FILES if not (folder / f).is_file()]
        if not missing:
            return folder
        looked.append(f"{folder} (Hugging Face cache): missing {', '.join(missing)}")
    except Exception:  # LocalEntryNotFoundError and friends: not in the cache
        looked.append(
            f"{constants.HF_HUB_CACHE}/models--{SD21_REPO.replace('/', '--')} "
            "(Hugging Face cache, set by $HF_HOME / $HF_HUB_CACHE): not found"
        )
    raise BackboneNotFound(
        "Stable Diffusion 2.1-base weights not found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + f"\nPut a diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/) there, "
        f"e.g. `huggingface-cli download {SD21_REPO}` on a connected machine and copy the cache, "
        f"or set {SD21_ENV}=/path/to/stable-diffusion-2-1-base. "
        "For latency/memory benchmarks only, `--random-init` builds the architecture "
        "without weights."
    )


def load_sd21(path: str | os.PathLike | None = None) -> Backbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = locate_sd21(path)
    log.info("loading SD 2.1-base from %s", folder)
    kw = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw)
    tok = ClipTokenizer(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw))
    return Backbone(unet, vae, text, tok, "sd21", str(folder))


def pretrained_unet(
    profile: str = "tiny",
    sd21_path: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    tiny_init: str = "pretrained",
) -> nn.Module:
    """The UNet alone, as `build_backbone(...).unet` (same weights), without loading the VAE and
    text encoder again: the frozen teacher that training distils from. (The pretrained tiny
    UNet predicts zero noise: a teacher with nothing to teach, so CSD is zero for tiny.)"""
    from diffusers import UNet2DConditionModel

    if profile == "sd21" and not random_init:
        return UNet2DConditionModel.from_pretrained(
            locate_sd21(sd21_path), subfolder="unet", local_files_only=True
        )
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # build_random creates the UNet first from this seed
        unet = UNet2DConditionModel(**(TINY_UNET if profile == "tiny" else SD21_UNET))
    if profile == "tiny" and tiny_init == "pretrained":
        start_as_identity(unet)
    return unet


def build_backbone(
    profile: str = "tiny",
    sd21_path: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    tiny_init: str = "pretrained",
    tiny_vae_path: str | os.PathLike | None = None,
) -> Backbone:
    """The one builder of UNet + VAE + text encoder for a profile."""
    if profile == "tiny":
        return build_tiny(seed, tiny_init, tiny_vae_path)
    if profile == "sd21":
        if random_init:
            log.warning(
                "sd21 --random-init: full-size architecture, RANDOM weights (benchmarks only)"
            )
            return build_random(SD21_UNET, SD21_VAE, SD21_TEXT, "sd21", seed)
        return load_sd21(sd21_path)
    raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
