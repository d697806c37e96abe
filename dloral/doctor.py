"""What this machine has: every optional weight the suite can use, device, versions, settings.

`dloral-exp doctor` prints it; benchmarks record the same facts with their results. Each weight
entry says whether it was found, where it was looked for, and the env var that moves that place.
Nothing is loaded or downloaded.
"""

from __future__ import annotations

import os
from typing import Any

from dloral.bench.survey import weights
from dloral.provenance import device, versions


def settings() -> dict[str, str]:
    from dloral.data.config import DEFAULT_DIR_ENV, default_dir
    from dloral.tracking import tracking_uri

    address = os.environ.get("RAY_ADDRESS")
    return {
        "mlflow_tracking_uri": tracking_uri()
        + ("" if "MLFLOW_TRACKING_URI" in os.environ else " (default; $MLFLOW_TRACKING_URI)"),
        "ray": f"cluster {address} ($RAY_ADDRESS)" if address else "local: ray.init() here",
        "embedded_data": f"{default_dir()} (${DEFAULT_DIR_ENV})",
    }


def collect() -> dict[str, Any]:
    """Everything doctor reports, as plain data (JSON-ready)."""
    return {
        "device": device(),
        "versions": versions(),
        "settings": settings(),
        "weights": weights(),
    }
