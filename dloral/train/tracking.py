"""Where a training run reports: MLflow (the default) or nowhere (tests, dry runs).

The MLflow store is dloral.tracking's (its tracking_uri). A resumed run continues the same MLflow
run (its id is kept in the run folder).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dloral import tracking

RUN_ID_FILE = "mlflow_run_id"
RESTORED_TAG = "dloral.restored_from_step"  # the step a restarted run continued from
ATTEMPTS_TAG = "dloral.attempts"


class NullTracker:
    run_id = None

    def start(self, cfg, run_dir: Path, resume: bool, info: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: torch.Tensor, name: str, labels: tuple[str, ...] = ()) -> None: ...
    def log_table(self, columns: dict[str, list], name: str) -> None: ...
    def log_checkpoint(self, folder: Path | None) -> None: ...
    def finish(self, status: str, reason: str | None = None) -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run per training run: params = the resolved config, per-step metrics,
    sample strips, tables (tagged prompts), the final checkpoint as an artifact, and a terminal
    status."""

    def __init__(
        self,
        experiment: str,
        uri: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        driver_ends: bool = False,
    ):
        self.client = tracking.mlflow_client(uri)
        self.experiment, self.parent, self.tags = experiment, parent_run_id, tags or {}
        self.run_id: str | None = run_id  # given: continue that run (a retried sweep trial)
        # True for a sweep trial: FINISHED and KILLED are the sweep driver's to set (finish)
        self.driver_ends = driver_ends
        self.logged_until: dict[str, int] = {}  # a continued run's last step per metric

    def start(self, cfg, run_dir: Path, resume: bool, info: dict) -> None:
        id_file = run_dir / RUN_ID_FILE
        if resume and id_file.is_file() and self.run_id is None:
            self.run_id = id_file.read_text().strip()
        if self.run_id is not None:
            self.logged_until = tracking.reopen_run(self.client, self.run_id)
            id_file.write_text(self.run_id)
            return
        tags = {
            "dloral.run_dir": str(run_dir),
            "dloral.profile": cfg.model.profile,
            "dloral.schedule": cfg.schedule.kind,
            **self.tags,
        }
        tags.update({f"dloral.{k}": str(v) for k, v in info.items()})
        if self.parent:
            tags[tracking.PARENT_TAG] = self.parent
        exp_id = tracking.experiment_id(self.client, self.experiment)
        run = self.client.create_run(exp_id, run_name=cfg.run.name, tags=tags)
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)
        params = tracking.flatten(cfg.to_dict())
        if "backbone_weights" in info:
            # what was built, as the backbone_weights tag says: tiny with tiny_init = "random" is
            # random-init although its config leaves random_init (an sd21 switch) false
            params["model.random_init"] = str(info["backbone_weights"] == "random-init")
        tracking.log_params(self.client, self.run_id, params)
        self.client.log_artifact(self.run_id, str(run_dir / "config.toml"))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Steps a continued run already logged (before the interrupt, after the checkpoint it
        resumed from) are not logged again: each step appears once in the history."""
        done = self.logged_until
        rows = [(k, v, step) for k, v in metrics.items() if step > done.get(k, -1)]
        tracking.log_metrics(self.client, self.run_id, rows)

    def log_image(self, image: torch.Tensor, name: str, labels: tuple[str, ...] = ()) -> None:
        """`image` (3, H, W); `labels` name its equal-width panels in a band on top."""
        from dloral.data.frames import to_uint8

        pixels = to_uint8(image)
        if labels:
            pixels = tracking.label_panels(pixels, labels)
        self.client.log_image(self.run_id, pixels, artifact_file=name)

    def log_table(self, columns: dict[str, list], name: str) -> None:
        """Rows appended to the run's table artifact `name` (.json), e.g. sample -> prompt."""
        self.client.log_table(self.run_id, data=columns, artifact_file=name)

    def log_checkpoint(self, folder: Path | None) -> None:
        if folder is not None:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path="checkpoint")

    def finish(self, status: str, reason: str | None = None) -> None:
        """End the run. A sweep trial's run (`driver_ends=True`) is left RUNNING at its end:
        the trial has finished only once Tune has recorded its last result, and the driver then
        ends the run FINISHED (its on_trial_complete). A trial that reaches its end after the
        driver was stopped (Tune's graceful stop lets it run on for seconds, its last result
        never recorded) is unfinished, resumed from its last recorded checkpoint, and the
        driver ends its run KILLED; FINISHED set here would contradict summary.json. A stop is
        the driver's to record too (its reason names the sweep's --resume; the recipe's would
        name the trial's scratch folder). A failure's reason is the trial's own."""
        if self.run_id is None or (self.driver_ends and status in ("FINISHED", "KILLED")):
            return
        if self.driver_ends:  # a trial failing as the driver ends its run keeps the driver's
            run = self.client.get_run(self.run_id)
            tracking.close_if_running(self.client, run, status, reason)
            return
        tracking.end_run(self.client, self.run_id, status, reason)


def continued_tracker(
    experiment: str,
    uri: str,
    key: dict[str, str],
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    restored_from: int = 0,
    driver_ends: bool = False,
) -> MlflowTracker:
    """The tracker of a run that an earlier attempt may have begun (a retried sweep trial, a
    worker group Ray Train restarted): it continues the run whose tags match `key`, else starts
    one tagged with `key`, so a run has one MLflow run however often it restarts. The step it
    was restored from and the attempt count are tagged. `driver_ends`: see
    MlflowTracker.finish (True for a sweep trial)."""
    client = tracking.mlflow_client(uri)
    earlier = tracking.find_run(client, tracking.experiment_id(client, experiment), key)
    tags = {**(tags or {}), **key}
    if earlier is None:
        if restored_from:
            tags[RESTORED_TAG] = str(restored_from)
    else:
        attempts = int(client.get_run(earlier).data.tags.get(ATTEMPTS_TAG, "1"))
        client.set_tag(earlier, RESTORED_TAG, str(restored_from))
        client.set_tag(earlier, ATTEMPTS_TAG, str(attempts + 1))
    return MlflowTracker(
        experiment,
        uri,
        parent_run_id=parent_run_id,
        tags=tags,
        run_id=earlier,
        driver_ends=driver_ends,
    )
