"""What produced a result: the one provenance record that runs, benchmarks and recorded studies save
beside their numbers (library versions, machine, threads, the git commit of the code)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

from . import __version__

PACKAGES = ("numpy", "numba", "torch", "torchvision", "bitsandbytes", "torchao")
REPOSITORY = Path(__file__).resolve().parent.parent


def environment() -> dict:
    """Versions of Python, quantlab and the installed PACKAGES, the platform, CPU model and count, the
    thread counts of torch and Numba (when loaded: asking imports nothing), and the git commit of the
    checkout quantlab runs from (with whether it had uncommitted changes)."""
    info = {"python": platform.python_version(), "quantlab": __version__}
    for package in PACKAGES:
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    info.update(platform=platform.platform(), cpu=cpu_name(), cpu_count=os.cpu_count())
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "numba" in sys.modules:
        info["numba_threads"] = sys.modules["numba"].get_num_threads()
    info.update(git_state())
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict:
    """{"git_commit", "git_dirty"} of the checkout holding quantlab; {} outside one."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=10)

    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if commit.returncode != 0:
        return {}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}
