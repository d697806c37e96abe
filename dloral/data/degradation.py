"""Real-ESRGAN second-order degradation (BasicSR, as DLoRAL uses it), drawn once per clip.

Frames are float tensors (T, 3, H, W) in [0, 1], RGB, on any device. A `ClipDraw` holds every
random choice for one clip and is applied identically to all its frames, so the LQ clip is
temporally consistent; with `per_frame_noise=True` (the training sampler's default) the noise
sample changes from frame to frame, its kind and level staying the clip's, as RealBasicVSR's
RandomNoise (mmedit) draws it (which also lets the level drift a little; ours stays fixed).

Sizes: the LQ clip is (H // scale, W // scale); as in BasicSR the whole frame is resized to
that size, so when H or W is not a multiple of scale the LQ pixel grid is very slightly
stretched against the GT. For pixel-exact pairs, crop the GT first with `crop_to_multiple`.
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dloral.config import build, read_toml, to_plain

DEFAULT_TOML = Path(__file__).with_name("realesrgan.toml")
KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES = ("area", "bilinear", "bicubic")
MIN_KERNEL_SIZE = 7
_GROUPS = ("first_degradation", "second_degradation", "kernel_info")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DegradationConfig:
    """Every knob of the two-stage pipeline; names as in the reference params.yml."""

    scale: int
    # first degradation
    resize_prob: tuple[float, ...]  # up, down, keep
    resize_range: tuple[float, float]
    gaussian_noise_prob: float
    noise_range: tuple[float, float]  # sigma, 0..255 scale
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float
    jpeg_range: tuple[float, float]
    # second degradation
    second_blur_prob: float
    resize_prob2: tuple[float, ...]
    resize_range2: tuple[float, float]
    gaussian_noise_prob2: float
    noise_range2: tuple[float, float]
    poisson_scale_range2: tuple[float, float]
    gray_noise_prob2: float
    jpeg_range2: tuple[float, float]
    # kernels
    blur_kernel_size: int
    kernel_list: tuple[str, ...]
    kernel_prob: tuple[float, ...]
    sinc_prob: float
    blur_sigma: tuple[float, float]
    betag_range: tuple[float, float]
    betap_range: tuple[float, float]
    blur_kernel_size2: int
    kernel_list2: tuple[str, ...]
    kernel_prob2: tuple[float, ...]
    sinc_prob2: float
    blur_sigma2: tuple[float, float]
    betag_range2: tuple[float, float]
    betap_range2: tuple[float, float]
    final_sinc_prob: float

    @classmethod
    def from_toml(cls, path: str | Path | None = None) -> DegradationConfig:
        """Load a TOML file; the packaged realesrgan.toml (DLoRAL's values) by default."""
        return cls.from_dict(read_toml(path or DEFAULT_TOML))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DegradationConfig:
        """Flat or grouped (first_degradation / second_degradation / kernel_info) mapping.

        An unknown or missing key raises KeyError naming it; a bad value raises ValueError."""
        flat: dict[str, Any] = {}
        for key, value in data.items():
            items = (
                value.items() if key in _GROUPS and isinstance(value, Mapping) else [(key, value)]
            )
            for name, item in items:
                if name in flat:
                    raise KeyError(f"degradation config key {name!r} given twice")
                flat[name] = item
        config = build(cls, flat)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict; `from_dict` reads it back."""
        return to_plain(self)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        for name in ("resize_prob", "resize_prob2"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 probabilities (up, down, keep)")
        for suffix in ("", "2"):
            kinds, probs = (
                getattr(self, "kernel_list" + suffix),
                getattr(self, "kernel_prob" + suffix),
            )
            if len(kinds) != len(probs):
                raise ValueError(f"kernel_list{suffix} and kernel_prob{suffix} differ in length")
            if bad := [k for k in kinds if k not in KERNEL_TYPES]:
                raise ValueError(f"kernel_list{suffix}: unknown kernel type(s) {bad}")
            size = getattr(self, "blur_kernel_size" + suffix)
            if size % 2 == 0 or size < MIN_KERNEL_SIZE:
                raise ValueError(f"blur_kernel_size{suffix} must be odd and >= 7, got {size}")
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if "prob" in f.name:
                if any(not 0 <= p <= 1 for p in values) or (len(values) > 1 and sum(values) <= 0):
                    raise ValueError(f"{f.name}: probabilities must lie in [0, 1], got {value}")
            elif f.type == "tuple[float, float]":
                if len(values) != 2 or values[0] > values[1]:
                    raise ValueError(f"{f.name} must be a [low, high] range, got {list(values)}")
        for name in ("jpeg_range", "jpeg_range2"):
            low, high = getattr(self, name)
            if low < 1 or high > 100:
                raise ValueError(f"{name} must lie in [1, 100], got {[low, high]}")


# ---------------------------------------------------------------------------- kernels


def _quadratic_form(size: int, sigma_x: float, sigma_y: float | None, theta: float):
    """x^T Sigma^-1 x on the centred size x size grid (x = column, y = row), float64."""
    if size % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {size}")
    sigma_y = sigma_x if sigma_y is None else sigma_y
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    # Sigma = R diag(sx^2, sy^2) R^T: rotate the grid into the kernel's principal axes
    u, v = c * xx + s * yy, -s * xx + c * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def _normalised(kernel: torch.Tensor) -> torch.Tensor:
    return (kernel / kernel.sum()).float()


def gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0
) -> torch.Tensor:
    """(size, size) bivariate Gaussian summing to 1; sigmas in pixels, theta in radians."""
    return _normalised(torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0, beta: float = 1.0
) -> torch.Tensor:
    """(size, size) exp(-0.5 q^beta) with q the Gaussian's quadratic form; beta=1 is Gaussian."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    return _normalised(torch.exp(-0.5 * q.pow(beta)))


def plateau_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0, beta: float = 1.0
) -> torch.Tensor:
    """(size, size) plateau-shaped 1 / (1 + q^beta), summing to 1."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    return _normalised(1.0 / (q.pow(beta) + 1.0))


def sinc_kernel(size: int, cutoff: float, pad_to: int = 0) -> torch.Tensor:
    """(size, size) circular low-pass (2-D sinc, cutoff in radians, pi = Nyquist) summing to 1,
    zero-padded to (pad_to, pad_to) when pad_to > size."""
    if size % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {size}")
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    r = torch.sqrt(ax[:, None] ** 2 + ax[None, :] ** 2)
    r_safe = torch.where(r > 0, r, torch.ones_like(r))
    kernel = cutoff * torch.special.bessel_j1(cutoff * r_safe) / (2 * math.pi * r_safe)
    kernel = torch.where(r > 0, kernel, torch.full_like(r, cutoff**2 / (4 * math.pi)))
    return pad_kernel(_normalised(kernel), pad_to)


def pulse_kernel(size: int) -> torch.Tensor:
    """(size, size) identity kernel."""
    kernel = torch.zeros(size, size)
    kernel[size // 2, size // 2] = 1.0
    return kernel


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a (k, k) kernel, k odd, to (size, size), centred; unchanged if size <= k."""
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (pad, pad, pad, pad)) if pad > 0 else kernel


# ---------------------------------------------------------------------------- operators


def filter2d(frames: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate each channel of (T, C, H, W) with a (k, k) kernel, or frame t with kernel[t] of
    a (T, k, k) stack, k odd, as cv2.filter2D / BasicSR filter2D: reflect-padded, same size."""
    t, c, h, w = frames.shape
    if kernel.shape[-1] % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {kernel.shape[-1]}")
    kernel = _trim(kernel)
    p = kernel.shape[-1] // 2
    # reflect padding needs p < H, W; tiny frames (BasicSR never sees them) fall back to edge
    mode = "reflect" if p < min(h, w) else "replicate"
    x = F.pad(frames, (p, p, p, p), mode=mode)
    kernel = kernel.to(device=frames.device, dtype=frames.dtype)
    if kernel.dim() == 2:
        out = F.conv2d(x.reshape(t * c, 1, h + 2 * p, w + 2 * p), kernel[None, None])
    else:
        weight = kernel.repeat_interleave(c, dim=0)[:, None]
        out = F.conv2d(x.reshape(1, t * c, h + 2 * p, w + 2 * p), weight, groups=t * c)
    return out.reshape(t, c, h, w)


def _trim(kernel: torch.Tensor) -> torch.Tensor:
    """Drop all-zero outer rings (padding): same output, since reflection does not depend on
    the pad width, at a fraction of the cost."""
    k = kernel.shape[-1]
    support = (kernel != 0).reshape(-1, k, k).any(dim=0)
    offsets = torch.cat([support.any(dim=1).nonzero(), support.any(dim=0).nonzero()]) - k // 2
    if len(offsets) == 0:
        return kernel
    c, r = k // 2, int(offsets.abs().max())
    return kernel[..., c - r : c + r + 1, c - r : c + r + 1]


def resize(
    frames: torch.Tensor,
    size: tuple[int, int] | None = None,
    scale_factor: float | None = None,
    mode: str = "bicubic",
) -> torch.Tensor:
    """F.interpolate as BasicSR calls it (no antialias, align_corners=False): (T, C, H, W) to
    `size` (h, w) or by `scale_factor` (output floor(H * f)); mode area, bilinear or bicubic."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    corners = None if mode == "area" else False
    return F.interpolate(
        frames, size=size, scale_factor=scale_factor, mode=mode, align_corners=corners
    )


def crop_to_multiple(frames: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop (..., H, W) bottom/right to multiples of scale, so GT and LQ pixels align exactly."""
    h, w = frames.shape[-2:]
    return frames[..., : h - h % scale, : w - w % scale]


def _generator_on(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator itself if it lives on `device`, else one there seeded from it."""
    here = generator.device
    if (here.type, here.index or 0) == (device.type, device.index or 0):
        return generator
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def _finish(out: torch.Tensor, clip: bool) -> torch.Tensor:
    return out.clamp(0.0, 1.0) if clip else out


def add_gaussian_noise(
    frames: torch.Tensor,
    sigma: float,
    generator: torch.Generator,
    gray: bool = False,
    per_frame: bool = True,
    clip: bool = True,
) -> torch.Tensor:
    """Add N(0, (sigma / 255)^2) noise, sigma on the 0..255 scale, to (T, C, H, W). gray: one
    field for all channels; per_frame=False: one field for all frames."""
    t, c, h, w = frames.shape
    g = _generator_on(generator, frames.device)
    shape = (t if per_frame else 1, 1 if gray else c, h, w)
    noise = torch.randn(shape, generator=g, device=frames.device, dtype=frames.dtype)
    return _finish(frames + noise * (sigma / 255.0), clip)


def to_gray(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) RGB -> (T, 1, H, W) luma with torchvision's rgb_to_grayscale weights."""
    weights = frames.new_tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
    return (frames * weights).sum(dim=1, keepdim=True)


def add_poisson_noise(
    frames: torch.Tensor,
    scale: float,
    generator: torch.Generator,
    gray: bool = False,
    per_frame: bool = True,
    clip: bool = True,
) -> torch.Tensor:
    """Shot noise as BasicSR: Poisson(x * v) / v - x, times `scale`, with x the 8-bit rounded
    frame (luma if gray) and v the next power of two of the clip's count of distinct levels.
    per_frame=False: every frame draws from the same random stream (identical frames, identical
    noise)."""
    img = to_gray(frames) if gray else frames
    img = (img * 255.0).round().clamp(0, 255)
    levels = int((torch.bincount(img.flatten().long(), minlength=256) > 0).sum())
    vals = 2.0 ** math.ceil(math.log2(levels))
    img = img / 255.0
    g = _generator_on(generator, frames.device)
    if per_frame:
        counts = torch.poisson(img * vals, generator=g)
    else:
        seed = int(torch.randint(2**62, (), generator=g, device=g.device))
        counts = torch.cat(
            [torch.poisson(frame[None] * vals, generator=_reseeded(g, seed)) for frame in img]
        )
    return _finish(frames + (counts / vals - img) * scale, clip)


def _reseeded(generator: torch.Generator, seed: int) -> torch.Generator:
    return torch.Generator(device=generator.device).manual_seed(seed)


def jpeg(frames: torch.Tensor, quality: int, codec: str = "auto") -> torch.Tensor:
    """Real JPEG round trip (libjpeg, on CPU) of each (T, 3, H, W) frame at quality 1..100;
    input clamped and rounded to 8 bits, output on the 8-bit grid.

    codec `torchvision` (encode_jpeg / decode_jpeg) or `pil` (Image.save, quality q, PIL's 4:2:0
    default): the same libjpeg settings, the same bytes decoded (tests/test_degradation.py).
    `auto`: torchvision where installed, else PIL (a GPU node with torch alone)."""
    x = frames.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).cpu()
    if codec == "auto":
        codec = "torchvision" if importlib.util.find_spec("torchvision") else "pil"
    if codec == "torchvision":
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        decoded = decode_jpeg(encode_jpeg(list(x), quality=int(quality)), mode=ImageReadMode.RGB)
    elif codec == "pil":
        decoded = [_pil_jpeg(frame, int(quality)) for frame in x]
    else:
        raise ValueError(f"codec must be auto, torchvision or pil; got {codec!r}")
    return torch.stack(decoded).to(device=frames.device, dtype=frames.dtype) / 255.0


def _pil_jpeg(frame: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 (3, H, W) -> JPEG at quality -> uint8 (3, H, W), by PIL."""
    buffer = io.BytesIO()
    Image.fromarray(frame.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


# ------------------------------------------------------------------------------ draws


class _Draws:
    """Scalar random draws from one torch.Generator."""

    def __init__(self, generator: torch.Generator):
        self.g = generator

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        u = torch.rand((), generator=self.g, device=self.g.device, dtype=torch.float64)
        return low + (high - low) * float(u)

    def chance(self, p: float) -> bool:
        return self.uniform() < p

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high], both included."""
        return int(torch.randint(low, high + 1, (), generator=self.g, device=self.g.device))

    def choice(self, options: Sequence[Any], probs: Sequence[float] | None = None) -> Any:
        if probs is None:
            return options[self.integer(0, len(options) - 1)]
        u, acc = self.uniform(0.0, sum(probs)), 0.0
        for option, p in zip(options, probs, strict=True):
            acc += p
            if u < acc:
                return option
        return options[-1]


@dataclass(frozen=True)
class KernelDraw:
    """One blur kernel's parameters; kind is a KERNEL_TYPES entry, 'sinc' or 'pulse'."""

    kind: str
    size: int
    sigma_x: float | None = None
    sigma_y: float | None = None
    theta: float | None = None
    beta: float | None = None
    omega_c: float | None = None

    def kernel(self, pad_to: int) -> torch.Tensor:
        """The (pad_to, pad_to) float32 kernel."""
        if self.kind == "pulse":
            return pulse_kernel(pad_to)
        if self.kind == "sinc":
            return sinc_kernel(self.size, self.omega_c, pad_to)
        args = (self.size, self.sigma_x, self.sigma_y, self.theta)
        if self.kind in ("iso", "aniso"):
            k = gaussian_kernel(*args)
        elif self.kind.startswith("generalized"):
            k = generalized_gaussian_kernel(*args, beta=self.beta)
        else:
            k = plateau_kernel(*args, beta=self.beta)
        return pad_kernel(k, pad_to)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ResizeDraw:
    direction: str  # up, down or keep
    factor: float
    mode: str


@dataclass(frozen=True)
class NoiseDraw:
    kind: str  # gaussian (level = sigma on 0..255) or poisson (level = scale)
    level: float
    gray: bool


@dataclass(frozen=True)
class ClipDraw:
    """Every random choice for one clip; kernels are (21, 21) float32 CPU tensors."""

    blur1: KernelDraw
    kernel1: torch.Tensor
    resize1: ResizeDraw
    noise1: NoiseDraw
    jpeg1: int
    second_blur: bool
    blur2: KernelDraw
    kernel2: torch.Tensor
    resize2: ResizeDraw
    noise2: NoiseDraw
    sinc_then_jpeg: bool  # True: [resize back + sinc] -> JPEG; False: JPEG -> [resize + sinc]
    final_mode: str
    final_sinc: KernelDraw  # kind 'pulse' when the final sinc filter is skipped
    sinc_kernel: torch.Tensor
    jpeg2: int

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (no tensors) for manifests."""
        return {
            "blur1": self.blur1.describe(),
            "resize1": asdict(self.resize1),
            "noise1": asdict(self.noise1),
            "jpeg1": self.jpeg1,
            "blur2": self.blur2.describe() if self.second_blur else None,
            "resize2": asdict(self.resize2),
            "noise2": asdict(self.noise2),
            "final_order": "resize_sinc_jpeg" if self.sinc_then_jpeg else "jpeg_resize_sinc",
            "final_mode": self.final_mode,
            "final_sinc": self.final_sinc.describe(),
            "jpeg2": self.jpeg2,
        }


def _draw_kernel(
    d: _Draws,
    max_size: int,
    sinc_prob: float,
    kinds: Sequence[str],
    probs: Sequence[float],
    sigma: tuple[float, float],
    betag: tuple[float, float],
    betap: tuple[float, float],
) -> KernelDraw:
    """One first/second-stage kernel, as RealESRGANDataset draws it."""
    size = d.choice(range(MIN_KERNEL_SIZE, max_size + 1, 2))
    if d.chance(sinc_prob):
        low = math.pi / 3 if size < 13 else math.pi / 5  # the reference's range for sizes 7..21
        return KernelDraw("sinc", size, omega_c=d.uniform(low, math.pi))
    kind = d.choice(kinds, probs)
    sigma_x = d.uniform(*sigma)
    sigma_y, theta = sigma_x, 0.0
    if kind.endswith("aniso"):
        sigma_y, theta = d.uniform(*sigma), d.uniform(-math.pi, math.pi)
    beta = None
    if kind.startswith(("generalized", "plateau")):
        low, high = betag if kind.startswith("generalized") else betap
        # half the draws below 1, half above, as BasicSR (with betap [1, 2], beta=1 half the time)
        beta = d.uniform(low, 1.0) if d.chance(0.5) else d.uniform(1.0, high)
    return KernelDraw(kind, size, sigma_x, sigma_y, theta, beta)


def _draw_resize(d: _Draws, probs: Sequence[float], span: tuple[float, float]) -> ResizeDraw:
    direction = d.choice(("up", "down", "keep"), probs)
    factor = {"up": lambda: d.uniform(1.0, span[1]), "down": lambda: d.uniform(span[0], 1.0)}
    return ResizeDraw(direction, factor.get(direction, lambda: 1.0)(), d.choice(RESIZE_MODES))


def _draw_noise(
    d: _Draws,
    gaussian_prob: float,
    sigma: tuple[float, float],
    scale: tuple[float, float],
    gray_prob: float,
) -> NoiseDraw:
    if d.chance(gaussian_prob):
        return NoiseDraw("gaussian", d.uniform(*sigma), d.chance(gray_prob))
    return NoiseDraw("poisson", d.uniform(*scale), d.chance(gray_prob))


def _add_noise(
    frames: torch.Tensor, draw: NoiseDraw, generator: torch.Generator, per_frame: bool
) -> torch.Tensor:
    add = add_gaussian_noise if draw.kind == "gaussian" else add_poisson_noise
    return add(frames, draw.level, generator, gray=draw.gray, per_frame=per_frame)


# ------------------------------------------------------------------------------ pipeline


class VideoDegradation:
    """Real-ESRGAN two-stage degradation with one parameter draw per clip."""

    def __init__(self, config: DegradationConfig | None = None, scale: int | None = None):
        self.config = config or DegradationConfig.from_toml()
        self.scale = scale or self.config.scale

    def sample(self, generator: torch.Generator) -> ClipDraw:
        """Draw every random choice for one clip."""
        c, d = self.config, _Draws(generator)
        pad1, pad2 = c.blur_kernel_size, c.blur_kernel_size2
        blur1 = _draw_kernel(
            d,
            pad1,
            c.sinc_prob,
            c.kernel_list,
            c.kernel_prob,
            c.blur_sigma,
            c.betag_range,
            c.betap_range,
        )
        blur2 = _draw_kernel(
            d,
            pad2,
            c.sinc_prob2,
            c.kernel_list2,
            c.kernel_prob2,
            c.blur_sigma2,
            c.betag_range2,
            c.betap_range2,
        )
        if d.chance(c.final_sinc_prob):
            size = d.choice(range(MIN_KERNEL_SIZE, pad1 + 1, 2))
            final = KernelDraw("sinc", size, omega_c=d.uniform(math.pi / 3, math.pi))
        else:
            final = KernelDraw("pulse", 1)
        resize1 = _draw_resize(d, c.resize_prob, c.resize_range)
        noise1 = _draw_noise(
            d, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob
        )
        jpeg1 = d.integer(*map(round, c.jpeg_range))
        second_blur = d.chance(c.second_blur_prob)
        resize2 = _draw_resize(d, c.resize_prob2, c.resize_range2)
        noise2 = _draw_noise(
            d, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2
        )
        sinc_then_jpeg = d.chance(0.5)
        final_mode = d.choice(RESIZE_MODES)
        jpeg2 = d.integer(*map(round, c.jpeg_range2))
        return ClipDraw(
            blur1=blur1,
            kernel1=blur1.kernel(pad1),
            resize1=resize1,
            noise1=noise1,
            jpeg1=jpeg1,
            second_blur=second_blur,
            blur2=blur2,
            kernel2=blur2.kernel(pad2),
            resize2=resize2,
            noise2=noise2,
            sinc_then_jpeg=sinc_then_jpeg,
            final_mode=final_mode,
            final_sinc=final,
            sinc_kernel=final.kernel(pad1),
            jpeg2=jpeg2,
        )

    @torch.no_grad()
    def apply(
        self,
        frames: torch.Tensor,
        draw: ClipDraw,
        generator: torch.Generator,
        per_frame_noise: bool = False,
    ) -> torch.Tensor:
        """(T, 3, H, W) in [0, 1] -> (T, 3, H // scale, W // scale) on the 8-bit grid; the noise
        samples come from `generator` (any device: one on the frames' device is derived)."""
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (T, 3, H, W), got {tuple(frames.shape)}")
        h, w = frames.shape[-2:]
        out_size = (h // self.scale, w // self.scale)
        if min(out_size) < 1:
            raise ValueError(f"frames {h}x{w} are smaller than the scale {self.scale}")
        seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
        g = torch.Generator(device=frames.device).manual_seed(seed)

        # first degradation
        x = filter2d(frames.float(), draw.kernel1)
        x = resize(x, scale_factor=draw.resize1.factor, mode=draw.resize1.mode)
        x = _add_noise(x, draw.noise1, g, per_frame_noise)
        x = jpeg(x, draw.jpeg1)
        # second degradation
        if draw.second_blur:
            x = filter2d(x, draw.kernel2)
        f = draw.resize2.factor
        size2 = (max(1, int(h / self.scale * f)), max(1, int(w / self.scale * f)))
        x = resize(x, size=size2, mode=draw.resize2.mode)
        x = _add_noise(x, draw.noise2, g, per_frame_noise)
        if draw.sinc_then_jpeg:
            x = filter2d(resize(x, size=out_size, mode=draw.final_mode), draw.sinc_kernel)
            x = jpeg(x, draw.jpeg2)
        else:
            x = jpeg(x, draw.jpeg2)
            x = filter2d(resize(x, size=out_size, mode=draw.final_mode), draw.sinc_kernel)
        return (torch.clamp((x * 255.0).round(), 0, 255) / 255.0).to(frames.dtype)

    def __call__(
        self, frames: torch.Tensor, seed: int, per_frame_noise: bool = False
    ) -> tuple[torch.Tensor, ClipDraw]:
        """Draw with `seed` and degrade: (LQ frames, the draw)."""
        generator = torch.Generator().manual_seed(seed)
        draw = self.sample(generator)
        return self.apply(frames, draw, generator, per_frame_noise), draw
