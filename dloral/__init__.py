"""dloral: train, ablate and benchmark DLoRAL one-step video super-resolution."""

__version__ = "0.1.0"
