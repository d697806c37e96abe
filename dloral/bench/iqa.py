"""Perceptual and no-reference IQA through pyiqa, one wrapper for all, weights checked first.

pyiqa fetches weights on first use; here nothing is ever fetched. Before a metric is built, every
file it would load is looked for where pyiqa, torchvision, CLIP and timm look for it, and a
missing file raises MetricUnavailable naming the file, its folder and the env var that moves it:
- pyiqa's own files: `pyiqa.utils.download_util.DEFAULT_CACHE_DIR`, fixed when pyiqa is imported
  as `torch.hub.get_dir()/pyiqa` (so `$TORCH_HOME/hub/pyiqa`, default ~/.cache/torch/hub/pyiqa);
- torchvision ImageNet trunks (LPIPS, DISTS): `torch.hub.get_dir()/checkpoints` ($TORCH_HOME);
- OpenAI CLIP (CLIP-IQA): `torch.hub.get_dir()/clip`, SHA-256 checked by pyiqa itself;
- timm ViT (MANIQA): the Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import logging
import os
import re
import urllib.error
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import torch

from dloral.bench.metric import MetricInfo, MetricUnavailable
from dloral.devices import resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "IQA_METRICS",
    "IQAMetric",
    "WeightFile",
    "iqa_metric",
    "pyiqa_lower_better",
    "weights_status",
]

FR, NR = "full_reference", "no_reference"


@dataclass(frozen=True)
class WeightFile:
    """One file a metric loads: its name, the folder looked in, the env var moving that folder."""

    file: str
    folder: Path
    env: str
    path: Path | None  # where it was found, None if missing
    sha256: str | None = None  # expected SHA-256 (full or the prefix in a hub file name)

    @property
    def found(self) -> bool:
        return self.path is not None


def _torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir())


def _found(path: Path) -> Path | None:
    return path if path.is_file() else None


def _pyiqa_file(module: str, key: str) -> WeightFile:
    """A file pyiqa downloads with `load_file_from_url` into its cache folder."""
    from pyiqa.utils import download_util

    url = importlib.import_module(f"pyiqa.archs.{module}").default_model_urls[key]
    name = os.path.basename(urlparse(url).path)
    folder = Path(download_util.DEFAULT_CACHE_DIR)
    return WeightFile(name, folder, "TORCH_HOME", _found(folder / name))


def _torchvision_file(weights_enum: str) -> WeightFile:
    """A torchvision ImageNet checkpoint in the torch hub cache; its name carries a hash prefix."""
    import torchvision

    url = getattr(torchvision.models, weights_enum).IMAGENET1K_V1.url
    name = os.path.basename(urlparse(url).path)
    folder = _torch_hub_dir() / "checkpoints"
    prefix = re.search(r"-([a-f0-9]+)\.", name)
    sha = prefix.group(1) if prefix else None
    return WeightFile(name, folder, "TORCH_HOME", _found(folder / name), sha)


def _clip_file(backbone: str) -> WeightFile:
    """OpenAI CLIP weights as pyiqa's CLIP loader looks for them; the URL holds the SHA-256."""
    from pyiqa.archs.clip_model import _MODELS

    url = _MODELS[backbone]
    name = os.path.basename(urlparse(url).path)
    folder = _torch_hub_dir() / "clip"
    return WeightFile(name, folder, "TORCH_HOME", _found(folder / name), url.split("/")[-2])


def _timm_file(model_name: str) -> WeightFile:
    """timm pretrained weights in the Hugging Face hub cache (safetensors first, as timm does)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg(model_name).hf_hub_id
    cache = Path(constants.HF_HUB_CACHE)
    folder = cache / f"models--{repo.replace('/', '--')}"
    path = None
    for name in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(hit, str) and Path(hit).is_file():
            path = Path(hit)
            break
    return WeightFile("model.safetensors", folder, "HF_HUB_CACHE", path)


@dataclass(frozen=True)
class _Spec:
    pyiqa_name: str
    kind: str
    higher_is_better: bool  # checked against pyiqa's own lower_better
    weights: tuple = ()  # callables -> WeightFile


# Our name -> pyiqa metric, direction as the papers define it, the files pyiqa 0.1.16 loads.
_tv, _pq = _torchvision_file, _pyiqa_file
IQA_METRICS: dict[str, _Spec] = {
    "lpips": _Spec(
        "lpips",
        FR,
        higher_is_better=False,
        weights=(partial(_tv, "AlexNet_Weights"), partial(_pq, "lpips_arch", "0.1_alex")),
    ),
    "lpips_vgg": _Spec(
        "lpips-vgg",
        FR,
        higher_is_better=False,
        weights=(partial(_tv, "VGG16_Weights"), partial(_pq, "lpips_arch", "0.1_vgg")),
    ),
    "dists": _Spec(
        "dists",
        FR,
        higher_is_better=False,
        weights=(partial(_tv, "VGG16_Weights"), partial(_pq, "dists_arch", "url")),
    ),
    "musiq": _Spec(
        "musiq", NR, higher_is_better=True, weights=(partial(_pq, "musiq_arch", "koniq10k"),)
    ),
    "clipiqa": _Spec("clipiqa", NR, higher_is_better=True, weights=(partial(_clip_file, "RN50"),)),
    "maniqa": _Spec(
        "maniqa",
        NR,
        higher_is_better=True,
        weights=(partial(_timm_file, "vit_base_patch8_224"), partial(_pq, "maniqa_arch", "koniq")),
    ),
    "niqe": _Spec("niqe", NR, higher_is_better=False, weights=(partial(_pq, "niqe_arch", "url"),)),
    # No weights: computed from the pixels alone.
    "piqe": _Spec("piqe", NR, higher_is_better=False),
    # pyiqa's own PSNR/SSIM conventions (YIQ luma; SSIM rounds it to integers), for comparison
    # with papers that used pyiqa; dloral.bench.fullref has the BasicSR ones.
    "psnr_y_pyiqa": _Spec("psnry", FR, higher_is_better=True),
    "ssim_y_pyiqa": _Spec("ssim", FR, higher_is_better=True),
}


def _pyiqa_version() -> str:
    import pyiqa

    return pyiqa.__version__


def pyiqa_lower_better(pyiqa_name: str) -> bool:
    """pyiqa's own direction flag, read where `InferenceModel.lower_better` reads it."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    return bool(DEFAULT_CONFIGS[pyiqa_name].get("lower_better", False))


def _spec(name: str) -> _Spec:
    if name not in IQA_METRICS:
        raise KeyError(
            f"unknown IQA metric {name!r}; known: {', '.join(IQA_METRICS)} (DOVER, which pyiqa "
            "lacks, is dloral.bench.dover)"
        )
    spec = IQA_METRICS[name]
    if spec.higher_is_better == pyiqa_lower_better(spec.pyiqa_name):
        raise ValueError(
            f"{name}: dloral's table says higher_is_better={spec.higher_is_better} but pyiqa "
            f"{_pyiqa_version()} says lower_better={not spec.higher_is_better} for "
            f"{spec.pyiqa_name!r}; fix IQA_METRICS before reporting this metric"
        )
    return spec


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_status(name: str) -> dict:
    """Whether the files `name` loads are here: found, paths looked at, env vars, per file."""
    files = [resolve() for resolve in _spec(name).weights]
    return {
        "metric": name,
        "found": all(f.found for f in files),
        "paths": [str(f.path or f.folder / f.file) for f in files],
        "env": sorted({f.env for f in files}),
        "files": [
            {
                "file": f.file,
                "folder": str(f.folder),
                "found": f.found,
                "path": str(f.path) if f.path else None,
                "env": f.env,
            }
            for f in files
        ],
    }


def _check_weights(name: str, spec: _Spec, strict: bool) -> list[WeightFile]:
    files = [resolve() for resolve in spec.weights]
    problems = [
        f"missing: {f.file} in {f.folder} (moved by ${f.env})" for f in files if not f.found
    ]
    if strict:
        for f in files:
            if f.found and f.sha256 and not _sha256(f.path).startswith(f.sha256):
                problems.append(f"not as published: {f.path} (SHA-256 should start {f.sha256})")
    if problems:
        raise MetricUnavailable(
            f"{name} (pyiqa {_pyiqa_version()} {spec.pyiqa_name!r}) cannot run:"
            "\n  - "
            + "\n  - ".join(problems)
            + "\nNothing is downloaded at run time. Copy these files from a machine where "
            f"pyiqa.create_metric({spec.pyiqa_name!r}) has fetched them into the folders above, "
            "or point the env var at a folder that holds them (pyiqa reads $TORCH_HOME once, "
            "when it is imported)."
        )
    return files


class IQAMetric:
    """A pyiqa metric with its MetricInfo; call as metric(out, gt=None) -> (T,) float64 on CPU.

    Frames are (T, 3, H, W) or (3, H, W) in [0, 1]; they are scored `batch_size` at a time on
    `device`. No-reference metrics ignore `gt`.
    """

    def __init__(
        self,
        info: MetricInfo,
        model: torch.nn.Module,
        device: torch.device,
        batch_size: int,
        weights: list[WeightFile],
    ):
        self.info = info
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.weights = weights

    def __call__(self, out: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        out = _as_clip(out, "out")
        if self.info.needs_gt:
            if gt is None:
                raise ValueError(f"{self.info.name} is full-reference: pass gt")
            gt = _as_clip(gt, "gt")
            if gt.shape != out.shape:
                raise ValueError(
                    f"out and gt differ in shape: out {tuple(out.shape)}, gt {tuple(gt.shape)}"
                )
        values = []
        with torch.no_grad():
            for start in range(0, out.shape[0], self.batch_size):
                stop = start + self.batch_size
                chunk = out[start:stop].to(self.device, torch.float32)
                if self.info.needs_gt:
                    score = self.model(chunk, gt[start:stop].to(self.device, torch.float32))
                else:
                    score = self.model(chunk)
                score = score.reshape(-1)
                if score.numel() != chunk.shape[0]:
                    raise RuntimeError(
                        f"{self.info.name}: pyiqa gave {score.numel()} values for "
                        f"{chunk.shape[0]} frames"
                    )
                values.append(score.detach().double().cpu())
        return torch.cat(values)


def _as_clip(frames: torch.Tensor, what: str) -> torch.Tensor:
    """(T, 3, H, W) or (3, H, W) in [0, 1] -> (T, 3, H, W)."""
    if frames.ndim == 3:
        frames = frames.unsqueeze(0)
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(
            f"{what}: expected (T, 3, H, W) or (3, H, W) RGB, got {tuple(frames.shape)}"
        )
    low, high = float(frames.min()), float(frames.max())
    if low < 0 or high > 1:
        raise ValueError(f"{what}: frames must lie in [0, 1], got min {low:.4g}, max {high:.4g}")
    return frames


def iqa_metric(
    name: str, device: str | torch.device = "auto", strict: bool = False, batch_size: int = 8
) -> IQAMetric:
    """Build IQA metric `name` (see IQA_METRICS) with its weights from local files only.

    Raises MetricUnavailable when a file is missing (or, with `strict`, does not match the
    SHA-256 in its published name), or when pyiqa cannot import its code here.
    """
    import pyiqa

    spec = _spec(name)
    files = _check_weights(name, spec, strict)
    device = resolve_device(str(device))
    captured = io.StringIO()  # pyiqa prints "Loading pretrained model ..."
    try:
        with contextlib.redirect_stdout(captured):
            model = pyiqa.create_metric(spec.pyiqa_name, device=device)
    except (urllib.error.URLError, OSError) as err:  # a download or file error got past the check
        raise MetricUnavailable(
            f"{name}: pyiqa failed to load or tried to fetch a file ({err}); files checked: "
            f"{[str(f.path) for f in files]}. Put the file it names in the torch hub or Hugging "
            "Face cache ($TORCH_HOME, $HF_HUB_CACHE); nothing is downloaded at run time."
        ) from err
    except ImportError as err:
        missing = f" (missing module {err.name!r})" if err.name else ""
        raise MetricUnavailable(
            f"{name}: pyiqa {pyiqa.__version__} cannot import the code for {spec.pyiqa_name!r} "
            f"here{missing}: {err}"
        ) from err
    finally:
        for line in captured.getvalue().splitlines():
            if line.strip():
                log.debug("pyiqa: %s", line)
    if model.lower_better == spec.higher_is_better:
        raise ValueError(
            f"{name}: pyiqa's lower_better={model.lower_better} contradicts IQA_METRICS"
        )
    weights = ", ".join(str(f.path) for f in files) or "none needed"
    info = MetricInfo(
        name=name,
        higher_is_better=not model.lower_better,
        kind=spec.kind,
        level="frame",
        implementation=f"pyiqa {pyiqa.__version__} {spec.pyiqa_name} (weights: {weights})",
        needs_gt=spec.kind == FR,
    )
    log.info("IQA metric %s on %s: %s", name, device, info.implementation)
    return IQAMetric(info, model.eval(), device, batch_size, files)
