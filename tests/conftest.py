"""Shared test setup: offline, caches and tracking stores in a temporary directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The core's tests see craterlab's own components only: a plugin installed into the same
# environment cannot change what they count (tests of plugin loading enable it explicitly).
os.environ["CRATERLAB_LOAD_PLUGINS"] = "0"

# The plugin contract (check_component) and its fixtures, as plugin packages use them.
pytest_plugins = ["craterlab.testing"]

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# A tiny composition that runs end to end offline in seconds (used by run and sweep tests):
# timm's tiny test ViT (6 blocks, dim 64, 10x10 patches at 160 px) in place of ViT-S.
TINY = [
    "dataset=synthetic",
    "dataset.n_identities=12",
    "dataset.n_query_craters=4",
    "backbone.model=test_vit",
    "backbone.pretrained_tag=r160_in1k",
    "backbone.weights=random",
    "batch_size=16",
    "k=8",
    "shortlist=5",
    "depth=20",
]


def workflow_tiny(k: int = 8, shortlist: int = 20, batch_size: int = 16) -> list[str]:
    """Overrides for a workflow index (ingest/index/search) on timm's tiny test ViT with random
    weights: nothing is downloaded and a handful of crops encode in a second."""
    return [
        "backbone.model=test_vit",
        "backbone.pretrained_tag=null",
        "backbone.weights=random",
        f"k={k}",
        f"shortlist={shortlist}",
        f"batch_size={batch_size}",
    ]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One feature cache per test session, never the repository's outputs/ (session scope, so
    module-scoped fixtures that run the pipeline see it too)."""
    os.environ["CRATERLAB_CACHE"] = str(tmp_path_factory.getbasetemp() / "feature-cache")
    # precision=auto's bf16 probe keeps its verdict per machine; not in the user's home here.
    os.environ["CRATERLAB_PROBE_CACHE"] = str(tmp_path_factory.getbasetemp() / "probe.json")
    # the fused rerank kernel is compiled once per session (about a second), not into ~/.cache
    os.environ["CRATERLAB_KERNEL_CACHE"] = str(tmp_path_factory.getbasetemp() / "kernels")


@pytest.fixture
def mlflow_store(tmp_path: Path) -> dict[str, object]:
    """A tracking config for a fresh SQLite MLflow store in the test's tmp dir."""
    return {
        "name": "mlflow",
        "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "experiment": "test",
        "artifact_location": str(tmp_path / "artifacts"),
        "timeout_s": 30,
    }


# Debian's chromium, driven by playwright with this executable (its own downloads fail offline).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    """Wait until ``url`` answers 200, failing with the server's output if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")
