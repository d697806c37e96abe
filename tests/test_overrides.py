"""`--set key=text` whose text is not TOML: the error names the key and the text and shows the TOML
the key takes, with an example that works when pasted into a shell."""

import re
import shlex

import pytest
from typer.testing import CliRunner

from dloral.cli import app
from dloral.config import OverrideError
from dloral.sweep.spec import SweepError, load_experiment
from dloral.train.config import load_config


def _example(message: str) -> list[str]:
    """The --set example of an error message, split as the shell splits it."""
    found = re.search(r"\(e\.g\. (--set (?:'[^']*'|\S+?))(?:, in single quotes|\))", message)
    assert found, message
    return shlex.split(found.group(1))


@pytest.mark.parametrize(
    "item, expected, example",
    [
        ("optim.lr=", 'nothing after "="; optim.lr takes a number', "optim.lr=1e-4"),
        ("optim.lr=abc", "'abc' is not a TOML value; optim.lr takes a number", "optim.lr=1e-4"),
        (
            "optim.betas=[0.9, x]",
            "'[0.9, x]' is not a TOML value; optim.betas takes a list of numbers",
            "optim.betas=[1e-4, 0.5]",
        ),
        (
            "model.consistency.patterns=[to_k, to_q]",
            "takes a list of strings in double quotes",
            'model.consistency.patterns=["to_k", "to_q"]',
        ),
        ("optim.gradient_checkpointing=yes", "true or false", "optim.gradient_checkpointing=true"),
        ("model.cfr.topk=many", "model.cfr.topk takes an integer", "model.cfr.topk=1"),
    ],
)
def test_training_override_that_is_not_toml(item, expected, example):
    with pytest.raises(OverrideError) as err:
        load_config(overrides=[item])
    message = str(err.value)
    assert message.startswith(f"--set {item}: ") and expected in message
    flag, fixed = _example(message)
    assert (flag, fixed) == ("--set", example)
    load_config(overrides=[fixed])  # the example is a valid override


@pytest.mark.parametrize(
    "item, expected, example",
    [
        (
            "sweep.space.run.seed=[a,b]",
            "'[a,b]' is not a TOML value; sweep.space.run.seed takes a list of integers",
            "sweep.space.run.seed=[1, 2]",
        ),
        (
            "sweep.space.model.cfr.variant=[full, off]",
            "takes a list of strings in double quotes",
            'sweep.space.model.cfr.variant=["full", "off"]',
        ),
        (
            "sweep.space.run.seed=",
            'nothing after "="; sweep.space.run.seed takes a list of integers',
            "sweep.space.run.seed=[1, 2]",
        ),
        ("sweep.num_samples=", "sweep.num_samples takes an integer", "sweep.num_samples=1"),
        ("optim.lr=", "optim.lr takes a number", "optim.lr=1e-4"),
    ],
)
def test_sweep_override_that_is_not_toml(item, expected, example):
    with pytest.raises(SweepError) as err:
        load_experiment("default", [item])
    message = str(err.value)
    assert message.startswith(f"--set {item}: ") and expected in message
    flag, fixed = _example(message)
    assert (flag, fixed) == ("--set", example)
    load_experiment("default", [fixed])


def test_a_list_of_bare_words_for_an_unknown_space_key_is_quoted_then_the_key_is_checked():
    with pytest.raises(SweepError) as err:
        load_experiment("default", ["sweep.space.loss.cfr=[full, off]"])
    flag, fixed = _example(str(err.value))
    assert fixed == 'sweep.space.loss.cfr=["full", "off"]'
    with pytest.raises(SweepError, match=r"sweep\.space\.loss\.cfr.*valid under loss"):
        load_experiment("default", [fixed])


def test_a_string_field_still_takes_bare_text():
    cfg = load_config(overrides=["run.name=[my run]", "model.cfr.variant=off"])
    assert cfg.run.name == "[my run]" and cfg.model.cfr.variant == "off"


def test_cli_prints_the_toml_expected():
    result = CliRunner().invoke(app, ["train", "--set", "optim.lr=", "--no-tracking"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert '--set optim.lr=: nothing after "="; optim.lr takes a number' in text
    assert "(e.g. --set optim.lr=1e-4)" in text
