"""A literal transcription of the reference's tiled VAE, for the parity test
(test_vae_tiles.py); nothing here is imported from the reference.

Source: yjsunnn/DLoRAL 40c1308, src/my_utils/vaehook.py (attn_forward_new, attn2task,
resblock2task, build_sampling, build_task_queue, clone_task_queue, get_var_mean,
custom_group_norm, crop_valid_region, GroupNormParam, VAEHook), as src/DLoRAL_model.py's
`_init_tiled_vae` builds it for test_DLoRAL.py: fast_encoder = fast_decoder = False,
color_fix = False. The reference's names, operations and order are kept; the
departures, each marked `# STAND-IN` or `# OMITTED` where it is, are:

- `src.my_utils.devices` is replaced by the tiles' own device (`devices.device`); the move of
  the net to the GPU and back around each call (`to_gpu`, `vae_to_gpu=True` by default), the
  `perfcount` timing, the progress bar (tqdm) and the prints are dropped;
- the fast-mode estimation (`estimate_group_norm`, `GroupNormParam.from_tile`, taken only with
  fast_encoder/fast_decoder, which the reference's DLoRAL sets False), the branches for other
  attention classes (`attn_forward`, `xformer_attn_forward`, behind `if False:` in attn2task),
  the recommended tile sizes for a GPU (`get_recommend_*_tile_size`, the `DEFAULT_*` globals:
  DLoRAL passes its own sizes), the unused `tile_size` local of vae_tile_forward and its
  commented-out code are not transcribed;
- the tasks are run under torch.no_grad() as the reference's @torch.no_grad() decorator does.

As the reference, build_sampling assumes SD's VAE layout (2 resnets per encoder block, 3 per
decoder block) and get_var_mean / custom_group_norm 32 groups: the test builds a VAE of that
layout.
"""

import math

import torch
import torch.nn.functional as F

sd_flag = False


# inplace version of silu
def inplace_nonlinearity(x):
    # Test: fix for Nans
    return F.silu(x, inplace=True)


# from diffusers lib
def attn_forward_new(self, h_):
    batch_size, channel, height, width = h_.shape
    hidden_states = h_.view(batch_size, channel, height * width).transpose(1, 2)

    attention_mask = None
    encoder_hidden_states = None
    batch_size, sequence_length, _ = hidden_states.shape
    attention_mask = self.prepare_attention_mask(attention_mask, sequence_length, batch_size)

    query = self.to_q(hidden_states)

    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif self.norm_cross:
        encoder_hidden_states = self.norm_encoder_hidden_states(encoder_hidden_states)

    key = self.to_k(encoder_hidden_states)
    value = self.to_v(encoder_hidden_states)

    query = self.head_to_batch_dim(query)
    key = self.head_to_batch_dim(key)
    value = self.head_to_batch_dim(value)

    attention_probs = self.get_attention_scores(query, key, attention_mask)
    hidden_states = torch.bmm(attention_probs, value)
    hidden_states = self.batch_to_head_dim(hidden_states)

    # linear proj
    hidden_states = self.to_out[0](hidden_states)
    # dropout
    hidden_states = self.to_out[1](hidden_states)

    hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

    return hidden_states


def attn2task(task_queue, net):
    # OMITTED: the `if False:` branches for AttnBlock / MemoryEfficientAttnBlock
    task_queue.append(("store_res", lambda x: x))
    task_queue.append(("pre_norm", net.group_norm))
    task_queue.append(("attn", lambda x, net=net: attn_forward_new(net, x)))
    task_queue.append(["add_res", None])


def resblock2task(queue, block):
    """
    Turn a ResNetBlock into a sequence of tasks and append to the task queue
    """
    if block.in_channels != block.out_channels:
        if sd_flag:
            if block.use_conv_shortcut:
                queue.append(("store_res", block.conv_shortcut))
            else:
                queue.append(("store_res", block.nin_shortcut))
        else:
            if block.use_in_shortcut:
                queue.append(("store_res", block.conv_shortcut))
            else:
                queue.append(("store_res", block.nin_shortcut))

    else:
        queue.append(("store_res", lambda x: x))
    queue.append(("pre_norm", block.norm1))
    queue.append(("silu", inplace_nonlinearity))
    queue.append(("conv1", block.conv1))
    queue.append(("pre_norm", block.norm2))
    queue.append(("silu", inplace_nonlinearity))
    queue.append(("conv2", block.conv2))
    queue.append(["add_res", None])


def build_sampling(task_queue, net, is_decoder):
    """
    Build the sampling part of a task queue
    """
    if is_decoder:
        resblock2task(task_queue, net.mid_block.resnets[0])
        attn2task(task_queue, net.mid_block.attentions[0])
        resblock2task(task_queue, net.mid_block.resnets[1])
        resolution_iter = range(len(net.up_blocks))  # range(0,4)
        block_ids = 2 + 1
        condition = len(net.up_blocks) - 1
        module = net.up_blocks
        func_name = "upsamplers"
    else:
        resolution_iter = range(len(net.down_blocks))  # range(0,4)
        block_ids = 2
        condition = len(net.down_blocks) - 1
        module = net.down_blocks
        func_name = "downsamplers"

    for i_level in resolution_iter:
        for i_block in range(block_ids):
            resblock2task(task_queue, module[i_level].resnets[i_block])
        if i_level != condition:
            if is_decoder:
                task_queue.append((func_name, module[i_level].upsamplers[0]))
            else:
                task_queue.append((func_name, module[i_level].downsamplers[0]))

    if not is_decoder:
        resblock2task(task_queue, net.mid_block.resnets[0])
        attn2task(task_queue, net.mid_block.attentions[0])
        resblock2task(task_queue, net.mid_block.resnets[1])


def build_task_queue(net, is_decoder):
    """
    Build a single task queue for the encoder or decoder
    """
    task_queue = []
    task_queue.append(("conv_in", net.conv_in))

    # construct the sampling part of the task queue
    # because encoder and decoder share the same architecture, we extract the sampling part
    build_sampling(task_queue, net, is_decoder)
    if is_decoder and not sd_flag:
        net.give_pre_end = False
        net.tanh_out = False

    if not is_decoder or not net.give_pre_end:
        if sd_flag:
            task_queue.append(("pre_norm", net.norm_out))
        else:
            task_queue.append(("pre_norm", net.conv_norm_out))
        task_queue.append(("silu", inplace_nonlinearity))
        task_queue.append(("conv_out", net.conv_out))
        if is_decoder and net.tanh_out:
            task_queue.append(("tanh", torch.tanh))

    return task_queue


def clone_task_queue(task_queue):
    return [[item for item in task] for task in task_queue]


def get_var_mean(input, num_groups, eps=1e-6):
    """
    Get mean and var for group norm
    """
    b, c = input.size(0), input.size(1)
    channel_in_group = int(c / num_groups)
    input_reshaped = input.contiguous().view(
        1, int(b * num_groups), channel_in_group, *input.size()[2:]
    )
    var, mean = torch.var_mean(input_reshaped, dim=[0, 2, 3, 4], unbiased=False)
    return var, mean


def custom_group_norm(input, num_groups, mean, var, weight=None, bias=None, eps=1e-6):
    """
    Custom group norm with fixed mean and var
    """
    b, c = input.size(0), input.size(1)
    channel_in_group = int(c / num_groups)
    input_reshaped = input.contiguous().view(
        1, int(b * num_groups), channel_in_group, *input.size()[2:]
    )

    out = F.batch_norm(
        input_reshaped, mean, var, weight=None, bias=None, training=False, momentum=0, eps=eps
    )

    out = out.view(b, c, *input.size()[2:])

    # post affine transform
    if weight is not None:
        out *= weight.view(1, -1, 1, 1)
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def crop_valid_region(x, input_bbox, target_bbox, is_decoder):
    """
    Crop the valid region from the tile
    """
    padded_bbox = [i * 8 if is_decoder else i // 8 for i in input_bbox]
    margin = [target_bbox[i] - padded_bbox[i] for i in range(4)]
    return x[:, :, margin[2] : x.size(2) + margin[3], margin[0] : x.size(3) + margin[1]]


class GroupNormParam:
    def __init__(self):
        self.var_list = []
        self.mean_list = []
        self.pixel_list = []
        self.weight = None
        self.bias = None

    def add_tile(self, tile, layer):
        var, mean = get_var_mean(tile, 32)
        # For giant images, the variance can be larger than max float16
        # In this case we create a copy to float32
        if var.dtype == torch.float16 and var.isinf().any():
            fp32_tile = tile.float()
            var, mean = get_var_mean(fp32_tile, 32)
        self.var_list.append(var)
        self.mean_list.append(mean)
        self.pixel_list.append(tile.shape[2] * tile.shape[3])
        if hasattr(layer, "weight"):
            self.weight = layer.weight
            self.bias = layer.bias
        else:
            self.weight = None
            self.bias = None

    def summary(self):
        """
        summarize the mean and var and return a function
        that apply group norm on each tile
        """
        if len(self.var_list) == 0:
            return None
        var = torch.vstack(self.var_list)
        mean = torch.vstack(self.mean_list)
        max_value = max(self.pixel_list)
        pixels = (
            torch.tensor(self.pixel_list, dtype=torch.float32, device=var.device) / max_value
        )  # STAND-IN: devices.device
        sum_pixels = torch.sum(pixels)
        pixels = pixels.unsqueeze(1) / sum_pixels
        var = torch.sum(var * pixels, dim=0)
        mean = torch.sum(mean * pixels, dim=0)
        return lambda x: custom_group_norm(x, 32, mean, var, self.weight, self.bias)


class VAEHook:
    def __init__(
        self, net, tile_size, is_decoder, fast_decoder, fast_encoder, color_fix, to_gpu=False
    ):
        self.net = net  # encoder | decoder
        self.tile_size = tile_size
        self.is_decoder = is_decoder
        self.fast_mode = (fast_encoder and not is_decoder) or (fast_decoder and is_decoder)
        self.color_fix = color_fix and not is_decoder
        self.to_gpu = to_gpu
        self.pad = 11 if is_decoder else 32

    def __call__(self, x):
        B, C, H, W = x.shape
        # OMITTED: moving the net to the GPU for the call and back (to_gpu)
        if max(H, W) <= self.pad * 2 + self.tile_size:
            return self.net.original_forward(x)
        else:
            return self.vae_tile_forward(x)

    def get_best_tile_size(self, lowerbound, upperbound):
        """
        Get the best tile size for GPU memory
        """
        divider = 32
        while divider >= 2:
            remainer = lowerbound % divider
            if remainer == 0:
                return lowerbound
            candidate = lowerbound - remainer + divider
            if candidate <= upperbound:
                return candidate
            divider //= 2
        return lowerbound

    def split_tiles(self, h, w):
        """
        Tool function to split the image into tiles
        """
        tile_input_bboxes, tile_output_bboxes = [], []
        tile_size = self.tile_size
        pad = self.pad
        num_height_tiles = math.ceil((h - 2 * pad) / tile_size)
        num_width_tiles = math.ceil((w - 2 * pad) / tile_size)
        # If any of the numbers are 0, we let it be 1
        # This is to deal with long and thin images
        num_height_tiles = max(num_height_tiles, 1)
        num_width_tiles = max(num_width_tiles, 1)

        # Suggestions from https://github.com/Kahsolt: auto shrink the tile size
        real_tile_height = math.ceil((h - 2 * pad) / num_height_tiles)
        real_tile_width = math.ceil((w - 2 * pad) / num_width_tiles)
        real_tile_height = self.get_best_tile_size(real_tile_height, tile_size)
        real_tile_width = self.get_best_tile_size(real_tile_width, tile_size)

        # OMITTED: print

        for i in range(num_height_tiles):
            for j in range(num_width_tiles):
                # bbox: [x1, x2, y1, y2]
                # the padding is is unnessary for image borders. So we directly start from (32, 32)
                input_bbox = [
                    pad + j * real_tile_width,
                    min(pad + (j + 1) * real_tile_width, w),
                    pad + i * real_tile_height,
                    min(pad + (i + 1) * real_tile_height, h),
                ]

                # if the output bbox is close to the image boundary, we extend it to the image
                # boundary
                output_bbox = [
                    input_bbox[0] if input_bbox[0] > pad else 0,
                    input_bbox[1] if input_bbox[1] < w - pad else w,
                    input_bbox[2] if input_bbox[2] > pad else 0,
                    input_bbox[3] if input_bbox[3] < h - pad else h,
                ]

                # scale to get the final output bbox
                output_bbox = [x * 8 if self.is_decoder else x // 8 for x in output_bbox]
                tile_output_bboxes.append(output_bbox)

                # indistinguishable expand the input bbox by pad pixels
                tile_input_bboxes.append(
                    [
                        max(0, input_bbox[0] - pad),
                        min(w, input_bbox[1] + pad),
                        max(0, input_bbox[2] - pad),
                        min(h, input_bbox[3] + pad),
                    ]
                )

        return tile_input_bboxes, tile_output_bboxes

    @torch.no_grad()
    def vae_tile_forward(self, z):
        """
        Decode a latent vector z into an image in a tiled manner.
        """
        device = next(self.net.parameters()).device
        net = self.net
        is_decoder = self.is_decoder

        z = z.detach()  # detach the input to avoid backprop

        N, height, width = z.shape[0], z.shape[2], z.shape[3]
        net.last_z_shape = z.shape

        in_bboxes, out_bboxes = self.split_tiles(height, width)

        # Prepare tiles by split the input latents
        tiles = []
        for input_bbox in in_bboxes:
            tile = z[:, :, input_bbox[2] : input_bbox[3], input_bbox[0] : input_bbox[1]].cpu()
            tiles.append(tile)

        weight_dtype_z = z.dtype

        num_tiles = len(tiles)
        num_completed = 0

        # Build task queues
        single_task_queue = build_task_queue(net, is_decoder)
        # OMITTED: the fast mode's estimate_group_norm (fast_mode is False)

        task_queues = [clone_task_queue(single_task_queue) for _ in range(num_tiles)]

        # Dummy result
        result = None
        result_approx = None
        # Free memory of input latent tensor
        del z

        # execute the task back and forth when switch tiles so that we always
        # keep one tile on the GPU to reduce unnecessary data transfer
        forward = True
        interrupted = False
        while True:
            group_norm_param = GroupNormParam()
            for i in range(num_tiles) if forward else reversed(range(num_tiles)):
                tile = tiles[i].to(device)
                input_bbox = in_bboxes[i]
                task_queue = task_queues[i]

                interrupted = False
                while len(task_queue) > 0:
                    task = task_queue.pop(0)
                    if task[0] == "pre_norm":
                        group_norm_param.add_tile(tile, task[1])
                        break
                    elif task[0] == "store_res" or task[0] == "store_res_cpu":
                        task_id = 0
                        res = task[1](tile)
                        if not self.fast_mode or task[0] == "store_res_cpu":
                            res = res.cpu()
                        while task_queue[task_id][0] != "add_res":
                            task_id += 1
                        task_queue[task_id][1] = res
                    elif task[0] == "add_res":
                        tile += task[1].to(device)
                        task[1] = None
                    else:
                        tile = task[1](tile)

                if interrupted:
                    break

                if len(task_queue) == 0:
                    tiles[i] = None
                    num_completed += 1
                    if (
                        result is None
                    ):  # NOTE: dim C varies from different cases, can only be inited dynamically
                        result = torch.zeros(
                            (
                                N,
                                tile.shape[1],
                                height * 8 if is_decoder else height // 8,
                                width * 8 if is_decoder else width // 8,
                            ),
                            device=device,
                            requires_grad=False,
                        )
                    result[
                        :,
                        :,
                        out_bboxes[i][2] : out_bboxes[i][3],
                        out_bboxes[i][0] : out_bboxes[i][1],
                    ] = crop_valid_region(tile, in_bboxes[i], out_bboxes[i], is_decoder)
                    del tile
                elif i == num_tiles - 1 and forward:
                    forward = False
                    tiles[i] = tile
                elif i == 0 and not forward:
                    forward = True
                    tiles[i] = tile
                else:
                    tiles[i] = tile.cpu()
                    del tile

            if interrupted:
                break
            if num_completed == num_tiles:
                break

            # insert the group norm task to the head of each task queue
            group_norm_func = group_norm_param.summary()
            if group_norm_func is not None:
                for i in range(num_tiles):
                    task_queue = task_queues[i]
                    task_queue.insert(0, ("apply_norm", group_norm_func))

        # Done!
        result = result.to(dtype=weight_dtype_z)
        return result if result is not None else result_approx.to(device)
