"""Where a training run reports: MLflow (the default) or nowhere (tests, dry runs).

MLflow's tracking URI comes from $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working
directory, so `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows the runs. A resumed run
continues the same MLflow run (its id is kept in the run folder).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

DEFAULT_URI = "sqlite:///mlflow.db"
RUN_ID_FILE = "mlflow_run_id"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out


class NullTracker:
    run_id = None

    def start(self, cfg, run_dir: Path, resume: bool, info: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: torch.Tensor, name: str) -> None: ...
    def log_checkpoint(self, folder: Path | None) -> None: ...
    def finish(self, status: str, reason: str | None = None) -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run per training run: params = the resolved config, per-step metrics,
    sample strips, the final checkpoint as an artifact, and a terminal status."""

    def __init__(
        self,
        experiment: str,
        uri: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ):
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        self.client = MlflowClient(self.uri)
        self.experiment, self.parent, self.tags = experiment, parent_run_id, tags or {}
        self.run_id: str | None = run_id  # given: continue that run (a retried sweep trial)

    def start(self, cfg, run_dir: Path, resume: bool, info: dict) -> None:
        from mlflow.entities import Param

        id_file = run_dir / RUN_ID_FILE
        if resume and id_file.is_file() and self.run_id is None:
            self.run_id = id_file.read_text().strip()
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            id_file.write_text(self.run_id)
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        tags = {
            "dloral.run_dir": str(run_dir),
            "dloral.profile": cfg.model.profile,
            "dloral.schedule": cfg.schedule.kind,
            **self.tags,
        }
        tags.update({f"dloral.{k}": str(v) for k, v in info.items()})
        if self.parent:
            tags["mlflow.parentRunId"] = self.parent
        run = self.client.create_run(exp_id, run_name=cfg.run.name, tags=tags)
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)
        params = [Param(k, v[:6000]) for k, v in flatten(cfg.to_dict()).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_artifact(self.run_id, str(run_dir / "config.toml"))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_image(self, image: torch.Tensor, name: str) -> None:
        from dloral.data.frames import to_uint8

        self.client.log_image(self.run_id, to_uint8(image), artifact_file=name)

    def log_checkpoint(self, folder: Path | None) -> None:
        if folder is not None:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path="checkpoint")

    def finish(self, status: str, reason: str | None = None) -> None:
        if self.run_id is None:
            return
        if reason:
            self.client.set_tag(self.run_id, "dloral.status_reason", reason[:5000])
        self.client.set_terminated(self.run_id, status=status)
