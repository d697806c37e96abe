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
(HW x HW x heads) matrix at once.
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
        inner = cfg.heads * cfg.embed_dim
        c = cfg.latent_channels
        self.query_conv = nn.Conv2d(c, inner, 1)
        self.key_conv = nn.Conv2d(c, inner, 1)
        self.value_conv = nn.Conv2d(c, inner, 1)
        self.proj_out = nn.Conv2d(inner, c, 1)
        self.threshold_fc = nn.Linear(cfg.embed_dim, 1)

    def forward(self, current: torch.Tensor, aligned_prev: torch.Tensor) -> torch.Tensor:
        """current, aligned_prev: (B, 4, h, w) latents -> fused latent (B, 4, h, w)."""
        b, _, h, w = current.shape
        heads, d, n = self.cfg.heads, self.cfg.embed_dim, h * w
        # (B, heads, N, d)
        q = self.query_conv(current).view(b, heads, d, n).transpose(2, 3)
        k = self.key_conv(aligned_prev).view(b, heads, d, n)
        v = self.value_conv(aligned_prev).view(b, heads, d, n).transpose(2, 3)
        topk = None if self.cfg.topk is None or self.cfg.topk >= n else self.cfg.topk
        block = max(1, self.cfg.max_block_elems // max(1, b * heads * n))
        gated, temp = self.cfg.variant != "no_gate", self.cfg.temperature
        q3, k3, v3 = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)  # (B*heads, ., .)
        # One output buffer filled block by block: small per-block results kept alive between
        # the blocks' large similarity buffers fragment glibc's heap on CPU, and the process
        # then grows by the whole (HW x HW x heads) matrix the blocks were meant to avoid.
        out = torch.empty_like(q3)
        for start in range(0, n, block):
            qb = q3[:, start : start + block]
            if gated and topk is None:
                # relu((qk/sqrt(d) - tau) / T) with the scales folded into q: one GEMM, one pass
                tau = self.threshold_fc(qb) / temp  # (B*heads, nb, 1)
                weights = torch.relu_(torch.bmm(qb / (math.sqrt(d) * temp), k3) - tau)
                out[:, start : start + block] = torch.bmm(weights, v3)
                continue
            sim = torch.bmm(qb, k3) / math.sqrt(d)  # (B*heads, nb, N)
            if topk is not None:
                sim, idx = sim.topk(topk, dim=-1)  # (B*heads, nb, k)
            if gated:
                weights = F.relu((sim - self.threshold_fc(qb)) / temp)
            else:
                weights = sim.softmax(dim=-1)
            if topk is None:
                out[:, start : start + block] = torch.bmm(weights, v3)
            else:
                picked = _gather_rows(v3, idx)  # (B*heads, nb, k, d)
                out[:, start : start + block] = (weights.unsqueeze(-1) * picked).sum(-2)
        out = out.view(b, heads, n, d).transpose(2, 3).reshape(b, heads * d, h, w)
        return current + self.proj_out(out)


def _gather_rows(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """v (G, N, d), idx (G, q, k) -> v rows (G, q, k, d) without expanding v."""
    g, n, d = v.shape
    offset = (torch.arange(g, device=v.device) * n).view(g, 1, 1)
    flat = (idx + offset).reshape(-1)
    return v.reshape(g * n, d).index_select(0, flat).view(*idx.shape, d)


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
