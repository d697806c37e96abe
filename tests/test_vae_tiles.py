"""The reference's tiled VAE (dloral.model.vae_tiles) against a literal transcription of its
hook (tests/reference_vaehook.py), on real frames."""

import weakref

import pytest
import reference_vaehook as ref
import torch
from conftest import read_clip

from dloral.model import vae_tiles
from dloral.model.backbone import SD21_VAE
from dloral.model.vae_tiles import DECODER_PAD, Parking, VAETiles


def sd_layout_vae(seed: int = 0):
    """A random VAE of SD 2.1's layout (4 blocks, 2 resnets per encoder block, 32 groups, mid
    attention) with narrow channels: the layout the reference's hook assumes."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**SD21_VAE, "block_out_channels": (32, 32, 64, 64)}).eval()


def hooked(net, tile, is_decoder):
    """The reference's hook on `net`, as its _init_tiled_vae sets it (fast modes off)."""
    net.original_forward = net.forward
    return ref.VAEHook(
        net, tile, is_decoder, fast_decoder=False, fast_encoder=False, color_fix=False
    )


@pytest.fixture(scope="module")
def frames(bikes_path):
    """2 real bikes frames, 200x264 (a side not a multiple of 32), in [-1, 1]."""
    return read_clip(bikes_path, 2, (0, 0, 400, 528), (200, 264)) * 2 - 1


@pytest.mark.parametrize(
    "height,width,tile,pad",
    [
        (200, 264, 64, 32),
        (1080, 1920, 1024, 32),
        (720, 1280, 1024, 32),
        (2160, 3840, 1024, 32),
        (90, 160, 224, 11),
        (256, 480, 224, 11),
        (270, 480, 224, 11),
        (33, 300, 16, 11),
    ],
)
def test_split_is_the_references_grid(height, width, tile, pad):
    hook = ref.VAEHook(
        None,
        tile,
        is_decoder=pad == DECODER_PAD,
        fast_decoder=False,
        fast_encoder=False,
        color_fix=False,
    )
    boxes, cores = hook.split_tiles(height, width)
    factor = 8 if pad == DECODER_PAD else 1 / 8
    grid = vae_tiles.split(height, width, tile, pad)
    assert [[t.box[2], t.box[3], t.box[0], t.box[1]] for t in grid] == boxes
    assert [
        [int(v * factor) for v in (t.core[2], t.core[3], t.core[0], t.core[1])] for t in grid
    ] == cores


def test_tiled_encoder_is_the_references_hook_on_real_frames(frames):
    vae = sd_layout_vae()
    tiles = VAETiles(encoder=64, decoder=8)
    assert tiles.encoder_tiled(frames.shape[-2:])  # 264 > 64 + 2 x 32: a 3 x 4 grid
    with torch.no_grad():
        expected = vae.quant_conv(hooked(vae.encoder, 64, False)(frames))
        whole = vae.quant_conv(vae.encoder.original_forward(frames))
        ours = vae_tiles.encode(vae, frames, tiles).parameters
    assert ours.shape == expected.shape == whole.shape
    err = (ours - expected).abs().max().item()
    assert err < 1e-4 * expected.abs().max().item(), err
    # the tiles make a difference the test can see: not the whole frame's encoding
    assert (whole - expected).abs().max().item() > 100 * err


def test_tiled_decoder_is_the_references_hook_on_real_frames(frames):
    vae = sd_layout_vae()
    tiles = VAETiles(encoder=64, decoder=8)
    with torch.no_grad():
        z = vae.encode(frames).latent_dist.mean  # 25 x 33 latent positions
        assert tiles.decoder_tiled(z.shape[-2:])  # 33 > 8 + 2 x 11
        expected = hooked(vae.decoder, 8, True)(vae.post_quant_conv(z))
        whole = vae.decoder.original_forward(vae.post_quant_conv(z))
        ours = vae_tiles.decode(vae, z, tiles)
    assert ours.shape == expected.shape == (2, 3, 200, 264)
    err = (ours - expected).abs().max().item()
    assert err < 1e-4 * expected.abs().max().item(), err
    assert (whole - expected).abs().max().item() > 100 * err


def test_tiled_encoder_is_the_references_hook_on_sides_not_a_multiple_of_8(bikes_path):
    """The tiles' areas differ from layer to layer in proportion only on a grid of 8: each
    GroupNorm weighs them by their area there, and the latent is (H // 8, W // 8)."""
    frames = read_clip(bikes_path, 2, (0, 0, 408, 540), (204, 270)) * 2 - 1
    vae = sd_layout_vae()
    with torch.no_grad():
        expected = vae.quant_conv(hooked(vae.encoder, 64, False)(frames))
        ours = vae_tiles.encode(vae, frames, VAETiles(encoder=64, decoder=8)).parameters
    assert ours.shape == expected.shape == (2, 8, 25, 33)
    err = (ours - expected).abs().max().item()
    assert err < 1e-4 * expected.abs().max().item(), err


def test_in_bf16_the_tiles_stay_as_close_to_fp32_as_the_references_do(frames):
    """Statistics and normalisation in fp32 (the reference: in the activations' dtype): in
    bf16 both are off the fp32 result by bf16's rounding, ours no more than the reference's.
    On a 136x168 crop (3x3 tiles of 64): CPU convolutions in bf16 are slow, 16 s here against
    72 s for the whole 200x264 frame (4 x 5 tiles), where the ratio was 0.96 (0.83 here)."""
    x = frames[:1, :, :136, :168]
    with torch.no_grad():
        fp32 = sd_layout_vae()
        exact = fp32.quant_conv(hooked(fp32.encoder, 64, False)(x))
        low = sd_layout_vae().to(torch.bfloat16)
        ref_low = low.quant_conv(hooked(low.encoder, 64, False)(x.bfloat16())).float()
        ours_low = vae_tiles.encode(low, x.bfloat16(), VAETiles(64, 8)).parameters.float()
    scale = exact.abs().max()
    ref_err = float((ref_low - exact).abs().max() / scale)
    ours_err = float((ours_low - exact).abs().max() / scale)
    assert 0 < ref_err < 0.1
    assert ours_err <= 1.25 * ref_err, (ours_err, ref_err)


def test_a_frame_within_one_tile_runs_whole(frames):
    vae = sd_layout_vae()
    tiles = VAETiles(encoder=200, decoder=11)  # 264 <= 200 + 64; 33 <= 11 + 22
    with torch.no_grad():
        z = vae.encode(frames).latent_dist.mean
        assert torch.equal(vae_tiles.encode(vae, frames, tiles).mean, z)
        assert torch.equal(vae_tiles.decode(vae, z, tiles), vae.decode(z).sample)


class Fp64Host:
    """Parking whose 'host' is fp64 (fp32 -> fp64 -> fp32 is exact): the tensors it was handed
    on the 'device' must be gone (no reference left anywhere) before any tile comes back."""

    def __init__(self):
        self.handed: list[weakref.ref] = []
        self.parks = self.unparks = 0
        self.most_left = 0

    def park(self, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.float32
        self.parks += 1
        self.handed.append(weakref.ref(t))
        return t.double()

    def unpark(self, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.float64, "a tile brought back that was not parked"
        self.unparks += 1
        self.most_left = max(self.most_left, sum(r() is not None for r in self.handed))
        return t.float()

    def parking(self) -> Parking:
        return Parking(self.park, self.unpark)


@pytest.mark.parametrize("network", ["encoder", "decoder"])
def test_tiles_waiting_on_the_host_free_the_device_and_change_no_number(frames, network):
    """The reference keeps the waiting tiles in host memory. Parked, a tile leaves nothing on
    the device (every tensor it held there is freed before the next tile runs: one tile on the
    device at a time), and the result is the very same."""
    vae = sd_layout_vae()
    with torch.no_grad():
        z = vae.encode(frames).latent_dist.mean
        if network == "encoder":
            steps, net, x, tile, pad, factor = (
                vae_tiles._encoder,
                vae.encoder,
                frames,
                64,
                32,
                1 / 8,
            )
        else:
            steps, net, x, tile, pad, factor = vae_tiles._decoder, vae.decoder, z, 8, 11, 8
        grid = vae_tiles.split(x.shape[-2], x.shape[-1], tile, pad)
        host = Fp64Host()
        parked = vae_tiles.run_in_step(steps, net, x, grid, factor, host.parking())
        on_device = vae_tiles.run_in_step(steps, net, x, grid, factor)
    assert len(grid) >= 2  # encoder 3 x 4, decoder 1 x 2
    assert torch.equal(parked, on_device)
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    blocks = sum(isinstance(m, ResnetBlock2D | Attention) for m in net.modules())
    # every tile but the one at the turn waits parked at each GroupNorm, and every tile's
    # residuals wait parked from the block's input to its sum (the reference's way); all return
    assert host.parks == norms * (len(grid) - 1) + blocks * len(grid)
    assert host.unparks == host.parks
    assert host.most_left == 0


def test_host_parking_copies_out_and_back_exactly(frames):
    host = Parking.host(torch.device("cpu"))  # a CUDA device pins and does not wait
    for t in (frames, frames.to(memory_format=torch.channels_last), frames.bfloat16()):
        parked = host.park(t)
        assert parked.data_ptr() != t.data_ptr() and parked.stride() == t.stride()
        assert torch.equal(host.unpark(parked), t)


def test_tiles_wait_on_the_host_only_off_a_cpu():
    assert VAETiles().parking(torch.device("cuda")) is None
    assert VAETiles(wait_on="host").parking(torch.device("cpu")) is None  # the same memory
    assert isinstance(VAETiles(wait_on="host").parking(torch.device("cuda", 1)), Parking)
    with pytest.raises(ValueError, match="wait on one of"):
        VAETiles(wait_on="disk")
