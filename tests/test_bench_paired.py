"""Paired comparisons over clips (dloral.bench.paired) on a real benchmark run: 6 clips of real
bikes frames; bicubic, a blurred peer, a noisy one (the GT with +-1 level of noise) and the GT
itself (infinite PSNR), scored by the harness."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from conftest import write_udm_set
from PIL import Image

from dloral.bench import harness, paired, results
from dloral.bench.suite import load_suite

CLIPS = {f"c{i}": (10 + 40 * i, 30 + 60 * i) for i in range(6)}
FRAMES = 3
SUITE = """
[suite]
name = "paired"

[[datasets]]
name = "six"
kind = "udm10"
root = "{root}"
lq = "BIx4"
scale = 4

[methods]
names = [
    "bicubic",
    "folder:blur={root}/peers/blur",
    "folder:noisy={root}/peers/noisy",
    "folder:gt={root}/peers/gt",
]

[metrics]
names = ["psnr", "ssim"]
"""


@pytest.fixture(scope="module")
def table(tmp_path_factory, bikes_path) -> pd.DataFrame:
    root = write_udm_set(
        tmp_path_factory.mktemp("six"), bikes_path, CLIPS, FRAMES, blur=3, gt_peer=True
    )
    rng = np.random.default_rng(0)
    for path in sorted((root / "GT").glob("*/*.png")):
        gt = np.asarray(Image.open(path)).astype(int)
        noisy = np.clip(gt + rng.integers(-1, 2, size=gt.shape), 0, 255).astype(np.uint8)
        (root / "peers" / "noisy" / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(root / "peers" / "noisy" / path.parent.name / path.name)
    (root / "suite.toml").write_text(SUITE.format(root=root))
    out = tmp_path_factory.mktemp("bench") / "paired"
    harness.run_bench(load_suite(root / "suite.toml"), out_dir=out, tracking=False)
    return pd.read_parquet(out / "results.parquet")


def _enumerated_p(d):
    """A literal two-sided sign-flip test: every sign pattern, one at a time."""
    d = [float(x) for x in d]
    observed = abs(sum(d) / len(d))
    hits = 0
    for signs in itertools.product((1, -1), repeat=len(d)):
        flipped = abs(sum(s * x for s, x in zip(signs, d, strict=True)) / len(d))
        hits += flipped >= observed - 1e-12
    return hits / 2 ** len(d)


def _holm(ps):
    """Holm's step-down adjustment, literally: the k-th smallest of m times (m - k + 1), the
    largest so far, at most 1."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, top = [0.0] * len(ps), 0.0
    for k, i in enumerate(order):
        top = max(top, min(1.0, (len(ps) - k) * ps[i]))
        out[i] = top
    return out


def _assert_inverts_the_test(d, row):
    """The interval's bounds are where the enumerated test starts to reject the shift, and it
    holds 0 exactly when p > 0.05."""
    scale = d.max() - d.min()
    step = 1e-6 * scale
    assert d.min() - step <= row["ci_low"] <= row["diff"] <= row["ci_high"] <= d.max() + step
    for bound, outward in ((row["ci_low"], -step), (row["ci_high"], step)):
        assert _enumerated_p(d - (bound - outward)) > 0.05  # just inside: not rejected
        assert _enumerated_p(d - (bound + outward)) <= 0.05  # just outside: rejected
    assert (row["ci_low"] <= 0 <= row["ci_high"]) == (row["p"] > 0.05)


def _clip_diffs(df, metric, method, best):
    clips = results.shared_clips(df)
    wide = clips[clips["metric"] == metric].pivot(index="clip", columns="method", values="value")
    return (wide[method] - wide[best]).to_numpy()


def test_each_method_against_the_best_follows_the_table_and_an_enumerated_test(table):
    pairs = paired.against_best(table, unranked={"gt"})
    agg = results.aggregate(table).set_index(["metric", "method"])["value"]
    # the best is the table's best, s_per_frame (latency) is not compared
    assert set(pairs["metric"]) == {"psnr", "ssim"}
    for metric in ("psnr", "ssim"):
        sub = pairs[pairs["metric"] == metric].set_index("method")
        best = agg[metric].drop("gt").idxmax()
        assert set(sub["best"]) == {best} and len(sub) == 2 and best not in sub.index
        for method, row in sub.iterrows():
            # the mean difference is the difference of the table's two means
            want = agg[metric, method] - agg[metric, best]
            assert row["diff"] == pytest.approx(want, abs=1e-9)
            d = _clip_diffs(table, metric, method, best)
            assert row["clips"] == len(CLIPS) == len(d)
            assert row["p"] == pytest.approx(_enumerated_p(d), abs=1e-12)
            assert (row["better"], row["worse"]) == ((d > 0).sum(), (d < 0).sum())
            _assert_inverts_the_test(d, row)
    # p adjusted by Holm over each metric's comparisons with its best
    for _, sub in pairs.groupby("metric"):
        assert sub["p_holm"].tolist() == pytest.approx(_holm(sub["p"].tolist()))
        assert (sub["p_holm"] >= sub["p"]).all()
    # +-1 level of noise beats both on every clip: the smallest p six clips can give, 2 / 2^6
    psnr = pairs[pairs["metric"] == "psnr"].set_index("method")
    assert psnr.loc["bicubic", "worse"] == 6 and psnr.loc["bicubic", "better"] == 0
    assert psnr.loc["bicubic", "p"] == 2 / 64 and psnr.loc["bicubic", "ci_high"] < 0
    # the blur is behind by about 2 dB on average but ahead on some clips: no clear difference
    blur = psnr.loc["blur"]
    assert blur["diff"] < -1 and blur["better"] >= 1 and blur["ci_low"] < 0 < blur["ci_high"]
    assert blur["p"] > 0.05
    # without the noisy peer the blur is the best, and bicubic is set against it
    other = paired.against_best(table, unranked={"gt", "noisy"}).set_index(["metric", "method"])
    row = other.loc["psnr", "bicubic"]
    d = _clip_diffs(table, "psnr", "bicubic", "blur")
    assert row["best"] == "blur" and row["diff"] == pytest.approx(d.mean())
    assert row["p"] == pytest.approx(_enumerated_p(d), abs=1e-12)


def test_an_infinite_psnr_has_no_interval_nor_p_and_its_clips_still_count(table):
    pairs = paired.against_best(table).set_index(["metric", "method"])
    row = pairs.loc["psnr", "noisy"]  # against the GT itself: infinite PSNR on every clip
    assert row["best"] == "gt" and row["diff"] == -math.inf and row["worse"] == 6
    assert math.isnan(row["p"]) and math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])
    assert math.isnan(row["p_holm"])  # no test, and none counted in Holm's m
    ssim = pairs.loc["ssim", "noisy"]  # SSIM of the GT is finite (1): compared as usual
    assert ssim["best"] == "gt" and ssim["p"] == 2 / 64


def test_a_lower_is_better_metric_takes_the_lowest_mean_as_best(table):
    psnr = table[table["metric"] == "psnr"]
    flipped = psnr.assign(metric="neg_psnr", value=-psnr["value"], higher_is_better=False)
    both = pd.concat([psnr, flipped])
    pairs = paired.against_best(both, unranked={"gt"}).set_index(["metric", "method"])
    assert set(pairs["best"]) == {"noisy"}
    for method in ("bicubic", "blur"):
        up, down = pairs.loc["psnr", method], pairs.loc["neg_psnr", method]
        assert down["diff"] == pytest.approx(-up["diff"])
        assert (down["better"], down["worse"]) == (up["better"], up["worse"])
        assert down["p"] == up["p"]
        assert (down["ci_low"], down["ci_high"]) == pytest.approx((-up["ci_high"], -up["ci_low"]))


def test_few_clips_give_no_interval_and_a_p_no_smaller_than_two_over_two_to_the_n(table):
    four = table[table["clip"].isin(["c0", "c1", "c2", "c3"])]
    pairs = paired.against_best(four, unranked={"gt"}).set_index(["metric", "method"])
    row = pairs.loc["psnr", "bicubic"]
    assert row["clips"] == 4 and math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])
    assert row["worse"] == 4 and row["p"] == 2 / 16  # every clip worse, still not < 0.05


def test_left_out_clips_untrained_methods_and_noted_values_as_the_table_leaves_them(table):
    # blur without clip c5: c5 leaves every method's psnr mean, and the comparison
    missing = table[~((table["method"] == "blur") & (table["clip"] == "c5"))]
    pairs = paired.against_best(missing, unranked={"gt"}).set_index(["metric", "method"])
    assert pairs.loc[("psnr", "bicubic"), "clips"] == 5
    agg = results.aggregate(missing).set_index(["metric", "method"])["value"]
    assert pairs.loc[("psnr", "bicubic"), "diff"] == pytest.approx(
        agg["psnr", "bicubic"] - agg["psnr", "noisy"]
    )
    # unranked methods are neither the best nor compared
    pairs = paired.against_best(table, unranked={"gt", "noisy"}).set_index(["metric", "method"])
    assert sorted(pairs.index) == [("psnr", "bicubic"), ("ssim", "bicubic")]
    assert set(pairs["best"]) == {"blur"}
    # a method's mean with a noted value (shown with a dagger, not ranked) is not compared,
    # the other methods' are
    noted = table.copy()
    where = (noted["metric"] == "ssim") & (noted["clip"] == "c2") & (noted["method"] == "noisy")
    noted.loc[where & (noted["frame"] == 0), "note"] = "test note"
    pairs = paired.against_best(noted, unranked={"gt"}).set_index(["metric", "method"])
    assert sorted(pairs.loc["ssim"].index) == ["bicubic"]
    assert pairs.loc[("ssim", "bicubic"), "best"] == "blur"
    assert sorted(pairs.loc["psnr"].index) == ["bicubic", "blur"]


def test_above_sixteen_clips_random_sign_patterns_match_the_enumeration(table):
    psnr = table[(table["metric"] == "psnr") & (table["frame"] >= 0)]
    wide = psnr.pivot_table(index=["clip", "frame"], columns="method", values="value")
    d = (wide["blur"] - wide["bicubic"]).to_numpy()  # 18 real per-frame differences
    assert len(d) == 18 > paired.EXACT_UP_TO
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    exact = float(np.mean(np.abs(signs @ d) / len(d) >= abs(d.mean()) - 1e-12))
    p = paired.sign_flip_p(d)
    spread = math.sqrt(max(exact * (1 - exact), 1e-4) / paired.DRAWS)
    assert abs(p - exact) <= 5 * spread + 1 / paired.DRAWS
    assert p == paired.sign_flip_p(d)  # seeded


def test_holm_leaves_out_what_has_no_test():
    p = pd.Series([0.01, math.nan, 0.04, 0.03], index=list("abcd"))
    adjusted = paired.holm(p)
    assert math.isnan(adjusted["b"])
    want = dict(zip("acd", _holm([0.01, 0.04, 0.03]), strict=True))  # m = 3, not 4
    assert adjusted[list("acd")].tolist() == pytest.approx([want[k] for k in "acd"])
    assert want == pytest.approx({"a": 0.03, "c": 0.06, "d": 0.06})


def test_every_method_against_a_named_reference_not_the_best(table):
    """--against: the comparisons are with a method named before the results (here the blur,
    not the best), each by the same enumerated test; Holm over those comparisons; a dataset
    or metric where the reference has no values gets none."""
    pairs = paired.against_best(table, unranked={"gt"}, reference="blur")
    assert set(pairs["best"]) == {"blur"} and "blur" not in set(pairs["method"])
    for metric in ("psnr", "ssim"):
        sub = pairs[pairs["metric"] == metric].set_index("method")
        assert set(sub.index) == {"bicubic", "noisy"}
        for method, row in sub.iterrows():
            d = _clip_diffs(table, metric, method, "blur")
            assert row["diff"] == pytest.approx(d.mean())
            assert row["p"] == pytest.approx(_enumerated_p(d), abs=1e-12)
            _assert_inverts_the_test(d, row)
        assert sub["p_holm"].tolist() == pytest.approx(_holm(sub["p"].tolist()))
    # the signs turned round: the noisy peer is ahead of the blur (the blur was behind it)
    noisy = pairs.set_index(["metric", "method"]).loc["psnr", "noisy"]
    best = paired.against_best(table, unranked={"gt"}).set_index(["metric", "method"])
    assert noisy["diff"] == pytest.approx(-best.loc[("psnr", "blur"), "diff"])
    assert (noisy["better"], noisy["worse"]) == (
        best.loc[("psnr", "blur"), "worse"],
        best.loc[("psnr", "blur"), "better"],
    )
    # a reference without values (an unranked or absent method) gives no comparisons
    assert paired.against_best(table, unranked={"gt"}, reference="gt").empty
    assert paired.against_best(table, reference="no-such-method").empty
