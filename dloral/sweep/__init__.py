"""Ray Tune sweeps around the training recipe (dloral.train), logged to MLflow."""
