"""Finding a weight file on this machine: the one lookup every loader uses (nothing downloads),
the one error when weights are missing, and where each weight of the suite is looked for: the
VGG16 trunk that LPIPS losses load, BasicVSR's SPyNet that CFR aligns frames with, the tiny
profile's VAE (trained on the embedded training clips, kept beside them), and the user's tagger
module that writes prompts."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

VGG16_FILE = "vgg16-397923af.pth"
VGG16_ENV = "DLORAL_VGG16_WEIGHTS"
# BasicVSR's pretrained SPyNet, the file the reference loads (src/DLoRAL_model.py ~273).
SPYNET_FILE = "spynet_20210409-c6c1bd09.pth"
SPYNET_ENV = "DLORAL_SPYNET_WEIGHTS"
SPYNET_URL = f"https://download.openmmlab.com/mmediting/restorers/basicvsr/{SPYNET_FILE}"
TAGGER_ENV = "DLORAL_TAGGER"  # module:factory used when a tagger is asked for but not named
DATA_DIR_ENV = "DLORAL_DATA_DIR"  # the embedded sets and the tiny VAE trained on them
# The tiny profile's autoencoder, trained on embedded-train by `dloral-exp data prepare`.
TINY_VAE_FILE = "tiny-vae.safetensors"
TINY_VAE_ENV = "DLORAL_TINY_VAE"


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


def hub_checkpoints() -> Path:
    """torch hub's checkpoint folder (torch.hub.get_dir()/checkpoints; $TORCH_HOME moves it)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _hub_vgg16_path() -> Path:
    return hub_checkpoints() / VGG16_FILE


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def locate_spynet(spynet_weights: str | os.PathLike | None = None) -> Path:
    """BasicVSR's SPyNet: explicit path (file or folder), $DLORAL_SPYNET_WEIGHTS, torch hub."""
    found, looked = find_weights(
        SPYNET_FILE,
        (
            (spynet_weights, "model.cfr.spynet_path"),
            (os.environ.get(SPYNET_ENV), f"${SPYNET_ENV}"),
            (hub_checkpoints() / SPYNET_FILE, "torch hub cache, torch.hub.get_dir()/checkpoints"),
        ),
    )
    if found is not None:
        return found
    raise WeightsMissing(
        f"SPyNet weights ({SPYNET_FILE}, BasicVSR's pretrained flow network that CFR aligns "
        "frames with, as the reference loads) not found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + f"\nThis machine cannot download them. Download {SPYNET_URL} on a connected machine "
        f"and copy it into {hub_checkpoints()}, or set {SPYNET_ENV}=/path/to/{SPYNET_FILE}. "
        'Only for ablations: model.cfr.spynet = "random" runs with a random SPyNet '
        "(recorded as spynet: random-init)."
    )


def data_dir() -> Path:
    """Where `dloral-exp data prepare` writes the embedded sets and the tiny VAE:
    $DLORAL_DATA_DIR, else data/embedded (relative to the working directory)."""
    return Path(os.environ.get(DATA_DIR_ENV, "data/embedded"))


def locate_tiny_vae(tiny_vae_path: str | os.PathLike | None = None) -> Path:
    """The tiny profile's VAE: explicit path (file or folder), $DLORAL_TINY_VAE, then the
    embedded data folder where `dloral-exp data prepare` trains it."""
    found, looked = find_weights(
        TINY_VAE_FILE,
        (
            (tiny_vae_path, "model.tiny_vae_path"),
            (os.environ.get(TINY_VAE_ENV), f"${TINY_VAE_ENV}"),
            (
                data_dir() / TINY_VAE_FILE,
                f"the embedded data folder, ${DATA_DIR_ENV} (default data/embedded)",
            ),
        ),
    )
    if found is not None:
        return found
    raise WeightsMissing(
        f"the tiny profile's VAE ({TINY_VAE_FILE}, an autoencoder trained on the embedded "
        "training clips) not found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + f"\n`dloral-exp data prepare` trains it into {data_dir()} (about a minute of CPU; "
        f"set {DATA_DIR_ENV} to move that folder), or set {TINY_VAE_ENV}=/path/to/"
        f'{TINY_VAE_FILE}. Only for tests of the code path: model.tiny_init = "random" builds '
        "the tiny profile with random weights (recorded as backbone_weights: random-init)."
    )


def tagger_spec(given: str | None = None) -> str | None:
    """The tagger factory `module:factory` to use: the one given, else $DLORAL_TAGGER."""
    return given or os.environ.get(TAGGER_ENV) or None


def locate_tagger(given: str | None = None) -> str:
    """Check that the tagger module is on sys.path (found, not imported: only its parent
    packages are; the factory is not called); returns "module:factory (its file)"."""
    spec = tagger_spec(given)
    how = (
        "A tagger (e.g. RAM/DAPE with your own weights) is a factory `package.module:factory` "
        "that takes the torch device and returns tag(frame) -> str: pass --tagger / loss.tagger "
        f"or set {TAGGER_ENV}=package.module:factory."
    )
    if not spec:
        raise WeightsMissing(f"tagger module: not configured. {how}")
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise WeightsMissing(f"tagger module {spec!r}: not of the form module:factory. {how}")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that is missing
        found = None
    if found is None:
        origin = "given" if given else f"from ${TAGGER_ENV}"
        raise WeightsMissing(
            f"tagger module {module!r} ({origin}): not found on this Python's sys.path. {how}"
        )
    return f"{spec} ({found.origin})"
