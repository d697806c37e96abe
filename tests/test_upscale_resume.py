"""A stopped upscale goes on where it stopped, and gives the frames of an uninterrupted one.

Frame t's output depends on LQ frames t-1 and t, the prompt and its own posterior noise, which
`frame_generator` derives from (seed, t) alone; `upscale.json` records the state and the
settings a resumed run must share. Real bikes frames, the tiny profile, CPU.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from dloral.cli import app
from dloral.data.frames import to_uint8
from dloral.model import lora
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.model.pipeline import UpscaleOptions, VideoUpscaler, frame_generator

CPU = torch.device("cpu")
runner = CliRunner()
FAST = ["--process-size", "64", "--batch-size", "2", "--device", "cpu"]
# batches of other sizes sum in other orders: measured 3e-6 between batch sizes 1, 2 and 3 and
# between a resumed and an uninterrupted run at 96x128; 1e-5 leaves room for other BLAS builds
BATCH_TOLERANCE = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    model = DLoRAL(DLoRALConfig.from_dict({"seed": 0}))
    lora.randomize_lora_b(model.unet, generator=torch.Generator().manual_seed(0))
    model.merge_lora()
    return model


@pytest.fixture(scope="module")
def frames(bikes_lq):
    return F.interpolate(bikes_lq[:5], size=(24, 32), mode="area")


def _run(model, frames, resume_at=0, prompt=None, **opts):
    options = UpscaleOptions(process_size=0, **opts)
    up = VideoUpscaler(model, CPU, options=options)
    first = max(resume_at - 1, 0)  # the frames given start at resume_at's previous frame
    named = ((f"{first + i}", f) for i, f in enumerate(frames))
    out = list(up.upscale(named, resume_at, prompt))
    return [int(n) for n, _ in out], torch.stack([f for _, f in out])


def test_a_frames_noise_is_a_function_of_seed_index_and_role_only():
    def draw(*key):
        return torch.randn(64, generator=frame_generator(*key))

    assert torch.equal(draw(0, 3), draw(0, 3))
    keys = [(0, 3), (0, 4), (1, 3), (0, 3, 1), (2**40, 3)]
    draws = [draw(*k) for k in keys]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not torch.allclose(draws[i], draws[j]), (keys[i], keys[j])


@pytest.mark.parametrize("previous", ["carry", "reencode"])
def test_sampled_frames_do_not_depend_on_the_batch(model, frames, previous):
    _, one = _run(model, frames, batch_size=1, previous=previous)
    for batch in (2, 3):
        _, other = _run(model, frames, batch_size=batch, previous=previous)
        assert float((other - one).abs().max()) <= BATCH_TOLERANCE, batch
    # the noise is drawn: another seed gives other frames
    _, reseeded = _run(model, frames, batch_size=1, previous=previous, seed=1)
    assert float((reseeded - one).abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("first_frame", "previous", "resume_at"),
    [("self", "carry", 1), ("self", "carry", 3), ("self", "reencode", 2), ("skip", "carry", 3)],
)
def test_going_on_from_a_frame_gives_the_uninterrupted_frames(
    model, frames, first_frame, previous, resume_at
):
    opts = {"batch_size": 2, "first_frame": first_frame, "previous": previous}
    names, whole = _run(model, frames, **opts)
    first = resume_at - 1  # the frame before: only the previous frame of resume_at
    resumed_names, resumed = _run(model, frames[first:], resume_at, prompt="", **opts)
    assert resumed_names == list(range(resume_at, len(frames)))
    assert names[-len(resumed_names) :] == resumed_names
    assert float((resumed - whole[-len(resumed) :]).abs().max()) <= BATCH_TOLERANCE


# ----- dloral-exp upscale ------------------------------------------------------------------


def _upscale(src, out, *args):
    result = runner.invoke(app, ["upscale", str(src), str(out), *FAST, *args])
    return result.exit_code, " ".join(result.output.split())


def _pngs(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def _record(folder):
    return json.loads((folder / "upscale.json").read_text())


def test_a_second_run_goes_on_and_gives_an_uninterrupted_runs_frames(bikes_folder, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _upscale(bikes_folder, whole)[0] == 0
    code, out = _upscale(bikes_folder, parts, "--frames", "2")  # as if stopped after 2 frames
    assert code == 0, out
    assert sorted(_pngs(parts)) == ["im1.png", "im2.png"]
    assert _record(parts)["status"] == "finished" and _record(parts)["frames"] == 2
    assert _record(parts)["options"]["vae_tiles_wait"] == "auto"
    assert _record(parts)["vae_tiles_wait_on"] == "device"  # a CPU's host is its device
    # a smaller batch and the VAE's tiles on the host on the second run: speed settings, not
    # frame-changing ones
    code, out = _upscale(bikes_folder, parts, "--batch-size", "1", "--vae-tiles-wait", "host")
    assert code == 0, out
    assert "2 frames (and 2 kept from an earlier run)" in out
    assert "going on from frame 2" in out
    expected, got = _pngs(whole), _pngs(parts)
    assert sorted(got) == sorted(expected) == [f"im{i}.png" for i in range(1, 5)]
    for name in expected:  # at most one 8-bit level apart, where rounding falls either way
        diff = np.abs(got[name].astype(int) - expected[name].astype(int)).max()
        assert diff <= 1, name
    record = _record(parts)
    assert record["status"] == "finished" and record["status_reason"] == ""
    assert record["frames"] == record["frames_expected"] == 4
    assert [a["first_frame"] for a in record["attempts"]] == [0, 2]
    assert [a["frames_written"] for a in record["attempts"]] == [2, 2]
    assert {a["status"] for a in record["attempts"]} == {"finished"}
    assert record["prompt"] == "" and record["options"]["batch_size"] == 1
    assert record["options"]["vae_tiles_wait"] == "host"
    assert record["vae_tiles_wait_on"] == "device"  # a CPU's host is its device
    # nothing left to do: nothing is written again
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.png")}
    code, out = _upscale(bikes_folder, parts)
    assert code == 0 and "0 frames (and 4 kept from an earlier run)" in out, out
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.png")} == before


def test_a_moved_input_goes_on_and_one_changed_in_place_is_refused(bikes_folder, tmp_path):
    import shutil

    out_dir = tmp_path / "sr"
    assert _upscale(bikes_folder, out_dir, "--frames", "2")[0] == 0
    first = _record(out_dir)["input_fingerprint"]
    kept = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.png")}
    moved = shutil.move(bikes_folder, tmp_path / "elsewhere" / "bikes_lq")
    code, out = _upscale(moved, out_dir, "--frames", "3")
    assert code == 0, out
    assert f"the input was {bikes_folder} in the earlier run; the same fingerprint" in out
    record = _record(out_dir)
    assert record["input"] == str(moved) and record["input_fingerprint"] == first
    assert record["frames"] == 3 and len(record["attempts"]) == 2
    assert kept == {
        p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.png") if p.name in kept
    }  # the frames of the first run kept, not made again
    # the last frame replaced by another (same name): other frames, refused before any frame
    last = moved / "im4.png"
    Image.fromarray(np.asarray(Image.open(last))[::-1].copy()).save(last)
    code, out = _upscale(moved, out_dir)
    assert code == 2 and "input_fingerprint:" in out, out
    assert len(_pngs(out_dir)) == 3


def test_other_settings_are_refused_naming_them_and_force_starts_over(bikes_folder, tmp_path):
    out_dir = tmp_path / "sr"
    assert _upscale(bikes_folder, out_dir, "--frames", "2")[0] == 0
    options = _record(out_dir)["options"]
    assert options["tile"] == "the reference's tiled VAE (tiles in step, shared GroupNorm)"
    assert (options["vae_encoder_tile"], options["vae_decoder_tile"]) == (1024, 224)
    code, out = _upscale(
        bikes_folder,
        out_dir,
        *("--color-fix", "wavelet", "--seed", "3", "--previous", "reencode"),
        *("--vae-decoder-tile", "8"),  # tiles these frames' 24x32 latents, whole before
    )
    assert code == 2, out
    assert "tiling.vae_decoder: 'whole' there, 'reference tiles: 1x2 of 8x8 latent' now" in out
    assert "options.vae_decoder_tile" not in out  # named by what it does to the frames
    assert "options.color_fix: 'adain' there, 'wavelet' now" in out
    assert "options.previous: 'carry' there, 'reencode' now" in out
    assert "options.seed: 0 there, 3 now" in out and "--force" in out
    assert len(_pngs(out_dir)) == 2  # nothing touched
    code, out = _upscale(
        bikes_folder, out_dir, "--color-fix", "wavelet", "--previous", "reencode", "--force"
    )
    assert code == 0, out
    record = _record(out_dir)
    assert record["options"]["color_fix"] == "wavelet" and len(record["attempts"]) == 1
    assert record["options"]["previous"] == "reencode"
    assert record["frames"] == 4 and "kept" not in out


def test_tile_options_that_cut_no_frame_go_on_and_an_older_record_compares_them(
    bikes_folder, tmp_path
):
    """48x64 LQ frames: a 192x256 model input, a 24x32 latent, tiled by none of the parts."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _upscale(bikes_folder, whole)[0] == 0
    assert _upscale(bikes_folder, parts, "--frames", "2")[0] == 0
    parts_tiled = ("vae_encoder", "vae_decoder", "latent")
    assert _record(parts)["tiling"] == dict.fromkeys(parts_tiled, "whole")
    code, out = _upscale(
        bikes_folder,
        parts,
        *("--frames", "3", "--vae-encoder-tile", "192", "--vae-decoder-tile", "10"),
        *("--latent-tile", "28", "--latent-overlap", "20"),
    )
    assert code == 0 and "going on from frame 2" in out, out
    assert _record(parts)["options"]["latent_tile"] == 28  # what the last run was given
    code, out = _upscale(bikes_folder, parts, "--tile", "0")  # the plain VAE: the same here
    assert code == 0 and "going on from frame 3" in out, out
    for name, frame in _pngs(whole).items():
        assert np.abs(_pngs(parts)[name].astype(int) - frame.astype(int)).max() <= 1, name
    # each part tiled in turn is refused, naming it
    for args, part, now in [
        (("--vae-encoder-tile", "96"), "vae_encoder", "reference tiles: 2x2 of 64x96 px"),
        (("--tile", "128"), "vae_encoder", "diffusers tiles of 128 px"),
        (("--tile", "64"), "vae_decoder", "diffusers tiles of 8 latent"),
        # a latent tile larger than the latent's short side, its overlap halved (tile_grid)
        (
            ("--latent-tile", "27", "--latent-overlap", "26"),
            "latent",
            "tiles of 24 latent at rows [0], columns [0, 8]",
        ),
    ]:
        code, out = _upscale(bikes_folder, parts, *args)
        assert code == 2 and f"tiling.{part}: 'whole' there, '{now}' now" in out, (args, out)
    # another tile size that cuts the frames into the same grid goes on: 96 and 104 px both
    # give 2x2 cores of 64x96 px on the 192x256 input
    tiled = tmp_path / "tiled"
    assert _upscale(bikes_folder, tiled, "--frames", "2", "--vae-encoder-tile", "96")[0] == 0
    code, out = _upscale(bikes_folder, tiled, "--vae-encoder-tile", "104")
    assert code == 0 and "going on from frame 2" in out, out
    # a record written before "tiling" compares the tile options by value, as it did
    record = _record(parts)
    del record["tiling"]
    (parts / "upscale.json").write_text(json.dumps(record))
    code, out = _upscale(bikes_folder, parts, "--latent-tile", "40")
    assert code == 2 and "options.latent_tile: 96 there, 40 now" in out, out


@pytest.mark.parametrize("elsewhere", [False, True])
def test_a_killed_run_is_recorded_killed_and_its_partial_writes_removed(
    bikes_folder, tmp_path, elsewhere
):
    out_dir = tmp_path / "sr"
    assert _upscale(bikes_folder, out_dir, "--frames", "3")[0] == 0
    # what SIGKILL during frame 4's write leaves: a record that says running, a temp file
    record = _record(out_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record.update(status="running", pid=dead.pid)
    if elsewhere:  # a requeued job on another node of a shared file system
        record["host"] = "node-that-is-not-this-one"
    record["attempts"][-1].update(status="running", frames_written=0)  # its count not written
    (out_dir / "upscale.json").write_text(json.dumps(record))
    (out_dir / "im3.png").unlink()  # written out of order: frame 3 lost, 1 and 2 kept
    partial = out_dir / ".im3.k2x9q1.png"
    partial.write_bytes(b"\x89PNG half")
    code, out = _upscale(bikes_folder, out_dir)
    assert code == 0, out
    if elsewhere:  # its process cannot be looked for from here
        assert f"(pid {dead.pid} on node-that-is-not-this-one) never wrote its end" in out
    else:
        assert f"the earlier run (pid {dead.pid}) was killed" in out
    assert "going on from frame 2" in out and not partial.exists()
    record = _record(out_dir)
    ended = "gone" if elsewhere else "killed"
    assert [a["status"] for a in record["attempts"]] == [ended, "finished"]
    assert record["attempts"][0]["frames_written"] == 2  # counted on disk: im1, im2
    assert record["frames"] == 4 and record["status"] == "finished"


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_another_live_upscale_writes_to_is_refused(
    bikes_folder, tmp_path, force, monkeypatch
):
    import dloral.upscale

    out_dir = tmp_path / "sr"
    assert _upscale(bikes_folder, out_dir, "--frames", "2")[0] == 0
    before = _record(out_dir)
    args = [sys.executable, "-c", HOLD_LOCK, str(out_dir)]  # the folder is what is locked
    live = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    with live, monkeypatch.context() as patch:  # refused before the model is built
        patch.setattr(dloral.upscale, "_build", lambda job: pytest.fail("model built"))
        try:
            assert live.stdout.readline() == "held\n"  # as an upscale holds it while it runs
            code, out = _upscale(bikes_folder, out_dir, *(["--force"] if force else []))
        finally:
            live.kill()
    assert code == 2 and "another upscale is writing to this folder" in out, out
    assert _record(out_dir) == before and len(_pngs(out_dir)) == 2  # nothing touched
    # once that process is gone (its lock with it), the folder is free again
    assert _upscale(bikes_folder, out_dir)[0] == 0


def test_a_forced_start_that_stops_leaves_no_frame_of_the_earlier_upscale(bikes_folder, tmp_path):
    out_dir = tmp_path / "sr"
    assert _upscale(bikes_folder, out_dir)[0] == 0  # 4 frames, seed 0
    # forced with seed 3, stopped after 2 frames (as --frames 2 does): frames 3-4 were seed 0's
    assert _upscale(bikes_folder, out_dir, "--seed", "3", "--force", "--frames", "2")[0] == 0
    assert sorted(_pngs(out_dir)) == ["im1.png", "im2.png"]
    whole = tmp_path / "whole"
    assert _upscale(bikes_folder, whole, "--seed", "3")[0] == 0
    code, out = _upscale(bikes_folder, out_dir, "--seed", "3")
    assert code == 0 and "2 frames (and 2 kept from an earlier run)" in out, out
    got, expected = _pngs(out_dir), _pngs(whole)
    for name in expected:  # every frame is seed 3's
        assert np.abs(got[name].astype(int) - expected[name].astype(int)).max() <= 1, name


def test_another_prompt_is_another_upscale(bikes_folder, tmp_path):
    out_dir = tmp_path / "sr"
    fixed = ["--prompt-source", "fixed", "--prompt", "a red car", "--frames", "2"]
    assert _upscale(bikes_folder, out_dir, *fixed)[0] == 0
    assert _record(out_dir)["prompt"] == "a red car"
    other = ["--prompt-source", "fixed", "--prompt", "a blue boat"]
    code, out = _upscale(bikes_folder, out_dir, *other)
    assert code == 2 and "prompt_option: 'a red car' there, 'a blue boat' now" in out, out


def test_a_second_stop_during_the_clean_up_still_leaves_a_true_record(
    bikes_folder, tmp_path, monkeypatch
):
    """Ctrl-C after the first frame, and again while the frames handed over are finishing."""
    from dloral.data.frames import FrameWriter
    from dloral.upscale import UpscaleJob, upscale_video

    close, calls = FrameWriter.close, []

    def close_interrupted_again(self, raise_errors=True):
        calls.append(raise_errors)
        if len(calls) == 1:  # the clean-up's first close: a second Ctrl-C arrives
            import signal

            signal.raise_signal(signal.SIGINT)
        return close(self, raise_errors)

    stopped = []

    def first_frame_then_stop():  # the first Ctrl-C, once
        if not stopped:
            stopped.append(1)
            raise KeyboardInterrupt

    monkeypatch.setattr(FrameWriter, "close", close_interrupted_again)
    job = UpscaleJob(input=bikes_folder, output=tmp_path / "sr", device="cpu", process_size=64)
    with pytest.raises(KeyboardInterrupt):
        upscale_video(job, on_frame=first_frame_then_stop)
    record = _record(tmp_path / "sr")
    assert record["status"] == "interrupted", record["status_reason"]
    assert record["attempts"][-1]["status"] == "interrupted"


def test_a_record_from_before_resuming_is_refused_until_forced(bikes_folder, tmp_path):
    out_dir = tmp_path / "sr"
    assert _upscale(bikes_folder, out_dir, "--frames", "2")[0] == 0
    old = {k: v for k, v in _record(out_dir).items() if k not in ("status", "attempts")}
    (out_dir / "upscale.json").write_text(json.dumps(old))
    code, out = _upscale(bikes_folder, out_dir)
    assert code == 2 and "written by an earlier dloral" in out and "--force" in out, out
    assert _upscale(bikes_folder, out_dir, "--force")[0] == 0
    assert _record(out_dir)["frames"] == 4


def test_the_record_says_running_while_frames_are_made(bikes_folder, tmp_path, monkeypatch):
    """Read back from inside the run, after its first frame: status, pid and host are there."""
    from dloral.upscale import UpscaleJob, upscale_video

    out_dir, seen = tmp_path / "sr", []

    def on_frame():
        if not seen:
            seen.append(_record(out_dir))

    job = UpscaleJob(input=bikes_folder, output=out_dir, device="cpu", process_size=64)
    result = upscale_video(job, on_frame=on_frame)
    assert result.frames == 4 and result.kept == 0
    (during,) = seen
    assert during["status"] == "running" and during["pid"] == os.getpid()
    assert during["attempts"][-1]["status"] == "running" and during["prompt"] == ""
    assert _record(out_dir)["status"] == "finished"


def test_a_video_input_with_skip_goes_on_through_the_cli(tmp_path, bikes_lq):
    """Frame names of a video (<stem>_0000.png) and the reference's `skip`: no frame 0."""
    import av

    src = tmp_path / "clip.mp4"
    with av.open(str(src), "w") as out:
        stream = out.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0"}
        for frame in bikes_lq[:5]:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(to_uint8(frame), format="rgb24")))
        out.mux(stream.encode())
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    skip = ["--first-frame", "skip"]
    assert _upscale(src, whole, *skip)[0] == 0
    assert _upscale(src, parts, *skip, "--frames", "3")[0] == 0
    assert sorted(_pngs(parts)) == ["clip_0001.png", "clip_0002.png"]
    code, out = _upscale(src, parts, *skip)
    assert code == 0 and "going on from frame 3" in out, out
    expected, got = _pngs(whole), _pngs(parts)
    assert sorted(got) == sorted(expected) == [f"clip_000{i}.png" for i in range(1, 5)]
    for name in expected:
        assert np.abs(got[name].astype(int) - expected[name].astype(int)).max() <= 1, name
    assert [a["first_frame"] for a in _record(parts)["attempts"]] == [1, 3]


def test_a_videos_fingerprint_follows_its_bytes_not_its_place(bikes_path, tmp_path):
    import shutil

    from dloral.data.frames import open_frames
    from dloral.upscale import input_fingerprint

    copy = shutil.copy(bikes_path, tmp_path / "copy.mp4")
    assert input_fingerprint(open_frames(copy)) == input_fingerprint(open_frames(bikes_path))
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF  # one byte in its last MiB (the moov index or the last frames)
    copy.write_bytes(bytes(data))
    assert input_fingerprint(open_frames(copy)) != input_fingerprint(open_frames(bikes_path))
