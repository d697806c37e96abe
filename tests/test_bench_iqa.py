import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision
from skimage import data

from dloral.bench.iqa import IQA_METRICS, iqa_metric, pyiqa_lower_better, weights_status
from dloral.bench.registry import MetricUnavailable

pyiqa = pytest.importorskip("pyiqa")

HF_MANIQA = "models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k"
# What pyiqa 0.1.16's code loads for each metric: (folder under the torch hub dir or "hf", file).
EXPECTED_FILES = {
    "lpips": [
        ("checkpoints", "alexnet-owt-7be5be79.pth"),
        ("pyiqa", "LPIPS_v0.1_alex-df73285e.pth"),
    ],
    "lpips_vgg": [("checkpoints", "vgg16-397923af.pth"), ("pyiqa", "LPIPS_v0.1_vgg-a78928a0.pth")],
    "dists": [("checkpoints", "vgg16-397923af.pth"), ("pyiqa", "DISTS_weights-f5e65c96.pth")],
    "musiq": [("pyiqa", "musiq_koniq_ckpt-e95806b9.pth")],
    "clipiqa": [("clip", "RN50.pt")],
    "maniqa": [("hf", "model.safetensors"), ("pyiqa", "ckpt_koniq10k.pt")],
    "niqe": [("pyiqa", "niqe_modelparameters.mat")],
}
# Directions as the metrics' papers define them (LPIPS/DISTS distances, NIQE/PIQE naturalness
# distances: lower is better; MUSIQ/CLIP-IQA/MANIQA quality scores: higher is better).
PAPER_HIGHER_IS_BETTER = {
    "lpips": False,
    "lpips_vgg": False,
    "dists": False,
    "musiq": True,
    "clipiqa": True,
    "maniqa": True,
    "niqe": False,
    "piqe": False,
    "psnr_y_pyiqa": True,
    "ssim_y_pyiqa": True,
}


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch hub, pyiqa and Hugging Face caches; any network use is recorded and refused."""
    torch_home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    # pyiqa fixes its folder from torch.hub.get_dir() when imported; move it as that import would
    monkeypatch.setattr(
        "pyiqa.utils.download_util.DEFAULT_CACHE_DIR", str(torch_home / "hub" / "pyiqa")
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr("pyiqa.utils.download_util.download_url_to_file", refuse)
    yield {"hub": torch_home / "hub", "hf": tmp_path / "hf", "attempts": attempts}
    assert attempts == []


def folder_of(caches, where: str) -> Path:
    return caches["hf"] / HF_MANIQA if where == "hf" else caches["hub"] / where


@pytest.fixture(scope="module")
def photo_clip():
    """A 3-frame real clip (an astronaut photo panned 3 px per frame, 96x128) and a noisy copy."""
    photo = data.astronaut()
    frames = [photo[80 + 2 * t : 176 + 2 * t, 150 + 3 * t : 278 + 3 * t] for t in range(3)]
    gt = torch.stack([torch.from_numpy(f.copy()).permute(2, 0, 1).float() / 255 for f in frames])
    noise = torch.randn(gt.shape, generator=torch.Generator().manual_seed(0))
    return gt, noise


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_learned_metric_without_weights_names_file_folder_and_env(caches, name):
    with pytest.raises(MetricUnavailable) as err:
        iqa_metric(name, "cpu")
    message = str(err.value)
    for where, file in EXPECTED_FILES[name]:
        assert f"missing: {file} in {folder_of(caches, where)}" in message
    assert ("$HF_HUB_CACHE" in message) == (name == "maniqa")
    assert "$TORCH_HOME" in message


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_weights_status_reports_missing_files_with_their_paths(caches, name):
    status = weights_status(name)
    assert status["found"] is False
    expected = [str(folder_of(caches, where) / file) for where, file in EXPECTED_FILES[name]]
    assert status["paths"] == expected
    assert all(not f["found"] and f["path"] is None for f in status["files"])
    assert "TORCH_HOME" in status["env"] or "HF_HUB_CACHE" in status["env"]


def test_directions_agree_with_pyiqa_and_with_the_papers():
    assert set(IQA_METRICS) == set(PAPER_HIGHER_IS_BETTER)
    for name, spec in IQA_METRICS.items():
        assert spec.higher_is_better == PAPER_HIGHER_IS_BETTER[name]
        lower = pyiqa.default_model_configs.DEFAULT_CONFIGS[spec.pyiqa_name].get(
            "lower_better", False
        )
        assert pyiqa_lower_better(spec.pyiqa_name) is lower
        assert spec.higher_is_better is not lower, name


def test_dover_is_not_asked_of_pyiqa_which_lacks_it():
    assert not [m for m in pyiqa.list_models() if "dover" in m.lower()]
    with pytest.raises(KeyError, match=r"dloral\.bench\.dover"):  # our own (tests/test_dover.py)
        iqa_metric("dover")
    with pytest.raises(KeyError, match="lpips"):
        iqa_metric("not_a_metric")


def test_weight_free_metrics_give_one_value_per_frame_in_batches(caches, photo_clip):
    gt, noise = photo_clip
    noisy = (gt + 0.08 * noise).clamp(0, 1)
    for name in ("piqe", "psnr_y_pyiqa", "ssim_y_pyiqa"):
        metric = iqa_metric(name, "cpu", batch_size=2)  # 3 frames: a batch of 2, then 1
        assert metric.info.higher_is_better is not metric.model.lower_better
        assert (
            metric.info.implementation
            == f"pyiqa {pyiqa.__version__} {IQA_METRICS[name].pyiqa_name} (weights: none needed)"
        )
        values = metric(noisy, gt)
        assert values.shape == (3,) and values.dtype == torch.float64
        assert torch.isfinite(values).all()
        whole = iqa_metric(name, "cpu", batch_size=8)(noisy, gt)
        assert torch.allclose(values, whole, atol=1e-5)
    # direction: clean frames score better than noisy ones
    piqe = iqa_metric("piqe", "cpu")
    assert (piqe(gt) < piqe(noisy)).all()  # lower is better, no reference needed
    for name in ("psnr_y_pyiqa", "ssim_y_pyiqa"):
        metric = iqa_metric(name, "cpu")
        assert (metric(gt, gt) > metric(noisy, gt)).all()


def test_full_reference_metric_checks_its_inputs(caches, photo_clip):
    gt, _ = photo_clip
    metric = iqa_metric("ssim_y_pyiqa", "cpu")
    with pytest.raises(ValueError, match="full-reference"):
        metric(gt)
    with pytest.raises(ValueError, match=r"out \(3, 3, 96, 128\), gt \(3, 3, 96, 120\)"):
        metric(gt, gt[..., :120])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric(gt * 2, gt)


def write_random_lpips_weights(caches) -> tuple[dict, dict]:
    """RANDOM-WEIGHT stand-ins for torchvision's AlexNet and LPIPS v0.1 linear layers, saved under
    the names and formats the real files have. Values made with them mean nothing."""
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet().state_dict()
    # the classifier is loaded but never used by LPIPS: store it as a broadcast constant (tiny file)
    trunk = {
        k: (v if k.startswith("features") else torch.zeros(1).expand(v.shape))
        for k, v in alexnet.items()
    }
    (caches["hub"] / "checkpoints").mkdir(parents=True)
    torch.save(trunk, caches["hub"] / "checkpoints" / "alexnet-owt-7be5be79.pth")
    lins = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
        for i, c in enumerate([64, 192, 384, 256, 256])
    }
    (caches["hub"] / "pyiqa").mkdir(parents=True)
    torch.save(lins, caches["hub"] / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth")
    return trunk, lins


def test_lpips_loads_local_files_and_scores_per_frame_with_random_weights(caches, photo_clip):
    trunk, lins = write_random_lpips_weights(caches)
    status = weights_status("lpips")
    assert status["found"] is True
    metric = iqa_metric("lpips", "cpu", batch_size=2)
    net = metric.model.net
    assert torch.equal(net.net.slice1[0].weight, trunk["features.0.weight"])
    assert torch.equal(getattr(net.net.slice5, "10").weight, trunk["features.10.weight"])
    for i in range(5):
        assert torch.equal(getattr(net, f"lin{i}").model[1].weight, lins[f"lin{i}.model.1.weight"])
    info = metric.info
    assert (info.name, info.kind, info.level, info.higher_is_better) == (
        "lpips",
        "full_reference",
        "frame",
        False,
    )
    assert all(p in info.implementation for p in status["paths"])
    # random-weight values: only their shape and the metric's ordering are meaningful
    gt, noise = photo_clip
    mild, strong = (gt + 0.02 * noise).clamp(0, 1), (gt + 0.15 * noise).clamp(0, 1)
    same = metric(gt, gt)
    d_mild, d_strong = metric(mild, gt), metric(strong, gt)
    assert same.shape == d_mild.shape == (3,)
    assert torch.equal(same, torch.zeros(3, dtype=torch.float64))
    assert (d_mild > 0).all() and (d_strong > d_mild).all()


def test_strict_rejects_files_that_do_not_match_their_published_hash(caches):
    write_random_lpips_weights(caches)
    with pytest.raises(MetricUnavailable, match=r"not as published: .*alexnet-owt-7be5be79\.pth"):
        iqa_metric("lpips", "cpu", strict=True)


def test_failure_after_the_file_check_becomes_unavailable(caches, monkeypatch):
    """A CLIP file with the right name but wrong content: pyiqa would re-download it (or, here,
    cannot even import openai-clip); either way the caller gets MetricUnavailable."""
    (caches["hub"] / "clip").mkdir(parents=True)
    (caches["hub"] / "clip" / "RN50.pt").write_bytes(b"not a checkpoint")

    def no_route(*args, **kwargs):
        raise urllib.error.URLError("no route to host (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_route)
    assert weights_status("clipiqa")["found"] is True
    with pytest.raises(MetricUnavailable, match="clipiqa"):
        iqa_metric("clipiqa", "cpu")


def test_download_attempt_that_slips_past_the_check_becomes_unavailable(caches, monkeypatch):
    def fetch(*args, **kwargs):
        raise urllib.error.URLError("no route to host (test)")

    monkeypatch.setattr(pyiqa, "create_metric", fetch)
    with pytest.raises(MetricUnavailable, match="no route to host"):
        iqa_metric("piqe", "cpu")
