"""CrossFrameRetrieval against a literal transcription of the reference's CFR (reference_cfr.py:
CFR_model.forward with its SPyNet, flow_warp and CrossFrameAbsoluteAttn, yjsunnn/DLoRAL
40c1308), same weights, on real frames."""

import torch
import torch.nn.functional as F
from reference_cfr import CFR_model

from dloral.model.cfr import CFRConfig, CrossFrameRetrieval
from dloral.model.spynet import spynet_state

SIZE = (256, 320)  # upsampled LQ frames: a 32x40 latent (SPyNet resizes it to 64x64 and back)


def _ours_from(ref: CFR_model) -> CrossFrameRetrieval:
    """Our module with the reference module's weights, keys mapped as the official import
    (checkpoint.import_official) maps `state_dict_bpp`: `spynet.*` through spynet_state,
    `cross_attn_module.*` as they are. Strict: every tensor of ours comes from the reference."""
    sd = ref.state_dict()
    spynet = {k.removeprefix("spynet."): v for k, v in sd.items() if k.startswith("spynet.")}
    mapped, unmapped = spynet_state(spynet)
    assert unmapped == []
    state = {f"spynet.{k}": v for k, v in mapped.items()}
    state.update({k: v for k, v in sd.items() if k.startswith("cross_attn_module.")})
    assert len(state) == len(sd)
    ours = CrossFrameRetrieval(CFRConfig()).eval()  # the defaults: 9 heads of 64, T 3000, all keys
    ours.load_state_dict(state, strict=True)
    return ours


def _gate(attn, cur, aligned):
    """Which (head, query, key) matches pass the threshold, computed from the transcription's
    layers as its forward does: sim = Q.K / sqrt(d) > t = threshold_fc(Q)."""
    b, _, h, w = cur.shape
    q = attn.query_conv(cur).view(b, attn.heads, attn.embed_dim, h * w).permute(0, 1, 3, 2)
    k = attn.key_conv(aligned).view(b, attn.heads, attn.embed_dim, h * w)
    return q @ k / attn.embed_dim**0.5 > attn.threshold_fc(q)


def test_cfr_matches_the_reference_transcription_on_real_frames(bikes_lq):
    """Two pairs of consecutive real bikes frames (bicubically upsampled to 256x320, in [0, 1];
    the reference gets them as its inference script does, `* 2 - 1`), random latents, the
    reference's seeded init in both modules. The reference's fused latent of frame 1 and its
    aligned previous latent must be ours within 1e-5 (measured: fused 2.4e-7, aligned 0.0).

    The threshold gate is exercised: about two thirds of the matches pass it, some query
    positions retrieve nothing at all, some retrieve from every key, and the retrieved detail
    (fused - current - proj_out's bias) is far above the tolerance."""
    frames = F.interpolate(bikes_lq[:4], size=SIZE, mode="bicubic", align_corners=False)
    frames = frames.clamp(0, 1)
    prev, cur = frames[[0, 2]], frames[[1, 3]]
    h, w = SIZE[0] // 8, SIZE[1] // 8
    torch.manual_seed(0)
    ref = CFR_model(mid_channels=64, num_blocks=7, is_low_res_input=False).eval()
    ours = _ours_from(ref)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, 4, h, w, generator=g)  # (n, t, c, h, w): t = (previous, current)
    lqs = torch.stack([prev, cur], 1) * 2 - 1
    uncertainty_map = torch.zeros(2, 1, 1, h, w)
    with torch.no_grad():
        fused_ref, _, aligned_ref = ref(lqs, latents, uncertainty_map)
        fused, aligned = ours(latents[:, 1], latents[:, 0], cur, prev)
        gate = _gate(ref.cross_attn_module, latents[:, 1], aligned_ref[:, 1])

    assert torch.equal(fused_ref[:, 0], latents[:, 0])  # the reference fuses frames 1.. only
    torch.testing.assert_close(aligned, aligned_ref[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, fused_ref[:, 1], atol=1e-5, rtol=1e-5)

    # a real warp (the flow is sub-pixel to ~0.7 px here; random latents change fast)
    assert (aligned - latents[:, 0]).abs().max() > 1.0
    # the gate: some matches pass, some do not; some queries get nothing, some everything
    assert 0.3 < gate.float().mean() < 0.9
    assert (~gate.any(-1)).any() and gate.all(-1).any()
    retrieved = fused - latents[:, 1] - ref.cross_attn_module.proj_out.bias.view(1, 4, 1, 1)
    assert retrieved.abs().max() > 0.05 and retrieved.abs().mean() > 0.01


def _attention_pair():
    """The transcription's CrossFrameAbsoluteAttn (9 heads of 64, T 3000, its seeded init) and
    ours with its weights."""
    from reference_cfr import CrossFrameAbsoluteAttn

    from dloral.model.cfr import CrossFrameAttention

    torch.manual_seed(0)
    ref = CrossFrameAbsoluteAttn(in_channels=4, feat_dim=4, embed_dim=64, heads=9).eval()
    ours = CrossFrameAttention(CFRConfig()).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _latents(bikes_lq):
    """Latent-like inputs from real frames: two consecutive bikes frames pooled to 1/8 of a
    256x320 upsampling, their RGB and a luma channel scaled to unit spread (SD's latents)."""
    frames = F.interpolate(bikes_lq[:2], size=SIZE, mode="bicubic", align_corners=False)
    small = F.avg_pool2d(frames.clamp(0, 1), 8)  # (2, 3, 32, 40)
    latent = torch.cat([small, small.mean(1, keepdim=True)], 1)
    latent = (latent - latent.mean()) / latent.std()
    return latent[1:], latent[:1]  # current, previous


def test_factored_retrieval_trains_as_the_reference_does(bikes_lq):
    """CFR is trained in the consistency stage: the gradients of every CFR weight and of both
    latents through our factored retrieval equal those through the transcription's q.k, gate
    and attn @ v (fp32, within 1e-4 of the largest)."""
    ref, ours = _attention_pair()
    cur, prev = _latents(bikes_lq)
    target = torch.randn(cur.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for module, run in ((ref, lambda c, p: ref(c, p, c, p)[0]), (ours, ours)):
        c, p = cur.clone().requires_grad_(), prev.clone().requires_grad_()
        module.zero_grad()
        loss = (run(c, p) - target).square().mean()
        loss.backward()
        named = {n: t.grad for n, t in module.named_parameters()}
        grads.append({**named, "current": c.grad, "previous": p.grad})
    want, got = grads
    assert sorted(want) == sorted(got)
    for name, g in want.items():
        assert g.abs().max() > 0, name  # every weight and input is trained through
        torch.testing.assert_close(got[name], g, atol=1e-4 * float(g.abs().max()), rtol=0)


def test_in_half_precision_the_retrieval_is_as_exact_as_the_references(bikes_lq):
    """bf16 and fp16 inference, and bf16 autocast (mixed-precision training, here on the CPU):
    the retrieved part (proj_out's output) of ours and of the transcription, each run so,
    against the transcription in fp32. Ours rounds differently (a (c+1)-wide score product,
    one reduction over heads) and must stay within 1.5x of the reference's own error (measured
    0.92x in bf16, 0.86x in fp16, 0.57x under autocast, where our small products stay fp32)."""
    import copy
    from contextlib import nullcontext

    ref, ours = _attention_pair()
    cur, prev = _latents(bikes_lq)
    runs = {  # name: (dtype of weights and latents, context)
        "bf16": (torch.bfloat16, nullcontext),
        "fp16": (torch.float16, nullcontext),
        "autocast": (torch.float32, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    }
    with torch.no_grad():
        exact = ref(cur, prev, cur, prev)[1]
        for name, (dtype, context) in runs.items():
            r, o = copy.deepcopy(ref).to(dtype), copy.deepcopy(ours).to(dtype)
            c, p = cur.to(dtype), prev.to(dtype)
            with context():
                ref_err = (r(c, p, c, p)[1].float() - exact).abs().max()
                our_err = (o.retrieve(c, p).float() - exact).abs().max()
            assert 0 < ref_err < 0.05 * exact.abs().max(), name  # rounding, not a wrong result
            assert our_err <= 1.5 * ref_err, (name, float(our_err), float(ref_err))
