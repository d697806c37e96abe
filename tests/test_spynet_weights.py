"""BasicVSR's pretrained SPyNet: found, mapped, loaded, recorded; and the one up-front error that
names every missing weight (SD 2.1, SPyNet, VGG16, tagger module) before any model is built."""

import json

import pytest
import torch
from reference_cfr import SPyNet as RefSPyNet
from typer.testing import CliRunner

from dloral import doctor
from dloral.bench.methods import DLoRALMethod, MethodError, check_weights
from dloral.cli import app
from dloral.model import checkpoint as ckpt
from dloral.model.cfr import CFRConfig
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.model.requirements import MissingWeights, missing_weights
from dloral.model.spynet import SPyNet, SpynetWeightsError, load_spynet_file, spynet_state
from dloral.train import recipe
from dloral.train.config import load_config
from dloral.weights import SPYNET_FILE, WeightsMissing, locate_spynet, sha256

runner = CliRunner()


# The reference's SPyNet is transcribed literally in reference_cfr.py (with CFR's other parts).


# ----- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Nothing anywhere: empty torch hub and Hugging Face caches, no weight env vars."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    for var in (
        "DLORAL_SD21_PATH",
        "DLORAL_SPYNET_WEIGHTS",
        "DLORAL_VGG16_WEIGHTS",
        "DLORAL_TAGGER",
    ):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _reference_file(folder, seed=7):
    """BasicVSR's SPyNet file as the reference loads it: random weights of the reference's
    module saved as mmengine does ({"meta", "state_dict"}), under the real name. The reference
    loads it (strict) before registering mean/std, so the file holds no mean/std."""
    torch.manual_seed(seed)
    net = RefSPyNet(pretrained=None)
    state = {k: v for k, v in net.state_dict().items() if k not in ("mean", "std")}
    path = folder / SPYNET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"mmedit_version": "0.8.0", "time": "20210409"}, "state_dict": state}, path)
    return path, net


def _pairs(bikes_lq):
    """Real consecutive frames in [-1, 1], as CFR feeds SPyNet: (current, previous)."""
    return bikes_lq[1:4] * 2 - 1, bikes_lq[0:3] * 2 - 1


# ----- loading ---------------------------------------------------------------------------------
def test_reference_layout_maps_with_no_missing_or_unexpected_key(tmp_path):
    path, ref = _reference_file(tmp_path)
    file_state = torch.load(path, weights_only=True)["state_dict"]
    mapped, unmapped = spynet_state(file_state)
    assert unmapped == []
    assert set(mapped) == set(SPyNet().state_dict()) - {"mean", "std"}  # 60 conv tensors
    net = SPyNet()
    load_spynet_file(net, path)
    ours = net.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in file_state.items())


def test_loaded_spynet_computes_the_reference_flow_on_real_frames(tmp_path, bikes_lq):
    path, ref = _reference_file(tmp_path)
    net = SPyNet()
    load_spynet_file(net, path)
    cur, prev = _pairs(bikes_lq)
    with torch.no_grad():
        expected = ref(cur, prev)
        got = net(cur, prev)
    assert expected.abs().max() > 0.1  # a real flow field, not zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pretrained_spynet_changes_the_cfr_output(tmp_path, monkeypatch, bikes_lq):
    path, _ = _reference_file(tmp_path / "weights")
    monkeypatch.setenv("DLORAL_SPYNET_WEIGHTS", str(path))
    # all-random tiny models: the pretrained tiny profile's CFR adds nothing until it trains
    loaded = DLoRAL(DLoRALConfig(tiny_init="random", cfr=CFRConfig(spynet="pretrained")))
    random = DLoRAL(DLoRALConfig(tiny_init="random"))
    assert loaded.describe()["spynet"] == str(path)
    assert loaded.describe()["spynet_sha256"] == sha256(path)
    assert random.describe()["spynet"] == "random-init"
    # the pretrained tiny profile's default: zero motion for a real pair, said so
    zero = DLoRAL(DLoRALConfig())
    assert zero.describe()["spynet"] == "zero-flow" and zero.describe()["spynet_sha256"] is None
    with torch.no_grad():
        assert not zero.cfr.spynet(bikes_lq[1:2] * 2 - 1, bikes_lq[:1] * 2 - 1).any()
    # everything but SPyNet is the same seeded init: the difference below is SPyNet's
    a, b = loaded.cfr.state_dict(), random.cfr.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("spynet."))
    g = torch.Generator().manual_seed(0)
    cur_z, prev_z = torch.randn(3, 4, 6, 8, generator=g), torch.randn(3, 4, 6, 8, generator=g)
    lq_cur, lq_prev = bikes_lq[1:4], bikes_lq[0:3]
    with torch.no_grad():
        fused_a, aligned_a = loaded.cfr(cur_z, prev_z, lq_cur, lq_prev)
        fused_b, aligned_b = random.cfr(cur_z, prev_z, lq_cur, lq_prev)
        out_a = loaded.restore_latent(cur_z, prev_z, lq_cur, lq_prev, loaded.encode_prompt([""]))
        out_b = random.restore_latent(cur_z, prev_z, lq_cur, lq_prev, random.encode_prompt([""]))
    assert (aligned_a - aligned_b).abs().max() > 1e-2  # the previous latent lands elsewhere
    assert not torch.equal(fused_a, fused_b)  # so retrieval (untrained: a faint gate) differs
    assert (out_a - out_b).abs().max() > 1e-2  # and the restored latent


def test_basicsr_layout_under_params_loads_the_same_tensors(tmp_path):
    path, _ = _reference_file(tmp_path / "mmedit")
    mmedit = torch.load(path, weights_only=True)["state_dict"]
    # BasicSR's SPyNet: Conv2d/ReLU alternate in one Sequential, so conv i is entry 2i
    basicsr = {
        k.replace(f".basic_module.{i}.conv.", f".basic_module.{2 * i}."): v
        for k, v in mmedit.items()
        for i in [int(k.split(".")[3])]
    }
    other = tmp_path / "basicsr.pth"
    torch.save({"params": basicsr}, other)
    a, b = SPyNet(), SPyNet()
    load_spynet_file(a, path)
    load_spynet_file(b, other)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_wrong_layout_is_an_error_naming_the_keys(tmp_path, monkeypatch):
    flownet = {"conv1.weight": torch.zeros(64, 6, 7, 7), "conv1.bias": torch.zeros(64)}
    path = tmp_path / SPYNET_FILE
    torch.save({"state_dict": flownet}, path)
    with pytest.raises(SpynetWeightsError) as err:
        load_spynet_file(SPyNet(), path)
    text = str(err.value)
    assert str(path) in text and "conv1.weight" in text and "2 unexpected" in text
    assert "60 missing" in text and "basic_module.0.basic_module.0.conv.weight" in text

    # a complete file with one tensor of the wrong shape names that tensor
    good, _ = _reference_file(tmp_path / "ok")
    state = torch.load(good, weights_only=True)["state_dict"]
    state["basic_module.5.basic_module.4.conv.bias"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(SpynetWeightsError, match=r"basic_module\.5\.basic_module\.4\.conv\.bias"):
        load_spynet_file(SPyNet(), path)

    # and building a model with that file says the same
    monkeypatch.setenv("DLORAL_SPYNET_WEIGHTS", str(path))
    with pytest.raises(SpynetWeightsError, match="shape mismatch"):
        DLoRAL(DLoRALConfig(cfr=CFRConfig(spynet="pretrained")))


# ----- where it is looked for -------------------------------------------------------------------
def test_env_var_then_torch_hub_cache(no_weights, monkeypatch):
    with pytest.raises(WeightsMissing) as err:
        locate_spynet()
    text = str(err.value)
    assert SPYNET_FILE in text and "DLORAL_SPYNET_WEIGHTS" in text
    assert str(no_weights / "torch" / "hub" / "checkpoints") in text
    assert "download.openmmlab.com" in text

    hub_file, _ = _reference_file(no_weights / "torch" / "hub" / "checkpoints")
    assert locate_spynet() == hub_file
    env_file, _ = _reference_file(no_weights / "elsewhere")
    monkeypatch.setenv("DLORAL_SPYNET_WEIGHTS", str(env_file.parent))  # a folder works too
    assert locate_spynet() == env_file
    explicit, _ = _reference_file(no_weights / "explicit")
    assert locate_spynet(explicit) == explicit  # model.cfr.spynet_path comes first


def test_sd21_needs_spynet_and_tiny_runs_random(no_weights):
    assert not DLoRALConfig().pretrained_spynet()  # tiny: random-init, runs offline
    assert DLoRALConfig(profile="sd21").pretrained_spynet()
    assert not DLoRALConfig(profile="sd21", random_init=True).pretrained_spynet()
    assert DLoRALConfig(cfr=CFRConfig(spynet="pretrained")).pretrained_spynet()
    assert not DLoRALConfig(profile="sd21", cfr=CFRConfig(spynet="random")).pretrained_spynet()
    # CFR off: training still warps the GT with SPyNet's flow (the temporal loss), so its
    # weights are needed; inference runs no SPyNet and needs none
    off = DLoRALConfig(profile="sd21", cfr=CFRConfig(variant="off"))
    assert off.pretrained_spynet()
    assert [m.name for m in missing_weights(off)] == ["SD 2.1-base", "SPyNet"]
    assert [m.name for m in missing_weights(off, spynet_unused=True)] == ["SD 2.1-base"]
    # sd21 fails on SPyNet first, before the (large) backbone is built
    with pytest.raises(WeightsMissing, match=SPYNET_FILE):
        DLoRAL(DLoRALConfig(profile="sd21"))
    with pytest.raises(ValueError, match="cfr.spynet must be one of"):
        CFRConfig(spynet="imagenet")


# ----- checkpoints carry SPyNet and where it came from ----------------------------------------
def test_checkpoints_carry_spynet_and_its_provenance(tmp_path, monkeypatch, bikes_lq):
    path, _ = _reference_file(tmp_path / "weights")
    monkeypatch.setenv("DLORAL_SPYNET_WEIGHTS", str(path))
    model = DLoRAL(DLoRALConfig(cfr=CFRConfig(spynet="pretrained")))
    ckpt.save_checkpoint(model, tmp_path / "ck")
    ckpt.export_official(model, tmp_path / "model.pkl")
    monkeypatch.delenv("DLORAL_SPYNET_WEIGHTS")  # the checkpoints need no SPyNet file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ours, report = ckpt.load_checkpoint(tmp_path / "ck")
    assert report.clean
    assert ours.describe()["spynet"] == str(path)
    assert ours.describe()["spynet_sha256"] == sha256(path)
    official, report = ckpt.import_official(tmp_path / "model.pkl", profile="tiny")
    assert (
        report.clean
        and official.describe()["spynet"] == f"official DLoRAL {tmp_path / 'model.pkl'}"
    )
    cur, prev = _pairs(bikes_lq)
    with torch.no_grad():
        want = model.cfr.spynet(cur, prev)
        assert torch.equal(ours.cfr.spynet(cur, prev), want)
        assert torch.equal(official.cfr.spynet(cur, prev), want)


def test_official_import_maps_spynet_keys_as_a_spynet_file(tmp_path, monkeypatch):
    """The official checkpoint's `spynet.` keys go through the same mapping as a SPyNet file:
    a release whose SPyNet is in BasicSR's layout imports with every key matched."""
    model = DLoRAL(DLoRALConfig(seed=3))
    ckpt.export_official(model, tmp_path / "model.pkl")
    sd = torch.load(tmp_path / "model.pkl", weights_only=True)
    bpp = {}
    for k, v in sd["state_dict_bpp"].items():
        if k.startswith("spynet.basic_module."):
            i = int(k.split(".")[4])
            k = k.replace(f".basic_module.{i}.conv.", f".basic_module.{2 * i}.")
        bpp[k] = v
    sd["state_dict_bpp"] = bpp
    torch.save(sd, tmp_path / "basicsr.pkl")
    imported, report = ckpt.import_official(tmp_path / "basicsr.pkl", profile="tiny")
    assert report.clean, report.summary()
    a, b = model.cfr.spynet.state_dict(), imported.cfr.spynet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    sd["state_dict_bpp"]["spynet.flownet.conv1.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "odd.pkl")
    _, report = ckpt.import_official(tmp_path / "odd.pkl", profile="tiny")
    assert report.unexpected == ["state_dict_bpp.spynet.flownet.conv1.weight"]


# ----- one error for every missing weight, before any model is built -------------------------
def _refuse_to_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the weights were checked")

    monkeypatch.setattr("dloral.model.dloral.DLoRAL.__init__", refuse)


def test_one_error_lists_every_missing_weight(no_weights, monkeypatch):
    cfg = DLoRALConfig(profile="sd21")
    missing = missing_weights(cfg, lpips=True, tagger=True)
    assert [m.name for m in missing] == ["SD 2.1-base", "SPyNet", "VGG16", "tagger module"]
    err = MissingWeights(missing)
    text = str(err)
    assert text.startswith("4 required weight(s) missing: SD 2.1-base, SPyNet, VGG16, tagger")
    for needle in ("DLORAL_SD21_PATH", SPYNET_FILE, "DLORAL_SPYNET_WEIGHTS",
                   "vgg16-397923af.pth", "DLORAL_TAGGER"):  # fmt: skip
        assert needle in text
    # a sweep trial's error crosses processes pickled (Ray): it arrives whole; it arrived as
    # "AttributeError: 'str' object has no attribute 'name'", rebuilt from its message
    import pickle

    import cloudpickle

    for dumps in (pickle.dumps, cloudpickle.dumps):
        again = pickle.loads(dumps(err))
        assert type(again) is MissingWeights and str(again) == text
        assert again.missing == missing
    # a checkpoint brings its own SPyNet; random_init needs no SD 2.1 and no SPyNet
    names = [m.name for m in missing_weights(cfg, spynet_from_checkpoint=True)]
    assert names == ["SD 2.1-base"]
    assert missing_weights(DLoRALConfig(profile="sd21", random_init=True)) == []
    assert missing_weights(DLoRALConfig()) == []
    # a configured tagger module that does not exist is named
    monkeypatch.setenv("DLORAL_TAGGER", "no_such_tagger_module_xyz:build")
    (m,) = missing_weights(DLoRALConfig(), tagger=True)
    assert "no_such_tagger_module_xyz" in m.message
    assert missing_weights(DLoRALConfig(), tagger=True, tagger_spec="json:loads") == []


def test_training_checks_all_weights_before_building(no_weights, monkeypatch):
    cfg = load_config(None, ["model.profile=sd21", 'loss.lpips="required"'])
    _refuse_to_build(monkeypatch)
    with pytest.raises(MissingWeights) as err:
        recipe.train(cfg, run_dir=no_weights / "run")
    assert [m.name for m in err.value.missing] == ["SD 2.1-base", "SPyNet", "VGG16"]
    assert not (no_weights / "run").exists()


def test_train_command_exits_2_naming_every_missing_weight(no_weights):
    result = runner.invoke(
        app,
        ["train", "--no-tracking", "--set", "model.profile=sd21", "--set", 'loss.lpips="required"'],
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "3 required weight(s) missing: SD 2.1-base, SPyNet, VGG16" in text


def test_upscale_names_every_missing_weight_at_once(no_weights, tmp_path, bikes_lq):
    from dloral.data.frames import write_png

    for i, frame in enumerate(bikes_lq[:2]):
        write_png(frame, tmp_path / "clip" / f"{i}.png")
    args = ["upscale", str(tmp_path / "clip"), str(tmp_path / "o"), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--profile", "sd21", "--prompt-source", "tagger"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "3 required weight(s) missing: SD 2.1-base, SPyNet, tagger module" in text
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    # with CFR off the upscale runs no SPyNet: none is asked for, and the record says so
    result = runner.invoke(app, [*args, "--profile", "sd21", "--cfr", "off"])
    assert result.exit_code == 2
    assert "1 required weight(s) missing: SD 2.1-base" in " ".join(result.output.split())
    result = runner.invoke(app, [*args, "--cfr", "off", "--process-size", "64"])  # tiny
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "o" / "upscale.json").read_text())
    assert record["model"]["spynet"] == "unused (cfr off)"


def test_bench_checks_dloral_methods_before_building(no_weights, tmp_path, monkeypatch):
    model = DLoRAL(DLoRALConfig())
    ckpt.save_checkpoint(model, tmp_path / "ck")
    meta_file = tmp_path / "ck" / "dloral_config.json"
    meta = json.loads(meta_file.read_text())
    meta["model"]["profile"] = "sd21"  # as a checkpoint trained on SD 2.1 says
    meta_file.write_text(json.dumps(meta))
    _refuse_to_build(monkeypatch)
    methods = [DLoRALMethod("a", str(tmp_path / "ck"), device="cpu"), DLoRALMethod("t", "tiny")]
    with pytest.raises(MethodError) as err:
        check_weights(methods)
    text = str(err.value)
    # the checkpoint holds SPyNet: only SD 2.1 is missing
    assert text.startswith("1 required weight(s) missing: SD 2.1-base")
    check_weights(methods[1:])  # tiny needs nothing


# ----- where SPyNet's origin is recorded ----------------------------------------------------
class _Stop(Exception):
    pass


class _RecordingTracker:
    run_id = None

    def start(self, cfg, run_dir, resume, info):
        self.info = info
        raise _Stop


@pytest.mark.parametrize("spynet", ["auto", "pretrained"])
def test_training_run_records_spynet(spynet, data_roots, tmp_path, monkeypatch):
    path, _ = _reference_file(tmp_path / "weights")
    monkeypatch.setenv("DLORAL_SPYNET_WEIGHTS", str(path))
    cfg = load_config(
        None,
        [
            f"model.cfr.spynet={spynet}",
            f'data.train_root="{data_roots / "train"}"',
            f'data.val_root="{data_roots / "val"}"',
        ],
    )
    tracker = _RecordingTracker()
    with pytest.raises(_Stop):
        recipe.train(cfg, run_dir=tmp_path / "run", tracker=tracker)
    if spynet == "auto":  # tiny: no trained SPyNet, zero flow, said so
        assert tracker.info["spynet"] == "zero-flow" and "spynet_sha256" not in tracker.info
    else:
        assert tracker.info["spynet"] == str(path)
        assert tracker.info["spynet_sha256"] == sha256(path)


def test_bench_provenance_records_spynet():
    method = DLoRALMethod("dloral-tiny", "tiny", device="cpu")
    info = method.describe()
    assert info["spynet"] == "zero-flow" and info["model"]["spynet"] == "zero-flow"


def test_doctor_lists_spynet_and_the_tagger(no_weights, monkeypatch):
    w = {e["name"]: e for e in doctor.weights()}
    spy, tag = w["SPyNet (BasicVSR)"], w["tagger module"]
    assert not spy["found"] and spy["env"] == "DLORAL_SPYNET_WEIGHTS"
    assert SPYNET_FILE in spy["looked"] and str(no_weights / "torch") in spy["looked"]
    assert not tag["found"] and tag["env"] == "DLORAL_TAGGER" and "not configured" in tag["looked"]

    hub_file, _ = _reference_file(no_weights / "torch" / "hub" / "checkpoints")
    monkeypatch.setenv("DLORAL_TAGGER", "json:loads")
    w = {e["name"]: e for e in doctor.weights()}
    assert w["SPyNet (BasicVSR)"]["found"] and w["SPyNet (BasicVSR)"]["path"] == str(hub_file)
    assert w["tagger module"]["found"] and w["tagger module"]["path"].startswith("json:loads (")
