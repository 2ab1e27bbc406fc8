"""Leaner-memory forward/backward for the two Llama-family blocks that keep the most activations for backward.

Autograd through a Llama MLP, ``down(silu(gate(x)) * up(x))``, keeps four ``[tokens, intermediate]`` tensors per
layer (gate, up, silu(gate) and the product); through an RMSNorm, two ``[tokens, hidden]`` tensors. The functions
here keep gate and up, and for RMSNorm the input and one reciprocal RMS per token, and recompute the rest in backward
from them: elementwise work only, no matmul is repeated. For SmolLM2-135M that is 16.6 KB less per token and layer
(about 0.5 GB for a batch of four 260-token pairs). Same math, so values and gradients match the stock modules to
float rounding (tests/test_layers.py). A PEFT LoRA down projection (one plain adapter, no dropout) is covered too:
one function computes its base output and its adapter's first factor from the product, which is again recomputed
(the adapter would otherwise save it); any other wrapper, or an adapter that is disabled, merged or has dropout,
runs its own forward, as does a down projection whose weights a sharding engine gathers only inside its own forward
(DeepSpeed ZeRO-3; speed/partition.py). Under FSDP2 the decoder layer is the unit gathered, so the lean MLP stays.

A patched RMSNorm's output is also kept out of memory where it is saved by the layers it feeds (the q/k/v and
gate/up projections save their input for the weight gradient): inside ``recompute_norm_outputs()`` such a saved
tensor is stored as a recipe over the norm's own saved input and reciprocal RMS, and rebuilt bit for bit in backward.
That is two more ``[tokens, hidden]`` tensors per layer (0.14 GB for the same batch), for one elementwise pass each.

Under autocast each function computes what the stock module computes under it (speed/precision.py): the caller
passes the dtype autocast would run the down projection in, the functions cast their matmul operands to it with
autocast off, and gradients come back in each input's own dtype. The RMSNorm has no matmul and computes in float32
as the stock one does.

Only modules whose forward is known to be exactly the Llama one are patched (by class name and structure); any other
module is left alone. Patching sets an instance attribute ``forward``; ``restore`` removes it. Only the speed
boundary (``prefalign.speed.enable``) patches, and its ``undo`` restores.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import types
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from .partition import sharded_by
from .precision import matmul_dtype, outside_autocast

logger = logging.getLogger("prefalign")
_TOLD: set[str] = set()  # engines whose fallback was logged (once per process)

# RMSNorm classes whose forward is Llama's: weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)
RMSNORM_CLASSES = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen2MoeRMSNorm",
    "Qwen3MoeRMSNorm", "Phi3RMSNorm", "SmolLM3RMSNorm", "Olmo2RMSNorm",
})
# MLP classes whose forward is Llama's: down(act(gate(x)) * up(x))
MLP_CLASSES = frozenset({
    "LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP", "OlmoMLP", "Olmo2MLP",
})


class _RMSNorm(torch.autograd.Function):
    """``y = w * (x * r).to(dtype)`` with ``r = rsqrt(mean(x^2) + eps)`` in float32; keeps ``x`` and ``r``.

    Backward, with ``xh = x r`` and ``gh = (dy * w)``: ``dw = sum dy * xh``, ``dx = r (gh - xh mean(gh xh))``.
    """

    @staticmethod
    @outside_autocast
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        y = _rmsnorm_output(xf, weight, rstd, x.dtype)
        recorder = getattr(_recording, "outputs", None)
        if recorder is not None:
            recorder[y.untyped_storage().data_ptr()] = _NormOutput(y, x, weight, rstd)
        return y

    @staticmethod
    @outside_autocast
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gh = (grad * weight).float()
            grad_x = (rstd * (gh - xhat * (gh * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


def _rmsnorm_output(xf: Tensor, weight: Tensor, rstd: Tensor, dtype: torch.dtype) -> Tensor:
    """The norm's output from its float32 input: ``weight * (xf * rstd).to(dtype)``."""
    return weight * (xf * rstd).to(dtype)


_recording = threading.local()  # .outputs: {storage pointer: _NormOutput} while recompute_norm_outputs() is active


class _NormOutput:
    """An RMSNorm output by its recipe; rebuilt once per backward however many saved views of it are unpacked."""

    def __init__(self, y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> None:
        self.ref, self.x, self.weight, self.rstd = weakref.ref(y), x, weight, rstd
        self.rebuilt: Tensor | None = None

    def rebuild(self) -> Tensor:
        if self.rebuilt is None:
            self.rebuilt = _rmsnorm_output(self.x.float(), self.weight, self.rstd, self.x.dtype)
        return self.rebuilt


class _SavedView:
    """A saved tensor that is a view (shape, strides, offset) of a recorded RMSNorm output."""

    def __init__(self, out: _NormOutput, t: Tensor) -> None:
        self.out, self.size, self.stride, self.offset = out, t.size(), t.stride(), t.storage_offset()

    def unpack(self) -> Tensor:
        return self.out.rebuild().as_strided(self.size, self.stride, self.offset)


def _pack(t: Tensor) -> Any:
    outputs = getattr(_recording, "outputs", None)
    out = outputs.get(t.untyped_storage().data_ptr()) if outputs and t.device.type != "meta" else None
    y = out.ref() if out is not None else None
    # the same live storage (pointers are unique among live storages) and dtype: a view of the norm's output
    if y is None or y.dtype != t.dtype or y.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
        return t
    return _SavedView(out, t)


def _unpack(saved: Any) -> Tensor:
    return saved.unpack() if isinstance(saved, _SavedView) else saved


@contextlib.contextmanager
def recompute_norm_outputs() -> Iterator[None]:
    """Within this block, tensors that autograd saves and that are outputs (or views) of patched RMSNorms are kept as
    recipes and rebuilt in backward. The rebuilt values are bit-identical: the same elementwise ops on the same
    saved input, weight and reciprocal RMS. Nested blocks and other saved-tensor hooks inside (activation
    checkpointing) take precedence, as usual for saved_tensors_hooks."""
    previous = getattr(_recording, "outputs", None)
    _recording.outputs = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _recording.outputs = previous


def _swiglu_input_grads(g: Tensor, u: Tensor, sig: Tensor, silu: Tensor, dh: Tensor, need_g: bool,
                        need_u: bool) -> tuple[Tensor | None, Tensor | None]:
    """``du = dh silu(g)``, ``dg = dh u s (1 + g (1 - s))`` with ``s = sigmoid(g)``; ``dh`` is consumed."""
    grad_u = dh * silu if need_u else None
    grad_g = dh.mul_(u).mul_(sig).mul_(g.mul(sig.neg().add_(1)).add_(1)) if need_g else None
    return grad_g, grad_u


class _SwiGLUDown(torch.autograd.Function):
    """``down(silu(g) * u)``; keeps ``g`` and ``u`` and recomputes ``silu(g) * u`` in backward.

    With ``s = sigmoid(g)`` and ``dh = dy W``: ``du = dh g s``, ``dg = dh u s (1 + g (1 - s))``, ``dW = dy^T h``.
    """

    @staticmethod
    @outside_autocast
    def forward(ctx: Any, g: Tensor, u: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(g, u, weight)
        ctx.dtype = dtype
        h = torch.nn.functional.silu(g) * u
        return torch.nn.functional.linear(h.to(dtype), weight.to(dtype))

    @staticmethod
    @outside_autocast
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        g, u, weight = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        sig = torch.sigmoid(g)
        silu = g * sig
        grad_w = None
        if ctx.needs_input_grad[2]:
            h = (silu * u).to(ctx.dtype)
            grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(h.reshape(-1, h.shape[-1])).to(weight.dtype)
        dh = grad.matmul(weight.to(ctx.dtype)).to(g.dtype)
        return (*_swiglu_input_grads(g, u, sig, silu, dh, *ctx.needs_input_grad[:2]), grad_w, None)


class _SwiGLUDownLoRA(torch.autograd.Function):
    """``(h W^T, h A^T)`` with ``h = silu(g) * u``: a LoRA-wrapped down projection's base output and its adapter's
    first factor, keeping ``g`` and ``u`` (not ``h``, which the adapter's ``A`` would otherwise save).

    Backward: ``dh = dy W + dz A``, ``dW = dy^T h``, ``dA = dz^T h``, and ``dg``, ``du`` as in _SwiGLUDown.
    """

    @staticmethod
    @outside_autocast
    def forward(ctx: Any, g: Tensor, u: Tensor, weight: Tensor, lora_a: Tensor,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(g, u, weight, lora_a)
        ctx.dtype = dtype
        h = (torch.nn.functional.silu(g) * u).to(dtype)
        return torch.nn.functional.linear(h, weight.to(dtype)), torch.nn.functional.linear(h, lora_a.to(dtype))

    @staticmethod
    @outside_autocast
    def backward(ctx: Any, grad: Tensor, grad_low: Tensor) -> tuple[Tensor | None, ...]:
        g, u, weight, lora_a = ctx.saved_tensors
        grad, grad_low = grad.to(ctx.dtype), grad_low.to(ctx.dtype)
        sig = torch.sigmoid(g)
        silu = g * sig
        need_g, need_u, need_w, need_a = ctx.needs_input_grad[:4]
        grad_w = grad_a = None
        if need_w or need_a:
            h = (silu * u).to(ctx.dtype).reshape(-1, g.shape[-1])
            if need_w:
                grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(h).to(weight.dtype)
            if need_a:
                grad_a = grad_low.reshape(-1, grad_low.shape[-1]).t().mm(h).to(lora_a.dtype)
        dh = grad.matmul(weight.to(ctx.dtype)).add_(grad_low.matmul(lora_a.to(ctx.dtype))).to(g.dtype)
        return (*_swiglu_input_grads(g, u, sig, silu, dh, need_g, need_u), grad_w, grad_a, None)


def _plain_lora(m: Any) -> tuple[torch.nn.Module, torch.nn.Module, float] | None:
    """``(A, B, scaling)`` when ``m`` is a PEFT LoRA ``Linear`` that computes exactly ``base(x) + B(A(x)) * scaling``
    now: one active plain adapter (no DoRA or other variant), no dropout, not merged, not disabled, one dtype."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if type(m) is not LoraLinear or m.disable_adapters or m.merged or not _bias_free_linear(m.base_layer):
        return None
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1 or active[0] in getattr(m, "lora_variant", {}):
        return None
    lora_a, lora_b = m.lora_A[active[0]], m.lora_B[active[0]]
    if (not _bias_free_linear(lora_a) or type(m.lora_dropout[active[0]]) is not torch.nn.Identity
            or lora_a.weight.dtype != m.base_layer.weight.dtype):
        return None
    return lora_a, lora_b, m.scaling[active[0]]


def _rmsnorm_forward(self: Any, x: Tensor) -> Tensor:
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def _mlp_forward(self: Any, x: Tensor) -> Tensor:
    g, u = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    engine = next((e for m in down.modules() if (e := sharded_by(m)) is not None), None)
    if engine is not None:  # its weights are gathered only in its own forward (ZeRO-3): the stock computation
        if engine not in _TOLD:
            _TOLD.add(engine)
            logger.info("lean_activations: %s shards the MLP down projections, which then run their own forward "
                        "(the lean RMSNorms stay)", engine)
        return down(self.act_fn(g) * u)
    if _bias_free_linear(down):
        return _SwiGLUDown.apply(g, u, down.weight, matmul_dtype(g, down.weight))
    base_weight = down.base_layer.weight
    dtype = matmul_dtype(g, base_weight)
    lora = _plain_lora(down) if torch.is_grad_enabled() and g.dtype == dtype else None
    if lora is None:  # the stock computation (adapter disabled, dropout, no gradients, ...)
        return down(self.act_fn(g) * u)
    lora_a, lora_b, scaling = lora
    base, low = _SwiGLUDownLoRA.apply(g, u, base_weight, lora_a.weight, dtype)
    return base + lora_b(low) * scaling


def _bias_free_linear(m: Any) -> bool:
    return type(m) is torch.nn.Linear and m.bias is None


def _is_llama_mlp(m: torch.nn.Module) -> bool:
    # gate and up are called as modules (LoRA-wrapped is fine); down's weight is used directly, so it must be plain,
    # or a PEFT LoRA Linear over a plain one (whose state _mlp_forward checks at each call)
    down = getattr(m, "down_proj", None)
    return (type(m).__name__ in MLP_CLASSES and type(getattr(m, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and "forward" not in vars(m.act_fn)
            and (_bias_free_linear(down) or _bias_free_linear(getattr(down, "base_layer", None)))
            and all(isinstance(getattr(m, n, None), torch.nn.Module) for n in ("gate_proj", "up_proj")))


def _is_llama_rmsnorm(m: torch.nn.Module) -> bool:
    return (type(m).__name__ in RMSNORM_CLASSES and isinstance(getattr(m, "variance_epsilon", None), float)
            and isinstance(getattr(m, "weight", None), torch.nn.Parameter))


def apply(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Patch every known Llama-family MLP and RMSNorm in ``model``; returns the modules patched (``restore`` undoes
    it). A module that already has an instance ``forward`` (patched before, or by someone else) is left alone."""
    patched = []
    for m in model.modules():
        if "forward" in vars(m):
            continue
        if _is_llama_mlp(m):
            m.forward = types.MethodType(_mlp_forward, m)
        elif _is_llama_rmsnorm(m):
            m.forward = types.MethodType(_rmsnorm_forward, m)
        else:
            continue
        patched.append(m)
    return patched


def restore(modules: Iterable[torch.nn.Module]) -> None:
    """Undo ``apply`` on ``modules`` (what it returned, or ``model.modules()``): each gets its class's forward back."""
    for m in modules:
        fwd = vars(m).get("forward")
        if getattr(fwd, "__func__", None) in (_mlp_forward, _rmsnorm_forward):
            del m.forward
