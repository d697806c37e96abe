"""Real-world-degraded LQ for a GT benchmark set (dloral.data.synthetic, `dloral-exp data
degrade`): made with the training sampler's pipeline, one seeded draw per clip, written in DOVE's
GT/ + LQ/ layout with a manifest, the same files from the same command. Real bikes frames."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import read_clip, write_udm_set
from PIL import Image
from typer.testing import CliRunner

from dloral.cli import app
from dloral.data.degradation import VideoDegradation
from dloral.data.frames import write_png
from dloral.data.readers import DatasetError, read_dataset
from dloral.data.synthetic import (
    DegradeError,
    clip_seed,
    degrade_set,
    frame_seed,
    read_manifest,
)

CLIPS = {"clipA": (100, 300), "clipB": (20, 40)}


@pytest.fixture(scope="module")
def gt_set(tmp_path_factory, bikes_path):
    return write_udm_set(tmp_path_factory.mktemp("udm"), bikes_path, CLIPS, 3, blur=3)


def _png(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_each_clip_is_the_training_pipelines_draw_from_its_own_seed(gt_set, tmp_path):
    manifest = degrade_set("udm10", gt_set, tmp_path / "real", seed=3)
    made = read_dataset("udm10", tmp_path / "real", lq="LQ")
    source = read_dataset("udm10", gt_set)
    assert [c.name for c in made.clips] == ["clipA", "clipB"] and made.scale == 4
    pipeline = VideoDegradation(scale=4)
    for clip, original in zip(made.clips, source.clips, strict=True):
        assert clip.names == original.names and clip.lq.size == (16, 16)
        gt = torch.stack([f for _, f in original.gt.frames()])
        seed = clip_seed(3, clip.name)
        draw = pipeline.sample(torch.Generator().manual_seed(seed))
        expected = torch.cat(  # the clip's draw; each frame's noise from its own seed
            [
                pipeline.apply(
                    frame[None], draw, torch.Generator().manual_seed(frame_seed(seed, t)), True
                )
                for t, frame in enumerate(gt)
            ]
        )
        lq = torch.stack([f for _, f in clip.lq.frames()])
        assert torch.equal((lq * 255).round(), (expected * 255).round())
        # the GT side is the source's own frames, through a link
        assert torch.equal(torch.stack([f for _, f in clip.gt.frames()]), gt)
        record = next(r for r in manifest["clips"] if r["name"] == clip.name)
        assert record["seed"] == clip_seed(3, clip.name) and record["draw"] == draw.describe()
        assert record["gt_size"] == [64, 64] and record["lq_size"] == [16, 16]
    # not the classic input: a real-world degradation, and each clip its own draw
    bi = torch.stack([f for _, f in source.clips[0].lq.frames()])
    assert not torch.equal(bi, torch.stack([f for _, f in made.clips[0].lq.frames()]))
    assert manifest["clips"][0]["draw"] != manifest["clips"][1]["draw"]
    on_disk = json.loads((tmp_path / "real" / "manifest.json").read_text())
    assert on_disk["per_frame_noise"] is True and on_disk["source"]["kind"] == "udm10"
    assert len(on_disk["files"]) == 6 and on_disk["git_commit"]


def test_the_same_command_gives_the_same_files_and_a_clip_does_not_depend_on_the_others(
    gt_set, tmp_path, bikes_path
):
    first = degrade_set("udm10", gt_set, tmp_path / "a", seed=3)["files"]
    again = degrade_set("udm10", gt_set, tmp_path / "b", seed=3)["files"]
    assert first == again
    # the same set made from a copy of the GT elsewhere: other paths in the manifests, the
    # same frames digest, which a report joining two runs compares
    shutil.copytree(gt_set, tmp_path / "copy")
    degrade_set("udm10", tmp_path / "copy", tmp_path / "e", seed=3)
    made = [read_manifest(tmp_path / x) for x in ("a", "e")]
    assert made[0]["manifest_sha256"] != made[1]["manifest_sha256"]
    assert made[0]["files_sha256"] == made[1]["files_sha256"]
    alone = write_udm_set(tmp_path / "alone", bikes_path, {"clipB": CLIPS["clipB"]}, 3, blur=3)
    only_b = degrade_set("udm10", alone, tmp_path / "c", seed=3)["files"]
    assert only_b == {k: v for k, v in first.items() if "/clipB/" in k}
    other_seed = degrade_set("udm10", gt_set, tmp_path / "d", seed=4)["files"]
    assert set(other_seed) == set(first) and other_seed != first


def test_a_gt_only_set_is_degraded_and_gt_off_the_scales_grid_refused(tmp_path, bikes_path):
    """GT-only layouts (youhq: root/<clip>/ frames) work too; GT whose sides are not a
    multiple of the scale would give an LQ grid off the GT's: refused, naming the clip."""
    root = tmp_path / "gt-only"
    for clip, size in (("even", (64, 64)), ("odd", (64, 62))):
        for i, frame in enumerate(read_clip(bikes_path, 2, (0, 0, 64, 64), size)):
            write_png(frame, root / clip / f"{i:04d}.png")
    with pytest.raises(DegradeError, match=r"clip 'odd': GT frames 62x64 are not a multiple"):
        degrade_set("youhq", root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    (root / "odd" / "0000.png").unlink(), (root / "odd" / "0001.png").unlink()
    (root / "odd").rmdir()
    manifest = degrade_set("youhq", root, tmp_path / "out")
    assert [c["name"] for c in manifest["clips"]] == ["even"]
    assert read_dataset("udm10", tmp_path / "out", lq="LQ").scale == 4


def test_the_cli_writes_the_set_and_will_not_overwrite_one(gt_set, tmp_path):
    runner = CliRunner()
    out = tmp_path / "udm10-real"
    done = runner.invoke(app, ["data", "degrade", "udm10", str(gt_set), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "2 clips" in done.output and 'lq = "LQ"' in done.output
    assert len(list((out / "LQ").glob("*/*.png"))) == 6
    again = runner.invoke(app, ["data", "degrade", "udm10", str(gt_set), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    forced = ["data", "degrade", "udm10", str(gt_set), "--out", str(out), "--force", "--seed", "1"]
    assert runner.invoke(app, forced).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1
    assert (out / "GT" / "clipA").is_symlink()
    assert runner.invoke(app, [*forced, "--gt", "copy"]).exit_code == 0
    assert not (out / "GT" / "clipA").is_symlink() and len(list(out.glob("GT/*/*.png"))) == 6
    wrong = runner.invoke(app, [*forced, "--gt", "move"])
    assert wrong.exit_code == 2 and "--gt 'move': one of link, copy" in wrong.output


def test_the_real_suite_scores_the_made_set(gt_set, tmp_path, monkeypatch):
    """benchmarks/udm10-real.toml reads what `data degrade` wrote; bicubic scores lower on
    those real-world-degraded frames than on the classic bicubic-downsampled ones."""
    from dloral.bench import harness
    from dloral.bench.suite import SuiteError, load_suite

    degrade_set("udm10", gt_set, tmp_path / "real", seed=0)
    monkeypatch.setenv("DLORAL_UDM10_REAL", str(tmp_path / "real"))
    monkeypatch.setenv("DLORAL_UDM10", str(gt_set))
    monkeypatch.delenv("DLORAL_CHECKPOINT", raising=False)  # the suite's dloral method
    psnr = {}
    with pytest.raises(SuiteError, match=r"udm10-real.toml: method.*DLORAL_CHECKPOINT"):
        load_suite("udm10-real")
    for name in ("udm10-real", "udm10"):
        suite = load_suite(name, methods=["bicubic"])  # as --method: the suite's are not run
        assert suite.datasets[0].lq == ("LQ" if name == "udm10-real" else "BDx4")
        assert suite.methods == ("bicubic",)
        if name == "udm10":  # the test set has BIx4 only
            from dataclasses import replace

            suite = replace(suite, datasets=(replace(suite.datasets[0], lq="BIx4"),))
        res = harness.run_bench(
            suite,
            metrics=["psnr"],
            out_dir=tmp_path / name,
            tracking=False,
            visuals=False,
        )
        psnr[name] = res.aggregate.query("metric == 'psnr'")["value"].item()
    assert psnr["udm10-real"] < psnr["udm10"] - 1, psnr
    # run.json names the degraded set it scored, its LQ checked against the manifest
    facts = json.loads((tmp_path / "udm10-real" / "run.json").read_text())["datasets"]
    assert facts["udm10-real"]["lq_verified"] is True and facts["udm10-real"]["seed"] == 0
    assert facts["udm10-real"]["degraded_set"] == str(tmp_path / "real" / "manifest.json")
    classic = json.loads((tmp_path / "udm10" / "run.json").read_text())["datasets"]["udm10"]
    assert "degraded_set" not in classic
    # an LQ frame changed since: the manifest no longer describes what would be scored
    changed = tmp_path / "real" / "LQ" / "clipB" / "0001.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(changed)
    with pytest.raises(DatasetError, match=r"1 LQ file\(s\) differ.*LQ/clipB/0001.png"):
        harness.run_bench(
            load_suite("udm10-real", methods=["bicubic"]),
            metrics=["psnr"],
            out_dir=tmp_path / "again",
            tracking=False,
            visuals=False,
        )


def test_an_out_inside_or_around_the_source_is_refused_and_the_lq_folders_not_needed(
    gt_set, tmp_path, bikes_path
):
    """--out equal to, above or inside the set would change or (with --force) delete its GT:
    refused before anything is written. A peer layout is read from GT/ alone: one with both
    BIx4/ and BDx4/ (UDM10 as published) or none needs no --lq."""
    root = write_udm_set(tmp_path / "udm", bikes_path, {"clipA": CLIPS["clipA"]}, 2, blur=3)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for out in (root, root / "GT", root / "GT" / "real", tmp_path):
        with pytest.raises(DegradeError, match="overlaps the source"):
            degrade_set("udm10", root, out)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    (root / "BIx4").rename(root / "BDx4")
    shutil.copytree(root / "BDx4", root / "BIx4")
    both = degrade_set("udm10", root, tmp_path / "both")
    shutil.rmtree(root / "BIx4"), shutil.rmtree(root / "BDx4")
    assert degrade_set("udm10", root, tmp_path / "gt-only")["files"] == both["files"]


def test_one_noise_sample_per_clip_repeats_on_every_frame(tmp_path, bikes_path):
    """--no-per-frame-noise: the clip's seed for every frame's noise, so two identical GT
    frames give identical LQ frames; with a sample per frame they differ."""
    root = tmp_path / "still"
    frame = read_clip(bikes_path, 1, (0, 0, 64, 64), (64, 64))[0]
    for i in range(2):
        write_png(frame, root / "clip" / f"{i:04d}.png")
    for per_frame, same in ((False, True), (True, False)):
        out = tmp_path / f"out-{per_frame}"
        degrade_set("youhq", root, out, seed=5, per_frame_noise=per_frame)
        a, b = (_png(out / "LQ" / "clip" / f"{i:04d}.png") for i in range(2))
        assert torch.equal(a, b) is same


def test_each_clip_records_its_own_size_and_bad_settings_are_named(tmp_path, bikes_path):
    root = tmp_path / "sizes"
    for clip, size in (("big", (64, 64)), ("small", (32, 48))):
        for i, frame in enumerate(read_clip(bikes_path, 2, (0, 0, 64, 64), size)):
            write_png(frame, root / clip / f"{i:04d}.png")
    manifest = degrade_set("youhq", root, tmp_path / "out")
    sizes = {c["name"]: (c["gt_size"], c["lq_size"]) for c in manifest["clips"]}
    assert sizes == {"big": ([64, 64], [16, 16]), "small": ([32, 48], [8, 12])}
    runner = CliRunner()
    command = ["data", "degrade", "youhq", str(root), "--out", str(tmp_path / "x")]
    done = runner.invoke(app, [*command, "--config", str(tmp_path / "absent.toml")])
    assert done.exit_code == 2 and "--config" in done.output and "absent.toml" in done.output
    assert not (tmp_path / "x").exists()


def test_a_copied_gt_moves_with_the_set_and_a_changed_or_lost_gt_is_named(
    tmp_path, bikes_path, monkeypatch
):
    """--gt copy: GT/<clip> holds the GT frames, so the set scores after a move; the manifest
    checks each clip's GT as it checks the LQ: a link whose GT moved, or a GT frame changed, is
    an error naming the clip (the table would be scored against other frames)."""
    from dloral.bench import harness
    from dloral.bench.suite import load_suite

    source = write_udm_set(tmp_path / "udm", bikes_path, CLIPS, 3, blur=3)
    linked = degrade_set("udm10", source, tmp_path / "linked", seed=2)
    copied = degrade_set("udm10", source, tmp_path / "copied", seed=2, gt="copy")
    assert linked["files"] == copied["files"] and copied["gt_folders"] == "copy"
    for clip in CLIPS:
        folder = tmp_path / "copied" / "GT" / clip
        assert folder.is_dir() and not folder.is_symlink()
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            p.name for p in (source / "GT" / clip).iterdir()
        )
        for frame in folder.iterdir():
            assert frame.read_bytes() == (source / "GT" / clip / frame.name).read_bytes()
    made = {x: read_manifest(tmp_path / x) for x in ("linked", "copied")}
    assert made["linked"]["files_sha256"] == made["copied"]["files_sha256"]  # same frames
    assert made["copied"]["gt_verified"] is True

    # the copied set, moved, scores as before; the linked one lost its GT when the source moved
    (tmp_path / "copied").rename(tmp_path / "moved")
    source.rename(tmp_path / "udm-moved")
    assert read_manifest(tmp_path / "moved")["files_sha256"] == made["copied"]["files_sha256"]
    with pytest.raises(DegradeError, match=r"GT of 2 clip\(s\) differs.*GT/clipA \(a link to"):
        read_manifest(tmp_path / "linked")
    monkeypatch.setenv("DLORAL_UDM10_REAL", str(tmp_path / "moved"))
    suite = load_suite("udm10-real", methods=["bicubic"])
    res = harness.run_bench(
        suite, metrics=["psnr"], out_dir=tmp_path / "bench", tracking=False, visuals=False
    )
    psnr = res.table.query("metric == 'psnr'")["value"]
    assert psnr.notna().all() and len(psnr) == 2 * 3  # every frame of both clips

    # a GT frame changed since the set was made: named, nothing scored
    frame = tmp_path / "moved" / "GT" / "clipB" / "0001.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(frame)  # same size
    with pytest.raises(DegradeError, match=r"GT/clipB: its 3 frame\(s\) are not the 3 the LQ"):
        read_manifest(tmp_path / "moved")
    with pytest.raises(DegradeError, match="--gt 'move': one of link, copy"):
        degrade_set("udm10", tmp_path / "udm-moved", tmp_path / "x", gt="move")
