"""speed/allocator.py: with the policy held, a freed large buffer is reused by the next allocation instead of
page-faulted; released, the process's own malloc settings are back."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

PROBE = """
import resource, sys, torch
from prefalign.speed.allocator import retain_freed_memory
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
def test_cpu_trainer_applies_it_only_when_asked(tmp_path, monkeypatch, enabled):
    import prefalign.speed
    from prefalign import ORPOConfig, ORPOTrainer
    from tiny import conversational_rows, smollm2_tokenizer, tiny_llama

    calls = []
    monkeypatch.setattr(prefalign.speed, "retain_freed_memory", lambda: calls.append("retain") or True)
    tok = smollm2_tokenizer()
    args = ORPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], cpu_allocator_cache=enabled, max_steps=1,
                      save_strategy="no", disable_tqdm=True)
    trainer = ORPOTrainer(tiny_llama(tok), args=args, train_dataset=conversational_rows(2), processing_class=tok)
    assert calls == []  # building a trainer changes nothing in the process
    trainer.train()
    assert calls == (["retain"] if enabled else [])  # asked for: process-wide, for good (never undone)


ADAM_MODES = {"default": {}, "foreach=False": {"foreach": False}, "fused": {"fused": True}}


def _adam_run(cls, kwargs: dict, preallocate: bool, steps: int = 3):
    """Train a small parameter set ``steps`` steps: two groups, float32 and float64 parameters, a frozen parameter
    (never gets state) and one that gets no gradient in the first step (Adam skips it there). Returns the optimizer,
    the parameters by name and what preallocate_adam_state returned (None when not called)."""
    from prefalign.speed.allocator import preallocate_adam_state

    gen = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen),
         "late": torch.randn(3, generator=gen), "frozen": torch.randn(3, generator=gen),
         "w64": torch.randn(3, generator=gen, dtype=torch.float64)}
    p = {n: torch.nn.Parameter(t, requires_grad=n != "frozen") for n, t in p.items()}
    opt = cls([{"params": [p["w"], p["b"], p["frozen"]]},
               {"params": [p["late"], p["w64"]], "lr": 3e-2, "weight_decay": 0.1}],
              lr=1e-2, **kwargs)
    count = preallocate_adam_state(opt) if preallocate else None
    x = torch.randn(5, 4, generator=gen)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        h = (x @ p["w"] + p["b"]) * p["frozen"]
        if step > 0:
            h = h + p["late"]
        loss = h.tanh().pow(2).sum() + (p["w64"] ** 2).sum().float() * (step + 1)
        loss.backward()
        assert (p["late"].grad is None) == (step == 0)
        opt.step()
    return opt, p, count


@pytest.mark.parametrize("mode", list(ADAM_MODES))
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
def test_preallocated_adam_state_trains_bit_for_bit_like_lazy_init(cls, amsgrad, mode):
    """The up-front state must be exactly what torch's lazy _init_group would create (zeros, step 0 of the same
    dtype and device), or training would change: parameters and optimizer state after 3 steps are bitwise equal."""
    kwargs = {"amsgrad": amsgrad, **ADAM_MODES[mode]}
    lazy_opt, lazy, none = _adam_run(cls, kwargs, preallocate=False)
    pre_opt, pre, count = _adam_run(cls, kwargs, preallocate=True)
    assert none is None and count == 4  # every trainable parameter, not the frozen one
    for name, param in lazy.items():
        assert torch.equal(pre[name], param), name
    gen = torch.Generator().manual_seed(0)
    assert not torch.equal(lazy["w"], torch.randn(4, 3, generator=gen))  # training moved the parameters
    keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    for name in ("w", "b", "late", "w64"):
        a, b = lazy_opt.state[lazy[name]], pre_opt.state[pre[name]]
        assert set(a) == set(b) == keys, name
        for key in keys:
            assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, (name, key)
            assert torch.equal(a[key], b[key]), (name, key)
        # "late" missed step 1: two updates, not three, either way
        assert b["step"].item() == (2 if name == "late" else 3), name
        assert b["step"].dtype == torch.float32  # fused: on the parameter's device; else the default float dtype
    assert not pre_opt.state.get(pre["frozen"])  # no moments for a parameter that does not train
    assert pre_opt.state_dict()["param_groups"] == lazy_opt.state_dict()["param_groups"]


def test_preallocation_adds_no_state_entry_for_a_frozen_parameter():
    """A checkpoint's optimizer state must not differ from lazy init's: no entry at all for the frozen parameter."""
    lazy_opt, _, _ = _adam_run(torch.optim.AdamW, {}, preallocate=False, steps=1)
    pre_opt, pre, _ = _adam_run(torch.optim.AdamW, {}, preallocate=True, steps=1)
    assert pre["frozen"] not in pre_opt.state
    # "late" had no gradient yet: preallocation gave it its (zero, step 0) state early, lazy init has none so far
    late = next(i for i, p in enumerate(p for g in pre_opt.param_groups for p in g["params"]) if p is pre["late"])
    assert pre_opt.state_dict()["state"].keys() - {late} == lazy_opt.state_dict()["state"].keys()


def test_preallocated_step_follows_a_float64_default_dtype():
    """Unfused Adam's lazy step is a CPU scalar of torch's default dtype: float64 when that is the default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lazy_opt, lazy, _ = _adam_run(torch.optim.AdamW, {}, preallocate=False, steps=2)
        pre_opt, pre, _ = _adam_run(torch.optim.AdamW, {}, preallocate=True, steps=2)
    finally:
        torch.set_default_dtype(previous)
    for name in ("w", "late"):
        a, b = lazy_opt.state[lazy[name]]["step"], pre_opt.state[pre[name]]["step"]
        assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b)
        assert torch.equal(lazy[name], pre[name])


def test_other_optimizers_are_left_alone():
    """Only torch's own Adam and AdamW are known to initialise exactly so; anything else (an AdamW subclass too)
    keeps its lazy initialisation."""
    from prefalign.speed.allocator import preallocate_adam_state

    class MyAdamW(torch.optim.AdamW):
        pass

    w = torch.nn.Parameter(torch.ones(3))
    for opt in (torch.optim.SGD([w], lr=0.1, momentum=0.9), torch.optim.Adamax([w]), torch.optim.RMSprop([w]),
                MyAdamW([w])):
        assert preallocate_adam_state(opt) == 0, type(opt).__name__
        assert len(opt.state) == 0 and opt.state_dict()["state"] == {}, type(opt).__name__


def test_a_wrapped_optimizer_is_unwrapped():
    """accelerate's AcceleratedOptimizer keeps the torch optimizer as ``.optimizer``; the state goes on that one."""
    import types

    from prefalign.speed.allocator import preallocate_adam_state

    w, b = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(3))
    inner = torch.optim.AdamW([w, b], amsgrad=True)
    assert preallocate_adam_state(types.SimpleNamespace(optimizer=inner)) == 2
    for p in (w, b):
        state = inner.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert state["step"].item() == 0 and state["step"].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(state[key], torch.zeros_like(p)) and state[key].shape == p.shape
    assert preallocate_adam_state(types.SimpleNamespace(optimizer=inner)) == 0  # existing state is kept as is
    wrapped_sgd = types.SimpleNamespace(optimizer=torch.optim.SGD([w], lr=0.1))
    assert preallocate_adam_state(wrapped_sgd) == 0 and not wrapped_sgd.optimizer.state


def test_trainer_optimizer_has_its_state_before_the_first_step(tmp_path):
    """create_optimizer preallocates: the default fused AdamW holds zero moments for every trainable parameter."""
    from prefalign import ORPOConfig, ORPOTrainer
    from tiny import conversational_rows, smollm2_tokenizer, tiny_llama

    tok = smollm2_tokenizer()
    args = ORPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], cpu_allocator_cache=False)
    trainer = ORPOTrainer(tiny_llama(tok), args=args, train_dataset=conversational_rows(2), processing_class=tok)
    with trainer.fast():  # as inside train()
        opt = trainer.create_optimizer()
    inner = getattr(opt, "optimizer", opt)
    assert type(inner) is torch.optim.AdamW
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(len(inner.state[p]) == 3 for p in trainable)
    for p in trainable:
        assert inner.state[p]["step"].item() == 0 and not inner.state[p]["exp_avg_sq"].any()


RELEASE_PROBE = """
import sys, torch
from prefalign.speed.allocator import release_freed_memory, retain_freed_memory
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
if not retain_freed_memory():
    print("skip"); sys.exit()
big = torch.ones(24 * 2**20)  # 96 MiB on the heap (mmap is off), every page touched
pin = torch.ones(4096)  # allocated after it, so the freed block is a hole, not the heap's top
del big
before = rss_mib()
release_freed_memory()
print(before - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_release_returns_a_freed_block_inside_the_heap_to_the_kernel():
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True).stdout
    if out.strip() == "skip":
        pytest.skip("not glibc")
    assert float(out) > 80  # MiB of the 96 MiB hole no longer resident


def test_release_after_layers_runs_in_forward_and_backward_every_nth_layer():
    from prefalign.speed.allocator import decoder_layers, release_after_layers
    from tiny import smollm2_tokenizer, tiny_llama

    model = tiny_llama(smollm2_tokenizer(), num_hidden_layers=4).train()
    assert decoder_layers(model) == list(model.model.layers)
    assert decoder_layers(torch.nn.Linear(2, 2)) == []
    ids = torch.tensor([[1, 2, 3, 4]])
    for every, per_pass in ((1, 4), (2, 2), (3, 1), (5, 0)):
        calls: list[str] = []
        handles = release_after_layers(model, every, release=functools.partial(calls.append, "x"))
        assert len(handles) == per_pass
        with torch.no_grad():
            model(input_ids=ids)
        assert len(calls) == per_pass  # no grad: forward only
        model(input_ids=ids).logits.sum().backward()
        assert len(calls) == 3 * per_pass  # forward, then once per hooked layer in backward
        model.eval()  # evaluation and generation: never
        model(input_ids=ids).logits.sum().backward()
        assert len(calls) == 3 * per_pass
        model.train()
        for h in handles:
            h.remove()
    assert release_after_layers(model, 0) == []


def test_release_every_must_not_be_negative(tmp_path):
    from prefalign import DPOConfig
    from prefalign.errors import ConfigError

    with pytest.raises(ConfigError, match="release_cpu_memory_every=-1 is out of range"):
        DPOConfig(output_dir=str(tmp_path), use_cpu=True, release_cpu_memory_every=-1)


def test_trainer_says_when_release_has_nothing_to_hook(tmp_path, caplog):
    from prefalign import ORPOConfig, ORPOTrainer
    from prefalign.speed.allocator import can_release_memory
    from tiny import conversational_rows, smollm2_tokenizer, tiny_llama

    if not can_release_memory():
        pytest.skip("not glibc")
    tok = smollm2_tokenizer()
    for every, hooked in ((2, 1), (3, 0)):  # the tiny model has 2 layers
        caplog.clear()
        args = ORPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], release_cpu_memory_every=every)
        tr = ORPOTrainer(tiny_llama(tok), args=args, train_dataset=conversational_rows(2), processing_class=tok)
        with tr.fast():  # as inside train() and evaluate()
            assert sum(len(layer._forward_hooks) for layer in tr.model.model.layers) == hooked
        assert sum(len(layer._forward_hooks) for layer in tr.model.model.layers) == 0  # removed again
        warned = [r.getMessage() for r in caplog.records if "release_cpu_memory_every" in r.getMessage()]
        assert warned == ([] if hooked else ["release_cpu_memory_every=3 has no effect: the model has only 2 decoder "
                                             "layers"])
