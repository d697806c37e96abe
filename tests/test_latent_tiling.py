"""Latent tiling against a literal transcription of the reference's tiled inference
(yjsunnn/DLoRAL 40c1308, src/DLoRAL_model.py `Generator_eval.forward` ~604-773 and
`_gaussian_weights` ~810), on real frames."""

import numpy as np
import pytest
import torch

from dloral.model import lora
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.model.tiling import blend, gaussian_weights, needs_tiling, restore_tiled, tile_grid
from dloral.resize import resize_frames


# ----- the reference, transcribed -----------------------------------------------------------
def reference_gaussian_weights(tile_width, tile_height, nbatches, in_channels=4):
    """`Generator_eval._gaussian_weights` (self.unet.config.in_channels stays 4 there: the
    reference swaps conv_in without updating the config)."""
    from numpy import exp, pi, sqrt

    latent_width = tile_width
    latent_height = tile_height

    var = 0.01
    midpoint = (latent_width - 1) / 2  # -1 because index goes from 0 to latent_width - 1
    x_probs = [
        exp(-(x - midpoint) * (x - midpoint) / (latent_width * latent_width) / (2 * var))
        / sqrt(2 * pi * var)
        for x in range(latent_width)
    ]
    midpoint = latent_height / 2
    y_probs = [
        exp(-(y - midpoint) * (y - midpoint) / (latent_height * latent_height) / (2 * var))
        / sqrt(2 * pi * var)
        for y in range(latent_height)
    ]

    weights = np.outer(y_probs, x_probs)
    return torch.tile(torch.tensor(weights), (nbatches, in_channels, 1, 1))


def reference_tile_offsets(h, w, tile_size, tile_overlap):
    """The grid loops of `Generator_eval.forward`: [(ofs_y, ofs_x)] in its order, tile size."""
    tile_size = min(tile_size, min(h, w))
    grid_rows = 0
    cur_x = 0
    while cur_x < w:
        cur_x = max(grid_rows * tile_size - tile_overlap * grid_rows, 0) + tile_size
        grid_rows += 1

    grid_cols = 0
    cur_y = 0
    while cur_y < h:
        cur_y = max(grid_cols * tile_size - tile_overlap * grid_cols, 0) + tile_size
        grid_cols += 1

    offsets = []
    for row in range(grid_rows):
        for col in range(grid_cols):
            if col < grid_cols - 1 or row < grid_rows - 1:
                # extract tile from input image
                ofs_x = max(row * tile_size - tile_overlap * row, 0)
                ofs_y = max(col * tile_size - tile_overlap * col, 0)
                # input tile area on total image
            if row == grid_rows - 1:
                ofs_x = w - tile_size
            if col == grid_cols - 1:
                ofs_y = h - tile_size
            offsets.append((ofs_y, ofs_x))
    return offsets, tile_size


def reference_tiled_restore(model, current, previous, current_lq, previous_lq, embeds, tile, ov):
    """The tiled branch of `Generator_eval.forward`, its CFR and UNet calls replaced by ours:
    per tile the fused latent (`enc_ctrls`, channels 4:8 of the UNet input) and the noise
    prediction are accumulated with the Gaussian weights separately, divided by the summed
    weights, and subtracted at the end (`x_denoised = final_enc_ctrl - model_pred`)."""
    b_ct, _, h, w = current.shape
    offsets, tile_size = reference_tile_offsets(h, w, tile, ov)
    tile_weights = reference_gaussian_weights(tile_size, tile_size, 1)
    noise_preds, enc_ctrls = [], []
    for ofs_y, ofs_x in offsets:
        ys, xs = slice(ofs_y, ofs_y + tile_size), slice(ofs_x, ofs_x + tile_size)
        cys = slice(ofs_y * 8, (ofs_y + tile_size) * 8)
        cxs = slice(ofs_x * 8, (ofs_x + tile_size) * 8)
        fused, aligned = model.cfr(
            current[..., ys, xs], previous[..., ys, xs], current_lq[..., cys, cxs],
            previous_lq[..., cys, cxs],
        )  # fmt: skip
        unet_in = torch.cat([aligned, fused], dim=1)
        model_out = model.unet(
            unet_in, model.timestep.expand(b_ct), encoder_hidden_states=embeds.expand(b_ct, -1, -1)
        ).sample
        noise_preds.append(model_out)
        enc_ctrls.append(unet_in[:, 4:8, :, :])
    noise_pred = torch.zeros([b_ct, 4, h, w])
    contributors = torch.zeros([b_ct, 4, h, w])
    enc_ctrl = torch.zeros([b_ct, 4, h, w])
    for i, (ofs_y, ofs_x) in enumerate(offsets):
        ys, xs = slice(ofs_y, ofs_y + tile_size), slice(ofs_x, ofs_x + tile_size)
        noise_pred[:, :, ys, xs] += noise_preds[i] * tile_weights
        enc_ctrl[:, :, ys, xs] += enc_ctrls[i] * tile_weights
        contributors[:, :, ys, xs] += tile_weights
    noise_pred /= contributors
    enc_ctrl /= contributors
    return enc_ctrl - noise_pred


# ----- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [96, 64, 45, 8])
def test_gaussian_weights_equal_the_reference(size):
    ours = gaussian_weights(size)
    theirs = reference_gaussian_weights(size, size, 1)
    assert theirs.shape == (1, 4, size, size)
    assert torch.allclose(ours, theirs[0, 0], rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "h,w,tile,overlap",
    [(180, 320, 96, 32), (90, 160, 96, 32), (96, 97, 96, 32), (135, 240, 96, 32),
     (100, 130, 96, 32), (40, 56, 32, 8), (272, 272, 96, 0), (64, 200, 96, 32)],
)  # fmt: skip
def test_tile_grid_equals_the_reference_loop(h, w, tile, overlap):
    theirs, size = reference_tile_offsets(h, w, tile, overlap)
    ours_size, ours = tile_grid(h, w, tile, overlap)
    assert ours_size == size
    assert sorted(ours) == sorted(theirs)
    covered = torch.zeros(h, w)
    for y, x in ours:
        assert 0 <= y <= h - size and 0 <= x <= w - size
        covered[y : y + size, x : x + size] = 1
    assert bool(covered.all())


def test_tiling_starts_above_one_tile_of_area():
    # the reference's test: h * w <= tile * tile runs untiled (a long thin latent too)
    assert not needs_tiling(96, 96, 96)
    assert not needs_tiling(64, 144, 96)
    assert needs_tiling(97, 96, 96)
    assert not needs_tiling(500, 500, 0)


def _real_latent(bikes_lq, h, w):
    frames = resize_frames(bikes_lq[:2], (h, w))
    return torch.cat([frames, frames.flip(-1)[:, :1]], dim=1)  # 4 channels of real texture


def test_blend_of_a_constant_latent_stays_constant():
    size, origins = tile_grid(180, 320, 96, 32)
    tiles = [torch.full((1, 4, size, size), 0.7) for _ in origins]
    out = blend(tiles, origins, 180, 320)
    assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-6)


def test_blend_of_crops_gives_back_the_latent(bikes_lq):
    latent = _real_latent(bikes_lq, 135, 240)
    size, origins = tile_grid(135, 240, 96, 32)
    assert len(origins) > 2
    tiles = [latent[..., y : y + size, x : x + size] for y, x in origins]
    assert torch.allclose(blend(tiles, origins, 135, 240), latent, atol=1e-6)


def _model(seed=0):
    model = DLoRAL(DLoRALConfig.from_dict({"seed": seed}))
    lora.randomize_lora_b(model.unet, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def _pair(model, bikes_lq, h, w):
    lq = resize_frames(bikes_lq[:2], (h, w))
    with torch.no_grad():
        z = model.encode(lq, sample=False)
        embeds = model.encode_prompt(["a bike"])
    return z[1:], z[:1], lq[1:], lq[:1], embeds


def test_tiled_equals_untiled_on_a_frame_of_one_tile(bikes_lq):
    model = _model(1)
    args = _pair(model, bikes_lq, 256, 256)  # a 32 x 32 latent: exactly one tile of 32
    with torch.no_grad():
        whole = model.restore_latent(*args)
        one_tile = restore_tiled(model.restore_latent, *args, tile=31, overlap=8)
        forced = restore_tiled(model.restore_latent, *args, tile=32, overlap=8)
    assert torch.equal(forced, whole)  # fits one tile: not tiled at all
    assert not torch.allclose(one_tile, whole, atol=1e-3)  # a 31-tile grid differs: not trivial
    # the blend of a single tile covering the latent is the identity
    single = blend([whole], [(0, 0)], 32, 32)
    assert torch.allclose(single, whole, atol=1e-6)


def test_tiled_restore_equals_the_reference_tiled_forward(bikes_lq):
    model = _model(2)
    args = _pair(model, bikes_lq, 320, 448)  # a 40 x 56 latent in 2 x 2 tiles of 32, overlap 8
    with torch.no_grad():
        ours = restore_tiled(model.restore_latent, *args, tile=32, overlap=8)
        theirs = reference_tiled_restore(model, *args, tile=32, ov=8)
        whole = model.restore_latent(*args)
    assert ours.shape == whole.shape == (1, 4, 40, 56)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, whole, atol=1e-3)  # tiles see less context: not trivial


def test_tiles_restored_together_equal_the_reference_tiled_forward(bikes_lq):
    """tile_batch stacks tiles along the batch for fewer, larger UNet calls: the same latent as
    the reference's one tile at a time, for a batch of 2 frames, with a last group shorter."""
    model = _model(3)
    lq = resize_frames(bikes_lq[:3], (320, 448))  # 2 x 2 tiles of 32 (overlap 8) per frame
    with torch.no_grad():
        z = model.encode(lq, sample=False)
        embeds = model.encode_prompt(["a bike"])
    args = (z[1:], z[:-1], lq[1:], lq[:-1], embeds)  # 2 pairs: frames 1, 2 on 0, 1
    calls = []

    def counted(*inputs):
        calls.append(inputs[0].shape[0])
        return model.restore_latent(*inputs)

    with torch.no_grad():
        theirs = reference_tiled_restore(model, *args, tile=32, ov=8)
        for tile_batch, sizes in ((1, [2] * 4), (3, [6, 2]), (4, [8]), (16, [8])):
            calls.clear()
            ours = restore_tiled(counted, *args, tile=32, overlap=8, tile_batch=tile_batch)
            assert calls == sizes  # samples per call: frames x tiles in the group
            assert torch.allclose(ours, theirs, atol=1e-5), tile_batch
