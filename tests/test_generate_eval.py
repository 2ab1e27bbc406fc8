"""On-policy pair generation and held-out evaluation, with tiny models and known log-probs."""

from __future__ import annotations

import pytest
import torch

from prefalign.evaluate import pair_metrics, sequence_logps, win_rate
from prefalign.generate import build_pairs, generate, generate_pairs
from tiny import conversational_rows, smollm2_tokenizer, tiny_llama, token_logps


def _score(prompt: str, reply: str) -> float | None:
    if prompt == "unjudged":
        return None
    return float(len(reply) % 3)  # a deterministic, arbitrary judge


def test_build_pairs_picks_best_and_worst_skips_ties_and_keeps_scores():
    rows = [{"prompt": "p1", "reference": "ref!!", "family": "a"},  # ref scores 2
            {"prompt": "p2"},
            {"prompt": "unjudged"}]
    samples = [["x", "xyz"],  # scores 1, 0
               ["aaa", "bbb"],  # both 0: tie
               ["q", "r"]]
    pairs, stats = build_pairs(rows, samples, _score)
    assert stats.prompts == 3 and stats.pairs == 1 and stats.ties == 1 and stats.unjudged == 1
    assert stats.tie_rows == [2]
    (p,) = pairs
    assert p["prompt"] == [{"role": "user", "content": "p1"}]
    assert p["chosen"][0]["content"] == "ref!!" and p["chosen_score"] == 2.0 and p["chosen_source"] == "reference"
    assert p["rejected"][0]["content"] == "xyz" and p["rejected_score"] == 0.0
    assert p["family"] == "a"


def test_generate_pairs_on_a_tiny_model_is_seeded():
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 0)
    rows = [{"prompt": f"Say something about {w}."} for w in ("cats", "dogs", "rain")]
    a, sa = generate_pairs(model, tok, rows, _score, samples=3, max_new_tokens=6, seed=1)
    b, sb = generate_pairs(model, tok, rows, _score, samples=3, max_new_tokens=6, seed=1)
    assert a == b and sa.pairs == len(a) and sa.pairs + sa.ties == 3
    for p in a:
        assert p["chosen_score"] > p["rejected_score"]
        assert _score("", p["chosen"][0]["content"]) == p["chosen_score"]


def test_greedy_generation_matches_unbatched():
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 0)
    prompts = ["Hi.", "A much longer prompt that needs left padding in a batch."]
    batched = generate(model, tok, prompts, max_new_tokens=5, batch_size=2)
    single = [generate(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_sequence_logps_and_pair_metrics_against_hand_values():
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 0)
    rows = conversational_rows(3)
    chosen, rejected = sequence_logps(model, tok, rows, batch_size=2)
    # Recompute the first pair directly from the chat template.
    prompt = tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    full = tok.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=True,
                                   return_dict=True)["input_ids"]
    ids = torch.tensor([full])
    mask = torch.zeros_like(ids)
    mask[0, len(prompt):] = 1
    expected = (token_logps(model, ids, torch.ones_like(ids), mask) * mask).sum()
    assert chosen[0].item() == pytest.approx(expected.item(), abs=1e-4)

    pm = pair_metrics((torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])),
                      (torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])), beta=0.5)
    # margins: 0.5*((-1+2)-(-3+2)) = 1.0 ; 0.5*((-2+2)-(-1+2)) = -0.5
    assert pm.reward_accuracy == 0.5 and pm.reward_margin == pytest.approx(0.25)
    assert pm.policy_prefers_chosen == 0.5 and pm.reference_prefers_chosen == 0.0


def test_win_rate_counts_ties_and_skips_unjudged():
    w = win_rate([1.0, 0.5, 0.0, None], [0.5, 0.5, 1.0, 1.0])
    assert (w.wins, w.losses, w.ties) == (1, 1, 1)
    assert w.win_rate == pytest.approx(0.5)
