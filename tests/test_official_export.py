"""export_official read back by a literal transcription of the reference's loader
(yjsunnn/DLoRAL 40c1308: src/DLoRAL_model.py `Generator_eval.__init__` and
`load_ckpt_from_state_dict` ~480-540, with `--load_cfr`; the CFR module tree of
src/cross_frame_retrieval/cfr_main.py `CFR_model` and uncertainty_topk.py
`CrossFrameAbsoluteAttn`, mmcv's ConvModule replaced by a module holding `conv` as mmcv's does)."""

import reference_cfr
import torch
import torch.nn as nn
from conftest import trained_model
from diffusers.utils.peft_utils import set_weights_and_activate_adapters
from peft import LoraConfig

from dloral.model.backbone import build_backbone
from dloral.model.checkpoint import export_official


# ----- the reference's CFR module tree, transcribed (parameters only; forward is not needed);
# spynet and cross_attn_module are reference_cfr.py's, whose forward the CFR parity test runs
def make_layer(block, num_blocks, **kwarg):
    layers = []
    for _ in range(num_blocks):
        layers.append(block(**kwarg))
    return nn.Sequential(*layers)


class ResidualBlockNoBN(nn.Module):
    def __init__(self, mid_channels: int = 64, res_scale: float = 1.0):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(mid_channels, mid_channels, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, 1, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)


class ResidualBlocksWithInputConv(nn.Module):
    def __init__(self, in_channels, out_channels=64, num_blocks=30):
        super().__init__()
        main = []
        main.append(nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=True))
        main.append(nn.LeakyReLU(negative_slope=0.1, inplace=True))
        main.append(make_layer(ResidualBlockNoBN, num_blocks, mid_channels=out_channels))
        self.main = nn.Sequential(*main)


class CFR_model(reference_cfr.CFR_model):  # noqa: N801 (the reference's name)
    """The reference's whole CFR_model tree: reference_cfr's (spynet, cross_attn_module) and the
    modules its forward never runs, which its loader with --load_cfr still copies."""

    def __init__(
        self, mid_channels=64, num_blocks=7, is_low_res_input=True, spynet_pretrained=None
    ):
        super().__init__(
            mid_channels=mid_channels,
            num_blocks=num_blocks,
            is_low_res_input=is_low_res_input,
            spynet_pretrained=spynet_pretrained,
        )
        self.feat_extract = ResidualBlocksWithInputConv(4, mid_channels, 5)
        self.weight_predict = ResidualBlocksWithInputConv(3, mid_channels, 5)
        self.weight_predict_final = ResidualBlocksWithInputConv(mid_channels, 1, 1)
        self.reconstruction_feat = ResidualBlocksWithInputConv(mid_channels, mid_channels, 5)
        self.conv_hr = nn.Conv2d(64, 64, 3, 1, 1)
        self.conv_last = nn.Conv2d(64, 4, 3, 1, 1)
        self.img_upsample = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=True)


class ReferenceGeneratorEval:
    """`Generator_eval.__init__` (UNet with the widened conv_in, CFR_model) and
    `load_ckpt_from_state_dict`, with the tiny profile's UNet in place of SD 2.1's."""

    def __init__(self, unet, sd, load_cfr):
        self.args = type("Args", (), {"load_cfr": load_cfr})()
        self.unet = unet
        # reformulate the conv_in in unet
        conv_in = nn.Conv2d(8, unet.conv_in.out_channels, kernel_size=3, padding=1)
        conv_in.weight.data[:, 0:4, ...] = self.unet.conv_in.weight.data
        conv_in.weight.data[:, 4:8, ...] = self.unet.conv_in.weight.data
        self.unet.conv_in = conv_in

        self.cfr_main_net = CFR_model(
            mid_channels=64, num_blocks=7, is_low_res_input=False, spynet_pretrained=None
        )
        self.load_ckpt_from_state_dict(sd)

    # fmt: off
    def load_ckpt_from_state_dict(self, sd):
        # load unet lora
        self.lora_conf_encoder_quality = LoraConfig(
            r=sd["lora_rank_unet_quality"], init_lora_weights="gaussian",
            target_modules=sd["unet_lora_encoder_modules_quality"])
        self.lora_conf_decoder_quality = LoraConfig(
            r=sd["lora_rank_unet_quality"], init_lora_weights="gaussian",
            target_modules=sd["unet_lora_decoder_modules_quality"])
        self.lora_conf_others_quality = LoraConfig(
            r=sd["lora_rank_unet_quality"], init_lora_weights="gaussian",
            target_modules=sd["unet_lora_others_modules_quality"])

        self.lora_conf_encoder_consistency = LoraConfig(
            r=sd["lora_rank_unet_consistency"], init_lora_weights="gaussian",
            target_modules=sd["unet_lora_encoder_modules_consistency"])
        self.lora_conf_decoder_consistency = LoraConfig(
            r=sd["lora_rank_unet_consistency"], init_lora_weights="gaussian",
            target_modules=sd["unet_lora_decoder_modules_consistency"])
        self.lora_conf_others_consistency = LoraConfig(
            r=sd["lora_rank_unet_consistency"], init_lora_weights="gaussian",
            target_modules=sd["unet_lora_others_modules_consistency"])

        self.unet.add_adapter(
            self.lora_conf_encoder_quality, adapter_name="default_encoder_quality")
        self.unet.add_adapter(
            self.lora_conf_decoder_quality, adapter_name="default_decoder_quality")
        self.unet.add_adapter(self.lora_conf_others_quality, adapter_name="default_others_quality")

        self.unet.add_adapter(
            self.lora_conf_encoder_consistency, adapter_name="default_encoder_consistency")
        self.unet.add_adapter(
            self.lora_conf_decoder_consistency, adapter_name="default_decoder_consistency")
        self.unet.add_adapter(
            self.lora_conf_others_consistency, adapter_name="default_others_consistency")

        for n, p in self.unet.named_parameters():
            if "lora" or "conv_in" in n:  # noqa: SIM222 (the reference's always-true test)
                p.data.copy_(sd["state_dict_unet"][n])

        if self.args.load_cfr:
            for n, p in self.cfr_main_net.named_parameters():
                p.data.copy_(sd["state_dict_bpp"][n])
    # fmt: on


# ----- tests ------------------------------------------------------------------------------------
REFERENCE_ADAPTERS = [
    f"default_{g}_{k}" for k in ("consistency", "quality") for g in ("encoder", "decoder", "others")
]


def _unet_outputs(model, ref):
    """Our UNet (both LoRAs active) and the reference's (all six adapters) on one input."""
    set_weights_and_activate_adapters(ref.unet, REFERENCE_ADAPTERS, [1.0] * 6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 16, 16, generator=g)
    text = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ours = model.unet(x, model.timestep, encoder_hidden_states=text).sample
        theirs = ref.unet(x, torch.tensor([1]), encoder_hidden_states=text).sample
    return ours, theirs


def test_reference_loader_with_load_cfr_reads_the_export(tmp_path):
    model = trained_model()
    sd = torch.load(export_official(model, tmp_path / "model.pkl"), weights_only=True)
    fresh_unet = build_backbone("tiny", seed=11).unet  # other base weights: all are overwritten
    ref = ReferenceGeneratorEval(fresh_unet, sd, load_cfr=True)  # raised KeyError before

    # every CFR parameter the reference runs holds ours; the never-run modules were found
    ours_cfr = model.cfr.state_dict()
    ref_cfr = dict(ref.cfr_main_net.named_parameters())
    used = [n for n in ref_cfr if n.startswith(("spynet.", "cross_attn_module."))]
    assert len(used) == len([k for k in ours_cfr if not k.endswith(("mean", "std"))])
    for n in used:
        assert torch.equal(ref_cfr[n], ours_cfr[n]), n
    assert "feat_extract.main.0.weight" in ref_cfr

    # the reference's UNet (six peft adapters) computes what ours does with both LoRAs active
    ours, theirs = _unet_outputs(model, ref)
    assert torch.allclose(ours, theirs, atol=1e-5)  # ref's base UNet had other weights


def test_reference_loader_keeps_a_lora_alpha_other_than_8(tmp_path):
    """The file holds no alpha and the reference runs every adapter at 8/r: the export scales
    lora_B by alpha/8, so the reference's UNet computes ours (alpha 16 is scale 4 at rank 4)."""
    model = trained_model(5, detail={"rank": 4, "alpha": 16}, consistency={"rank": 2, "alpha": 3})
    sd = torch.load(export_official(model, tmp_path / "model.pkl"), weights_only=True)
    ref = ReferenceGeneratorEval(build_backbone("tiny", seed=11).unet, sd, load_cfr=True)
    layer = ref.unet.down_blocks[0].resnets[0].conv1
    assert layer.scaling["default_encoder_quality"] == 8 / 4  # peft's default lora_alpha, 8
    assert layer.scaling["default_encoder_consistency"] == 8 / 2

    ours, theirs = _unet_outputs(model, ref)
    assert ours.abs().max() > 1e-2  # the LoRAs move the output (conv_out starts at zero)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_the_same_model_exported_twice_gives_the_same_bytes(tmp_path):
    """A release's sha256 names its weights: two exports of one model, under other names and
    folders, are the same file (the zip's root folder was named after the random temp file)."""
    model = trained_model()
    first = export_official(model, tmp_path / "a" / "model.pkl").read_bytes()
    second = export_official(model, tmp_path / "b" / "dloral_release.pkl").read_bytes()
    assert first == second
