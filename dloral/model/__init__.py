"""DLoRAL model: backbone profiles, CFR, dual LoRA, the one-step video pipeline, checkpoints."""
