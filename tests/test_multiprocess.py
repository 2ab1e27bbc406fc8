"""Two CPU processes (gloo) with per-device batch b give the losses of one process with batch 2b, step by step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], out: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_two_processes_match_one_process_with_double_batch(tmp_path, method):
    one = _run([sys.executable, "mp_worker.py", method, "4", str(tmp_path / "one")], tmp_path / "one")
    # torchrun: the launcher `accelerate launch` uses for multi-device runs; the Trainer's Accelerator reads the
    # same environment (RANK, WORLD_SIZE, MASTER_ADDR) and uses gloo on CPU.
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "mp_worker.py", method, "2", str(tmp_path / "two")], tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one[-1] != one[0]  # training moved the loss
    assert two == pytest.approx(one, abs=1e-5)
