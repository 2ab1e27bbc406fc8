"""Judge specs: the demo judge, a module:function callable, and a tiny reward model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from prefalign.errors import ConfigError
from prefalign.judges import call_score, load_judge
from tiny import smollm2_tokenizer


def length_judge(prompt: str, response: str) -> float:
    return float(len(response))


def test_demo_and_callable_judges():
    demo = load_judge("demo")
    assert demo.pass_threshold == 1.0 and demo.score("What is 2 + 3? Reply with the number only.", "5") == 1.0
    j = load_judge("test_judges:length_judge", pass_threshold=3)
    assert call_score(j, ["a", "b"], ["xy", "xyzw"]) == [2.0, 4.0] and j.pass_threshold == 3


@pytest.mark.parametrize("spec", ["nonsense", "no_such_module_xyz:f", "test_judges:missing_fn"])
def test_bad_judge_specs_are_config_errors(spec):
    with pytest.raises(ConfigError) as e:
        load_judge(spec)
    assert "\n" not in str(e.value)


def test_reward_model_judge_scores_with_the_classifier_logit(tmp_path):
    tok = smollm2_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    for spec in (f"reward-model:{tmp_path / 'rm'}", str(tmp_path / "rm")):
        j = load_judge(spec)
        assert j.pass_threshold == 0.0
        scores = call_score(j, ["Hi", "Hello there"], ["Hey", "General Kenobi"])
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}],
                                       tokenize=False)
        with torch.no_grad():
            expected = rm(**tok(text, return_tensors="pt")).logits[0, 0].item()
        assert scores[0] == pytest.approx(expected, abs=1e-4)
        assert scores[0] != scores[1]
