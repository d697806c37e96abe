"""The pipeline's reference switches against literal transcriptions of the reference's test
script (yjsunnn/DLoRAL 40c1308, src/test_DLoRAL.py), on real frames: first frame (no output for
frame 0), LANCZOS resize to a multiple of 8, the DAPE prompt format, latent and VAE tiling."""

import numpy as np
import pytest
import torch
from PIL import Image

from dloral.model import lora
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.model.pipeline import UpscaleOptions, VideoUpscaler
from dloral.model.prompts import PromptSource

CPU = torch.device("cpu")


def _model(seed=0) -> DLoRAL:
    model = DLoRAL(DLoRALConfig.from_dict({"seed": seed}))
    lora.randomize_lora_b(model.unet, generator=torch.Generator().manual_seed(seed))
    return model


def _run(model, frames, **opts):
    up = VideoUpscaler(model, CPU, options=UpscaleOptions(**{"process_size": 64, **opts}))
    out = list(up.upscale((f"{i:04d}.png", f) for i, f in enumerate(frames)))
    return [n for n, _ in out], torch.stack([f for _, f in out]) if out else None


# ----- first frame ----------------------------------------------------------------------------
def reference_pairs(n_frames):
    """The frame loop of test_DLoRAL.py: which frames each forward sees, which it writes."""
    frame_num = 2
    frame_overlap = 1
    input_image_batch = list(range(n_frames))
    pairs = []
    for input_image_index in range(0, len(input_image_batch), (frame_num - frame_overlap)):
        if input_image_index + frame_num - 1 >= len(input_image_batch):
            end = len(input_image_batch) - input_image_index
            start = 0
        else:
            start = 0
            end = frame_num
        input_frames = []
        for input_frame_index in range(start, end):
            real_idx = input_image_index + input_frame_index
            if real_idx < 0 or real_idx >= len(input_image_batch):
                continue
            input_frames.append(input_image_batch[real_idx])
        if len(input_frames) == 1:
            break
        src_idx = input_image_index + start + 1
        if src_idx < 0 or src_idx >= len(input_image_batch):
            src_idx = max(0, min(src_idx, len(input_image_batch) - 1))
        pairs.append((tuple(input_frames), src_idx))
    return pairs


@pytest.mark.parametrize("batch_size", [2, 3])
def test_first_frame_skip_writes_what_the_reference_writes(bikes_lq, batch_size):
    model = _model(1)
    frames = bikes_lq[:5]
    opts = {"batch_size": batch_size, "sample_latent": False}
    names, skip = _run(model, frames, first_frame="skip", **opts)
    pairs = reference_pairs(len(frames))
    assert pairs == [((0, 1), 1), ((1, 2), 2), ((2, 3), 3), ((3, 4), 4)]
    assert names == [f"{src:04d}.png" for _, src in pairs]
    # frame t is restored from the pair (t-1, t) as with `self`, which differs only at frame 0
    self_names, self_out = _run(model, frames, **opts)
    assert self_names == [f"{i:04d}.png" for i in range(5)]
    assert torch.allclose(skip, self_out[1:], atol=5e-4)  # batches hold other frames


def test_first_frame_skip_of_a_single_frame_writes_nothing(bikes_lq):
    assert reference_pairs(1) == []
    names, out = _run(_model(), bikes_lq[:1], first_frame="skip")
    assert names == [] and out is None


# ----- size to a multiple of 8 -----------------------------------------------------------------
def reference_model_input(image: Image.Image, upscale: int, process_size: int) -> Image.Image:
    """test_DLoRAL.py's preprocessing of one frame (the upscaled, multiple-of-8 model input)."""
    input_image = image
    ori_width, ori_height = input_image.size
    rscale = upscale
    if ori_width < process_size // rscale or ori_height < process_size // rscale:
        scale = (process_size // rscale) / min(ori_width, ori_height)
        input_image = input_image.resize((int(scale * ori_width), int(scale * ori_height)))
    input_image = input_image.resize((input_image.size[0] * rscale, input_image.size[1] * rscale))
    new_width = input_image.width - input_image.width % 8
    new_height = input_image.height - input_image.height % 8
    input_image = input_image.resize((new_width, new_height), Image.LANCZOS)
    return input_image


def test_a_small_frame_is_enlarged_in_two_resizes_as_the_references(bikes_lq):
    """A frame whose short side is below process_size // scale (here 25 < 128 // 4) is first
    enlarged to that short side, then upsampled x4: 25 x 45 -> 32 x 57 -> 128 x 228 -> LANCZOS
    to 128 x 224 (one resize to 128 x 230 would be another geometry and another resample)."""
    frame = bikes_lq[0][:, :25, :45]
    uint8 = (frame * 255).round() / 255
    pil = Image.fromarray((uint8.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    theirs = reference_model_input(pil, 4, 128)
    theirs = torch.from_numpy(np.array(theirs)).permute(2, 0, 1).float() / 255

    up = VideoUpscaler(_model(), CPU, options=UpscaleOptions(process_size=128, size_to_8="lanczos"))
    proc, out = up.geometry((25, 45))
    assert (proc, out) == ((128, 228), (100, 180))
    _, model_input = up._prepare(uint8[None], proc)
    assert tuple(model_input.shape[-2:]) == (128, 224) == tuple(theirs.shape[-2:])
    # the reference rounds to uint8 after each of its three resizes; we keep floats
    assert (model_input[0] - theirs).abs().max() <= 3 / 255
    assert (model_input[0] - theirs).abs().mean() < 0.5 / 255
    # and the output is resized back to the input x 4, as theirs when it enlarged
    _, sr = _run(_model(), bikes_lq[:2, :, :25, :45], process_size=128, size_to_8="lanczos")
    assert sr.shape == (2, 3, 100, 180)


def test_lanczos_resize_to_8_is_the_reference_preprocessing(bikes_lq):
    frame = bikes_lq[0][:, :45, :61]  # x4 = 180 x 244: not a multiple of 8
    uint8 = (frame * 255).round() / 255  # what the reference reads from a PNG
    pil = Image.fromarray((uint8.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    theirs = reference_model_input(pil, 4, 64)
    theirs = torch.from_numpy(np.array(theirs)).permute(2, 0, 1).float() / 255

    up = VideoUpscaler(_model(), CPU, options=UpscaleOptions(process_size=64, size_to_8="lanczos"))
    proc, out = up.geometry((45, 61))
    target, model_input = up._prepare(uint8[None], proc)
    assert up.model_size(proc) == (176, 240) == tuple(theirs.shape[-2:])
    assert torch.equal(target, model_input)  # colour fix aims at the resized frame, as theirs
    # the reference rounds to uint8 after each resize; we keep floats
    assert (model_input[0] - theirs).abs().max() <= 3 / 255
    assert (model_input[0] - theirs).abs().mean() < 0.5 / 255

    pad = VideoUpscaler(_model(), CPU, options=UpscaleOptions(process_size=64))
    assert pad.model_size(proc) == (184, 248)
    _, lanczos_out = _run(_model(), bikes_lq[:2, :, :45, :61], size_to_8="lanczos")
    _, pad_out = _run(_model(), bikes_lq[:2, :, :45, :61])
    assert lanczos_out.shape == pad_out.shape == (2, 3, 180, 244)  # resized back to LQ x 4
    assert not torch.allclose(lanczos_out, pad_out, atol=1e-3)


# ----- prompt ------------------------------------------------------------------------------------
def test_tagger_prompt_is_the_reference_dape_format(bikes_lq):
    class Args:
        prompt = "clean, high-resolution, 8k"

    def get_validation_prompt(args, captions):  # test_DLoRAL.py, RAM/DAPE inference replaced
        validation_prompt = f"{captions[0]}, {args.prompt},"
        return validation_prompt

    source = PromptSource("tagger", Args.prompt, lambda frame: "bike, street, tree")
    assert source.prompt_for(bikes_lq[0]) == get_validation_prompt(Args, ["bike, street, tree"])


# ----- tiling in the pipeline --------------------------------------------------------------------
def _unet_sizes(model):
    sizes = []
    forward = model.unet.forward
    model.unet.forward = lambda x, *a, **k: sizes.append(tuple(x.shape[-2:])) or forward(x, *a, **k)
    return sizes


def test_frame_of_one_latent_tile_is_not_tiled(bikes_lq):
    model = _model(2)
    sizes = _unet_sizes(model)
    _, default = _run(model, bikes_lq[:2], sample_latent=False)  # latent 24 x 32 < 96 x 96
    _, off = _run(model, bikes_lq[:2], sample_latent=False, latent_tile=0)
    assert torch.equal(default, off)
    assert set(sizes) == {(24, 32)}


def test_large_latent_runs_unet_on_tiles_and_the_vae_on_tiles_of_its_own(bikes_lq):
    model = _model(2)
    sizes = _unet_sizes(model)
    decoded = []
    decoder_forward = model.vae.decoder.forward
    model.vae.decoder.forward = lambda z, *a, **k: (
        decoded.append(tuple(z.shape[-2:])) or decoder_forward(z, *a, **k)
    )
    _, tiled = _run(model, bikes_lq[:2], sample_latent=False, latent_tile=16, latent_overlap=4)
    assert set(sizes) == {(16, 16)} and len(sizes) == 6  # a 2 x 3 grid over 24 x 32
    assert decoded == [(24, 32)]  # the reference's tiled VAE (the default) runs it whole
    decoded.clear()
    _run(model, bikes_lq[:2], sample_latent=False, latent_tile=16, latent_overlap=4, tile=128)
    assert len(decoded) > 1 and max(max(s) for s in decoded) <= 16  # VAE tiled at 8 x 16 px
    sizes.clear()
    _, whole = _run(model, bikes_lq[:2], sample_latent=False, latent_tile=0)
    assert sizes == [(24, 32)]
    assert tiled.shape == whole.shape and not torch.allclose(tiled, whole, atol=1e-3)


def test_tiling_options_are_checked():
    with pytest.raises(ValueError, match="latent_overlap"):
        UpscaleOptions(latent_tile=32, latent_overlap=32)
    with pytest.raises(ValueError, match="first_frame"):
        UpscaleOptions(first_frame="drop")
    with pytest.raises(ValueError, match="size_to_8"):
        UpscaleOptions(size_to_8="crop")
    assert UpscaleOptions(latent_tile=0, latent_overlap=500).latent_tile == 0
