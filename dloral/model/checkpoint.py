"""Checkpoints: our format (safetensors + JSON config) and the official DLoRAL `model.pkl`.

Our checkpoint is a folder holding `dloral.safetensors` (both LoRAs, the widened conv_in, CFR)
and `dloral_config.json` (the model config, the LoRA target lists, what backbone was used).

The official release is a `torch.save` dict (see `save_model` in the reference's
src/DLoRAL_model.py): ranks and target lists for six adapters
(`default_{encoder,decoder,others}_{quality,consistency}`; "quality" is the Detail-LoRA), the
whole UNet state dict with peft keys (`state_dict_unet`), and the CFR state dict
(`state_dict_bpp`). It holds no LoRA alpha: the reference's loader builds each adapter with
peft's default, 8 (OFFICIAL_LORA_ALPHA). It is loaded with `weights_only=True` and mapped key by
key; every key that does not map is reported.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dloral.atomic import atomic_write
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.model.lora import LoRAConfig, is_merged
from dloral.model.spynet import spynet_state

log = logging.getLogger(__name__)

WEIGHTS_FILE = "dloral.safetensors"
CONFIG_FILE = "dloral_config.json"
FORMAT = "dloral-checkpoint/1"
# a training run's layout: <run>/checkpoints/step-XXXXXX/ and the pointer file naming the last
RUN_CHECKPOINTS = "checkpoints"
LATEST = "latest"
OFFICIAL_SUFFIXES = (".pkl", ".pt", ".pth")  # a file with one of these is the official layout

OFFICIAL_LORA = {"quality": "detail", "consistency": "consistency"}
# The reference's loader rebuilds each adapter with `LoraConfig(r=rank, ...)` and no lora_alpha:
# peft's default (8 in the 0.9.0 it pins), so an adapter of the file runs at scale 8/rank.
OFFICIAL_LORA_ALPHA = 8.0
OFFICIAL_GROUPS = ("encoder", "decoder", "others")
# CFR_model modules that the reference builds but never uses in its forward pass.
OFFICIAL_UNUSED_CFR = (
    "feat_extract.", "weight_predict.", "weight_predict_final.", "reconstruction_feat.",
    "conv_hr.", "conv_last.",
)  # fmt: skip
OFFICIAL_USED_CFR = ("spynet.", "cross_attn_module.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and keys."""


@dataclass
class LoadReport:
    """What a load did with each key: nothing is dropped silently."""

    source: str
    missing: list[str] = field(default_factory=list)  # model keys the file did not provide
    unexpected: list[str] = field(default_factory=list)  # file keys with no place in the model
    ignored: list[str] = field(default_factory=list)  # file keys skipped on purpose (see reason)
    ignored_reason: str = ""

    @property
    def clean(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        parts = [f"{self.source}:"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} key(s) (e.g. {', '.join(keys[:3])})")
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored key(s): {self.ignored_reason}")
        return " ".join(parts) if len(parts) > 1 else f"{self.source}: all keys matched"


def _trained_state(model: DLoRAL) -> dict[str, torch.Tensor]:
    """The tensors training changes: LoRA A/B of both adapters, conv_in, CFR."""
    state = {}
    for name, tensor in model.unet.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name or name.startswith("conv_in.base_layer."):
            state[f"unet.{name}"] = tensor
    for name, tensor in model.cfr.state_dict().items():
        state[f"cfr.{name}"] = tensor
    return state


def _refuse_merged(model: DLoRAL, what: str) -> None:
    # Merged, the UNet's base weights (conv_in's, which a checkpoint keeps, among them) hold
    # both LoRAs already: a loader adding the adapters again would apply them twice.
    if is_merged(model.unet):
        raise CheckpointError(
            f"{what}: the model's LoRAs are merged into the UNet (merge_lora(), as for "
            "inference), so its base weights hold them already; call model.unmerge_lora() first"
        )


def save_checkpoint(model: DLoRAL, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `folder/dloral.safetensors` and `folder/dloral_config.json` atomically."""
    folder = Path(folder)
    _refuse_merged(model, str(folder))
    state = {k: v.detach().to("cpu").contiguous() for k, v in _trained_state(model).items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, {"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "model": model.cfg.to_dict(),
        "lora_targets": model.lora_targets,
        "backbone_weights": model.weights,
        "vae_weights": model.vae_weights,
        "vae_sha256": model.vae_sha256,
        "spynet_weights": model.spynet_weights,
        "spynet_sha256": model.spynet_sha256,
        **(extra or {}),
    }
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint `path` names. A checkpoint folder, its weights file or an official file
    is itself; a training run (`<run>`, `<run>/checkpoints` or `<run>/checkpoints/latest`)
    names the step folder its `latest` pointer names, the run's last finished checkpoint."""
    path = Path(path)
    if _is_official(path) or (path.is_dir() and (path / CONFIG_FILE).is_file()):
        return path
    if path.is_file() and path.name == LATEST:
        pointer = path
    elif path.is_dir() and (path / LATEST).is_file():
        pointer = path / LATEST
    elif path.is_dir() and path.name == RUN_CHECKPOINTS and not (path / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{path / LATEST}: no finished checkpoint: the run has none yet")
    elif path.is_dir() and (path / RUN_CHECKPOINTS).is_dir():
        pointer = path / RUN_CHECKPOINTS / LATEST
        if not pointer.is_file():
            raise CheckpointError(f"{pointer}: no finished checkpoint: the run has none yet")
    else:
        return path  # a checkpoint folder or file; _read_meta says what is missing
    try:
        folder = pointer.parent / pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pointer}: unreadable ({err})") from err
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{pointer}: no finished checkpoint: it names {folder}, which holds no {CONFIG_FILE}"
        )
    return folder


def _resolve(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        return path / WEIGHTS_FILE, path / CONFIG_FILE
    return path, path.with_name(CONFIG_FILE)


def _is_official(path: Path) -> bool:
    return path.suffix in OFFICIAL_SUFFIXES


def _read_meta(path: Path) -> tuple[Path, dict]:
    weights, config = _resolve(path)
    what = (
        f"a dloral checkpoint is a folder with {WEIGHTS_FILE} and {CONFIG_FILE}, a training run "
        "folder (its latest checkpoint), or an official model.pkl"
    )
    if path.is_file() and not config.is_file():
        raise CheckpointError(f"{path}: not a checkpoint, no {CONFIG_FILE} beside it ({what})")
    for f in (weights, config):
        if not f.is_file():
            raise CheckpointError(f"{f}: not found ({what})")
    try:
        meta = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{config}: unreadable ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{config}: format {found!r}, expected {FORMAT!r}")
    return weights, meta


def _stored_config(meta: dict, overrides: dict | None) -> DLoRALConfig:
    # A checkpoint from before tiny_init was trained on the all-random tiny backbone.
    model_cfg = {"tiny_init": "random", **meta["model"], **(overrides or {})}
    for name in ("consistency", "detail"):
        model_cfg[name] = {**model_cfg[name], "targets": meta["lora_targets"][name]}
    return DLoRALConfig.from_dict(model_cfg)


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint's weights: `dloral.safetensors` of a folder, or the file itself
    (an official model.pkl): what results record to say which weights made them."""
    from dloral.weights import sha256

    path = find_checkpoint(path)
    return sha256(path / WEIGHTS_FILE if path.is_dir() else path)


def checkpoint_config(path: str | os.PathLike, overrides: dict | None = None) -> DLoRALConfig:
    """The model config `load_checkpoint(path, overrides)` would build, read without loading
    any weights (to check which weight files that model needs before building it)."""
    path = find_checkpoint(path)
    if _is_official(path):
        overrides = dict(overrides or {})
        return DLoRALConfig.from_dict({**overrides, "profile": overrides.get("profile", "sd21")})
    return _stored_config(_read_meta(path)[1], overrides)


def load_checkpoint(
    path: str | os.PathLike, overrides: dict | None = None, strict: bool = True
) -> tuple[DLoRAL, LoadReport]:
    """Build the model a checkpoint describes and load it. `overrides` patch the stored config
    (e.g. {"sd21_path": ...}); strict=True raises on any missing or unexpected key. SPyNet
    comes from the checkpoint (no SPyNet file is needed). `path` as `find_checkpoint` takes it."""
    path = find_checkpoint(path)
    if _is_official(path):
        overrides = dict(overrides or {})
        return import_official(path, overrides.pop("profile", "sd21"), overrides, strict)
    weights, meta = _read_meta(path)
    model = DLoRAL(_stored_config(meta, overrides), load_spynet=False)
    trained_with = meta.get("vae_sha256")
    if trained_with and model.vae_sha256 != trained_with:
        raise CheckpointError(
            f"{path}: trained with the tiny VAE {meta.get('vae_weights')} (sha256 "
            f"{trained_with}), but {model.vae_weights} has sha256 {model.vae_sha256}: its LoRAs "
            "work in that VAE's latent space. Give that file as model.tiny_vae_path "
            "(overrides={'tiny_vae_path': ...}, `--set model.tiny_vae_path=...`)."
        )
    try:
        state = load_file(weights)
    except Exception as err:  # safetensors' errors: a truncated or foreign file
        raise CheckpointError(f"{weights}: unreadable ({type(err).__name__}: {err})") from err
    report = load_into(model, state, str(weights))
    if any(k.startswith("cfr.spynet.basic_module.") for k in report.missing):
        model.spynet_weights = "random-init"  # not in the file: the init stays
    else:
        model.spynet_weights = meta.get("spynet_weights") or f"unrecorded (from {weights})"
        model.spynet_sha256 = meta.get("spynet_sha256")
    if strict and not report.clean:
        raise CheckpointError(report.summary())
    return model, report


def load_into(model: DLoRAL, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Load a trained state (unet LoRA and CFR tensors) into `model`; what was missing or
    unexpected is in the report, a shape mismatch raises CheckpointError."""
    expected = _trained_state(model)
    report = LoadReport(source)
    report.missing = sorted(set(expected) - set(state))
    report.unexpected = sorted(set(state) - set(expected))
    bad_shape = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if bad_shape:
        raise CheckpointError(f"{source}: shape mismatch for {', '.join(sorted(bad_shape)[:5])}")
    unet = {k[5:]: v for k, v in state.items() if k.startswith("unet.") and k in expected}
    cfr = {k[4:]: v for k, v in state.items() if k.startswith("cfr.") and k in expected}
    model.unet.load_state_dict(unet, strict=False)
    model.cfr.load_state_dict(cfr, strict=False)
    return report


# ----- the official release ------------------------------------------------------------------
def _official_group(module: str) -> str:
    """Which of the reference's three adapters a module belongs to (its grep order)."""
    if "down_blocks" in module or "conv_in" in module:
        return "encoder"
    if "up_blocks" in module or "conv_out" in module:
        return "decoder"
    return "others"


_OFFICIAL_ADAPTER = re.compile(r"\.default_(encoder|decoder|others)_(quality|consistency)\.")


def import_official(
    path: str | os.PathLike,
    profile: str = "sd21",
    overrides: dict | None = None,
    strict: bool = False,
) -> tuple[DLoRAL, LoadReport]:
    """Load the official `model.pkl` (weights_only) into a DLoRAL model, reporting every key
    that does not map. The whole UNet is taken from the file, as the reference does."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: official DLoRAL checkpoint not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-weights objects
        raise CheckpointError(f"{path}: not loadable with weights_only=True ({err})") from err
    required = (
        ["state_dict_unet", "state_dict_bpp"]
        + [f"lora_rank_unet_{k}" for k in OFFICIAL_LORA]
        + [f"unet_lora_{g}_modules_{k}" for k in OFFICIAL_LORA for g in OFFICIAL_GROUPS]
    )
    missing_top = [k for k in required if k not in sd]
    if missing_top:
        raise CheckpointError(
            f"{path}: not an official DLoRAL checkpoint, missing {', '.join(missing_top)}"
        )
    lora_cfgs = {}
    for theirs, ours in OFFICIAL_LORA.items():
        targets = [m for g in OFFICIAL_GROUPS for m in sd[f"unet_lora_{g}_modules_{theirs}"]]
        lora_cfgs[ours] = LoRAConfig(
            rank=int(sd[f"lora_rank_unet_{theirs}"]), alpha=OFFICIAL_LORA_ALPHA, targets=targets
        )
    cfg = DLoRALConfig.from_dict({**(overrides or {}), "profile": profile})
    cfg.consistency, cfg.detail = lora_cfgs["consistency"], lora_cfgs["detail"]
    model = DLoRAL(cfg, load_spynet=False)  # the file holds the SPyNet the release used

    report = LoadReport(
        str(path),
        ignored_reason="CFR modules the reference builds but never "
        "uses (" + ", ".join(p.rstrip(".") for p in OFFICIAL_UNUSED_CFR) + ")",
    )
    unet_state = {}
    for key, tensor in sd["state_dict_unet"].items():
        mapped = _OFFICIAL_ADAPTER.sub(lambda m: f".{OFFICIAL_LORA[m.group(2)]}.", key)
        unet_state[mapped] = tensor
    model_unet = model.unet.state_dict()
    report.unexpected += [f"state_dict_unet.{k}" for k in unet_state if k not in model_unet]
    report.missing += [f"unet.{k}" for k in model_unet if k not in unet_state]
    _check_shapes(path, unet_state, model_unet)
    model.unet.load_state_dict(
        {k: v for k, v in unet_state.items() if k in model_unet}, strict=False
    )

    cfr_state, model_cfr, spynet = {}, model.cfr.state_dict(), {}
    for key, tensor in sd["state_dict_bpp"].items():
        if key.startswith(OFFICIAL_UNUSED_CFR):
            report.ignored.append(f"state_dict_bpp.{key}")
        elif key.startswith("spynet."):
            spynet[key.removeprefix("spynet.")] = tensor
        elif key.startswith(OFFICIAL_USED_CFR) and key in model_cfr:
            cfr_state[key] = tensor
        else:
            report.unexpected.append(f"state_dict_bpp.{key}")
    mapped, unmapped = spynet_state(spynet)  # the mapping a BasicVSR SPyNet file goes through
    cfr_state.update({f"spynet.{k}": v for k, v in mapped.items()})
    report.unexpected += [f"state_dict_bpp.spynet.{k}" for k in unmapped]
    report.missing += [f"cfr.{k}" for k in model_cfr if k not in cfr_state]
    _check_shapes(path, cfr_state, model_cfr)
    model.cfr.load_state_dict(cfr_state, strict=False)
    model.weights = f"{model.weights} + official DLoRAL {path}"
    spynet_missing = any(k.startswith("cfr.spynet.basic_module.") for k in report.missing)
    model.spynet_weights = "random-init" if spynet_missing else f"official DLoRAL {path}"
    if report.missing or report.unexpected:
        log.warning(report.summary())
    if strict and not report.clean:
        raise CheckpointError(report.summary())
    return model, report


def _check_shapes(path, state: dict, model_state: dict) -> None:
    bad = [k for k in state if k in model_state and state[k].shape != model_state[k].shape]
    if bad:
        raise CheckpointError(
            f"{path}: shape mismatch for {', '.join(bad[:5])} (was it made for another profile?)"
        )


def _unused_cfr_shapes(mid: int = 64) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the CFR_model modules the reference builds but never runs
    (src/cross_frame_retrieval/cfr_main.py, CFR_model(mid_channels=64)): its loader with
    `--load_cfr` copies every CFR parameter by name, these included."""

    def blocks(prefix: str, cin: int, cout: int, n: int) -> dict[str, tuple[int, ...]]:
        # ResidualBlocksWithInputConv: main.0 conv, main.1 LeakyReLU, main.2 n residual blocks
        out = {f"{prefix}.main.0.weight": (cout, cin, 3, 3), f"{prefix}.main.0.bias": (cout,)}
        for i in range(n):
            for conv in ("conv1", "conv2"):
                out[f"{prefix}.main.2.{i}.{conv}.weight"] = (cout, cout, 3, 3)
                out[f"{prefix}.main.2.{i}.{conv}.bias"] = (cout,)
        return out

    return {
        **blocks("feat_extract", 4, mid, 5),
        **blocks("weight_predict", 3, mid, 5),
        **blocks("weight_predict_final", mid, 1, 1),
        **blocks("reconstruction_feat", mid, mid, 5),
        "conv_hr.weight": (64, 64, 3, 3),
        "conv_hr.bias": (64,),
        "conv_last.weight": (4, 64, 3, 3),
        "conv_last.bias": (4,),
    }


def export_official(model: DLoRAL, path: str | os.PathLike) -> Path:
    """Write a model in the official `model.pkl` layout. Used to test the importer and to hand
    weights to the reference scripts: the CFR modules the reference never runs are written as
    zeros, so its loader with `--load_cfr` finds every parameter it copies. The file has no
    alpha (the reference's loader uses 8): each lora_B is scaled by alpha/8, so that the
    reference's B'·A·8/r is our B·A·alpha/r. A model with merged LoRAs is refused."""
    path = Path(path)
    _refuse_merged(model, str(path))
    theirs = {v: k for k, v in OFFICIAL_LORA.items()}
    sd: dict = {}
    for ours, name in theirs.items():
        sd[f"lora_rank_unet_{name}"] = getattr(model.cfg, ours).rank
        for g in OFFICIAL_GROUPS:
            sd[f"unet_lora_{g}_modules_{name}"] = [
                m for m in model.lora_targets[ours] if _official_group(m) == g
            ]
    unet_state = {}
    for key, tensor in model.unet.state_dict().items():
        tensor = tensor.detach().cpu().clone()
        m = re.search(r"\.(lora_[AB])\.(consistency|detail)\.", key)
        if m:
            module = key[: m.start()]
            adapter = f"default_{_official_group(module)}_{theirs[m.group(2)]}"
            key = f"{module}.{m.group(1)}.{adapter}.{key[m.end() :]}"
            scale = getattr(model.cfg, m.group(2)).alpha / OFFICIAL_LORA_ALPHA
            if m.group(1) == "lora_B" and scale != 1:
                tensor = (tensor.double() * scale).to(tensor.dtype)
        unet_state[key] = tensor
    sd["state_dict_unet"] = unet_state
    cfr = {k: v.detach().cpu().clone() for k, v in model.cfr.state_dict().items()}
    sd["state_dict_bpp"] = {k: torch.zeros(s) for k, s in _unused_cfr_shapes().items()} | cfr
    atomic_write(path, lambda tmp: _save_reproducibly(sd, tmp))
    return path


def _save_reproducibly(obj, path: str) -> None:
    """torch.save through an open file: given a path, torch names the zip archive's root folder
    after the file (here a random temp name), so the same model exported twice had two sha256s.
    Through a file object the root is always `archive/`: the same weights give the same bytes."""
    with open(path, "wb") as f:
        torch.save(obj, f)
