"""The GPU benchmark's own path: a prepared 1280x720 frames folder, and `bench_gpu.py run` in a
process where PyAV, scikit-video, Ray, MLflow, pyiqa, lpips and OpenCV cannot be imported (CPU
fallback, tiny profile)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dloral.data.config import SamplerConfig
from dloral.data.embedded import prepare_hires_frames
from dloral.data.frames import open_frames, write_png
from dloral.data.readers import read_dataset
from dloral.data.sampler import TrainingClips

ROOT = Path(__file__).parents[1]
ABSENT = ("av", "skvideo", "ray", "mlflow", "pyiqa", "lpips", "cv2")
# Run a script as a node without these packages would: `import av` raises ImportError (a None
# entry in sys.modules), and importlib.util.find_spec reports them missing.
WITHOUT = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def hires(tmp_path_factory) -> Path:
    return prepare_hires_frames(tmp_path_factory.mktemp("bench-frames"), count=3).parent


def test_hires_frames_take_a_512_crop(hires):
    source = open_frames(hires / "bigbuckbunny")
    assert len(source) == 3 and source.size == (720, 1280)
    clips = read_dataset("youhq", hires).clips
    sample = TrainingClips(clips, SamplerConfig(crop=512, frames=2))[0]
    assert sample["gt"].shape == (2, 3, 512, 512) and sample["lq"].shape == (2, 3, 128, 128)


def test_clips_smaller_than_the_crop_name_their_size_and_how_to_get_larger(tmp_path, bikes_lq):
    for i, frame in enumerate(bikes_lq[:2]):
        write_png(frame, tmp_path / "bikes" / f"{i:04d}.png")
    clips = read_dataset("youhq", tmp_path).clips
    with pytest.raises(ValueError) as err:
        TrainingClips(clips, SamplerConfig(crop=512))
    message = str(err.value)
    assert "clips smaller than the 512px crop: bikes (64x48)" in message
    assert "data.train_root" in message and "benchmarks/bench_gpu.py prepare DIR" in message


def test_bench_gpu_runs_without_av_skvideo_ray_mlflow_pyiqa_lpips_opencv(hires, tmp_path):
    out = tmp_path / "records"
    command = [
        "benchmarks/bench_gpu.py", "run", "--frames-dir", str(hires), "--device", "cpu",
        "--modes", "reference-like", "--clip", "2", "--steps", "2",
        "--checkpointing", "off", "--out", str(out),
    ]  # fmt: skip
    # one thread: on a shared 2-core machine more threads spin against other processes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT.format(absent=ABSENT), *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a guard against a hang, not a speed check
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "bench-gpu.json").read_text())
    assert record["mode"].startswith("cpu-fallback")
    assert record["command"] == "python benchmarks/bench_gpu.py " + " ".join(command[1:])
    env_ = record["environment"]
    assert env_["device"] == "cpu" and len(env_["git_commit"]) == 40
    assert all(env_["versions"][p] != "not installed" for p in ("torch", "diffusers", "peft"))
    runs = {r["mode"]: r for r in record["latency"]["runs"]}
    assert set(runs) == {"reference-like"}  # one mode keeps this test short; all run by default
    ref = runs["reference-like"]
    assert ref["previous"] == "reencode" and ref["lora"].startswith("unmerged")
    assert "fp32" in ref["dtype_note"] and ref["attention"].startswith("classic")
    assert ref["sr_size"] == [64, 96] and ref["stages_seconds_per_frame"]["unet"] > 0
    (train,) = record["train"]["runs"]
    assert train["crop"] == 64 and train["steps"] == 2 and train["lpips"] == "not used (weight 0)"
    assert str(hires) in record["train"]["data"]
