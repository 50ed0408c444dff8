"""Studies built on the engine: the demo, comparisons of runs, sweeps over methods x optimizers x seeds,
the recorded protocols, and the quantization-error report."""
