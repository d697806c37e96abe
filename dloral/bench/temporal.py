"""Temporal metrics of VSR papers: flow warping error E*warp, tOF and tLP; one value per pair.

E*warp (Lai et al., ECCV 2018; phoenix104104/fast_blind_video_consistency `evaluate_WarpError.py`,
`compute_flow_occlusion.py`, `utils.detect_occlusion`). For each pair (t, t+1):
  fw = flow(V_t -> V_t+1), bw = flow(V_t+1 -> V_t), on the video V named by `flow_on`;
  warped = flow_warp(O_t+1, fw) (bilinear, edge-clamped like FlowNet2's Resample2d);
  occluded where |fw + bw(p + fw)|^2 > 0.01 (|fw|^2 + |bw(p + fw)|^2) + 0.5 (forward-backward
  check) or |grad fw_x|^2 + |grad fw_y|^2 > 0.01 |fw|^2 + 0.002 (motion boundary, forward
  differences); and, unless `in_frame_only=False`, where p + fw(p) leaves the frame;
  E_t = sum over valid pixels and RGB channels of (warped - O_t)^2 / (3 * valid pixels), frames
  in [0, 1]. Clip value = mean over pairs; papers print it x1e3 (MetricInfo.scale; the facts and
  MetricInfo of each metric are in dloral.bench.registry).
Choices and peers:
- Lai estimates flow (FlowNet2) on the unprocessed input video, which has the output's size.
  E*warp is also reported on real-world sets without GT (VideoLQ), where flow can only come
  from the output (or the smaller LQ input). STAR (NJU-PCALab/STAR issue #25) follows
  EvalCrafter (evalcrafter/EvalCrafter `metrics/RAFT/optical_flow_scores.py`: RAFT-things,
  20 iterations, on the generated video, frames downscaled x0.5, Lai's mask, squared error
  summed over channels / valid pixels, i.e. 3x Lai's value); DOVE (zhengchen1999/DOVE
  `finetune/scripts/eval_ewarp.py`) runs that code on its outputs alone. Upscale-A-Video,
  MGLD-VSR, DLoRAL and SeedVR publish no E*warp script (MGLD-VSR issues #7 and #30 ask for
  one). Default here: flow on the output, as STAR and DOVE; `flow_on="gt"` is the variant
  closest to Lai's clean-video flow.
- Protocols (dloral.bench.registry names them `ewarp@<protocol>`): EWARP_VARIANTS["lai2018"]
  keeps out-of-frame pixels (compared with the border-clamped warp) as Lai's code does;
  ["evalcrafter"] adds the x0.5 resize, RAFT's replicate padding to multiples of 8 and the sum
  over channels; ["dloral-inframe"] drops out-of-frame pixels (this suite's earlier default).
- A pair with no valid pixel counts 0 in Lai's and EvalCrafter's code (`empty="zero"`), or is
  NaN and skipped by `clip_mean` (`empty="nan"`).
tOF (TecoGAN, thunil/TecoGAN `metrics.py`): mean over pixels of ||flow(O_t-1 -> O_t) -
  flow(G_t-1 -> G_t)||_2 in pixels; TecoGAN uses Farneback (`FarnebackFlow`), crops the flows
  by `crop_8x8` (`tecogan_crop`) and drops the first and last 2 frames (`cut=TECOGAN_CUT`).
tLP (TecoGAN): |LPIPS(O_t-1, O_t) - LPIPS(G_t-1, G_t)|, printed x100 (LPIPS-Alex in TecoGAN),
  on `crop_8x8` frames with the same cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from dloral.bench.flow import FlowEstimator
from dloral.bench.metric import MetricUnavailable
from dloral.model.spynet import flow_coords, flow_warp

__all__ = [
    "EWARP_VARIANTS",
    "TECOGAN_CUT",
    "evalcrafter_pad",
    "tecogan_crop",
    "clip_mean",
    "ewarp",
    "flow_pairs",
    "shared_flows",
    "tlp",
    "tof",
    "valid_mask",
    "warp_errors",
]

# keyword sets for `ewarp`, by protocol: Lai's evaluate_WarpError.py, EvalCrafter's
# compute_video_warping_error (STAR, DOVE), and this suite's earlier in-frame-only variant
EWARP_VARIANTS: dict[str, dict] = {
    "lai2018": {"in_frame_only": False, "channels": "mean", "resize": 1.0, "empty": "zero"},
    "evalcrafter": {
        "in_frame_only": False,
        "channels": "sum",
        "resize": 0.5,
        "empty": "zero",
        "pad8": True,
    },
    "dloral-inframe": {"in_frame_only": True, "channels": "mean", "resize": 1.0, "empty": "nan"},
}
TECOGAN_CUT = 2  # TecoGAN metrics.py `cutfr`: frames dropped at each end of a clip


def tecogan_crop(h: int, w: int) -> tuple[slice, slice]:
    """TecoGAN's `crop_8x8` of an (h, w) frame: the centred region whose sides are the largest
    multiples of 32 at least 16 px shorter than the frame's (8 px or more off each side)."""
    ch, cw = (h // 32) * 32, (w // 32) * 32
    while ch > h - 16:
        ch -= 32
    while cw > w - 16:
        cw -= 32
    if ch <= 0 or cw <= 0:
        raise ValueError(f"TecoGAN's crop_8x8 leaves nothing of a {h}x{w} frame (needs >= 48 px)")
    y, x = (h - ch) // 2, (w - cw) // 2
    return slice(y, y + ch), slice(x, x + cw)


def evalcrafter_pad(frames: torch.Tensor) -> torch.Tensor:
    """RAFT's InputPadder ("sintel" mode, as EvalCrafter): replicate-pad H and W to multiples
    of 8, split evenly (the extra pixel after)."""
    h, w = frames.shape[-2:]
    ph, pw = (-h) % 8, (-w) % 8
    if not ph and not pw:
        return frames
    pad = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]
    return F.pad(frames, pad, mode="replicate")


def _cut(frames: torch.Tensor, cut: int, what: str) -> torch.Tensor:
    """The clip without `cut` frames at each end; needs 2 frames left."""
    if cut == 0:
        return frames
    if frames.shape[0] - 2 * cut < 2:
        raise ValueError(
            f"{what}: {frames.shape[0]} frames; dropping {cut} at each end (TecoGAN's cutfr) "
            f"needs at least {2 * cut + 2}"
        )
    return frames[cut : frames.shape[0] - cut]


LpipsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_clip(name: str, frames: torch.Tensor) -> None:
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] < 2:
        raise ValueError(f"{name} must be a (T >= 2, 3, H, W) clip, got {tuple(frames.shape)}")


def _check_same(output: torch.Tensor, gt: torch.Tensor) -> None:
    _check_clip("output", output)
    if gt.shape != output.shape:
        raise ValueError(f"gt shape {tuple(gt.shape)} differs from output {tuple(output.shape)}")


def flow_pairs(
    frames: torch.Tensor, flow: FlowEstimator, backward: bool = True, chunk: int = 8
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clip (T, 3, H, W) -> forward flows t->t+1 and backward t+1->t, each (T-1, 2, H, W)."""
    fw, bw = [], []
    for i in range(0, frames.shape[0] - 1, chunk):
        a, b = frames[i : i + chunk], frames[i + 1 : i + chunk + 1]
        a = a[: b.shape[0]]
        fw.append(_estimate(flow, a, b))
        if backward:
            bw.append(_estimate(flow, b, a))
    return torch.cat(fw), (torch.cat(bw) if backward else None)


# Within `shared_flows()`: the flow of each frame pair, keyed by what makes it the same pair.
_FLOWS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


@contextmanager
def shared_flows() -> Iterator[None]:
    """Inside this block the flow of a frame pair is estimated once, however many metrics (and
    chunkings) ask for it: the benchmark scores one clip with every flow-based metric. A pair is
    the same pair when both frames are the same memory (same storage, offset, shape, strides,
    dtype, unchanged since: e.g. the same output frames given to tof@dloral and ewarp@lai2018)
    and the estimator is the same object; a resized or padded copy is another pair."""
    global _FLOWS
    outer = _FLOWS
    _FLOWS = {} if outer is None else outer
    try:
        yield
    finally:
        _FLOWS = outer


def _pair_key(flow: FlowEstimator, a: torch.Tensor, b: torch.Tensor) -> tuple:
    def frame(x: torch.Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)

    return (id(flow), frame(a), frame(b))


def _estimate(flow: FlowEstimator, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """flow.estimate(a, b) as float, (N, 2, H, W); pairs seen before inside shared_flows() are
    not estimated again."""
    if _FLOWS is None:
        return flow.estimate(a, b).float()
    keys = [_pair_key(flow, x, y) for x, y in zip(a, b, strict=True)]
    missing = [k for k, key in enumerate(keys) if key not in _FLOWS]
    if missing:
        new = flow.estimate(a[missing], b[missing]).float()
        for k, f in zip(missing, new, strict=True):
            _FLOWS[keys[k]] = (a[k], b[k], f)  # the frames stay alive: their memory is not reused
    return torch.stack([_FLOWS[key][2] for key in keys])


def _sq(v: torch.Tensor) -> torch.Tensor:
    return (v * v).sum(1, keepdim=True)


def valid_mask(fw: torch.Tensor, bw: torch.Tensor, in_frame_only: bool = True) -> torch.Tensor:
    """(N, 1, H, W) bool: pixels of frame t kept by Lai's occlusion test (and in-frame test)."""
    bw_at = flow_warp(bw, fw, padding_mode="border")  # bw sampled where fw lands
    occluded = _sq(fw + bw_at) > 0.01 * (_sq(fw) + _sq(bw_at)) + 0.5
    du = torch.zeros_like(fw)
    dv = torch.zeros_like(fw)
    du[..., :, :-1] = fw[..., :, :-1] - fw[..., :, 1:]
    dv[..., :-1, :] = fw[..., :-1, :] - fw[..., 1:, :]
    occluded |= _sq(du) + _sq(dv) > 0.01 * _sq(fw) + 0.002
    valid = ~occluded
    if in_frame_only:
        h, w = fw.shape[-2:]
        px, py = flow_coords(fw)
        tol = 1e-3
        inside = (px >= -tol) & (px <= w - 1 + tol) & (py >= -tol) & (py <= h - 1 + tol)
        valid &= inside.unsqueeze(1)
    return valid


def warp_errors(
    frames_t: torch.Tensor,
    frames_next: torch.Tensor,
    fw: torch.Tensor,
    bw: torch.Tensor,
    in_frame_only: bool = True,
    channels: str = "mean",
    empty: str = "nan",
) -> torch.Tensor:
    """(N, 3, H, W) pairs and their flows -> (N,) masked squared error of warped t+1 vs t.
    A pair with no valid pixel gives NaN (`empty="nan"`) or 0 (`"zero"`, Lai and EvalCrafter)."""
    if channels not in ("mean", "sum"):
        raise ValueError(f"channels must be 'mean' (Lai) or 'sum' (EvalCrafter); got {channels!r}")
    valid = valid_mask(fw, bw, in_frame_only).float()
    warped = flow_warp(frames_next.float(), fw, padding_mode="border")
    sq_err = ((warped - frames_t.float()) ** 2 * valid).sum(dim=(1, 2, 3))
    count = valid.sum(dim=(1, 2, 3)) * (frames_t.shape[1] if channels == "mean" else 1)
    fill = math.nan if empty == "nan" else 0.0
    return torch.where(count > 0, sq_err / count.clamp_min(1), torch.full_like(sq_err, fill))


def _resize(frames: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1.0:
        return frames
    return F.interpolate(frames, scale_factor=factor, mode="bilinear", align_corners=False)


def ewarp(
    output: torch.Tensor,
    gt: torch.Tensor | None = None,
    *,
    flow: FlowEstimator,
    flow_on: str = "output",
    in_frame_only: bool = True,
    channels: str = "mean",
    resize: float = 1.0,
    empty: str = "nan",
    pad8: bool = False,
    chunk: int = 8,
) -> torch.Tensor:
    """E*warp per pair (T-1,), unscaled (x1e3 to print); flow from `output` or `gt` frames.
    `pad8`: frames replicate-padded to multiples of 8 after resizing, and the padding scored
    (EvalCrafter, through RAFT's InputPadder)."""
    _check_clip("output", output)
    if flow_on == "gt":
        if gt is None:
            raise ValueError("flow_on='gt' needs the gt clip")
        _check_same(output, gt)
    elif flow_on != "output":
        raise ValueError(f"flow_on must be 'output' or 'gt'; got {flow_on!r}")
    out = _resize(output.float(), resize)
    source = out if flow_on == "output" else _resize(gt.float(), resize)
    if pad8:
        out, source = evalcrafter_pad(out), evalcrafter_pad(source)
    values = []
    for i in range(0, out.shape[0] - 1, chunk):
        j = min(i + chunk, out.shape[0] - 1)
        fw, bw = flow_pairs(source[i : j + 1], flow, chunk=chunk)
        values.append(
            warp_errors(out[i:j], out[i + 1 : j + 1], fw, bw, in_frame_only, channels, empty)
        )
    return torch.cat(values)


def tof(
    output: torch.Tensor,
    gt: torch.Tensor,
    *,
    flow: FlowEstimator,
    crop: bool = False,
    cut: int = 0,
    chunk: int = 8,
) -> torch.Tensor:
    """tOF per pair: mean_p ||flow_out(t-1 -> t) - flow_gt(t-1 -> t)||_2, in pixels; (T-1,)
    values, or (T-1-2*cut,) for the pairs of frames cut..T-1-cut. `crop`: flows (computed on
    whole frames) cropped by TecoGAN's crop_8x8 before the mean."""
    _check_same(output, gt)
    output, gt = _cut(output, cut, "tof"), _cut(gt, cut, "tof")
    fw_out, _ = flow_pairs(output, flow, backward=False, chunk=chunk)
    fw_gt, _ = flow_pairs(gt, flow, backward=False, chunk=chunk)
    diff = fw_out - fw_gt
    if crop:
        rows, cols = tecogan_crop(*diff.shape[-2:])
        diff = diff[..., rows, cols]
    return diff.norm(dim=1).mean(dim=(1, 2))


def tlp(
    output: torch.Tensor,
    gt: torch.Tensor,
    *,
    lpips: LpipsFn | None = None,
    crop: bool = False,
    cut: int = 0,
) -> torch.Tensor:
    """tLP per pair, unscaled (x100 to print); lpips(a, b) -> (N,) on [0, 1] RGB. `crop`,
    `cut`: frames cropped by TecoGAN's crop_8x8 before LPIPS, ends dropped, as `tof`."""
    if lpips is None:
        raise MetricUnavailable(
            "tLP needs an LPIPS distance: pass lpips=callable((N,3,H,W), (N,3,H,W)) -> (N,) on "
            "[0, 1] RGB, e.g. the pyiqa LPIPS from dloral.bench.iqa (its weights in pyiqa's cache)"
        )
    _check_same(output, gt)
    output, gt = _cut(output, cut, "tlp"), _cut(gt, cut, "tlp")
    if crop:
        rows, cols = tecogan_crop(*output.shape[-2:])
        output, gt = output[..., rows, cols], gt[..., rows, cols]
    d_out = torch.as_tensor(lpips(output[:-1], output[1:])).reshape(-1).float()
    d_gt = torch.as_tensor(lpips(gt[:-1], gt[1:])).reshape(-1).float()
    return (d_out - d_gt.to(d_out.device)).abs()


def clip_mean(values: torch.Tensor) -> float:
    """Clip value from per-pair values: mean over pairs, NaN pairs (nothing valid) left out."""
    return float(torch.nanmean(values.float()))
