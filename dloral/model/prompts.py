"""Where the text condition comes from. Encoded once per clip, never per frame.

- `empty` (default): the empty prompt "".
- `fixed`: a text the user gives (`--prompt`).
- `tagger`: a callable that tags the clip's first upsampled LQ frame, as the reference does with
  RAM/DAPE. Its weights are the user's: point `--tagger module:factory` at a factory that takes
  the torch device and returns `tag(frame) -> str` (frame: (3, H, W) float in [0, 1]); the
  prompt is then "{tags}, {prompt}," as in the reference's test script.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

PROMPT_SOURCES = ("empty", "fixed", "tagger")
Tagger = Callable[[torch.Tensor], str]


@dataclass
class PromptSource:
    kind: str = "empty"
    text: str = ""
    tagger: Tagger | None = None

    def __post_init__(self):
        if self.kind not in PROMPT_SOURCES:
            raise ValueError(f"prompt source must be one of {PROMPT_SOURCES}; got {self.kind!r}")
        if self.kind == "tagger" and self.tagger is None:
            raise ValueError("prompt source 'tagger' needs a tagger (--tagger module:factory)")

    def prompt_for(self, first_frame: torch.Tensor) -> str:
        if self.kind == "empty":
            return ""
        if self.kind == "fixed":
            return self.text
        return f"{self.tagger(first_frame)}, {self.text},"


def load_tagger(spec: str, device: torch.device) -> Tagger:
    """`package.module:factory` -> factory(device): the user's tagger (e.g. RAM, own weights)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"tagger must be given as module:factory; got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"tagger {spec!r} could not be imported: {err}") from err
    return factory(device)
