"""The DLoRAL training recipe: one readable loop that alternates the two stages.

    consistency stage: C-LoRA + CFR train (D-LoRA active, frozen): L2 + LPIPS + temporal loss
    detail stage:      D-LoRA trains (C-LoRA, CFR frozen):          L2 + LPIPS + CSD + temporal

The text condition (also CSD's positive prompt) is empty, fixed, or tagged per sample
(dloral.train.prompts); the temporal loss is `warped` (differentiable) or the reference's
gradient-free `reference_flow`.

Per step: the schedule (dloral.train.schedule) says the stage and every loss weight, smoothly
interpolated around a switch as the reference does. A batch holds clips of N consecutive frames;
the model restores every frame t >= 1 from the pair (t-1, t), as the reference's two pairs of a
3-frame clip. All randomness of a step (VAE posterior samples, CSD noise and timesteps) comes from
a generator seeded by (seed, step, micro-batch) and the data is a pure function of (seed, sample
index), so a resumed run follows the same trajectory as an uninterrupted one.

Data parallel (`run.workers` > 1, in a torch.distributed process group that the caller started:
Ray Train in dloral.sweep.distributed, or torchrun): each process trains on its own share of every
step's samples (dloral.data.sampler.worker_indices) and seeds each micro-batch by its place in the
step; DDP averages the gradients in the backward of the last micro-step (`no_sync` before it). So
N workers x batch b x accumulation a take exactly the step one process takes with accumulation
N x a. Rank 0 alone validates, logs and writes the run folder; every rank calls the hooks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dloral import signals
from dloral.atomic import atomic_folder, atomic_write_text
from dloral.data.config import default_dir
from dloral.data.embedded import prepare_embedded
from dloral.data.readers import read_dataset
from dloral.data.sampler import StagedClips, TrainingClips, worker_indices
from dloral.devices import resolve_device
from dloral.model import lora
from dloral.model.checkpoint import LATEST, RUN_CHECKPOINTS, save_checkpoint
from dloral.model.config import DLoRALConfig
from dloral.model.dloral import DLoRAL
from dloral.model.requirements import Missing, missing_weights, require_weights
from dloral.model.tiny_vae import TinyVAERecipe, uses_embedded_vae
from dloral.resize import resize_frames
from dloral.train import losses
from dloral.train.config import TrainConfig
from dloral.train.prompts import TrainingPrompts
from dloral.train.schedule import StepPlan, plan
from dloral.train.validation import psnr, ssim, temporal_change_error

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
STRIP_LABELS = ("LQ", "output", "GT")  # the panels of validate()'s sample strip
CSD_ZEROED = "csd_zeroed"  # step_losses' count of frame pairs whose CSD loss was replaced by 0


class TrainingDiverged(RuntimeError):
    """A loss became NaN/inf; the message names the step; the last good checkpoint is kept."""


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "finished" | "diverged"
    step: int
    last_checkpoint: Path | None
    metrics: dict = field(default_factory=dict)  # validation at the last step
    mlflow_run_id: str | None = None
    start_metrics: dict = field(default_factory=dict)  # validation at step 0 (not on resume)


# ----- setup ------------------------------------------------------------------------------
def _prepared(path: Path, given: str | None) -> Path:
    """A root the user gave is used as it is; the embedded default is prepared on first use."""
    if not given:
        prepare_embedded(path.parent)
    return path


def prepare_first_use(model: DLoRALConfig) -> None:
    """The tiny profile's VAE, when the model loads it from the embedded data folder, is
    trained there on first use (with the embedded sets it learns from), as `dloral-exp data
    prepare` would: before the weights check, which would otherwise find it missing."""
    if uses_embedded_vae(model):
        prepare_embedded(default_dir(), vae=TinyVAERecipe())


def _training_set(cfg: TrainConfig, per_step: int) -> TrainingClips | StagedClips:
    """The training samples; with a [data.detail] set or sampling of its own, one set per stage,
    sample i drawn from the set of the stage of step i // per_step (as the reference's
    DynamicDatasetManager swaps Pexels for LSDIR in detail stages)."""
    data, detail = cfg.data, cfg.data.detail
    train_root = _prepared(data.train_path(), data.train_root)
    consistency = TrainingClips(
        _train_clips(data.train_kind, train_root, data.lq_root, data.shift),
        data.sampler,
        disk_lq=data.lq_root is not None,
    )
    if detail.kind is None and not detail.overrides():
        return consistency
    detail_set = TrainingClips(
        consistency.clips
        if detail.kind is None
        else _train_clips(detail.kind, Path(detail.root), detail.lq_root, data.shift),
        replace(data.sampler, **detail.overrides()),
        disk_lq=consistency.disk_lq if detail.kind is None else detail.lq_root is not None,
    )
    stage_of = partial(_stage_of_sample, per_step=per_step, cfg=cfg)
    return StagedClips({"consistency": consistency, "detail": detail_set}, stage_of)


def _train_clips(kind: str, root: Path, lq_root: str | None, shift) -> list:
    shift = shift if kind == "shift" else None
    return read_dataset(kind, root, lq_root=lq_root, shift=shift).clips


def _stage_of_sample(index: int, per_step: int, cfg: TrainConfig) -> str:
    return plan(index // per_step, cfg.schedule, cfg.loss.weights).stage


def _frozen_pretrained_unet(model: DLoRAL) -> torch.nn.Module:
    """The original 4-channel UNet that CSD distils from (the reference loads SD 2.1 again)."""
    from dloral.model.backbone import pretrained_unet

    cfg = model.cfg
    unet = pretrained_unet(cfg.profile, cfg.sd21_path, cfg.random_init, cfg.seed, cfg.tiny_init)
    return unet.requires_grad_(False).eval()


def missing_training_weights(cfg: TrainConfig) -> list[Missing]:
    """Every weight file this run needs that is not on this machine: SD 2.1 (sd21), SPyNet
    (model.cfr.spynet), VGG16 (a required LPIPS loss), the tagger module (tagger prompts)."""
    loss = cfg.loss
    out = missing_weights(cfg.model, lpips=loss.lpips == "required" and loss.weights.lpips > 0)
    problem = loss.tagger_problem()
    if problem:
        out.append(Missing("tagger module", "loss.prompt_source = 'tagger'", problem))
    return out


# ----- one step -----------------------------------------------------------------------------
def per_pair(embeds: torch.Tensor, b: int, pairs: int) -> torch.Tensor:
    """Text states (1 or B, 77, D) -> (B * pairs, 77, D), sample-major as the flattened pairs."""
    if embeds.shape[0] == 1:
        return embeds.expand(b * pairs, -1, -1)
    return embeds.repeat_interleave(pairs, dim=0)


def restore_clip(
    model: DLoRAL, lq_up: torch.Tensor, embeds: torch.Tensor, gen, forward: Callable | None = None
) -> tuple:
    """lq_up (B, N, 3, H, W), embeds (1 or B, 77, D) ->
    (restored frames 1..N-1 (B, N-1, 3, H, W), their latents (B * (N-1), 4, h, w)).
    `forward` computes restore_latent: the model itself, or its DDP wrapper."""
    forward = forward or model.restore_latent
    b, n = lq_up.shape[:2]
    z = model.encode(lq_up.flatten(0, 1), gen)
    z = z.view(b, n, *z.shape[1:])
    cur, prev = z[:, 1:].flatten(0, 1), z[:, :-1].flatten(0, 1)
    lq_cur, lq_prev = lq_up[:, 1:].flatten(0, 1), lq_up[:, :-1].flatten(0, 1)
    latents = forward(cur, prev, lq_cur, lq_prev, per_pair(embeds, b, n - 1))
    frames = model.decode(latents)
    return frames.view(b, n - 1, *frames.shape[1:]), latents


def step_losses(model, batch, p: StepPlan, ctx, gen) -> dict[str, torch.Tensor]:
    """Every loss term of one micro-batch, already weighted; key "total" is their sum. With
    loss.nonfinite_csd "zero" and CSD computed, key CSD_ZEROED (not in the total) counts the
    frame pairs whose non-finite CSD loss was replaced by 0."""
    gt, lq = batch["gt"].to(ctx["device"]), batch["lq"].to(ctx["device"])
    lq_up = resize_frames(lq, tuple(gt.shape[-2:]))
    pos = ctx["prompts"].embeds(batch)  # the generator's text condition and CSD's positive
    pred, latents = restore_clip(model, lq_up, pos, gen, ctx.get("forward"))
    target = gt[:, 1:]
    # The reference adds the losses of its frame pairs (loss_l2 + loss_l2_2, ...): the sum over
    # pairs of per-pair means, i.e. the mean over equal-sized pairs times their count.
    pairs = pred.shape[1]
    out: dict[str, torch.Tensor] = {}
    # the reference compares images in [-1, 1]
    out["l2"] = p.l2 * pairs * F.mse_loss(pred * 2 - 1, target * 2 - 1)
    if ctx["lpips"] is not None and p.lpips > 0:
        out["lpips"] = (
            p.lpips
            * pairs
            * ctx["lpips"](pred.flatten(0, 1) * 2 - 1, target.flatten(0, 1) * 2 - 1).mean()
        )
    if p.consistency > 0 and pred.shape[1] >= 2:
        prev_p, cur_p = pred[:, :-1].flatten(0, 1), pred[:, 1:].flatten(0, 1)
        prev_g, cur_g = target[:, :-1].flatten(0, 1), target[:, 1:].flatten(0, 1)
        if ctx["temporal"] == "reference_flow":  # a logged constant: it trains nothing
            term = losses.reference_flow_loss(
                prev_p * 2 - 1, cur_p * 2 - 1, prev_g * 2 - 1, cur_g * 2 - 1
            ).to(ctx["device"])
        else:
            with torch.no_grad():  # motion of the ground truth, by the model's own (frozen) SPyNet
                flow = model.cfr.spynet(cur_g * 2 - 1, prev_g * 2 - 1).float()
            term = losses.temporal_consistency_loss(prev_p, cur_p, prev_g, cur_g, flow)
        out["consistency"] = p.consistency * term
    zeroed = None
    if p.stage == "detail" and p.csd > 0 and ctx["csd"] is not None:
        # one cal_csd per pair in the reference, both pairs with the same noise: the sum of the
        # pairs' losses (pairs x the mse over all latents)
        pair_terms = ctx["csd"].pair_losses(
            latents, per_pair(pos, gt.shape[0], pairs), ctx["neg"], pairs, generator=gen
        )
        if ctx["nonfinite_csd"] == "zero":  # the reference: `if torch.isnan(loss_csd): 0`
            finite = pair_terms.isfinite()
            zeroed = (~finite).sum()
            pair_terms = torch.where(finite, pair_terms, 0.0)  # no gradient from a dropped pair
        out["csd"] = p.csd * pair_terms.sum()
    out["total"] = sum(out.values())
    if zeroed is not None:
        out[CSD_ZEROED] = zeroed
    return out


# ----- checkpoints -------------------------------------------------------------------------
def _save_state(run_dir: Path, model, optimizer, scheduler, step: int, keep: int, extra: dict):
    """checkpoints/step-XXXXXX/ = model checkpoint + optimizer/scheduler/step; then `latest`."""
    ckpt_root = run_dir / RUN_CHECKPOINTS
    folder = ckpt_root / f"step-{step:06d}"
    with atomic_folder(folder) as tmp:
        save_checkpoint(model, tmp, extra={"step": step, **extra})
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
            tmp / STATE_FILE,
        )
    atomic_write_text(ckpt_root / LATEST, folder.name)
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / RUN_CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / STATE_FILE).is_file() else None


def stop_reason(run_dir: Path) -> str:
    """The KILLED reason of a run stopped by a signal: how to go on, where it can."""
    if latest_checkpoint(run_dir) is None:
        how = "before its first checkpoint: nothing to resume, run it again"
    else:
        how = f"resume with --resume {run_dir}"
    return f"stopped by {signals.name()}; {how}"


def checkpoint_step(folder: str | os.PathLike) -> int:
    """The step a saved step folder was written at."""
    state = Path(folder) / STATE_FILE
    if not state.is_file():
        raise FileNotFoundError(f"{folder}: not a training checkpoint (no {STATE_FILE})")
    return int(torch.load(state, map_location="cpu", weights_only=True)["step"])


def install_checkpoint(folder: str | os.PathLike, run_dir: str | os.PathLike) -> int:
    """Copy a saved step folder (e.g. one a sweep restored from its storage) into `run_dir` as
    its latest checkpoint, so `train(..., resume=True)` continues from it; returns its step."""
    folder, run_dir = Path(folder), Path(run_dir)
    step = checkpoint_step(folder)
    ckpt_root = run_dir / RUN_CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    target = ckpt_root / f"step-{step:06d}"
    with atomic_folder(target) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
    for newer in ckpt_root.glob("step-*"):  # states past the installed one are not trusted
        if newer.is_dir() and newer.name > target.name:
            shutil.rmtree(newer, ignore_errors=True)
    atomic_write_text(ckpt_root / LATEST, target.name)
    return step


def _load_state(folder: Path, model, optimizer, scheduler) -> int:
    from safetensors.torch import load_file

    from dloral.model.checkpoint import load_into

    report = load_into(model, load_file(folder / "dloral.safetensors"), str(folder))
    if not report.clean:
        raise RuntimeError(f"cannot resume from {folder}: {report.summary()}")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


# ----- validation ------------------------------------------------------------------------
@torch.no_grad()
def validate(model: DLoRAL, cfg: TrainConfig, ctx) -> tuple[dict[str, float], torch.Tensor]:
    """PSNR/SSIM/temporal error on the first frames of a few validation clips; returns the
    metrics and one LQ | output | GT strip for logging. The prompt is the run's source as at
    inference (`TrainingPrompts.for_inference`), empty when ctx has no "prompts"."""
    from dloral.model.pipeline import UpscaleOptions, VideoUpscaler

    stage = model.stage
    model.set_stage("inference")
    up = VideoUpscaler(
        model,
        ctx["device"],
        torch.float32,
        UpscaleOptions(
            scale=cfg.data.sampler.scale,
            process_size=0,
            batch_size=cfg.data.val_frames,
            seed=cfg.run.seed,
        ),
        prompt=ctx["prompts"].for_inference() if "prompts" in ctx else None,  # None: empty
    )
    scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "temporal_change": []}
    strip = None
    for clip in ctx["val_clips"]:
        pairs = [
            (n, lq, gt)
            for (n, lq, gt), _ in zip(clip.frame_pairs(), range(cfg.data.val_frames), strict=False)
        ]
        outs = torch.stack([o for _, o in up.upscale((n, lq) for n, lq, _ in pairs)])
        gts = torch.stack([g for _, _, g in pairs])
        scores["psnr"].append(psnr(outs, gts))
        scores["ssim"].append(ssim(outs, gts))
        scores["temporal_change"].append(temporal_change_error(outs, gts))
        if strip is None:
            lq_up = resize_frames(pairs[0][1][None], tuple(gts.shape[-2:]))[0]
            strip = torch.cat([lq_up, outs[0], gts[0]], dim=-1)
    model.set_stage(stage)
    # data.val_clips = 0: no validation clips, no scores
    return {k: sum(v) / len(v) for k, v in scores.items() if v}, strip


# ----- the loop ------------------------------------------------------------------------------
def default_run_dir(cfg: TrainConfig) -> Path:
    """A new folder per run: rerunning an experiment never clobbers one."""
    return Path(cfg.run.output_dir) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    tracker: Callable | None = None,
    progress: Callable[[int, StepPlan, dict], None] | None = None,
    on_validation: Callable[[int, dict[str, float], Path | None], None] | None = None,
    on_checkpoint: Callable[[int, Path | None], None] | None = None,
) -> RunResult:
    """Run (or resume) one training run in `run_dir`. `tracker` is a logging sink (see
    dloral.train.tracking); `progress(step, plan, losses)` is called after every step;
    `on_validation(step, val_metrics, checkpoint)` after each validation, with the checkpoint
    folder saved at that step (None if the cadences differ) - the hook a sweep reports through;
    `on_checkpoint(step, checkpoint)` after each checkpoint.

    The run uses `cfg.resolved()`, saved as <run_dir>/config.toml before anything is built and
    never changed after: training again from that file repeats the run step for step.

    With `run.workers` > 1 this is one process of a torch.distributed group of that size: the
    tracker and `progress` are used on rank 0 only, the hooks are called on every rank (with
    empty metrics and no checkpoint on the others), and only rank 0 writes `run_dir`; the others
    read their checkpoint to resume from their own `run_dir`."""
    from dloral.train.tracking import NullTracker

    rank, world = process_group()
    if world != cfg.run.workers:
        raise ValueError(
            f"run.workers = {cfg.run.workers}, but this process is one of {world}: a data-parallel "
            "run starts its processes with `dloral-exp train --workers N` (Ray Train) or torchrun"
        )
    lead = rank == 0
    if not lead:
        tracker, progress = None, None
    tracker = tracker or NullTracker()
    prepare_first_use(cfg.model)
    require_weights(missing_training_weights(cfg))  # all missing weights at once, nothing built
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # set by the launcher
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    (run_dir / RUN_CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; resume it or choose another dir")
    cfg = cfg.resolved()
    saved = cfg.to_toml_str()
    if lead:
        atomic_write_text(run_dir / "config.toml", saved)
    torch.manual_seed(cfg.run.seed)

    model = DLoRAL(cfg.model).to(device)
    if cfg.optim.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    trainable = _all_trainable(model)
    clipped = _clipped(model, trainable, cfg.optim.clip)
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(
        cfg.optim.lr_schedule,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.run.max_steps,
    )
    start = 0
    if resume:
        folder = latest_checkpoint(run_dir)
        if folder is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
        start = _load_state(folder, model, optimizer, scheduler)
        log.info("resumed %s at step %d", run_dir, start)

    ctx = {"device": device, "lpips": None, "csd": None, "lpips_source": "not used"}
    ctx["rank"], ctx["world"] = rank, world
    ctx["forward"] = _replicated(model, trainable, world)
    ctx["lpips"], ctx["lpips_source"] = _lpips(cfg, device)
    ctx["temporal"], ctx["clipped"] = cfg.loss.temporal, clipped
    ctx["nonfinite_csd"] = cfg.loss.nonfinite_csd
    ctx["prompts"] = TrainingPrompts(cfg.loss, model.encode_prompt, device)
    if resume:
        ctx["prompts"].load(run_dir)
    with torch.no_grad():
        ctx["neg"] = model.encode_prompt([cfg.loss.neg_prompt]).to(device)
    if cfg.loss.weights.csd > 0:
        ctx["csd"] = losses.CSDLoss(
            _frozen_pretrained_unet(model).to(device),
            cfg_scale=cfg.loss.cfg_csd,
            min_step_ratio=cfg.loss.min_dm_step_ratio,
            max_step_ratio=cfg.loss.max_dm_step_ratio,
        )
    data = cfg.data
    val = read_dataset(data.val_kind, _prepared(data.val_path(), data.val_root), lq=data.val_lq)
    ctx["val_clips"] = val.clips[: data.val_clips]
    dataset = _training_set(cfg, cfg.effective_batch)
    share = cfg.optim.batch_size * cfg.optim.grad_accum  # this process's samples per step
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size,
        num_workers=data.workers,
        sampler=worker_indices(start, cfg.run.max_steps, share, rank, world),
    )
    batches = iter(loader)

    tracker.start(
        cfg,
        run_dir,
        resume,
        {
            "lpips_weights": ctx["lpips_source"],
            "backbone_weights": model.weights,  # "random-init", "tiny-pretrained-vae", a folder
            **({"vae_weights": model.vae_weights} if model.vae_weights else {}),
            **({"vae_sha256": model.vae_sha256} if model.vae_sha256 else {}),
            "spynet": model.spynet_weights,  # "random-init" or the file (+ its sha256)
            **({"spynet_sha256": model.spynet_sha256} if model.spynet_sha256 else {}),
            "device": str(device),
            **distribution(cfg),
        },
    )
    hooks = _Hooks(tracker, progress, on_validation, on_checkpoint)
    try:
        result = _loop(
            cfg, run_dir, model, optimizer, scheduler, trainable, ctx, batches, start, hooks
        )
    except TrainingDiverged:
        raise  # already marked FAILED with its reason
    except KeyboardInterrupt:
        with signals.deferred():
            tracker.finish("KILLED", stop_reason(run_dir))
        raise
    except SystemExit:
        raise  # the host ends this process (Ray Tune stopping a trial) and owns the run's status
    except BaseException as err:
        tracker.finish("FAILED", f"{type(err).__name__}: {err}")
        raise
    if cfg.to_toml_str() != saved:  # a guard for the recipe's own code: config.toml is what ran
        raise RuntimeError(f"the recipe changed its config after saving {run_dir / 'config.toml'}")
    return result


class _Hooks(NamedTuple):
    tracker: Any
    progress: Callable | None
    on_validation: Callable | None
    on_checkpoint: Callable | None


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a torch.distributed process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distribution(cfg: TrainConfig) -> dict[str, Any]:
    """How a run is spread, as every run records it: workers, effective batch, backend."""
    import torch.distributed as dist

    _, world = process_group()
    return {
        "workers": world,
        "effective_batch": cfg.effective_batch,
        "backend": dist.get_backend() if world > 1 else "none (one process)",
    }


def _replicated(model: DLoRAL, trainable: list[torch.nn.Parameter], world: int):
    """What the loop calls for restore_latent: the model itself in one process, else a
    DistributedDataParallel wrapper whose backward averages the gradients over the processes.

    One wrapper serves both stages. It is built over every parameter either stage trains, with
    find_unused_parameters: the stage's frozen parameters (and CFR layers a variant bypasses)
    are then marked unused in each step instead of failing the reduction, and DDP leaves the
    gradient of a parameter that no rank used untouched (None), exactly as in one process.
    Without find_unused_parameters the first detail step fails the reduction. A wrapper rebuilt
    over each stage's parameters at every switch would all-reduce half as much (16 instead of 33
    MB per step for sd21, under 1 ms on NVLink), was no faster beyond noise on CPU
    (benchmarks/results/ddp-wrapping-tiny-cpu.json), and still needs find_unused_parameters
    for the no_gate and off CFR variants, which leave CFR layers unused."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    stage = model.stage
    for q in trainable:  # DDP reduces the parameters that require grad when it is built
        q.requires_grad_(True)
    try:
        return DistributedDataParallel(
            model, forward_sync_buffers=False, find_unused_parameters=True
        )
    finally:
        model.set_stage(stage)


def _mean_over_workers(values: dict[str, float], ctx) -> dict[str, float]:
    """The mean of each value over the processes: what one process with every micro-batch
    would log."""
    if ctx["world"] == 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    # on the training device: nccl reduces CUDA tensors only
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx["device"])
    dist.all_reduce(t)
    return {k: float(v) / ctx["world"] for k, v in zip(keys, t.tolist(), strict=True)}


def _loop(
    cfg, run_dir, model, optimizer, scheduler, trainable, ctx, batches, start, hooks: _Hooks
) -> RunResult:
    tracker, progress, on_validation, on_checkpoint = hooks
    rank, world, forward = ctx["rank"], ctx["world"], ctx["forward"]
    lead = rank == 0
    status, last_ckpt, metrics = "finished", latest_checkpoint(run_dir), {}
    # fp16 needs loss scaling; bf16 and fp32 do not
    fp16 = ctx["device"].type == "cuda" and cfg.optim.mixed_precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    stage = None
    start_metrics = {}
    if start == 0 and lead:  # the model before training: the curve's first point, the bar to pass
        start_metrics, strip = validate(model, cfg, ctx)
        tracker.log_metrics({f"val/{k}": v for k, v in start_metrics.items()}, 0)
        if strip is not None:
            tracker.log_image(strip, "samples/step-000000.png", STRIP_LABELS)
    t_last = time.perf_counter()
    for step in range(start, cfg.run.max_steps):
        p = plan(step, cfg.schedule, cfg.loss.weights)
        if p.stage != stage:
            model.set_stage(p.stage)
            tracker.log_metrics({"stage_is_detail": float(p.stage == "detail")}, step)
            stage = p.stage
        totals: dict[str, float] = {}
        accum = cfg.optim.grad_accum
        for micro in range(accum):
            slot = rank * accum + micro  # this micro-batch's place among the step's samples
            gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step * 101 + slot)
            # gradients are averaged over the processes once, in the last micro-step's backward
            sync = forward.no_sync() if world > 1 and micro < accum - 1 else nullcontext()
            with sync:
                with _autocast(cfg, ctx["device"]):
                    terms = step_losses(model, next(batches), p, ctx, gen)
                scaler.scale(terms["total"] / accum).backward()
            for k, v in terms.items():
                share = 1 if k == CSD_ZEROED else accum  # a count adds up, a loss is averaged
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / share
        totals = _mean_over_workers(totals, ctx)
        if CSD_ZEROED in totals:  # the count over every process, not their mean
            totals[CSD_ZEROED] = float(round(totals[CSD_ZEROED] * world))
        if not all(map(math.isfinite, totals.values())):  # every rank stops at the same step
            tracker.log_metrics({"diverged_at_step": float(step)}, step)
            tracker.finish("FAILED", f"non-finite loss at step {step}: {totals}")
            hint = ""
            if not math.isfinite(totals.get("csd", 0.0)) and ctx["nonfinite_csd"] == "stop":
                hint = "; loss.nonfinite_csd = 'zero' counts a non-finite CSD pair as 0 instead"
            raise TrainingDiverged(
                f"loss became non-finite at step {step} ({totals}); "
                f"last good checkpoint: {last_ckpt}{hint}"
            )
        zeroed = totals.get(CSD_ZEROED, 0.0)
        if zeroed and lead:
            log.warning(
                "step %d: the CSD loss of %d frame pair(s) was not finite and counts as 0 "
                "(loss.nonfinite_csd = 'zero')",
                step,
                zeroed,
            )
        scaler.unscale_(optimizer)
        if cfg.optim.grad_clip > 0:
            _clip_gradients(ctx["clipped"], cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if progress:
            progress(done, p, totals)
        if done % cfg.run.log_every == 0 or done == cfg.run.max_steps:
            now = time.perf_counter()
            rate = cfg.run.log_every / max(now - t_last, 1e-9)
            t_last = now
            tracker.log_metrics(
                {f"train/{p.stage}/{k}": v for k, v in totals.items()}
                | {"lr": scheduler.get_last_lr()[0], "it_per_s": rate, "transition": p.transition},
                done,
            )
        elif zeroed:  # recorded at its step, not only at the next logged one
            tracker.log_metrics({f"train/{p.stage}/{CSD_ZEROED}": zeroed}, done)
        validated = done % cfg.run.validate_every == 0 or done == cfg.run.max_steps
        if validated and lead:
            metrics, strip = validate(model, cfg, ctx)
            tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, done)
            if strip is not None:
                tracker.log_image(strip, f"samples/step-{done:06d}.png", STRIP_LABELS)
        saved = None
        checkpointed = done % cfg.run.checkpoint_every == 0 or done == cfg.run.max_steps
        if checkpointed and lead:
            saved = last_ckpt = _save_state(
                run_dir,
                model,
                optimizer,
                scheduler,
                done,
                cfg.run.keep_checkpoints,
                {"stage": p.stage},
            )
            _record_prompts(run_dir, ctx["prompts"], tracker)
        if checkpointed and on_checkpoint:
            on_checkpoint(done, saved)
        if validated and on_validation:
            on_validation(done, metrics, saved)
    tracker.log_checkpoint(last_ckpt)
    tracker.finish("FINISHED")
    if lead:
        atomic_write_text(
            run_dir / "result.json",
            json.dumps(
                {
                    "status": status,
                    "step": cfg.run.max_steps,
                    "checkpoint": str(last_ckpt),
                    "metrics": metrics,
                    **({"start_metrics": start_metrics} if start_metrics else {}),
                    **distribution(cfg),
                },
                indent=2,
            ),
        )
    return RunResult(
        run_dir,
        status,
        cfg.run.max_steps,
        last_ckpt,
        metrics,
        getattr(tracker, "run_id", None),
        start_metrics,
    )


def _autocast(cfg: TrainConfig, device: torch.device):
    """Mixed precision on CUDA only (bf16 for auto); CPU trains in fp32."""
    mode = cfg.optim.mixed_precision
    if device.type != "cuda" or mode == "no":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def _all_trainable(model: DLoRAL) -> list[torch.nn.Parameter]:
    """Parameters trained in either stage (one optimizer; a frozen stage just gives no grad)."""
    params = {}
    for stage in ("consistency", "detail"):
        model.set_stage(stage)
        params.update({id(q): q for q in model.trainable_parameters()})
    model.set_stage("inference")
    return list(params.values())


def _clipped(model: DLoRAL, trainable: list, clip: str) -> list[torch.nn.Parameter]:
    """The parameters whose joint gradient norm `optim.grad_clip` bounds: every trained one
    (`all`), or the Detail-LoRA's only (`detail`, the reference's `param_groups[0]`).

    Here a stage trains conv_in's base layer and its own adapter only, so in the consistency
    stage the D-LoRA has no gradient and `detail` clips nothing. Not so in the reference: its
    `set_train_consistency` ends with `unet.conv_in.requires_grad_(True)`, which also makes
    conv_in's D-LoRA trainable (as `set_train_quality` does conv_in's C-LoRA), so conv_in's
    D-LoRA gets gradients in the consistency stage and `param_groups[0]` clipping applies to
    them. A known difference (experiments/README.md), deliberately kept."""
    if clip == "all":
        return trainable
    return [q for _, q in lora.adapter_parameters(model.unet, "detail")]


def _clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_([q for q in params if q.grad is not None], max_norm)


def _record_prompts(run_dir: Path, prompts: TrainingPrompts, tracker) -> None:
    """Tagged prompts: the run folder's prompts.json (read on resume) and the run's table."""
    if prompts.tagger is None:
        return
    rows = prompts.take_unlogged()
    if rows["prompt"]:
        tracker.log_table(rows, "prompts.json")
    prompts.save(run_dir)


def _lpips(cfg: TrainConfig, device):
    if cfg.loss.weights.lpips <= 0:
        return None, "not used (weight 0)"
    try:
        net = losses.load_lpips(device)
        return net, str(net.weights_source)
    except losses.WeightsMissing as err:
        if cfg.loss.lpips == "required":
            raise
        log.warning("LPIPS terms dropped: %s", err)
        return None, f"missing: {str(err).splitlines()[0]}"
