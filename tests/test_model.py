import pytest
import torch

from dloral.model import lora, vae_tiles
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.model.pipeline import UpscaleOptions, VideoUpscaler
from dloral.model.vae_tiles import VAETiles

CPU = torch.device("cpu")


def _model(seed=0, **cfg) -> DLoRAL:
    model = DLoRAL(DLoRALConfig.from_dict({"seed": seed, **cfg}))
    lora.randomize_lora_b(model.unet, generator=torch.Generator().manual_seed(seed))
    return model


def _upscale(model, frames, **opts):
    opts = {"process_size": 64, **opts}
    up = VideoUpscaler(model, CPU, options=UpscaleOptions(**opts))
    return torch.stack([f for _, f in up.upscale((f"{i}", f) for i, f in enumerate(frames))])


@pytest.mark.parametrize("scale,size", [(4, (48, 64)), (2, (30, 44)), (4, (13, 21))])
def test_output_is_scale_times_input(scale, size):
    frames = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(0))
    out = _upscale(_model(), frames, scale=scale)
    assert out.shape == (3, 3, size[0] * scale, size[1] * scale)
    assert 0 <= float(out.min()) and float(out.max()) <= 1


def test_small_inputs_are_processed_at_process_size_and_resized_back():
    up = VideoUpscaler(_model(), CPU, options=UpscaleOptions(scale=4, process_size=512))
    # 48 x 64 is first enlarged to 128 x int(128 / 48 * 64) = 128 x 170 (test_DLoRAL.py)
    assert up.enlarged((48, 64)) == (128, 170)
    assert up.geometry((48, 64)) == ((512, 680), (192, 256))
    assert up.geometry((180, 320)) == ((720, 1280), (720, 1280))


def test_seeded_runs_are_identical_and_seeds_matter(bikes_lq):
    a = _upscale(_model(seed=3), bikes_lq[:3], seed=7)
    b = _upscale(_model(seed=3), bikes_lq[:3], seed=7)
    c = _upscale(_model(seed=3), bikes_lq[:3], seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batching_does_not_change_results(bikes_lq):
    model = _model()
    one = _upscale(model, bikes_lq[:5], batch_size=1, sample_latent=False)
    three = _upscale(model, bikes_lq[:5], batch_size=3, sample_latent=False)
    assert torch.allclose(one, three, atol=5e-4)  # batched GEMMs round differently


def test_merged_model_equals_unmerged(bikes_lq):
    model = _model()
    args = _pair_inputs(model, bikes_lq)
    with torch.no_grad():
        before = model.restore_latent(*args)
        model.merge_lora()
        assert lora.is_merged(model.unet)
        after = model.restore_latent(*args)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    assert not torch.allclose(before, args[0], atol=1e-3)  # the step does something


def _pair_inputs(model, frames):
    lq = frames[:2]
    lq = torch.nn.functional.interpolate(lq, scale_factor=4, mode="bicubic").clamp(0, 1)
    with torch.no_grad():
        z = model.encode(lq, sample=False)
        embeds = model.encode_prompt([""])
    return z[1:], z[:1], lq[1:], lq[:1], embeds


def test_lora_adapters_change_the_output(bikes_lq):
    model = _model()
    args = _pair_inputs(model, bikes_lq)
    with torch.no_grad():
        both = model.restore_latent(*args)
        lora.set_active(model.unet, ["consistency"])
        consistency_only = model.restore_latent(*args)
        lora.set_active(model.unet, [])
        plain = model.restore_latent(*args)
    assert not torch.allclose(both, consistency_only, atol=1e-4)
    assert not torch.allclose(consistency_only, plain, atol=1e-4)


@pytest.mark.parametrize("variant", ["full", "no_gate", "off"])
def test_each_cfr_variant_runs(variant, bikes_lq):
    out = _upscale(_model(cfr={"variant": variant}), bikes_lq[:3], sample_latent=False)
    assert out.shape == (3, 3, 192, 256) and torch.isfinite(out).all()


def test_off_bypasses_cfr_and_frames_stay_independent(bikes_lq, monkeypatch):
    off = _model(cfr={"variant": "off"})
    monkeypatch.setattr(off.cfr, "forward", lambda *a, **k: pytest.fail("CFR called when off"))
    frames = bikes_lq[:2].clone()
    other = frames.clone()
    other[0] = bikes_lq[5]  # change only the previous frame
    a = _upscale(off, frames, sample_latent=False, color_fix="none")
    b = _upscale(off, other, sample_latent=False, color_fix="none")
    assert torch.allclose(a[1], b[1], atol=1e-6)

    full = _model(cfr={"variant": "full"})
    with torch.no_grad():  # make retrieval strong enough to matter for this check
        full.cfr.cross_attn_module.proj_out.weight.mul_(1e3)
    a = _upscale(full, frames, sample_latent=False, color_fix="none")
    b = _upscale(full, other, sample_latent=False, color_fix="none")
    assert not torch.allclose(a[1], b[1], atol=1e-4)


def _grads_after_step(model, bikes_lq, stage):
    model.set_stage(stage)
    model.zero_grad(set_to_none=True)
    args = _pair_inputs(model, bikes_lq)
    model.restore_latent(*args).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "stage,trained,frozen",
    [
        ("consistency", "consistency", "detail"),
        ("detail", "detail", "consistency"),
    ],
)
def test_gradients_reach_only_the_trained_adapter(stage, trained, frozen, bikes_lq):
    model = _model()
    grads = _grads_after_step(model, bikes_lq, stage)
    lora_t = [n for n in grads if f".{trained}." in n and "lora_" in n]
    lora_f = [n for n in grads if f".{frozen}." in n and "lora_" in n]
    assert lora_t and lora_f
    assert all(grads[n] is not None for n in lora_t)
    assert sum(float(grads[n].abs().sum()) for n in lora_t) > 0
    assert all(grads[n] is None for n in lora_f)
    cfr = [n for n in grads if n.startswith("cfr.cross_attn_module.")]
    if stage == "consistency":
        assert all(grads[n] is not None for n in cfr)
    else:
        assert all(grads[n] is None for n in cfr)
    assert all(grads[n] is None for n in grads if n.startswith("cfr.spynet."))  # as the reference
    assert all(grads[n] is None for n in grads if n.startswith(("vae.", "text_encoder.")))
    base = [n for n in grads if n.startswith("unet.") and "lora_" not in n and "conv_in" not in n]
    assert all(grads[n] is None for n in base)


def test_training_after_merge_is_refused():
    model = _model()
    model.merge_lora()
    with pytest.raises(RuntimeError, match="merged"):
        model.set_stage("detail")


def test_pipeline_streams_frames(bikes_lq):
    pulled = []

    def source():
        for i, f in enumerate(bikes_lq):
            pulled.append(i)
            yield f"{i}", f

    up = VideoUpscaler(_model(), CPU, options=UpscaleOptions(process_size=64, batch_size=2))
    it = up.upscale(source())
    next(it)
    assert len(pulled) == 2  # the first output came after one batch, not the whole clip


def test_config_rejects_unknown_keys():
    with pytest.raises(KeyError, match="model.cfr.topkk"):
        DLoRALConfig.from_dict({"cfr": {"topkk": 3}})
    with pytest.raises(KeyError, match="model.rank"):
        DLoRALConfig.from_dict({"rank": 3})


def make_counting_tagger(device):
    """A tagger factory as users write one for RAM; counts its calls."""

    def tag(frame):
        tag.calls += 1
        assert frame.shape[0] == 3 and float(frame.max()) <= 1.0
        return "bike, street"

    tag.calls = 0
    return tag


def test_tagger_prompt_is_built_once_per_clip(bikes_lq):
    from dloral.model.prompts import PromptSource, load_tagger

    tagger = load_tagger("test_model:make_counting_tagger", CPU)
    source = PromptSource("tagger", "high quality", tagger)
    model = _model()
    seen = []
    original = model.encode_prompt
    model.encode_prompt = lambda texts: seen.append(texts) or original(texts)
    up = VideoUpscaler(
        model, CPU, options=UpscaleOptions(process_size=64, batch_size=2), prompt=source
    )
    list(up.upscale((f"{i}", f) for i, f in enumerate(bikes_lq[:5])))
    assert tagger.calls == 1
    assert seen == [["bike, street, high quality,"]]


def test_tiled_vae_decodes_in_tiles(bikes_lq):
    model = _model()
    calls = []
    decoder_forward = model.vae.decoder.forward
    model.vae.decoder.forward = lambda *a, **k: calls.append(a[0].shape) or decoder_forward(*a, **k)
    out = _upscale(model, bikes_lq[:2], tile=64, batch_size=2)
    assert out.shape == (2, 3, 192, 256) and torch.isfinite(out).all()
    assert len(calls) > 1 and all(s[-1] <= 64 // 8 for s in calls)  # tiles, not the full frame


def _reference_vae_hook_tiles(h: int, w: int, tile_size: int, pad: int) -> bool:
    """Literal condition: yjsunnn/DLoRAL@40c1308 src/my_utils/vaehook.py `VAEHook.__call__`
    (pad 11 on the decoder, 32 on the encoder; test_DLoRAL.py's --vae_decoder_tiled_size 224,
    --vae_encoder_tiled_size 1024): True where it tiles."""
    if max(h, w) <= pad * 2 + tile_size:
        return False  # "the input size is tiny and unnecessary to tile"
    return True


def _grids(monkeypatch) -> list[tuple[str, int]]:
    """(network, tiles) of every tiled VAE pass from now on."""
    grids = []
    run = vae_tiles.run_in_step

    def spy(steps, net, x, tiles, factor, parking=None):
        grids.append((steps.__name__.strip("_"), len(tiles)))
        return run(steps, net, x, tiles, factor, parking)

    monkeypatch.setattr(vae_tiles, "run_in_step", spy)
    return grids


def test_default_vae_tiles_where_the_references_tiled_vae_does(bikes_lq, monkeypatch):
    # CFR off: its retrieval over 96x96 latent tiles (quadratic in the tile's area) took 23 of
    # the 28 s each upscale below took on a CPU, and the VAE's tiles are what is checked here
    model = _model(cfr={"variant": "off"})
    up = VideoUpscaler(model, CPU, options=UpscaleOptions())  # the default tiling
    assert up.vae_tiles == VAETiles(encoder=1024, decoder=224)
    grids = _grids(monkeypatch)
    with torch.no_grad():
        for side in (245, 246, 247, 256):
            grids.clear()
            model.decode(torch.zeros(1, 4, side, 8), tiles=up.vae_tiles)
            assert bool(grids) == _reference_vae_hook_tiles(side, 8, 224, 11), side
        for side in (1088, 1096):
            grids.clear()
            model.encode(torch.zeros(1, 3, 64, side), sample=False, tiles=up.vae_tiles)
            assert bool(grids) == _reference_vae_hook_tiles(64, side, 1024, 32), side
    # a 280x200 frame: model input 1120x800, encoded in two tiles (1120 > 1088), its latent
    # (140 x 100, restored in latent tiles) decoded whole; close to the whole frame's output
    lq = torch.nn.functional.interpolate(bikes_lq[:1], size=(200, 280), mode="area")
    grids.clear()
    out = _upscale(model, lq, batch_size=1)
    assert out.shape == (1, 3, 800, 1120)
    assert grids == [("encoder", 2)]
    whole = _upscale(model, lq, batch_size=1, tile=0)
    assert grids == [("encoder", 2)]
    mse = float(((out - whole) ** 2).mean())
    assert 0 < mse < 10 ** (-35 / 10), mse  # within 35 dB of the whole frame's


@pytest.mark.parametrize("tile", [1920, 768])
def test_vae_tiles_keep_the_frames_grid(tile, bikes_lq):
    """diffusers' tiling is exact in size and place only for tiles of a multiple of 32 pixels
    (1968 gave 2052 pixels for a 256-latent side, shifted 4 pixels past each seam): a tiled
    encode and decode keep the sizes and stay close to the whole frame's."""
    model = _model()
    wide = torch.nn.functional.interpolate(bikes_lq[:1], size=(64, 4096 // 4), mode="area")
    frame = torch.nn.functional.interpolate(wide, scale_factor=4, mode="bicubic").clamp(0, 1)
    up = VideoUpscaler(model, CPU, options=UpscaleOptions(tile=tile))
    with torch.no_grad():
        tiled_z = model.encode(frame, sample=False)
        tiled_x = model.decode(tiled_z)
        up._vae_tiling(0)
        whole_z = model.encode(frame, sample=False)
        whole_x = model.decode(whole_z)
    assert tiled_z.shape == whole_z.shape == (1, 4, 32, 512)
    assert tiled_x.shape == whole_x.shape == (1, 3, 256, 4096)
    # per-tile GroupNorm moves values a little (latents 0.4% (1920) and 0.8% (768) of their mean
    # magnitude here); a shifted grid would move them far more
    assert float((tiled_z - whole_z).abs().mean()) < 0.02 * float(whole_z.abs().mean())
    assert float((tiled_x - whole_x).abs().mean()) < 0.02  # measured: 0.005 (1920), 0.009 (768)
    with pytest.raises(ValueError, match="multiple of 32"):
        UpscaleOptions(tile=1968)


def _reference_widen_conv_in(unet, out_channels):
    """Literal: yjsunnn/DLoRAL@40c1308 src/DLoRAL_model.py `initialize_unet` (its 320 output
    channels are the full UNet's; the tiny one has `out_channels`)."""
    from torch import nn

    # reformulate the conv_in in unet
    conv_in = nn.Conv2d(8, out_channels, kernel_size=3, padding=1)
    conv_in.weight.data[:, 0:4, ...] = unet.conv_in.weight.data
    conv_in.weight.data[:, 4:8, ...] = unet.conv_in.weight.data

    unet.conv_in = conv_in


def test_conv_in_bias_random_is_the_reference_widening():
    import copy

    from dloral.model.backbone import build_backbone
    from dloral.model.dloral import widen_conv_in

    unet = build_backbone("tiny", None, False, 0).unet
    pretrained_bias = unet.conv_in.bias.detach().clone()
    ours, ref, kept = (copy.deepcopy(unet) for _ in range(3))
    torch.manual_seed(5)
    widen_conv_in(ours, bias="random")
    torch.manual_seed(5)
    _reference_widen_conv_in(ref, unet.conv_in.out_channels)
    assert torch.equal(ours.conv_in.weight, ref.conv_in.weight)
    assert torch.equal(ours.conv_in.bias, ref.conv_in.bias)  # the new conv's own random init
    assert not torch.allclose(ours.conv_in.bias, pretrained_bias)
    widen_conv_in(kept)  # the default keeps the pretrained bias
    assert torch.equal(kept.conv_in.bias, pretrained_bias)
    assert torch.equal(kept.conv_in.weight, ref.conv_in.weight)

    # through the model config: only the conv_in bias differs
    a = DLoRAL(DLoRALConfig()).state_dict()
    b = DLoRAL(DLoRALConfig(conv_in_bias="random")).state_dict()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == ["unet.conv_in.base_layer.bias"]
    with pytest.raises(ValueError, match="conv_in_bias"):
        DLoRALConfig(conv_in_bias="zero")
