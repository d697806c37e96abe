import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.text import Text
from PIL import Image
from skimage.data import astronaut

from dloral.bench import results
from dloral.bench.flow import DisFlow
from dloral.bench.registry import MetricInfo, ewarp_info, fullref_metric
from dloral.bench.temporal import ewarp
from dloral.report.plots import FONT_MIN, ablation, per_frame_curves, quality_speed, save

FRAMES = 5
EW = "ewarp@evalcrafter"  # the default E*warp protocol: what ewarp_info names
SIGMAS = {"noise-0.02": 0.02, "noise-0.08": 0.08}  # two "methods": gt plus Gaussian noise
LATENCY = MetricInfo("s_per_frame", False, "latency", "clip", "test: fixed", needs_gt=False)


def shifted_clip(dx: int, dy: int) -> torch.Tensor:
    """(FRAMES, 3, 48, 48) crops of the astronaut photo (downscaled x4), moving dx, dy per frame."""
    img = torch.from_numpy(astronaut()).permute(2, 0, 1).float() / 255
    img = torch.nn.functional.interpolate(img[None], size=(128, 128), mode="area")[0]
    return torch.stack(
        [img[:, 30 + t * dy : 78 + t * dy, 30 + t * dx : 78 + t * dx] for t in range(FRAMES)]
    )


@pytest.fixture(scope="module")
def computed() -> tuple[pd.DataFrame, dict]:
    """The long results table from real PSNR and E*warp of two noisy "methods" on two clips."""
    psnr = fullref_metric("psnr")
    flow = DisFlow("ultrafast")
    ewarp_meta = ewarp_info(flow.name)
    generator = torch.Generator().manual_seed(0)
    records, values = [], {}
    for clip, (dx, dy) in {"pan_right": (2, 0), "pan_down": (0, 3)}.items():
        gt = shifted_clip(dx, dy)
        for method, sigma in SIGMAS.items():
            out = (gt + sigma * torch.randn(gt.shape, generator=generator)).clamp(0, 1)
            per_frame = psnr(out, gt).tolist()
            per_pair = ewarp(out, flow=flow).tolist()
            values[clip, method] = {"psnr": per_frame, EW: per_pair}
            records += results.rows("toy", method, clip, psnr.info, per_frame, "cpu", "h")
            records += results.rows("toy", method, clip, ewarp_meta, per_pair, "cpu", "h")
            speed = [0.01 if sigma < 0.05 else 0.5]  # 50x apart
            records += results.rows("toy", method, clip, LATENCY, speed, "cpu", "h")
    return results.table(records), values


def make_agg(speeds: dict[str, float]) -> pd.DataFrame:
    """aggregate-style rows: psnr for A, B, C; seconds per frame for the methods in speeds."""
    psnr = {"A": 27.0, "B": 28.0, "C": 29.5}
    rows = [("psnr", m, v, True) for m, v in psnr.items()]
    rows += [("s_per_frame", m, v, False) for m, v in speeds.items()]
    rows += [("lpips", "A", 0.2, False)]
    return pd.DataFrame(
        [
            {"dataset": "REDS4", "method": m, "metric": k, "value": v, "higher_is_better": h}
            for k, m, v, h in rows
        ]
    )


def trials_table() -> pd.DataFrame:
    """A sweep over alternation period (3 values, 3 seeds each): one failed, two ASHA-stopped."""
    rows = [
        # trial_id, status, step, period, val/psnr
        (0, "finished", 4000, 1000, 27.9),
        (1, "finished", 4000, 100, 27.1),
        (2, "stopped", 1000, 100, 26.2),
        (3, "finished", 4000, 500, 27.6),
        (4, "failed", 12, 500, np.nan),
        (5, "finished", 4000, 1000, 28.3),
        (6, "finished", 4000, 100, 27.3),
        (7, "stopped", 2000, 500, 26.9),
        (8, "finished", 4000, 1000, 28.0),
    ]
    cols = ["trial_id", "status", "step", "schedule.alternation_period", "val/psnr"]
    return pd.DataFrame(rows, columns=cols)


def scatter_points(ax) -> np.ndarray:
    """Every scattered (x, y), collection by collection (errorbar lines are not points)."""
    points = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    return np.concatenate(points)


# quality_speed


def test_quality_speed_has_one_named_point_per_method_with_both_values():
    fig = quality_speed(make_agg({"A": 0.02, "B": 0.05, "D": 0.01}), "REDS4", "psnr")
    ax = fig.axes[0]
    # C has no speed and D no psnr: only A and B are drawn, at (seconds, psnr)
    np.testing.assert_allclose(scatter_points(ax), [[0.02, 27.0], [0.05, 28.0]])
    assert [t.get_text() for t in ax.texts] == ["A", "B"]
    assert "REDS4" in ax.get_title()


def test_quality_speed_axis_labels_say_the_direction():
    ax = quality_speed(make_agg({"A": 0.02, "B": 0.05}), "REDS4", "psnr").axes[0]
    assert ax.get_ylabel() == "psnr ↑ (higher is better)"
    assert ax.get_xlabel() == "seconds / frame ↓ (lower is better)"
    ax = quality_speed(make_agg({"A": 0.02}), "REDS4", "lpips").axes[0]
    assert ax.get_ylabel() == "lpips ↓ (lower is better)"


def test_quality_speed_uses_log_x_only_when_speeds_span_more_than_10x():
    wide = quality_speed(make_agg({"A": 0.01, "B": 0.5, "C": 2.0}), "REDS4", "psnr")
    narrow = quality_speed(make_agg({"A": 0.1, "B": 0.5, "C": 0.9}), "REDS4", "psnr")
    assert wide.axes[0].get_xscale() == "log"
    assert narrow.axes[0].get_xscale() == "linear"


def test_quality_speed_pareto_front_skips_slower_and_worse_methods():
    # B is slower and worse than C; A is fastest, C best: the front is A, C
    ax = quality_speed(make_agg({"A": 0.01, "B": 0.9, "C": 0.5}), "REDS4", "psnr").axes[0]
    (front,) = ax.lines
    np.testing.assert_allclose(front.get_xdata(), [0.01, 0.5])  # A, then C; B is dominated
    np.testing.assert_allclose(front.get_ydata(), [27.0, 29.5])


def test_quality_speed_from_computed_results_table(computed):
    df, values = computed
    fig = quality_speed(results.aggregate(df), "toy", "psnr")
    points = scatter_points(fig.axes[0])
    mean_psnr = [
        np.mean([np.mean(values[clip, m]["psnr"]) for clip in ("pan_right", "pan_down")])
        for m in SIGMAS
    ]
    np.testing.assert_allclose(points[:, 0], [0.01, 0.5])
    np.testing.assert_allclose(points[:, 1], mean_psnr)
    assert mean_psnr[0] > mean_psnr[1] + 5  # less noise, higher PSNR


def test_quality_speed_errors_name_what_is_missing():
    agg = make_agg({"A": 0.02})
    with pytest.raises(ValueError, match=r"'Vid4'.*datasets: REDS4"):
        quality_speed(agg, "Vid4", "psnr")
    with pytest.raises(ValueError, match=r"'ssim'.*'REDS4'.*metrics there: psnr, s_per_frame"):
        quality_speed(agg, "REDS4", "ssim")
    with pytest.raises(ValueError, match=r"'fps'.*'REDS4'"):
        quality_speed(agg, "REDS4", "psnr", speed="fps")
    only_b = agg[~((agg["metric"] == "psnr") & (agg["method"] == "A"))]
    with pytest.raises(ValueError, match=r"no method .* both 'psnr' and 's_per_frame'"):
        quality_speed(only_b, "REDS4", "psnr")


# per_frame_curves


def test_per_frame_curves_one_panel_per_metric_one_line_per_method(computed):
    df, values = computed
    fig = per_frame_curves(df, "toy", "pan_down", ["psnr", EW])
    psnr_ax, ewarp_ax = fig.axes
    assert [line.get_label() for line in psnr_ax.lines] == list(SIGMAS)
    assert [line.get_label() for line in ewarp_ax.lines] == list(SIGMAS)
    for line, method in zip(psnr_ax.lines, SIGMAS, strict=True):
        np.testing.assert_allclose(line.get_ydata(), values["pan_down", method]["psnr"])
    for line, method in zip(ewarp_ax.lines, SIGMAS, strict=True):
        np.testing.assert_allclose(line.get_ydata(), values["pan_down", method][EW])
    # a method keeps its colour in every panel
    assert [ln.get_color() for ln in psnr_ax.lines] == [ln.get_color() for ln in ewarp_ax.lines]
    assert psnr_ax.get_title(loc="left") == "psnr ↑ (higher is better)"
    assert ewarp_ax.get_title(loc="left") == "ewarp@evalcrafter ↓ (lower is better)"
    assert "pan_down" in fig.get_suptitle()


def test_pair_metric_is_drawn_between_frames(computed):
    df, _ = computed
    psnr_ax, ewarp_ax = per_frame_curves(df, "toy", "pan_right", ["psnr", EW]).axes
    np.testing.assert_array_equal(psnr_ax.lines[0].get_xdata(), np.arange(FRAMES))
    np.testing.assert_array_equal(ewarp_ax.lines[0].get_xdata(), np.arange(FRAMES - 1) + 0.5)
    assert "frame pair (i, i+1) is drawn at i + 0.5" in ewarp_ax.get_xlabel()  # shared x, bottom
    (alone,) = per_frame_curves(df, "toy", "pan_right", [EW]).axes
    assert alone.get_xlabel() == "frame pair (i, i+1), drawn at i + 0.5"


def test_per_frame_curves_scales_values_as_the_tables_print_them(computed):
    df, values = computed
    ax = per_frame_curves(df, "toy", "pan_right", [EW], scales={EW: 1000.0}).axes[0]
    first = values["pan_right", list(SIGMAS)[0]][EW]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.array(first) * 1000)
    assert ax.get_title(loc="left") == "ewarp@evalcrafter (×10⁻³) ↓ (lower is better)"


def test_per_frame_curves_leaves_out_absent_and_clip_level_metrics(computed):
    df, _ = computed
    # s_per_frame has only a clip-level row (frame -1); lpips was not computed
    fig = per_frame_curves(df, "toy", "pan_right", ["lpips", "s_per_frame", "psnr"])
    assert len(fig.axes) == 1
    assert fig.axes[0].get_title(loc="left").startswith("psnr")
    assert fig.axes[0].get_xlabel() == "frame"


def test_per_frame_curves_errors_name_dataset_clip_and_what_is_there(computed):
    df, _ = computed
    with pytest.raises(ValueError, match=r"'lpips'.*'pan_right'.*'toy'.*there: psnr, ewarp"):
        per_frame_curves(df, "toy", "pan_right", ["lpips", "s_per_frame"])
    with pytest.raises(ValueError, match=r"'zoom'.*'toy'.*clips there: pan_right, pan_down"):
        per_frame_curves(df, "toy", "zoom", ["psnr"])


# ablation


def test_ablation_categorical_points_means_and_hollow_stopped_trials():
    trials = trials_table()
    key, metric = "schedule.alternation_period", "val/psnr"
    ax = ablation(trials, key, metric, higher_is_better=True, label="alternation period").axes[0]
    # numeric categories in numeric order, not in order of appearance
    assert [t.get_text() for t in ax.get_xticklabels()] == ["100", "500", "1000"]
    finished, stopped = (c for c in ax.collections if isinstance(c, PathCollection))
    assert len(finished.get_offsets()) + len(stopped.get_offsets()) == 8  # the failed one dropped
    assert len(stopped.get_offsets()) == 2
    assert (finished.get_facecolors()[:, 3] == 1).all()
    assert len(stopped.get_facecolors()) == 0 or (stopped.get_facecolors()[:, 3] == 0).all()
    assert stopped.get_edgecolors()[:, 3].min() > 0
    assert "stopped early" in stopped.get_label() and "steps 1000–2000" in stopped.get_label()
    # each point stays within its category; x jitter is deterministic
    category = {100: 0, 500: 1, 1000: 2}
    valid = trials.dropna(subset=[metric])
    xs = np.concatenate([finished.get_offsets()[:, 0], stopped.get_offsets()[:, 0]])
    in_order = pd.concat([valid[valid["status"] == s] for s in ("finished", "stopped")])
    expected = in_order[key].map(category).to_numpy()
    assert np.all(np.abs(xs - expected) <= 0.2 + 1e-9)
    again = ablation(trials, key, metric, higher_is_better=True).axes[0]
    np.testing.assert_array_equal(again.collections[0].get_offsets(), finished.get_offsets())
    # the mean line: one diamond per category at the pandas groupby mean, connected
    (means,) = ax.lines[:1]
    expected_means = valid.groupby(key)[metric].mean().sort_index().to_numpy()
    np.testing.assert_allclose(means.get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(means.get_ydata(), expected_means)
    assert means.get_linestyle() == "-"
    assert ax.get_xlabel() == "alternation period"
    assert ax.get_ylabel() == "val/psnr ↑ (higher is better)"
    assert ax.get_title() == "val/psnr vs alternation period (8 trials)"


def test_ablation_error_bars_are_one_sample_std_where_two_or_more_trials():
    trials = trials_table()
    key, metric = "schedule.alternation_period", "val/psnr"
    trials = trials[~((trials[key] == 500) & (trials["status"] == "stopped"))]  # 500: 1 trial
    ax = ablation(trials, key, metric, higher_is_better=True).axes[0]
    (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    spans = {round(s[0][0]): s[1][1] - s[0][1] for s in bars.get_segments()}
    std = trials.dropna(subset=[metric]).groupby(key)[metric].std()
    assert set(spans) == {0, 2}  # no bar for the single 500 trial
    np.testing.assert_allclose([spans[0], spans[2]], 2 * std[[100, 1000]].to_numpy())


def test_ablation_string_key_is_categorical_without_a_line_between_means():
    trials = pd.DataFrame(
        {
            "trial_id": range(6),
            "status": ["finished"] * 6,
            "model.cfr.variant": ["full", "no_cfr", "full", "no_cfr", "full", "shared"],
            "val/lpips": [0.21, 0.25, 0.20, 0.27, 0.22, 0.30],
        }
    )
    ax = ablation(trials, "model.cfr.variant", "val/lpips", higher_is_better=False).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["full", "no_cfr", "shared"]
    means = ax.lines[0]
    assert means.get_linestyle() == "None"
    np.testing.assert_allclose(means.get_ydata(), [0.21, 0.26, 0.30])
    assert ax.get_ylabel() == "val/lpips ↓ (lower is better)"


def test_ablation_continuous_key_is_a_log_scatter_without_means():
    weights = np.logspace(-3, 0, 12)
    trials = pd.DataFrame(
        {
            "trial_id": range(12),
            "status": ["finished"] * 9 + ["stopped"] * 3,
            "step": [4000] * 9 + [1000] * 3,
            "loss.weights.lpips": weights,
            "val/psnr": 28 - 2 * (np.log10(weights) + 1.5) ** 2 / 10,
        }
    )
    ax = ablation(trials, "loss.weights.lpips", "val/psnr", higher_is_better=True, log_x=True)
    ax = ax.axes[0]
    assert ax.get_xscale() == "log"
    assert len(ax.lines) == 0
    points = scatter_points(ax)
    np.testing.assert_allclose(np.sort(points[:, 0]), weights)  # no jitter on a continuous axis
    stopped = [c for c in ax.collections if "stopped" in c.get_label()]
    assert len(stopped) == 1 and len(stopped[0].get_offsets()) == 3


def test_ablation_errors_name_missing_columns_and_empty_metric():
    trials = trials_table()
    with pytest.raises(ValueError, match=r"'val/ssim'.*available: trial_id, status, step"):
        ablation(trials, "schedule.alternation_period", "val/ssim", higher_is_better=True)
    with pytest.raises(ValueError, match=r"'schedule.period'"):
        ablation(trials, "schedule.period", "val/psnr", higher_is_better=True)
    failed = trials.assign(**{"val/psnr": np.nan})
    with pytest.raises(ValueError, match=r"no trial has a value .*'val/psnr'"):
        ablation(failed, "schedule.alternation_period", "val/psnr", higher_is_better=True)
    with pytest.raises(ValueError, match=r"log_x needs positive"):
        ablation(
            pd.DataFrame({"w": np.linspace(-1, 1, 10), "m": np.arange(10.0)}),
            "w",
            "m",
            higher_is_better=True,
            log_x=True,
        )


# save


def test_per_frame_figures_have_one_size_and_readable_text_whatever_the_panels(tmp_path, computed):
    df, _ = computed
    # a third per-frame metric with a long name, as the report's E*warp in units of 10⁻³
    long = df[df["metric"] == EW].assign(metric="ewarp@a-long-protocol-name")
    df = pd.concat([df, long])
    scales = {EW: 1000.0, "ewarp@a-long-protocol-name": 1000.0}
    sizes = set()
    for metrics in (["psnr"], ["psnr", EW], ["psnr", EW, "ewarp@a-long-protocol-name"]):
        fig = per_frame_curves(df, "toy", "pan_right", metrics, scales=scales)
        path = save(fig, tmp_path / f"{len(fig.axes)}.png")
        with Image.open(path) as img:
            sizes.add(img.size)
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert min(t.get_fontsize() for t in texts) >= FONT_MIN, metrics
        # every text drawn whole inside the figure, and no two labels on top of each other
        renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else None
        if renderer is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        ticks = {  # tick labels: matplotlib keeps some beyond the view, undrawn
            id(tick.label1)
            for ax in fig.axes
            for axis in (ax.xaxis, ax.yaxis)
            for tick in axis.get_major_ticks()
        }
        named = [t for t in texts if id(t) not in ticks]
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in named]
        for text, box in boxes:
            assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, text
            assert fig.bbox.y0 - 1 <= box.y0 and box.y1 <= fig.bbox.y1 + 1, text
        labels = [(t, b) for t, b in boxes if "better" in t]  # one per panel
        for i, (t1, b1) in enumerate(labels):
            assert not any(b1.overlaps(b2) for _, b2 in labels[i + 1 :]), t1
    assert len(sizes) == 1, sizes  # 1 to 3 panels: one size, so a report shows them alike


def test_save_writes_a_png_of_the_figure_size_that_is_not_blank(tmp_path, computed):
    df, _ = computed
    fig = per_frame_curves(df, "toy", "pan_right", ["psnr", EW])
    width, height = fig.get_size_inches()
    path = save(fig, tmp_path / "figs" / "curves.png", dpi=50)
    assert path == tmp_path / "figs" / "curves.png"
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temp file left
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (round(width * 50), round(height * 50))
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 0


def test_module_does_not_import_pyplot():
    code = "import sys, dloral.report.plots; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
