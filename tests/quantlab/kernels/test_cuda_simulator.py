"""Runs tests/cuda under Numba's CUDA simulator, in a process of its own (the simulator is chosen
when numba.cuda is first imported, so it cannot share this process)."""
import os
import subprocess
import sys
from pathlib import Path


def test_cuda_kernels_in_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    tests = Path(__file__).resolve().parents[2] / "cuda"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                            env=env, capture_output=True, text=True, timeout=1200)
    print(result.stdout[-5000:], result.stderr[-3000:])
    assert result.returncode == 0, result.stdout[-5000:]
    assert " passed" in result.stdout
