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

# "sft" is nll_loss; the others dpo_loss. Names and meanings as TRL 1.13's DPOConfig.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# loss types built on the chosen - rejected score difference: the only ones an f-divergence generalises (as TRL)
F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                                     "sft"})


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


def wpo_weights(chosen_logps: Tensor, rejected_logps: Tensor, chosen_log_sum_sq: Tensor, rejected_log_sum_sq: Tensor,
                chosen_tokens: Tensor, rejected_tokens: Tensor) -> Tensor:
    r"""WPO's per-pair loss weight (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
    arXiv:2406.11827, eq. 2 with its aligned normalisation), detached: off-policy pairs count less.

    :math:`w = \exp(\bar a_w + \bar a_l)`, where :math:`\bar a` is a reply's mean over its tokens of
    :math:`\log\pi_\theta(y_t|\cdot) - \log\sum_v \pi_\theta(v|\cdot)^2`: how likely the current policy is to
    sample the reply, relative to how peaked its token distributions are. Inputs ``[B]``: each reply's summed
    log-probs, summed :math:`\log\sum_v p_v^2`, and token count. TRL 1.13's definition (a token mean per reply).
    """
    chosen = (chosen_logps - chosen_log_sum_sq) / chosen_tokens.clamp(min=1)
    rejected = (rejected_logps - rejected_log_sum_sq) / rejected_tokens.clamp(min=1)
    return torch.exp(chosen + rejected).detach()


def f_divergence_scores(chosen_logratios: Tensor, rejected_logratios: Tensor, f_divergence_type: str = "reverse_kl",
                        alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    r"""The scores whose difference the DPO losses compare, under an f-divergence regulariser (f-DPO, Wang et al.
    2023, arXiv:2309.16240): :math:`f'(\pi_\theta / \pi_{ref})` of each reply, with :math:`u = \log\pi_\theta -
    \log\pi_{ref}`.

    - ``reverse_kl`` (standard DPO): :math:`u`; ``forward_kl``: :math:`1 - e^{-u}`; ``js_divergence``:
      :math:`\log 2 + \log\sigma(u)`; ``alpha_divergence``: :math:`(e^{(\alpha-1)u} - 1)/(\alpha-1)`, with the
      exponent clamped at 80 (TRL's float32 bound) and :math:`u` itself at :math:`\alpha = 1`.
    """
    if f_divergence_type == "reverse_kl":
        return chosen_logratios, rejected_logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(chosen_logratios), math.log(2) + F.logsigmoid(rejected_logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return chosen_logratios, rejected_logratios
        limit = {torch.float16: 11.0}.get(chosen_logratios.dtype, 80.0)

        def score(u: Tensor) -> Tensor:
            return (torch.exp(((alpha - 1.0) * u).float().clamp(max=limit)) - 1.0).to(u.dtype) / (alpha - 1.0)

        return score(chosen_logratios), score(rejected_logratios)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose one of {', '.join(F_DIVERGENCES)}")


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
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Direct Preference Optimization and its pairwise variants: per-pair losses ``[B]`` and metrics.

    With summed completion log-probs, log-ratios :math:`u_w = \log\frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)}`,
    :math:`u_l` likewise, scores :math:`s_w, s_l` (:func:`f_divergence_scores`; :math:`s = u` for standard DPO),
    :math:`h = s_w - s_l`, :math:`\varepsilon` = ``label_smoothing``, :math:`\beta` = ``beta``:

    - ``sigmoid`` (Rafailov et al. 2023, arXiv:2305.18290, eq. 7), with conservative DPO (cDPO, Mitchell 2023):
      :math:`-(1-\varepsilon)\log\sigma(\beta h) - \varepsilon\log\sigma(-\beta h)`. TRL 1.13's ``sigmoid``
      ignores :math:`\varepsilon`; prefalign keeps cDPO (the two agree at :math:`\varepsilon = 0`).
    - ``hinge`` (SLiC, Zhao et al. 2023, arXiv:2305.10425): :math:`\max(0, 1 - \beta h)`.
    - ``ipo`` (Azar et al. 2023, arXiv:2310.12036, eq. 17): :math:`(h_{avg} - \frac{1}{2\beta})^2` with scores averaged
      per completion token, as TRL (the IPO authors' normalisation); :math:`\beta` is the paper's :math:`\tau`.
    - ``sigmoid_norm``: ``sigmoid`` on the per-token averaged scores, :math:`-\log\sigma(\beta h_{avg})` (TRL).
    - ``exo_pair`` (EXO, Ji et al. 2024, arXiv:2402.00856, eq. 16): with :math:`q_w = \sigma(\beta h)`,
      :math:`q_w(\log q_w - \log(1-\varepsilon)) + (1-q_w)(\log(1-q_w) - \log\varepsilon)`; needs
      :math:`\varepsilon > 0` (the paper suggests 1e-3).
    - ``nca_pair`` (NCA, Chen et al. 2024, arXiv:2402.05369): with rewards :math:`r = \beta u`,
      :math:`-\log\sigma(r_w) - \frac12\log\sigma(-r_w) - \frac12\log\sigma(-r_l)`.
    - ``robust`` (rDPO, Chowdhury et al. 2024, arXiv:2403.00409): :math:`\frac{-(1-\varepsilon)\log\sigma(\beta h) +
      \varepsilon\log\sigma(-\beta h)}{1 - 2\varepsilon}`, unbiased under label flips with probability
      :math:`\varepsilon < 1/2`.
    - ``bco_pair`` (BCO, Jung et al. 2024, arXiv:2404.04656, paired, without TRL's BCO running mean):
      :math:`-\log\sigma(\beta u_w) - \log\sigma(-\beta u_l)`.
    - ``sppo_hard`` (SPPO, Wu et al. 2024, arXiv:2405.00675, hard labels): :math:`(u_w - \frac{1}{2\beta})^2 +
      (u_l + \frac{1}{2\beta})^2`.
    - ``aot`` / ``aot_unpaired`` (AOT, Melnyk et al. 2024, arXiv:2406.05882): the cDPO loss on
      :math:`\Delta = \mathrm{sort}(\log\pi_w - \log\pi_l) - \mathrm{sort}(\log\pi^{ref}_w - \log\pi^{ref}_l)`
      (paired) or :math:`\mathrm{sort}(u_w) - \mathrm{sort}(u_l)` (unpaired), sorted over the batch: the loss of the
      i-th pair reads the batch's i-th smallest values, so it is a batch-level loss written per position.
    - ``apo_zero`` / ``apo_down`` (APO, D'Oosterlinck et al. 2024, arXiv:2408.06266, eqs. 7-8):
      :math:`1 - \sigma(\beta u_w) + \sigma(\beta u_l)` (the chosen replies are better than the model's own) and
      :math:`\sigma(\beta u_w) + 1 - \sigma(\beta(u_w - u_l))` (they are worse).
    - ``discopop`` (DiscoPOP, Chris Lu et al. 2024, arXiv:2406.08414, eq. 5): with :math:`z = \beta h` and
      :math:`m = \sigma(z/\tau)`, :math:`(1 - m)(-\log\sigma(z)) + m\,e^{-z}`; :math:`\tau` = ``discopop_tau``.

    The ``sft`` loss type of ``DPOConfig`` is :func:`nll_loss`. Metrics use TRL's names; rewards are :math:`\beta u`
    (the log-ratios, whatever the f-divergence).
    """
    if loss_type not in DPO_LOSS_TYPES or loss_type == "sft":
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of "
                         f"{', '.join(t for t in DPO_LOSS_TYPES if t != 'sft')} (sft: nll_loss)")
    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"f_divergence_type={f_divergence_type!r} has no generalisation for loss_type {loss_type!r}")
    u_w = policy_chosen_logps - ref_chosen_logps
    u_l = policy_rejected_logps - ref_rejected_logps
    s_w, s_l = f_divergence_scores(u_w, u_l, f_divergence_type, f_alpha_divergence_coef)
    h = s_w - s_l
    eps = label_smoothing

    def per_token(scores: Tensor, lengths: Tensor | None) -> Tensor:
        if lengths is None:
            raise ValueError(f"the {loss_type!r} loss needs chosen_lengths and rejected_lengths (token counts)")
        return scores / lengths.clamp(min=1)

    def conservative(z: Tensor) -> Tensor:
        return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)

    if loss_type == "sigmoid":
        losses = conservative(beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    elif loss_type in ("ipo", "sigmoid_norm"):
        h_avg = per_token(s_w, chosen_lengths) - per_token(s_l, rejected_lengths)
        losses = (h_avg - 1.0 / (2.0 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * h_avg)
    elif loss_type == "exo_pair":
        if eps <= 0:
            raise ValueError("the 'exo_pair' loss needs label_smoothing > 0 (the EXO paper suggests 1e-3)")
        z = beta * h
        losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                  + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * u_w) - 0.5 * F.logsigmoid(-beta * u_w) - 0.5 * F.logsigmoid(-beta * u_l)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * u_w) - F.logsigmoid(-beta * u_l)
    elif loss_type == "sppo_hard":
        losses = (u_w - 0.5 / beta) ** 2 + (u_l + 0.5 / beta) ** 2
    elif loss_type == "aot":
        delta = (torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values
                 - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values)
        losses = conservative(beta * delta)
    elif loss_type == "aot_unpaired":
        losses = conservative(beta * (torch.sort(u_w, dim=0).values - torch.sort(u_l, dim=0).values))
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * u_w) + torch.sigmoid(beta * u_l)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * u_w) + 1 - torch.sigmoid(beta * (u_w - u_l))
    else:  # discopop
        z = beta * h
        mix = torch.sigmoid(z / discopop_tau)
        losses = -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
    metrics = pair_metrics(beta * u_w, beta * u_l, policy_chosen_logps, policy_rejected_logps)
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


CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Reference-free preference losses: CPO, SimPO, AlphaPO; per-pair losses ``[B]`` and metrics.

    ``chosen_logps`` / ``rejected_logps`` are the policy's summed reply log-probs (``sigmoid``, ``hinge``) or their
    per-token means (``ipo``, ``simpo``, ``alphapo``: the caller averages, as TRL). Rewards are
    :math:`r = \log\pi_\theta(y|x)`, or with ``alpha`` :math:`\ne 0` AlphaPO's :math:`r = (1 - \pi^{-\alpha})/\alpha`
    (Gupta et al. 2025, arXiv:2501.03884); :math:`z = r_w - r_l`, :math:`\varepsilon` = ``label_smoothing``.

    - ``sigmoid``: CPO (Xu et al. 2024, arXiv:2401.08417, eq. 3: DPO without a reference, as if it were uniform):
      :math:`-(1-\varepsilon)\log\sigma(\beta z) - \varepsilon\log\sigma(-\beta z)`.
    - ``hinge``: :math:`\max(0, 1 - \beta z)`; ``ipo``: :math:`(z - \frac{1}{2\beta})^2`.
    - ``simpo``: SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6), length-normalised rewards with a target margin
      :math:`\gamma` = ``simpo_gamma``: the ``sigmoid`` loss of :math:`z - \gamma/\beta`.
    - ``alphapo``: ``simpo`` with AlphaPO's rewards (needs ``alpha`` :math:`\ne 0`).

    The supervised term (CPO's behaviour cloning, weight ``cpo_alpha``) is :func:`nll_loss`, added by the trainer.
    Metrics use TRL's names: rewards are :math:`\beta r`.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; choose one of {', '.join(CPO_LOSS_TYPES)}")
    if loss_type == "alphapo" and alpha == 0.0:
        raise ValueError("loss_type 'alphapo' needs alpha != 0 (AlphaPO's reward shape)")
    if alpha != 0.0:
        r_w = (1 - torch.exp(chosen_logps).pow(-alpha)) / alpha
        r_l = (1 - torch.exp(rejected_logps).pow(-alpha)) / alpha
    else:
        r_w, r_l = chosen_logps, rejected_logps
    z = r_w - r_l
    if loss_type in ("simpo", "alphapo"):
        z = z - simpo_gamma / beta
    if loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
    return losses, pair_metrics(beta * r_w, beta * r_l, chosen_logps, rejected_logps)


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(logratios: Tensor, labels: Tensor, kl: Tensor | float, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             loss_type: str = "kto") -> Tensor:
    r"""Per-row KTO losses ``[B]`` of unpaired completions (Ethayarajh et al. 2024, "KTO: Model Alignment as
    Prospect Theoretic Optimization", Eq. 7).

    With :math:`r = \log \pi_\theta(y|x) - \log \pi_{ref}(y|x)` (``logratios``, summed over the completion's
    tokens) and the reference point :math:`z_0` (``kl``: the batch's mean log-ratio of mismatched prompt /
    completion pairs, clamped at 0 and detached; the trainer computes it):

    - desirable rows (``labels`` true): :math:`\lambda_D \, (1 - \sigma(\beta (r - z_0)))`
    - undesirable rows: :math:`\lambda_U \, (1 - \sigma(\beta (z_0 - r)))`

    ``loss_type="apo_zero_unpaired"`` (APO-zero, D'Oosterlinck et al. 2024, unpaired): no reference point,
    :math:`\lambda_D (1 - \sigma(\beta r))` and :math:`\lambda_U \, \sigma(\beta r)`. The trainer's mean over rows is
    TRL 1.13's mean over the concatenated desirable and undesirable losses.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; choose from {', '.join(KTO_LOSS_TYPES)}")
    desirable = labels.bool()
    if loss_type == "kto":
        chosen = 1 - torch.sigmoid(beta * (logratios - kl))
        rejected = 1 - torch.sigmoid(beta * (kl - logratios))
    else:
        chosen = 1 - torch.sigmoid(beta * logratios)
        rejected = torch.sigmoid(beta * logratios)
    return torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)
