import math

import numpy as np
import pytest
import torch
from PIL import Image

from dloral.data.sampler import TrainingClips
from dloral.model.checkpoint import _trained_state
from dloral.tracking import flatten
from dloral.train import recipe
from dloral.train.config import load_config
from dloral.train.recipe import TrainingDiverged, latest_checkpoint, train
from dloral.train.tracking import MlflowTracker, NullTracker


def _cfg(roots, **extra):
    sets = {
        "data.train_root": str(roots / "train"),
        "data.val_root": str(roots / "val"),
        "data.val_clips": 1,
        "data.val_frames": 2,
        "data.sampler.crop": 64,
        "optim.grad_accum": 1,
        "optim.lr": 1e-3,
        "run.max_steps": 4,
        "run.checkpoint_every": 2,
        "run.validate_every": 4,
        "run.log_every": 1,
        "schedule.kind": "periodic",
        "schedule.alternation_period": 2,
        "schedule.transition_steps": 0,
        "loss.lpips": "optional",
        **extra,
    }
    return load_config(None, [f"{k}={_toml(v)}" for k, v in sets.items()])


def _toml(v):
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def _state(run_dir):
    from safetensors.torch import load_file

    return load_file(latest_checkpoint(run_dir) / "dloral.safetensors")


def test_resume_follows_the_uninterrupted_trajectory(data_roots, tmp_path):
    straight = train(_cfg(data_roots), run_dir=tmp_path / "a")
    assert straight.step == 4 and straight.status == "finished"
    train(_cfg(data_roots, **{"run.max_steps": 2}), run_dir=tmp_path / "b")
    resumed = train(_cfg(data_roots), run_dir=tmp_path / "b", resume=True)
    assert resumed.step == 4
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stages_follow_the_schedule_and_freeze(data_roots, tmp_path):
    seen = []
    cfg = _cfg(data_roots, **{"run.max_steps": 2, "run.validate_every": 100})
    initial = _trained_state(recipe.DLoRAL(cfg.model))
    train(cfg, run_dir=tmp_path / "r", progress=lambda s, p, _: seen.append((s, p.stage)))
    assert seen == [(1, "consistency"), (2, "consistency")]
    after = _state(tmp_path / "r")
    changed = {k for k in after if not torch.equal(after[k], initial[k])}
    assert any(".consistency." in k for k in changed)
    assert any(k.startswith("cfr.cross_attn_module.") for k in changed)
    assert not any(".detail." in k for k in changed)  # D-LoRA frozen in the consistency stage
    assert not any(k.startswith("cfr.spynet.") for k in changed)


def test_loss_decreases_when_overfitting(data_roots, tmp_path, monkeypatch):
    one_sample = TrainingClips.__getitem__
    monkeypatch.setattr(TrainingClips, "__getitem__", lambda self, i: one_sample(self, 0))
    l2 = []
    cfg = _cfg(
        data_roots,
        **{
            "run.max_steps": 20,
            "schedule.alternation_period": 100,
            "run.validate_every": 100,
            "run.checkpoint_every": 100,
            "optim.lr": 1e-2,
        },
    )
    train(cfg, run_dir=tmp_path / "o", progress=lambda s, p, losses: l2.append(losses["l2"]))
    # one sample's L2 moves with its posterior draw and noise: means of 5 steps, measured 0.61x
    assert sum(l2[-5:]) / 5 < 0.85 * sum(l2[:5]) / 5


@pytest.mark.parametrize("nonfinite_csd", ["stop", "zero"])  # "zero" spares CSD only
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    data_roots, tmp_path, monkeypatch, nonfinite_csd
):
    real = recipe.losses.temporal_consistency_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * math.nan if len(calls) == 3 else value

    monkeypatch.setattr(recipe.losses, "temporal_consistency_loss", poisoned)
    tracker = MlflowTracker("t", uri=f"sqlite:///{tmp_path}/mlflow.db")
    cfg = _cfg(data_roots, **{"loss.nonfinite_csd": nonfinite_csd})
    with pytest.raises(TrainingDiverged, match="step 2"):
        train(cfg, run_dir=tmp_path / "n", tracker=tracker)
    assert latest_checkpoint(tmp_path / "n").name == "step-000002"
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "step 2" in run.data.tags["dloral.status_reason"]


def _detail_step(bikes_lq, teacher_wrap=None, nonfinite_csd="zero"):
    """One detail-stage step_losses on two 3-frame samples (2 pairs each) of real frames, with a
    random (teaching) CSD teacher, optionally wrapped; returns its terms, the model and the
    per-pair CSD losses it computed."""
    from dloral.train.losses import CSDLoss
    from dloral.train.prompts import TrainingPrompts
    from dloral.train.schedule import StepPlan

    cfg = load_config(None, ['model.tiny_init="random"'])
    torch.manual_seed(0)
    model = recipe.DLoRAL(cfg.model)
    model.set_stage("detail")
    teacher = recipe._frozen_pretrained_unet(model)
    csd = CSDLoss(teacher_wrap(teacher) if teacher_wrap else teacher)
    seen = []
    real_pair_losses = csd.pair_losses
    csd.pair_losses = lambda *a, **k: seen.append(real_pair_losses(*a, **k)) or seen[-1]
    ctx = {
        "device": torch.device("cpu"),
        "prompts": TrainingPrompts(cfg.loss, model.encode_prompt, torch.device("cpu")),
        "lpips": None,
        "temporal": "warped",
        "csd": csd,
        "neg": model.encode_prompt([cfg.loss.neg_prompt]),
        "nonfinite_csd": nonfinite_csd,
    }
    gt = torch.stack([bikes_lq[0:3], bikes_lq[3:6]])  # (2, 3, 3, 48, 64)
    lq = torch.nn.functional.interpolate(gt.flatten(0, 1), scale_factor=0.25, mode="area")
    batch = {"gt": gt, "lq": lq.view(2, 3, 3, 12, 16)}
    p = StepPlan(0, "detail", l2=1.0, lpips=0.0, csd=1.0, consistency=10.0, transition=1.0)
    terms = recipe.step_losses(model, batch, p, ctx, torch.Generator().manual_seed(1))
    return terms, model, seen[0].detach()


def test_zeroed_csd_pair_counts_0_and_the_other_pair_its_normal_loss(bikes_lq, nan_teacher):
    clean, _, clean_pairs = _detail_step(bikes_lq)
    stopping, _, _ = _detail_step(bikes_lq, nonfinite_csd="stop")
    assert torch.isfinite(clean_pairs).all() and (clean_pairs > 0).all()
    assert clean[recipe.CSD_ZEROED] == 0 and recipe.CSD_ZEROED not in stopping
    assert clean["csd"] == stopping["csd"] == clean_pairs.sum()  # nothing zeroed: the same loss
    # latent 2 is sample 1's pair 0 (sample-major): pair 0's loss is NaN, and counts as 0
    terms, model, pairs = _detail_step(bikes_lq, lambda u: nan_teacher(u, [2]))
    assert pairs[0].isnan() and pairs[1] == clean_pairs[1]
    assert terms[recipe.CSD_ZEROED] == 1
    assert terms["csd"] == clean_pairs[1]
    assert torch.isfinite(terms["total"])
    assert terms["total"] == sum(terms[k] for k in ("l2", "consistency", "csd"))
    terms["total"].backward()
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("nonfinite_csd", ["stop", "zero"])
def test_nan_csd_pair_stops_the_run_or_is_zeroed_logged_and_warned(
    data_roots, tmp_path, monkeypatch, caplog, nan_teacher, nonfinite_csd
):
    frozen = recipe._frozen_pretrained_unet
    monkeypatch.setattr(recipe, "_frozen_pretrained_unet", lambda m: nan_teacher(frozen(m), [0]))
    sets = {
        "loss.nonfinite_csd": nonfinite_csd,
        "schedule.first_stage": "detail",
        "run.max_steps": 2,
        "run.validate_every": 100,
        "run.log_every": 2,
    }
    recorder = _Recorder()
    if nonfinite_csd == "stop":
        with pytest.raises(TrainingDiverged, match="step 0.*nonfinite_csd = 'zero'"):
            train(_cfg(data_roots, **sets), run_dir=tmp_path / "s", tracker=recorder)
        return
    caplog.set_level("WARNING", logger="dloral.train.recipe")
    result = train(_cfg(data_roots, **sets), run_dir=tmp_path / "z", tracker=recorder)
    assert result.status == "finished"
    zeroed = [(s, v) for s, k, v in recorder.losses if k == "train/detail/csd_zeroed"]
    assert zeroed == [(1, 1.0), (2, 1.0)]  # each step's pair 0, whether logged or not
    csd = [v for _, k, v in recorder.losses if k == "train/detail/csd"]
    assert csd and all(math.isfinite(v) for v in csd)
    warned = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("step 0:")


def test_mlflow_run_records_params_metrics_samples_and_checkpoint(data_roots, tmp_path):
    tracker = MlflowTracker("t", uri=f"sqlite:///{tmp_path}/mlflow.db")
    train(_cfg(data_roots), run_dir=tmp_path / "m", tracker=tracker)
    client, rid = tracker.client, tracker.run_id
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.profile"] == "tiny"
    history = client.get_metric_history(rid, "train/consistency/l2")
    # periodic, period 2: steps 0..2 are consistency (step 0 joins the first stage), 3 detail
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(rid, "train/detail/l2")] == [4]
    assert "train/detail/csd" in run.data.metrics
    assert "val/psnr" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(rid)}
    assert {"checkpoint", "samples", "config.toml"} <= artifacts
    assert run.data.tags["dloral.lpips_weights"].startswith(("missing", "not used", "/"))
    # the param says what the backbone_weights tag says (tiny: random-init, whatever the config)
    random = run.data.tags["dloral.backbone_weights"] == "random-init"
    assert run.data.params["model.random_init"] == str(random)
    # the sample strip (64x64 validation frames: LQ | output | GT) has a band of labels on top
    path = client.download_artifacts(rid, "samples/step-000004.png", str(tmp_path))
    strip = np.asarray(Image.open(path).convert("RGB"))
    assert strip.shape[1] == 3 * 64 and strip.shape[0] > 64
    band = strip[: strip.shape[0] - 64]
    assert band.max() == 255 and band.min() < 128  # white, with dark text


def test_gradient_checkpointing_gives_the_same_step(data_roots, tmp_path):
    for flag in ("false", "true"):
        train(
            _cfg(
                data_roots, **{"run.max_steps": 1, "optim.gradient_checkpointing": flag == "true"}
            ),
            run_dir=tmp_path / flag,
        )
    a, b = _state(tmp_path / "false"), _state(tmp_path / "true")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_train_cli_runs_resumes_and_rejects_unknown_keys(data_roots, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dloral.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    runner = CliRunner()
    bad = runner.invoke(app, ["train", "--set", "optim.lrr=1"])
    assert bad.exit_code == 2 and "optim.lrr" in bad.output
    assert "experiments/default.toml: " in bad.output  # the file, as `sweep` names it
    sets = [
        f"{k}={_toml(v)}"
        for k, v in {
            "data.train_root": str(data_roots / "train"),
            "data.val_root": str(data_roots / "val"),
            "data.val_clips": 1,
            "data.val_frames": 2,
            "data.sampler.crop": 64,
            "run.max_steps": 2,
            "run.checkpoint_every": 1,
            "run.validate_every": 2,
        }.items()
    ]
    args = ["train", "--run-dir", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, args)  # the folder holds a run: refuse to overwrite it
    assert again.exit_code == 2 and "resume" in again.output
    resumed = runner.invoke(
        app, ["train", "--resume", str(tmp_path / "run"), "--set", "run.max_steps=3"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert latest_checkpoint(tmp_path / "run").name == "step-000003"
    # a finished run has nothing to resume: refused before anything is built or rewritten
    config = (tmp_path / "run" / "config.toml").read_bytes()
    done = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
    assert done.exit_code == 2, done.output
    assert "finished at step 3" in done.output and "run.max_steps=N, N > 3" in done.output
    assert (tmp_path / "run" / "config.toml").read_bytes() == config
    # stopped after its last checkpoint, before its end (no result.json yet): it goes on
    (tmp_path / "run" / "result.json").unlink()
    ended = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
    assert ended.exit_code == 0, ended.output
    assert (tmp_path / "run" / "result.json").is_file()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.toml").write_bytes(config)
    none = runner.invoke(app, ["train", "--resume", str(tmp_path / "empty")])
    assert none.exit_code == 2 and "no checkpoint to resume from" in none.output
    from mlflow.tracking import MlflowClient

    run_id = (tmp_path / "run" / "mlflow_run_id").read_text()
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.info.status == "FINISHED"  # the resumed run continued the same MLflow run


def test_detail_stage_trains_on_its_own_shift_set(data_roots, tmp_path, monkeypatch):
    from PIL import Image
    from skimage import data as skdata

    stills = tmp_path / "stills"  # the detail-stage set: real photos as shift pseudo-videos
    stills.mkdir()
    for name in ("coffee", "chelsea"):
        photo = Image.fromarray(getattr(skdata, name)()).resize((128, 96), Image.BOX)
        photo.save(stills / f"{name}.png")
    seen = []
    real = recipe.step_losses

    def spy(model, batch, p, ctx, gen):
        seen.append((p.stage, tuple(batch["clip"])))
        return real(model, batch, p, ctx, gen)

    monkeypatch.setattr(recipe, "step_losses", spy)
    extra = {
        "data.detail.kind": "shift",
        "data.detail.root": str(stills),
        "data.detail.crop_mode": "center",
        "data.shift.max_step": 2,
        "data.sampler.augment": "dihedral",
        "run.validate_every": 100,
    }
    result = train(_cfg(data_roots, **extra), run_dir=tmp_path / "d")
    assert result.step == 4
    # periodic, period 2: steps 0..2 are consistency, step 3 detail
    assert [stage for stage, _ in seen] == ["consistency"] * 3 + ["detail"]
    assert all(clips == ("bikes",) for stage, clips in seen if stage == "consistency")
    assert all(set(clips) <= {"coffee", "chelsea"} for stage, clips in seen if stage == "detail")


def _reference_clip(unet, max_grad_norm):
    """Literal: yjsunnn/DLoRAL@40c1308 src/train_DLoRAL.py: the optimizer's first param group
    is the Detail-LoRA ("quality"; our adapter is named "detail"), and only it is clipped
    (`accelerator.clip_grad_norm_` is torch's on one process)."""
    param_dict = {n: p for n, p in unet.named_parameters()}
    quality_param_names = [n for n in param_dict.keys() if "lora" in n and "detail" in n]
    quality_params = [param_dict[n] for n in quality_param_names]
    param_groups = [
        {"params": quality_params, "name": "quality"},  # lora_quality params
    ]
    optimizer = torch.optim.AdamW(param_groups, lr=5e-5)
    torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], max_grad_norm)


def test_clip_detail_bounds_the_detail_lora_only_as_the_reference(bikes_lq):
    from dloral.model import lora

    model = recipe.DLoRAL(load_config(None).model)
    lora.randomize_lora_b(model.unet, generator=torch.Generator().manual_seed(0))
    trainable = recipe._all_trainable(model)
    model.set_stage("detail")
    lq_up = torch.nn.functional.interpolate(bikes_lq[:3], scale_factor=4, mode="bicubic")
    embeds = model.encode_prompt([""])
    pred, _ = recipe.restore_clip(model, lq_up[None], embeds, torch.Generator().manual_seed(1))
    pred.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    detail = {n for n in grads if ".detail." in n}
    assert detail and grads.keys() - detail  # conv_in trains too, and is not clipped
    max_norm = 0.1 * float(torch.stack([grads[n].norm() for n in detail]).norm())

    def clipped(clip):
        for n, p in model.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
        if clip == "reference":
            _reference_clip(model.unet, max_norm)
        else:
            recipe._clip_gradients(recipe._clipped(model, trainable, clip), max_norm)
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ours, ref, everything = clipped("detail"), clipped("reference"), clipped("all")
    assert all(torch.equal(ours[n], ref[n]) for n in grads)
    assert all(torch.allclose(ours[n], 0.1 * grads[n], rtol=1e-4) for n in detail)
    assert all(torch.equal(ours[n], grads[n]) for n in grads.keys() - detail)
    assert not all(torch.equal(everything[n], grads[n]) for n in grads.keys() - detail)


def test_reference_flow_is_logged_but_trains_nothing(data_roots, tmp_path):
    logged = []
    sets = {"run.max_steps": 2, "run.validate_every": 100}
    flow = _cfg(data_roots, **sets, **{"loss.temporal": "reference_flow"})
    train(flow, run_dir=tmp_path / "f", progress=lambda s, p, t: logged.append(t))
    assert len(logged) == 2 and all(t["consistency"] > 0 for t in logged)
    train(_cfg(data_roots, **sets, **{"loss.weights.consistency": 0.0}), run_dir=tmp_path / "z")
    a, b = _state(tmp_path / "f"), _state(tmp_path / "z")
    assert all(torch.equal(a[k], b[k]) for k in a)  # as training without the term


class _Recorder(NullTracker):
    """What a tracker is given: the config at start (MLflow's params) and every logged loss."""

    def __init__(self):
        self.params, self.losses = None, []

    def start(self, cfg, run_dir, resume, info):
        self.params = flatten(cfg.to_dict())

    def log_metrics(self, metrics, step):
        self.losses += [(step, k, v) for k, v in metrics.items() if k.startswith("train/")]


def test_the_saved_config_is_what_ran_and_training_from_it_repeats_the_run(
    data_roots, tmp_path, monkeypatch
):
    used = []  # (sampler seed, epoch length, index, sample seed) of every sample drawn
    draw = TrainingClips.__getitem__

    def recorded(self, index):
        item = draw(self, index)
        used.append((self.cfg.seed, self.cfg.samples, index, item["seed"]))
        return item

    monkeypatch.setattr(TrainingClips, "__getitem__", recorded)
    # the sampler's seed and epoch are derived: run.seed drives it, the epoch covers every step
    sets = {"run.max_steps": 3, "run.validate_every": 100, "run.seed": 7}
    cfg = _cfg(data_roots, **sets, **{"data.sampler.seed": 0, "data.sampler.samples": 1})
    given = cfg.to_toml_str()
    first = _Recorder()
    train(cfg, run_dir=tmp_path / "a", tracker=first)
    assert cfg.to_toml_str() == given  # the caller's config is not changed either

    saved = load_config(tmp_path / "a" / "config.toml")
    assert (saved.data.sampler.seed, saved.data.sampler.samples) == (7, 3)
    assert {(seed, samples) for seed, samples, _, _ in used} == {(7, 3)}
    assert [i for _, _, i, _ in used] == [0, 1, 2]
    assert first.params == flatten(saved.to_dict())  # MLflow's params are the saved config

    drawn, used[:] = list(used), []
    again = _Recorder()
    train(saved, run_dir=tmp_path / "b", tracker=again)
    assert used == drawn
    assert {step for step, _, _ in first.losses} == {1, 2, 3}
    assert again.losses == first.losses  # every logged loss of every step, bitwise
    a, b = ((tmp_path / run / "config.toml").read_text() for run in "ab")
    assert a == b
