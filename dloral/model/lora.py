"""Consistency-LoRA and Detail-LoRA as two named peft adapters on the UNet.

Targets follow the reference (`initialize_unet` in src/DLoRAL_model.py): every weight of the
UNet (bias and norm layers excluded) whose name contains one of REFERENCE_PATTERNS, i.e. the
attention projections, feed-forward, transformer proj_in/out and all convolutions including the
widened conv_in. The reference splits each LoRA into encoder/decoder/others adapters of equal
rank; that is the same function as one adapter over their union, which is what we keep.
peft's default lora_alpha is 8, so the reference's rank 4 runs at scale alpha/r = 2.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from dloral.model.config import ADAPTERS, REFERENCE_PATTERNS, LoRAConfig


def reference_targets(unet: nn.Module, patterns: Iterable[str] = REFERENCE_PATTERNS) -> list[str]:
    """Module names the reference puts LoRA on (weights only, no bias or norm)."""
    patterns = tuple(patterns)
    names = []
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if any(p in name for p in patterns) and module not in names:
            names.append(module)
    return names


def add_adapters(unet: nn.Module, configs: dict[str, LoRAConfig]) -> dict[str, list[str]]:
    """Inject the named adapters; returns the module names each one targets."""
    # Resolve every adapter's targets on the plain UNet, before any injection renames modules.
    injected = {
        n: list(configs[n].targets or reference_targets(unet, configs[n].patterns))
        for n in ADAPTERS
    }
    for name, targets in injected.items():
        cfg = configs[name]
        with warnings.catch_warnings():  # two adapters on one model is the point, not a mistake
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            unet.add_adapter(
                LoraConfig(
                    r=cfg.rank,
                    lora_alpha=cfg.alpha,
                    init_lora_weights="gaussian",
                    target_modules=targets,
                ),
                adapter_name=name,
            )
    return injected


def lora_layers(module: nn.Module) -> Iterator[BaseTunerLayer]:
    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            yield m


def adapter_parameters(module: nn.Module, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
    marker = f".{adapter}."
    for name, p in module.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and marker in name:
            yield name, p


def set_active(unet: nn.Module, adapters: Iterable[str]) -> None:
    """Which adapters take part in the forward pass (trainability is set separately)."""
    adapters = list(adapters)
    unknown = set(adapters) - set(ADAPTERS)
    if unknown:
        raise ValueError(f"unknown adapter(s) {sorted(unknown)}; adapters are {ADAPTERS}")
    for layer in lora_layers(unet):
        layer.set_adapter(adapters, inference_mode=True)  # also freezes every adapter
        if not adapters:
            layer._active_adapter = []


def set_trainable(unet: nn.Module, adapter: str, trainable: bool) -> None:
    for _, p in adapter_parameters(unet, adapter):
        p.requires_grad_(trainable)


def merge(unet: nn.Module, adapters: Iterable[str] = ADAPTERS) -> None:
    """Fold the adapters into the base weights: inference then costs what the plain UNet costs."""
    adapters = list(adapters)
    for layer in lora_layers(unet):
        names = [a for a in adapters if a in layer.lora_A]
        if names:
            layer.merge(adapter_names=names)


def unmerge(unet: nn.Module) -> None:
    for layer in lora_layers(unet):
        if layer.merged:
            layer.unmerge()


def is_merged(unet: nn.Module) -> bool:
    return any(layer.merged for layer in lora_layers(unet))


@torch.no_grad()
def randomize_lora_b(unet: nn.Module, std: float = 0.02, generator=None) -> None:
    """LoRA B starts at zero (adapter output zero); tests and benchmarks give it real values."""
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=generator) * std)
