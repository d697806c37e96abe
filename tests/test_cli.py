import json

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dloral.cli import app
from dloral.data.frames import to_uint8
from dloral.weights import sha256

runner = CliRunner()
FAST = ["--process-size", "64", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture()
def bikes_video(tmp_path, bikes_lq):
    path = tmp_path / "bikes_lq.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in bikes_lq[:3]:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(to_uint8(frame), format="rgb24")))
        out.mux(stream.encode())
    return path


def test_upscale_folder_names_frames_like_the_input(bikes_folder, tmp_path, tiny_vae_file):
    out = tmp_path / "sr"
    result = runner.invoke(app, ["upscale", str(bikes_folder), str(out), *FAST])
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["im1.png", "im2.png", "im3.png", "im4.png"]
    assert Image.open(out / "im1.png").size == (256, 192)
    meta = json.loads((out / "upscale.json").read_text())
    assert meta["frames"] == 4 and meta["sr_size"] == [192, 256]
    assert meta["model"]["backbone_weights"] == "tiny-pretrained-vae"
    assert meta["model"]["vae_sha256"] == sha256(tiny_vae_file)
    assert meta["model"]["cfr_variant"] == "full" and meta["device"] == "cpu"
    assert "4 frames 64x48 -> 256x192" in " ".join(result.output.split())


def test_upscale_video_file(bikes_video, tmp_path):
    out = tmp_path / "sr"
    result = runner.invoke(
        app,
        [
            "upscale",
            str(bikes_video),
            str(out),
            *FAST,
            "--scale",
            "2",
            "--color-fix",
            "wavelet",
            "--cfr",
            "no_gate",
        ],
    )
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["bikes_lq_0000.png", "bikes_lq_0001.png", "bikes_lq_0002.png"]
    img = np.asarray(Image.open(out / pngs[0]))
    assert img.shape == (96, 128, 3)


def test_upscale_with_a_checkpoint(bikes_folder, tmp_path):
    from dloral.model.checkpoint import save_checkpoint
    from dloral.model.dloral import DLoRAL, DLoRALConfig

    save_checkpoint(DLoRAL(DLoRALConfig.from_dict({"cfr": {"variant": "off"}})), tmp_path / "ck")
    out = tmp_path / "sr"
    result = runner.invoke(
        app, ["upscale", str(bikes_folder), str(out), *FAST, "--checkpoint", str(tmp_path / "ck")]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "upscale.json").read_text())
    assert meta["model"]["cfr_variant"] == "off"  # taken from the checkpoint's config
    assert meta["checkpoint"] == str(tmp_path / "ck")


def test_upscale_of_a_training_run_takes_its_latest_checkpoint(bikes_folder, tmp_path):
    """--checkpoint RUN: the step folder `checkpoints/latest` names (not an older one), recorded
    as that folder; a run with no finished checkpoint exits 2 naming its pointer."""
    from dloral.model.checkpoint import save_checkpoint
    from dloral.model.dloral import DLoRAL, DLoRALConfig

    run = tmp_path / "run"
    for step, variant in ((2, "full"), (4, "off")):
        model = DLoRAL(DLoRALConfig.from_dict({"cfr": {"variant": variant}}))
        save_checkpoint(model, run / "checkpoints" / f"step-{step:06d}")
    (run / "checkpoints" / "latest").write_text("step-000004")
    out = tmp_path / "sr"
    result = runner.invoke(
        app, ["upscale", str(bikes_folder), str(out), *FAST, "--checkpoint", str(run)]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "upscale.json").read_text())
    assert meta["model"]["cfr_variant"] == "off"
    assert meta["checkpoint"] == str(run / "checkpoints" / "step-000004")
    (run / "checkpoints" / "latest").unlink()
    result = runner.invoke(
        app, ["upscale", str(bikes_folder), str(tmp_path / "sr2"), *FAST, "--checkpoint", str(run)]
    )
    assert result.exit_code == 2
    assert f"{run / 'checkpoints' / 'latest'}: no finished checkpoint" in " ".join(
        result.output.split()
    )


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "mixed"])
def test_bad_input_exits_nonzero_naming_the_file(case, tmp_path, bikes_folder):
    if case == "missing":
        src, named = tmp_path / "no_such_clip", "no_such_clip"
    elif case == "empty":
        src, named = tmp_path / "empty", "holds no frames"
        src.mkdir()
    elif case == "unreadable":
        (bikes_folder / "im9.png").write_bytes(b"garbage")
        src, named = bikes_folder, "im9.png"
    else:
        Image.new("RGB", (10, 10)).save(bikes_folder / "im5.png")
        src, named = bikes_folder, "im5.png"
    result = runner.invoke(app, ["upscale", str(src), str(tmp_path / "out"), *FAST])
    assert result.exit_code == 2
    assert named in " ".join(result.output.split())


def test_sd21_without_weights_says_where_to_put_them(bikes_folder, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("DLORAL_SD21_PATH", raising=False)
    result = runner.invoke(
        app, ["upscale", str(bikes_folder), str(tmp_path / "o"), *FAST, "--profile", "sd21"]
    )
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "Stable Diffusion 2.1-base weights not found" in text and "DLORAL_SD21_PATH" in text


def test_upscale_with_the_official_checkpoint_layout(bikes_folder, tmp_path):
    from dloral.model.checkpoint import export_official
    from dloral.model.dloral import DLoRAL, DLoRALConfig

    export_official(DLoRAL(DLoRALConfig()), tmp_path / "model.pkl")
    out = tmp_path / "sr"
    result = runner.invoke(
        app,
        [
            "upscale",
            str(bikes_folder),
            str(out),
            *FAST,
            "--profile",
            "tiny",
            "--checkpoint",
            str(tmp_path / "model.pkl"),
        ],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "upscale.json").read_text())
    assert "official DLoRAL" in meta["model"]["backbone_weights"]
    assert len(list(out.glob("*.png"))) == 4


def test_upscale_reference_inference_switches(bikes_folder, tmp_path):
    out = tmp_path / "sr"
    flags = ["--first-frame", "skip", "--size-to-8", "lanczos", "--latent-tile", "16"]
    flags += ["--latent-overlap", "4"]
    result = runner.invoke(app, ["upscale", str(bikes_folder), str(out), *FAST, *flags])
    assert result.exit_code == 0, result.output
    # the reference writes no output for frame 0
    assert sorted(p.name for p in out.glob("*.png")) == ["im2.png", "im3.png", "im4.png"]
    assert Image.open(out / "im2.png").size == (256, 192)
    meta = json.loads((out / "upscale.json").read_text())
    assert meta["frames"] == 3 and meta["frames_in_input"] == 4
    opts = meta["options"]
    assert (opts["first_frame"], opts["size_to_8"]) == ("skip", "lanczos")
    assert (opts["latent_tile"], opts["latent_overlap"]) == (16, 4)
    bad = runner.invoke(app, ["upscale", str(bikes_folder), str(tmp_path / "x"), *FAST]
                        + ["--latent-tile", "16", "--latent-overlap", "16"])  # fmt: skip
    assert bad.exit_code == 2 and "latent_overlap" in bad.output
