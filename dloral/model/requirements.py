"""Which weight files a run needs, checked before any model is built: one error lists them all.

Training, `dloral-exp upscale` and the benchmark's DLoRAL methods call this first, so a run that
needs SD 2.1 (or the tiny VAE), SPyNet, VGG16 (LPIPS) and a tagger on a machine with none of them
fails at once, naming every missing file, where it was looked for and how to get it. Nothing is
loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from dloral.model.backbone import locate_sd21
from dloral.model.dloral import DLoRALConfig
from dloral.weights import (
    WeightsMissing,
    locate_spynet,
    locate_tagger,
    locate_tiny_vae,
    locate_vgg16,
)


@dataclass(frozen=True)
class Missing:
    name: str  # e.g. "SPyNet"
    needed_for: str  # the setting that needs it, e.g. "model.profile = sd21"
    message: str  # the locator's error: the file, where it was looked for, how to get it


class MissingWeights(WeightsMissing):
    """Required weights are missing; `missing` lists each, the message says where to put them."""

    def __init__(self, missing: list[Missing]):
        self.missing = missing
        names = ", ".join(m.name for m in missing)
        lines = [f"{len(missing)} required weight(s) missing: {names}. Nothing was built."]
        for m in missing:
            text = m.message.replace("\n", "\n    ")
            lines.append(f"- {m.name} (needed for {m.needed_for}): {text}")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # pickled whole (a Ray trial's error), not rebuilt from its message
        return type(self), (self.missing,)


def _check(name: str, needed_for: str, locate) -> list[Missing]:
    try:
        locate()
    except WeightsMissing as err:
        return [Missing(name, needed_for, str(err))]
    return []


def missing_weights(
    model: DLoRALConfig,
    *,
    spynet_from_checkpoint: bool = False,
    spynet_unused: bool = False,
    lpips: bool = False,
    tagger: bool = False,
    tagger_spec: str | None = None,
) -> list[Missing]:
    """Every weight the run needs and this machine lacks (empty: all there).

    model: the config of the DLoRAL model to build; spynet_from_checkpoint: a checkpoint will
    fill SPyNet (no SPyNet file needed); spynet_unused: nothing runs SPyNet (inference with CFR
    off; training with CFR off still warps the GT with its flow); lpips: the LPIPS loss is
    required (VGG16 trunk); tagger: prompts come from a tagger, `tagger_spec`
    (module:factory) or $DLORAL_TAGGER."""
    out: list[Missing] = []
    if model.profile == "sd21" and not model.random_init:
        out += _check("SD 2.1-base", "model.profile = sd21", lambda: locate_sd21(model.sd21_path))
    if model.profile == "tiny" and model.tiny_init == "pretrained":
        out += _check(
            "tiny VAE",
            'model.profile = tiny (tiny_init = "pretrained")',
            lambda: locate_tiny_vae(model.tiny_vae_path),
        )
    if model.pretrained_spynet() and not (spynet_from_checkpoint or spynet_unused):
        why = f"model.cfr.spynet = {model.cfr.spynet}" + (
            f" with profile {model.profile}" if model.cfr.spynet == "auto" else ""
        )
        out += _check("SPyNet", why, lambda: locate_spynet(model.cfr.spynet_path))
    if lpips:
        out += _check("VGG16", 'the LPIPS loss (loss.lpips = "required")', locate_vgg16)
    if tagger:
        out += _check("tagger module", "prompts from a tagger", lambda: locate_tagger(tagger_spec))
    return out


def require_weights(missing: list[Missing]) -> None:
    """Raise one MissingWeights naming every entry of `missing` (duplicates once); else None."""
    unique = list(dict.fromkeys(missing))
    if unique:
        raise MissingWeights(unique)
