"""How far each way of tiling the VAE moves its output from the whole frame's, on real frames.

    uv run python benchmarks/vae_tiling.py                   # tiny VAE, bigbuckbunny, 2 frames
    uv run python benchmarks/vae_tiling.py --vae DIR         # a diffusers VAE folder (SD's vae/)

For each frame size (1280x720, the x4 output of a 320x180 input, and 2560x1440, the frames
bicubic-upsampled x2), the frames are VAE-encoded (posterior mean) and decoded four ways:
- `whole`: no tiling (`upscale --tile 0`);
- `reference`: the reference's tiled VAE, the default (dloral.model.vae_tiles: tiles run in step
  sharing the GroupNorm statistics; encoder tiles 1024 px, decoder tiles 224 latent);
- `diffusers-1920`, `diffusers-768`: diffusers' tiling (`upscale --tile N`), each tile
  normalised on its own, tiles blended.
Each row gives the tiles, the latent's mean abs difference from the whole frame's (relative to
its mean magnitude), the round trip's PSNR against the whole frame's round trip (whole encode,
whole decode; higher: closer), its PSNR against the input, and seconds per frame.
Record (command, versions, commit) -> benchmarks/results/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dloral.atomic import atomic_write_json
from dloral.data.frames import open_frames, packaged_clip
from dloral.model import vae_tiles
from dloral.model.vae_tiles import DECODER_PAD, ENCODER_PAD, VAETiles
from dloral.provenance import bench_command, cpu_environment

RESULTS = Path(__file__).parent / "results"
MODES = ("whole", "reference", "diffusers-1920", "diffusers-768")


def load_vae(folder: str | None):
    """The tiny profile's trained VAE (as `upscale` finds it), or a diffusers VAE folder."""
    if folder is None:
        from dloral.model.backbone import load_tiny_vae
        from dloral.weights import locate_tiny_vae

        path = locate_tiny_vae()
        return load_tiny_vae(path).eval(), f"tiny VAE {path}"
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder).eval(), f"diffusers VAE {folder}"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of frames in [-1, 1] mapped to [0, 1]."""
    mse = float((((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).mean())
    return float("inf") if mse == 0 else round(10 * torch.log10(torch.tensor(1 / mse)).item(), 2)


@torch.no_grad()
def run(vae, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """(latent mean, decoded frames, seconds per frame, tiles) of one mode."""
    vae.disable_tiling()
    tiles = "none"
    t0 = time.perf_counter()
    if mode == "reference":
        spec = VAETiles()
        z = vae_tiles.encode(vae, x, spec).mean
        out = vae_tiles.decode(vae, z, spec)
        enc = len(vae_tiles.split(*x.shape[-2:], spec.encoder, ENCODER_PAD))
        dec = len(vae_tiles.split(*z.shape[-2:], spec.decoder, DECODER_PAD))
        enc = enc if spec.encoder_tiled(x.shape[-2:]) else 1
        dec = dec if spec.decoder_tiled(z.shape[-2:]) else 1
        tiles = f"encoder {enc}, decoder {dec}"
    else:
        if mode != "whole":
            size = int(mode.split("-")[1])
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = size, size // 8
            tiles = f"{size} px, overlap {vae.tile_overlap_factor}"
        z = vae.encode(x).latent_dist.mean
        out = vae.decode(z).sample
    seconds = (time.perf_counter() - t0) / x.shape[0]
    vae.disable_tiling()
    return z, out, seconds, tiles


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vae", default=None, help="diffusers VAE folder (default: the tiny VAE)")
    p.add_argument("--count", type=int, default=2, help="frames of bigbuckbunny.mp4")
    p.add_argument("--out", default=str(RESULTS / "vae-tiling-tiny-cpu.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    vae, source = load_vae(args.vae)
    clip = open_frames(packaged_clip("bigbuckbunny.mp4"))
    first = zip(range(args.count), (f for _, f in clip.frames()), strict=False)
    frames = torch.stack([f for _, f in first])
    rows = []
    for factor in (1, 2):
        x = frames if factor == 1 else F.interpolate(frames, scale_factor=2, mode="bicubic")
        x = (x.clamp(0, 1) * 2 - 1).to(next(vae.parameters()).dtype)
        h, w = x.shape[-2:]
        whole_z, whole_out, _, _ = run(vae, x, "whole")
        for mode in MODES:
            z, out, seconds, tiles = run(vae, x, mode)
            rel = float((z - whole_z).abs().mean() / whole_z.abs().mean())
            rows.append(
                {
                    "size": f"{w}x{h}",
                    "mode": mode,
                    "tiles": tiles,
                    "latent_mean_abs_diff_rel": round(rel, 5),
                    "psnr_vs_whole_db": psnr(out, whole_out),
                    "psnr_vs_input_db": psnr(out, x),
                    "seconds_per_frame": round(seconds, 2),
                }
            )
            print(
                f"{w}x{h} {mode:>15} ({tiles}): latent diff {rel:.5f}, "
                f"vs whole {rows[-1]['psnr_vs_whole_db']} dB, "
                f"vs input {rows[-1]['psnr_vs_input_db']} dB, {seconds:.2f} s/frame",
                flush=True,
            )
    record = {
        "benchmark": "vae_tiling",
        "command": bench_command("vae_tiling.py", argv),
        "vae": source,
        "input": f"{clip.path}, first {len(frames)} frames, 1280x720 and x2 bicubic",
        "rows": rows,
        "environment": cpu_environment(),
    }
    atomic_write_json(Path(args.out), record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
