import pytest
import torch
from conftest import read_clip as real_clip
from torch.utils.data import DataLoader

from dloral.data.frames import write_png
from dloral.data.readers import read_dataset
from dloral.data.sampler import SamplerConfig, StagedClips, TrainingClips, worker_indices
from dloral.resize import bi_downsample


@pytest.fixture(scope="module")
def train_root(tmp_path_factory, bikes_path):
    root = tmp_path_factory.mktemp("train")
    frames = real_clip(bikes_path, 6, (0, 100, 96, 128), (96, 128))
    for i, f in enumerate(frames):
        write_png(f, root / "bikes" / f"{i:05d}.png")
    still = frames[0]
    for i in range(2):  # a static clip: identical frames
        write_png(still, root / "still" / f"{i:05d}.png")
    return root


def _dataset(root, **cfg):
    clips = read_dataset("youhq", root).clips
    return TrainingClips(clips, SamplerConfig(**{"crop": 64, "samples": 8, **cfg}))


def test_sample_shapes_and_ranges(train_root):
    item = _dataset(train_root)[0]
    assert item["gt"].shape == (3, 3, 64, 64) and item["lq"].shape == (3, 3, 16, 16)
    for key in ("gt", "lq"):
        assert 0 <= float(item[key].min()) and float(item[key].max()) <= 1


def test_same_seed_same_sample_and_indices_differ(train_root):
    a, b = _dataset(train_root, seed=3), _dataset(train_root, seed=3)
    assert torch.equal(a[2]["gt"], b[2]["gt"]) and torch.equal(a[2]["lq"], b[2]["lq"])
    assert not torch.equal(a[2]["lq"], a[3]["lq"])
    assert not torch.equal(a[2]["lq"], _dataset(train_root, seed=4)[2]["lq"])


def test_workers_give_the_same_batches(train_root):
    ds = _dataset(train_root, seed=1)
    plain = [b["lq"] for b in DataLoader(ds, batch_size=4, num_workers=0)]
    workers = [b["lq"] for b in DataLoader(ds, batch_size=4, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(plain, workers, strict=True))


def test_transforms_and_degradation_are_shared_by_all_frames_but_the_noise_sample(train_root):
    still = [c for c in read_dataset("youhq", train_root).clips if c.name == "still"]
    frozen = TrainingClips(
        still, SamplerConfig(crop=64, samples=6, frames=3, per_frame_noise=False)
    )
    fresh = TrainingClips(still, SamplerConfig(crop=64, samples=6, frames=3))  # the default
    for i in range(len(frozen)):
        item, noisy = frozen[i], fresh[i]  # 2 identical frames, padded to 3 by repeating the last
        assert all(torch.equal(item["gt"][0], f) for f in item["gt"])
        assert torch.equal(item["gt"], noisy["gt"])  # the same crop and transform
        assert all(torch.equal(item["lq"][0], f) for f in item["lq"])  # one frozen noise field
        # each frame its own noise sample, of the same level: frames differ, by about as much
        # as each differs from the frozen clip's frame
        apart = (noisy["lq"][0] - noisy["lq"][1]).abs().mean()
        from_frozen = (noisy["lq"][0] - item["lq"][0]).abs().mean()
        assert apart > 0 and 0.5 < float(apart / from_frozen) < 2


def test_frames_are_consecutive_ground_truth(train_root):
    ds = _dataset(train_root, augment="none", crop=96)
    item = ds[0]
    clip = next(c for c in ds.clips if c.name == item["clip"])
    frames = [f for _, f in clip.gt.frames()]
    start = item["start"]
    for k in range(3):  # a 96-high clip: the crop spans the full height, offset only in x
        full = frames[start + k]
        matches = [torch.equal(item["gt"][k], full[:, :, x : x + 96]) for x in range(33)]
        assert any(matches)


def test_crop_larger_than_clips_is_an_error(train_root):
    with pytest.raises(ValueError, match="smaller than the 128px crop"):
        _dataset(train_root, crop=128)


def _window_x(frame, full, width):
    """The x offsets at which `frame` is a full-height window of `full`."""
    return [
        x for x in range(full.shape[-1] - width + 1) if torch.equal(frame, full[..., x : x + width])
    ]


def test_frame_stride_takes_every_nth_frame(train_root):
    ds = _dataset(train_root, augment="none", crop=96, frame_stride=2, samples=6)
    for i in range(len(ds)):
        item = ds[i]
        clip = next(c for c in ds.clips if c.name == item["clip"])
        frames = [f for _, f in clip.gt.frames()]
        if item["clip"] == "bikes":  # 6 frames: starts 0 or 1, then every 2nd frame
            assert item["start"] in (0, 1)
            for k in range(3):
                assert _window_x(item["gt"][k], frames[item["start"] + 2 * k], 96)
        else:  # 2 frames and a stride of 2: one frame, repeated
            assert item["start"] in (0, 1)
            assert all(torch.equal(item["gt"][0], f) for f in item["gt"])


def test_disk_lq_is_cropped_on_the_lq_grid_and_never_degraded(tmp_path, bikes_path):
    frames = real_clip(bikes_path, 4, (0, 100, 96, 160), (96, 160))
    for i, (gt, lq) in enumerate(zip(frames, bi_downsample(frames, 4), strict=True)):
        write_png(gt, tmp_path / "gt" / "bikes" / f"{i:05d}.png")
        write_png(lq, tmp_path / "lq" / "bikes" / f"{i:05d}.png")
    clips = read_dataset("youhq", tmp_path / "gt", lq_root=tmp_path / "lq").clips
    cfg = SamplerConfig(crop=96, samples=6, augment="none")
    ds = TrainingClips(clips, cfg, degradation=_fail, disk_lq=True)
    lq_full = [f for _, f in clips[0].lq.frames()]
    gt_full = [f for _, f in clips[0].gt.frames()]
    for i in range(len(ds)):
        item = ds[i]
        assert item["gt"].shape == (3, 3, 96, 96) and item["lq"].shape == (3, 3, 24, 24)
        for k in range(3):
            (x,) = _window_x(item["gt"][k], gt_full[item["start"] + k], 96)
            assert x % 4 == 0  # a GT corner on the LQ grid
            assert torch.equal(item["lq"][k], lq_full[item["start"] + k][..., x // 4 : x // 4 + 24])
    with pytest.raises(ValueError, match="without LQ frames on disk: bikes"):
        TrainingClips(read_dataset("youhq", tmp_path / "gt").clips, cfg, disk_lq=True)


def _fail(*args, **kwargs):
    raise AssertionError("LQ from disk is not degraded again")


def test_staged_clips_take_each_sample_from_its_stages_set(train_root):
    clips = read_dataset("youhq", train_root).clips
    bikes = [c for c in clips if c.name == "bikes"]
    still = [c for c in clips if c.name == "still"]
    sets = {
        "consistency": TrainingClips(bikes, SamplerConfig(crop=64, samples=8)),
        "detail": TrainingClips(still, SamplerConfig(crop=64, samples=8)),
    }
    staged = StagedClips(sets, lambda i: "detail" if i % 4 >= 2 else "consistency")
    assert len(staged) == 8
    assert [staged[i]["clip"] for i in range(8)] == ["bikes", "bikes", "still", "still"] * 2
    assert torch.equal(staged[5]["lq"], sets["consistency"][5]["lq"])
    with pytest.raises(ValueError, match="differ in length"):
        StagedClips(
            {**sets, "detail": TrainingClips(still, SamplerConfig(crop=64, samples=3))}, len
        )


def test_workers_share_each_steps_samples_as_one_process_accumulating():
    """2 workers x batch 1 x accumulation 1 draw, step by step, the samples one process with
    accumulation 2 draws; disjoint, in the order of the micro-batch slots."""
    one = worker_indices(3, 7, share=2, rank=0, workers=1)
    assert one == list(range(6, 14))  # one worker: every index, in order
    ranks = [worker_indices(3, 7, share=1, rank=r, workers=2) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert [x for pair in zip(*ranks, strict=True) for x in pair] == one
    # 2 workers x (batch 2 x accumulation 2): each rank a consecutive share of 4 per step
    assert worker_indices(0, 2, share=4, rank=1, workers=2) == [4, 5, 6, 7, 12, 13, 14, 15]
