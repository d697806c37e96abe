"""What MLflow shows of dloral's runs: experiments open on their runs view (MLflow 3's kind
tag), the `model.random_init` param says what the backbone_weights tag says, and sample strips
name their panels LQ | output | GT."""

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from dloral import tracking
from dloral.model.backbone import build_backbone
from dloral.train.config import load_config
from dloral.train.recipe import STRIP_LABELS
from dloral.train.tracking import MlflowTracker

UI = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module (making one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_the_installed_mlflow_ui_reads_the_kind_we_set_for_its_runs_view():
    # the experiment page reads this tag; "Machine learning" experiments open on their runs
    bundles = [p.read_text(errors="replace") for p in UI.glob("*.js")]
    assert any(f'"{tracking.KIND_TAG}"===e.key' in b for b in bundles), UI
    enum = f'CUSTOM_MODEL_DEVELOPMENT="{tracking.KIND}"'
    assert any(enum in b for b in bundles), f"{enum} not in MLflow's UI at {UI}"


def test_experiments_the_suite_makes_carry_the_kind_and_a_chosen_one_is_kept(store):
    client = tracking.mlflow_client(store)
    made = tracking.experiment_id(client, "dloral-bench")
    assert client.get_experiment(made).tags[tracking.KIND_TAG] == tracking.KIND
    # an experiment made before (no kind) gets it; one whose kind a user chose keeps it
    old = client.create_experiment("dloral-sweeps")
    assert tracking.experiment_id(client, "dloral-sweeps") == old
    assert client.get_experiment(old).tags[tracking.KIND_TAG] == tracking.KIND
    chosen = client.create_experiment("mine", tags={tracking.KIND_TAG: "genai_development"})
    tracking.experiment_id(client, "mine")
    assert client.get_experiment(chosen).tags[tracking.KIND_TAG] == "genai_development"


def test_random_init_param_agrees_with_the_backbone_weights_tag(store, tmp_path):
    # the default experiment (tiny) as the recipe starts its run: the config's random_init is an
    # sd21 switch, false here, while the backbone that is built is random-init
    cfg = load_config(None, [])
    backbone = build_backbone(cfg.model.profile, cfg.model.sd21_path, cfg.model.random_init, 0)
    tracker = MlflowTracker("t", uri=store)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text(cfg.to_toml_str())
    tracker.start(cfg, tmp_path / "run", False, {"backbone_weights": backbone.weights})
    run = tracker.client.get_run(tracker.run_id)
    tag = run.data.tags["dloral.backbone_weights"]
    assert run.data.params["model.random_init"] == str(tag == "random-init")
    assert run.data.params["model.profile"] == cfg.model.profile  # the rest is the config
    exp = tracker.client.get_experiment(run.info.experiment_id)
    assert exp.tags[tracking.KIND_TAG] == tracking.KIND


def _ink_columns(band: np.ndarray) -> np.ndarray:
    """x of the columns of a white label band that hold dark (text) pixels."""
    return np.flatnonzero(band.min(axis=(0, 2)) < 128)


def test_sample_strips_are_labelled_lq_output_gt(store, tmp_path, bikes_lq):
    # a strip of three real 64x48 panels, as validation puts LQ | output | GT side by side
    lq = bikes_lq[0]
    strip = torch.cat([lq, lq.flip(-1), lq.flip(-2)], dim=-1)
    tracker = MlflowTracker("t", uri=store)
    cfg = load_config(None, [])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text(cfg.to_toml_str())
    tracker.start(cfg, tmp_path / "run", False, {})
    tracker.log_image(strip, "samples/step-000001.png", STRIP_LABELS)
    path = tracker.client.download_artifacts(tracker.run_id, "samples/step-000001.png", tmp_path)
    logged = np.asarray(Image.open(path).convert("RGB"))
    h, w = strip.shape[-2:]
    band = logged.shape[0] - h
    assert logged.shape[1] == w and band >= 12
    # below the band, the strip's pixels as they were
    np.testing.assert_array_equal(logged[band:], (strip.permute(1, 2, 0) * 255).round().byte())
    # one label centred over each third, "output" wider than "LQ" and "GT"
    ink = _ink_columns(logged[:band])
    words = np.split(ink, np.flatnonzero(np.diff(ink) > w // 6) + 1)
    assert len(words) == 3, [(x[0], x[-1]) for x in words]
    for i, x in enumerate(words):
        assert abs((x[0] + x[-1]) / 2 - (i + 0.5) * w / 3) < w / 12
    widths = [x[-1] - x[0] for x in words]
    assert widths[1] > widths[0] and widths[1] > widths[2]
    assert STRIP_LABELS == ("LQ", "output", "GT")
