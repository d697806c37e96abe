"""Finding a weight file on this machine: the one lookup every loader uses (nothing downloads),
the one error when weights are missing, and the VGG16 trunk that LPIPS losses load."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

VGG16_FILE = "vgg16-397923af.pth"
VGG16_ENV = "DLORAL_VGG16_WEIGHTS"


class WeightsMissing(FileNotFoundError):
    """Pretrained weights are not on this machine; the message says where to put them."""


def find_weights(
    file: str, candidates: Iterable[tuple[str | os.PathLike | None, str]]
) -> tuple[Path | None, list[str]]:
    """The first existing file among (path, origin) candidates (a folder means folder/file),
    and the "path (origin): not found" lines of those looked at before it, for error messages."""
    looked: list[str] = []
    for candidate, origin in candidates:
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        if path.is_dir():
            path = path / file
        if path.is_file():
            return path, looked
        looked.append(f"{path} ({origin}): not found")
    return None, looked


def _hub_vgg16_path() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def locate_vgg16(vgg_weights: str | os.PathLike | None = None) -> Path:
    """ImageNet VGG16 weights: explicit path (file or folder), $DLORAL_VGG16_WEIGHTS, torch hub."""
    found, looked = find_weights(
        VGG16_FILE,
        (
            (vgg_weights, "vgg_weights argument"),
            (os.environ.get(VGG16_ENV), f"${VGG16_ENV}"),
            (_hub_vgg16_path(), "torch hub cache, torch.hub.get_dir()/checkpoints"),
        ),
    )
    if found is not None:
        return found
    raise WeightsMissing(
        f"VGG16 ImageNet weights ({VGG16_FILE}) for LPIPS not found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + f"\nThis machine cannot download them. Copy {VGG16_FILE} from a connected machine's "
        f'~/.cache/torch/hub/checkpoints/ (created by `python -c "import torchvision; '
        f'torchvision.models.vgg16(weights="IMAGENET1K_V1")"`) into {_hub_vgg16_path().parent}, '
        f"or set {VGG16_ENV}=/path/to/{VGG16_FILE}."
    )
