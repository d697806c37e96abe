"""`dloral-exp export`: a dloral checkpoint written as the official model.pkl, read back by
import_official into the same model; bad arguments exit 2 naming the file."""

import json

import pytest
import torch
from conftest import restored_pair, trained_model
from typer.testing import CliRunner

from dloral import cli
from dloral.cli import app
from dloral.model.checkpoint import import_official, save_checkpoint
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.train.recipe import STATE_FILE
from dloral.weights import sha256

runner = CliRunner()


def _text(result) -> str:
    return " ".join(result.output.split())


def _run_folder(root, model, step=2):
    """What `dloral-exp train` leaves: <run>/checkpoints/step-XXXXXX (model + training state)
    and the `latest` pointer."""
    folder = root / "checkpoints" / f"step-{step:06d}"
    save_checkpoint(model, folder, extra={"step": step})
    torch.save({"step": step}, folder / STATE_FILE)
    (root / "checkpoints" / "latest").write_text(folder.name)
    return folder


def test_export_of_a_run_folder_imports_as_the_same_model(tmp_path):
    model = trained_model(6, detail={"rank": 4, "alpha": 16})
    step = _run_folder(tmp_path / "run", model)
    out = tmp_path / "release" / "model.pkl"
    result = runner.invoke(app, ["export", str(tmp_path / "run"), str(out)])
    assert result.exit_code == 0, result.output
    text = _text(result)
    assert f"{out} (" in text and f"sha256 {sha256(out)}" in text
    assert f"from {step}, step 2" in text and sha256(step / "dloral.safetensors") in text
    assert "profile tiny" in text and "detail rank 4 alpha 16" in text

    imported, report = import_official(out, profile="tiny", overrides={"seed": 6})
    assert report.clean
    ours, theirs = model.unet.state_dict(), imported.unet.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():  # the file's adapters run at alpha 8: lora_B x alpha/8
        scale = 16 / 8 if ".lora_B.detail." in key else 1
        assert torch.equal(theirs[key], value * scale), key
    for key, value in model.cfr.state_dict().items():
        assert torch.equal(imported.cfr.state_dict()[key], value), key
    assert torch.allclose(restored_pair(model), restored_pair(imported), atol=1e-5)


def test_export_finds_the_checkpoint_as_train_resume_does(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)  # an older one, not `latest`
    step = _run_folder(run, DLoRAL(DLoRALConfig()), step=3)
    for given in (run, run / "checkpoints", run / "checkpoints" / "latest", step,
                  step / "dloral.safetensors"):  # fmt: skip
        assert cli._checkpoint_folder(given) == step, given


@pytest.mark.parametrize(
    "case", ["missing", "not_a_checkpoint", "unfinished_run", "official_input", "exists",
             "out_suffix", "bad_config"],
)  # fmt: skip
def test_export_errors_exit_2_naming_the_file(case, tmp_path):
    source, out, named = tmp_path / "ck", tmp_path / "model.pkl", None
    if case == "missing":
        named = str(source)
    elif case == "not_a_checkpoint":
        source.mkdir()
        named = f"{source}: not a dloral checkpoint (no dloral_config.json)"
    elif case == "unfinished_run":
        (source / "checkpoints").mkdir(parents=True)
        (source / "checkpoints" / "latest").write_text("step-000004")
        named = f"{source / 'checkpoints' / 'latest'}: no finished checkpoint"
    elif case == "official_input":
        source = tmp_path / "release.pkl"
        source.write_bytes(b"the official layout, by its name")
        named = f"{source}: is an official DLoRAL checkpoint already"
    elif case == "exists":
        source.mkdir()
        out.write_bytes(b"kept")
        named = f"{out}: exists; --force replaces it"
    elif case == "out_suffix":
        source.mkdir()
        out = tmp_path / "model.bin"
        named = f"{out}: an official checkpoint's name ends in .pkl"
    else:
        source.mkdir()
        (source / "dloral.safetensors").write_bytes(b"")
        (source / "dloral_config.json").write_text(json.dumps({"format": "other/0"}))
        named = f"{source / 'dloral_config.json'}: format 'other/0'"
    result = runner.invoke(app, ["export", str(source), str(out)])
    assert result.exit_code == 2, result.output
    assert named in _text(result)
    if case == "exists":
        assert out.read_bytes() == b"kept"
    elif case != "official_input":
        assert not out.exists()


def test_export_of_an_sd21_checkpoint_needs_the_base_weights(tmp_path, monkeypatch):
    """The file holds the whole UNet: without SD 2.1-base nothing is written, and the error
    says where the weights were looked for (--sd21-path, $DLORAL_SD21_PATH, the HF cache)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("DLORAL_SD21_PATH", raising=False)
    save_checkpoint(DLoRAL(DLoRALConfig()), tmp_path / "ck")
    config = tmp_path / "ck" / "dloral_config.json"
    meta = json.loads(config.read_text())
    meta["model"]["profile"] = "sd21"  # read, never built: the check comes first
    config.write_text(json.dumps(meta))
    out = tmp_path / "model.pkl"
    given = tmp_path / "sd21-elsewhere"
    result = runner.invoke(app, ["export", str(tmp_path / "ck"), str(out), "--sd21-path", given])
    assert result.exit_code == 2, result.output
    text = _text(result)
    assert "Stable Diffusion 2.1-base weights not found" in text and "DLORAL_SD21_PATH" in text
    assert f"{given} (from --sd21-path)" in text
    assert not out.exists()
