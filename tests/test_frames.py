import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dloral.data.frames import (
    FrameError,
    FrameWriter,
    natural_key,
    open_frames,
    read_ahead,
    read_image,
    seek_point,
    to_tensor,
    to_uint8,
    write_png,
)


def _write(folder, name, h, w, value=128):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(folder / name)


def test_folder_frames_are_naturally_sorted(tmp_path):
    for i in (10, 2, 1):
        _write(tmp_path, f"frame{i}.png", 8, 12, value=i)
    src = open_frames(tmp_path)
    assert src.names == ("frame1.png", "frame2.png", "frame10.png")
    assert src.size == (8, 12)
    values = [round(float(f[0, 0, 0]) * 255) for _, f in src.frames()]
    assert values == [1, 2, 10]
    assert sorted(["a10", "a9", "a100"], key=natural_key) == ["a9", "a10", "a100"]


def test_video_probe_and_lazy_decode(bikes_path):
    src = open_frames(bikes_path)
    assert src.size == (272, 640) and len(src) == 250
    assert src.names[0] == "bikes_0000.png" and src.fps
    it = src.frames()
    name, frame = next(it)
    assert name == "bikes_0000.png" and frame.shape == (3, 272, 640)
    assert 0.0 <= float(frame.min()) and float(frame.max()) <= 1.0


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FrameError, match="nope"):
        open_frames(tmp_path / "nope")


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FrameError, match="holds no frames"):
        open_frames(tmp_path)


def test_mixed_sizes_name_the_frame(tmp_path):
    _write(tmp_path, "0001.png", 8, 8)
    _write(tmp_path, "0002.png", 8, 10)
    with pytest.raises(FrameError, match="0002.png.*mixed-size"):
        open_frames(tmp_path)


def test_unreadable_frame_is_named(tmp_path):
    _write(tmp_path, "0001.png", 8, 8)
    (tmp_path / "0002.png").write_bytes(b"not a png at all")
    with pytest.raises(FrameError, match="0002.png"):
        open_frames(tmp_path)


def test_unreadable_video_is_named(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(FrameError, match="broken.mp4"):
        open_frames(bad)


def test_png_roundtrip_is_exact_for_uint8_values(tmp_path):
    frame = torch.randint(0, 256, (3, 5, 7)).float() / 255
    write_png(frame, tmp_path / "x.png")
    back = np.asarray(Image.open(tmp_path / "x.png"))
    assert np.array_equal(back, to_uint8(frame))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("photo", ["astronaut", "camera"])  # 16-bit RGB and 16-bit grey
def test_16bit_images_read_as_the_8bit_photo_within_quantisation(tmp_path, photo):
    """A real photo smoothed to values between the 8-bit levels, saved as 16-bit and as 8-bit
    PNG (and 16-bit TIFF): the 16-bit read keeps all 16 bits and matches the 8-bit read within
    half an 8-bit step (PIL alone reads 16-bit grey as white and truncates 16-bit colour)."""
    from skimage import data, filters

    image = getattr(data, photo)().astype(np.float64) / 255
    colour = image.ndim == 3
    smooth = filters.gaussian(image, sigma=1.5, channel_axis=-1 if colour else None)
    u16 = np.round(smooth * 65535).astype(np.uint16)
    u8 = np.round(smooth * 255).astype(np.uint8)
    (tmp_path / "deep").mkdir()
    for suffix in ("png", "tif"):
        path = str(tmp_path / "deep" / f"0001.{suffix}")
        assert cv2.imwrite(path, np.ascontiguousarray(u16[..., ::-1]) if colour else u16)
    Image.fromarray(u8).save(tmp_path / "flat.png")

    want = torch.from_numpy(u16.astype(np.float32) / 65535)
    want = want.permute(2, 0, 1) if colour else want.expand(3, -1, -1)
    flat = read_image(tmp_path / "flat.png")
    for suffix in ("png", "tif"):
        deep = read_image(tmp_path / "deep" / f"0001.{suffix}")
        assert deep.shape == flat.shape == (3, *image.shape[:2]) and deep.dtype == torch.float32
        assert torch.allclose(deep, want, atol=1e-7, rtol=0)
        assert (deep - flat).abs().max() <= 0.5 / 255 + 1 / 65535
    source = open_frames(tmp_path / "deep")  # the readers' path: a folder of 16-bit frames
    assert source.size == image.shape[:2]
    assert torch.equal(source.read([0])[0], read_image(tmp_path / "deep" / "0001.png"))


def test_32bit_float_image_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "0001.tif"
    assert cv2.imwrite(str(path), np.full((8, 8), 0.5, np.float32))
    with pytest.raises(FrameError, match=r"0001\.tif: 32-bit float pixels"):
        read_image(path)


def test_read_ahead_keeps_the_order_raises_where_the_source_failed_and_stops_on_close(
    tmp_path, bikes_lq
):
    for i, frame in enumerate(bikes_lq):
        write_png(frame, tmp_path / f"{i:04d}.png")
    source = open_frames(tmp_path)
    ahead = list(read_ahead(source.frames(), depth=2))
    assert [n for n, _ in ahead] == list(source.names)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ahead, source.frames(), strict=True))

    def failing():
        yield from range(3)
        raise FrameError("clip.mp4: decoding failed at frame 3")

    got = []
    with pytest.raises(FrameError, match="at frame 3"):
        for item in read_ahead(failing(), depth=1):
            got.append(item)
    assert got == [0, 1, 2]  # everything before the failure arrived, in order

    before = {t.name for t in threading.enumerate()}
    endless = read_ahead(iter(lambda: 0, 1), depth=2)  # never ends by itself
    assert next(endless) == 0
    endless.close()
    assert "dloral-read-ahead" not in {t.name for t in threading.enumerate()} - before


def test_frame_writer_writes_whole_frames_counts_them_and_raises_a_failed_write(tmp_path, bikes_lq):
    done = []
    writer = FrameWriter(workers=2, compress_level=1, on_written=lambda: done.append(1))
    for i, frame in enumerate(bikes_lq):
        writer.write(frame, tmp_path / "out" / f"{i:04d}.png")
    writer.close()
    assert writer.written == len(done) == len(bikes_lq)
    for i, frame in enumerate(bikes_lq):  # level 1 is lossless: the frame, rounded to 8 bits
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "out" / f"{i:04d}.png")), to_uint8(frame)
        )
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]

    (tmp_path / "blocked").write_text("a file where a folder should be")
    writer = FrameWriter(workers=2)
    writer.write(bikes_lq[0], tmp_path / "ok" / "0000.png")
    writer.write(bikes_lq[1], tmp_path / "blocked" / "0001.png")
    writer.write(bikes_lq[2], tmp_path / "ok" / "0002.png")
    with pytest.raises(OSError):
        writer.close()
    assert writer.written == 2 and sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "0000.png",
        "0002.png",
    ]


def test_quantized_frames_are_what_their_pngs_hold(bikes_lq, tmp_path):
    from dloral.data.frames import quantized

    frames = (bikes_lq[:2] * 1.3 - 0.1).clone()  # out of range too: clamped as writers do
    for i, frame in enumerate(frames):
        write_png(frame, tmp_path / f"{i}.png")
    read_back = torch.stack([read_image(tmp_path / f"{i}.png") for i in range(2)])
    assert torch.equal(quantized(frames), read_back)
    assert not torch.equal(quantized(frames), frames.clamp(0, 1))


def _decoded_frames(path: Path) -> list[torch.Tensor]:
    """Every frame of a video, decoded from the first (no seeking)."""
    import av

    with av.open(str(path)) as container:
        return [to_tensor(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


def _gop_video(
    path: Path, frames: torch.Tensor, codec: str, options: dict, first_pts: int = 0
) -> Path:
    """Real frames encoded with the codec's `options` (a keyframe every 8 frames, B-frames
    where the codec has them); `first_pts` < 0 puts the first frames before time 0 (an mp4
    edit list then cuts them: what `ffmpeg -ss T -c copy` writes)."""
    import fractions

    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[-1], frames.shape[-2], "yuv420p"
        stream.options = options
        stream.codec_context.time_base = fractions.Fraction(1, 25)
        for i, frame in enumerate(frames):
            image = av.VideoFrame.from_ndarray(to_uint8(frame), format="rgb24")
            image.pts, image.time_base = first_pts + i, fractions.Fraction(1, 25)
            out.mux(stream.encode(image))
        out.mux(stream.encode())
    return path


X264_GOP8 = {"g": "8", "keyint_min": "8", "sc_threshold": "0"}


@pytest.fixture()
def seeks(monkeypatch) -> list[str]:
    """How each seeking decode went from now on: "landed" (frames came from the keyframe
    before the start) or "missed" (decoded from the first frame instead)."""
    from dloral.data import frames as module

    decode_from, outcomes = module._decode_from, []

    def spy(*args):
        try:
            yield from decode_from(*args)
            outcomes.append("landed")
        except module._SeekMissed:
            outcomes.append("missed")
            raise

    monkeypatch.setattr(module, "_decode_from", spy)
    return outcomes


@pytest.mark.parametrize("start", [1, 29, 30, 31, 76, 100, 200, 249])
def test_a_late_start_seeks_and_gives_the_frames_of_a_whole_decode(bikes_path, start, seeks):
    """bikes.mp4 has keyframes at packets 0, 30, 76, 137, 187, 242 and B-frames (its decode
    order is not its presentation order): frames from `start` equal the whole decode's."""
    source = open_frames(bikes_path)
    whole = _decoded_frames(bikes_path)
    point = seek_point(bikes_path, len(source), start)
    if start >= 30:  # a keyframe after frame 0 precedes it: decoding starts there
        assert point is not None and 30 <= point[0] <= start
    got = list(source.frames(start))
    assert [n for n, _ in got] == list(source.names[start:])
    for (_, frame), expected in zip(got, whole[start:], strict=True):
        assert torch.equal(frame, expected)
    assert seeks == (["landed"] if start >= 30 else [])


@pytest.mark.parametrize(
    "suffix,codec,options,seeking",
    [
        (".mp4", "libx264", {**X264_GOP8, "bf": "2"}, True),
        (".mkv", "libx264", {**X264_GOP8, "bf": "3"}, True),
        (".mov", "libx264", {**X264_GOP8, "x264-params": "open_gop=1", "bf": "3"}, True),
        (".webm", "libvpx-vp9", {"g": "8", "deadline": "realtime", "cpu-used": "8"}, True),
        # AVI stores no presentation times: FFmpeg makes them up in decode order, which with
        # B-frames is not the order frames come out in (seeking would land on other frames)
        (".avi", "libx264", {**X264_GOP8, "bf": "3"}, False),
        (".avi", "mpeg4", {"g": "8"}, False),
    ],
)
def test_seeking_in_other_containers_gives_the_frames_of_a_whole_decode(
    tmp_path, bikes_lq, suffix, codec, options, seeking, seeks
):
    frames = torch.cat([bikes_lq, bikes_lq.flip(-1), bikes_lq.flip(-2), bikes_lq])  # 24 frames
    path = _gop_video(tmp_path / f"gop{suffix}", frames, codec, options)
    source = open_frames(path)
    whole = _decoded_frames(path)
    assert len(source) == len(whole) == 24
    for start in (0, 7, 8, 9, 17, 23):
        seeks.clear()
        got = list(source.frames(start))
        assert [n for n, _ in got] == list(source.names[start:])
        assert all(torch.equal(f, e) for (_, f), e in zip(got, whole[start:], strict=True))
        assert seeks == (["landed"] if seeking and start >= 8 else []), (start, seeks)


def test_frames_an_edit_list_cuts_are_never_seeked_past(tmp_path, bikes_lq):
    """An mp4 whose first 3 frames lie before time 0: its edit list has the decoder drop them,
    so the packets are 3 more than the frames. Seeking by the packets would name every frame 3
    later: instead a late start decodes from the first frame and fails as a whole decode does."""
    frames = torch.cat([bikes_lq, bikes_lq.flip(-1), bikes_lq.flip(-2), bikes_lq])
    path = _gop_video(tmp_path / "cut.mp4", frames, "libx264", {**X264_GOP8, "bf": "3"}, -3)
    source = open_frames(path)
    assert seek_point(path, len(source), 17) is None
    with pytest.raises(FrameError, match="truncated") as whole:
        list(source.frames(0))
    with pytest.raises(FrameError, match="truncated") as late:
        list(source.frames(17))
    assert str(late.value) == str(whole.value)


def test_a_stream_cut_at_an_open_gop_keyframe_is_never_seeked(tmp_path, bikes_lq):
    """A copy of an open-GOP stream from its second keyframe on (what `ffmpeg -ss T -c copy`
    makes): the pictures shown before that keyframe reference the cut GOP and the decoder drops
    them, which nothing in the packets says. Packets shown before the first keyframe refuse
    seeking: a late start fails as a whole decode does, never with frames renamed."""
    import av

    frames = torch.cat([bikes_lq, bikes_lq.flip(-1), bikes_lq.flip(-2), bikes_lq])
    options = {**X264_GOP8, "x264-params": "open_gop=1", "bf": "3"}
    full = _gop_video(tmp_path / "open.mkv", frames, "libx264", options)
    with av.open(str(full)) as src:
        packets = [(p.pts, p.is_keyframe) for p in src.demux(src.streams.video[0]) if p.size]
    # the first keyframe after frame 0 with a leading picture (shown before it, decoded after)
    cut = next(i for i, (pts, key) in enumerate(packets) if key and i and packets[i + 1][0] < pts)
    path = tmp_path / "cut.mkv"
    with av.open(str(full)) as src, av.open(str(path), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        kept = (p for p in src.demux(src.streams.video[0]) if p.size)
        for i, packet in enumerate(kept):
            if i >= cut:
                packet.stream = stream
                out.mux(packet)
    source = open_frames(path)
    assert seek_point(path, len(source), len(source) - 2) is None
    try:
        whole = [f for _, f in source.frames(0)]
    except FrameError as err:  # the decoder dropped the leading pictures
        with pytest.raises(FrameError) as late:
            list(source.frames(len(source) - 2))
        assert str(late.value) == str(err)
    else:  # it decoded them all: then a late start gives the same frames
        got = [f for _, f in source.frames(len(source) - 2)]
        assert all(torch.equal(a, b) for a, b in zip(got, whole[-2:], strict=True))
