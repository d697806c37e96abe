"""The metric registry: one row per metric, infos that agree with it, shared parts built once."""

import pytest
import torch

from dloral.bench import flow as flow_module
from dloral.bench import iqa
from dloral.bench.flow import DisFlow
from dloral.bench.iqa import IQA_METRICS
from dloral.bench.registry import (
    FULLREF_METRICS,
    METRICS,
    MetricUnavailable,
    build_metrics,
    ewarp_info,
    fullref_metric,
    tlp_info,
    tof_info,
)

FACTS = ("name", "higher_is_better", "kind", "level", "needs_gt", "scale")


def facts(x):
    return {f: getattr(x, f) for f in FACTS}


def test_the_table_lists_every_suite_metric_in_order():
    assert list(METRICS) == [
        *("psnr", "ssim", "psnr_y", "ssim_y"),
        *("lpips", "lpips_vgg", "dists", "musiq", "clipiqa", "maniqa", "niqe", "piqe"),
        *("psnr_y_pyiqa", "ssim_y_pyiqa"),
        *("dover@overall", "dover@technical", "dover@aesthetic"),
        *("ewarp@lai2018", "ewarp@evalcrafter", "ewarp@dloral-inframe"),
        *("tof@tecogan", "tof@dloral", "tlp@tecogan", "tlp@dloral"),
    ]
    assert FULLREF_METRICS == ("psnr", "ssim", "psnr_y", "ssim_y")
    assert all(spec.name == name and spec.protocol for name, spec in METRICS.items())


def test_metric_infos_carry_the_facts_of_their_row():
    for name in FULLREF_METRICS:
        assert facts(fullref_metric(name).info) == facts(METRICS[name])
    for protocol in ("lai2018", "evalcrafter", "dloral-inframe"):
        assert facts(ewarp_info("dis", protocol)) == facts(METRICS[f"ewarp@{protocol}"])
    for protocol in ("tecogan", "dloral"):
        assert facts(tof_info("dis", protocol)) == facts(METRICS[f"tof@{protocol}"])
        assert facts(tlp_info("lpips", protocol)) == facts(METRICS[f"tlp@{protocol}"])
    # a bare name is its default protocol, the one peers' papers use
    assert facts(ewarp_info("dis")) == facts(METRICS["ewarp@evalcrafter"])
    assert facts(tof_info("dis")) == facts(METRICS["tof@tecogan"])
    assert facts(tlp_info("lpips")) == facts(METRICS["tlp@tecogan"])
    for name, spec in METRICS.items():  # pyiqa's table (checked against pyiqa) agrees
        if name in IQA_METRICS:
            assert IQA_METRICS[name].higher_is_better == spec.higher_is_better, name
            assert IQA_METRICS[name].kind == spec.kind, name


def test_flow_and_lpips_are_built_once_and_their_failures_skip_each_user(monkeypatch):
    calls = []

    def no_lpips(name, device, strict):
        calls.append(name)
        raise MetricUnavailable(f"{name}: weights missing")

    def flow(kind, device):
        calls.append(f"flow:{kind}")
        return DisFlow()

    monkeypatch.setattr(iqa, "iqa_metric", no_lpips)  # the registry imports them when building
    monkeypatch.setattr(flow_module, "load_flow_estimator", flow)
    names = ("tlp", "tof", "lpips", "ewarp", "psnr")
    built, skipped, flow_name = build_metrics(names, torch.device("cpu"), flow="dis")
    assert list(built) == ["tof@tecogan", "ewarp@evalcrafter", "psnr"]
    assert flow_name == DisFlow().name
    assert "Farneback" in built["tof@tecogan"].info.implementation  # TecoGAN's flow, always
    assert calls == ["lpips", "flow:dis"]
    assert skipped[0] == {"metric": "lpips", "reason": "lpips: weights missing"}
    assert skipped[1]["metric"] == "tlp@tecogan"
    assert skipped[1]["reason"].endswith("lpips: weights missing")
    assert "LPIPS v0.1 AlexNet" in skipped[1]["reason"]
    assert {n: s.device for n, s in built.items()} == {
        "tof@tecogan": "cpu",
        "ewarp@evalcrafter": "cpu",
        "psnr": "cpu",
    }
    with pytest.raises(MetricUnavailable, match="lpips: weights missing"):
        build_metrics(names, torch.device("cpu"), strict=True)
    with pytest.raises(KeyError, match="sharpness"):
        build_metrics(("psnr", "sharpness"), torch.device("cpu"))


def test_a_pyiqa_metric_is_built_with_the_facts_of_its_row(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no DOVER.pth there
    monkeypatch.delenv("DLORAL_DOVER_WEIGHTS", raising=False)
    built, skipped, flow_name = build_metrics(("piqe", "dover"), torch.device("cpu"))
    assert list(built) == ["piqe"] and built["piqe"].device == "cpu" and flow_name is None
    assert facts(built["piqe"].info) == facts(METRICS["piqe"])
    assert [s["metric"] for s in skipped] == ["dover@overall"]
    assert "DOVER.pth" in skipped[0]["reason"] and str(tmp_path) in skipped[0]["reason"]
