"""The metrics sweeps report, with their directions: light to import (no model code), so that
reports and the CLI can name them without loading the training stack."""

# reported by every trial at each validation (dloral.train.recipe), and what a sweep may judge on
METRICS = {"val/psnr": "max", "val/ssim": "max", "val/temporal_change": "min"}
# what the best trial of each arm is scored on after the sweep (dloral.sweep.evaluate)
EVAL_COLUMNS = ("psnr", "ssim", "temporal_change", "s_per_frame")
