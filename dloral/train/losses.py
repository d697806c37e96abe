"""Training losses of DLoRAL: reconstruction (L2, LPIPS), temporal consistency, CSD.

Reference: yjsunnn/DLoRAL `src/train_DLoRAL.py`, `src/DLoRAL_model.py` (`CSDLoss`) and
`src/my_utils/training_utils.py` (`batch_calculate_optical_flow`). Images are in [-1, 1]
throughout, latents are SD 2.1-base VAE latents (already scaled by 0.18215).

Two temporal losses (`loss.temporal`):
- `warped` (`temporal_consistency_loss`): differentiable; the previous frame is warped onto the
  current one by the GT motion and the change of the prediction is compared with the GT's.
- `reference_flow` (`reference_flow_loss`): the reference's "consistency" loss (weight
  `lambda_consistency` = 10), `L1(farneback(pred_prev, pred_cur), farneback(gt_prev, gt_cur))`
  with OpenCV Farneback flow on detached uint8 copies of the frames. It carries NO gradient: in
  the reference it only adds a constant to the logged loss, so the consistency stage is trained
  by L2 + LPIPS alone. It is provided to reproduce that and to ablate against `warped`.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dloral.model.spynet import flow_coords, flow_warp
from dloral.weights import VGG16_ENV, VGG16_FILE, WeightsMissing, locate_vgg16

log = logging.getLogger(__name__)

__all__ = [
    "CSDLoss",
    "SD21_BASE_SCHEDULER_CONFIG",
    "VGG16_ENV",
    "VGG16_FILE",
    "WeightsMissing",
    "l2_loss",
    "load_lpips",
    "locate_vgg16",
    "reference_flow",
    "reference_flow_loss",
    "sd21_ddpm_scheduler",
    "temporal_consistency_loss",
    "vgg16_features_to_lpips",
]


def l2_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean squared error, as `F.mse_loss(pred, gt)` in the reference."""
    return F.mse_loss(pred, gt)


# ---------------------------------------------------------------------------------------------
# Temporal consistency
# ---------------------------------------------------------------------------------------------


def _in_frame_mask(flow: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """(N, 1, H, W) float mask: 1 where p + flow[p] lies inside the frame (align_corners=True)."""
    h, w = flow.shape[-2:]
    px, py = flow_coords(flow)
    inside = (px >= -tol) & (px <= w - 1 + tol) & (py >= -tol) & (py <= h - 1 + tol)
    return inside.unsqueeze(1).to(flow.dtype)


def temporal_consistency_loss(
    pred_prev: torch.Tensor,
    pred_cur: torch.Tensor,
    gt_prev: torch.Tensor,
    gt_cur: torch.Tensor,
    flow: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable temporal loss: mean |(pred_cur - W pred_prev) - (gt_cur - W gt_prev)|.

    Frames are (N, C, H, W) (any range, [-1, 1] in training). `flow` (N, 2, H, W) is the
    backward flow from the current to the previous frame in pixels (x, y), computed by the caller
    on the GT frames; W is `flow_warp` by it, which brings the previous frame onto the current
    one. Pixels whose warp samples outside the frame are left out of the mean. flow=None means
    zero motion. GT and flow are targets: no gradient flows into them.

    Unlike the reference's Farneback-flow L1 (`reference_flow_loss`), this has a gradient
    w.r.t. both predicted frames.
    """
    shape = pred_cur.shape
    for name, t in (("pred_prev", pred_prev), ("gt_prev", gt_prev), ("gt_cur", gt_cur)):
        if t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} differs from pred_cur {tuple(shape)}")
    # computed in float32: a bf16 sampling grid cannot address the pixels of a 512 px frame
    pred_prev, pred_cur = pred_prev.float(), pred_cur.float()
    gt_prev, gt_cur = gt_prev.detach().float(), gt_cur.detach().float()
    if flow is None:
        diff = (pred_cur - pred_prev) - (gt_cur - gt_prev)
        return diff.abs().mean()
    if flow.shape != (shape[0], 2, *shape[-2:]):
        raise ValueError(f"flow shape {tuple(flow.shape)}, expected {(shape[0], 2, *shape[-2:])}")
    flow = flow.detach().float()  # float32 pixel grid even for half-precision frames
    mask = _in_frame_mask(flow)
    diff = (pred_cur - flow_warp(pred_prev, flow)) - (gt_cur - flow_warp(gt_prev, flow))
    denom = (mask.sum() * shape[1]).clamp_min(1.0)
    return (diff.abs() * mask).sum() / denom


# The reference's cv2.calcOpticalFlowFarneback arguments.
FARNEBACK_ARGS = {
    "pyr_scale": 0.5,
    "levels": 3,
    "winsize": 15,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.2,
    "flags": 0,
}


def _reference_grey(frames: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) frames -> (N, H, W) uint8 grey as the reference makes them: `x * 255` in
    float32, cast with numpy's `astype(uint8)`, then OpenCV's RGB2GRAY.

    The reference calls this on [-1, 1] frames although its docstring says [0, 1]: values in
    (-1/255, 1] map as intended, the negative half is out of the uint8 range and numpy's cast
    truncates it toward zero and wraps it modulo 256 (-1 -> 255, -0.5 -> 0) on x86-64. That is
    reproduced, not repaired."""
    import cv2

    scaled = frames.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255
    rgb = scaled.astype(np.uint8)
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb])


def reference_flow(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Farneback flow prev -> cur as the reference's `batch_calculate_optical_flow`: frames
    (N, 3, H, W) in [-1, 1] (see `_reference_grey`) -> (N, 2, H, W) float32 flow (x, y) divided
    by (W, H), on the frames' device, without gradient."""
    import cv2

    if prev.shape != cur.shape or prev.dim() != 4:
        raise ValueError(
            f"need two (N, 3, H, W) batches; got {tuple(prev.shape)}, {tuple(cur.shape)}"
        )
    h, w = prev.shape[-2:]
    first, second = _reference_grey(prev), _reference_grey(cur)
    flows = np.stack(
        [
            cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK_ARGS)
            for a, b in zip(first, second, strict=True)
        ]
    )  # (N, H, W, 2) float32
    flows[..., 0] /= w
    flows[..., 1] /= h
    return torch.from_numpy(flows).permute(0, 3, 1, 2).to(prev.device)


def reference_flow_loss(
    pred_prev: torch.Tensor, pred_cur: torch.Tensor, gt_prev: torch.Tensor, gt_cur: torch.Tensor
) -> torch.Tensor:
    """The reference's temporal loss: mean |flow(pred_prev, pred_cur) - flow(gt_prev, gt_cur)|
    with `reference_flow` (frames (N, 3, H, W) in [-1, 1]). A float32 scalar that carries no
    gradient: adding it to a loss changes its value, never a parameter update."""
    with torch.no_grad():
        return F.l1_loss(reference_flow(pred_prev, pred_cur), reference_flow(gt_prev, gt_cur))


# ---------------------------------------------------------------------------------------------
# CSD (classifier score distillation)
# ---------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-2-1-base scheduler/scheduler_config.json (a PNDMScheduler config;
# the reference loads it with `DDPMScheduler.from_pretrained(..., subfolder="scheduler")`).
# 2.1-base is epsilon-prediction; the 768 px stable-diffusion-2-1 is v-prediction.
SD21_BASE_SCHEDULER_CONFIG: dict = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def sd21_ddpm_scheduler():
    """`DDPMScheduler` from SD 2.1-base's scheduler config, as the reference builds it.

    `set_alpha_to_one` and `skip_prk_steps` are DDIM/PNDM options that DDPM ignores (kept in its
    config, as with `from_pretrained`); `steps_offset` only affects inference timesteps.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(dict(SD21_BASE_SCHEDULER_CONFIG))


class CSDLoss(nn.Module):
    """Classifier score distillation against a frozen SD 2.1-base UNet (epsilon-prediction).

    For latents z: t ~ U{int(1000 min_step_ratio), ..., int(1000 max_step_ratio) - 1},
    z_t = add_noise(z, eps, t); with CFG scale s and the frozen UNet's eps_u (negative prompt),
    eps_c (positive prompt):
        x0_real = x0(eps_u + s (eps_c - eps_u)),  x0_fake = x0(eps_u),
        w = mean_{C,H,W} |z - x0_real|,  g = (x0_fake - x0_real) / w,
        loss = mse(z, stopgrad(z - g))  (value mean(g^2), d loss / d z = 2 g / z.numel()).
    Only `latents` get a gradient. The UNet must be the original 4-channel SD UNet (not the
    LoRA'd 8-channel generator); it is set to eval with requires_grad False here and runs in its
    own dtype (the reference runs it in fp16); the x0 algebra is done in the latents' dtype.

    Training calls `pair_losses`: the reference's one `cal_csd` per frame pair, where both pairs
    of a sample get the same noise eps (one `noise_csd` per step) and each its own t.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler=None,
        cfg_scale: float = 7.5,
        min_step_ratio: float = 0.02,
        max_step_ratio: float = 0.5,
    ):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler if scheduler is not None else sd21_ddpm_scheduler()
        pred_type = self.scheduler.config.prediction_type
        if pred_type != "epsilon":
            raise ValueError(
                f"CSDLoss needs an epsilon-prediction scheduler (SD 2.1-base), got {pred_type!r}"
            )
        self.cfg_scale = float(cfg_scale)
        steps = int(self.scheduler.config.num_train_timesteps)
        self.min_step = int(steps * min_step_ratio)
        self.max_step = int(steps * max_step_ratio)
        if not 0 <= self.min_step < self.max_step <= steps:
            raise ValueError(
                f"timestep range [{self.min_step}, {self.max_step}) is empty or not in [0, {steps})"
            )
        self.last_timesteps: torch.Tensor | None = None

    def train(self, mode: bool = True) -> CSDLoss:
        super().train(mode)
        self.unet.eval()  # the teacher stays frozen when a parent module is put in train mode
        return self

    def sample_timesteps(
        self, n: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(n,) int64 timesteps in [min_step, max_step), like `torch.randint` in the reference."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(
            self.min_step, self.max_step, (n,), generator=generator, device=gen_device
        )
        return t.to(device)

    @staticmethod
    def sample_noise(
        like: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(n, *like.shape[1:]) standard normal noise in like's dtype, on like's device."""
        gen_device = generator.device if generator is not None else like.device
        shape = (n, *like.shape[1:])
        return torch.randn(shape, generator=generator, device=gen_device, dtype=like.dtype).to(
            like.device
        )

    def _x0(self, noisy: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.scheduler.alphas_cumprod.to(device=noisy.device, dtype=noisy.dtype)[t]
        abar = abar.view(-1, *([1] * (noisy.dim() - 1)))
        return (noisy - (1 - abar).sqrt() * eps) / abar.sqrt()

    def forward(
        self,
        latents: torch.Tensor,
        pos_embeds: torch.Tensor,
        neg_embeds: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """CSD loss for latents (B, 4, h, w); embeds (B or 1, 77, D) text states. `reduction`
        "mean": the scalar mse over all latents; "none": (B,), each latent's mean over its
        (4, h, w) elements, where a latent whose guidance is not finite keeps its non-finite
        loss but no gradient path (so a caller can drop it without NaN gradients).

        `generator` drives the timestep draw and, when `noise` is None, the noise (drawn first).
        The drawn timesteps are kept in `self.last_timesteps`.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
        b = latents.shape[0]
        if noise is None:
            noise = self.sample_noise(latents, b, generator)
        t = self.sample_timesteps(b, latents.device, generator)
        self.last_timesteps = t
        pos = pos_embeds.expand(b, *pos_embeds.shape[1:])
        neg = neg_embeds.expand(b, *neg_embeds.shape[1:])
        unet_dtype = next(self.unet.parameters()).dtype

        with torch.no_grad():
            z = latents.detach()
            noisy = self.scheduler.add_noise(z, noise.to(z.dtype), t)
            eps = self.unet(
                torch.cat([noisy, noisy]).to(unet_dtype),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([neg, pos]).to(unet_dtype),
            ).sample.to(z.dtype)
            eps_uncond, eps_text = eps.chunk(2)
            eps_cfg = eps_uncond + self.cfg_scale * (eps_text - eps_uncond)
            x0_real = self._x0(noisy, eps_cfg, t)
            x0_fake = self._x0(noisy, eps_uncond, t)
            w = (z - x0_real).abs().mean(dim=list(range(1, z.dim())), keepdim=True)
            grad = (x0_fake - x0_real) / w
        if reduction == "mean":
            return F.mse_loss(latents, (latents - grad).detach())
        bad = ~torch.isfinite(grad).flatten(1).all(1)
        safe = torch.where(bad.view(-1, *([1] * (grad.dim() - 1))), 0.0, grad)
        per = F.mse_loss(latents, (latents - safe).detach(), reduction="none").flatten(1).mean(1)
        return torch.where(bad, grad.square().flatten(1).mean(1), per)

    def pair_losses(
        self,
        latents: torch.Tensor,
        pos_embeds: torch.Tensor,
        neg_embeds: torch.Tensor,
        pairs: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(pairs,) CSD loss of each frame pair, as the reference's one `cal_csd` call per pair.

        latents (B * pairs, 4, h, w) are sample-major, as `restore_clip` makes them (sample b's
        pair k at b * pairs + k); embeds (B * pairs or 1, 77, D). Each sample's noise is drawn
        once and shared by its pairs (the reference's one `noise_csd`); timesteps are drawn per
        latent (one `torch.randint` per `cal_csd`). A pair's loss is the mse over its B latents;
        a non-finite one carries no gradient (see `forward`'s reduction "none").
        """
        n = latents.shape[0]
        if pairs < 1 or n % pairs:
            raise ValueError(f"{n} latents do not split into {pairs} pairs per sample")
        noise = self.sample_noise(latents, n // pairs, generator).repeat_interleave(pairs, 0)
        per_latent = self(
            latents, pos_embeds, neg_embeds, generator=generator, noise=noise, reduction="none"
        )
        return per_latent.view(n // pairs, pairs).mean(0)


# ---------------------------------------------------------------------------------------------
# LPIPS (VGG) without network access
# ---------------------------------------------------------------------------------------------

# lpips.pretrained_networks.vgg16 splits torchvision's vgg16.features at these indices (end
# exclusive; the last max-pool, index 30, is not used) and keeps the original indices as names.
_VGG16_SLICE_ENDS = (4, 9, 16, 23, 30)


def vgg16_features_to_lpips(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision vgg16 keys `features.N.{weight,bias}` to lpips' `sliceK.N.*` (K 1..5).

    Keys outside `features` (the classifier) are dropped.
    """
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "features":
            continue
        idx = int(parts[1])
        slice_no = next((k + 1 for k, end in enumerate(_VGG16_SLICE_ENDS) if idx < end), None)
        if slice_no is not None:
            out[f"slice{slice_no}.{idx}.{parts[2]}"] = value
    return out


def load_lpips(
    device: torch.device | str = "cpu", vgg_weights: str | os.PathLike | None = None
) -> nn.Module:
    """LPIPS(net='vgg') as in the reference, built without any download.

    The linear layers come from the lpips wheel (`lpips/weights/v0.1/vgg.pth`); the VGG16 trunk
    is loaded from `vgg_weights`, else $DLORAL_VGG16_WEIGHTS, else the torch hub cache
    (`vgg16-397923af.pth`), else `WeightsMissing` is raised. The module is frozen and in eval
    mode; call it as `lpips(pred, gt)` on (N, 3, H, W) images in [-1, 1] -> (N, 1, 1, 1).
    `weights_source` holds the path of the VGG16 file loaded.
    """
    import lpips

    path = locate_vgg16(vgg_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation
        # pnet_rand=True: random trunk, so torchvision downloads nothing.
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = vgg16_features_to_lpips(state)
    try:
        model.net.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a torchvision vgg16 state dict: {err}") from err
    log.info("LPIPS(vgg): trunk from %s", path)
    model.weights_source = str(path)
    return model.to(device).eval().requires_grad_(False)
