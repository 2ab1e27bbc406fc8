"""prefalign.losses against numbers worked out by hand from the papers' equations, and against TRL 1.13's code."""

from __future__ import annotations

import math
import types
from collections import defaultdict
from functools import partial

import mpmath
import pytest
import torch
import torch.nn.functional as F

from prefalign import losses as L
from prefalign.losses import log1mexp, nll_loss


def dpo_loss(*args, **kwargs):
    """The library's per-pair DPO losses, reduced as the trainer reduces them (the mean over pairs)."""
    losses, metrics = L.dpo_loss(*args, **kwargs)
    assert losses.shape == args[0].shape  # one loss per pair
    return losses.mean(), metrics


def orpo_loss(*args, **kwargs):
    """The library's per-pair ORPO losses, reduced as the trainer reduces them (the mean over pairs)."""
    losses, metrics = L.orpo_loss(*args, **kwargs)
    return losses.mean(), metrics

METRIC_NAMES = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"}


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)), on python floats."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# The running example: policy log-probs chosen -5.0 / rejected -7.0, reference -6.0 / -6.5.
PC, PR, RC, RR = -5.0, -7.0, -6.0, -6.5
# h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) = ((-5) - (-6)) - ((-7) - (-6.5)) = 1 - (-0.5) = 1.5
H = 1.5


def _example(**kw):
    return dpo_loss(t64(PC), t64(PR), t64(RC), t64(RR), **kw)


# ---------------------------------------------------------------- DPO: sigmoid


def test_dpo_sigmoid_by_hand():
    assert (PC - RC) - (PR - RR) == H
    loss, _ = _example(beta=0.1)
    # -log sigmoid(beta * h) = -log sigmoid(0.15) = log(1 + e^-0.15) = log(1.860707976...) = 0.620957...
    expected = math.log(1.0 + math.exp(-0.1 * 1.5))
    assert expected == pytest.approx(0.6209570477895321, abs=1e-15)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_dpo_sigmoid_two_pairs_is_the_mean():
    # pair 2: chosen -3 / rejected -2 under the policy, -2.5 / -2.5 under the reference:
    # h2 = ((-3) - (-2.5)) - ((-2) - (-2.5)) = -0.5 - 0.5 = -1.0, so the policy prefers the wrong reply.
    loss, m = dpo_loss(t64(PC, -3.0), t64(PR, -2.0), t64(RC, -2.5), t64(RR, -2.5), beta=0.5)
    l1 = -log_sigmoid(0.5 * 1.5)  # log(1 + e^-0.75) = 0.3868710061148999
    l2 = -log_sigmoid(0.5 * -1.0)  # log(1 + e^0.5) = 0.9740769841801067
    assert l1 == pytest.approx(0.3868710061148999, abs=1e-12)
    assert l2 == pytest.approx(0.9740769841801067, abs=1e-12)
    assert loss.item() == pytest.approx((l1 + l2) / 2, abs=1e-12)
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]


def test_dpo_sigmoid_beta_scales_the_margin():
    for beta in (0.01, 0.1, 1.0, 5.0):
        loss, _ = _example(beta=beta)
        assert loss.item() == pytest.approx(-log_sigmoid(beta * H), abs=1e-12), beta


def test_dpo_metrics_by_hand():
    loss, m = _example(beta=0.1)
    assert set(m) == METRIC_NAMES
    # rewards are beta * (policy - reference) log-probs
    assert m["rewards/chosen"].tolist() == pytest.approx([0.1 * ((-5.0) - (-6.0))])  # 0.1
    assert m["rewards/rejected"].tolist() == pytest.approx([0.1 * ((-7.0) - (-6.5))])  # -0.05
    assert m["rewards/margins"].tolist() == pytest.approx([0.1 - (-0.05)])  # 0.15 = beta * h
    assert m["rewards/accuracies"].tolist() == [1.0]
    assert m["logps/chosen"].tolist() == [-5.0]
    assert m["logps/rejected"].tolist() == [-7.0]
    for name, v in m.items():
        assert v.shape == (1,), name
        assert not v.requires_grad, name


def test_dpo_metrics_are_detached_and_accuracy_is_strict():
    pc = t64(-1.0, -2.0).requires_grad_()
    pr = t64(-1.0, -3.0).requires_grad_()
    # pair 1: identical rewards (a tie is not a win, as in TRL); pair 2: chosen reward higher
    loss, m = dpo_loss(pc, pr, t64(-1.0, -3.0), t64(-1.0, -3.0), beta=0.2)
    assert m["rewards/accuracies"].tolist() == [0.0, 1.0]
    assert m["rewards/margins"].tolist() == pytest.approx([0.0, 0.2 * (1.0 - 0.0)])
    assert all(not v.requires_grad for v in m.values())
    assert loss.requires_grad


def test_dpo_accuracy_follows_rewards_not_logps():
    # chosen has the lower policy log-prob but the higher reward, so it counts as correct
    _, m = dpo_loss(t64(-10.0), t64(-2.0), t64(-12.0), t64(-1.0), beta=1.0)
    assert m["rewards/chosen"].item() == pytest.approx(2.0)
    assert m["rewards/rejected"].item() == pytest.approx(-1.0)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["rewards/margins"].item() == pytest.approx(3.0)


def test_dpo_sigmoid_gradient_by_hand():
    pc = t64(PC).requires_grad_()
    pr = t64(PR).requires_grad_()
    loss, _ = dpo_loss(pc, pr, t64(RC), t64(RR), beta=0.1)
    loss.backward()
    # d/dh [-log sigmoid(beta h)] = -beta * (1 - sigmoid(beta h)); dh/dpc = 1, dh/dpr = -1
    g = -0.1 * (1.0 - 1.0 / (1.0 + math.exp(-0.15)))
    assert pc.grad.item() == pytest.approx(g, abs=1e-12)
    assert pr.grad.item() == pytest.approx(-g, abs=1e-12)


# ---------------------------------------------------------------- DPO: conservative (label smoothing)


@pytest.mark.parametrize("eps", [0.1, 0.2, 0.5])
def test_dpo_label_smoothing_by_hand(eps):
    loss, _ = _example(beta=0.1, label_smoothing=eps)
    # L = -(1 - eps) log sigmoid(0.15) - eps log sigmoid(-0.15)
    expected = -(1 - eps) * log_sigmoid(0.15) - eps * log_sigmoid(-0.15)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    plain, _ = _example(beta=0.1)
    assert loss.item() > plain.item()  # with h > 0 the flipped-label term costs more than it saves


def test_dpo_label_smoothing_values():
    # log sigmoid(0.15) = -0.6209570477895321, log sigmoid(-0.15) = -0.7709570477895321 (they differ by exactly 0.15)
    assert log_sigmoid(-0.15) - log_sigmoid(0.15) == pytest.approx(-0.15, abs=1e-15)
    loss, _ = _example(beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.8 * 0.6209570477895321 + 0.2 * 0.7709570477895321, abs=1e-12)  # 0.650957


def test_dpo_label_smoothing_gradient_by_hand():
    eps, beta = 0.3, 0.1
    pc = t64(PC).requires_grad_()
    loss, _ = dpo_loss(pc, t64(PR), t64(RC), t64(RR), beta=beta, label_smoothing=eps)
    loss.backward()
    # dL/dz = sigmoid(z) - (1 - eps) with z = beta h; dz/dpc = beta
    s = 1.0 / (1.0 + math.exp(-beta * H))
    assert pc.grad.item() == pytest.approx(beta * (s - (1 - eps)), abs=1e-12)


# ---------------------------------------------------------------- DPO: hinge and IPO


def test_dpo_hinge_by_hand():
    loss, _ = _example(beta=0.1, loss_type="hinge")
    assert loss.item() == pytest.approx(max(0.0, 1.0 - 0.1 * 1.5), abs=1e-12)  # 0.85
    assert loss.item() == pytest.approx(0.85, abs=1e-12)
    loss, _ = _example(beta=1.0, loss_type="hinge")
    assert loss.item() == 0.0  # 1 - 1.5 < 0: margin met, no loss
    # mean over a satisfied and an unsatisfied pair: max(0, 1 - 1.5) = 0 and max(0, 1 - (-1.0)) = 2
    loss, _ = dpo_loss(t64(PC, -3.0), t64(PR, -2.0), t64(RC, -2.5), t64(RR, -2.5), beta=1.0, loss_type="hinge")
    assert loss.item() == pytest.approx((0.0 + 2.0) / 2, abs=1e-12)


def test_dpo_hinge_gradient_is_zero_past_the_margin():
    pc = t64(PC, -3.0).requires_grad_()
    loss, _ = dpo_loss(pc, t64(PR, -2.0), t64(RC, -2.5), t64(RR, -2.5), beta=1.0, loss_type="hinge")
    loss.backward()
    # pair 1 past the margin: 0; pair 2: d/dpc (1 - h) / 2 = -1/2
    assert pc.grad.tolist() == pytest.approx([0.0, -0.5])


def test_dpo_ipo_by_hand():
    # per-token averages: chosen log-ratio 1.0 over 4 tokens, rejected -0.5 over 2 tokens
    # h_avg = 1.0 / 4 - (-0.5) / 2 = 0.25 + 0.25 = 0.5; 1 / (2 beta) = 1 / 0.2 = 5; L = (0.5 - 5)^2 = 20.25
    loss, m = _example(beta=0.1, loss_type="ipo", chosen_lengths=t64(4), rejected_lengths=t64(2))
    assert loss.item() == pytest.approx(20.25, abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(0.15)  # metrics stay on summed log-ratios
    # beta = 1: (0.5 - 0.5)^2 = 0
    loss, _ = _example(beta=1.0, loss_type="ipo", chosen_lengths=t64(4), rejected_lengths=t64(2))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    # beta = 0.5, lengths 1 and 1: h_avg = 1.5, (1.5 - 1)^2 = 0.25
    loss, _ = _example(beta=0.5, loss_type="ipo", chosen_lengths=t64(1), rejected_lengths=t64(1))
    assert loss.item() == pytest.approx(0.25, abs=1e-12)


def test_dpo_ipo_zero_length_is_clamped_to_one():
    loss, _ = _example(beta=0.5, loss_type="ipo", chosen_lengths=t64(0), rejected_lengths=t64(0))
    assert loss.item() == pytest.approx((1.5 - 1.0) ** 2, abs=1e-12)


def test_dpo_ipo_needs_lengths_and_unknown_type_fails():
    with pytest.raises(ValueError, match="chosen_lengths"):
        _example(loss_type="ipo")
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'"):
        _example(loss_type="kto")


# ---------------------------------------------------------------- DPO vs TRL's DPOTrainer._compute_loss (1.13 or 1.16)


def _fake_forward(logits, labels=None, fused_lm_head=False, **kwargs):
    """The model call TRL's _compute_loss makes. TRL 1.13 reads ``logits``; TRL 1.16 calls
    ``model(..., labels=labels, fused_lm_head=True)`` and reads per-token fields of the next-token labels, zero
    where the label is -100 (trl.trainer.utils.FusedCausalLMOutput): both are given from the same logits."""
    out = types.SimpleNamespace(logits=logits)
    if fused_lm_head:
        target = labels[:, 1:]
        keep = target != -100
        logp = logits[:, :-1].log_softmax(-1)
        out.log_probs = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * keep
        out.entropy = -(logp.exp() * logp).sum(-1) * keep
        out.mean_logits = logits[:, :-1].mean(-1) * keep
        out.is_top1 = (logits[:, :-1].argmax(-1) == target) & keep
        out.label_mask = keep
        out.aux_loss = None
    return out


def _trl_dpo(loss_type, beta, logits, input_ids, completion_mask, ref_c, ref_r):
    """Run TRL's own DPOTrainer._compute_loss on given logits, with a stand-in `self` instead of a trainer."""
    from trl import DPOTrainer

    identity = lambda x: x  # noqa: E731
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=False), accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"eval": defaultdict(list), "train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(fake, partial(_fake_forward, logits), inputs, False)
    return loss, {k: v[0] for k, v in fake._metrics["eval"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_matches_trl_on_random_tensors(loss_type):
    gen = torch.Generator().manual_seed(1)
    b, seq, vocab = 4, 9, 13
    logits = torch.randn(2 * b, seq, vocab, generator=gen) * 3
    input_ids = torch.randint(0, vocab, (2 * b, seq), generator=gen)
    completion_mask = torch.zeros(2 * b, seq, dtype=torch.long)
    for i, start in enumerate([3, 5, 2, 4, 6, 3, 7, 1]):  # different prompt and completion lengths per row
        completion_mask[i, start: seq - (i % 3)] = 1
    ref_c = torch.randn(b, generator=gen) * 5 - 20
    ref_r = torch.randn(b, generator=gen) * 5 - 20
    beta = 0.3
    trl_loss, trl_m = _trl_dpo(loss_type, beta, logits, input_ids, completion_mask, ref_c, ref_r)

    # our side: summed completion log-probs by hand, then the pure loss function
    per_tok = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    logps = (per_tok * completion_mask[:, 1:]).sum(1)
    lengths = completion_mask[:, 1:].sum(1).double()
    # TRL counts IPO lengths on the unshifted mask; the first completion token is always predicted, so they agree
    assert torch.equal(lengths, completion_mask.sum(1).double())
    loss, m = dpo_loss(logps[:b], logps[b:], ref_c, ref_r, beta=beta, loss_type=loss_type,
                       chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert loss.item() > 0
    for name in METRIC_NAMES:
        assert m[name].mean().item() == pytest.approx(trl_m[name], rel=1e-5, abs=1e-6), name


# ---------------------------------------------------------------- ORPO


def log1mexp_f(x: float) -> float:
    return math.log(-math.expm1(x))


def test_orpo_by_hand():
    lw, ll, nll = -0.5, -1.5, 2.0
    # odds(y) = P / (1 - P): log odds_w = -0.5 - log(1 - e^-0.5) = -0.5 - (-0.9327521) = 0.4327521
    #                        log odds_l = -1.5 - log(1 - e^-1.5) = -1.5 - (-0.2524825) = -1.2475175
    log_odds_w = lw - math.log(1 - math.exp(lw))
    log_odds_l = ll - math.log(1 - math.exp(ll))
    assert log_odds_w == pytest.approx(0.4327521, abs=1e-6)
    assert log_odds_l == pytest.approx(-1.2475175, abs=1e-6)
    log_or = log_odds_w - log_odds_l  # 1.6802697
    loss, m = orpo_loss(torch.tensor([lw]), torch.tensor([ll]), torch.tensor(nll), alpha=0.1)
    # L = nll - alpha * log sigmoid(log OR) = 2.0 + 0.1 * 0.1708592
    expected = nll - 0.1 * log_sigmoid(log_or)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(2.0170859, abs=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(log_or, abs=1e-6)
    assert m["log_odds_ratio"].item() == pytest.approx(log_sigmoid(log_or), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * lw)
    assert m["rewards/rejected"].item() == pytest.approx(0.1 * ll)
    assert m["rewards/margins"].item() == pytest.approx(0.1 * (lw - ll))
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == lw
    assert m["logps/rejected"].item() == ll
    assert m["nll_loss"].item() == nll
    assert set(m) == METRIC_NAMES | {"nll_loss", "log_odds_ratio", "log_odds_chosen"}
    assert all(not v.requires_grad for v in m.values())


def test_orpo_two_pairs_mean_and_wrong_order():
    lw, ll = [-0.5, -2.0], [-1.5, -0.25]  # pair 2 prefers the rejected reply
    ratios = []
    for w, lo in zip(lw, ll, strict=True):
        ratios.append(log_sigmoid((w - math.log(1 - math.exp(w))) - (lo - math.log(1 - math.exp(lo)))))
    loss, m = orpo_loss(torch.tensor(lw), torch.tensor(ll), torch.tensor(1.0), alpha=0.25)
    assert loss.item() == pytest.approx(1.0 - 0.25 * sum(ratios) / 2, abs=1e-6)
    assert m["log_odds_ratio"].tolist() == pytest.approx(ratios, abs=1e-6)
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["log_odds_chosen"][1].item() < 0


def test_orpo_alpha_scales_the_preference_term():
    lw, ll, nll = torch.tensor([-0.7, -1.1]), torch.tensor([-1.9, -0.9]), torch.tensor(1.25)
    l0, _ = orpo_loss(lw, ll, nll, alpha=0.0)
    assert l0.item() == 1.25  # alpha = 0 is plain SFT
    l1, m1 = orpo_loss(lw, ll, nll, alpha=0.1)
    l3, m3 = orpo_loss(lw, ll, nll, alpha=0.3)
    assert (l3 - nll).item() == pytest.approx(3 * (l1 - nll).item(), rel=1e-5)
    assert (l1 - nll).item() > 0
    assert m3["rewards/chosen"].tolist() == pytest.approx((0.3 * lw).tolist())
    assert torch.equal(m1["log_odds_ratio"], m3["log_odds_ratio"])  # the ratio itself does not depend on alpha


def test_orpo_beta_is_a_temperature_on_the_log_odds_ratio():
    lw, ll = -0.5, -1.5
    log_or = (lw - math.log(1 - math.exp(lw))) - (ll - math.log(1 - math.exp(ll)))
    for beta in (0.5, 1.0, 2.0):
        loss, m = orpo_loss(torch.tensor([lw]), torch.tensor([ll]), torch.tensor(0.0), alpha=1.0, beta=beta)
        assert m["log_odds_chosen"].item() == pytest.approx(log_or, abs=1e-6)  # unchanged by beta
        assert m["log_odds_ratio"].item() == pytest.approx(log_sigmoid(beta * log_or), abs=1e-6)
        assert loss.item() == pytest.approx(-log_sigmoid(beta * log_or), abs=1e-6)
    hot, _ = orpo_loss(torch.tensor([lw]), torch.tensor([ll]), torch.tensor(0.0), alpha=1.0, beta=2.0)
    cold, _ = orpo_loss(torch.tensor([lw]), torch.tensor([ll]), torch.tensor(0.0), alpha=1.0, beta=0.5)
    assert hot.item() < cold.item()


def test_orpo_gradient_by_hand():
    lw = torch.tensor([-0.5], requires_grad=True)
    ll = torch.tensor([-1.5], requires_grad=True)
    nll = torch.tensor(2.0, requires_grad=True)
    loss, _ = orpo_loss(lw, ll, nll, alpha=0.1)
    loss.backward()
    # d log OR / d lw = 1 + e^lw / (1 - e^lw) = 1 / (1 - e^lw); dL/d log OR = -alpha (1 - sigmoid(log OR))
    log_or = (-0.5 - math.log(1 - math.exp(-0.5))) - (-1.5 - math.log(1 - math.exp(-1.5)))
    dl = -0.1 * (1 - 1 / (1 + math.exp(-log_or)))
    assert lw.grad.item() == pytest.approx(dl / (1 - math.exp(-0.5)), rel=1e-5)
    assert ll.grad.item() == pytest.approx(-dl / (1 - math.exp(-1.5)), rel=1e-5)
    assert nll.grad.item() == 1.0


def test_orpo_runs_in_float32():
    loss, m = orpo_loss(torch.tensor([-0.5], dtype=torch.bfloat16), torch.tensor([-1.5], dtype=torch.bfloat16),
                        torch.tensor(2.0), alpha=0.1)
    assert m["log_odds_chosen"].dtype == torch.float32
    assert loss.item() == pytest.approx(2.0170859, abs=1e-6)  # -0.5 and -1.5 are exact in bfloat16


NEAR_ZERO = [-1e-9, -1e-12, -torch.finfo(torch.float32).tiny]  # the last is 0.0 minus the smallest normal float32


def _naive_log_odds(lw: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
    return (lw - ll) - (torch.log1p(-torch.exp(lw)) - torch.log1p(-torch.exp(ll)))


def test_orpo_near_zero_logps_values_are_finite_and_right():
    lw = torch.tensor(NEAR_ZERO + [-1e-12])
    ll = torch.tensor([-2.0, -0.5, -1.0, -1e-9])
    naive = _naive_log_odds(lw, ll)
    assert not torch.isfinite(naive).any()  # exp(x) rounds to 1 in float32: log1p(-1) = -inf, and -inf - -inf = nan
    assert torch.isnan(naive[3])
    loss, m = orpo_loss(lw, ll, torch.tensor(0.5), alpha=0.1)
    assert math.isfinite(loss.item())
    for i in range(4):
        w, lo = float(lw[i]), float(ll[i])  # the float32 values, exactly
        expected = (w - lo) - (log1mexp_f(w) - log1mexp_f(lo))
        assert m["log_odds_chosen"][i].item() == pytest.approx(expected, rel=1e-5), i
    # log(1 - e^-1e-9) ~ log(1e-9) = -20.7233, so odds_w ~ 1e9: a huge, finite log odds ratio
    assert m["log_odds_chosen"][0].item() == pytest.approx(2.0 + 20.7232658 + math.log(1 - math.exp(-2.0)), rel=1e-5)
    # both near zero: -1e-12 vs -1e-9 still tell apart: log OR ~ -(log 1e-12 - log 1e-9) = log 1000
    assert m["log_odds_chosen"][3].item() == pytest.approx(math.log(1000.0), rel=1e-4)


def test_orpo_near_zero_logps_gradient_is_finite():
    lw = torch.tensor(NEAR_ZERO, requires_grad=True)
    ll = torch.tensor([-2.0, -0.5, -1e-9], requires_grad=True)
    naive_w = lw.detach().clone().requires_grad_()
    _naive_log_odds(naive_w, ll.detach()).sum().backward()
    assert not torch.isfinite(naive_w.grad).all()  # the naive formula has no usable gradient here
    loss, _ = orpo_loss(lw, ll, torch.tensor(0.5), alpha=0.1)
    loss.backward()
    assert torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()


def test_log1mexp_gradient_is_finite_near_zero():
    x = torch.tensor([-1e-9, -1e-12, -1e-30], requires_grad=True)
    log1mexp(x).sum().backward()
    # d/dx log(1 - e^x) = -e^x / (1 - e^x) ~ 1/x
    expected = [-math.exp(v) / -math.expm1(v) for v in x.tolist()]
    assert x.grad.tolist() == pytest.approx(expected, rel=1e-4)


def test_log1mexp_gradient_away_from_zero():
    x = torch.tensor([-50.0, -3.0, -0.7, -0.6, -1e-3], dtype=torch.float64, requires_grad=True)
    log1mexp(x).sum().backward()
    assert x.grad.tolist() == pytest.approx([-math.exp(v) / -math.expm1(v) for v in x.tolist()], rel=1e-9)


def test_log1mexp_matches_math_float64():
    xs = -torch.logspace(-6, math.log10(50.0), 400, dtype=torch.float64)
    xs = torch.cat([xs, torch.tensor([-math.log(2.0), -math.log(2.0) + 1e-12, -math.log(2.0) - 1e-12],
                                     dtype=torch.float64)])
    ours = log1mexp(xs)
    assert ours.dtype == torch.float64
    mpmath.mp.dps = 40
    for x, y in zip(xs.tolist(), ours.tolist(), strict=True):
        # the plain formula, on python floats; it loses digits near 0 (1 - e^x cancels), hence the absolute bound
        assert y == pytest.approx(math.log(1 - math.exp(x)), abs=1e-9), x
        # and a 40-digit reference, to float64 precision everywhere (including y ~ -1.9e-22 at x = -50)
        assert y == pytest.approx(float(mpmath.log(1 - mpmath.exp(mpmath.mpf(x)))), rel=1e-14), x
    assert ours[0].item() == pytest.approx(math.log(1e-6) - 5e-7, rel=1e-12)  # log(1 - e^-1e-6) ~ log(1e-6) - 1e-6/2


def test_log1mexp_matches_trl():
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    xs = -torch.logspace(-8, 2, 300)
    assert torch.allclose(log1mexp(xs), trl_log1mexp(xs), rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_orpo_matches_trl_odds_ratio_loss(alpha):
    from trl.experimental.orpo import ORPOTrainer as TrlORPOTrainer

    gen = torch.Generator().manual_seed(3)
    lw = -torch.rand(16, generator=gen) * 3 - 1e-3
    ll = -torch.rand(16, generator=gen) * 3 - 1e-3
    nll = torch.tensor(1.7)
    fake = types.SimpleNamespace(beta=alpha, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, c_rew, r_rew, mean_ratio, mean_log_odds = TrlORPOTrainer.odds_ratio_loss(fake, lw, ll)
    trl_loss = nll - losses.mean()  # as in TRL's get_batch_loss_metrics
    loss, m = orpo_loss(lw, ll, nll, alpha=alpha, beta=1.0)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    assert torch.allclose(m["rewards/chosen"], c_rew) and torch.allclose(m["rewards/rejected"], r_rew)
    assert m["log_odds_ratio"].mean().item() == pytest.approx(mean_ratio.item(), rel=1e-6)
    assert m["log_odds_chosen"].mean().item() == pytest.approx(mean_log_odds.item(), rel=1e-6)
    assert m["rewards/accuracies"].mean().item() == pytest.approx((c_rew > r_rew).float().mean().item())
    # and the summed F.logsigmoid form in the docstring
    log_or = (lw - ll) - (torch.log(-torch.expm1(lw)) - torch.log(-torch.expm1(ll)))
    assert loss.item() == pytest.approx((nll - alpha * F.logsigmoid(log_or).mean()).item(), rel=1e-6)


def test_dpo_losses_are_per_pair():
    losses, _ = L.dpo_loss(t64(-1.0, -3.0), t64(-2.0, -2.0), t64(-1.5, -2.5), t64(-2.0, -2.0), beta=1.0)
    # h = 0.5 and -0.5: -log sigmoid(h) per pair
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.5), -log_sigmoid(-0.5)], abs=1e-12)


def test_nll_loss_is_a_token_mean_over_the_batch_written_per_pair():
    sums, counts = t64(-6.0, -2.0), torch.tensor([3, 1])
    per_pair = nll_loss(sums, counts.sum())
    # mean over pairs = -(6 + 2) / (3 + 1) = 2.0: a token mean, not the mean of per-pair means (1.5)
    assert per_pair.tolist() == pytest.approx([2 * 6.0 / 4, 2 * 2.0 / 4], abs=1e-12)
    assert per_pair.mean().item() == pytest.approx(2.0, abs=1e-12)
    # two processes with half the batch each: the global count over the world size gives the same average loss
    half = [nll_loss(sums[i:i + 1], counts.sum() / 2).mean() for i in range(2)]
    assert ((half[0] + half[1]) / 2).item() == pytest.approx(2.0, abs=1e-12)
    assert nll_loss(t64(0.0), 0).item() == 0.0  # no tokens: no NaN


# ---------------------------------------------------------------- the other loss types, by hand on the running example
# u_w = log pi(y_w) - log ref(y_w) = 1.0, u_l = -0.5, h = 1.5; beta = 0.5


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


UW, UL, B = 1.0, -0.5, 0.5
HAND = {
    "nca_pair": -log_sigmoid(B * UW) - 0.5 * log_sigmoid(-B * UW) - 0.5 * log_sigmoid(-B * UL),
    "bco_pair": -log_sigmoid(B * UW) - log_sigmoid(-B * UL),
    "sppo_hard": (UW - 1 / (2 * B)) ** 2 + (UL + 1 / (2 * B)) ** 2,  # (1 - 1)^2 + (-0.5 + 1)^2 = 0.25
    "apo_zero": 1 - _sig(B * UW) + _sig(B * UL),
    "apo_down": _sig(B * UW) + 1 - _sig(B * (UW - UL)),
    "robust": (-(0.9) * log_sigmoid(B * H) + 0.1 * log_sigmoid(-B * H)) / 0.8,  # label_smoothing 0.1
    "exo_pair": (_sig(B * H) * (log_sigmoid(B * H) - math.log(1 - 0.1))
                 + _sig(-B * H) * (log_sigmoid(-B * H) - math.log(0.1))),
    "discopop": (-log_sigmoid(B * H) * (1 - _sig(B * H / 0.05)) + math.exp(-B * H) * _sig(B * H / 0.05)),
}


@pytest.mark.parametrize("loss_type", list(HAND))
def test_more_dpo_loss_types_against_hand_values(loss_type):
    smoothing = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
    loss, m = dpo_loss(t64(PC), t64(PR), t64(RC), t64(RR), beta=B, loss_type=loss_type, label_smoothing=smoothing)
    assert loss.item() == pytest.approx(HAND[loss_type], abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(B * H)  # rewards stay beta * log-ratio


def test_sppo_hard_value_and_sigmoid_norm_per_token():
    loss, _ = dpo_loss(t64(PC), t64(PR), t64(RC), t64(RR), beta=B, loss_type="sppo_hard")
    assert loss.item() == pytest.approx(0.25, abs=1e-12)
    # sigmoid_norm: scores per completion token, u_w / 2 - u_l / 5 = 0.5 + 0.1 = 0.6
    loss, _ = dpo_loss(t64(PC), t64(PR), t64(RC), t64(RR), beta=B, loss_type="sigmoid_norm",
                       chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([5]))
    assert loss.item() == pytest.approx(-log_sigmoid(B * 0.6), abs=1e-12)


def test_aot_sorts_over_the_batch():
    """AOT compares the batch's sorted policy margins with the sorted reference margins, position by position."""
    pc, pr, rc, rr = t64(-1.0, -4.0), t64(-3.0, -2.0), t64(-2.0, -2.0), t64(-2.0, -3.0)
    losses, _ = L.dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="aot")
    # policy margins [2, -2] sorted [-2, 2]; reference margins [0, 1] sorted [0, 1]: deltas [-2, 1]
    assert losses.tolist() == pytest.approx([-log_sigmoid(-2.0), -log_sigmoid(1.0)], abs=1e-12)
    losses, _ = L.dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="aot_unpaired")
    # u_w = [1, -2] sorted [-2, 1]; u_l = [-1, 1] sorted [-1, 1]: deltas [-1, 0]
    assert losses.tolist() == pytest.approx([-log_sigmoid(-1.0), -log_sigmoid(0.0)], abs=1e-12)


@pytest.mark.parametrize(("kind", "expected"), [
    ("reverse_kl", (UW, UL)), ("forward_kl", (1 - math.exp(-UW), 1 - math.exp(-UL))),
    ("js_divergence", (math.log(2) + log_sigmoid(UW), math.log(2) + log_sigmoid(UL))),
    ("alpha_divergence", ((math.exp(-0.5 * UW) - 1) / -0.5, (math.exp(-0.5 * UL) - 1) / -0.5))])
def test_f_divergence_scores(kind, expected):
    sw, sl = L.f_divergence_scores(t64(UW), t64(UL), kind, 0.5)
    # alpha_divergence exponentiates in float32, as TRL (clamped for a representable result)
    assert (sw.item(), sl.item()) == pytest.approx(expected, abs=1e-6 if kind == "alpha_divergence" else 1e-12)


def test_f_divergence_is_refused_where_it_has_no_meaning(tmp_path):
    from prefalign import DPOConfig
    from prefalign.errors import ConfigError

    with pytest.raises(ValueError, match="no generalisation"):
        L.dpo_loss(t64(PC), t64(PR), t64(RC), t64(RR), loss_type="nca_pair", f_divergence_type="forward_kl")
    with pytest.raises(ConfigError, match="f_divergence_type='js_divergence' is out of range: has no generalisation"):
        DPOConfig(output_dir=str(tmp_path), loss_type="bco_pair", f_divergence_type="js_divergence")
    with pytest.raises(ConfigError, match="must be > 0 for loss_type 'exo_pair'"):
        DPOConfig(output_dir=str(tmp_path), loss_type="exo_pair")


# ---------------------------------------------------------------- CPO / SimPO / AlphaPO, by hand


def test_cpo_simpo_and_alphapo_against_hand_values():
    cw, cl = t64(-2.0), t64(-3.0)  # (mean) log-probs of the chosen and rejected replies
    loss, m = L.cpo_loss(cw, cl, beta=0.5)
    assert loss.item() == pytest.approx(-log_sigmoid(0.5 * 1.0), abs=1e-12)  # CPO: DPO without a reference
    assert m["rewards/chosen"].item() == pytest.approx(-1.0) and m["rewards/margins"].item() == pytest.approx(0.5)
    loss, _ = L.cpo_loss(cw, cl, beta=2.0, loss_type="simpo", simpo_gamma=1.0)
    assert loss.item() == pytest.approx(-log_sigmoid(2.0 * (1.0 - 0.5)), abs=1e-12)  # margin gamma / beta = 0.5
    loss, _ = L.cpo_loss(cw, cl, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx((1.0 - 1.0) ** 2, abs=1e-12)
    loss, _ = L.cpo_loss(cw, cl, beta=0.5, loss_type="hinge")
    assert loss.item() == pytest.approx(0.5, abs=1e-12)
    # AlphaPO rewards r = (1 - p^-alpha) / alpha with p = e^logp
    a = 0.25
    rw, rl = (1 - math.exp(-2.0) ** -a) / a, (1 - math.exp(-3.0) ** -a) / a
    loss, m = L.cpo_loss(cw, cl, beta=2.0, loss_type="alphapo", simpo_gamma=1.0, alpha=a)
    assert loss.item() == pytest.approx(-log_sigmoid(2.0 * (rw - rl - 0.5)), abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(2.0 * rw)
    with pytest.raises(ValueError, match="needs alpha != 0"):
        L.cpo_loss(cw, cl, loss_type="alphapo")


def test_wpo_weights_by_hand():
    """w = exp(mean_t(log p - log sum p^2) of the chosen + the same of the rejected), detached."""
    chosen, rejected = torch.tensor([-2.0, -6.0], requires_grad=True), torch.tensor([-3.0, -1.0])
    sq_c, sq_r = torch.tensor([-1.0, -3.0]), torch.tensor([-0.5, -0.5])
    n_c, n_r = torch.tensor([2, 3]), torch.tensor([1, 0])  # a zero count is clamped to 1
    w = L.wpo_weights(chosen, rejected, sq_c, sq_r, n_c, n_r)
    expected = [math.exp((-2 + 1) / 2 + (-3 + 0.5) / 1), math.exp((-6 + 3) / 3 + (-1 + 0.5) / 1)]
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert not w.requires_grad
