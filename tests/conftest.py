import os

import numba

# tests/cuda needs a GPU or Numba's CUDA simulator; the default suite runs it in a process of its
# own under the simulator (test_cuda_simulator.py), since the simulator must be chosen at start-up.
if not numba.config.ENABLE_CUDASIM and os.environ.get("QUANTLAB_GPU_TESTS") != "1":
    collect_ignore = ["cuda"]
