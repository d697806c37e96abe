import math

import pytest
import torch
import torch.nn.functional as F

from dloral.model.cfr import CFRConfig, CrossFrameAttention, CrossFrameRetrieval
from dloral.model.spynet import SPyNet, flow_warp


def _dense_reference(attn: CrossFrameAttention, cur, prev, topk=None):
    """The reference formula written densely: relu((qk/sqrt d - tau)/T) @ v over all keys
    (or the top-k keys per query), no chunking."""
    b, _, h, w = cur.shape
    H, d, n = attn.cfg.heads, attn.cfg.embed_dim, h * w
    q = attn.query_conv(cur).view(b, H, d, n).transpose(2, 3)
    k = attn.key_conv(prev).view(b, H, d, n)
    v = attn.value_conv(prev).view(b, H, d, n).transpose(2, 3)
    sim = q @ k / math.sqrt(d)
    if attn.cfg.variant == "no_gate":
        if topk:
            sim = sim.masked_fill(sim < sim.topk(topk, -1).values[..., -1:], float("-inf"))
        weight = sim.softmax(-1)
    else:
        weight = F.relu((sim - attn.threshold_fc(q)) / attn.cfg.temperature)
        if topk:
            keep = sim >= sim.topk(topk, -1).values[..., -1:]
            weight = weight * keep
    out = (weight @ v).transpose(2, 3).reshape(b, H * d, h, w)
    return cur + attn.proj_out(out)


@pytest.mark.parametrize("variant", ["full", "no_gate"])
@pytest.mark.parametrize("topk", [None, 5])
def test_blocked_retrieval_matches_dense_formula(variant, topk):
    torch.manual_seed(0)
    attn = CrossFrameAttention(
        CFRConfig(
            variant=variant,
            topk=topk,
            heads=3,
            embed_dim=8,
            temperature=2.0,
            max_block_elems=3 * 30 * 7,
        )
    )
    cur, prev = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        got = attn(cur, prev)
        want = _dense_reference(attn, cur, prev, topk)
    assert torch.allclose(got, want, atol=1e-5)


def test_blocks_share_one_buffer_without_autograd_and_change_no_value(monkeypatch):
    """Without autograd every block's similarities are written into one buffer (a buffer per
    block was mapped and page-faulted afresh on CPU); with autograd each block has its own, as
    backward needs. Any block size gives the same retrieval and the same gradients."""
    torch.manual_seed(0)
    cfg = CFRConfig()
    attn = CrossFrameAttention(cfg)
    torch.nn.init.normal_(attn.proj_out.weight, std=0.02)
    cur, prev = torch.randn(1, 4, 20, 24), torch.randn(1, 4, 20, 24)
    n = 20 * 24
    written, bmm = [], torch.bmm

    def bmm_noting_out(a, b, *, out=None):
        if b.shape[-1] == n:  # the similarity product: (1, queries * heads, N)
            written.append(out)
        return bmm(a, b) if out is None else bmm(a, b, out=out)

    monkeypatch.setattr(torch, "bmm", bmm_noting_out)
    attn.block_elems = 7 * cfg.heads * n  # 7 query positions a block: 68 full blocks, a last of 4
    with torch.no_grad():
        blocked = attn(cur, prev)
    assert len(written) == 69 and written[0] is not None
    assert all(out is written[0] for out in written[:-1])
    assert written[0].shape == (1, 7 * cfg.heads, n) and written[-1].shape == (1, 4 * cfg.heads, n)
    attn.block_elems = None  # the config's 2^23: one block here
    with torch.no_grad():
        whole = attn(cur, prev)
    assert torch.allclose(blocked, whole, rtol=0, atol=1e-6)
    # under autocast the products are cast, as before: a product into a buffer would not be
    written.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn(cur, prev)
    assert written == [None]

    grads = []
    for block in (7 * cfg.heads * n, None):
        written.clear()
        attn.block_elems = block
        x = cur.clone().requires_grad_()
        out = attn(x, prev)
        out.square().sum().backward()
        assert all(o is None for o in written)  # each block's similarities kept for backward
        assert torch.allclose(out, whole, rtol=0, atol=1e-6)
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_gate_rejects_matches_below_threshold():
    torch.manual_seed(0)
    attn = CrossFrameAttention(CFRConfig(heads=2, embed_dim=4))
    cur, prev = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        attn.threshold_fc.bias.fill_(1e6)  # every similarity is below the threshold
        # nothing retrieved: only proj_out's bias is added to the current latent
        nothing = cur + attn.proj_out.bias.view(1, 4, 1, 1)
        assert torch.allclose(attn(cur, prev), nothing, atol=1e-6)
        attn.threshold_fc.bias.fill_(-1e3)
        assert not torch.allclose(attn(cur, prev), nothing, atol=1e-3)


def test_flow_warp_follows_a_known_shift():
    x = torch.arange(2 * 8 * 10, dtype=torch.float32).view(1, 2, 8, 10)
    flow = torch.zeros(1, 2, 8, 10)
    flow[:, 0] = 2.0  # out[y, x] = in[y, x + 2]
    flow[:, 1] = -1.0  # out[y, x] = in[y - 1, ...]
    out = flow_warp(x, flow)
    assert torch.allclose(out[:, :, 1:, :8], x[:, :, :7, 2:])
    assert out[:, :, 0].abs().max() < 1e-4 and out[:, :, :, 8:].abs().max() < 1e-4  # zeros outside


def test_spynet_shape_and_zero_motion_for_identical_frames():
    torch.manual_seed(0)
    net = SPyNet()
    a = torch.rand(2, 3, 40, 52)
    with torch.no_grad():
        flow = net(a, a)
        assert flow.shape == (2, 2, 40, 52)
        # untrained nets still map equal inputs to one flow field; it is not a motion estimate
        torch.manual_seed(1)
        b = torch.rand(2, 3, 40, 52)
        assert not torch.allclose(net(a, b), flow)


def test_retrieval_returns_aligned_previous_and_fused():
    torch.manual_seed(0)
    cfr = CrossFrameRetrieval(CFRConfig(heads=2, embed_dim=8))
    cur, prev = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    lq_cur, lq_prev = torch.rand(1, 3, 48, 64), torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        fused, aligned = cfr(cur, prev, lq_cur, lq_prev)
        flow = cfr.flow(lq_cur, lq_prev, (6, 8))
        assert torch.allclose(aligned, flow_warp(prev, flow))
        assert torch.allclose(fused, cfr.cross_attn_module(cur, aligned))


def test_off_variant_refuses_to_run():
    cfr = CrossFrameRetrieval(CFRConfig(variant="off"))
    with pytest.raises(RuntimeError, match="bypasses"):
        cfr(*(torch.zeros(1, 4, 2, 2),) * 2, *(torch.zeros(1, 3, 16, 16),) * 2)


def test_bad_variant_is_rejected():
    with pytest.raises(ValueError, match="cfr.variant"):
        CFRConfig(variant="sideways")


RSS_OF_RETRIEVAL = r"""
import json, resource, torch
from dloral.model.cfr import CFRConfig, CrossFrameAttention
torch.manual_seed(0)
attn = CrossFrameAttention(CFRConfig())
cur, prev = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.no_grad():
    for _ in range(4):  # as for every batch and latent tile of a clip
        attn(cur, prev)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": after - before}))
"""


def test_blocked_retrieval_does_not_grow_the_process_by_the_whole_matrix():
    """On CPU the blocks' results once sat between the blocks' similarity buffers in glibc's
    heap, and repeated retrievals grew the process past the whole matrix they were meant to
    avoid (9 heads x 4096^2 fp32 = 576 MiB here: 700-760 MiB before the fix, 210-280 after;
    the tiny model on 640x360 frames passed 22 GB). Measured in a fresh process (ru_maxrss)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", RSS_OF_RETRIEVAL], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    growth = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    matrix = 9 * 4096 * 4096 * 4
    assert growth < 0.75 * matrix, (
        f"grew {growth / 2**20:.0f} MiB for a {matrix / 2**20:.0f} MiB matrix"
    )
