"""The machine as records name it: the processor's model and the instruction set torch's CPU
kernels dispatch to (CPU timings and CPU-trained weights depend on both)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from dloral import provenance

ROOT = Path(__file__).resolve().parents[1]

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu avx2

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
"""
ARM = """processor\t: 0
BogoMIPS\t: 48.00
Features\t: fp asimd

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""


def test_the_cpu_is_named_by_its_model_not_its_architecture(tmp_path):
    (tmp_path / "x86").write_text(X86)
    (tmp_path / "arm").write_text(ARM)
    assert provenance.cpu_name(str(tmp_path / "x86")) == "AMD EPYC 9654 96-Core Processor"
    assert provenance.cpu_name(str(tmp_path / "arm")) == "Raspberry Pi 4 Model B Rev 1.4"
    # no /proc/cpuinfo (macOS, Windows): what platform knows
    fallback = platform.processor() or platform.machine()
    assert provenance.cpu_name(str(tmp_path / "absent")) == fallback
    here = provenance.cpu_name()
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        assert here != platform.machine()  # "x86_64" said nothing of the processor


def test_records_give_the_kernels_instruction_set_as_torch_dispatches_them():
    machine = provenance.device()
    assert machine["cpu"] == provenance.cpu_name()
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    env = provenance.cpu_environment()
    assert env["machine"] == machine["cpu"]
    assert env["cpu_capability"] == machine["cpu_capability"]
    # lowered by $ATEN_CPU_CAPABILITY (read as torch starts): the record follows the kernels
    code = "import json; from dloral import provenance; print(json.dumps(provenance.device()))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout.splitlines()[-1])["cpu_capability"] == "DEFAULT"
