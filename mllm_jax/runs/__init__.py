"""A training run's directory: its config, layout, checkpoints and trained model.

Used alike by `train` (which writes runs), `export` and `infer` (which read them).
"""
