"""A Mixture-of-Experts model's router auxiliary (load-balancing) loss, as TRL 1.16 adds it to every trainer's loss.

TRL asks the model for ``outputs.aux_loss`` (``output_router_logits=True``): transformers' ``load_balancing_loss_func``
over every layer's router logits, with the forward's 2-D padding mask. prefalign's forward may see another layout
(prefix-shared packed rows with a 4-D mask, a chunked head that never computes full logits), so the router logits are
collected here by hooks on the router modules (the ones transformers' own ``router_logits`` recorder reads), in the
fast and the plain path alike, and the same loss is computed with a weight per token instead of a 0/1 mask.

The weights say how many of TRL's sequences hold a token: a shared prompt counts twice for a pair (TRL's DPO runs
prompt + chosen and prompt + rejected), so the number equals TRL's on TRL's layout, whatever prefalign's layout
(``logps.router_token_weights``). The loss is a product of two token means, so duplicating a token and weighting it
by two give the same value and gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError
from .models import unwrap


@dataclass(frozen=True)
class Router:
    """Where a model's router logits come from (modules of ``module_class``, output ``index``) and the loss's
    constants: ``num_experts`` and ``top_k`` (experts per token)."""

    module_class: type
    index: int
    num_experts: int
    top_k: int

    @contextlib.contextmanager
    def collect(self, model: Any) -> Iterator[list[Tensor]]:
        """Every router's logits ``[tokens, num_experts]`` of the forward passes run inside, in call order.

        The model's own aux loss is switched off meanwhile (``output_router_logits`` False): it would read a 4-D
        mask as a padding mask, and the number is computed here anyway."""
        inner = unwrap(model)
        text = inner.config.get_text_config()
        own = getattr(text, "output_router_logits", False)
        logits: list[Tensor] = []

        def hook(_module: Any, _args: Any, output: Any) -> None:
            logits.append(output[self.index] if isinstance(output, tuple) else output)

        handles = [m.register_forward_hook(hook) for m in inner.modules() if isinstance(m, self.module_class)]
        text.output_router_logits = False
        try:
            yield logits
        finally:
            text.output_router_logits = own
            for h in handles:
                h.remove()


def is_moe(model: Any) -> bool:
    """A Mixture-of-Experts model in TRL 1.16's sense: its (text) config has ``output_router_logits``."""
    config = getattr(unwrap(model), "config", None)
    return config is not None and hasattr(config.get_text_config(), "output_router_logits")


def router_coefficient(model: Any, coef: float | None) -> float:
    """TRL 1.16's ``router_aux_loss_coef``: None takes the model config's own (0.0 where it has none); a non-zero
    value on a model without router logits is refused."""
    moe = is_moe(model)
    if coef and not moe:
        raise ConfigError(f"router_aux_loss_coef={coef} but {type(unwrap(model)).__name__} is not a Mixture-of-Experts "
                          "model with router logits, so there is no auxiliary loss to weight (TRL 1.16 refuses it "
                          "too). Fix: remove router_aux_loss_coef")
    if coef is not None:
        return float(coef)
    return float(getattr(unwrap(model).config.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0) if moe else 0.0


def find_router(model: Any) -> Router:
    """The model's router modules, read from transformers' ``router_logits`` output recorder; refused (one line) for
    an architecture that declares none."""
    inner = unwrap(model)
    base = getattr(inner, "base_model", inner)  # PEFT: the wrapped transformers model
    text = inner.config.get_text_config()
    spec = None
    for m in (inner, base, getattr(base, "model", None)):
        spec = (getattr(type(m), "_can_record_outputs", None) or {}).get("router_logits") if m is not None else None
        if spec is not None:
            break
    module_class = getattr(spec, "target_class", None)
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    top_k = getattr(text, "num_experts_per_tok", None)
    if module_class is None or not experts or not top_k:
        raise ConfigError(f"{type(inner).__name__} declares router logits but prefalign cannot find its router modules "
                          "or expert counts to compute the load-balancing loss. Fix: set router_aux_loss_coef=0")
    return Router(module_class, int(getattr(spec, "index", 0) or 0), int(experts), int(top_k))


def load_balancing_loss(router_logits: list[Tensor], weights: Tensor, num_experts: int, top_k: int) -> Tensor:
    """Switch Transformer's load-balancing loss (Fedus et al. 2021, eqs. 4-6) as transformers computes it, with a
    weight per token: ``E * sum_e f_e P_e``, where over all layers' tokens ``f_e`` is the weighted share of top-k
    assignments to expert e and ``P_e`` the weighted mean router probability of e (both divided by the total
    weight, as transformers divides by the token count). ``weights`` ``[tokens]`` is in each layer's token order."""
    w = weights.reshape(-1).float()
    counts = torch.zeros(num_experts, dtype=torch.float32, device=w.device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=w.device)
    for layer in router_logits:
        p = torch.softmax(layer.to(w.device).float(), dim=-1)
        chosen = torch.topk(p, top_k, dim=-1).indices
        counts = counts.scatter_add(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        probs = probs + (p * w[:, None]).sum(0)
    total = w.sum() * len(router_logits)
    return (counts / total * probs / total).sum() * num_experts
