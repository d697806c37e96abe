"""Temporal metrics (E*warp, tOF, tLP) and the flow estimators behind them, on real bikes.mp4."""

import socket
import urllib.request

import pytest
import torch
from conftest import read_clip

from dloral.bench.flow import (
    RAFT_ENV,
    RAFT_FILE,
    DisFlow,
    FarnebackFlow,
    RaftFlow,
    load_flow_estimator,
)
from dloral.bench.registry import MetricUnavailable, ewarp_info, tlp_info, tof_info
from dloral.bench.temporal import (
    EWARP_VARIANTS,
    clip_mean,
    ewarp,
    shared_flows,
    tlp,
    tof,
    valid_mask,
)
from dloral.model.spynet import flow_warp


class KnownFlow:
    """Test double: returns registered flows for registered frame pairs, exactly."""

    name = "known flow (test double)"

    def __init__(self):
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, clip: torch.Tensor, fw: torch.Tensor, bw: torch.Tensor | None = None):
        for t in range(clip.shape[0] - 1):
            self.pairs.append((clip[t], clip[t + 1], fw[t]))
            if bw is not None:
                self.pairs.append((clip[t + 1], clip[t], bw[t]))
        return self

    def estimate(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
        out = []
        for a, b in zip(frames_a, frames_b, strict=True):
            hits = [f for pa, pb, f in self.pairs if torch.equal(a, pa) and torch.equal(b, pb)]
            assert hits, "KnownFlow was asked for a pair it does not know"
            out.append(hits[0])
        return torch.stack(out)


def const_flow(n: int, h: int, w: int, dx: float, dy: float) -> torch.Tensor:
    return torch.tensor([dx, dy]).view(1, 2, 1, 1).expand(n, 2, h, w).clone()


def alternating(t: int, amplitude: float) -> torch.Tensor:
    """Per-frame brightness offsets +a, -a, +a, ... as (T, 1, 1, 1)."""
    return amplitude * (1.0 - 2.0 * (torch.arange(t) % 2)).view(-1, 1, 1, 1).float()


@pytest.fixture(scope="module")
def real_clip(bikes_path) -> torch.Tensor:
    """6 consecutive real frames, a 128x128 crop at full resolution (about 10 px motion)."""
    return read_clip(bikes_path, 6, (40, 200, 128, 128), (128, 128))


@pytest.fixture(scope="module")
def warped_clip(bikes_path):
    """Frames that are exact warps of a real frame by known smooth, sub-pixel, varying flows."""
    base = read_clip(bikes_path, 1, (60, 240, 96, 96), (96, 96))[0]
    t, h, w = 5, 96, 96
    gy, gx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    fw = torch.stack(
        [
            torch.stack([1.3 + 0.3 * k + 0.004 * (gy - 48), -0.6 + 0.003 * (gx - 48)])
            for k in range(t - 1)
        ]
    )
    frames = [base]
    for k in reversed(range(t - 1)):  # frame k = frame k+1 warped by fw[k]
        frames.insert(0, flow_warp(frames[0][None], fw[k][None])[0])
    clip = torch.stack(frames)
    return clip, fw, KnownFlow().add(clip, fw, -fw)


def test_ewarp_is_zero_for_exact_warps_and_grows_with_flicker(warped_clip):
    clip, fw, known = warped_clip
    assert valid_mask(fw, -fw).float().mean() > 0.9  # the mask keeps most pixels
    assert ewarp(clip, flow=known).abs().max() < 1e-10
    values = []
    for amp in (0.0, 0.005, 0.01, 0.02, 0.04):
        flickered = clip + alternating(clip.shape[0], amp)  # unclamped: exact expectation
        per_pair = ewarp(flickered, clip, flow=known, flow_on="gt")
        assert per_pair.shape == (clip.shape[0] - 1,)
        torch.testing.assert_close(per_pair, torch.full_like(per_pair, (2 * amp) ** 2))
        values.append(clip_mean(per_pair))
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def test_ewarp_with_dis_flow_on_real_frames(real_clip):
    dis = DisFlow()
    real = ewarp(real_clip, flow=dis)
    flickered = ewarp((real_clip + alternating(6, 0.03)).clamp(0, 1), flow=dis)
    assert real.shape == (5,) and torch.isfinite(real).all()
    assert clip_mean(real) < 0.5e-3  # real motion, compensated: under 0.5 x10^-3
    assert clip_mean(flickered) > 10 * clip_mean(real)
    static = ewarp(real_clip[:1].expand(4, -1, -1, -1).contiguous(), flow=dis)
    assert static.abs().max() < 1e-8


def test_pixels_flowing_out_of_frame_are_excluded(bikes_path):
    wide = read_clip(bikes_path, 1, (40, 150, 64, 120), (64, 120))[0]
    clip = torch.stack([wide[:, :, 5 * t : 5 * t + 64] for t in range(4)])  # pans 5 px right
    n, h, w = 3, 64, 64
    fw, bw = const_flow(n, h, w, -5.0, 0.0), const_flow(n, h, w, 5.0, 0.0)
    known = KnownFlow().add(clip, fw, bw)
    mask = valid_mask(fw, bw)
    assert not mask[..., :5].any() and mask[..., 5:].all()
    assert valid_mask(fw, bw, in_frame_only=False).all()  # Lai's mask alone keeps them
    assert ewarp(clip, flow=known).abs().max() < 1e-12
    lai = ewarp(clip, flow=known, **EWARP_VARIANTS["lai2018"])
    # clamped warp compares the left 5 columns of frame t with column 0 of frame t+1
    edge = clip[1:, :, :, :1].expand(-1, -1, -1, 5)
    expected = ((edge - clip[:-1, :, :, :5]) ** 2).sum(dim=(1, 2, 3)) / (3 * h * w)
    torch.testing.assert_close(lai, expected)
    assert lai.min() > 1e-6  # vs exactly 0 without them


def test_occlusion_mask_forward_backward_and_motion_boundary():
    h, w = 64, 64
    fw = const_flow(1, h, w, 2.0, 1.0)
    bw = -fw.clone()
    bw[..., 20:40, 20:40] = 2.0  # bw disagrees with fw inside a square of frame t+1
    mask = valid_mask(fw, bw)[0, 0]
    assert not mask[25:35, 25:35].any()
    assert mask[45:60, 45:60].all() and mask[:15, :15].all()

    step = torch.zeros(1, 2, h, w)
    step[:, 0, :, w // 2 :] = 3.0
    back = torch.zeros(1, 2, h, w)
    back[:, 0, :, w // 2 + 3 :] = -3.0
    mask = valid_mask(step, back)[0, 0]
    assert not mask[:, w // 2 - 1].any()  # motion boundary (forward difference)
    assert mask[:, : w // 2 - 1].all() and mask[:, w // 2 : w - 3].all()
    assert not mask[:, w - 3 :].any()  # 3 px flow leaves the frame


def test_tof_zero_for_identical_clips_positive_otherwise(real_clip):
    dis = DisFlow()
    assert tof(real_clip, real_clip, flow=dis).abs().max() == 0
    noise = torch.randn(real_clip.shape, generator=torch.Generator().manual_seed(0))
    noisy = (real_clip + 0.03 * noise).clamp(0, 1)
    assert tof(noisy, real_clip, flow=dis).min() > 0.5  # pixels
    assert tof(noisy, real_clip, flow=FarnebackFlow()).min() > 0.1

    gt = real_clip[:3]
    out = gt + 0.01
    f_gt = torch.randn(2, 2, 128, 128, generator=torch.Generator().manual_seed(1))
    known = KnownFlow().add(gt, f_gt).add(out, f_gt + torch.tensor([3.0, 4.0]).view(1, 2, 1, 1))
    torch.testing.assert_close(tof(out, gt, flow=known), torch.full((2,), 5.0))


def test_tlp_formula_with_stand_in_distance(real_clip):
    def mad(a, b):
        return (a - b).abs().mean(dim=(1, 2, 3))

    gt = real_clip
    out = (gt + 0.1 * alternating(6, 1.0)).clamp(0, 1)
    expected = torch.stack(
        [
            (mad(out[t - 1 : t], out[t : t + 1]) - mad(gt[t - 1 : t], gt[t : t + 1])).abs()[0]
            for t in range(1, 6)
        ]
    )
    torch.testing.assert_close(tlp(out, gt, lpips=mad), expected)
    assert tlp(gt, gt, lpips=mad).abs().max() == 0
    still = gt[:1].expand(6, -1, -1, -1)  # changes less than GT: |0 - d_gt| = d_gt
    torch.testing.assert_close(tlp(still, gt, lpips=mad), mad(gt[:-1], gt[1:]))
    with pytest.raises(MetricUnavailable, match="LPIPS"):
        tlp(out, gt)


def test_metric_infos_record_direction_scale_and_flow():
    info = ewarp_info(DisFlow().name)
    assert info.name == "ewarp@evalcrafter" and not info.higher_is_better and info.scale == 1000.0
    assert info.kind == "temporal" and info.level == "pair" and not info.needs_gt
    assert "opencv DIS medium" in info.implementation
    assert ewarp_info("x", flow_on="gt").needs_gt
    assert (
        tof_info("raft_large (x)").needs_gt
        and "raft_large" in tof_info("raft_large").implementation
    )
    assert tlp_info("pyiqa lpips").scale == 100.0 and tlp_info("a").needs_gt
    # which LPIPS ran inside tLP and where its trunk weights are looked for, as for lpips
    impl = tlp_info("pyiqa 0.1 lpips (weights: /x/alexnet-owt-7be5be79.pth)").implementation
    assert "LPIPS v0.1 AlexNet" in impl and "$TORCH_HOME/hub/checkpoints" in impl
    assert "alexnet-owt-7be5be79.pth" in impl
    assert "crop_8x8" in impl and "cutfr 2" in impl


# --- flow estimators -------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty torch hub, no $DLORAL_RAFT_WEIGHTS, and any network access fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(RAFT_ENV, raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def random_raft_file(tmp_path_factory):
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "random_raft_large.pth"
    torch.save(raft_large(weights=None, progress=False).state_dict(), path)
    return path


def test_raft_without_weights_names_file_folder_and_env(offline):
    with pytest.raises(MetricUnavailable) as err:
        load_flow_estimator("raft", device="cpu")
    message = str(err.value)
    assert RAFT_FILE in message and str(offline) in message and RAFT_ENV in message


def test_auto_falls_back_to_dis_and_says_so(offline):
    est = load_flow_estimator("auto", device="cpu")
    assert isinstance(est, DisFlow)
    assert "DIS" in est.name and "fallback" in est.name and RAFT_FILE in est.name


def test_raft_loads_local_weights_and_estimates(offline, random_raft_file, monkeypatch):
    est = load_flow_estimator("raft", device="cpu", weights=random_raft_file, iterations=2)
    assert isinstance(est, RaftFlow)
    assert "raft_large" in est.name and str(random_raft_file) in est.name
    frames = torch.rand(3, 3, 60, 68, generator=torch.Generator().manual_seed(0))
    flow = est.estimate(frames[:2], frames[1:])  # padded to 128x128 and cropped back
    assert flow.shape == (2, 2, 60, 68) and flow.dtype == torch.float32
    assert torch.isfinite(flow).all()

    monkeypatch.setenv(RAFT_ENV, str(random_raft_file))
    assert str(random_raft_file) in load_flow_estimator("raft", device="cpu").name
    monkeypatch.delenv(RAFT_ENV)
    offline.mkdir(parents=True)
    (offline / RAFT_FILE).symlink_to(random_raft_file)
    assert load_flow_estimator("auto", device="cpu").name.startswith("raft_large")


def test_raft_rejects_a_foreign_checkpoint(offline, tmp_path):
    path = tmp_path / "raft-things.pth"
    torch.save({"module.fnet.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(MetricUnavailable, match="not a torchvision raft_large state_dict"):
        load_flow_estimator("raft", device="cpu", weights=path)


class CountingDis(DisFlow):
    """DIS flow that counts the frame pairs it estimates."""

    pairs = 0

    def estimate(self, frames_a, frames_b):
        self.pairs += frames_a.shape[0]
        return super().estimate(frames_a, frames_b)


def test_shared_flows_estimate_each_pair_once_across_metrics_with_equal_values(real_clip):
    noisy = (
        real_clip + 0.02 * torch.randn(real_clip.shape, generator=torch.Generator().manual_seed(3))
    ).clamp(0, 1)
    lai = EWARP_VARIANTS["lai2018"]

    def score(flow):
        # ewarp@lai2018 (fw + bw on the output) and tof (fw on output and gt), chunked differently
        return (
            ewarp(noisy, flow=flow, chunk=2, **lai),
            tof(noisy, real_clip, flow=flow, chunk=8),
            tof(noisy, real_clip, flow=flow, cut=1),
        )

    alone = CountingDis()
    expected = score(alone)
    pairs = len(real_clip) - 1
    assert alone.pairs == 2 * pairs + 2 * pairs + 2 * (pairs - 2)
    shared = CountingDis()
    with shared_flows():
        got = score(shared)
        assert shared.pairs == 3 * pairs  # output fw, output bw, gt fw: each pair once
        noisy.mul_(1.0)  # changed in place: its pairs are estimated again
        tof(noisy, real_clip, flow=shared)
        assert shared.pairs == 4 * pairs
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    tof(noisy, real_clip, flow=shared)  # outside the block nothing is kept
    assert shared.pairs == 6 * pairs
