"""MLflow, the one way training, sweeps and benchmarks record runs.

The tracking URI is $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working folder, so
`mlflow ui --backend-store-uri sqlite:///mlflow.db` shows the runs. Helpers here take an
`MlflowClient` and keep to MLflow's limits: params cut to 6000 characters and logged 100 per
batch, metrics 500 per batch, a run's end reason cut to 5000 characters. mlflow is imported only
when a client is made (it is slow to import).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DEFAULT_URI = "sqlite:///mlflow.db"
TRIAL_TAG = "dloral.trial_id"  # a sweep trial's Tune id, on its MLflow run
SWEEP_TAG = "dloral.sweep"  # the sweep id, on the parent run and every trial's run
STATUS_REASON_TAG = "dloral.status_reason"  # why a run ended FAILED, KILLED or early
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment on its runs view only when the experiment says it is for
# model development (the tag and value its experiment-kind selector writes); without it the UI
# guesses, and opens ours on a GenAI overview that shows "No data".
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"

PARAM_CHARS, PARAM_BATCH = 6000, 100
METRIC_BATCH = 500
REASON_CHARS = 5000


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def mlflow_client(uri: str | None = None) -> MlflowClient:
    """A client of `uri`, else of tracking_uri()."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri or tracking_uri())


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": str(value)} (MLflow params are flat strings)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if it does not exist, with the kind that opens it
    on its runs (an existing experiment without a kind gets it; a kind someone chose is kept)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, tags={KIND_TAG: KIND})
    if KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, KIND_TAG, KIND)
    return found.experiment_id


def label_panels(image, labels: list[str] | tuple[str, ...]):
    """A uint8 (H, W, 3) strip of equal-width panels with a white band on top naming each
    panel (e.g. LQ | output | GT), centred over it: (H + band, W, 3)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    height, width = image.shape[:2]
    size = max(12, min(24, height // 8))
    font = ImageFont.load_default(size=size)
    band = size + size // 2
    canvas = Image.new("RGB", (width, height + band), "white")
    canvas.paste(Image.fromarray(np.ascontiguousarray(image)), (0, band))
    draw = ImageDraw.Draw(canvas)
    step = width / len(labels)
    for i, label in enumerate(labels):
        draw.text(((i + 0.5) * step, band / 2), label, fill="black", font=font, anchor="mm")
    return np.asarray(canvas)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    batch = [Param(k, str(v)[:PARAM_CHARS]) for k, v in params.items()]
    for i in range(0, len(batch), PARAM_BATCH):
        client.log_batch(run_id, params=batch[i : i + PARAM_BATCH])


def log_metrics(
    client: MlflowClient, run_id: str, metrics: Iterable[tuple[str, float, int]]
) -> None:
    """(name, value, step) triples, all stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v, step in metrics]
    for i in range(0, len(batch), METRIC_BATCH):
        client.log_batch(run_id, metrics=batch[i : i + METRIC_BATCH])


def end_run(client: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    """Terminate a run with `status` (FINISHED, FAILED, KILLED), the reason as a tag."""
    if reason:
        client.set_tag(run_id, STATUS_REASON_TAG, reason[:REASON_CHARS])
    client.set_terminated(run_id, status=status)


def reopen_run(client: MlflowClient, run_id: str) -> dict[str, int]:
    """Continue a run that ended (KILLED by an interrupt, FAILED): RUNNING again, the reason it
    ended removed. Returns the last step logged per metric: a run resumed from an earlier
    checkpoint repeats the steps after it, and those must not be logged twice."""
    run = client.get_run(run_id)
    if STATUS_REASON_TAG in run.data.tags:
        client.delete_tag(run_id, STATUS_REASON_TAG)
    client.update_run(run_id, status="RUNNING")
    return {
        key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics
    }


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The id of a run of the experiment that carries all of `tags` (e.g. the run an earlier
    attempt of a retried trial made), if any."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=where, max_results=1)
    return runs[0].info.run_id if runs else None


def close_if_running(client: MlflowClient, run, status: str, reason: str | None = None) -> None:
    """End `run` (an mlflow Run) if it is still RUNNING; runs that ended keep their status."""
    if run.info.status == "RUNNING":
        end_run(client, run.info.run_id, status, reason)
