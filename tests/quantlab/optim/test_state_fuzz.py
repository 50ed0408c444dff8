"""The state-dict fuzzer (helpers/state_fuzz.py) in a process of its own: an out-of-bounds write by a
kernel aborts that process and fails this test instead of the whole test run."""
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import state_fuzz

TESTS = Path(__file__).resolve().parents[2]
EXAMPLES = 1500  # about 10 s on the 2-core machine; every corruption is drawn ~30 times or more


def test_corrupted_state_dicts_are_refused_or_load_exactly():
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", "helpers.state_fuzz", str(EXAMPLES), "0"], cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the fuzzer failed (exit {done.returncode}):\n{done.stdout + done.stderr}"
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    refused, loaded = set(counts["refused"]), set(counts["loaded"])
    assert loaded == state_fuzz.PRESERVING  # value-preserving changes load and step like the original
    assert refused == (set(state_fuzz.CORRUPTIONS) - state_fuzz.PRESERVING
                       | {f"after load: {c}" for c in state_fuzz.AFTER_LOAD})  # every corruption was tried
    assert counts["examples"] > EXAMPLES // 2
