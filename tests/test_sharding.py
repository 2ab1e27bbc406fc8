"""Sharded training: the speed path under FSDP2 and DeepSpeed ZeRO-3.

Fast: the one detection of sharded weights (speed/partition.py) on a stand-in ZeRO-3 parameter and on a real DTensor,
and the fast path's log-probs and gradients equal to full logits where the LM head's weight is whole only inside its
forward (a stand-in for ZeRO-3's gather, and FSDP2 itself on a one-process gloo group).
Two processes (gloo): FSDP2 with per-device batch b gives the losses of one process with batch 2b at every step, for
DPO (precomputed and live reference), ORPO, CPO, KTO, SFT and LoRA; checkpoints save and resume exactly; the run
directory loads with from_pretrained as a one-process run's.
"""

from __future__ import annotations

import enum
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefalign.speed.head import materialised_linear, tied_embeds
from prefalign.speed.partition import model_sharded_by, partitioned, sharded_by
from tiny import conversational_rows, row_reply_mask, smollm2_tokenizer, tiny_llama, token_logps

HERE = Path(__file__).parent
TOL = 1e-5


class ZeroParamStatus(enum.Enum):  # deepspeed.runtime.zero.partition_parameters.ZeroParamStatus
    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


def _zero3_placeholder(shape: tuple[int, ...], ds_id: int = 0) -> torch.nn.Parameter:
    """What a ZeRO-3 parameter looks like outside its module's forward: empty data, ds_* attributes."""
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_id, p.ds_status, p.ds_shape, p.ds_numel = ds_id, ZeroParamStatus.NOT_AVAILABLE, shape, 0
    return p


def test_a_zero3_placeholder_is_partitioned_and_the_head_and_tied_embedding_do_not_read_it():
    head = torch.nn.Linear(8, 50, bias=False)
    whole = head.weight
    assert partitioned(whole) is None and sharded_by(head) is None and model_sharded_by(head) is None
    hidden = torch.randn(3, 8)
    assert materialised_linear(head, hidden)
    head.weight = _zero3_placeholder((50, 8))
    assert partitioned(head.weight) == "ZeRO-3" and sharded_by(head) == "ZeRO-3"
    assert model_sharded_by(torch.nn.Sequential(torch.nn.ReLU(), head)) == "ZeRO-3"
    assert not materialised_linear(head, hidden)
    # gathered (inside the forward): whole for now, but still managed by ZeRO-3
    head.weight.data, head.weight.ds_status = whole.detach().clone(), ZeroParamStatus.AVAILABLE
    assert partitioned(head.weight) is None and sharded_by(head) == "ZeRO-3"
    assert materialised_linear(head, hidden)
    embed = torch.nn.Embedding(50, 8)
    embed.weight = head.weight  # tied
    assert tied_embeds(embed, head, torch.tensor([[1, 2]]), has_targets=True, tied=None) is None


def _zero3_stand_in(module: torch.nn.Module, ds_id: int = 7) -> torch.nn.Parameter:
    """Make a linear module's weight behave as under ZeRO-3: an empty placeholder except inside the module's own
    forward, where a pre-forward hook gathers it (the whole parameter, which receives the gradient) and a
    post-forward hook releases it. Returns the whole parameter."""
    whole = module.weight
    whole.ds_id, whole.ds_status, whole.ds_shape = ds_id, ZeroParamStatus.AVAILABLE, tuple(whole.shape)
    placeholder = _zero3_placeholder(tuple(whole.shape), ds_id=ds_id)

    def gather(mod, args):
        mod.weight = whole

    def release(mod, args, output):
        mod.weight = placeholder

    module.register_forward_pre_hook(gather)
    module.register_forward_hook(release)
    module.weight = placeholder
    return whole


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    from prefalign.data.collate import PairCollator
    from prefalign.data.tokenize import TokenizeSettings, tokenize_rows

    pairs, _ = tokenize_rows(conversational_rows(3), tok, TokenizeSettings())
    return PairCollator(pad_token_id=tok.pad_token_id)(pairs)


def _logps_and_grad(model, batch, grad_of, **kw):
    model.zero_grad(set_to_none=True)
    target = row_reply_mask(batch)
    logps = token_logps(model, batch["input_ids"], batch["attention_mask"], target, **kw)
    weights = torch.linspace(-1, 1, logps.numel()).view(logps.shape)
    (logps * weights).sum().backward()
    return logps.detach(), grad_of().detach().clone()


def test_fast_path_under_a_zero3_stand_in_matches_full_logits(tok, batch):
    plain = tiny_llama(tok, seed=0)
    model = tiny_llama(tok, seed=0)
    whole = _zero3_stand_in(model.lm_head)
    assert model_sharded_by(model) == "ZeRO-3"
    ref, ref_grad = _logps_and_grad(plain, batch, lambda: plain.lm_head.weight.grad, force_full_logits=True)
    got, got_grad = _logps_and_grad(model, batch, lambda: whole.grad, chunk_rows=4)
    assert torch.allclose(got, ref, atol=TOL, rtol=0) and (got != 0).any()
    assert torch.allclose(got_grad, ref_grad, atol=TOL, rtol=0) and ref_grad.abs().sum() > 0
    assert partitioned(model.lm_head.weight) == "ZeRO-3"  # released again after the forward
    assert "forward" not in model.lm_head.__dict__  # the swapped forward is gone


def test_lean_mlp_runs_a_zero3_down_projection_through_its_own_forward(tok):
    from prefalign.speed import layers

    def mlp_out(zero3: bool, lean: bool):
        mlp = tiny_llama(tok, seed=0).model.layers[0].mlp
        whole = _zero3_stand_in(mlp.down_proj) if zero3 else mlp.down_proj.weight
        patched = layers.apply(mlp) if lean else []
        assert len(patched) == (1 if lean else 0)
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = mlp(x)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        return y.detach(), x.grad, whole.grad

    ref = mlp_out(zero3=False, lean=False)
    for got in (mlp_out(zero3=True, lean=True), mlp_out(zero3=False, lean=True)):
        for a, b in zip(got, ref, strict=True):
            assert torch.allclose(a, b, atol=TOL, rtol=0)


@pytest.fixture()
def one_process_group(tmp_path):
    """A one-process gloo group, so FSDP2 and DTensors exist without launching anything."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_one_process_the_fast_path_matches_full_logits(tok, batch, one_process_group):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def sharded(tied: bool):
        model = tiny_llama(tok, seed=0, tie_word_embeddings=tied)
        for layer in model.model.layers:
            fully_shard(layer)
        tail = [model.model.norm, model.lm_head] + ([model.model.embed_tokens] if tied else [])  # as accelerate
        fully_shard(tail, reshard_after_forward=True)
        fully_shard(model)
        return model

    for tied in (False, True):
        plain = tiny_llama(tok, seed=0, tie_word_embeddings=tied)
        ref, ref_grad = _logps_and_grad(plain, batch, lambda p=plain: p.lm_head.weight.grad, force_full_logits=True)
        model = sharded(tied)
        assert isinstance(model.lm_head.weight, DTensor) and partitioned(model.lm_head.weight) == "FSDP2"
        assert sharded_by(model.lm_head) == "FSDP2" and model_sharded_by(model) == "FSDP2"
        got, got_grad = _logps_and_grad(model, batch, lambda m=model: m.lm_head.weight.grad.full_tensor(),
                                        chunk_rows=4)
        assert torch.allclose(got, ref, atol=TOL, rtol=0) and (got != 0).any()
        assert torch.allclose(got_grad, ref_grad, atol=TOL, rtol=0), f"tied={tied}"
        assert isinstance(model.lm_head.weight, DTensor)  # resharded after backward


# ----- two processes ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, method: str, batch: int, *extra: str, processes: int = 1, home: Path | None = None,
         accelerate_config: str | None = None) -> list:
    """Run shard_worker.py (under torchrun with ``processes``, or ``accelerate launch`` with a config file), return
    its per-step losses."""
    home = home or out / "home"  # a fresh reference cache; the session's converted models
    home.mkdir(parents=True, exist_ok=True)
    models = Path(os.environ["PREFALIGN_HOME"]) / "models"
    if models.is_dir() and not (home / "models").exists():
        (home / "models").symlink_to(models)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PREFALIGN_HOME": str(home)}
    worker = ["shard_worker.py", method, str(batch), str(out), *extra]
    if accelerate_config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
               "--main_process_port", str(_free_port()), *worker]
    elif processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *worker]
    else:
        cmd = [sys.executable, *worker]
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "losses.json").read_text())


def _processes(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("process-*.json"))}


def _parity(tmp_path: Path, method: str, *extra: str, engine: str = "fsdp") -> tuple[list, list]:
    one = _run(tmp_path / "one", method, 4, *[e for e in extra if not e.startswith(("--fsdp", "--zero"))])
    two = _run(tmp_path / "two", method, 2, *extra, processes=2)
    assert len(one) == len(two) == 4
    assert one[-1] != one[0]  # training moved the loss
    assert two == pytest.approx(one, abs=1e-5)
    states = _processes(tmp_path / "two")
    assert [s[engine] for s in states.values()] == [True, True] and states["process-0.json"]["world"] == 2
    return one, two


# one representative in the default run (~40 s on 2 cores): DPO with its reference precomputed across the processes
@pytest.mark.parametrize("method", ["dpo", pytest.param("dpo-live", marks=pytest.mark.slow),
                                    pytest.param("orpo", marks=pytest.mark.slow),
                                    pytest.param("cpo", marks=pytest.mark.slow),
                                    pytest.param("kto", marks=pytest.mark.slow),
                                    pytest.param("sft", marks=pytest.mark.slow)])
def test_fsdp2_two_processes_match_one_process_with_double_batch(tmp_path, method):
    _parity(tmp_path, method, "--fsdp=full")
    if method in ("dpo", "kto"):  # each process scored its share of the reference batches: one cache, both computed
        assert {s["reference"] for s in _processes(tmp_path / "two").values()} == {"computed"}


@pytest.mark.slow
def test_fsdp2_with_lora_and_tied_embeddings_match_one_process(tmp_path):
    _parity(tmp_path / "lora", "dpo", "--fsdp=full", "--lora")
    _parity(tmp_path / "tied", "orpo", "--fsdp=full", "--tied")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["--fsdp=full", "--fsdp=sharded", "--zero=2", "--zero=3"])
def test_checkpoints_resume_exactly_and_the_run_loads_with_from_pretrained(tmp_path, engine):
    from transformers import AutoModelForCausalLM

    if engine.startswith("--zero"):
        pytest.importorskip("deepspeed")
    home = tmp_path / "home"
    one = _run(tmp_path / "one", "orpo", 4, "--save-steps=2", home=home)
    two = _run(tmp_path / "two", "orpo", 2, engine, "--save-steps=2", processes=2, home=home)
    assert two == pytest.approx(one, abs=1e-5)
    ckpt = tmp_path / "two" / "checkpoint-2"
    assert (ckpt / "trainer_state.json").exists()
    if engine == "--fsdp=sharded":
        assert any(p.name.startswith("pytorch_model_fsdp") for p in ckpt.iterdir())
    assert not list((tmp_path / "two").glob(".tmp-*"))
    resumed = _run(tmp_path / "resumed", "orpo", 2, engine, f"--resume={ckpt}", processes=2, home=home)
    assert resumed == pytest.approx(two, abs=1e-6)  # steps 1-2 from the checkpoint's history, 3-4 run again
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, t in sa.items():
        assert torch.allclose(sb[name], t, atol=1e-5, rtol=0), name


@pytest.mark.slow
def test_accelerate_launch_with_the_example_fsdp_config_shards_and_matches_one_process(tmp_path):
    config = HERE.parent / "examples" / "accelerate" / "fsdp.yaml"
    one = _run(tmp_path / "one", "orpo", 4)
    two = _run(tmp_path / "two", "orpo", 2, accelerate_config=str(config))
    assert two == pytest.approx(one, abs=1e-5) and one[-1] != one[0]
    states = _processes(tmp_path / "two")
    assert [(s["fsdp"], s["world"]) for s in states.values()] == [(True, 2), (True, 2)]


# DeepSpeed is not a dependency: run with an interpreter that has it (pip install deepspeed), e.g.
# python -m pytest -m slow tests/test_sharding.py -k deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", ["dpo", "orpo", "kto", "sft"])
def test_deepspeed_zero_two_processes_match_one_process_with_double_batch(tmp_path, stage, method):
    pytest.importorskip("deepspeed")
    _parity(tmp_path, method, f"--zero={stage}", engine="deepspeed")
