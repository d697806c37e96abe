"""The text condition of training (`loss.prompt_source`), also CSD's positive prompt.

- `empty` (default): "" for every sample.
- `fixed`: `loss.pos_prompt` for every sample.
- `tagger`: "{tags}, {pos_prompt}" with the tags of each sample's GT frame 1, as the reference
  does with RAM (src/train_DLoRAL.py ~334). `loss.tagger` is "module:factory", the interface of
  `dloral-exp upscale --tagger`: factory(device) -> tag(frame (3, H, W) in [0, 1]) -> str.

A sample is tagged once (kept by its (clip, start, seed), which fix its frames); the kept
sample -> prompt rows are written to `prompts.json` in the run folder, read back on resume, and
logged as a table artifact of the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from dloral.atomic import atomic_write_text
from dloral.model.prompts import PromptSource, Tagger, load_tagger
from dloral.train.config import LossConfig

PROMPTS_FILE = "prompts.json"
TAGGED_FRAME = 1  # the reference tags GT frame 1 (x_tgt[:, 1]) of each 3-frame sample

SampleKey = tuple[str, int, int]  # (clip, start frame, sample seed)


def sample_keys(batch: dict) -> list[SampleKey]:
    """The (clip, start, seed) of each sample of a collated batch of `TrainingClips`."""
    return [
        (str(c), int(s), int(d))
        for c, s, d in zip(batch["clip"], batch["start"], batch["seed"], strict=True)
    ]


class TrainingPrompts:
    """Per-sample prompts and their text embeddings for one run."""

    def __init__(
        self,
        cfg: LossConfig,
        encode: Callable[[list[str]], torch.Tensor],
        device: torch.device,
        tagger: Tagger | None = None,
    ):
        """`encode(texts) -> (len(texts), 77, D)` is the model's text encoder; `tagger` given
        replaces loading `cfg.tagger` (tests, or a tagger already in memory)."""
        self.kind, self.text = cfg.prompt_source, cfg.pos_prompt
        self.encode, self.device = encode, device
        self.tagger: Tagger | None = None
        self.fixed: torch.Tensor | None = None
        self.kept: dict[SampleKey, str] = {}
        self.unlogged: list[SampleKey] = []
        if self.kind == "tagger":
            if tagger is None and not cfg.tagger:
                raise ValueError(cfg.tagger_problem())
            self.tagger = tagger if tagger is not None else load_tagger(cfg.tagger, device)
            if isinstance(self.tagger, torch.nn.Module):  # frozen: it only reads the GT
                self.tagger.eval().requires_grad_(False)
        else:
            with torch.no_grad():
                self.fixed = encode([self.text if self.kind == "fixed" else ""]).to(device)

    def prompts(self, batch: dict) -> list[str]:
        """The prompt of each sample; a sample not seen before is tagged (without gradient)."""
        if self.tagger is None:
            text = self.text if self.kind == "fixed" else ""
            return [text] * batch["gt"].shape[0]
        out = []
        gt = batch["gt"]
        frame = min(TAGGED_FRAME, gt.shape[1] - 1)
        for i, key in enumerate(sample_keys(batch)):
            if key not in self.kept:
                with torch.no_grad():
                    tags = self.tagger(gt[i, frame].to(self.device).float())
                self.kept[key] = f"{tags}, {self.text}"
                self.unlogged.append(key)
            out.append(self.kept[key])
        return out

    def embeds(self, batch: dict) -> torch.Tensor:
        """(B, 77, D) text states, one per sample (or (1, 77, D) shared by all)."""
        if self.fixed is not None:
            return self.fixed
        with torch.no_grad():
            return self.encode(self.prompts(batch)).to(self.device)

    def for_inference(self) -> PromptSource:
        """The same source for validation, as at inference: a tagger tags the clip's first
        upsampled LQ frame (there is no GT), "{tags}, {pos_prompt},"."""
        if self.kind == "empty":
            return PromptSource()
        return PromptSource(self.kind, self.text, self.tagger)

    # ----- the run's record --------------------------------------------------------------
    @staticmethod
    def _columns(keys: list[SampleKey], kept: dict[SampleKey, str]) -> dict[str, list]:
        return {
            "clip": [k[0] for k in keys],
            "start": [k[1] for k in keys],
            "seed": [k[2] for k in keys],
            "prompt": [kept[k] for k in keys],
        }

    def take_unlogged(self) -> dict[str, list]:
        """Rows tagged since the last call, as table columns (an MLflow table appends them)."""
        keys, self.unlogged = self.unlogged, []
        return self._columns(keys, self.kept)

    def save(self, run_dir: Path) -> None:
        if self.tagger is not None:
            table = self._columns(list(self.kept), self.kept)
            atomic_write_text(run_dir / PROMPTS_FILE, json.dumps(table, indent=1))

    def load(self, run_dir: Path) -> None:
        """Rows of an earlier part of this run: not tagged again, not logged again."""
        path = run_dir / PROMPTS_FILE
        if self.tagger is None or not path.is_file():
            return
        table = json.loads(path.read_text())
        for c, s, d, p in zip(
            table["clip"], table["start"], table["seed"], table["prompt"], strict=True
        ):
            self.kept[(c, int(s), int(d))] = p
