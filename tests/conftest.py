"""Shared test helpers: launching real multi-rank jobs with torchrun over gloo on CPU."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = Path(__file__).resolve().parent / "dist"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, nproc: int, *args, tmp_path: Path, timeout: int = 300, env=None):
    """Run ``tests/dist/<script>`` on ``nproc`` CPU ranks with torchrun and return the JSON the
    ranks wrote (a list indexed by rank). Each rank writes ``$EMBER_TEST_OUT/rank<r>.json``.
    A non-zero exit fails the test with the ranks' output."""
    out = tmp_path / f"out_{Path(script).stem}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(DIST / script), *map(str, args)]
    full_env = dict(os.environ, EMBER_TEST_OUT=str(out), OMP_NUM_THREADS="1",
                    PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{script} failed (exit {proc.returncode})\n--- stdout\n{proc.stdout[-6000:]}"
                    f"\n--- stderr\n{proc.stderr[-8000:]}")
    results = []
    for r in range(nproc):
        f = out / f"rank{r}.json"
        results.append(json.loads(f.read_text()) if f.exists() else None)
    return results


@pytest.fixture
def run_dist(tmp_path):
    def _run(script, nproc, *args, **kw):
        return torchrun(script, nproc, *args, tmp_path=tmp_path, **kw)
    return _run
