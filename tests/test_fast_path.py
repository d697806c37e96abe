"""The upscaler's speed levers (channels_last, overlapped host copies), its reference-like
re-encoding of the previous frame and its stage profile, on real frames with the tiny profile."""

import copy
import time

import pytest
import torch
import torch.nn.functional as F

from dloral.model import lora
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.model.pipeline import StageTimes, UpscaleOptions, VideoUpscaler

CPU = torch.device("cpu")
# fp32 on both paths: channels_last only changes the order in which the convolutions sum, i.e.
# rounding, which the random-init tiny network amplifies with depth and frame size: measured
# 8e-6 at this test's 64x96 output and 9e-5 at 192x256. 5e-4 is an eighth of an 8-bit step
# (1/255): written frames differ by at most one level, and only at rounding boundaries.
FAST_TOLERANCE = 5e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine, more spin against other processes (runs
    were 20x slower with 2 threads under load) and these are checks of values, not of speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> DLoRAL:
    model = DLoRAL(DLoRALConfig.from_dict({"seed": 0}))
    lora.randomize_lora_b(model.unet, generator=torch.Generator().manual_seed(0))
    model.merge_lora()
    return model


OPTS = {"process_size": 0, "batch_size": 1}  # 2 frames: 2 batches, the state carried across


def _run(up, frames):
    out = list(up.upscale((f"{i:04d}.png", f) for i, f in enumerate(frames)))
    return [n for n, _ in out], torch.stack([f for _, f in out])


@pytest.fixture(scope="module")
def plain(bikes_lq):
    """A tiny model, 2 real bikes frames at 16x24 (64x96 out) and the plain path's output."""
    model, frames = _model(), F.interpolate(bikes_lq[:2], size=(16, 24), mode="area")
    names, sr = _run(
        VideoUpscaler(copy.deepcopy(model), CPU, options=UpscaleOptions(**OPTS)), frames
    )
    return model, frames, names, sr


def test_fast_levers_give_the_plain_paths_frames_within_tolerance(plain):
    model, frames, names_plain, sr_plain = plain
    levers = UpscaleOptions(**OPTS, channels_last=True, overlap_copy=True)
    fast = VideoUpscaler(copy.deepcopy(model), CPU, options=levers)
    conv = fast.model.vae.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.dim() == 4
    names_fast, sr_fast = _run(fast, frames)
    assert names_fast == names_plain == ["0000.png", "0001.png"]
    assert sr_fast.shape == sr_plain.shape == (2, 3, 64, 96)
    diff = float((sr_fast - sr_plain).abs().max())
    assert diff <= FAST_TOLERANCE, diff


def test_reencoding_the_previous_frame_encodes_twice_and_restores_the_same(plain):
    model, frames, _, sampled_carry = plain
    model = copy.deepcopy(model)
    encode, encoded = model.encode, []

    def counting(x, *args, **kw):
        encoded.append(encode(x, *args, **kw))
        return encoded[-1]

    model.encode = counting
    out, latents = {}, {}
    for previous, sample in (("carry", False), ("reencode", False), ("reencode", True)):
        encoded.clear()
        opts = UpscaleOptions(**OPTS, previous=previous, sample_latent=sample)
        out[previous, sample] = _run(VideoUpscaler(model, CPU, options=opts), frames)[1]
        # each frame is encoded once; re-encoding adds the previous frame of every pair
        assert sum(z.shape[0] for z in encoded) == (2 if previous == "carry" else 4), previous
        latents[previous, sample] = list(encoded)
    # the posterior mean is deterministic: re-encoding the previous frame gives its latent again
    same = float((out["reencode", False] - out["carry", False]).abs().max())
    assert same <= 1e-5, same
    # sampled, the re-encoded previous latent is a new draw (as in the reference): batch 2
    # encodes frame 1 as current, then frame 0 again as its previous; frame 0's own draw came
    # in batch 1. Their means are the same, so the draws differ by posterior-std-sized noise.
    (first, _prev_of_first, _current, prev_of_second) = latents["reencode", True]
    mean = latents["reencode", False][0]
    assert float((prev_of_second - first).abs().mean()) > 0.2 * float((first - mean).abs().mean())
    # and the outputs move away from the carried path's
    assert float((out["reencode", True] - sampled_carry).abs().max()) > 1e-4


def test_stage_profile_covers_every_stage_and_leaves_the_model_unhooked(plain):
    model, frames, _, sr_plain = plain
    up = VideoUpscaler(copy.deepcopy(model), CPU, options=UpscaleOptions(**OPTS))
    up.stage_times = StageTimes(CPU)
    start = time.perf_counter()
    _, profiled = _run(up, frames)
    wall = time.perf_counter() - start
    up.stage_times, times = None, up.stage_times
    assert torch.equal(profiled, sr_plain)  # synchronising changes no arithmetic
    assert times.frames == 2
    assert set(times.seconds) == set(StageTimes.STAGES)
    assert all(s > 0 for s in times.seconds.values()), times.seconds
    # stages are disjoint slices of the run: they add up to less than its wall time
    assert sum(times.seconds.values()) <= wall
    assert times.seconds["unet"] > times.seconds["host_copy"]
    assert times.per_frame()["unet"] == times.seconds["unet"] / 2
    for module in (up.model.unet, up.model.cfr):
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_upsampling_as_on_cuda_gives_the_host_paths_frames(plain, monkeypatch):
    """On CUDA the LQ batch is upsampled on the device, by PIL's taps as matrix products; here
    that path is forced on CPU and compared with PIL's (the reference's) on the same frames."""
    from dloral.model import pipeline
    from dloral.resize import resize_frames

    model, frames, names_plain, sr_plain = plain
    calls = []

    def as_on_cuda(x, size, kernel="bicubic"):
        calls.append(size)
        return resize_frames(x, size, kernel, backend="torch")

    monkeypatch.setattr(pipeline, "resize_frames", as_on_cuda)
    up = VideoUpscaler(copy.deepcopy(model), CPU, options=UpscaleOptions(**OPTS))
    names, sr = _run(up, frames)
    assert calls == [(64, 96), (64, 96)]  # one upsampling per batch, all by the device path
    assert names == names_plain and (sr - sr_plain).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="upsample_on must be one of"):
        UpscaleOptions(upsample_on="gpu")
