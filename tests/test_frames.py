import numpy as np
import pytest
import torch
from PIL import Image

from dloral.data.frames import FrameError, natural_key, open_frames, to_uint8, write_png


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
