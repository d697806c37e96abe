"""`upscale --video`: the finished PNG frames encoded to H.264, decoded back and compared, and
the input's audio copied packet for packet. Real bikes frames, the tiny profile, CPU."""

import json
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dloral.cli import app
from dloral.data.encode import EncodeError, encode_frames
from dloral.data.frames import to_uint8

runner = CliRunner()
FAST = ["--process-size", "64", "--batch-size", "2", "--device", "cpu"]
RATE, SAMPLE_RATE = 12, 22050


@pytest.fixture()
def clip_with_audio(tmp_path, bikes_lq):
    """5 bikes frames at 12 fps (H.264) and 5/12 s of a 440 Hz tone (AAC)."""
    path = tmp_path / "bikes_audio.mp4"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=RATE)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=SAMPLE_RATE)
        for frame in bikes_lq[:5]:
            image = av.VideoFrame.from_ndarray(to_uint8(frame), format="rgb24")
            out.mux(video.encode(image))
        out.mux(video.encode())
        t = np.arange(int(SAMPLE_RATE * 5 / RATE), dtype=np.float32) / SAMPLE_RATE
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        samples = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        samples.sample_rate = SAMPLE_RATE
        for packet in [*audio.encode(samples), *audio.encode(None)]:
            out.mux(packet)
    return path


def _decoded(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, stream.codec_context.pix_fmt


def _audio_packets(path):
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return []
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / mse)


def test_the_video_holds_the_frames_at_the_inputs_rate_with_its_audio(clip_with_audio, tmp_path):
    out_dir, video = tmp_path / "sr", tmp_path / "sr.mp4"
    args = ["upscale", str(clip_with_audio), str(out_dir), *FAST, "--video", str(video)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    pngs = sorted(out_dir.glob("*.png"))
    frames, rate, pix_fmt = _decoded(video)
    assert len(frames) == len(pngs) == 5 and rate == RATE and pix_fmt == "yuv420p"
    for png, frame in zip(pngs, frames, strict=True):
        expected = np.asarray(Image.open(png))
        assert frame.shape == expected.shape == (192, 256, 3)
        # CRF 18 in 4:2:0: measured 42.9-43.8 dB on these frames, CRF 30 37.2-38.7
        assert _psnr(frame, expected) > 40, png.name
    # the audio is the input's, packet for packet: copied, not re-encoded
    assert _audio_packets(video) == _audio_packets(clip_with_audio) != []
    record = json.loads((out_dir / "upscale.json").read_text())["video"]
    assert record["path"] == str(video) and record["frames"] == 5 and record["fps"] == RATE
    assert record["fps_from"] == "the input" and record["audio"].startswith("copied from")
    assert record["status"] == "finished"
    assert "video: " in result.output and not list(tmp_path.glob(".sr.*"))  # no temp left


def test_a_video_that_cannot_be_written_is_recorded_failed(bikes_folder, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    out_dir, video = tmp_path / "sr", tmp_path / "a_file" / "sr.mp4"
    result = runner.invoke(
        app, ["upscale", str(bikes_folder), str(out_dir), *FAST, "--video", str(video)]
    )
    assert result.exit_code == 2 and "cannot write the video" in " ".join(result.output.split())
    record = json.loads((out_dir / "upscale.json").read_text())
    assert record["status"] == "finished" and record["frames"] == 4  # the frames are done
    assert record["video"]["status"] == "failed" and "sr.mp4" in record["video"]["reason"]


def test_a_partial_video_gets_no_audio_and_says_why(clip_with_audio, tmp_path):
    out_dir, video = tmp_path / "sr", tmp_path / "sr.mkv"
    args = ["upscale", str(clip_with_audio), str(out_dir), *FAST, "--frames", "3"]
    result = runner.invoke(app, [*args, "--video", str(video), "--video-crf", "0"])
    assert result.exit_code == 0, result.output
    frames, _, _ = _decoded(video)
    assert len(frames) == 3 and _audio_packets(video) == []
    pngs = sorted(out_dir.glob("*.png"))
    # CRF 0 is lossless in 4:2:0: what is left is the chroma subsampling (measured 46.2-46.4
    # dB on these frames, against 42.9-43.8 at CRF 18)
    assert _psnr(frames[0], np.asarray(Image.open(pngs[0]))) > 45
    audio = json.loads((out_dir / "upscale.json").read_text())["video"]["audio"]
    assert audio.startswith("not copied: the video has frames") and "of 5" in audio


def test_a_video_without_audio_says_so(tmp_path, bikes_lq):
    src = tmp_path / "silent.mp4"
    with av.open(str(src), "w") as out:
        stream = out.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in bikes_lq[:2]:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(to_uint8(frame), format="rgb24")))
        out.mux(stream.encode())
    out_dir, video = tmp_path / "sr", tmp_path / "sr.mp4"
    args = ["upscale", str(src), str(out_dir), *FAST, "--frames", "1", "--video", str(video)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out_dir / "upscale.json").read_text())["video"]
    assert record["audio"] == "none: the input has no audio"  # not "not copied: ..."
    assert len(_decoded(video)[0]) == 1


def test_a_folder_of_frames_is_encoded_at_the_rate_asked(bikes_folder, tmp_path):
    out_dir, video = tmp_path / "sr", tmp_path / "sr.mov"
    args = ["upscale", str(bikes_folder), str(out_dir), *FAST, "--video", str(video)]
    result = runner.invoke(app, [*args, "--fps", "12.5"])
    assert result.exit_code == 0, result.output
    frames, rate, _ = _decoded(video)
    assert len(frames) == 4 and rate == Fraction(25, 2)
    record = json.loads((out_dir / "upscale.json").read_text())["video"]
    assert record["fps_from"] == "--fps" and record["audio"].startswith("none: the input is")


def test_an_ntsc_rate_given_as_a_float_is_kept_exact(tmp_path, bikes_lq):
    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for path, frame in zip(paths, bikes_lq, strict=False):
        Image.fromarray(to_uint8(frame)).save(path)
    encoded = encode_frames(paths, tmp_path / "ntsc.mp4", float(Fraction(30000, 1001)))
    assert _decoded(tmp_path / "ntsc.mp4")[1] == Fraction(30000, 1001)
    assert encoded.fps == 30000 / 1001


def _clip(path, fmt, audio_codec, bikes_lq):
    """12 frames at 12 fps (H.264) and 1 s of a tone in `audio_codec`, in container `fmt`."""
    with av.open(str(path), "w", format=fmt) as out:
        video = out.add_stream("libx264", rate=RATE)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream(audio_codec, rate=SAMPLE_RATE)
        for i in range(12):
            image = to_uint8(bikes_lq[i % len(bikes_lq)])
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode())
        t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        if audio_codec == "pcm_s16le":
            pcm = (tone * 32767).astype(np.int16)
            samples = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        else:
            samples = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        samples.sample_rate = SAMPLE_RATE
        for packet in [*audio.encode(samples), *audio.encode(None)]:
            out.mux(packet)
    return path


def _pngs_of(tmp_path, bikes_lq, count=12):
    paths = [tmp_path / f"f{i}.png" for i in range(count)]
    for i, path in enumerate(paths):
        Image.fromarray(to_uint8(bikes_lq[i % len(bikes_lq)])).save(path)
    return paths


def _starts(path):
    with av.open(str(path)) as container:
        return {s.type: float(s.start_time * s.time_base) for s in container.streams}


def test_audio_keeps_step_with_an_input_that_starts_late_and_is_interleaved(tmp_path, bikes_lq):
    src = _clip(tmp_path / "late.ts", "mpegts", "aac", bikes_lq)
    late = _starts(src)
    assert late["video"] > 0.1 and late["audio"] == pytest.approx(late["video"])  # MPEG-TS
    encoded = encode_frames(_pngs_of(tmp_path, bikes_lq), tmp_path / "out.mp4", RATE, 18, src)
    assert encoded.audio.startswith("copied from late.ts (aac")
    starts = _starts(tmp_path / "out.mp4")
    assert starts["video"] == 0 and starts["audio"] == pytest.approx(0, abs=1e-3)
    with av.open(str(tmp_path / "out.mp4")) as container:
        order = [p.stream.type for p in container.demux() if p.size]
    # audio muxed as its time comes: the first before the last video packet, not all after
    assert order.index("audio") < len(order) - 1 - order[::-1].index("video")
    # the same AAC frames: MPEG-TS carries each behind a 7-byte ADTS header, mp4 without
    adts = _audio_packets(src)
    assert all(p[:2] == b"\xff\xf1" for p in adts)  # ADTS sync word, no CRC: 7 bytes
    assert _audio_packets(tmp_path / "out.mp4") == [p[7:] for p in adts]


def test_audio_a_container_refuses_is_left_out_and_said(tmp_path, bikes_lq):
    src = _clip(tmp_path / "pcm.mkv", "matroska", "pcm_s16le", bikes_lq)
    frames = _pngs_of(tmp_path, bikes_lq)
    into_mp4 = encode_frames(frames, tmp_path / "out.mp4", RATE, 18, src)
    assert into_mp4.audio == "not copied: .mp4 did not take the input's pcm_s16le audio as it is"
    assert len(_decoded(tmp_path / "out.mp4")[0]) == 12 and not _audio_packets(tmp_path / "out.mp4")
    into_mkv = encode_frames(frames, tmp_path / "out.mkv", RATE, 18, src)
    assert into_mkv.audio.startswith("copied from pcm.mkv (pcm_s16le")
    assert _audio_packets(tmp_path / "out.mkv") == _audio_packets(src)


def test_odd_sizes_are_encoded_444_and_a_stray_size_is_named(tmp_path, bikes_lq):
    paths = []
    for i, frame in enumerate(bikes_lq[:3]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(to_uint8(frame)[:47, :63]).save(paths[-1])
    encoded = encode_frames(paths, tmp_path / "odd.mp4", 25, crf=0)
    frames, _, pix_fmt = _decoded(tmp_path / "odd.mp4")
    assert encoded.pix_fmt == pix_fmt == "yuv444p" and frames[0].shape == (47, 63, 3)
    # 4:4:4 at CRF 0: only the RGB <-> YUV rounding is left
    assert _psnr(frames[1], np.asarray(Image.open(paths[1]))) > 45
    Image.fromarray(to_uint8(bikes_lq[3])).save(paths[1])
    with pytest.raises(EncodeError, match=r"1\.png: frame 1 is 64x48, the video's 63x47"):
        encode_frames(paths, tmp_path / "bad.mp4", 25)
    assert not (tmp_path / "bad.mp4").exists() and not list(tmp_path.glob(".bad.*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--video", "out.avi"], "the video must be one of .mp4, .mkv, .mov"),
        (["--video", "sr.mp4", "--fps", "0"], "fps must be > 0"),
    ],
)
def test_bad_video_options_are_refused_before_any_frame(bikes_folder, tmp_path, args, message):
    out_dir = tmp_path / "sr"
    result = runner.invoke(app, ["upscale", str(bikes_folder), str(out_dir), *FAST, *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert not out_dir.exists()
