"""Reading and checking a config or a command's options imports none of the heavy libraries, so
a bad key or value is reported in about a second, not after torch, diffusers, Ray and MLflow have
loaded (20-30 s). Each check runs in a fresh interpreter and lists what it imported."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "peft", "diffusers", "transformers", "ray", "mlflow", "pyiqa", "pandas")

LIBRARY = """
import json, sys
from pathlib import Path

from dloral.bench.suite import SuiteError, check_methods, check_metrics, load_suite
from dloral.data.embedded import prepare_embedded
from dloral.sweep.spec import SweepError, available_experiments, load_experiment
from dloral.train.config import load_config
from dloral.upscale import UpscaleError, UpscaleJob

errors = []

def expect(error, call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except error as err:
        errors.append(str(err))
    else:
        raise AssertionError(f"{call.__name__}{args} did not fail")

load_config(None, ["optim.lr=3e-4", "model.cfr.variant=off", "data.sampler.crop=128"])
expect(KeyError, load_config, None, ["optim.lrr=1"])
expect(ValueError, load_config, None, ["optim.lr=abc"])
for name in available_experiments():
    load_experiment(name, ["sweep.space.run.seed=[1, 2]"])
expect(SweepError, load_experiment, "default", ["optim.lrr=1"])
expect(SweepError, load_experiment, "nonexistent_experiment")
load_suite("embedded")
for path in Path(sys.argv[1], "benchmarks").glob("*.toml"):
    try:
        load_suite(path)  # dataset roots from unset env vars are an error, checked here too
    except SuiteError:
        pass
check_methods(["bicubic", "dloral:tiny"])
check_metrics(["psnr", "ewarp", "lpips"])
expect(SuiteError, load_suite, "nonexistent_suite")
expect(SuiteError, check_metrics, ["nonsense"])
clip = Path(sys.argv[2])
UpscaleJob(input=clip, tile=128, first_frame="skip").resolved()
expect(UpscaleError, UpscaleJob(input=clip, tile=10).resolved)
expect(UpscaleError, UpscaleJob(input=clip.parent / "missing.mp4").resolved)
expect(NotADirectoryError, prepare_embedded, clip)
print(json.dumps({"errors": errors, "modules": sorted(sys.modules)}))
"""

CLI = """
import json, sys
from typer.testing import CliRunner
from dloral.cli import app

clip = sys.argv[2]
commands = [
    ["train", "--set", "optim.lrr=1", "--no-tracking"],
    ["train", "--set", "optim.lr=abc", "--no-tracking"],
    ["sweep", "--set", "optim.lrr=1", "--no-tracking"],
    ["sweep", "nonexistent_experiment", "--no-tracking"],
    ["bench", "nonexistent_suite", "--no-tracking"],
    ["bench", "--metrics", "nonsense", "--no-tracking"],
    ["bench", "--method", "nonsense", "--no-tracking"],
    ["upscale", clip, "--tile", "10"],
    ["data", "prepare", "--out", clip],
    ["export", clip + ".missing", "model.pkl"],
]
runner = CliRunner()
results = [runner.invoke(app, c) for c in commands]
print(json.dumps({
    "codes": [r.exit_code for r in results],
    "outputs": [" ".join(r.output.split()) for r in results],
    "modules": sorted(sys.modules),
}))
"""


def _run(script: str, tmp_path: Path) -> dict:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not decoded: only the options are checked")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), str(clip)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heavy(modules: list[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & set(HEAVY))


def test_loading_and_checking_configs_imports_no_heavy_library(tmp_path):
    out = _run(LIBRARY, tmp_path)
    assert _heavy(out["modules"]) == []
    assert len(out["errors"]) == 9 and "optim.lrr" in out["errors"][0]


def test_config_and_option_errors_of_every_command_import_no_heavy_library(tmp_path):
    out = _run(CLI, tmp_path)
    assert out["codes"] == [2] * 10, out["outputs"]
    named = ["optim.lrr", "optim.lr", "optim.lrr", "nonexistent_experiment", "nonexistent_suite"]
    named += ["nonsense", "nonsense", "tile", "not a folder", "clip.mp4.missing"]
    for text, name in zip(out["outputs"], named, strict=True):
        assert "error" in text and name in text, text
    assert _heavy(out["modules"]) == []


def test_loading_the_model_does_not_import_bitsandbytes(tmp_path):
    """pyiqa requires bitsandbytes, and peft imports it (with torch's inductor) where it is
    installed: 3 s of every process that loads the model on a CPU. The locked environment
    leaves it out (pyproject's override); the model and pyiqa's metrics work without it."""
    script = (
        "import json, sys; import dloral.train.recipe, dloral.upscale, pyiqa; "
        "import torch; x = torch.rand(1, 3, 32, 32); "
        "assert pyiqa.create_metric('ssim', device='cpu')(x, x).item() > 0.999; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    modules = {m.split(".")[0] for m in _run(script, tmp_path)}
    assert {"peft", "pyiqa"} <= modules and "bitsandbytes" not in modules
