"""Files and folders the suite writes into place get the modes the umask allows (0644/0755
under umask 022), not mkstemp's 0600 / mkdtemp's 0700."""

import os
import stat

import pytest
import torch

from dloral.atomic import atomic_folder, atomic_write_text, umask
from dloral.data.frames import write_png
from dloral.model.dloral import DLoRAL, DLoRALConfig
from dloral.train.recipe import _save_state, install_checkpoint, latest_checkpoint

UMASKS = [pytest.param(0o022, id="022"), pytest.param(0o027, id="027")]


@pytest.fixture
def with_umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_tree_modes(root, mask: int) -> None:
    """root and everything under it: folders 0777 & ~mask, files 0666 & ~mask."""
    paths = [root, *root.rglob("*")]
    assert len(paths) > 1
    for path in paths:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert mode(path) == want, f"{path}: {oct(mode(path))}, umask {oct(mask)} gives {oct(want)}"


@pytest.mark.parametrize("with_umask", UMASKS, indirect=True)
def test_umask_is_read_without_changing_it(with_umask):
    assert umask() == with_umask
    assert umask() == with_umask


@pytest.mark.parametrize("with_umask", UMASKS, indirect=True)
def test_atomic_files_respect_the_umask(tmp_path, with_umask):
    text = atomic_write_text(tmp_path / "results" / "summary.json", "{}")
    frame = tmp_path / "frames" / "frame_0001.png"
    write_png(torch.rand(3, 8, 8), frame)
    assert mode(text) == 0o666 & ~with_umask
    assert mode(frame) == 0o666 & ~with_umask
    assert [p.name for p in frame.parent.iterdir()] == ["frame_0001.png"]  # no temp file left


@pytest.mark.parametrize("with_umask", UMASKS, indirect=True)
def test_atomic_folder_respects_the_umask_and_leaves_nothing_on_error(tmp_path, with_umask):
    target = tmp_path / "set"
    with atomic_folder(target) as tmp:
        (tmp / "clip").mkdir()
        atomic_write_text(tmp / "clip" / "a.txt", "a")
    assert_tree_modes(target, with_umask)
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        atomic_write_text(tmp / "b.txt", "b")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # the old set kept, no temp folder
    assert (target / "clip" / "a.txt").read_text() == "a"


@pytest.mark.parametrize("with_umask", UMASKS, indirect=True)
def test_training_checkpoints_respect_the_umask(tmp_path, with_umask):
    model = DLoRAL(DLoRALConfig(profile="tiny", seed=0))
    optimizer = torch.optim.AdamW(model.cfr.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run = tmp_path / "run"
    folder = _save_state(run, model, optimizer, scheduler, step=3, keep=2, extra={})
    assert latest_checkpoint(run) == folder
    assert_tree_modes(run / "checkpoints", with_umask)

    other = tmp_path / "other"
    assert install_checkpoint(folder, other) == 3
    assert_tree_modes(other / "checkpoints", with_umask)
