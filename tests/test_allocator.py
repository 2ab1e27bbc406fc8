"""allocator.retain_freed_memory: a freed large buffer is reused by the next allocation instead of page-faulted."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from prefalign.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)  # 64 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [faults_of_one_step() for _ in range(16)]
print(applied, max(faults[-4:]), min(faults[-4:]))
"""


def _probe(mode: str) -> tuple[bool, int, int]:
    """(applied, most and fewest page faults of one allocate-touch-free step, over the last 4 of 16 steps)."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, most, fewest = out.split()
    return applied == "True", int(most), int(fewest)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_reused_instead_of_page_faulted_again():
    applied, retained, _ = _probe("retain")
    if not applied:
        pytest.skip("not glibc")
    _, _, default = _probe("default")
    pages = 64 * 2**20 // 4096
    assert default > pages // 2  # glibc default: the 64 MiB buffer is a fresh mmap, faulted in, every step
    # retained: once the heap has settled (a few steps; glibc's aligned allocations need a bigger free block than
    # the one just freed at first), every step reuses freed pages
    assert retained < pages // 20


@pytest.mark.parametrize("enabled", [True, False])
def test_cpu_trainer_applies_it_unless_turned_off(tmp_path, monkeypatch, enabled):
    import prefalign.trainer
    from prefalign import ORPOConfig, ORPOTrainer
    from tiny import conversational_rows, smollm2_tokenizer, tiny_llama

    calls = []
    monkeypatch.setattr(prefalign.trainer, "retain_freed_memory", lambda: calls.append(1) or True)
    tok = smollm2_tokenizer()
    args = ORPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], cpu_allocator_cache=enabled)
    ORPOTrainer(tiny_llama(tok), args=args, train_dataset=conversational_rows(2), processing_class=tok)
    assert calls == ([1] if enabled else [])
