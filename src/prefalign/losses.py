"""Preference losses as pure functions of log-prob tensors.

Each function takes per-pair log-probabilities (already reduced over completion tokens) and returns per-pair
losses ``[B]`` (with, for the preference losses, ``metrics``: TRL's metric names mapped to detached per-pair
tensors). The reduction is the trainer's, in one place: the mean over pairs. Nothing here touches a model, so every
equation can be checked by hand (see tests/test_losses.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "sft")  # "sft" is nll_loss, the others dpo_loss


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable everywhere.

    The naive ``log1p(-exp(x))`` returns ``-inf`` (then NaN gradients) as ``x -> 0``; ``log(-expm1(x))`` is exact
    there. Switching at ``-ln 2`` keeps both branches accurate (Mächler, "Accurately computing log(1 - exp(-|a|))",
    2012).
    """
    ln2 = math.log(2.0)
    # The clamp keeps the unused branch finite: torch.where back-propagates 0 * inf = NaN otherwise.
    return torch.where(x < -ln2, torch.log1p(-torch.exp(x.clamp(max=-ln2))), torch.log(-torch.expm1(x)))


def pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor,
                 rejected_logps: Tensor) -> dict[str, Tensor]:
    """TRL's per-pair reward metrics."""
    return {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


def nll_loss(logp_sums: Tensor, token_total: Tensor | float) -> Tensor:
    r"""Negative log-likelihood per token over the whole batch, as per-pair shares whose mean is that token mean.

    :math:`L = -\sum_i \log\pi_\theta(y_i|x_i) / N` over the batch's tokens, written per pair as
    :math:`\ell_i = -B \log\pi_\theta(y_i|x_i) / N`, so that :math:`\frac{1}{B}\sum_i \ell_i = L`. ``logp_sums``
    ``[B]`` are the summed log-probs of the covered tokens; ``token_total`` is :math:`N`, their count over the batch
    (under several processes, the global count divided by the number of processes, since the processes' gradients
    are averaged). ORPO's supervised term, and DPO's ``sft`` loss type: added to ``sigmoid`` (``loss_type=["sigmoid",
    "sft"]``) it is RPO (Pang et al. 2024, arXiv:2404.19733), which keeps DPO from lowering the chosen replies'
    likelihood.
    """
    total = torch.as_tensor(token_total, dtype=logp_sums.dtype, device=logp_sums.device).clamp(min=1)
    return -logp_sums * logp_sums.shape[0] / total


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Direct Preference Optimization and its pairwise variants: per-pair losses ``[B]`` and metrics.

    With summed completion log-probs and the implicit reward :math:`r(y) = \beta(\log\pi_\theta(y|x) -
    \log\pi_{ref}(y|x))`, let :math:`h = \log\frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)} -
    \log\frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}`.

    - ``sigmoid`` (Rafailov et al. 2023, arXiv:2305.18290, eq. 7), with conservative DPO label smoothing
      :math:`\varepsilon` (Mitchell 2023, "A note on DPO with noisy preferences"):
      :math:`L = -(1-\varepsilon)\log\sigma(\beta h) - \varepsilon\log\sigma(-\beta h)`.
    - ``ipo`` (Azar et al. 2023, arXiv:2310.12036, eq. 17), with log-ratios averaged per completion token as
      TRL does (the IPO authors' normalisation): :math:`L = (h_{avg} - \frac{1}{2\beta})^2`, where :math:`\beta` is
      the paper's :math:`\tau`. Needs ``chosen_lengths`` and ``rejected_lengths``.
    - ``hinge`` (SLiC, Zhao et al. 2023, arXiv:2305.10425): :math:`L = \max(0, 1 - \beta h)`.

    (The ``sft`` loss type of ``DPOConfig`` is :func:`nll_loss`.) Metrics use TRL's names; rewards are
    :math:`\beta` times the log-ratios.
    """
    if loss_type not in ("sigmoid", "ipo", "hinge"):
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of sigmoid, ipo, hinge (sft: nll_loss)")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the 'ipo' loss needs chosen_lengths and rejected_lengths (completion token counts)")
        h_avg = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (h_avg - 1.0 / (2.0 * beta)) ** 2
    metrics = pair_metrics(beta * chosen_logratios, beta * rejected_logratios, policy_chosen_logps,
                           policy_rejected_logps)
    return losses, metrics


def orpo_loss(
    chosen_mean_logps: Tensor,
    rejected_mean_logps: Tensor,
    nll: Tensor,
    *,
    alpha: float = 0.1,
    beta: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691, eqs. 4-7).

    With length-normalised log-likelihoods :math:`\ell_w, \ell_l` (mean log-prob per completion token) and
    :math:`\mathrm{odds}(y|x) = \frac{P(y|x)}{1 - P(y|x)}`,

    .. math::
        \log\mathrm{OR} = (\ell_w - \ell_l) - (\log(1-e^{\ell_w}) - \log(1-e^{\ell_l}))

        L = L_{NLL} + \alpha \cdot (-\log\sigma(\beta \log\mathrm{OR}))

    ``alpha`` is the paper's :math:`\lambda` (``orpo_alpha``, "strength of preference optimisation"; TRL's ``beta``),
    ``beta`` is a temperature on the log odds ratio (``orpo_beta``; 1.0 is the paper's loss). ``nll`` is the
    supervised term per pair (:func:`nll_loss` over the tokens its definition covers). ``log1mexp`` keeps
    :math:`\log(1-e^{\ell})` finite as :math:`\ell \to 0`. Computed in float32.

    Metrics follow TRL: rewards are ``alpha`` times the mean log-probs, ``log_odds_ratio`` is
    :math:`\log\sigma(\beta\log\mathrm{OR})` and ``log_odds_chosen`` is :math:`\log\mathrm{OR}`.
    """
    lw = chosen_mean_logps.float()
    ll = rejected_mean_logps.float()
    log_odds = (lw - ll) - (log1mexp(lw) - log1mexp(ll))
    ratio = F.logsigmoid(beta * log_odds)
    losses = nll.float() - alpha * ratio
    metrics = pair_metrics(alpha * lw, alpha * ll, lw, ll)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach()
    metrics["log_odds_chosen"] = log_odds.detach()
    return losses, metrics
