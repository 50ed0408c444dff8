import os

import numba
import pytest
import torch

# tests/cuda needs a GPU or Numba's CUDA simulator; the default suite runs it in a process of its
# own under the simulator (tests/quantlab/kernels/test_cuda_simulator.py), since the simulator
# must be chosen at start-up.
if not numba.config.ENABLE_CUDASIM and os.environ.get("QUANTLAB_GPU_TESTS") != "1":
    collect_ignore = ["cuda"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny tensors: on a shared 2-core machine the thread
    hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
