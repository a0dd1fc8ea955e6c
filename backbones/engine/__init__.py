"""Run infrastructure shared by pretraining and detection: config, run folder, distributed, checkpoints."""
