"""`accelerate launch` with 2 CPU processes (gloo) and per-device batch b gives the losses of one process with
batch 2b, step by step: DPO, DPO with the sft term (RPO: its token mean is over the global batch, as ORPO's NLL),
and ORPO."""

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
    # each run gets an empty cache, so the DPO reference log-probs are computed in it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PREFALIGN_HOME": str(out / "home")}
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


# ~70 s each on 2 cores: DPO in the default run, the token-mean NLL ones (RPO, ORPO) with -m slow
@pytest.mark.parametrize("method", ["dpo", pytest.param("dpo-rpo", marks=pytest.mark.slow),
                                    pytest.param("orpo", marks=pytest.mark.slow)])
def test_two_processes_match_one_process_with_double_batch(tmp_path, method):
    one = _run([sys.executable, "mp_worker.py", method, "4", str(tmp_path / "one")], tmp_path / "one")
    # `accelerate launch --multi_gpu` starts the processes with torchrun; without CUDA the Trainer's Accelerator
    # uses the gloo backend on the CPU.
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    two = _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                "mp_worker.py", method, "2", str(tmp_path / "two")], tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one[-1] != one[0]  # training moved the loss
    assert two == pytest.approx(one, abs=1e-5)
    if method != "orpo":  # each process computed its share of the reference log-probs, gathered into one cache
        computed = {p.name: json.loads(p.read_text()) for p in (tmp_path / "two").glob("reference-*.json")}
        assert computed == {"reference-0.json": "computed", "reference-1.json": "computed"}
