"""Training: configs, the stage schedule, losses and the alternating C/D recipe."""
