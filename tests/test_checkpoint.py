import json
import pickle
import re

import pytest
import torch
from conftest import restored_pair, trained_model
from safetensors.torch import load_file, save_file

from dloral.model.checkpoint import (
    CheckpointError,
    checkpoint_config,
    export_official,
    find_checkpoint,
    import_official,
    load_checkpoint,
    save_checkpoint,
    weights_sha256,
)
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.model.tiny_vae import TinyVAERecipe


def test_checkpoint_roundtrip_gives_identical_outputs(tmp_path):
    model = trained_model(4, cfr={"topk": 8})
    save_checkpoint(model, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "dloral.safetensors",
        "dloral_config.json",
    ]
    meta = json.loads((tmp_path / "ck" / "dloral_config.json").read_text())
    assert meta["model"]["cfr"]["topk"] == 8
    assert meta["backbone_weights"] == "tiny-pretrained-vae"
    assert (meta["vae_weights"], meta["vae_sha256"]) == (model.vae_weights, model.vae_sha256)
    loaded, report = load_checkpoint(tmp_path / "ck")
    assert report.clean
    assert loaded.cfg.cfr.topk == 8
    assert torch.equal(restored_pair(model), restored_pair(loaded))
    # a model that was not loaded differs, so the equality above is not trivial
    assert not torch.allclose(restored_pair(model), restored_pair(DLoRAL(DLoRALConfig(seed=4))))


def test_checkpoint_needs_the_tiny_vae_it_was_trained_with(tmp_path, tiny_vae_file, bikes_lq):
    save_checkpoint(trained_model(), tmp_path / "ck")
    other = tmp_path / "other-vae.safetensors"
    TinyVAERecipe(steps=1, batch_size=3, crop=32).build(list(bikes_lq[:2]), other)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "ck", overrides={"tiny_vae_path": str(other)})
    msg = " ".join(str(err.value).split())
    assert f"trained with the tiny VAE {tiny_vae_file}" in msg and str(other) in msg
    assert "model.tiny_vae_path" in msg
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.vae_sha256 == trained_model().vae_sha256


def test_checkpoint_from_before_tiny_init_loads_the_all_random_tiny(tmp_path):
    """Checkpoints written before the pretrained tiny profile were trained on random weights:
    they load onto those, not onto the trained VAE."""
    model = trained_model(cfr={"topk": 8}, tiny_init="random")
    save_checkpoint(model, tmp_path / "ck")
    meta_file = tmp_path / "ck" / "dloral_config.json"
    meta = json.loads(meta_file.read_text())
    del meta["model"]["tiny_init"], meta["model"]["tiny_vae_path"]
    del meta["vae_weights"], meta["vae_sha256"]
    meta_file.write_text(json.dumps(meta))
    loaded, report = load_checkpoint(tmp_path / "ck")
    assert report.clean and loaded.weights == "random-init"
    assert torch.equal(restored_pair(model), restored_pair(loaded))


def test_checkpoint_with_unknown_or_missing_keys_is_reported(tmp_path):
    save_checkpoint(trained_model(), tmp_path / "ck")
    weights = tmp_path / "ck" / "dloral.safetensors"
    state = load_file(weights)
    dropped = next(k for k in state if ".lora_B.detail." in k)
    del state[dropped]
    state["cfr.surprise.weight"] = torch.zeros(2)
    save_file(state, weights, {"format": "dloral-checkpoint/1"})
    with pytest.raises(CheckpointError, match="missing.*unexpected"):
        load_checkpoint(tmp_path / "ck")
    _, report = load_checkpoint(tmp_path / "ck", strict=False)
    assert report.missing == [dropped]
    assert report.unexpected == ["cfr.surprise.weight"]


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="dloral_config.json"):
        load_checkpoint(tmp_path)


def test_official_layout_roundtrip(tmp_path):
    model = trained_model(7)
    pkl = export_official(model, tmp_path / "model.pkl")
    sd = torch.load(pkl, weights_only=True)
    # the reference's layout: six adapters, ranks, module lists, whole UNet, CFR
    assert sd["lora_rank_unet_quality"] == 4 and sd["lora_rank_unet_consistency"] == 4
    keys = list(sd["state_dict_unet"])
    assert any(".lora_A.default_encoder_quality." in k for k in keys)
    assert any(".lora_B.default_decoder_consistency." in k for k in keys)
    assert any(".lora_A.default_others_quality." in k for k in keys)
    assert "conv_in.base_layer.weight" in sd["state_dict_unet"]
    assert sd["unet_lora_encoder_modules_quality"][0].startswith(("conv_in", "down_blocks"))
    assert "cross_attn_module.threshold_fc.weight" in sd["state_dict_bpp"]

    # the reference also stores CFR modules its forward never uses (so does the export, for
    # the reference's loader): those are reported ignored
    assert sd["state_dict_bpp"]["feat_extract.main.0.weight"].shape == (64, 4, 3, 3)
    sd["state_dict_unet"]["not_a_layer.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "model_extra.pkl")
    imported, report = import_official(
        tmp_path / "model_extra.pkl", profile="tiny", overrides={"seed": 7}
    )
    assert "state_dict_bpp.feat_extract.main.0.weight" in report.ignored
    assert {k.split(".")[1] for k in report.ignored} == {
        "feat_extract", "weight_predict", "weight_predict_final", "reconstruction_feat",
        "conv_hr", "conv_last",
    }  # fmt: skip
    assert report.unexpected == ["state_dict_unet.not_a_layer.weight"]
    assert report.missing == []
    assert torch.equal(restored_pair(model), restored_pair(imported))


def test_official_import_reports_missing_keys(tmp_path):
    model = trained_model(1)
    pkl = export_official(model, tmp_path / "model.pkl")
    sd = torch.load(pkl, weights_only=True)
    gone = "cross_attn_module.query_conv.weight"
    del sd["state_dict_bpp"][gone]
    torch.save(sd, pkl)
    _, report = import_official(pkl, profile="tiny", overrides={"seed": 1})
    assert report.missing == [f"cfr.{gone}"]
    with pytest.raises(CheckpointError, match="missing"):
        import_official(pkl, profile="tiny", overrides={"seed": 1}, strict=True)


class _Payload:  # an arbitrary object: weights_only loading must refuse it
    pass


def test_official_import_uses_weights_only(tmp_path):
    bad = tmp_path / "model.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict_unet": _Payload()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        import_official(bad, profile="tiny")


def test_not_an_official_checkpoint_names_missing_entries(tmp_path):
    torch.save({"state_dict_unet": {}}, tmp_path / "model.pkl")
    with pytest.raises(CheckpointError, match="state_dict_bpp"):
        import_official(tmp_path / "model.pkl", profile="tiny")


def test_official_export_of_a_lora_alpha_other_than_8_imports_with_the_same_output(tmp_path):
    """The file has no alpha; the importer reads it as the reference does (alpha 8) and the
    export scaled lora_B by alpha/8, so the imported model restores what the source does."""
    model = trained_model(2, detail={"rank": 4, "alpha": 16}, consistency={"alpha": 16})
    imported, report = import_official(
        export_official(model, tmp_path / "model.pkl"), profile="tiny", overrides={"seed": 2}
    )
    assert report.clean and imported.cfg.detail.alpha == imported.cfg.consistency.alpha == 8
    b = next(k for k in model.unet.state_dict() if ".lora_B.detail." in k)
    assert torch.equal(imported.unet.state_dict()[b], 2 * model.unet.state_dict()[b])
    assert torch.allclose(restored_pair(model), restored_pair(imported), atol=1e-5)


def test_a_model_with_merged_loras_is_neither_exported_nor_saved(tmp_path):
    """Merged, the base weights hold the LoRAs: written with the adapters, they would count
    twice when loaded."""
    model = trained_model(3)
    model.merge_lora()
    for write, path in ((export_official, "model.pkl"), (save_checkpoint, "ck")):
        with pytest.raises(CheckpointError, match="merged.*unmerge_lora"):
            write(model, tmp_path / path)
        assert not (tmp_path / path).exists()
    model.unmerge_lora()
    export_official(model, tmp_path / "model.pkl")


def test_a_training_run_names_its_latest_checkpoint(tmp_path):
    model = DLoRAL(DLoRALConfig())
    run = tmp_path / "run"
    steps = [run / "checkpoints" / f"step-{s:06d}" for s in (2, 4)]
    for folder in steps:
        save_checkpoint(model, folder)
    (run / "checkpoints" / "latest").write_text("step-000002")
    for given in (run, run / "checkpoints", run / "checkpoints" / "latest", steps[0]):
        assert find_checkpoint(given) == steps[0], given
    assert find_checkpoint(steps[1]) == steps[1]  # a step folder is itself
    official = tmp_path / "model.pkl"
    assert find_checkpoint(official) == official  # read as it is, even before it exists
    assert checkpoint_config(run) == checkpoint_config(steps[0])
    assert weights_sha256(run) == weights_sha256(steps[0])
    (run / "checkpoints" / "latest").write_text("step-000006")  # names a folder never written
    with pytest.raises(CheckpointError, match=r"latest: no finished checkpoint: it names"):
        load_checkpoint(run)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"latest: no finished checkpoint: the run has none"):
        find_checkpoint(run)


@pytest.mark.parametrize("broken", ["config", "weights", "pointer"])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(broken, tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "step-000002"
    save_checkpoint(DLoRAL(DLoRALConfig()), folder)
    pointer = tmp_path / "run" / "checkpoints" / "latest"
    pointer.write_text(folder.name)
    named = {
        "config": folder / "dloral_config.json",
        "weights": folder / "dloral.safetensors",
        "pointer": pointer,
    }[broken]
    named.write_bytes(b"\xff{ truncated" if broken != "weights" else b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(named))}: unreadable"):
        load_checkpoint(tmp_path / "run")
