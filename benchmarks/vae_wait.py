"""Where the reference's VAE tiles wait between GroupNorm steps: on the device or on the host.

    uv run python benchmarks/vae_wait.py                                  # CPU: tiny, small sizes
    python benchmarks/vae_wait.py --profile sd21 --device cuda --frames-dir DIR   # a GPU node

The reference's tiled VAE (dloral.model.vae_tiles) runs the encoder and decoder on tiles in step.
With `--vae-tiles-wait device` the waiting tiles stay on the GPU; with `host` (the reference's
way) the GPU holds one tile while the others wait in host memory, copied out and back at every
GroupNorm. For each output size this encodes (posterior mean) and decodes one real frame
(bigbuckbunny's first, bicubic-resized to the size) both ways and records the seconds, the peak
GPU memory above the model (torch.cuda.max_memory_allocated; none on a CPU, where host and
device are the same memory) and the largest difference between the two outputs (0: the same
numbers; on a CPU the host side parks the tiles in host memory too, exercising the path). The
VAE is SD 2.1's architecture with random weights (`--profile sd21`, the layout's
memory and time do not depend on the weights) or the tiny profile's (CPU). Record (command,
device, versions, commit) -> --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
GPU_SIZES = "2048x2048,2160x3840"
CPU_SIZES = "288x512,576x1024"
CPU_TILES = (256, 24)  # encoder px, decoder latent: small tiles so the CPU sizes do tile


def _vae(profile: str, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    from dloral.model.backbone import SD21_VAE, TINY_VAE

    torch.manual_seed(0)
    config = SD21_VAE if profile == "sd21" else TINY_VAE
    return AutoencoderKL(**config).to(device=device, dtype=dtype).eval()


def _frame(frames_dir: str | None) -> torch.Tensor:
    """bigbuckbunny's first frame, (1, 3, H, W) in [0, 1]: from a prepared PNG folder (what
    bench_gpu.py prepare writes) or the packaged clip (needs PyAV)."""
    import numpy as np
    from PIL import Image

    if frames_dir:
        folder = Path(frames_dir)
        folder = folder / "bigbuckbunny" if (folder / "bigbuckbunny").is_dir() else folder
        pngs = sorted(folder.glob("*.png"))
        if not pngs:
            raise SystemExit(f"{folder}: no PNG frames (bench_gpu.py prepare DIR writes them)")
        array = np.array(Image.open(pngs[0]).convert("RGB"))
        return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    from dloral.data.frames import open_frames, packaged_clip

    _, frame = next(iter(open_frames(packaged_clip("bigbuckbunny.mp4")).frames()))
    return frame[None]


def _tiles(encoder: int, decoder: int, wait: str, device: torch.device):
    """VAETiles waiting on `wait`; on a CPU, "host" still parks every waiting tile (a copy
    within host memory: the path is exercised, no memory is saved), so the two runs differ in
    code, as on a GPU."""
    from dloral.model.vae_tiles import Parking, VAETiles

    if wait != "host" or device.type != "cpu":
        return VAETiles(encoder, decoder, wait_on=wait)

    class CopiedOnCPU(VAETiles):
        def parking(self, device: torch.device) -> Parking:
            return Parking.host(device)

    return CopiedOnCPU(encoder, decoder, wait_on=wait)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(vae, x: torch.Tensor, tiles) -> tuple[torch.Tensor, float, float | None]:
    """(decoded frame, seconds, peak GiB above what was allocated before) of one round trip."""
    from dloral.model import vae_tiles

    device = x.device
    _sync(device)
    base = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    z = vae_tiles.encode(vae, x, tiles).mean
    out = vae_tiles.decode(vae, z, tiles)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = None
    if base is not None:
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return out, seconds, peak


def main(argv: list[str] | None = None) -> int:
    from dloral.model.vae_tiles import DECODER_PAD, ENCODER_PAD, VAETiles, split
    from dloral.provenance import bench_command, cpu_environment

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", choices=("tiny", "sd21"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--sizes", default=None, help=f"HxW,... (GPU {GPU_SIZES}; CPU {CPU_SIZES})")
    p.add_argument("--frames-dir", default=None, help="PNG frames (else the packaged clip)")
    p.add_argument("--out", default=None, help="record (default results/vae-wait-<...>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = names.get(args.dtype, torch.bfloat16 if cuda else torch.float32)
    sizes = [
        tuple(map(int, s.split("x")))
        for s in (args.sizes or (GPU_SIZES if cuda else CPU_SIZES)).split(",")
    ]
    encoder_tile, decoder_tile = (1024, 224) if cuda else CPU_TILES
    vae = _vae(args.profile, device, dtype)
    frame = _frame(args.frames_dir)
    rows = []
    for height, width in sizes:
        x = F.interpolate(frame, size=(height, width), mode="bicubic").clamp(0, 1) * 2 - 1
        x = x.to(device=device, dtype=dtype)
        row = {"size": f"{height}x{width}"}
        enc = split(height, width, encoder_tile, ENCODER_PAD)
        dec = split(height // 8, width // 8, decoder_tile, DECODER_PAD)
        spec = VAETiles(encoder_tile, decoder_tile)
        row["tiles"] = {
            "encoder": len(enc) if spec.encoder_tiled((height, width)) else 1,
            "decoder": len(dec) if spec.decoder_tiled((height // 8, width // 8)) else 1,
        }
        outputs = {}
        for wait in ("device", "host"):
            tiles = _tiles(encoder_tile, decoder_tile, wait, device)
            measure(vae, x[..., :64, :64], tiles)  # warm-up (kernels, allocator)
            out, seconds, peak = measure(vae, x, tiles)
            outputs[wait] = out.float().cpu()
            row[wait] = {"seconds": round(seconds, 3), "peak_gib": peak and round(peak, 2)}
            del out
            print(f"{width}x{height} {wait:>6}: {seconds:.2f} s, peak {peak} GiB", flush=True)
        row["max_abs_diff_host_vs_device"] = float(
            (outputs["host"] - outputs["device"]).abs().max()
        )
        rows.append(row)
    environment = {"device": str(device), **cpu_environment()}
    if cuda:
        environment["gpu"] = torch.cuda.get_device_name(device)
        environment["cuda"] = torch.version.cuda
    dtype_name = str(dtype).removeprefix("torch.")
    record = {
        "benchmark": "vae_wait",
        "command": bench_command("vae_wait.py", argv),
        "vae": f"{args.profile} architecture, random weights (seed 0), {dtype_name}",
        "tiles": {"encoder_px": encoder_tile, "decoder_latent": decoder_tile},
        "input": "bigbuckbunny's first frame, bicubic to each size",
        "rows": rows,
        "environment": environment,
    }
    from dloral.atomic import atomic_write_json

    out = Path(args.out or RESULTS / f"vae-wait-{args.profile}-{device.type}.json")
    atomic_write_json(out, record)
    print(f"wrote {out}")
    same = all(r["max_abs_diff_host_vs_device"] == 0 for r in rows)
    if not same:
        print("host and device outputs differ", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
