"""Cross-Frame Retrieval (CFR): pull complementary detail from the previous frame's latent.

What the reference (yjsunnn/DLoRAL, src/cross_frame_retrieval) does, and so what this does:
1. SPyNet flow from the current to the previous frame is estimated on the upsampled LQ frames
   (in [-1, 1]) bicubically resized to latent resolution; the previous latent is warped onto the
   current one (`aligned_prev`).
2. Queries come from the current latent, keys and values from `aligned_prev` (1x1 convs, 9 heads
   of 64 channels). For each query position the similarity to key positions is
   sim = <q, k> / sqrt(d).
3. Gate: a threshold tau = Linear(q) is learned per position and head; a match contributes
   relu((sim - tau) / T) with T = 3000, so matches below the threshold contribute nothing
   (no softmax: weights are absolute, not normalised).
4. Top-k: only the k most similar key positions are retrieved (the paper's formulation); k = None
   uses every position, which is what the released code computes.
5. fused = current + proj_out(sum_j w_j v_j).

Variants for ablations: `full` (the above), `no_gate` (softmax attention over the retrieved keys,
no learned threshold, every match contributes), `off` (no CFR: the pipeline feeds the current
latent alone; this module is never called).

SPyNet's weights (`spynet`): `pretrained` loads BasicVSR's `spynet_20210409-c6c1bd09.pth`, as
the reference does (found by dloral.weights.locate_spynet: `spynet_path`, $DLORAL_SPYNET_WEIGHTS,
the torch hub cache); `random` keeps the seeded random init (recorded as `spynet: random-init`);
`auto` (default) is `pretrained` for sd21 with real weights, zero flow for the pretrained tiny
profile (`spynet: zero-flow`: it has no trained SPyNet, and a random one misaligns the previous
frame), and `random` for tiny_init random and sd21 random_init. SPyNet is frozen in every stage.

Memory is bounded: similarities are computed for blocks of query positions, never the full
(HW x HW x heads) matrix at once (at most `max_block_elems` entries, 2^23, a block; without
autograd or autocast the blocks share one buffer). The retrieval is computed in a factored
form that is the same function (CrossFrameAttention.retrieve): the latents have 4 channels, so every
similarity and every value is a product of (4 + 1)-wide vectors, not 64-wide ones. On a 2-core
CPU that made the retrieval 2.0-3.2x faster than the direct form dloral computed before, within
7e-6 of it (fp32, 9 heads of 64, both forms' blocks sharing a buffer; benchmarks/cfr_speed.py,
benchmarks/results/cfr-speed-cpu-fp32.json) and the tiny profile's upscale of 144x176 frames
4.19 -> 2.70 s per frame (benchmarks/latency.py --profile tiny --lq 144x176 --frames 4 --modes
sdpa at 6d8578d and 552b67c, stage `spynet_cfr` 2.70 -> 1.25 s). A GPU has not measured it
(bench_gpu.py's `cfr` part will).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dloral.model.config import CFRConfig
from dloral.model.spynet import SPyNet, flow_warp


class CrossFrameAttention(nn.Module):
    """Thresholded (or softmax) retrieval from an aligned previous latent.

    Parameter names are the reference's, so official weights load by prefix."""

    def __init__(self, cfg: CFRConfig):
        super().__init__()
        self.cfg = cfg
        # similarity entries per block; None: cfg.max_block_elems (a benchmark sweeps it)
        self.block_elems: int | None = None
        inner = cfg.heads * cfg.embed_dim
        c = cfg.latent_channels
        self.query_conv = nn.Conv2d(c, inner, 1)
        self.key_conv = nn.Conv2d(c, inner, 1)
        self.value_conv = nn.Conv2d(c, inner, 1)
        self.proj_out = nn.Conv2d(inner, c, 1)
        self.threshold_fc = nn.Linear(cfg.embed_dim, 1)

    def forward(self, current: torch.Tensor, aligned_prev: torch.Tensor) -> torch.Tensor:
        """current, aligned_prev: (B, 4, h, w) latents -> fused latent (B, 4, h, w)."""
        return current + self.retrieve(current, aligned_prev)

    def retrieve(self, current: torch.Tensor, aligned_prev: torch.Tensor) -> torch.Tensor:
        """What the fused latent adds to the current one: proj_out(sum_j w_j v_j), (B, 4, h, w).

        Computed in factored form (the same function): every map here is affine in a latent of
        c = 4 channels, so with x~ = [x; 1], y~ = [y; 1] (c + 1 values per position)
            <q_i, k_j> / sqrt(d) - tau_i = x~_i^T S_h y~_j    (S_h: (c+1) x (c+1) per head)
            proj_out's share of head h's value at j = y~_j^T V_h    (V_h: (c+1) x c)
        and the (HW x HW) matrix per head comes from a product of inner size c + 1, not d = 64,
        and is applied to c-wide values, not d-wide ones: about 14x fewer multiplications than
        the reference's q.k and attn @ v, with the same similarities, gate, top-k and output
        (tests/test_cfr_parity.py, against a transcription of the reference)."""
        b, c, h, w = current.shape
        n = h * w
        dtype = current.dtype
        # small (N x (c+1) per head), made in fp32 (under mixed precision too) and rounded once
        # to the latents' dtype: a row per (query, head), meeting y~ in the score product, and
        # each head's proj_out(v)
        with torch.autocast(current.device.type, enabled=False):
            scores_of, values_of = self._factors()
            ones = current.new_ones(b, 1, n, dtype=torch.float32)
            xa = torch.cat([current.reshape(b, c, n).float(), ones], 1)  # (B, c+1, N)
            ya = torch.cat([aligned_prev.reshape(b, c, n).float(), ones], 1)
            heads = scores_of.shape[0]
            q = torch.einsum("bcn,hce->bnhe", xa, scores_of).reshape(b, n * heads, c + 1)
            v = torch.einsum("bcn,hce->bhne", ya, values_of).reshape(b, heads * n, c)
        q, v, ya = q.to(dtype), v.to(dtype), ya.to(dtype)
        topk = None if self.cfg.topk is None or self.cfg.topk >= n else self.cfg.topk
        block = max(1, (self.block_elems or self.cfg.max_block_elems) // max(1, b * heads * n))
        gated = self.cfg.variant != "no_gate"
        # One output buffer filled block by block: small per-block results kept alive between
        # the blocks' large similarity buffers fragment glibc's heap on CPU, and the process
        # then grows by the whole (HW x HW x heads) matrix the blocks were meant to avoid.
        out = current.new_empty(b, n, c)
        # Without autograd the similarity buffer is allocated once and every block written into
        # it: a buffer per block was mapped and page-faulted afresh on CPU wherever glibc served
        # it from mmap or trimmed the heap under it, at a cost that varied run to run. (Not
        # under autocast either: a product into a given buffer is not cast, it keeps its dtype.)
        reuse = not (torch.is_grad_enabled() and (q.requires_grad or ya.requires_grad))
        reuse = reuse and not torch.is_autocast_enabled(current.device.type)
        buffer = None
        for start in range(0, n, block):
            nb = min(block, n - start)
            # gated: (sim - tau) / T; no_gate: sim. (B, nb * heads, N): row (query, head)
            rows = q[:, start * heads : (start + nb) * heads]
            if reuse and (buffer is None or buffer.shape[1] != nb * heads):
                buffer = q.new_empty(b, nb * heads, n)  # the full blocks' size, then the last's
            scores = torch.bmm(rows, ya, out=buffer) if reuse else torch.bmm(rows, ya)
            if topk is None:
                weights = torch.relu_(scores) if gated else scores.softmax(dim=-1)
                # one product sums over every head's keys (fp32 accumulation, one rounding)
                out[:, start : start + nb] = torch.bmm(weights.view(b, nb, heads * n), v)
                continue
            # tau is one number per row: the top-k of (sim - tau) / T are sim's top-k keys
            scores, idx = scores.topk(topk, dim=-1)  # (B, nb * heads, k)
            weights = torch.relu_(scores) if gated else scores.softmax(dim=-1)
            picked = _gather_rows(v, idx, heads, n)  # (B, nb * heads, k, c)
            part = (weights.float().unsqueeze(-1) * picked.float()).view(b, nb, -1, c).sum(2)
            out[:, start : start + nb] = part.to(dtype)
        return out.transpose(1, 2).reshape(b, c, h, w) + self.proj_out.bias.view(1, c, 1, 1)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, V): per head, the (c+1) x (c+1) score matrix and the (c+1) x c value matrix of
        the factored retrieval (see retrieve), from the layers' weights in fp32."""
        cfg = self.cfg
        heads, d, c = cfg.heads, cfg.embed_dim, cfg.latent_channels

        def affine(conv: nn.Conv2d) -> torch.Tensor:  # a 1x1 conv per head: (heads, d, c+1)
            weight = conv.weight.float().reshape(heads, d, c)
            return torch.cat([weight, conv.bias.float().reshape(heads, d, 1)], -1)

        wq, wk, wv = affine(self.query_conv), affine(self.key_conv), affine(self.value_conv)
        scores = wq.transpose(1, 2) @ wk / math.sqrt(d)  # x~^T S y~ = <q, k> / sqrt(d)
        if cfg.variant != "no_gate":
            # tau_i = threshold_fc(q_i) = x~_i . u; y~'s last entry is 1, so subtracting u from
            # S's last column subtracts tau_i from every score of query i
            u = wq.transpose(1, 2) @ self.threshold_fc.weight.float().reshape(d, 1)
            u[:, c] += self.threshold_fc.bias.float()
            scores = torch.cat([scores[..., :c], scores[..., c:] - u], -1) / cfg.temperature
        proj = self.proj_out.weight.float().reshape(c, heads, d).transpose(0, 1)  # (heads, c, d)
        values = (proj @ wv).transpose(1, 2)  # y~^T V_h = proj_out's head-h part of v(y)
        return scores, values


def _gather_rows(v: torch.Tensor, idx: torch.Tensor, heads: int, n: int) -> torch.Tensor:
    """v (B, heads * N, c) (head-major), idx (B, rows, k) of rows ordered (query, head) ->
    each row's head's value rows (B, rows, k, c), without expanding v."""
    b, rows, _ = idx.shape
    head = torch.arange(rows, device=v.device) % heads
    offset = torch.arange(b, device=v.device).view(b, 1, 1) * heads * n + (head * n).view(1, -1, 1)
    flat = (idx + offset).reshape(-1)
    return v.reshape(-1, v.shape[-1]).index_select(0, flat).view(*idx.shape, v.shape[-1])


class CrossFrameRetrieval(nn.Module):
    """Flow-align the previous latent and retrieve from it into the current latent."""

    def __init__(self, cfg: CFRConfig):
        super().__init__()
        self.cfg = cfg
        self.spynet = SPyNet()
        self.cross_attn_module = CrossFrameAttention(cfg)

    def flow(self, current_lq: torch.Tensor, prev_lq: torch.Tensor, size: tuple[int, int]):
        """Flow current -> previous at latent size, from upsampled LQ frames in [0, 1]."""
        # The reference feeds SPyNet the [-1, 1] frames bicubically resized by 1/8.
        # Flow runs in SPyNet's own dtype (kept fp32 under bf16 inference) and comes back fp32.
        dtype = self.spynet.mean.dtype
        cur = F.interpolate(current_lq * 2 - 1, size=size, mode="bicubic", align_corners=False)
        prev = F.interpolate(prev_lq * 2 - 1, size=size, mode="bicubic", align_corners=False)
        return self.spynet(cur.to(dtype), prev.to(dtype)).float()

    def forward(
        self,
        current_latent: torch.Tensor,
        prev_latent: torch.Tensor,
        current_lq: torch.Tensor,
        prev_lq: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (fused current latent, flow-aligned previous latent), both (B, 4, h, w)."""
        if self.cfg.variant == "off":
            raise RuntimeError("CFR variant 'off' bypasses this module; it must not be called")
        flow = self.flow(current_lq, prev_lq, tuple(current_latent.shape[-2:]))
        # Sampling coordinates in fp32: bf16 cannot address pixels of a wide latent exactly.
        aligned_prev = flow_warp(prev_latent.float(), flow).to(prev_latent.dtype)
        return self.cross_attn_module(current_latent, aligned_prev), aligned_prev
