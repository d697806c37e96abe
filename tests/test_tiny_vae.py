"""The tiny profile's VAE: the hand-built start, seeded training, the file it is kept in."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import read_clip
from safetensors.torch import load_file, save_file

from dloral.model.backbone import load_tiny_vae, new_tiny_vae
from dloral.model.colorfix import color_fix
from dloral.model.tiny_vae import (
    TINY_VAE_TRAINED,
    TinyVAERecipe,
    start_as_pooling,
    train_tiny_vae,
)
from dloral.quality import psnr
from dloral.resize import bi_downsample, resize_frames


def _roundtrip(vae, x):
    """x (N, 3, H, W) in [0, 1] -> the VAE's reconstruction, colour-fixed as the pipeline does."""
    with torch.no_grad():
        out = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample.clamp(-1, 1)
    return color_fix((out + 1) / 2, x, "adain")


@pytest.fixture(scope="module")
def smooth(bikes_path):
    """Real bikes frames as the pipeline feeds them: 1/8 size, bicubic back up (256x256)."""
    gt = read_clip(bikes_path, 2, (8, 192, 256, 256), (256, 256))
    return resize_frames(bi_downsample(gt, 8), (256, 256)).clamp(0, 1)


def test_the_hand_built_start_pools_and_upsamples_and_random_weights_do_not(smooth):
    torch.manual_seed(0)
    vae = new_tiny_vae(TINY_VAE_TRAINED)
    random = new_tiny_vae(TINY_VAE_TRAINED)
    start_as_pooling(vae)
    with torch.no_grad():
        latent = vae.encode(smooth * 2 - 1).latent_dist
    # latent channels 0-2 are the 8x8 means of RGB in [-1, 1]; the norms change them < 1 %
    means = F.avg_pool2d(smooth * 2 - 1, 8)
    assert (latent.mean[:, :3] - means).abs().max() < 0.01 * means.abs().max()
    assert latent.std.max() < 0.003  # posterior std exp(-6): sampling changes nearly nothing
    good, bad = (
        psnr(_roundtrip(vae, smooth), smooth, 1.0),
        psnr(_roundtrip(random, smooth), smooth, 1.0),
    )
    assert good > 27 and bad < 15, (float(good), float(bad))


def test_training_is_seeded_and_learns_what_pooling_loses(bikes_path, smooth):
    frames = list(read_clip(bikes_path, 4, (0, 0, 272, 640), (136, 320)))
    # a gentle learning rate: in 40 steps the default 3e-4 is still recovering from its first
    # steps (28 dB here; its 400 steps end above the start, dloral.model.tiny_vae)
    recipe = TinyVAERecipe(steps=40, batch_size=3, crop=32, lr=1e-5)
    a, info = train_tiny_vae(frames, recipe)
    short = dataclasses.replace(recipe, steps=4)  # seeding shows in a few steps
    sa, sb, sc = (
        train_tiny_vae(frames, r)[0].state_dict()
        for r in (short, short, dataclasses.replace(short, seed=1))
    )
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())
    assert not all(torch.equal(v, sc[k]) for k, v in sa.items())
    assert info["steps"] == 40 and info["frames"] == 4 and info["scaling_factor"] > 0
    # the bits depend on the kernels' instruction set (README, Data): it is recorded
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    scaled = a.encode(smooth * 2 - 1).latent_dist.mean * info["scaling_factor"]
    assert 0.7 < float(scaled.detach().std()) < 1.4  # unit-variance scaled latents, as SD's 0.18215
    start = new_tiny_vae(TINY_VAE_TRAINED)
    start_as_pooling(start)
    before = psnr(_roundtrip(start, smooth), smooth, 1.0)
    after = psnr(_roundtrip(a, smooth), smooth, 1.0)
    assert after > before, (float(before), float(after))


def test_the_file_keeps_config_recipe_and_weights_and_a_foreign_one_is_named(tmp_path, bikes_lq):
    file = tmp_path / "vae.safetensors"
    info = TinyVAERecipe(steps=2, batch_size=3, crop=32).build(list(bikes_lq[:2]), file)
    loaded = load_tiny_vae(file)
    assert loaded.config.norm_num_groups == 4
    assert loaded.config.scaling_factor == pytest.approx(info["scaling_factor"])
    stored = load_file(file)
    assert all(torch.equal(v, stored[k]) for k, v in loaded.state_dict().items())

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, foreign, {"format": "something-else"})
    with pytest.raises(ValueError, match=f"{foreign}: format 'something-else'.*data prepare"):
        load_tiny_vae(foreign)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{damaged}: not a readable tiny VAE file"):
        load_tiny_vae(damaged)
    with pytest.raises(ValueError, match="at least that large"):
        train_tiny_vae([torch.rand(3, 16, 16)], TinyVAERecipe(steps=1, crop=32))
    assert json.loads(json.dumps(info)) == info  # what the manifest records is plain JSON
