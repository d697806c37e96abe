import json

import pytest
import torch
from safetensors.torch import load_file

from dloral.model.backbone import (
    SD21_ENV,
    BackboneNotFound,
    HashTokenizer,
    build_backbone,
    locate_sd21,
)
from dloral.model.cfr import CFRConfig
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.weights import DATA_DIR_ENV, TINY_VAE_ENV, TINY_VAE_FILE, WeightsMissing, sha256


def test_tiny_keeps_sd21_structure(tiny_vae_file):
    bb = build_backbone("tiny")
    cfg = bb.unet.config
    assert cfg.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert cfg.up_block_types == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert cfg.use_linear_projection and cfg.in_channels == 4
    assert bb.vae.config.latent_channels == 4
    x = torch.rand(1, 3, 64, 48)
    with torch.no_grad():
        assert bb.vae.encode(x).latent_dist.mean.shape == (1, 4, 8, 6)  # factor 8
    # the trained VAE (conftest's, named by $DLORAL_TINY_VAE), recorded with its sha256
    assert bb.weights == "tiny-pretrained-vae" and not bb.random_init
    assert bb.vae_weights == str(tiny_vae_file) and bb.vae_sha256 == sha256(tiny_vae_file)
    trained = load_file(tiny_vae_file)
    assert all(torch.equal(v, trained[k]) for k, v in bb.vae.state_dict().items())
    random = build_backbone("tiny", tiny_init="random")
    assert random.weights == "random-init" and random.vae_weights is None
    assert not torch.equal(random.vae.decoder.conv_out.weight, bb.vae.decoder.conv_out.weight)


def test_pretrained_tiny_one_step_starts_as_the_identity(bikes_lq):
    """UNet conv_out and CFR's projection at zero: z_hat = z until training moves them, for
    every CFR variant; the all-random tiny model changes the latent."""
    lq = bikes_lq[:2]
    for variant in ("full", "no_gate", "off"):
        model = DLoRAL(DLoRALConfig(cfr=CFRConfig(variant=variant)))
        with torch.no_grad():
            z = model.encode(lq, sample=False)
            out = model.restore_latent(z[1:], z[:1], lq[1:], lq[:1], model.encode_prompt([""]))
        assert torch.equal(out, z[1:]), variant
    model = DLoRAL(DLoRALConfig(tiny_init="random"))
    with torch.no_grad():
        z = model.encode(lq, sample=False)
        out = model.restore_latent(z[1:], z[:1], lq[1:], lq[:1], model.encode_prompt([""]))
    assert (out - z[1:]).abs().mean() > 0.1 * z.abs().mean()


def test_missing_tiny_vae_names_the_file_the_folders_and_the_command(tmp_path, monkeypatch):
    monkeypatch.delenv(TINY_VAE_ENV)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    with pytest.raises(WeightsMissing) as err:
        build_backbone("tiny", tiny_vae_path=tmp_path / "given")
    msg = " ".join(str(err.value).split())
    assert f"{tmp_path / 'given'} (model.tiny_vae_path): not found" in msg
    assert f"{tmp_path / 'data' / TINY_VAE_FILE}" in msg and DATA_DIR_ENV in msg
    assert "dloral-exp data prepare" in msg and TINY_VAE_ENV in msg
    broken = tmp_path / "broken" / TINY_VAE_FILE
    broken.parent.mkdir()
    broken.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"{broken}: not a readable tiny VAE file"):
        build_backbone("tiny", tiny_vae_path=broken)


def test_tiny_build_is_deterministic():
    a, b = build_backbone("tiny", seed=1), build_backbone("tiny", seed=1)
    pairs = zip(a.unet.parameters(), b.unet.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)


def test_pretrained_unet_alone_equals_the_backbones_unet():
    from dloral.model.backbone import pretrained_unet

    full, alone = build_backbone("tiny", seed=3).unet, pretrained_unet("tiny", seed=3)
    pairs = zip(full.state_dict().items(), alone.state_dict().items(), strict=True)
    assert all(ka == kb and torch.equal(a, b) for (ka, a), (kb, b) in pairs)


def test_hash_tokenizer_is_stable_and_padded():
    tok = HashTokenizer(1000)
    ids = tok(["a red bike", ""])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 998 and ids[1, 1] == 999
    assert torch.equal(ids, tok(["A red, bike!", ""]))


def test_missing_sd21_names_folders_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv(SD21_ENV, raising=False)
    with pytest.raises(BackboneNotFound) as err:
        locate_sd21(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "unet/config.json" in msg
    assert "models--stabilityai--stable-diffusion-2-1-base" in msg and SD21_ENV in msg


def _write_sd21_folder(folder):
    """A diffusers-layout SD folder holding the tiny random models and a small CLIP vocabulary."""
    bb = build_backbone("tiny", seed=5)
    bb.unet.save_pretrained(folder / "unet")
    bb.vae.save_pretrained(folder / "vae")
    bb.text_encoder.save_pretrained(folder / "text_encoder")
    tok = folder / "tokenizer"
    tok.mkdir()
    words = ["a</w>", "red</w>", "bike</w>"]
    vocab = {"<|startoftext|>": 998, "<|endoftext|>": 999}
    vocab.update({w: i + 1 for i, w in enumerate(words)})
    parts = ["r", "e", "d</w>", "re", "b", "i", "k", "e</w>", "bi", "bik"]
    vocab.update({w: 10 + i for i, w in enumerate(parts)})
    (tok / "vocab.json").write_text(json.dumps(vocab))
    merges = ["r e", "re d</w>", "b i", "bi k", "bik e</w>"]
    (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tok / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})
    )
    return bb


def test_sd21_loads_from_local_folder_and_from_hf_cache(tmp_path, monkeypatch):
    folder = tmp_path / "sd21"
    bb = _write_sd21_folder(folder)
    # SPyNet random here: this test is about the backbone (tests/test_spynet_weights.py loads it)
    model = DLoRAL(
        DLoRALConfig(profile="sd21", sd21_path=str(folder), cfr=CFRConfig(spynet="random"))
    )
    assert model.weights == str(folder)
    ref = bb.unet.state_dict()["down_blocks.0.resnets.0.conv1.weight"]
    got = model.unet.state_dict()["down_blocks.0.resnets.0.conv1.base_layer.weight"]
    assert torch.equal(ref, got)

    # Hugging Face cache layout: models--org--name/snapshots/<rev>/ + refs/main
    hub = tmp_path / "hub"
    repo = hub / "models--stabilityai--stable-diffusion-2-1-base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots").mkdir()
    folder.rename(repo / "snapshots" / "0123abc")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.delenv(SD21_ENV, raising=False)
    assert locate_sd21() == repo / "snapshots" / "0123abc"
    ids = build_backbone("sd21").tokenizer(["a red bike"])
    assert ids[0, :5].tolist() == [998, 1, 2, 3, 999]
