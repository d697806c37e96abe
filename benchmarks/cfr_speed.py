"""CFR's retrieval: dloral's factored form against the reference's direct form, side by side.

    uv run python benchmarks/cfr_speed.py                                   # CPU, fp32
    python benchmarks/cfr_speed.py --device cuda --dtype bf16 --shapes 4x90x96,16x96x96 \
        --block-elems 21,23,25,27

Both compute the same function (dloral/model/cfr.py, CrossFrameAttention.retrieve): the
reference (yjsunnn/DLoRAL src/cross_frame_retrieval/uncertainty_topk.py) forms 64-wide queries,
keys and values per head, sim = q.k / sqrt(d), relu((sim - threshold_fc(q)) / T) @ v, then
proj_out; the factored form multiplies (4 + 1)-wide vectors (see that docstring). `direct`
here is the reference's formula as dloral computed it before the factored form (blocks of
query positions for its memory bound, 1/sqrt(d) and 1/T folded into the queries: one pass
fewer than the reference's own), on the same weights. Per shape (B x h x w
latents, one CFR call, 9 heads of 64): seconds per call (median of --repeats after a warm-up,
device synchronised), the speed-up, and the largest difference between the two outputs
against the output's own scale. Both forms compute blocks of query positions of the config's
size (2^23 similarity entries), the blocks of a call written into one buffer.
`--block-elems` also times the factored form at each of the given block sizes (2^k entries),
to choose that size by measurement: the record's `block_sweep`, with the fastest. The record
(command, device, versions, commit) goes to benchmarks/results/cfr-speed-<device>-<dtype>.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from latency import environment, write_result  # noqa: E402

from dloral.devices import resolve_device, synchronize  # noqa: E402
from dloral.model.cfr import CFRConfig, CrossFrameAttention  # noqa: E402
from dloral.provenance import bench_command  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def direct(attn: CrossFrameAttention, current: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The reference's formula (gated, every key) as dloral computed it before the factored
    form: blocks of query positions, the scales folded into the queries; its blocks share one
    similarity buffer, as the factored form's do (the comparison is of the formulas)."""
    cfg = attn.cfg
    b, _, h, w = current.shape
    heads, d, n = cfg.heads, cfg.embed_dim, h * w
    q = attn.query_conv(current).view(b, heads, d, n).transpose(2, 3).flatten(0, 1)
    k = attn.key_conv(prev).view(b, heads, d, n).flatten(0, 1)
    v = attn.value_conv(prev).view(b, heads, d, n).transpose(2, 3).flatten(0, 1)
    block = max(1, cfg.max_block_elems // max(1, b * heads * n))
    out, buffer = torch.empty_like(q), None
    for start in range(0, n, block):
        qb = q[:, start : start + block]
        if buffer is None or buffer.shape[1] != qb.shape[1]:
            buffer = q.new_empty(b * heads, qb.shape[1], n)
        # relu((q.k / sqrt(d) - tau) / T) with the scales folded into q: one product, one pass
        tau = attn.threshold_fc(qb) / cfg.temperature
        sim = torch.bmm(qb / (math.sqrt(d) * cfg.temperature), k, out=buffer)
        out[:, start : start + block] = torch.bmm(torch.relu_(sim.sub_(tau)), v)
    out = out.view(b, heads, n, d).transpose(2, 3).reshape(b, heads * d, h, w)
    return attn.proj_out(out)


def _time(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure(
    shape: tuple[int, int, int],
    device,
    dtype,
    repeats: int,
    blocks: tuple[int, ...] = (),
    seed: int = 0,
) -> dict:
    b, h, w = shape
    torch.manual_seed(seed)
    attn = CrossFrameAttention(CFRConfig()).eval().to(device, dtype)
    gen = torch.Generator().manual_seed(seed)
    cur, prev = (torch.randn(b, 4, h, w, generator=gen).to(device, dtype) for _ in range(2))
    with torch.no_grad():
        factored = _time(lambda: attn.retrieve(cur, prev), device, repeats)
        reference = _time(lambda: direct(attn, cur, prev), device, repeats)
        a, r = attn.retrieve(cur, prev).float(), direct(attn, cur, prev).float()
        sweep = []
        for k in blocks:
            attn.block_elems = 2**k
            seconds = statistics.median(_time(lambda: attn.retrieve(cur, prev), device, repeats))
            # against the config's block size: 0 where the GEMMs sum each row alike
            diff = float((attn.retrieve(cur, prev).float() - a).abs().max())
            sweep.append(
                {
                    "block_elems": f"2^{k}",
                    "seconds_median": round(seconds, 4),
                    "max_abs_diff_vs_block_elems": diff,
                }
            )
        attn.block_elems = None
    f_med, r_med = statistics.median(factored), statistics.median(reference)
    row = {
        "latent": [b, 4, h, w],
        "block_elems": f"2^{attn.cfg.max_block_elems.bit_length() - 1}",
        "factored_seconds_median": round(f_med, 4),
        "direct_seconds_median": round(r_med, 4),
        "speedup": round(r_med / f_med, 2),
        "max_abs_diff": float((a - r).abs().max()),
        "output_max_abs": float(r.abs().max()),
    }
    if sweep:
        row["block_sweep"] = sweep
        row["fastest_block_elems"] = min(sweep, key=lambda x: x["seconds_median"])["block_elems"]
    return row


# how far the two forms may differ, relative to the output's largest value: fp32 rounding, or
# the half precision's (each form rounds its own products)
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when the two forms differ by more than TOLERANCE (the record says so)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument(
        "--shapes",
        default="4x72x88,1x96x96,4x45x80",
        help="B x h x w latents, comma-separated (default: a batch of 4 at 576x704 output, "
        "one 96x96 latent tile, a batch of 4 at 360x640)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--block-elems",
        default="",
        help="exponents k, comma-separated: also time the factored form with blocks of 2^k "
        "similarity entries (e.g. 21,23,25,27)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    blocks = tuple(int(k) for k in args.block_elems.split(",") if k)
    rows = []
    for shape in shapes:
        row = measure(shape, device, dtype, args.repeats, blocks)
        rows.append(row)
        print(
            f"{'x'.join(map(str, row['latent']))}: factored {row['factored_seconds_median']} s, "
            f"direct {row['direct_seconds_median']} s (x{row['speedup']}), "
            f"max |diff| {row['max_abs_diff']:.1e} of {row['output_max_abs']:.2f}"
            + "".join(
                f"; {x['block_elems']}: {x['seconds_median']} s" for x in row.get("block_sweep", [])
            ),
            flush=True,
        )
    tolerance = TOLERANCE[args.dtype]
    agree = all(r["max_abs_diff"] <= tolerance * r["output_max_abs"] for r in rows)
    # blocks change no value (each query's row is computed whole) but by a GEMM's rounding
    agree = agree and all(
        x["max_abs_diff_vs_block_elems"] <= tolerance * r["output_max_abs"]
        for r in rows
        for x in r.get("block_sweep", [])
    )
    record = {
        "benchmark": "cfr_speed",
        "command": bench_command("cfr_speed.py", argv),
        "dtype": args.dtype,
        "heads": CFRConfig().heads,
        "embed_dim": CFRConfig().embed_dim,
        "repeats": args.repeats,
        "note": "one CFR retrieval call (random latents, seeded init); direct = the reference's "
        "q.k form in dloral's query blocks, factored = CrossFrameAttention.retrieve; both in "
        "blocks of block_elems similarity entries (the config's), block_sweep: the factored "
        "form at other block sizes",
        "runs": rows,
        "tolerance_relative": tolerance,
        "forms_agree": agree,
        "environment": environment(device),
    }
    out = args.out or RESULTS / f"cfr-speed-{device.type}-{args.dtype}.json"
    write_result(record, out)
    print(f"wrote {out}" + ("" if agree else f"; the forms differ by more than {tolerance}"))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
