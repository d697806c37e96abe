"""`dloral-exp doctor`: what is found, where it was looked for, which env var moves it."""

import pytest

from dloral import doctor
from dloral.bench.flow import RAFT_FILE
from dloral.bench.iqa import IQA_METRICS


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for var in (
        "DLORAL_SD21_PATH",
        "DLORAL_VGG16_WEIGHTS",
        "DLORAL_RAFT_WEIGHTS",
        "DLORAL_DOVER_WEIGHTS",
        "DLORAL_CHECKPOINT",
        "RAY_ADDRESS",
        "MLFLOW_TRACKING_URI",
    ):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _by_name(entries):
    return {e["name"]: e for e in entries}


def test_missing_weights_say_where_they_were_looked_for_and_the_env_var(empty_caches):
    w = _by_name(doctor.weights())
    raft = w["RAFT-large"]
    assert not raft["found"] and raft["env"] == "DLORAL_RAFT_WEIGHTS"
    assert RAFT_FILE in raft["looked"] and str(empty_caches / "torch") in raft["looked"]
    assert not w["VGG16 (LPIPS loss)"]["found"]
    assert "DLORAL_SD21_PATH" in w["SD 2.1-base"]["looked"]
    assert "DLORAL_CHECKPOINT" in w["official DLoRAL model.pkl"]["looked"]
    for metric in IQA_METRICS:
        assert f"pyiqa {metric}" in w
    dover = w["DOVER (VQAssessment)"]
    assert not dover["found"] and dover["env"] == "DLORAL_DOVER_WEIGHTS"
    assert "DOVER.pth" in dover["looked"] and str(empty_caches / "torch") in dover["looked"]


def test_a_weight_file_put_where_the_message_says_is_found(empty_caches, monkeypatch):
    target = empty_caches / "weights" / RAFT_FILE
    target.parent.mkdir()
    target.write_bytes(b"not loaded by doctor")
    monkeypatch.setenv("DLORAL_RAFT_WEIGHTS", str(target.parent))
    ckpt = empty_caches / "model.pkl"
    ckpt.write_bytes(b"x")
    monkeypatch.setenv("DLORAL_CHECKPOINT", str(ckpt))
    w = _by_name(doctor.weights())
    assert w["RAFT-large"]["found"] and w["RAFT-large"]["path"] == str(target)
    assert w["official DLoRAL model.pkl"]["path"] == str(ckpt)


def test_settings_follow_the_environment(empty_caches, monkeypatch):
    s = doctor.settings()
    assert s["mlflow_tracking_uri"].startswith("sqlite:///mlflow.db (default")
    assert s["ray"].startswith("local")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    s = doctor.settings()
    assert s["mlflow_tracking_uri"] == "http://head:5000" and "10.0.0.1:6379" in s["ray"]
    facts = doctor.collect()
    assert facts["versions"]["torch"] != "not installed" and "cpu_count" in facts["device"]


def test_doctor_command_prints_the_same_facts_as_json(empty_caches):
    import json

    from typer.testing import CliRunner

    from dloral.cli import app

    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    names = {w["name"] for w in facts["weights"]}
    assert {"SD 2.1-base", "RAFT-large", "pyiqa lpips"} <= names
    assert facts["settings"]["ray"].startswith("local")
