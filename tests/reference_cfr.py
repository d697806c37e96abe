"""A literal transcription of the reference's Cross-Frame Retrieval, for the parity tests
(test_cfr_parity.py, test_spynet_weights.py); nothing here is imported from the reference.

Source: yjsunnn/DLoRAL 40c1308, src/cross_frame_retrieval/cfr_main.py (flow_warp, SPyNet,
SPyNetBasicModule, CFR_model) and src/cross_frame_retrieval/uncertainty_topk.py
(CrossFrameAbsoluteAttn). The reference's names, operations and order are kept; the only
departures, each marked `# STAND-IN` or `# OMITTED` where it is, are:

- mmengine's BaseModule and mmcv's ConvModule are replaced by minimal torch equivalents (the
  reference builds every ConvModule with norm_cfg=None: a biased conv, then ReLU or nothing);
- SPyNet's `pretrained` file loading (mmengine's load_checkpoint) is not transcribed: the tests
  pass pretrained=None and load state dicts themselves;
- CFR_model builds only the two submodules its forward uses (spynet, cross_attn_module); the
  reference also builds feat_extract, weight_predict(_final), reconstruction_feat, conv_hr,
  conv_last, img_upsample and lrelu, which its forward never calls (their weights are the
  `OFFICIAL_UNUSED_CFR` keys dloral's import ignores);
- CFR_model.forward's check that the 1/8 frames are at least 64x64 is dropped, so that a test
  can run the dense (heads x HW x HW) similarity of CrossFrameAbsoluteAttn on a small latent; it
  is an input-size assertion and changes no value. Commented-out code is not transcribed.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----- stand-ins for mmengine / mmcv ------------------------------------------------------------
class BaseModule(nn.Module):  # STAND-IN: mmengine.model.BaseModule (init_cfg unused here)
    pass


class ConvModule(nn.Module):
    """STAND-IN: mmcv.cnn.ConvModule with norm_cfg=None: conv (bias), then the activation if
    any (act_cfg=dict(type='ReLU') is mmcv's in-place ReLU)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, norm_cfg, act_cfg):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=True)
        self.with_activation = act_cfg is not None
        if self.with_activation:
            self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        return self.activate(x) if self.with_activation else x


# ----- src/cross_frame_retrieval/cfr_main.py ----------------------------------------------------
def flow_warp(x, flow, interpolation="bilinear", padding_mode="zeros", align_corners=True):
    if x.size()[-2:] != flow.size()[1:3]:
        raise ValueError(
            f"The spatial sizes of input ({x.size()[-2:]}) and "
            f"flow ({flow.size()[1:3]}) are not the same."
        )
    _, _, h, w = x.size()
    # create mesh grid
    device = flow.device
    # torch.meshgrid has been modified in 1.10.0 (compatibility with previous
    # versions), and will be further modified in 1.12 (Breaking Change)
    if "indexing" in torch.meshgrid.__code__.co_varnames:
        grid_y, grid_x = torch.meshgrid(
            torch.arange(0, h, device=device, dtype=x.dtype),
            torch.arange(0, w, device=device, dtype=x.dtype),
            indexing="ij",
        )
    else:
        grid_y, grid_x = torch.meshgrid(
            torch.arange(0, h, device=device, dtype=x.dtype),
            torch.arange(0, w, device=device, dtype=x.dtype),
        )
    grid = torch.stack((grid_x, grid_y), 2)  # h, w, 2
    grid.requires_grad = False

    grid_flow = grid + flow
    # scale grid_flow to [-1,1]
    grid_flow_x = 2.0 * grid_flow[:, :, :, 0] / max(w - 1, 1) - 1.0
    grid_flow_y = 2.0 * grid_flow[:, :, :, 1] / max(h - 1, 1) - 1.0
    grid_flow = torch.stack((grid_flow_x, grid_flow_y), dim=3)
    grid_flow = grid_flow.type(x.type())
    output = F.grid_sample(
        x, grid_flow, mode=interpolation, padding_mode=padding_mode, align_corners=align_corners
    )
    return output


class SPyNet(BaseModule):
    def __init__(self, pretrained):
        super().__init__()

        self.basic_module = nn.ModuleList([SPyNetBasicModule() for _ in range(6)])

        if isinstance(pretrained, str):
            # OMITTED: mmengine's load_checkpoint(self, pretrained, strict=True, logger=logger)
            raise NotImplementedError("the tests load the state dict themselves")
        elif pretrained is not None:
            raise TypeError(f"[pretrained] should be str or None, but got {type(pretrained)}.")

        self.register_buffer("mean", torch.Tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.Tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def compute_flow(self, ref, supp):
        n, _, h, w = ref.size()

        # normalize the input images
        ref = [(ref - self.mean) / self.std]
        supp = [(supp - self.mean) / self.std]

        # generate downsampled frames
        for level in range(5):  # noqa: B007 (as transcribed)
            ref.append(
                F.avg_pool2d(input=ref[-1], kernel_size=2, stride=2, count_include_pad=False)
            )
            supp.append(
                F.avg_pool2d(input=supp[-1], kernel_size=2, stride=2, count_include_pad=False)
            )
        ref = ref[::-1]
        supp = supp[::-1]

        # flow computation
        flow = ref[0].new_zeros(n, 2, h // 32, w // 32)
        for level in range(len(ref)):
            if level == 0:
                flow_up = flow
            else:
                flow_up = (
                    F.interpolate(input=flow, scale_factor=2, mode="bilinear", align_corners=True)
                    * 2.0
                )

            # add the residue to the upsampled flow
            flow = flow_up + self.basic_module[level](
                torch.cat(
                    [
                        ref[level],
                        flow_warp(supp[level], flow_up.permute(0, 2, 3, 1), padding_mode="border"),
                        flow_up,
                    ],
                    1,
                )
            )

        return flow

    def forward(self, ref, supp):
        # upsize to a multiple of 32
        h, w = ref.shape[2:4]
        w_up = w if (w % 32) == 0 else 32 * (w // 32 + 1)
        h_up = h if (h % 32) == 0 else 32 * (h // 32 + 1)
        ref = F.interpolate(input=ref, size=(h_up, w_up), mode="bilinear", align_corners=False)
        supp = F.interpolate(input=supp, size=(h_up, w_up), mode="bilinear", align_corners=False)

        # compute flow, and resize back to the original resolution
        flow = F.interpolate(
            input=self.compute_flow(ref, supp), size=(h, w), mode="bilinear", align_corners=False
        )

        # adjust the flow values
        flow[:, 0, :, :] *= float(w) / float(w_up)
        flow[:, 1, :, :] *= float(h) / float(h_up)

        return flow


class SPyNetBasicModule(BaseModule):
    def __init__(self):
        super().__init__()

        self.basic_module = nn.Sequential(
            ConvModule(
                in_channels=8,
                out_channels=32,
                kernel_size=7,
                stride=1,
                padding=3,
                norm_cfg=None,
                act_cfg=dict(type="ReLU"),
            ),
            ConvModule(
                in_channels=32,
                out_channels=64,
                kernel_size=7,
                stride=1,
                padding=3,
                norm_cfg=None,
                act_cfg=dict(type="ReLU"),
            ),
            ConvModule(
                in_channels=64,
                out_channels=32,
                kernel_size=7,
                stride=1,
                padding=3,
                norm_cfg=None,
                act_cfg=dict(type="ReLU"),
            ),
            ConvModule(
                in_channels=32,
                out_channels=16,
                kernel_size=7,
                stride=1,
                padding=3,
                norm_cfg=None,
                act_cfg=dict(type="ReLU"),
            ),
            ConvModule(
                in_channels=16,
                out_channels=2,
                kernel_size=7,
                stride=1,
                padding=3,
                norm_cfg=None,
                act_cfg=None,
            ),
        )

    def forward(self, tensor_input):
        return self.basic_module(tensor_input)


class CFR_model(BaseModule):  # the parts its forward uses (see the module docstring)
    def __init__(
        self,
        mid_channels=64,
        num_blocks=7,
        max_residue_magnitude=10,
        is_low_res_input=True,
        spynet_pretrained=None,
        cpu_cache_length=100,
    ):
        super().__init__()
        self.mid_channels = mid_channels
        self.is_low_res_input = is_low_res_input
        self.cpu_cache_length = cpu_cache_length

        # OMITTED: self.feat_extract (unused by forward)
        # optical flow
        self.spynet = SPyNet(pretrained=spynet_pretrained)

        self.cross_attn_module = CrossFrameAbsoluteAttn(
            in_channels=4,
            feat_dim=4,
            embed_dim=64,
            heads=9,
        )
        # OMITTED: weight_predict, weight_predict_final, reconstruction_feat, conv_hr, conv_last,
        # img_upsample, lrelu (unused by forward)

    def compute_flow(self, lqs):
        n, t, c, h, w = lqs.size()
        lqs_1 = lqs[:, :-1, :, :, :].reshape(-1, c, h, w)
        lqs_2 = lqs[:, 1:, :, :, :].reshape(-1, c, h, w)

        flows_backward = self.spynet(lqs_1, lqs_2).view(n, t - 1, 2, h, w)

        flows_forward = self.spynet(lqs_2, lqs_1).view(n, t - 1, 2, h, w)

        return flows_forward, flows_backward

    def forward(self, lqs, vae_feat, uncertainty_map, external_flows=None):
        n, t, c, h, w = lqs.size()
        n_feat, t_feat, c_feat, h_feat, w_feat = vae_feat.size()

        assert n == n_feat, "batchsize of lqs and feat should be the same"
        assert t == t_feat, "frame numbers of lqs and feat should be the same"

        # whether to cache the features in CPU (no effect if using CPU)
        if t > self.cpu_cache_length and lqs.is_cuda:
            self.cpu_cache = True
        else:
            self.cpu_cache = False

        if self.is_low_res_input:
            lqs_downsample = lqs.clone()
        else:
            lqs_downsample = F.interpolate(
                lqs.view(-1, c, h, w), scale_factor=0.125, mode="bicubic"
            ).view(n, t, c, h // 8, w // 8)

        feats_spatial = vae_feat.clone()

        # OMITTED: assert lqs_downsample.size(3) >= 64 and lqs_downsample.size(4) >= 64

        if external_flows is not None:
            flows_forward, flows_backward = external_flows

        else:
            flows_forward, flows_backward = self.compute_flow(lqs_downsample)

        fused_features = feats_spatial.clone()
        aligned_feat_return = feats_spatial.clone()
        ## calculate weight map to decide whether coherent
        weight_map = torch.ones(
            (n_feat, t_feat, 1, h_feat, w_feat),
            dtype=feats_spatial.dtype,
            device=feats_spatial.device,
        )

        for t_index in range(1, t_feat):
            cur_feat_4d = feats_spatial[:, t_index]
            prev_feat_4d = feats_spatial[:, t_index - 1]

            flow_current = flows_forward[:, t_index - 1, :, :, :]
            aligned_prev_feat_4d = flow_warp(prev_feat_4d, flow_current.permute(0, 2, 3, 1))
            uncertainty_map_between = uncertainty_map[:, t_index - 1]

            b_cur_feat, c_cur_feat, h_cur_feat, w_cur_feat = cur_feat_4d.size()

            cur_img = lqs_downsample[:, t_index]  # noqa: F841 (as transcribed)
            prev_img = lqs_downsample[:, t_index - 1]

            aligned_prev_img_4d = flow_warp(prev_img, flow_current.permute(0, 2, 3, 1))  # noqa: F841

            fused_features[:, t_index], out_feat_down = self.cross_attn_module(
                cur_feat_4d, aligned_prev_feat_4d, cur_feat_4d, aligned_prev_feat_4d
            )
            weight_map[:, t_index] = uncertainty_map_between

            aligned_feat_return[:, t_index] = aligned_prev_feat_4d

        return fused_features, weight_map, aligned_feat_return


# ----- src/cross_frame_retrieval/uncertainty_topk.py --------------------------------------------
class CrossFrameAbsoluteAttn(nn.Module):
    """ "Absolute attention" across frames: relu(similarity - threshold), no row normalisation;
    the threshold t_{h,i} is learned from Q (the reference's docstring, translated)."""

    def __init__(self, in_channels=3, feat_dim=4, embed_dim=32, heads=9):
        super().__init__()
        self.heads = heads
        self.embed_dim = embed_dim

        # Q, K channels = heads * embed_dim
        self.query_conv = nn.Conv2d(in_channels, embed_dim * heads, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, embed_dim * heads, kernel_size=1)
        # V channels = heads * embed_dim
        self.value_conv = nn.Conv2d(feat_dim, embed_dim * heads, kernel_size=1)

        # output projection
        self.proj_out = nn.Conv2d(embed_dim * heads, feat_dim, kernel_size=1)
        self.temperature = torch.tensor(3000.0)

        # threshold: each head's Q vector -> 1 scalar
        self.threshold_fc = nn.Linear(embed_dim, 1)

    def forward(
        self,
        second_frame: torch.Tensor,  # [B,3,H,W]
        first_frame_aligned: torch.Tensor,  # [B,3,H,W]
        second_frame_feat: torch.Tensor,  # [B,feat_dim,H//8,W//8]
        first_frame_feat_aligned: torch.Tensor,  # [B,feat_dim,H//8,W//8]
    ):
        B, _, H, W = second_frame.shape
        HW = H * W

        first_frame_feat_up = F.interpolate(
            first_frame_feat_aligned, size=(H, W), mode="bilinear", align_corners=False
        )  # [B, feat_dim, H, W]

        # 1) Q, K, V
        Q = self.query_conv(second_frame)  # [B, heads*embed_dim, H, W]
        K = self.key_conv(first_frame_aligned)  # [B, heads*embed_dim, H, W]
        V = self.value_conv(first_frame_feat_up)  # [B, heads*embed_dim, H, W]

        # 2) multi-head [B, heads, embed_dim, H*W]
        Q = Q.view(B, self.heads, self.embed_dim, HW)
        K = K.view(B, self.heads, self.embed_dim, HW)
        V = V.view(B, self.heads, self.embed_dim, HW)

        # 3) sim(i,j) = Q[i] dot K[j], no softmax: [B, heads, HW, HW]
        Q_ = Q.permute(0, 1, 3, 2)  # [B, heads, HW, embed_dim]
        K_ = K.permute(0, 1, 2, 3)  # [B, heads, embed_dim, HW]
        d = self.embed_dim
        sim = torch.matmul(Q_, K_) / math.sqrt(d)  # [B, heads, HW, HW]

        # 4) learned threshold[i] = FC(Q[i])
        Q_for_thresh = Q_.reshape(B * self.heads * HW, d)  # [B*heads*HW, embed_dim]
        t = self.threshold_fc(Q_for_thresh)  # [B*heads*HW,1]
        t = t.view(B, self.heads, HW)  # [B,heads,HW]

        # attn(i,j) = relu(sim(i,j) - t(i))
        t_expanded = t.unsqueeze(-1)  # [B,heads,HW,1]
        attn = sim - t_expanded  # [B,heads,HW,HW]
        attn = F.relu(attn / self.temperature)

        # 5) weight V by attn
        V_ = V.permute(0, 1, 3, 2)  # => [B, heads, HW, embed_dim]
        out_attn = torch.matmul(attn, V_)  # [B, heads, HW, embed_dim]
        # back to [B, heads*embed_dim, H, W]
        out_attn = out_attn.permute(0, 1, 3, 2)  # => [B, heads, embed_dim, HW]
        out_attn = out_attn.reshape(B, self.heads * self.embed_dim, H, W)

        # 6) proj_out => [B, feat_dim, H, W]
        out_feat = self.proj_out(out_attn)

        # 7) back to second_frame_feat's size
        out_feat_down = F.interpolate(
            out_feat, size=second_frame_feat.shape[-2:], mode="bilinear", align_corners=False
        )
        final_feat = second_frame_feat + out_feat_down

        return final_feat, out_feat_down
