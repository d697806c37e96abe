"""Latency rows of the benchmark: peak memory of each method on its own (never the process's
high-water mark), s_per_frame as the median of >= 3 timed passes with their spread."""

import resource

import pytest
import torch

from dloral.bench import memory
from dloral.bench.methods import Bicubic, ClipJob, _Timed
from dloral.bench.suite import SuiteError, parse_suite
from dloral.resize import resize_frames

MIB = 2**20


def _job(lq: torch.Tensor) -> ClipJob:
    names = tuple(f"{i:04d}" for i in range(len(lq)))
    size = (lq.shape[-2] * 4, lq.shape[-1] * 4)
    return ClipJob("set", "bikes", names, names, lq, 4, size)


class Hungry(_Timed):
    """Bicubic that also fills `mib` MiB of working memory in every pass (a real allocation that
    is written to, hence resident), holding it `hold` seconds."""

    def __init__(self, mib: int, hold: float = 0.0, model_mib: int = 0) -> None:
        super().__init__()
        self.name, self.repeats, self.mib, self.hold = "hungry", 3, mib, hold
        self.model = torch.nn.Linear(model_mib * MIB // 4, 1, bias=False) if model_mib else None
        self.calls = []

    def resident_bytes(self) -> int:
        return memory.tensor_bytes(self.model, self.device)

    def _pass(self, names, lq, scale):
        import time

        work = torch.ones(self.mib * MIB // 4)  # float32
        self.calls.append(float(work[-1]))
        time.sleep(self.hold)
        del work
        return resize_frames(lq, (lq.shape[-2] * scale, lq.shape[-1] * scale))


def _high_water_mark_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def test_peak_memory_is_each_methods_own_not_the_process_high_water_mark(bikes_lq):
    # an earlier, larger allocation raises the process's high-water mark past 0.5 GiB
    big = torch.ones(600 * MIB // 4)
    big.add_(1)
    del big
    assert _high_water_mark_gib() > 0.5
    bicubic = Bicubic().run(_job(bikes_lq))
    # bicubic of 6 frames of 48x64: a few MiB at most, whatever the process held before
    assert bicubic.peak_mem_gib < 0.05, bicubic
    assert bicubic.memory_kind.startswith("this method's model tensors + peak RSS during its")
    # a method that fills 256 MiB in each pass, with a 64 MiB model: about 320 MiB of its own
    hungry = Hungry(256, model_mib=64).run(_job(bikes_lq))
    assert 300 * MIB <= hungry.peak_mem_gib * 2**30 <= 400 * MIB, hungry


@pytest.mark.skipif(not memory.reset_peak_rss(), reason="needs /proc/self/clear_refs to compare")
def test_sampled_rss_agrees_with_the_kernels_reset_peak(bikes_lq):
    # where a process may not reset its peak RSS, a thread samples the RSS instead
    method = Hungry(192, hold=0.3)
    with memory.PeakMemory(torch.device("cpu"), reset_rss=False) as sampled:
        method._pass(None, bikes_lq, 4)
    with memory.PeakMemory(torch.device("cpu")) as exact:
        method._pass(None, bikes_lq, 4)
    assert "sampled every 2 ms" in sampled.kind and "VmHWM reset" in exact.kind
    assert 180 * MIB <= sampled.peak_bytes <= exact.peak_bytes + 16 * MIB, (sampled, exact)
    assert 180 * MIB <= exact.peak_bytes <= 240 * MIB


def test_seconds_per_frame_is_the_median_of_three_passes_with_their_spread(bikes_lq):
    method = Hungry(8)
    out = method.run(_job(bikes_lq))
    assert len(method.calls) == 1 + 3  # one warm-up, then three timed passes
    fastest, slowest = out.seconds_range
    assert 0 < fastest <= out.seconds_per_frame <= slowest


def test_fewer_than_three_timed_passes_are_refused(tmp_path):
    (tmp_path / "GT").mkdir()
    suite = {
        "suite": {"name": "s"},
        "datasets": [{"name": "d", "kind": "udm10", "root": str(tmp_path)}],
        "methods": {"names": ["bicubic"]},
        "metrics": {"names": ["psnr"]},
        "options": {"latency_repeats": 1},
    }
    with pytest.raises(SuiteError, match=r"latency_repeats must be an integer >= 3, got 1"):
        parse_suite(suite)
    suite["options"] = {}
    assert parse_suite(suite).options.latency_repeats == 3
