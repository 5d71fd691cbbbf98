"""Shared fixtures: paths to the real sample data and a runner for the real entry points."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()
VIDEOS = SHARED_DATA / "videos"
COCO_MINI = SHARED_DATA / "coco-mini"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
VENV_BIN = Path(sys.executable).parent


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI (``CI=true``) missing sample data fails the run instead of skipping the tests that need it."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    missing = [str(p) for p in (VIDEOS, COCO_MINI, FASHION_MNIST) if not p.is_dir()]
    if missing:
        raise pytest.UsageError(f"CI run without the sample data the tests need: {', '.join(missing)} "
                                "(../shared/data beside the clone; Fashion-MNIST from Debian's dataset-fashion-mnist)")


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for DeepSpeed on CPU: the cpu accelerator, one thread per process."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def run_tool(script: str, args: list[str], *, procs: int = 0, timeout: int = 600, check: bool = True,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``tools/<script>`` as a user would: ``procs`` > 0 goes through the ``deepspeed`` launcher."""
    tool = str(ROOT / "tools" / script)
    if procs:
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(procs), "--master_port", str(_free_port()), tool, *args]
    else:
        cmd = [sys.executable, tool, *args]
    res = subprocess.run(cmd, cwd=cwd or ROOT, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return res


def tool_module(name: str) -> ModuleType:
    """tools/<name>.py as a module, so its ``main(argv)`` runs in this process (where the command line
    itself is not what a test checks)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    if not FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; make install does it)")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def dist_group() -> None:
    """One process group for the whole pytest session, never destroyed (DeepSpeed caches groups)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mmmae.engine.dist import init_distributed
    init_distributed()
