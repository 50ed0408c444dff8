"""The training engine: a RunConfig (config.py) becomes a run directory (run.py) trained one epoch at a
time (loop.py), with atomic, validated checkpoints (checkpoint.py), a progress line (progress.py), the
optimizer it names (optimizer.py), and the evaluation of what it leaves (evaluate.py)."""
