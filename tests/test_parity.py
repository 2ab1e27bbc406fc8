"""evaluate() of prefalign's trainers against TRL 1.13's on the same tiny model, reference and eval set."""

from __future__ import annotations

import datasets
import pytest
import trl
from trl.experimental.orpo import ORPOConfig as TrlORPOConfig
from trl.experimental.orpo import ORPOTrainer as TrlORPOTrainer

from prefalign import DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer
from tiny import conversational_rows, row_reply_mask, smollm2_tokenizer, text_rows, tiny_llama, token_logps

TOL = 1e-4
COMMON = dict(per_device_eval_batch_size=3, report_to=[], use_cpu=True, bf16=False, max_length=256, seed=0)


def _multi_turn_rows() -> list[dict]:
    rows = []
    for i in range(5):
        rows.append({
            "prompt": [{"role": "system", "content": "Answer briefly."},
                       {"role": "user", "content": f"Count to {i + 2}."},
                       {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 3))},
                       {"role": "user", "content": "Now backwards?"}],
            "chosen": [{"role": "assistant", "content": " ".join(str(k) for k in range(i + 2, 0, -1))}],
            "rejected": [{"role": "assistant", "content": "No."}],
        })
    return rows


def _implicit_rows() -> list[dict]:
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in conversational_rows(7)]


def _shared_metrics(ours: dict, theirs: dict, names: list[str]) -> None:
    for name in names:
        key = f"eval_{name}"
        assert key in ours, f"prefalign did not report {key}"
        assert ours[key] == pytest.approx(theirs[key], abs=TOL), key


DPO_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected"]


def _dpo_both(tok, ds, cfg: dict) -> tuple[dict, dict]:
    """evaluate() of prefalign's and TRL's DPOTrainer: policy and reference differ (seeds 1 and 2), so rewards and
    margins are not trivially zero."""
    ours = DPOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2), args=DPOConfig(**cfg), train_dataset=ds,
                      eval_dataset=ds, processing_class=tok).evaluate()
    theirs = trl.DPOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2),
                            args=trl.DPOConfig(**cfg, gradient_checkpointing=False), train_dataset=ds,
                            eval_dataset=ds, processing_class=tok).evaluate()
    return ours, theirs


# every loss type TRL 1.13 has, and its options; (loss types, extra options)
LOSS_CASES = {
    "exo_pair": (["exo_pair"], {"label_smoothing": 1e-3}), "nca_pair": (["nca_pair"], {}),
    "robust": (["robust"], {"label_smoothing": 0.1}), "bco_pair": (["bco_pair"], {}),
    "sppo_hard": (["sppo_hard"], {}), "aot": (["aot"], {"label_smoothing": 0.1}),
    "aot_unpaired": (["aot_unpaired"], {}), "apo_zero": (["apo_zero"], {}), "apo_down": (["apo_down"], {}),
    "discopop": (["discopop"], {"discopop_tau": 0.2}), "sigmoid_norm": (["sigmoid_norm"], {}),
    "sft": (["sft"], {}), "forward_kl": (["sigmoid"], {"f_divergence_type": "forward_kl"}),
    "js_divergence": (["hinge"], {"f_divergence_type": "js_divergence"}),
    "alpha_divergence": (["ipo", "sft"], {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    "ld_alpha": (["sigmoid"], {"ld_alpha": 0.4}),
    "wpo": (["sigmoid"], {"use_weighting": True}),
    # not with "sft": TRL 1.13 fails there (an in-place multiply of an expanded tensor)
    "wpo_mixed": (["ipo", "hinge"], {"use_weighting": True, "loss_weights": [1.0, 0.5]}),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_every_dpo_loss_type_and_option_matches_trl(tmp_path, case):
    """evaluate() against TRL 1.13 for every loss type and option, prefalign's speed features on (precomputed
    reference, prefix sharing, packing, fused head)."""
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(_multi_turn_rows())
    types, extra = LOSS_CASES[case]
    cfg = dict(COMMON, output_dir=str(tmp_path), beta=0.5, loss_type=types, **extra)
    ours, theirs = _dpo_both(tok, ds, cfg)
    _shared_metrics(ours, theirs, DPO_METRICS)
    assert abs(ours["eval_loss"]) > 1e-4


@pytest.mark.parametrize("rows_fn", [conversational_rows, _multi_turn_rows, _implicit_rows], ids=lambda f: f.__name__)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "sigmoid+sft"])
def test_dpo_evaluate_matches_trl(tmp_path, rows_fn, loss_type):
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(rows_fn())
    types = loss_type.split("+")
    cfg = dict(COMMON, output_dir=str(tmp_path), beta=0.5, loss_type=types,
               loss_weights=[1.0, 0.7] if len(types) == 2 else None)
    ours, theirs = _dpo_both(tok, ds, cfg)
    _shared_metrics(ours, theirs, DPO_METRICS)
    assert abs(ours["eval_rewards/margins"]) > 1e-3  # the comparison is not between zeros


def test_dpo_text_rows_match_trl_without_chat_template(tmp_path):
    """Plain-text rows match TRL when told to skip the chat template (TRL never applies it to text)."""
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(text_rows(6))
    cfg = dict(COMMON, output_dir=str(tmp_path))
    ours = DPOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2),
                      args=DPOConfig(**cfg, chat_template_for_text=False), train_dataset=ds, eval_dataset=ds,
                      processing_class=tok).evaluate()
    theirs = trl.DPOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2),
                            args=trl.DPOConfig(**cfg, gradient_checkpointing=False), train_dataset=ds,
                            eval_dataset=ds, processing_class=tok).evaluate()
    _shared_metrics(ours, theirs, DPO_METRICS)


ORPO_METRICS = DPO_METRICS + ["nll_loss", "log_odds_ratio", "log_odds_chosen"]


@pytest.mark.parametrize("rows_fn", [conversational_rows, _multi_turn_rows], ids=lambda f: f.__name__)
def test_orpo_evaluate_matches_trl_in_compat_mode(tmp_path, rows_fn):
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(rows_fn())
    cfg = dict(COMMON, output_dir=str(tmp_path))
    ours = ORPOTrainer(tiny_llama(tok, 1), args=ORPOConfig(**cfg, beta=0.25, trl_compat=True), train_dataset=ds,
                       eval_dataset=ds, processing_class=tok).evaluate()
    theirs = TrlORPOTrainer(tiny_llama(tok, 1), args=TrlORPOConfig(**cfg, beta=0.25, gradient_checkpointing=False),
                            train_dataset=ds, eval_dataset=ds, processing_class=tok).evaluate()
    _shared_metrics(ours, theirs, ORPO_METRICS)


def test_orpo_default_nll_covers_only_the_reply(tmp_path):
    """The paper's NLL (default) differs from TRL's (prompt too); the preference terms agree when tokens agree."""
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(6))
    cfg = dict(COMMON, output_dir=str(tmp_path))
    paper = ORPOTrainer(tiny_llama(tok, 1), args=ORPOConfig(**cfg), train_dataset=ds, eval_dataset=ds,
                        processing_class=tok)
    compat = ORPOTrainer(tiny_llama(tok, 1), args=ORPOConfig(**cfg, trl_compat=True), train_dataset=ds,
                         eval_dataset=ds, processing_class=tok)
    # Same replies apart from TRL's extra EOS after the template's newline.
    first = paper.eval_dataset[0]
    assert compat.eval_dataset[0]["chosen_ids"] == first["chosen_ids"] + [tok.eos_token_id]
    a, b = paper.evaluate(), compat.evaluate()
    assert a["eval_nll_loss"] != pytest.approx(b["eval_nll_loss"], abs=1e-3)
    # The paper's NLL is minus the mean reply-token log-prob of the chosen replies (all chosen rows, token mean).
    examples = [paper.eval_dataset[i] for i in range(3)]
    from prefalign.data.collate import PairCollator

    padded = PairCollator(tok.pad_token_id)(examples)
    tok_lp = token_logps(paper.model, padded["input_ids"], padded["attention_mask"], row_reply_mask(padded))
    m = row_reply_mask(padded)[:3]
    expected = -(tok_lp[:3] * m).sum() / m.sum()
    _, metrics = paper.compute_loss(paper.model, paper.data_collator(examples), return_outputs=True)
    assert "predictor" in paper.data_collator(examples)  # prefix sharing is on by default
    assert metrics["nll_loss"].mean().item() == pytest.approx(expected.item(), abs=1e-5)  # as logged: the mean


def test_wpo_weights_change_the_loss(tmp_path):
    """The WPO parity cases above would also pass with weights of 1 if the weights were close to 1: they are not
    (the weighted loss differs by far more than the parity tolerance)."""
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(_multi_turn_rows())
    results = []
    for weighting in (False, True):
        cfg = dict(COMMON, output_dir=str(tmp_path / str(weighting)), beta=0.5, use_weighting=weighting)
        tr = DPOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2), args=DPOConfig(**cfg), train_dataset=ds,
                        eval_dataset=ds, processing_class=tok)
        results.append(tr.evaluate())
    assert abs(results[1]["eval_loss"] - results[0]["eval_loss"]) > 100 * TOL
    assert results[1]["eval_rewards/margins"] == results[0]["eval_rewards/margins"]  # metrics are not weighted


def _train_both(tmp_path, cfg: dict, ds, libraries: tuple[str, ...] = ("ours", "trl")) -> list[list[float]]:
    """The logged training losses of prefalign's and TRL's DPOTrainer on the same models, data and options."""
    tok = smollm2_tokenizer()
    losses = []
    for name in libraries:
        cls, conf, kwargs = ((DPOTrainer, DPOConfig, {}) if name == "ours"
                             else (trl.DPOTrainer, trl.DPOConfig, {"gradient_checkpointing": False}))
        tr = cls(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2), args=conf(**cfg, **kwargs,
                 output_dir=str(tmp_path / name)), train_dataset=ds, processing_class=tok)
        tr.train()
        losses.append([r["loss"] for r in tr.state.log_history if "loss" in r])
    return losses


TRAIN = dict(COMMON, beta=0.5, per_device_train_batch_size=2, max_steps=3, learning_rate=5e-3, logging_steps=1,
             save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant")


@pytest.mark.parametrize("case", ["nca_pair", "apo_zero", "forward_kl", "discopop", "wpo"])
def test_a_few_training_steps_log_the_same_losses_as_trl(tmp_path, case):
    ds = datasets.Dataset.from_list(_multi_turn_rows() + conversational_rows(3))
    types, extra = LOSS_CASES[case]
    losses = _train_both(tmp_path, dict(TRAIN, loss_type=types, **extra), ds)
    assert len(losses[0]) == 3 and losses[0][0] != losses[0][-1]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_tr_dpo_reference_sync_trains_like_trl(tmp_path):
    """TR-DPO: the reference is blended towards the policy after every step (sync steps 1), in both libraries;
    TRL runs its reference live (its default), prefalign turns its precompute off for it. The losses from the
    second step on differ from a fixed reference's, so the sync is what is compared."""
    ds = datasets.Dataset.from_list(_multi_turn_rows() + conversational_rows(3))
    sync = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.6)
    ours, theirs = _train_both(tmp_path / "sync", dict(TRAIN, **sync), ds)
    assert ours == pytest.approx(theirs, abs=1e-4)
    (fixed,) = _train_both(tmp_path / "fixed", TRAIN, ds, libraries=("ours",))
    assert fixed[0] == pytest.approx(ours[0], abs=1e-6) and abs(fixed[2] - ours[2]) > 1e-3


CPO_CASES = {"sigmoid": {"label_smoothing": 0.1}, "hinge": {}, "ipo": {}, "simpo": {"simpo_gamma": 0.7},
             "alpha": {"loss_type": "simpo", "alpha": 0.25}, "no-nll": {"cpo_alpha": 0.0}}


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_evaluate_matches_trl_in_compat_mode(tmp_path, case):
    """CPO, SimPO and AlphaPO against TRL 1.13's experimental CPOTrainer (same tokens: trl_compat)."""
    from trl.experimental.cpo import CPOConfig as TrlCPOConfig
    from trl.experimental.cpo import CPOTrainer as TrlCPOTrainer

    from prefalign import CPOConfig, CPOTrainer

    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(_multi_turn_rows())
    extra = dict(CPO_CASES[case])
    extra.setdefault("loss_type", case if case in ("sigmoid", "hinge", "ipo", "simpo") else "sigmoid")
    cfg = dict(COMMON, output_dir=str(tmp_path), beta=0.5, **extra)
    ours = CPOTrainer(tiny_llama(tok, 1), args=CPOConfig(**cfg, trl_compat=True), train_dataset=ds, eval_dataset=ds,
                      processing_class=tok).evaluate()
    theirs = TrlCPOTrainer(tiny_llama(tok, 1), args=TrlCPOConfig(**cfg, gradient_checkpointing=False),
                           train_dataset=ds, eval_dataset=ds, processing_class=tok).evaluate()
    # With cpo_alpha 0, TRL logs nll_loss as 0 (not computed); prefalign logs the chosen replies' NLL anyway
    _shared_metrics(ours, theirs, DPO_METRICS + (["nll_loss"] if extra.get("cpo_alpha", 1.0) else []))
    assert abs(ours["eval_rewards/margins"]) > 1e-4 and ours["eval_nll_loss"] > 1
