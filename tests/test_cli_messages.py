"""What the command line prints is what was meant: user text is never read as Rich markup,
`--help` shows every default, and library noise stays out of the log."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from dloral import cli
from dloral.cli import app

runner = CliRunner()


def _text(result) -> str:
    return " ".join(result.output.split())


@pytest.mark.parametrize("name", ["clips[/x]", "a[red]b", "c[bold]d[/]"])
def test_paths_with_brackets_are_printed_as_they_are(tmp_path, name):
    missing = tmp_path / name / "clip.mp4"
    result = runner.invoke(app, ["upscale", str(missing), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no MarkupError
    assert str(missing) in _text(result)


def test_toml_section_names_survive_in_error_messages(tmp_path):
    suite = tmp_path / "suite.toml"
    suite.write_text('[suite]\nname = "s"\n')
    result = runner.invoke(app, ["bench", str(suite)])
    assert result.exit_code == 2, result.output
    assert "no [[datasets]]" in _text(result)
    dataset = f'[[datasets]]\nname = "d"\nkind = "udm10"\nroot = "{tmp_path}"\n'
    methods = '[methods]\nnames = ["bicubic"]\n[metrics]\nnames = ["psnr"]\n'
    suite.write_text('[suite]\nname = "s"\n' + dataset + methods + '[options]\nflow = "nope"\n')
    result = runner.invoke(app, ["bench", str(suite)])
    assert result.exit_code == 2, result.output
    assert "[options] flow='nope'" in _text(result)


@pytest.mark.parametrize(
    "command, default",
    [
        (["train"], "[default: <run.output_dir>/<run.name>-<date-time>]"),
        (["bench"], "[default: outputs/bench/<suite name>]"),
        (["report"], "[default:"),
        (["data", "prepare"], "[default: $DLORAL_DATA_DIR or data/embedded]"),
        (["upscale"], "Default: outputs/upscale/<input name>."),
    ],
)
def test_help_shows_where_outputs_go(command, default):
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert default in _text(result)


def test_hub_kernel_notices_are_dropped_from_the_log_but_warnings_stay(capsys):
    """The filter on the console's log handler drops "kernels-community" records (any logger,
    any level) and nothing else."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        cli._setup_logging(verbose=False)
        logging.getLogger("peft.utils").warning(
            "Using kernels-community/flash-attn2 requires the kernels package"
        )
        logging.getLogger("dloral.test").warning("a real warning")
        err = capsys.readouterr().err
    finally:
        root.handlers[:] = saved
    assert "a real warning" in err
    assert "kernels-community" not in err


def test_train_workers_and_address_are_checked_before_anything_runs():
    result = runner.invoke(app, ["train", "--address", "10.0.0.1:6379"])
    assert result.exit_code == 2 and "--address needs more than one worker" in _text(result)
    result = runner.invoke(app, ["train", "--workers", "0"])
    assert result.exit_code == 2 and "--workers" in _text(result)


def test_bad_upscale_options_are_named_without_a_traceback(tmp_path, bikes_folder):
    """A device torch does not know, a fixed prompt without its text, a file that is no
    checkpoint: each named, exit 2, before any frame."""
    out = tmp_path / "out"
    not_a_checkpoint = tmp_path / "notes.md"
    not_a_checkpoint.write_text("# notes")
    for args, said in [
        (["--device", "foo"], "device must be auto, cpu, cuda or cuda:N; got 'foo'"),
        (["--prompt-source", "fixed"], "--prompt-source fixed needs the text: --prompt TEXT"),
        (
            ["--checkpoint", str(not_a_checkpoint)],
            f"{not_a_checkpoint}: not a checkpoint, no dloral_config.json beside it",
        ),
    ]:
        result = runner.invoke(app, ["upscale", str(bikes_folder), str(out), *args])
        assert result.exit_code == 2 and said in _text(result), (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_outside_a_commands_own_handling_is_said(monkeypatch, capsys, sig, code):
    """A signal while `train` reads its config (its imports: seconds of every run) reached
    typer, which exits 130 without a word; the exit code stays the signal's, and it is said."""
    import os
    import signal
    import sys

    from dloral import signals

    def config_read_when_the_signal_comes(*_, **__):
        os.kill(os.getpid(), getattr(signal, sig))  # handled by dloral.signals, as in a run
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr("dloral.train.config.load_config", config_read_when_the_signal_comes)
    monkeypatch.setattr(signals, "_received", [])
    monkeypatch.setattr(sys, "argv", ["dloral-exp", "train", "--no-tracking"])
    # Ctrl-C as a terminal's process has it: a job put in the background by a non-interactive
    # shell (`pytest ... &` in a script) inherits SIGINT ignored, and SIGINT then stops it no
    # more than any other program (conftest restores the handlers after the test)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(SystemExit) as done:
        cli.entry()
    assert done.value.code == code
    said = " ".join(capsys.readouterr().err.split())
    assert f"interrupted ({sig})" in said, said
