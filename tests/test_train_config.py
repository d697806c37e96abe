"""The typed training config: shipped TOMLs, round trips, overrides, key and type errors."""

import tomllib
from pathlib import Path

import pytest

from dloral.data.embedded import default_dir
from dloral.train.config import (
    DEFAULT_CONFIG,
    REFERENCE_NEG_PROMPT,
    TrainConfig,
    load_config,
)

REFERENCE_CONFIG = DEFAULT_CONFIG.parent / "reference.toml"


def test_default_toml_is_the_fast_cpu_run():
    cfg = load_config()
    assert cfg.model.profile == "tiny"
    assert cfg.schedule.kind == "periodic"
    assert (cfg.schedule.alternation_period, cfg.schedule.transition_steps) == (50, 10)
    assert (cfg.data.sampler.crop, cfg.data.sampler.frames) == (64, 3)
    assert (cfg.run.max_steps, cfg.run.checkpoint_every, cfg.run.validate_every) == (400, 100, 100)
    assert cfg.optim.lr == 1e-4 and cfg.optim.grad_accum == 1
    assert cfg.loss.lpips == "optional"
    assert cfg.data.train_root is None and cfg.data.val_root is None
    assert cfg.data.train_path() == default_dir() / "embedded-train"
    assert cfg.data.val_path() == default_dir() / "embedded-udm10"
    assert load_config(DEFAULT_CONFIG) == cfg


def test_reference_toml_is_the_reference():
    cfg = load_config(REFERENCE_CONFIG)
    assert cfg.model.profile == "sd21"
    assert (cfg.model.consistency.rank, cfg.model.detail.rank) == (4, 4)
    s = cfg.schedule
    assert (s.kind, s.quality_iter, s.quality_iter_1_final, s.quality_iter_2) == (
        "reference",
        5000,
        13000,
        5000,
    )
    assert s.transition_steps == 1000
    w = cfg.loss.weights
    assert (w.l2, w.lpips, w.csd, w.consistency) == (1.0, 2.0, 1.0, 10.0)
    assert (w.lpips_consistency_factor, w.consistency_boost) == (0.02, 2.0)
    assert cfg.loss.cfg_csd == 7.5
    assert (cfg.loss.min_dm_step_ratio, cfg.loss.max_dm_step_ratio) == (0.02, 0.5)
    assert cfg.loss.neg_prompt == REFERENCE_NEG_PROMPT and cfg.loss.lpips == "required"
    assert (cfg.optim.lr, cfg.optim.grad_accum, cfg.optim.batch_size) == (5e-5, 2, 1)
    assert (cfg.run.workers, cfg.effective_batch) == (8, 16)  # 8 GPUs x batch 1 x accum 2
    assert (cfg.data.sampler.crop, cfg.data.sampler.frames, cfg.data.sampler.scale) == (512, 3, 4)
    assert cfg.run.seed == 123


def test_dataclass_defaults_are_the_reference():
    cfg = TrainConfig()
    assert cfg.schedule.kind == "reference"
    assert (cfg.optim.lr, cfg.optim.grad_accum, cfg.data.sampler.crop) == (5e-5, 2, 512)
    assert cfg.loss.neg_prompt.startswith("painting, oil painting") and cfg.loss.lpips == "required"


@pytest.mark.parametrize("path", [DEFAULT_CONFIG, REFERENCE_CONFIG])
def test_round_trips(path, tmp_path):
    cfg = load_config(
        path,
        [
            "model.cfr.topk=8",
            "loss.prompt_source=fixed",  # pos_prompt is used by 'fixed' and 'tagger' only
            "loss.pos_prompt='a \"quoted\" \\t \\\\ é'",  # TOML literal: backslashes kept
            'loss.neg_prompt="tab\\t bell\\u0007 del\\u007f \\"q\\" \\\\"',
        ],
    )
    assert cfg.loss.pos_prompt == 'a "quoted" \\t \\\\ é'
    assert cfg.loss.neg_prompt == 'tab\t bell\x07 del\x7f "q" \\'
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    text = cfg.to_toml_str()
    assert TrainConfig.from_dict(tomllib.loads(text)) == cfg
    saved = tmp_path / "config.toml"
    saved.write_text(text, encoding="utf-8")
    reloaded = load_config(saved)
    assert reloaded == cfg
    assert reloaded.to_toml_str() == text
    assert isinstance(reloaded.optim.betas, tuple)


def test_to_dict_is_plain_data():
    d = TrainConfig().to_dict()
    assert d["optim"]["betas"] == [0.9, 0.999]
    assert d["model"]["cfr"]["topk"] is None
    assert d["loss"]["weights"]["consistency"] == 10.0


def test_none_is_written_and_read_as_the_string_none(tmp_path):
    cfg = load_config(overrides=["data.val_kind=reds4", "data.val_lq=none"])
    assert cfg.data.val_lq is None
    assert 'val_lq = "none"' in cfg.to_toml_str()
    (tmp_path / "c.toml").write_text(cfg.to_toml_str())
    assert load_config(tmp_path / "c.toml").data.val_lq is None


def test_overrides():
    cfg = load_config(
        overrides=[
            "model.cfr.variant=no_gate",
            "model.consistency.rank=8",
            "model.detail.targets=['conv_in']",
            "optim.lr=3e-5",
            "loss.weights.consistency=20",  # int where a float is declared
            "optim.betas=[0.8, 0.99]",
            "optim.gradient_checkpointing=true",
            "data.sampler.crop=128",
            "run.name=123",  # a string field keeps the text
            "run.output_dir=/tmp/x y",
            "schedule.kind=reference",
            "schedule.transition_steps=100",
        ]
    )
    assert cfg.model.cfr.variant == "no_gate"
    assert cfg.model.consistency.rank == 8 and cfg.model.detail.rank == 4
    assert cfg.model.detail.targets == ["conv_in"]
    assert cfg.optim.lr == 3e-5
    w = cfg.loss.weights.consistency
    assert w == 20.0 and isinstance(w, float)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.optim.gradient_checkpointing is True
    assert cfg.data.sampler.crop == 128 and cfg.data.sampler.frames == 3
    assert cfg.run.name == "123"
    assert cfg.run.output_dir == "/tmp/x y"
    assert cfg.schedule.kind == "reference" and cfg.schedule.transition_steps == 100
    assert load_config(overrides=["run.max_steps=7", "run.max_steps=9"]).run.max_steps == 9


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optimizer.lr=1", "optimizer"),
        ("model.cfr.varient=off", "model.cfr.varient"),
        ("loss.weights.lpipss=1", "loss.weights.lpipss"),
        ("data.sampler.cropp=8", "data.sampler.cropp"),
        ("optim.lr.x=1", "optim.lr.x"),
    ],
)
def test_unknown_override_key(override, named):
    with pytest.raises(KeyError, match=named.replace(".", r"\.")) as e:
        load_config(overrides=[override])
    assert "valid" in str(e.value) or "not a table" in str(e.value)


def test_unknown_override_lists_valid_keys_at_that_level():
    with pytest.raises(KeyError) as e:
        load_config(overrides=["optim.lrr=1"])
    assert "grad_accum" in str(e.value) and "max_steps" not in str(e.value)


def test_malformed_override():
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(overrides=["optim.lr"])


@pytest.mark.parametrize(
    "data, named",
    [
        ({"bogus": {}}, "bogus"),
        ({"optim": {"lrr": 1.0}}, "optim.lrr"),
        ({"model": {"cfr": {"varient": "off"}}}, "model.cfr.varient"),
        ({"model": {"detail": {"rnk": 2}}}, "model.detail.rnk"),
        ({"loss": {"weights": {"l3": 1.0}}}, "loss.weights.l3"),
        ({"data": {"sampler": {"size": 8}}}, "data.sampler.size"),
        ({"run": {"steps": 8}}, "run.steps"),
        ({"schedule": {"period": 8}}, "schedule.period"),
    ],
)
def test_unknown_key_in_file(tmp_path, data, named):
    with pytest.raises(KeyError, match=named.replace(".", r"\.")):
        TrainConfig.from_dict(data)


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lr=abc", "optim.lr"),
        ("optim.lr=true", "optim.lr"),
        ("run.max_steps=1.5", "run.max_steps"),
        ("run.max_steps='10'", "run.max_steps"),
        ("optim.gradient_checkpointing=1", "optim.gradient_checkpointing"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.betas=0.9", "optim.betas"),
        ("model.consistency.rank=four", "model.consistency.rank"),
        ("model.cfr.topk=many", "model.cfr.topk"),
        ("data.sampler=3", "data.sampler"),
    ],
)
def test_bad_types(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.").replace("[", r"\[")):
        load_config(overrides=[override])


def test_number_for_a_string_field_in_a_file(tmp_path):
    (tmp_path / "c.toml").write_text("[run]\nname = 5\n")
    with pytest.raises(ValueError, match=r"run\.name"):
        load_config(tmp_path / "c.toml")


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lr_schedule=step", "optim.lr_schedule"),
        ("optim.mixed_precision=fp8", "optim.mixed_precision"),
        ("optim.grad_accum=0", "optim.grad_accum"),
        ("loss.lpips=maybe", "loss.lpips"),
        ("loss.temporal=flow", "loss.temporal"),
        ("loss.nonfinite_csd=skip", "loss.nonfinite_csd"),
        ("loss.max_dm_step_ratio=0.01", "loss.min_dm_step_ratio"),
        ("data.val_kind=reds4", "data.val_lq"),
        ("data.train_kind=imagenet", "data.train_kind"),
        ("run.validate_every=0", "run.validate_every"),
        ("run.workers=0", "run.workers"),
        ("run.device=foo", "run.device"),
        ("run.device=gpu:0", "run.device"),
        ("schedule.transition_steps=60", "schedule.transition_steps"),
        ("loss.weights.csd=-1", "loss.weights.csd"),
    ],
)
def test_bad_values(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config(overrides=[override])


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_config(path)


def test_invalid_toml_names_the_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim\nlr = 1\n")
    with pytest.raises(ValueError, match=str(path)):
        load_config(Path(path))


def test_data_parity_keys_default_to_todays_sampling():
    cfg = load_config()
    s, detail = cfg.data.sampler, cfg.data.detail
    assert (s.frame_stride, s.resize_short_side, s.crop_mode, s.augment) == (
        1,
        0,
        "random",
        "flip_transpose",
    )
    assert cfg.data.lq_root is None and detail.kind is None and detail.overrides() == {}
    assert (cfg.data.shift.frames, cfg.data.shift.max_step, cfg.data.shift.seed) == (10, 8, 0)


def test_data_parity_keys_round_trip():
    cfg = load_config(
        overrides=[
            "data.lq_root=/data/pexels/lq",
            "data.sampler.frame_stride=10",
            "data.sampler.resize_short_side=64",
            "data.sampler.crop_mode=center",
            "data.sampler.augment=dihedral",
            "data.detail.kind=shift",
            "data.detail.root=/data/lsdir",
            "data.detail.frame_stride=1",
            "data.detail.resize_short_side=0",
            "data.detail.crop_mode=center_round",
            "data.shift.max_step=4",
        ]
    )
    assert cfg.data.detail.overrides() == {
        "frame_stride": 1,
        "resize_short_side": 0,
        "crop_mode": "center_round",
    }
    assert cfg.data.detail.lq_root is None and cfg.data.shift.max_step == 4
    assert TrainConfig.from_dict(tomllib.loads(cfg.to_toml_str())) == cfg


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["data.sampler.crop_mode=middle"], "data.sampler.crop_mode"),
        (["data.sampler.augment=rot90"], "data.sampler.augment"),
        (["data.sampler.frame_stride=0"], "data.sampler.frame_stride"),
        (["data.sampler.resize_short_side=32"], "data.sampler.resize_short_side"),
        (["data.detail.crop_mode=middle"], "data.detail.crop_mode"),
        (["data.detail.frame_stride=0"], "data.detail.frame_stride"),
        (["data.detail.resize_short_side=32"], "data.detail: data.sampler.resize_short_side"),
        (["data.detail.kind=shift"], "data.detail.root"),
        (["data.detail.root=/x"], "data.detail.kind"),
        (["data.detail.kind=videos"], "data.detail.root"),
        (["data.train_kind=udm10", "data.lq_root=/x"], "data.lq_root"),
        (["data.detail.kind=reds4", "data.detail.root=/x", "data.detail.lq_root=/y"], "lq_root"),
        (["data.shift.frames=0"], "data.shift.frames"),
        (["data.shift.max_step=-1"], "data.shift.max_step"),
    ],
)
def test_bad_data_parity_values(overrides, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_one_step_holds_every_workers_samples():
    cfg = load_config(overrides=["run.workers=4", "optim.grad_accum=3", "run.max_steps=500"])
    assert cfg.effective_batch == 4 * 1 * 3
    # the sampler's epoch covers every sample of every step of every worker
    assert cfg.resolved().data.sampler.samples == 500 * 12
    assert load_config().run.workers == 1  # the default: one process, no Ray
