"""The sweep's record: what `dloral-exp sweep` writes and reports read, as typed objects.

    sweep.json    SweepSpec     the resolved definition, MLflow ids, status, provenance
    summary.json  SweepSummary  every trial (TrialRow), the best per arm and their evaluation

The runner builds these and writes their `to_dict()`; readers call `from_dict`, which checks the
fields a report needs and names the file and trial when one is missing. `SweepSummary.table()`
is the trials table (one row per trial: id, status, step, searched values, val metrics, ...),
the sweep's counterpart of the benchmark's results table. Light to import: no model code.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, TypedDict

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.json"

# reported by every trial at each validation (dloral.train.recipe), and what a sweep may judge on
METRICS = {"val/psnr": "max", "val/ssim": "max", "val/temporal_change": "min"}
# what the best trial of each arm is scored on after the sweep (dloral.sweep.evaluate)
EVAL_COLUMNS = ("psnr", "ssim", "temporal_change", "s_per_frame")
# finished: ran to max_steps; stopped: early, by ASHA; failed; unfinished: the driver stopped
TRIAL_STATUSES = ("finished", "stopped", "failed", "unfinished")


class RecordError(ValueError):
    """A sweep record that cannot be read; the message names the file and the trial."""


@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]  # the searched values, by dotted training key
    status: str  # one of TRIAL_STATUSES
    step: int
    metrics: dict[str, float]  # the last reported val/* metrics
    checkpoint: str | None
    mlflow_run_id: str | None
    error: str | None = None
    train_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> TrialRow:
        if "trial_id" not in data:
            raise RecordError(f"{where} has no trial_id")
        return cls(
            trial_id=str(data["trial_id"]),
            values=dict(data.get("values") or {}),
            status=data.get("status", "unknown"),
            step=data.get("step"),
            metrics=dict(data.get("metrics") or {}),
            checkpoint=data.get("checkpoint"),
            mlflow_run_id=data.get("mlflow_run_id"),
            error=data.get("error"),
            train_time_s=data.get("train_time_s"),
        )


# How a difference between two arms is judged against the spread of their seeds.
NOISE_RULE = (
    "arms A and B, each over its trials that ran to the end (one per seed): the difference is "
    "beyond seed noise when |mean(A) - mean(B)| > max(range(A), range(B)), range = max - min "
    "over the arm's seeds; within seed noise otherwise; undecided when an arm has fewer than "
    "2 such trials; not compared when an arm has none (ASHA stopped every one of its trials "
    "before the end, where values are taken at other steps)"
)
BEYOND, WITHIN, UNDECIDED = "beyond seed noise", "within seed noise", "undecided (< 2 seeds)"
NOT_COMPARED = "not compared (an arm has no trial that ran to the end)"


class ArmComparison(TypedDict):
    """Two arms compared on the sweep metric over their seeds (see NOISE_RULE)."""

    a: str  # arm labels, as ArmBest's
    b: str
    metric: str
    mean_a: float | None  # None: the arm has no trial that ran to the end
    mean_b: float | None
    seeds_a: int  # trials that ran to the end
    seeds_b: int
    diff: float | None  # mean_a - mean_b
    spread: float | None  # max(range_a, range_b); None when undecided
    verdict: str  # BEYOND, WITHIN, UNDECIDED or NOT_COMPARED


COMPARISON_HEADER = (
    "arm A",
    "arm B",
    "mean A (n)",
    "mean B (n)",
    "A - B",
    "seed spread",
    "verdict",
)


def comparison_cells(c: ArmComparison) -> list[str]:
    """One comparison as the console table and the report show it (plain text)."""

    def num(x: float | None, fmt: str) -> str:  # None (and NaN from older summaries): none
        return "-" if x is None or math.isnan(x) else format(x, fmt)

    return [
        c["a"],
        c["b"],
        f"{num(c['mean_a'], '.4f')} ({c['seeds_a']})",
        f"{num(c['mean_b'], '.4f')} ({c['seeds_b']})",
        num(c["diff"], "+.4f"),
        num(c["spread"], ".4f"),
        c["verdict"],
    ]


def compare_arms(values: dict[str, list[float]], metric: str) -> list[ArmComparison]:
    """Every pair of arms (in label order) from each arm's final metric per seed."""
    out: list[ArmComparison] = []
    for a, b in itertools.combinations(sorted(values), 2):
        va, vb = values[a], values[b]
        mean_a = sum(va) / len(va) if va else None
        mean_b = sum(vb) / len(vb) if vb else None
        diff = None if mean_a is None or mean_b is None else mean_a - mean_b
        if diff is None:
            spread, verdict = None, NOT_COMPARED
        elif len(va) < 2 or len(vb) < 2:
            spread, verdict = None, UNDECIDED
        else:
            spread = max(max(va) - min(va), max(vb) - min(vb))
            verdict = BEYOND if abs(diff) > spread else WITHIN
        out.append(
            ArmComparison(
                a=a,
                b=b,
                metric=metric,
                mean_a=mean_a,
                mean_b=mean_b,
                seeds_a=len(va),
                seeds_b=len(vb),
                diff=diff,
                spread=spread,
                verdict=verdict,
            )
        )
    return out


class ArmBest(TypedDict):
    """One of the best trials of an ablation arm and its evaluation on the validation set."""

    arm: str  # e.g. "variant=full, alternation_period=50"
    rank: int  # 1 = best of its arm
    trial: TrialRow
    eval: dict[str, Any]  # EVAL_COLUMNS and clips/frames/dataset/device, or {"error": ...}


@dataclass
class SweepSummary:
    sweep_dir: str
    status: str  # finished | interrupted | failed
    wall_s: float = 0.0
    trials: list[TrialRow] = field(default_factory=list)
    best: list[ArmBest] = field(default_factory=list)
    comparisons: list[ArmComparison] = field(default_factory=list)  # every pair of arms

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep_dir": self.sweep_dir,
            "status": self.status,
            "wall_s": self.wall_s,
            "trials": [r.to_dict() for r in self.trials],
            "best": [{**b, "trial": b["trial"].to_dict()} for b in self.best],
            "comparisons": list(self.comparisons),
            "noise_rule": NOISE_RULE,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> SweepSummary:
        if not isinstance(data.get("trials"), list):
            raise RecordError(f"{where}: no 'trials' list; not a dloral sweep summary")
        trials = [
            TrialRow.from_dict(t, f"{where}: trial {i}") for i, t in enumerate(data["trials"])
        ]
        best = [
            ArmBest(
                arm=b.get("arm", "?"),
                rank=int(b.get("rank", 1)),
                trial=TrialRow.from_dict(b.get("trial") or {}, f"{where}: best {i}"),
                eval=dict(b.get("eval") or {}),
            )
            for i, b in enumerate(data.get("best") or [])
        ]
        return cls(
            sweep_dir=data.get("sweep_dir") or "",
            status=data.get("status", "?"),
            wall_s=data.get("wall_s"),
            trials=trials,
            best=best,
            comparisons=[ArmComparison(**c) for c in data.get("comparisons") or []],
        )

    def table(self):
        """The trials table: trial_id, status, step, <searched keys>, <val metrics>,
        train_time_s, mlflow_run_id (a pandas DataFrame, one row per trial)."""
        import pandas as pd

        rows = [
            {
                "trial_id": t.trial_id,
                "status": t.status,
                "step": t.step,
                **t.values,
                **t.metrics,
                "train_time_s": t.train_time_s,
                "mlflow_run_id": t.mlflow_run_id,
            }
            for t in self.trials
        ]
        return pd.DataFrame(rows)


@dataclass
class SweepSpec:
    """sweep.json: what the driver resolved before Tune started (trials and --resume run it)."""

    path: str  # the experiment file
    sweep: dict[str, Any]  # the [sweep] table as resolved (SweepConfig as a dict)
    base: dict[str, Any]  # the training config as a raw dict, overrides and data roots applied
    keys: list[str]  # searched dotted keys
    dims: list[list[Any]]  # [key, kind, args] per searched key
    sweep_id: str
    sweep_dir: str
    threads: int  # torch threads per trial
    metric: str
    mlflow_experiment: str
    tracking_uri: str | None  # None: tracking off
    created: str
    status: str  # running | finished | interrupted | failed
    provenance: dict[str, Any] = field(default_factory=dict)
    experiment_id: str | None = None
    parent_run_id: str | None = None
    # one entry per driver run of this sweep (the first, then each --resume): the command as
    # typed, its git commit, when it started, its wall time and how it ended (an entry with no
    # "ended" is a driver that was killed)
    invocations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        """The drivers' wall time over every invocation that recorded one."""
        return sum(float(i.get("wall_s") or 0.0) for i in self.invocations)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("experiment_id", "parent_run_id"):  # present only when tracking
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> SweepSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as err:  # a field without a default is missing
            raise RecordError(f"{where}: {err}; not a dloral sweep.json") from err
