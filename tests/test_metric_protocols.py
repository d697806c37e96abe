"""Each temporal metric protocol against a literal numpy/cv2 transcription of its published code,
on a real photo panned by known shifts, both sides fed the same flows (or distance), to 1e-6.

Transcribed (the flow network's output and LPIPS are the inputs both sides share):
- tof@tecogan, tlp@tecogan: thunil/TecoGAN metrics.py (cutfr = 2, crop_8x8, Farneback on
  cv2 RGB2GRAY, |d0t - d1t| * 100 with LPIPS on [-1, 1] images).
- ewarp@lai2018: phoenix104104/fast_blind_video_consistency evaluate_WarpError.py with
  utils.detect_occlusion called as compute_flow_occlusion.py does, Resample2d (FlowNet2).
- ewarp@evalcrafter: evalcrafter/EvalCrafter metrics/RAFT/optical_flow_scores.py
  compute_video_warping_error with warp_utils.detect_occlusion and RAFT's InputPadder.
"""

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from dloral.bench.flow import DisFlow, FarnebackFlow
from dloral.bench.registry import METRICS, resolve
from dloral.bench.suite import SuiteError, check_metrics
from dloral.bench.temporal import EWARP_VARIANTS, ewarp, tecogan_crop, tlp, tof

H, W, T = 100, 132, 8  # not multiples of 32 (crop_8x8 bites) nor, halved, of 8 (padding)
SHIFTS = [(0, 0), (3, 1), (7, 2), (10, 4), (14, 5), (17, 7), (21, 8), (24, 10)]  # (dx, dy)


def to_u8_float(x: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 frames -> float (T, 3, H, W) k/255, as a decoder gives them."""
    return torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def clips():
    """GT: a scikit-image photo panned by known shifts; output: the same with a per-frame
    blur and brightness flicker (a VSR output that is not temporally stable). uint8 frames."""
    photo = data.astronaut()
    gt = [
        np.ascontiguousarray(photo[100 + dy : 100 + dy + H, 150 + dx : 150 + dx + W])
        for dx, dy in SHIFTS
    ]
    out = []
    for t, frame in enumerate(gt):
        blurred = cv2.GaussianBlur(frame, (5, 5), 0.6 + 0.3 * (t % 3))
        flicker = 6.0 * (1 if t % 2 else -1)
        out.append(np.clip(blurred.astype(np.float64) + flicker, 0, 255).round().astype(np.uint8))
    return gt, out


class SameFlow:
    """Test double around OpenCV DIS: a pair of frames always gets the same flow, whichever
    side (ours or the transcription) asks first."""

    name = "DIS medium, memoised (test double)"

    def __init__(self):
        self.dis, self.memo = DisFlow(), {}

    def estimate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = []
        for x, y in zip(a, b, strict=True):
            key = (x.shape, x.numpy().tobytes(), y.numpy().tobytes())
            if key not in self.memo:
                self.memo[key] = self.dis.estimate(x[None], y[None])[0]
            out.append(self.memo[key])
        return torch.stack(out)

    def numpy(self, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        """flow of (1, 3, h, w) a -> b as an HxWx2 float32 array (the .flo layout)."""
        return self.estimate(a, b)[0].permute(1, 2, 0).numpy().astype(np.float32)


# ---- transcriptions --------------------------------------------------------------------------


def resample2d(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """FlowNet2 Resample2d (kernel_size 1): bilinear at p + flow, indices clamped to the frame."""
    h, w = flow.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    xf, yf = xs + flow[..., 0], ys + flow[..., 1]
    alpha, beta = xf - np.floor(xf), yf - np.floor(yf)
    x_l = np.clip(np.floor(xf).astype(int), 0, w - 1)
    x_r = np.clip(np.floor(xf).astype(int) + 1, 0, w - 1)
    y_t = np.clip(np.floor(yf).astype(int), 0, h - 1)
    y_b = np.clip(np.floor(yf).astype(int) + 1, 0, h - 1)
    a, b = alpha[..., None], beta[..., None]
    return (
        (1 - a) * (1 - b) * img[y_t, x_l]
        + a * (1 - b) * img[y_t, x_r]
        + (1 - a) * b * img[y_b, x_l]
        + a * b * img[y_b, x_r]
    )


def compute_flow_magnitude(flow):
    return flow[:, :, 0] ** 2 + flow[:, :, 1] ** 2


def compute_flow_gradients(flow):
    h, w = flow.shape[:2]
    flow_x_du, flow_x_dv = np.zeros((h, w)), np.zeros((h, w))
    flow_y_du, flow_y_dv = np.zeros((h, w)), np.zeros((h, w))
    flow_x, flow_y = flow[:, :, 0], flow[:, :, 1]
    flow_x_du[:, :-1] = flow_x[:, :-1] - flow_x[:, 1:]
    flow_x_dv[:-1, :] = flow_x[:-1, :] - flow_x[1:, :]
    flow_y_du[:, :-1] = flow_y[:, :-1] - flow_y[:, 1:]
    flow_y_dv[:-1, :] = flow_y[:-1, :] - flow_y[1:, :]
    return flow_x_du, flow_x_dv, flow_y_du, flow_y_dv


def detect_occlusion(fw_flow, bw_flow):
    """utils.detect_occlusion; called (bw_flow, fw_flow) as compute_flow_occlusion.py does."""
    fw_flow_w = resample2d(fw_flow, bw_flow)
    fb_flow_sum = fw_flow_w + bw_flow
    fb_flow_mag = compute_flow_magnitude(fb_flow_sum)
    fw_flow_w_mag = compute_flow_magnitude(fw_flow_w)
    bw_flow_mag = compute_flow_magnitude(bw_flow)
    mask1 = fb_flow_mag > 0.01 * (fw_flow_w_mag + bw_flow_mag) + 0.5
    fx_du, fx_dv, fy_du, fy_dv = compute_flow_gradients(bw_flow)
    fx_mag = fx_du**2 + fx_dv**2
    fy_mag = fy_du**2 + fy_dv**2
    mask2 = (fx_mag + fy_mag) > 0.01 * bw_flow_mag + 0.002
    mask = np.logical_or(mask1, mask2)
    occlusion = np.zeros((fw_flow.shape[0], fw_flow.shape[1]))
    occlusion[mask == 1] = 1
    return occlusion


def lai_warp_errors(frames: list[np.ndarray], flow: SameFlow) -> list[float]:
    """evaluate_WarpError.py's per-pair terms, err / (len - 1) taken by the caller."""
    errs = []
    for t in range(1, len(frames)):
        img1 = np.float32(frames[t - 1]) / 255.0  # read_img
        img2 = np.float32(frames[t]) / 255.0
        a, b = to_u8_float([frames[t - 1]]), to_u8_float([frames[t]])
        fw_flow, bw_flow = flow.numpy(a, b), flow.numpy(b, a)
        occ_mask = detect_occlusion(bw_flow, fw_flow)  # saved as a PNG and read as 3 channels
        occ_mask = np.repeat(occ_mask[..., None], 3, axis=2)
        noc_mask = 1 - occ_mask
        warp_img2 = resample2d(img2, fw_flow)
        diff = np.multiply(warp_img2 - img1, noc_mask)
        n = np.sum(noc_mask)
        if n == 0:
            n = diff.shape[0] * diff.shape[1] * diff.shape[2]
        errs.append(np.sum(np.square(diff)) / n)
    return errs


class InputPadder:
    """RAFT core/utils/utils.py InputPadder, mode 'sintel'."""

    def __init__(self, dims):
        self.ht, self.wd = dims[-2:]
        pad_ht = (((self.ht // 8) + 1) * 8 - self.ht) % 8
        pad_wd = (((self.wd // 8) + 1) * 8 - self.wd) % 8
        self._pad = [pad_wd // 2, pad_wd - pad_wd // 2, pad_ht // 2, pad_ht - pad_ht // 2]

    def pad(self, *inputs):
        return [F.pad(x, self._pad, mode="replicate") for x in inputs]


def evalcrafter_warp_errors(frames: list[np.ndarray], flow: SameFlow) -> list[float]:
    """compute_video_warping_error's per-pair terms (Num = len(frames), every frame)."""
    tensor_frames = torch.stack([torch.from_numpy(frame) for frame in frames])
    errs = []
    for i in range(len(frames) - 1):
        img1 = tensor_frames[i].permute(2, 0, 1).float().unsqueeze(0) / 255.0
        img2 = tensor_frames[i + 1].permute(2, 0, 1).float().unsqueeze(0) / 255.0
        img1 = F.interpolate(img1, scale_factor=0.5, mode="bilinear", align_corners=False)
        img2 = F.interpolate(img2, scale_factor=0.5, mode="bilinear", align_corners=False)
        padder = InputPadder(img1.shape)
        img1, img2 = padder.pad(img1, img2)
        fw_flow = flow.numpy(img1, img2)
        bw_flow = flow.numpy(img2, img1)
        # warp_utils.detect_occlusion(bw_flow, fw_flow, img2): the same mask, and img2 warped
        fw_occ = detect_occlusion(bw_flow, fw_flow)
        warp_img2 = resample2d(img2[0].permute(1, 2, 0).double().numpy(), fw_flow)
        noc_mask = (1 - fw_occ)[..., None]  # (h, w) against (1, 3, h, w): one per pixel
        diff = (warp_img2 - img1[0].permute(1, 2, 0).double().numpy()) * noc_mask
        diff_squared = diff**2
        n = np.sum(noc_mask)
        if n == 0:
            n = diff_squared.size
        errs.append(np.sum(diff_squared) / n)
    return errs


def crop_8x8(img):
    ori_h, ori_w = img.shape[0], img.shape[1]
    h, w = (ori_h // 32) * 32, (ori_w // 32) * 32
    while h > ori_h - 16:
        h = h - 32
    while w > ori_w - 16:
        w = w - 32
    y, x = (ori_h - h) // 2, (ori_w - w) // 2
    return img[y : y + h, x : x + w], y, x


def tecogan_metrics(result: list[np.ndarray], target: list[np.ndarray], dist):
    """TecoGAN metrics.py's loop over one folder: tOF and tLP (x100) lists, in its order."""
    cutfr = 2
    image_no = len(target)
    tof_list, tlpips_list = [], []
    pre_out_grey = pre_tar_grey = pre_img0 = pre_img1 = None  # set at frame cutfr
    for i in range(cutfr, image_no - cutfr):
        output_img, target_img = result[i], target[i]
        output_grey = cv2.cvtColor(output_img, cv2.COLOR_RGB2GRAY)
        target_grey = cv2.cvtColor(target_img, cv2.COLOR_RGB2GRAY)
        if i > cutfr:
            target_of = cv2.calcOpticalFlowFarneback(
                pre_tar_grey, target_grey, None, 0.5, 3, 15, 3, 5, 1.2, 0
            )
            output_of = cv2.calcOpticalFlowFarneback(
                pre_out_grey, output_grey, None, 0.5, 3, 15, 3, 5, 1.2, 0
            )
            target_of, _, _ = crop_8x8(target_of)
            output_of, _, _ = crop_8x8(output_of)
            of_diff = np.absolute(target_of - output_of)
            of_diff = np.sqrt(np.sum(of_diff * of_diff, axis=-1))
            tof_list.append(of_diff.mean())
        pre_out_grey, pre_tar_grey = output_grey, target_grey
        target_img, _, _ = crop_8x8(target_img)
        output_img, _, _ = crop_8x8(output_img)
        img0 = im2tensor(target_img)
        img1 = im2tensor(output_img)
        if i > cutfr:
            dist0t = dist(pre_img0, img0)
            dist1t = dist(pre_img1, img1)
            tlpips_list.append(np.absolute(dist0t - dist1t) * 100.0)
        pre_img0, pre_img1 = img0, img1
    return tof_list, tlpips_list


def im2tensor(image, cent=1.0, factor=255.0 / 2.0):
    """LPIPSmodels util.im2tensor: HxWx3 uint8 -> (1, 3, H, W) in [-1, 1]."""
    return torch.Tensor((image / factor - cent)[:, :, :, np.newaxis].transpose((3, 2, 0, 1)))


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A stand-in for LPIPS (its weights are not here): per-item RMS difference, [0, 1] input."""
    return ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3)).sqrt()


# ---- the protocols against them ---------------------------------------------------------------


def test_bare_names_resolve_to_the_published_default_protocols():
    assert [resolve(n) for n in ("ewarp", "tof", "tlp", "psnr")] == [
        "ewarp@evalcrafter",
        "tof@tecogan",
        "tlp@tecogan",
        "psnr",
    ]
    assert all(resolve(n) in METRICS for n in ("ewarp", "tof", "tlp"))
    assert check_metrics(["tof", "tof@dloral", "ewarp@lai2018"]) == (
        "tof@tecogan",
        "tof@dloral",
        "ewarp@lai2018",
    )
    with pytest.raises(SuiteError, match=r"unknown metric\(s\) tof@foo; valid: .*tof@tecogan"):
        check_metrics(["tof@foo"])


def test_tecogan_crop_is_crop_8x8():
    for h, w in ((100, 132), (64, 64), (480, 720), (144, 176), (49, 50)):
        img = np.arange(h * w).reshape(h, w)
        rows, cols = tecogan_crop(h, w)
        np.testing.assert_array_equal(img[rows, cols], crop_8x8(img)[0])
    with pytest.raises(ValueError, match="32x40"):
        tecogan_crop(32, 40)


def test_tof_at_tecogan_matches_tecogan_metrics_py(clips):
    gt, out = clips
    expected, _ = tecogan_metrics(out, gt, rms)
    ours = tof(to_u8_float(out), to_u8_float(gt), flow=FarnebackFlow(), crop=True, cut=2)
    assert len(expected) == T - 5 and ours.shape == (T - 5,)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    # the whole-frame variant (tof@dloral) is another number on the same clip
    whole = tof(to_u8_float(out), to_u8_float(gt), flow=FarnebackFlow())
    assert abs(float(whole[2:-2].mean()) - float(ours.mean())) > 1e-3


def test_tlp_at_tecogan_matches_tecogan_metrics_py(clips):
    gt, out = clips

    def dist_of_minus1_1(a, b):  # TecoGAN feeds [-1, 1] images; the stand-in takes [0, 1]
        return rms((a + 1) / 2, (b + 1) / 2).numpy()

    _, expected = tecogan_metrics(out, gt, dist_of_minus1_1)
    ours = tlp(to_u8_float(out), to_u8_float(gt), lpips=rms, crop=True, cut=2) * 100.0
    np.testing.assert_allclose(ours.numpy(), np.concatenate(expected), rtol=1e-6)


def test_ewarp_at_lai2018_matches_evaluate_warp_error(clips):
    _, out = clips
    flow = SameFlow()
    expected = lai_warp_errors(out, flow)
    ours = ewarp(to_u8_float(out), flow=flow, **EWARP_VARIANTS["lai2018"])
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    assert math.isclose(float(ours.mean()), float(np.mean(expected)), rel_tol=1e-6)
    # panning: pixels leaving the frame count here and not in the in-frame variant
    inframe = ewarp(to_u8_float(out), flow=flow, **EWARP_VARIANTS["dloral-inframe"])
    assert not np.allclose(inframe.numpy(), expected, rtol=1e-3)


def test_ewarp_at_evalcrafter_matches_compute_video_warping_error(clips):
    _, out = clips
    flow = SameFlow()
    expected = evalcrafter_warp_errors(out, flow)
    ours = ewarp(to_u8_float(out), flow=flow, **EWARP_VARIANTS["evalcrafter"])
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    lai = ewarp(to_u8_float(out), flow=flow, **EWARP_VARIANTS["lai2018"])
    assert not np.allclose(ours.numpy(), lai.numpy(), rtol=0.1)  # another number


def test_a_pair_with_no_valid_pixel_counts_zero_in_the_published_protocols():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    class Wild:  # flows that fail every forward-backward check
        name = "wild"

        def estimate(self, x, y):
            return torch.full((x.shape[0], 2, 16, 16), 5.0)

    assert ewarp(a, flow=Wild(), **EWARP_VARIANTS["lai2018"]).tolist() == [0.0]
    assert torch.isnan(ewarp(a, flow=Wild(), **EWARP_VARIANTS["dloral-inframe"])).all()
