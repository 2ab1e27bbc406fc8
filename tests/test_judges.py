"""Judge specs: judge names (registered or entry points, like the demo's), module:function, a tiny reward model."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from prefalign import judges
from prefalign.errors import ConfigError
from prefalign.judges import Judge, call_score, judge_names, load_judge, register_judge
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


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judges, "_REGISTRY", {})  # registrations made by a test end with it


def test_a_registered_judge_is_loaded_by_name(registry):
    calls = []

    def factory():
        calls.append(1)
        return length_judge

    register_judge("length", factory)
    assert not calls  # the factory runs only when the judge is used
    j = load_judge("length")
    assert (j.name, j.pass_threshold, calls) == ("length", 1.0, [1])
    assert call_score(j, ["a"], ["xyz"]) == [3.0]
    assert load_judge("length", pass_threshold=2).pass_threshold == 2
    register_judge("strict", lambda: Judge("ignored", length_judge, pass_threshold=5.0))
    strict = load_judge("strict")
    assert (strict.name, strict.pass_threshold) == ("strict", 5.0)  # a factory's Judge brings its threshold
    assert {"length", "strict", "demo"} <= set(judge_names())
    register_judge("demo", lambda: length_judge)  # a registered name wins over the entry point
    assert load_judge("demo").score("q", "abcd") == 4.0


def test_register_judge_refuses_names_that_read_as_specs(registry):
    for name in ("", "pkg:fn"):
        with pytest.raises(ValueError):
            register_judge(name, lambda: length_judge)


def test_an_unknown_judge_name_lists_the_available_ones(registry):
    register_judge("length", lambda: length_judge)
    with pytest.raises(ConfigError) as e:
        load_judge("lenght")
    message = str(e.value)
    assert "lenght" in message and "available: demo, length" in message and "\n" not in message


def test_a_failing_factory_is_a_config_error(registry):
    def broken():
        raise RuntimeError("no GPU\nsecond line")

    register_judge("broken", broken)
    with pytest.raises(ConfigError) as e:
        load_judge("broken")
    assert "judge 'broken' could not be loaded (RuntimeError: no GPU second line)" in str(e.value)


def test_demo_resolves_through_the_entry_point(registry):
    from importlib.metadata import entry_points

    (ep,) = entry_points(group="prefalign.judges", name="demo")
    assert ep.value == "prefalign.demo.task:judge"
    demo = load_judge("demo")
    from prefalign.demo.task import judge

    assert demo.score is judge and demo.name == "demo" and demo.pass_threshold == 1.0
    assert judge_names() == ["demo"]  # nothing registered: the name comes from the entry point


def test_judges_module_does_not_import_the_demo():
    import subprocess

    code = "import sys, prefalign.judges; print('prefalign.demo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


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
