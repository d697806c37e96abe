"""The experiments and suites a wheel install finds: pyproject's force-include copies them into
the package (dloral/_shipped/), and dloral.config.shipped_folder takes that copy where present."""

from __future__ import annotations

import tomllib
from pathlib import Path

from dloral.bench.suite import BENCHMARKS_DIR, shipped_suites
from dloral.config import shipped_folder
from dloral.sweep.spec import EXPERIMENTS_DIR

REPO = Path(__file__).resolve().parents[1]


def _force_include() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]


def test_the_wheel_carries_every_suite_and_the_experiments():
    copies = _force_include()
    suites = sorted(f"benchmarks/{p.name}" for p in (REPO / "benchmarks").glob("*.toml"))
    assert suites and sorted(k for k in copies if k.startswith("benchmarks/")) == suites
    assert "experiments" in copies
    for source, target in copies.items():
        assert (REPO / source).exists(), source
        assert target == f"dloral/_shipped/{source}"  # where shipped_folder looks


def test_shipped_folder_takes_the_wheels_copy_else_the_checkouts(tmp_path):
    package = tmp_path / "site" / "dloral"
    (tmp_path / "site" / "benchmarks").mkdir(parents=True)  # another project's folder
    package.mkdir()
    (package / "_shipped" / "benchmarks").mkdir(parents=True)
    assert shipped_folder("benchmarks", package) == package / "_shipped" / "benchmarks"
    checkout = tmp_path / "repo" / "dloral"
    checkout.mkdir(parents=True)
    assert shipped_folder("experiments", checkout) == tmp_path / "repo" / "experiments"


def test_a_checkout_reads_its_own_folders():
    assert not (REPO / "dloral" / "_shipped").exists()
    assert BENCHMARKS_DIR == REPO / "benchmarks" and EXPERIMENTS_DIR == REPO / "experiments"
    assert "embedded" in shipped_suites()
