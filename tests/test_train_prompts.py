"""Training prompts (loss.prompt_source): empty, fixed, or tagged per sample as the reference."""

import json

import pytest
import torch

from dloral.data.sampler import TrainingClips
from dloral.model.dloral import DLoRAL
from dloral.train import losses, recipe
from dloral.train.config import LossConfig, load_config
from dloral.train.prompts import PROMPTS_FILE, TrainingPrompts
from dloral.train.recipe import train
from dloral.train.tracking import MlflowTracker
from dloral.weights import WeightsMissing

COLOURS = ("red", "green", "blue")
TAGGERS = []  # every tagger the factory made, newest last


def make_colour_tagger(device):
    """A small deterministic tagger: the frame's dominant colour and its brightness in 20ths.
    Records the frames it saw and whether gradients were on."""

    def tag(frame):
        tag.frames.append(frame.detach().clone())
        tag.grad_enabled.append(torch.is_grad_enabled())
        means = frame.mean(dim=(1, 2))
        return f"{COLOURS[int(means.argmax())]}, brightness {round(float(means.mean()) * 20)}"

    tag.frames, tag.grad_enabled = [], []
    TAGGERS.append(tag)
    return tag


TAGGER = "test_train_prompts:make_colour_tagger"


def _toml(v):
    return f'"{v}"' if isinstance(v, str) else str(v)


def _cfg(roots, **extra):
    sets = {
        "data.train_root": str(roots / "train"),
        "data.val_root": str(roots / "val"),
        "data.val_clips": 1,
        "data.val_frames": 2,
        "data.sampler.crop": 64,
        "optim.grad_accum": 1,
        "optim.batch_size": 2,
        "optim.lr": 1e-3,
        "run.max_steps": 1,
        "run.checkpoint_every": 100,
        "run.validate_every": 100,
        "schedule.kind": "periodic",
        "schedule.first_stage": "detail",  # CSD runs from the first step
        "schedule.alternation_period": 100,
        "schedule.transition_steps": 0,
        "loss.lpips": "optional",
        "loss.prompt_source": "tagger",
        "loss.tagger": TAGGER,
        "loss.pos_prompt": "high quality",
        # all-random: the pretrained tiny one step ignores its prompt until trained (its UNet's
        # output layer starts at zero) and its CSD teacher predicts no noise
        "model.tiny_init": "random",
        **extra,
    }
    return load_config(None, [f"{k}={_toml(v)}" for k, v in sets.items()])


@pytest.fixture
def spies(monkeypatch):
    """Record what reaches the text encoder, the generator's UNet step and the CSD call."""
    seen = {"encoded": [], "generator": [], "csd": [], "samples": []}
    encode, restore = DLoRAL.encode_prompt, DLoRAL.restore_latent
    csd_forward, getitem = losses.CSDLoss.forward, TrainingClips.__getitem__

    def encode_spy(self, texts):
        out = encode(self, texts)
        seen["encoded"].append((list(texts), out.clone()))
        return out

    def restore_spy(self, current, previous, current_lq, previous_lq, prompt_embeds):
        seen["generator"].append(prompt_embeds.clone())
        return restore(self, current, previous, current_lq, previous_lq, prompt_embeds)

    def csd_spy(self, latents, pos_embeds, neg_embeds, **kw):
        seen["csd"].append(pos_embeds.clone())
        return csd_forward(self, latents, pos_embeds, neg_embeds, **kw)

    def getitem_spy(self, index):
        sample = getitem(self, index)
        seen["samples"].append(sample)
        return sample

    monkeypatch.setattr(DLoRAL, "encode_prompt", encode_spy)
    monkeypatch.setattr(DLoRAL, "restore_latent", restore_spy)
    monkeypatch.setattr(losses.CSDLoss, "forward", csd_spy)
    monkeypatch.setattr(TrainingClips, "__getitem__", getitem_spy)
    return seen


def test_tags_of_gt_frame_1_reach_the_text_encoder_the_generator_and_csd(
    data_roots, tmp_path, spies
):
    got = []
    train(_cfg(data_roots), run_dir=tmp_path / "t", progress=lambda s, p, t: got.append(t))
    tagger = TAGGERS[-1]
    samples = spies["samples"][:2]  # the one step's batch of two
    # validation tags its clip's first upsampled LQ frame, as inference does, before training
    # (step 0) and at the end; each sample is tagged once, from its GT frame 1 in [0, 1];
    # none of it with gradient
    assert len(tagger.frames) == 4 and not any(tagger.grad_enabled)
    assert torch.equal(tagger.frames[0], tagger.frames[3])
    for frame, sample in zip(tagger.frames[1:3], samples, strict=True):
        assert torch.equal(frame, sample["gt"][1])
    tags = [make_colour_tagger(None)(s["gt"][1]) for s in samples]
    prompts = [f"{t}, high quality" for t in tags]  # the reference's f"{caption}, {pos_prompt}"
    encoded = dict((tuple(texts), out) for texts, out in spies["encoded"])
    assert tuple(prompts) in encoded
    per_pair = encoded[tuple(prompts)].repeat_interleave(2, dim=0)  # 3 frames: 2 pairs each
    # the generator's text condition in the training step (validation's calls come first)
    assert any(torch.equal(g, per_pair) for g in spies["generator"])
    assert torch.equal(spies["csd"][0], per_pair)  # and CSD's positive prompt
    validation = [t for t, _ in spies["encoded"] if t[0].endswith(", high quality,")]
    assert validation == [[f"{make_colour_tagger(None)(tagger.frames[0])}, high quality,"]] * 2

    # the same step with the empty prompt gives other losses
    spies["samples"].clear()
    empty = []
    cfg = _cfg(data_roots, **{"loss.prompt_source": "empty", "loss.pos_prompt": ""})
    train(cfg, run_dir=tmp_path / "e", progress=lambda s, p, t: empty.append(t))
    assert torch.equal(spies["samples"][0]["gt"], samples[0]["gt"])  # same data
    assert ("",) in dict((tuple(t), o) for t, o in spies["encoded"])
    assert got[0]["l2"] != pytest.approx(empty[0]["l2"], rel=1e-6)
    assert got[0]["csd"] != pytest.approx(empty[0]["csd"], rel=1e-6)


def test_a_sample_is_tagged_once_recorded_and_not_retagged_on_resume(
    data_roots, tmp_path, monkeypatch
):
    one_sample = TrainingClips.__getitem__
    monkeypatch.setattr(TrainingClips, "__getitem__", lambda self, i: one_sample(self, 0))
    tracker = MlflowTracker("t", uri=f"sqlite:///{tmp_path}/mlflow.db")
    extra = {"optim.batch_size": 1, "run.max_steps": 3, "run.checkpoint_every": 1}
    run_dir = tmp_path / "r"
    train(_cfg(data_roots, **extra), run_dir=run_dir, tracker=tracker)
    # three steps over one sample: tagged once; validation tags its clip before and after
    assert len(TAGGERS[-1].frames) == 3
    table = json.loads((run_dir / PROMPTS_FILE).read_text())
    assert table["clip"] == ["bikes"] and table["prompt"][0].endswith(", high quality")

    resumed = MlflowTracker("t", uri=f"sqlite:///{tmp_path}/mlflow.db")
    train(_cfg(data_roots, **{**extra, "run.max_steps": 4}), run_dir, True, resumed)
    assert resumed.run_id == tracker.run_id
    assert len(TAGGERS[-1].frames) == 1  # validation only: the resumed run read its prompts
    path = tracker.client.download_artifacts(tracker.run_id, PROMPTS_FILE, str(tmp_path))
    logged = json.loads(open(path).read())
    assert logged["columns"] == ["clip", "start", "seed", "prompt"]
    assert logged["data"] == [["bikes", table["start"][0], table["seed"][0], table["prompt"][0]]]


def test_tagger_source_without_a_module_fails_before_any_model_is_built(
    data_roots, tmp_path, monkeypatch
):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(recipe, "DLoRAL", no_model)
    with pytest.raises(WeightsMissing, match="loss.tagger = 'module:factory'"):
        train(_cfg(data_roots, **{"loss.tagger": "none"}), run_dir=tmp_path / "a")
    with pytest.raises(WeightsMissing, match="module 'no_such_tagger_module' is not importable"):
        train(_cfg(data_roots, **{"loss.tagger": "no_such_tagger_module:make"}), tmp_path / "b")


def test_fixed_and_empty_sources_encode_one_prompt_once():
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.full((len(texts), 77, 8), float(len(texts[0])))

    batch = {"gt": torch.zeros(3, 3, 3, 8, 8)}
    fixed = TrainingPrompts(LossConfig(prompt_source="fixed", pos_prompt="sharp"), encode, "cpu")
    assert fixed.prompts(batch) == ["sharp"] * 3
    assert fixed.embeds(batch).shape == (1, 77, 8) and fixed.embeds(batch)[0, 0, 0] == 5
    empty = TrainingPrompts(LossConfig(), encode, "cpu")
    assert empty.prompts(batch) == [""] * 3
    assert calls == [["sharp"], [""]]  # once each, at the start of the run


def test_cached_tags_are_per_sample():
    tag = make_colour_tagger(None)
    prompts = TrainingPrompts(
        LossConfig(prompt_source="tagger", pos_prompt="x"),
        lambda texts: torch.zeros(len(texts), 77, 8),
        "cpu",
        tagger=tag,
    )
    gt = torch.zeros(2, 3, 3, 8, 8)
    gt[0, 1, 0], gt[1, 1, 2] = 1.0, 0.5  # sample 0 red, sample 1 blue
    batch = {
        "gt": gt,
        "clip": ["a", "a"],
        "start": torch.tensor([0, 0]),
        "seed": torch.tensor([1, 2]),
    }
    assert prompts.prompts(batch) == ["red, brightness 7, x", "blue, brightness 3, x"]
    assert prompts.embeds(batch).shape == (2, 77, 8)
    assert len(tag.frames) == 2  # the second call read the cache
