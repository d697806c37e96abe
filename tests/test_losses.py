import socket
from pathlib import Path

import lpips
import pytest
import torch
import torch.nn.functional as F

from dloral.model.backbone import build_backbone
from dloral.train.losses import (
    VGG16_ENV,
    VGG16_FILE,
    CSDLoss,
    WeightsMissing,
    l2_loss,
    load_lpips,
    reference_flow,
    reference_flow_loss,
    sd21_ddpm_scheduler,
    temporal_consistency_loss,
)

# ---------------------------------------------------------------------------------------------
# temporal consistency
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(bikes_lq):
    """Two consecutive real frames in [-1, 1], as (prev, cur) batches of 1."""
    frames = bikes_lq * 2 - 1
    return frames[0:1], frames[1:2]


def test_l2_is_mse():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(l2_loss(a, b), ((a - b) ** 2).mean())


def test_temporal_zero_for_exact_and_offset_prediction(bikes_lq):
    frames = bikes_lq * 2 - 1
    gt_prev, gt_cur = frames[0:3], frames[1:4]
    assert temporal_consistency_loss(gt_prev, gt_cur, gt_prev, gt_cur) == 0
    offset = torch.tensor([0.1, -0.2, 0.3]).view(3, 1, 1, 1)  # one brightness offset per clip
    loss = temporal_consistency_loss(gt_prev + offset, gt_cur + offset, gt_prev, gt_cur)
    assert loss < 1e-6
    flow = torch.full((3, 2, 48, 64), 1.5)  # also under (fractional) motion compensation
    loss = temporal_consistency_loss(gt_prev + offset, gt_cur + offset, gt_prev, gt_cur, flow)
    assert loss < 1e-6


def test_temporal_grows_with_flicker(clip):
    gt_prev, gt_cur = clip
    pattern = torch.linspace(-1, 1, 64).view(1, 1, 1, 64)  # spatially varying flicker
    losses = []
    for amp in (0.0, 0.02, 0.05, 0.1):
        losses.append(temporal_consistency_loss(gt_prev, gt_cur + amp * pattern, gt_prev, gt_cur))
    assert losses[0] == 0
    assert all(a < b for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] == pytest.approx(0.1 * pattern.abs().mean().item(), rel=1e-4)


def test_temporal_compensates_known_shift(bikes_lq):
    dx, dy = 3, 2
    frame = bikes_lq[0:1] * 2 - 1  # (1, 3, 48, 64)
    restored = 0.9 * F.avg_pool2d(frame, 3, 1, 1, count_include_pad=False)  # != GT, tracks motion

    def crops(x):  # prev(q) = x(q + 4 - d), cur(p) = x(p + 4): content moved by d
        return x[..., 4 - dy : 44 - dy, 4 - dx : 60 - dx], x[..., 4:44, 4:60]

    gt_prev, gt_cur = crops(frame)
    pred_prev, pred_cur = crops(restored)
    flow = torch.zeros(1, 2, 40, 56)
    flow[:, 0], flow[:, 1] = dx, dy  # current -> previous, pixels (x, y)
    compensated = temporal_consistency_loss(pred_prev, pred_cur, gt_prev, gt_cur, flow)
    ignored = temporal_consistency_loss(pred_prev, pred_cur, gt_prev, gt_cur)
    assert compensated < 1e-6  # needs the out-of-frame mask: the warp puts zeros there
    assert ignored > 0.01
    # a prediction that does not track the motion is penalised under compensation
    wrong = temporal_consistency_loss(pred_cur, pred_cur, gt_prev, gt_cur, flow)
    assert wrong > 0.01


def test_temporal_gradients_only_to_prediction(clip):
    gt_prev, gt_cur = (x.clone().requires_grad_(True) for x in clip)
    pred_prev = (clip[0] + 0.05 * torch.randn_like(clip[0])).requires_grad_(True)
    pred_cur = (clip[1] + 0.05 * torch.randn_like(clip[1])).requires_grad_(True)
    flow = torch.full((1, 2, 48, 64), 0.7, requires_grad=True)
    temporal_consistency_loss(pred_prev, pred_cur, gt_prev, gt_cur, flow).backward()
    assert pred_cur.grad is not None and pred_cur.grad.abs().sum() > 0
    assert pred_prev.grad is not None and pred_prev.grad.abs().sum() > 0
    assert gt_prev.grad is None and gt_cur.grad is None and flow.grad is None


def test_temporal_rejects_mismatched_shapes(clip):
    prev, cur = clip
    with pytest.raises(ValueError):
        temporal_consistency_loss(prev, cur, prev[..., :32], cur)
    with pytest.raises(ValueError):
        temporal_consistency_loss(prev, cur, prev, cur, torch.zeros(1, 2, 48, 32))


# reference_flow: a literal transcription of yjsunnn/DLoRAL@40c1308
# src/my_utils/training_utils.py `batch_calculate_optical_flow` (comments translated) and of the
# loss lines of src/train_DLoRAL.py, to hold reference_flow_loss to.
def _reference_batch_calculate_optical_flow(frames1, frames2, normalize=True):
    import cv2
    import numpy as np

    assert frames1.dim() == 4 and frames2.dim() == 4, "inputs must be [B,C,H,W]"

    b, c, h, w = frames1.shape
    device = frames1.device
    flows = torch.zeros(b, 2, h, w, device="cpu")  # on the CPU first

    # each pair of the batch
    for i in range(b):
        # to numpy (H,W,3)
        frame1 = frames1[i].permute(1, 2, 0).detach().cpu().numpy() * 255
        frame2 = frames2[i].permute(1, 2, 0).detach().cpu().numpy() * 255

        # grey
        frame1_gray = cv2.cvtColor(frame1.astype(np.uint8), cv2.COLOR_RGB2GRAY)
        frame2_gray = cv2.cvtColor(frame2.astype(np.uint8), cv2.COLOR_RGB2GRAY)

        # Farneback flow
        flow = cv2.calcOpticalFlowFarneback(
            frame1_gray,
            frame2_gray,
            None,
            pyr_scale=0.5,
            levels=3,
            winsize=15,
            iterations=3,
            poly_n=5,
            poly_sigma=1.2,
            flags=0,
        )  # (H,W,2)

        if normalize:
            flow[..., 0] /= w  # u normalised
            flow[..., 1] /= h  # v normalised

        flows[i] = torch.from_numpy(flow).permute(2, 0, 1).float()

    return flows.to(device)


def _reference_consistency(x_tgt_pred1, x_tgt_pred2, x_tgt, lambda_consistency):
    consistency_source = _reference_batch_calculate_optical_flow(x_tgt_pred1, x_tgt_pred2)
    consistency_target = _reference_batch_calculate_optical_flow(
        x_tgt[:, 1, :, :, :], x_tgt[:, 2, :, :, :]
    )

    loss_consistency = (
        F.l1_loss(consistency_source, consistency_target, reduction="mean") * lambda_consistency
    )
    return loss_consistency


@pytest.fixture(scope="module")
def moving_clips(bikes_path):
    """Two real 3-frame clips in [-1, 1] (B, 3, 3, 96, 128) and a 'restored' version: blurred,
    dimmed and flickering, so its motion differs from the GT's."""
    from conftest import read_clip

    gt = torch.stack(
        [
            read_clip(bikes_path, 3, (0, 100, 192, 256), (96, 128)),
            read_clip(bikes_path, 3, (150, 300, 192, 256), (96, 128)),
        ]
    )
    gt = gt * 2 - 1
    flicker = torch.tensor([0.0, 0.08, -0.05]).view(1, 3, 1, 1, 1)
    blurred = F.avg_pool2d(gt.flatten(0, 1), 5, 1, 2, count_include_pad=False).view(gt.shape)
    pred = (0.9 * blurred + flicker + 0.03 * torch.sin(torch.arange(128.0) / 3)).clamp(-1, 1)
    return gt, pred


def test_reference_flow_loss_matches_the_reference_transcription(moving_clips):
    gt, pred = moving_clips
    assert (gt < 0).float().mean() > 0.2  # half the range wraps in the uint8 cast: exercised
    expected = _reference_consistency(pred[:, 1], pred[:, 2], gt, 1.0)
    got = reference_flow_loss(pred[:, 1], pred[:, 2], gt[:, 1], gt[:, 2])
    assert expected > 1e-3  # the flows differ: a value, not a zero
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    flows = reference_flow(gt[:, 1], gt[:, 2])
    assert torch.equal(flows, _reference_batch_calculate_optical_flow(gt[:, 1], gt[:, 2]))
    # prediction == GT: zero, as the reference
    assert reference_flow_loss(gt[:, 1], gt[:, 2], gt[:, 1], gt[:, 2]) == 0


def test_reference_flow_loss_carries_no_gradient(moving_clips):
    gt, pred = moving_clips
    prev = pred[:, 1].clone().requires_grad_(True)
    cur = pred[:, 2].clone().requires_grad_(True)
    loss = reference_flow_loss(prev, cur, gt[:, 1], gt[:, 2])
    assert not loss.requires_grad and loss.grad_fn is None and loss > 0
    # added to a differentiable loss it changes the value, not the gradient
    (l2_loss(cur, gt[:, 2]) + 10 * loss).backward()
    with_flow = cur.grad.clone()
    assert prev.grad is None
    cur.grad = None
    l2_loss(cur, gt[:, 2]).backward()
    assert torch.equal(cur.grad, with_flow)


# ---------------------------------------------------------------------------------------------
# CSD
# ---------------------------------------------------------------------------------------------


def test_scheduler_is_sd21_base():
    sched = sd21_ddpm_scheduler()
    cfg = sched.config
    assert type(sched).__name__ == "DDPMScheduler"
    assert cfg.num_train_timesteps == 1000
    assert cfg.beta_start == 0.00085 and cfg.beta_end == 0.012
    assert cfg.beta_schedule == "scaled_linear"
    assert cfg.prediction_type == "epsilon"
    assert cfg.clip_sample is False and cfg.set_alpha_to_one is False
    assert cfg.steps_offset == 1
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    assert torch.allclose(sched.alphas_cumprod, torch.cumprod(1 - betas, 0))


@pytest.fixture(scope="module")
def tiny_unet():
    # all-random: the pretrained tiny UNet predicts zero noise, a teacher with nothing to teach
    return build_backbone("tiny", tiny_init="random").unet.requires_grad_(False).eval()


@pytest.fixture()
def csd_inputs():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    pos = torch.randn(2, 77, 32, generator=g)
    neg = torch.randn(2, 77, 32, generator=g)
    return latents, pos, neg


def test_csd_finite_grad_only_to_latents_deterministic(tiny_unet, csd_inputs):
    latents, pos, neg = csd_inputs
    latents = latents.requires_grad_(True)
    pos, neg = pos.requires_grad_(True), neg.requires_grad_(True)
    csd = CSDLoss(tiny_unet)
    loss = csd(latents, pos, neg, generator=torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert latents.grad is not None and torch.isfinite(latents.grad).all()
    assert latents.grad.abs().sum() > 0
    assert pos.grad is None and neg.grad is None
    assert all(p.grad is None for p in tiny_unet.parameters())
    assert not csd.train().unet.training
    t1 = csd.last_timesteps.clone()
    again = csd(latents, pos, neg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loss.detach(), again.detach()) and torch.equal(t1, csd.last_timesteps)
    other = csd(latents, pos, neg, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(loss.detach(), other.detach())


def test_csd_zero_without_guidance(tiny_unet, csd_inputs):
    # eps_cfg == eps_uncond happens at cfg_scale=0 (cfg_scale=1 gives eps_cfg == eps_text)
    latents, pos, neg = csd_inputs
    latents = latents.requires_grad_(True)
    loss = CSDLoss(tiny_unet, cfg_scale=0.0)(latents, pos, neg, torch.Generator().manual_seed(3))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(latents.grad) == 0
    # same prompt for both branches: no classifier signal either
    same = CSDLoss(tiny_unet)(latents, pos, pos, torch.Generator().manual_seed(3))
    assert same.item() < 1e-10


def test_csd_gradient_matches_formula(tiny_unet, csd_inputs):
    latents, pos, neg = csd_inputs
    latents = latents.requires_grad_(True)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    csd = CSDLoss(tiny_unet, cfg_scale=7.5)
    loss = csd(latents, pos, neg, generator=torch.Generator().manual_seed(5), noise=noise)
    loss.backward()

    # independent recomputation of the reference formula
    t = csd.last_timesteps
    sched = sd21_ddpm_scheduler()
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    z = latents.detach()
    noisy = abar.sqrt() * z + (1 - abar).sqrt() * noise
    with torch.no_grad():
        eps_u = tiny_unet(noisy, t, encoder_hidden_states=neg).sample
        eps_c = tiny_unet(noisy, t, encoder_hidden_states=pos).sample
    eps_cfg = eps_u + 7.5 * (eps_c - eps_u)
    x0_real = (noisy - (1 - abar).sqrt() * eps_cfg) / abar.sqrt()
    x0_fake = (noisy - (1 - abar).sqrt() * eps_u) / abar.sqrt()
    w = (z - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = (x0_fake - x0_real) / w
    # loss = mean((z - sg(z - grad))^2) = mean(grad^2); d loss / d z = 2 grad / numel
    assert loss.item() == pytest.approx((grad**2).mean().item(), rel=1e-3)
    expected = 2 * grad / latents.numel()
    assert torch.allclose(latents.grad, expected, rtol=1e-3, atol=1e-3 * expected.abs().max())


def test_csd_timesteps_in_range(tiny_unet, csd_inputs):
    csd = CSDLoss(tiny_unet, min_step_ratio=0.02, max_step_ratio=0.5)
    t = csd.sample_timesteps(20000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 499  # randint(20, 500), high exclusive as in reference
    assert t.min() < 25 and t.max() > 494
    latents, pos, neg = csd_inputs
    csd(latents, pos, neg, torch.Generator().manual_seed(6))
    assert csd.last_timesteps.shape == (2,)
    assert ((csd.last_timesteps >= 20) & (csd.last_timesteps < 500)).all()
    narrow = CSDLoss(tiny_unet, min_step_ratio=0.3, max_step_ratio=0.301)
    assert (narrow.sample_timesteps(50, "cpu") == 300).all()


class _ReferenceCSD:
    """Literal: yjsunnn/DLoRAL@40c1308 src/DLoRAL_model.py `CSDLoss` (forward_latent, eps_to_mu,
    cal_csd, stopgrad); the teacher runs in `dtype` (the reference's fp16 casts) so that it
    runs on CPU here."""

    def __init__(self, unet_fix, sched, dtype=torch.float32):
        self.unet_fix, self.sched, self.dtype = unet_fix, sched, dtype

    def forward_latent(self, model, latents, timestep, prompt_embeds):
        noise_pred = model(
            latents,
            timestep=timestep,
            encoder_hidden_states=prompt_embeds,
        ).sample

        return noise_pred

    def eps_to_mu(self, scheduler, model_output, sample, timesteps):
        alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        alpha_prod_t = alphas_cumprod[timesteps]
        while len(alpha_prod_t.shape) < len(sample.shape):
            alpha_prod_t = alpha_prod_t.unsqueeze(-1)
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (
            0.5
        )
        return pred_original_sample

    def cal_csd(
        self,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        args,
        noise_csd,
    ):
        bsz = latents.shape[0]
        min_dm_step = int(self.sched.config.num_train_timesteps * args.min_dm_step_ratio)
        max_dm_step = int(self.sched.config.num_train_timesteps * args.max_dm_step_ratio)

        timestep = torch.randint(min_dm_step, max_dm_step, (bsz,), device=latents.device).long()
        # noise = torch.randn_like(latents)
        noise = noise_csd
        noisy_latents = self.sched.add_noise(latents, noise, timestep)

        with torch.no_grad():
            noisy_latents_input = torch.cat([noisy_latents] * 2)
            timestep_input = torch.cat([timestep] * 2)
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            noise_pred = self.forward_latent(
                self.unet_fix,
                latents=noisy_latents_input.to(dtype=self.dtype),
                timestep=timestep_input,
                prompt_embeds=prompt_embeds.to(dtype=self.dtype),
            )
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + args.cfg_csd * (noise_pred_text - noise_pred_uncond)
            noise_pred.to(dtype=torch.float32)
            noise_pred_uncond.to(dtype=torch.float32)

            pred_real_latents = self.eps_to_mu(self.sched, noise_pred, noisy_latents, timestep)
            pred_fake_latents = self.eps_to_mu(
                self.sched, noise_pred_uncond, noisy_latents, timestep
            )

        weighting_factor = torch.abs(latents - pred_real_latents).mean(dim=[1, 2, 3], keepdim=True)

        grad = (pred_fake_latents - pred_real_latents) / weighting_factor
        loss = F.mse_loss(latents, self.stopgrad(latents - grad))

        return loss

    def stopgrad(self, x):
        return x.detach()


@pytest.fixture()
def two_pair_batch():
    """2 samples x 2 frame pairs of latents, sample-major as restore_clip makes them, with
    each sample's own positive prompt and one shared negative prompt."""
    g = torch.Generator().manual_seed(10)
    latents = torch.randn(2 * 2, 4, 8, 8, generator=g)
    pos = torch.randn(2, 77, 32, generator=g)
    neg = torch.randn(1, 77, 32, generator=g)
    return latents, pos, neg


def _recorded_noise(csd, monkeypatch):
    """The noise every call of `csd` adds, in the order of its latents."""
    seen = []
    add_noise = csd.scheduler.add_noise

    def spy(original, noise, timesteps):
        seen.append(noise.clone())
        return add_noise(original, noise, timesteps)

    monkeypatch.setattr(csd.scheduler, "add_noise", spy)
    return seen


def test_csd_pairs_of_a_sample_share_their_noise_as_the_reference(
    tiny_unet, two_pair_batch, monkeypatch
):
    from types import SimpleNamespace

    latents, pos, neg = two_pair_batch
    csd = CSDLoss(tiny_unet, cfg_scale=7.5, min_step_ratio=0.02, max_step_ratio=0.5)
    seen = _recorded_noise(csd, monkeypatch)
    ours_in = latents.clone().requires_grad_(True)
    pos_per_latent = pos.repeat_interleave(2, dim=0)
    ours = csd.pair_losses(
        ours_in, pos_per_latent, neg, 2, generator=torch.Generator().manual_seed(3)
    )
    ours.sum().backward()
    noise = seen[0].view(2, 2, 4, 8, 8)  # (sample, pair, ...)
    assert torch.equal(noise[:, 0], noise[:, 1])  # the pairs of a sample: one noise
    assert not torch.equal(noise[0, 0], noise[1, 0])  # the samples: their own
    t = csd.last_timesteps.view(2, 2)
    assert len(set(t.flatten().tolist())) > 1  # a timestep per latent

    # the reference's step: one noise_csd for both cal_csd calls, each drawing its timesteps
    draws = iter([t[:, 0], t[:, 1]])
    monkeypatch.setattr(torch, "randint", lambda *a, **k: next(draws))
    net_csd = _ReferenceCSD(tiny_unet, sd21_ddpm_scheduler())
    args = SimpleNamespace(min_dm_step_ratio=0.02, max_dm_step_ratio=0.5, cfg_csd=7.5)
    ref_in = latents.clone().requires_grad_(True)
    latents_pred1, latents_pred2 = ref_in.view(2, 2, 4, 8, 8).unbind(1)
    prompt_embeds, neg_prompt_embeds = pos, neg.expand(2, -1, -1)
    lambda_vsd = 1.0
    noise_csd = noise[:, 0]  # torch.randn_like(latents_pred1): the noise our call drew
    loss_csd = (
        net_csd.cal_csd(latents_pred1, prompt_embeds, neg_prompt_embeds, args, noise_csd)
        * lambda_vsd
    )
    loss_csd_2 = (
        net_csd.cal_csd(latents_pred2, prompt_embeds, neg_prompt_embeds, args, noise_csd)
        * lambda_vsd
    )
    (loss_csd + loss_csd_2).backward()

    assert torch.allclose(ours, torch.stack([loss_csd, loss_csd_2]).detach(), rtol=1e-5)
    assert torch.allclose(ours_in.grad, ref_in.grad, rtol=1e-4, atol=1e-4 * ref_in.grad.abs().max())


def test_csd_pair_losses_add_up_to_pairs_times_the_mse_over_all_latents(
    tiny_unet, two_pair_batch, monkeypatch
):
    latents, pos, neg = two_pair_batch
    pos = pos.repeat_interleave(2, dim=0)
    csd = CSDLoss(tiny_unet)
    seen = _recorded_noise(csd, monkeypatch)
    per_pair = csd.pair_losses(latents, pos, neg, 2, generator=torch.Generator().manual_seed(4))
    assert per_pair.shape == (2,) and (per_pair > 0).all()
    t = csd.last_timesteps
    monkeypatch.setattr(csd, "sample_timesteps", lambda *a, **k: t)
    whole = csd(latents, pos, neg, noise=seen[0])  # one mse over all 4 latents
    assert per_pair.sum().item() == pytest.approx(2 * whole.item(), rel=1e-6)
    with pytest.raises(ValueError, match="3 pairs"):
        csd.pair_losses(latents, pos, neg, 3)


def test_csd_non_finite_pair_keeps_its_value_but_passes_no_gradient(
    tiny_unet, two_pair_batch, nan_teacher
):
    latents, pos, neg = two_pair_batch
    pos = pos.repeat_interleave(2, dim=0)

    def pair_losses(teacher):
        x = latents.clone().requires_grad_(True)
        per_pair = CSDLoss(teacher).pair_losses(x, pos, neg, 2, torch.Generator().manual_seed(5))
        torch.where(per_pair.isfinite(), per_pair, 0.0).sum().backward()
        return per_pair.detach(), x.grad

    clean, clean_grad = pair_losses(tiny_unet)
    # latent 2 is sample 1's pair 0: that pair's loss (the mse over both samples) is NaN
    poisoned, grad = pair_losses(nan_teacher(tiny_unet, [2]))
    assert poisoned[0].isnan() and poisoned[1] == clean[1]
    assert torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[[0, 2]]) == 0  # pair 0, both samples: no gradient
    assert torch.equal(grad[[1, 3]], clean_grad[[1, 3]]) and clean_grad[[1, 3]].abs().sum() > 0


def test_csd_rejects_v_prediction(tiny_unet):
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="epsilon"):
        CSDLoss(tiny_unet, scheduler=DDPMScheduler(prediction_type="v_prediction"))


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def no_weights_anywhere(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    monkeypatch.delenv(VGG16_ENV, raising=False)
    return hub


def test_lpips_missing_weights_names_file_and_places(no_weights_anywhere, tmp_path, monkeypatch):
    monkeypatch.setenv(VGG16_ENV, str(tmp_path / "elsewhere" / VGG16_FILE))
    with pytest.raises(WeightsMissing) as info:
        load_lpips(vgg_weights=tmp_path / "given")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert VGG16_FILE in msg and VGG16_ENV in msg
    assert str(no_weights_anywhere / "checkpoints") in msg
    assert str(tmp_path / "elsewhere") in msg and str(tmp_path / "given") in msg
    assert "~/.cache/torch/hub/checkpoints" in msg


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = torchvision.models.vgg16().state_dict()
    # keep a classifier tensor (the real file has them) but skip the 400 MB ones
    state = {
        k: v for k, v in state.items() if k.startswith("features.") or k == "classifier.6.bias"
    }
    path = tmp_path_factory.mktemp("vgg") / VGG16_FILE
    torch.save(state, path)
    return path, state


def test_lpips_loads_trunk_offline(vgg_file, no_weights_anywhere, monkeypatch):
    path, saved = vgg_file

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    net = load_lpips(vgg_weights=path)
    assert net.weights_source == str(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())

    # key mapping: lpips names each trunk module by its index in vgg16.features
    expected_split = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]
    for k, convs in enumerate(expected_split, start=1):
        seq = getattr(net.net, f"slice{k}")
        got = [int(n) for n, m in seq.named_children() if isinstance(m, torch.nn.Conv2d)]
        assert got == convs
        for n in convs:
            conv = getattr(seq, str(n))
            assert torch.equal(conv.weight, saved[f"features.{n}.weight"])
            assert torch.equal(conv.bias, saved[f"features.{n}.bias"])

    # linear layers from the lpips wheel
    wheel = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    lin = torch.load(wheel, map_location="cpu", weights_only=True)
    for k in range(5):
        assert torch.equal(getattr(net, f"lin{k}").model[1].weight, lin[f"lin{k}.model.1.weight"])

    # behaviour on images in [-1, 1]
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    dist = net(torch.cat([a, a]), torch.cat([a, b]))
    assert dist.shape == (4, 1, 1, 1)
    assert dist[:2].abs().max() < 1e-6 and (dist[2:] > 1e-3).all()
    x = b.clone().requires_grad_(True)
    net(x, a).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_finds_weights_via_env_and_hub(vgg_file, no_weights_anywhere, monkeypatch):
    from dloral.train.losses import locate_vgg16

    path, _ = vgg_file
    monkeypatch.setenv(VGG16_ENV, str(path))
    assert locate_vgg16() == path
    monkeypatch.setenv(VGG16_ENV, str(path.parent))  # a folder holding the file also works
    assert locate_vgg16() == path
    monkeypatch.delenv(VGG16_ENV)
    hub_file = no_weights_anywhere / "checkpoints" / VGG16_FILE
    hub_file.parent.mkdir(parents=True)
    hub_file.symlink_to(path)
    assert locate_vgg16() == hub_file
