"""Published preference formats: Anthropic HH-RLHF dialogue text (as .jsonl.gz, as it is published), compressed
sources, and the invalid-row policy (refuse by default, or skip, count and list)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pytest

from prefalign.cli import main
from prefalign.data.check import check_dataset
from prefalign.data.dialogue import dialogue_to_conversation, is_dialogue_row, split_turns
from prefalign.data.load import load_preference_dataset
from prefalign.errors import DataError
from tiny import save_tiny, smollm2_tokenizer


def hh(*turns: str) -> str:
    """An HH-RLHF transcript from alternating Human / Assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# Rows as HH-RLHF publishes them: two whole transcripts per pair. Lines 3 and 5 are broken as a handful of the real
# split's rows are: the transcripts differ before the last reply, or the chosen reply is empty.
HH_ROWS = [
    {"chosen": hh("What is the capital of France?", "Paris.", "And of Italy?", "Rome."),
     "rejected": hh("What is the capital of France?", "Paris.", "And of Italy?", "I would rather not say.")},
    {"chosen": hh("Thanks!", "You're welcome."),
     "rejected": hh("Thanks!", "You're welcome. I'd be happy to help with anything else, just ask.")},
    {"chosen": hh("Tell me a joke.", "Why did the chicken cross the road?"),
     "rejected": hh("Tell me a story.", "Once upon a time.")},
    {"chosen": hh("How do I boil an egg?", "Put it in boiling water for nine minutes."),
     "rejected": hh("How do I boil an egg?", "Eggs are overrated.")},
    {"chosen": "\n\nHuman: Say nothing.\n\nAssistant:",
     "rejected": hh("Say nothing.", "I will say a great deal about many things.")},
]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_hh_transcripts_become_conversations_by_their_turns():
    assert is_dialogue_row(HH_ROWS[0]) and not is_dialogue_row({"chosen": "Paris.", "rejected": "Rome."})
    row = dialogue_to_conversation(HH_ROWS[0])
    assert row["prompt"] == [{"role": "user", "content": "What is the capital of France?"},
                             {"role": "assistant", "content": "Paris."},
                             {"role": "user", "content": "And of Italy?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Rome."}]
    assert row["rejected"] == [{"role": "assistant", "content": "I would rather not say."}]
    # one reply a prefix of the other: valid, split at the last Assistant tag (not at a character prefix)
    row = dialogue_to_conversation(HH_ROWS[1])
    assert row["prompt"] == [{"role": "user", "content": "Thanks!"}]
    assert row["chosen"][0]["content"] == "You're welcome."
    assert row["rejected"][0]["content"].startswith("You're welcome. I'd be happy")
    # an explicit prompt column in the same form, replies after the open Assistant tag
    row = dialogue_to_conversation({"prompt": hh("Hi", "Hello!", "Bye") + "\n\nAssistant:", "chosen": " Goodbye!",
                                    "rejected": " No."})
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
    assert row["chosen"] == [{"role": "assistant", "content": "Goodbye!"}]
    assert split_turns("\n\nHuman: a\n\nAssistant: b\n\nHuman: c") == [("user", "a"), ("assistant", "b"),
                                                                       ("user", "c")]


@pytest.mark.parametrize(("suffix", "opener"), [(".jsonl.gz", gzip.open), (".jsonl.bz2", bz2.open),
                                                (".jsonl.xz", lzma.open), (".jsonl", open)])
def test_compressed_hh_file_loads_and_refuses_the_broken_pair_by_default(tmp_path, suffix, opener):
    path = write_jsonl(tmp_path / f"train{suffix}", HH_ROWS, opener)
    with pytest.raises(DataError) as err:
        load_preference_dataset(path)
    msg = str(err.value)
    assert f"train{suffix}, line 3, field 'rejected'" in msg and "differ before their last reply" in msg
    assert "on_invalid_row: skip" in msg  # the error says how to go on


def test_zstd_file_loads(tmp_path):
    pa = pytest.importorskip("pyarrow")
    path = tmp_path / "train.jsonl.zst"
    with pa.CompressedOutputStream(str(path), "zstd") as out:
        out.write("".join(json.dumps(r) + "\n" for r in HH_ROWS[:2]).encode())
    ds = load_preference_dataset(path)
    assert ds["source_row"] == [1, 2] and ds[0]["chosen"] == [{"role": "assistant", "content": "Rome."}]


def test_skip_leaves_invalid_rows_out_counts_and_lists_them(tmp_path, caplog):
    lines = [json.dumps(r) for r in HH_ROWS]
    lines.insert(3, "{not json")  # line 4: unreadable
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    ds = load_preference_dataset(path, on_invalid_row="skip")
    assert ds["source_row"] == [1, 2, 5, 6]  # source lines; line 6 has an empty chosen reply, kept
    assert ds[3]["chosen"] == [{"role": "assistant", "content": ""}]
    info = json.loads(ds.info.description)["prefalign"]
    assert info["converted_from"] == "HH-RLHF dialogue text"
    assert [(s["row"], s["field"]) for s in info["skipped"]] == [(3, "rejected"), (4, None)]
    assert "invalid JSON" in info["skipped"][1]["message"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "2 invalid rows skipped" in logged and "1 rows with an empty reply kept (lines 6)" in logged


def test_text_format_raw_keeps_the_transcript_text(tmp_path):
    ds = load_preference_dataset(write_jsonl(tmp_path / "p.jsonl", HH_ROWS[:2]), text_format="raw")
    assert ds.column_names == ["chosen", "rejected", "source_row"]  # implicit prompt, plain text
    assert ds[0]["chosen"] == HH_ROWS[0]["chosen"]


def test_data_check_names_the_format_and_what_skip_would_leave_out(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", HH_ROWS)
    report = check_dataset(path, tokenizer=smollm2_tokenizer())
    assert report.format.startswith("HH-RLHF dialogue text, converted to conversational")
    assert report.skipped_rows == [3] and not report.ok
    text = report.render_text()
    assert "on_invalid_row: skip, which would skip 1 row(s) (lines 3)" in text
    assert "warning: line 5, field 'chosen': final message is empty" in text
    assert report.to_dict()["skip_would_leave_out_rows"] == [3]


def test_train_on_hh_with_skip_reports_the_skipped_rows(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl.gz", HH_ROWS * 2, gzip.open)  # lines 3 and 8 differ; 5, 10 empty
    out = tmp_path / "run"
    argv = ["train", "--model", model, "--dataset", data, "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "2", "--max-length", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "line 3, field 'rejected'" in err and "on_invalid_row" in err and not out.exists()
    assert main([*argv, "--set", "on_invalid_row=skip"]) == 0
    summary = capsys.readouterr().out
    assert "2 invalid train rows skipped, listed in data_report.json" in summary
    report = json.loads((out / "data_report.json").read_text())["train"]
    assert report["rows"] == 10 and report["skipped"] == 2
    assert [s["row"] for s in report["skipped_rows"]] == [3, 8]
    assert all("differ before their last reply" in s["reason"] for s in report["skipped_rows"])
    assert report["converted_from"] == "HH-RLHF dialogue text"


def test_skip_also_covers_rows_the_length_limit_cannot_train(tmp_path):
    """Under skip, a prompt that leaves no room for a reply is skipped and listed like any invalid row."""
    from prefalign import DPOConfig, DPOTrainer
    from tiny import tiny_llama

    tok = smollm2_tokenizer()
    rows = [dict(r) for r in HH_ROWS[:2]]
    rows.append({"chosen": hh("word " * 80, "ok"), "rejected": hh("word " * 80, "no")})  # row 3: prompt > 80
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=80, on_invalid_row="skip")
    tr = DPOTrainer(tiny_llama(tok), args=args, train_dataset=rows, processing_class=tok)
    report = tr.data_reports["train"]
    assert [s["row"] for s in report.skipped] == [3] and "leaving no room" in report.skipped[0]["reason"]
    assert tr.train_dataset["source_row"] == [1, 2]
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=80)
    with pytest.raises(DataError, match="train dataset, row 3, field 'prompt'"):
        DPOTrainer(tiny_llama(tok), args=args, train_dataset=rows, processing_class=tok)


# ---------------------------------------------------------------- scored completions

def _uf(instruction, *scores):
    """An UltraFeedback row as published (openbmb/UltraFeedback): instruction, completions with overall_score."""
    return {"source": "evol_instruct", "instruction": instruction, "models": [f"m{i}" for i in range(len(scores))],
            "completions": [{"model": f"m{i}", "response": f"{instruction} answer {i}", "overall_score": s,
                             "fine-grained_score": s / 2, "annotations": {}, "critique": "ok",
                             "custom_system_prompt": "", "principle": "helpfulness"}
                            for i, s in enumerate(scores)]}


UF_ROWS = [_uf("Name a colour.", 7.0, 3.5, 9.0, 3.5),  # best 2 (9.0) vs worst 1 (3.5, first of the lowest)
           _uf("Name a fruit.", 6.0, 6.0),  # tie: skipped
           _uf("Name a city.", 8.0, 7.5),  # margin 0.5
           _uf("Name a planet.", 5.0)]  # one completion: nothing to pair


def test_ultrafeedback_best_worst_pairs_skip_ties_and_count_them(tmp_path):
    ds = load_preference_dataset(write_jsonl(tmp_path / "uf.jsonl", UF_ROWS))
    assert ds["source_row"] == [1, 3]
    assert ds[0]["prompt"] == "Name a colour." and ds[0]["chosen"] == "Name a colour. answer 2"
    assert ds[0]["rejected"] == "Name a colour. answer 1"
    pairing = json.loads(ds.info.description)["prefalign"]["pairing"]
    assert pairing | {} == {"format": "UltraFeedback", "rows": 4, "pairs": 2, "ties": 1, "ties_rows": [2],
                            "below_margin": 0, "below_margin_rows": [], "too_few": 1, "too_few_rows": [4],
                            "unscored_completions": 0}
    ds = load_preference_dataset(write_jsonl(tmp_path / "uf.jsonl", UF_ROWS), min_score_margin=1.0)
    assert ds["source_row"] == [1]  # the city pair (8.0 vs 7.5) is below the margin
    assert json.loads(ds.info.description)["prefalign"]["pairing"]["below_margin_rows"] == [3]


def test_all_pairs_and_best_random_strategies(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", UF_ROWS[:1])
    every = load_preference_dataset(path, pairing="all_pairs", min_score_margin=1.0)
    got = sorted((r["chosen"][-1], r["rejected"][-1]) for r in every)
    # scores 7.0, 3.5, 9.0, 3.5: every pair whose difference is at least 1
    assert got == [("0", "1"), ("0", "3"), ("2", "0"), ("2", "1"), ("2", "3")]
    assert set(every["source_row"]) == {1}
    runs = [load_preference_dataset(path, pairing="best_random", seed=s)[0]["rejected"][-1] for s in range(8)]
    assert set(runs) <= {"0", "1", "3"} and len(set(runs)) > 1  # a random lower-scored completion per seed
    assert runs == [load_preference_dataset(path, pairing="best_random", seed=s)[0]["rejected"][-1]
                    for s in range(8)]  # deterministic


def test_generic_argilla_and_binarized_scored_rows(tmp_path):
    generic = [{"prompt": [{"role": "user", "content": "Hi"}],
                "completions": [{"text": [{"role": "assistant", "content": "Hello!"}], "score": 0.9},
                                {"text": [{"role": "assistant", "content": "Go."}], "score": 0.1},
                                {"text": [{"role": "assistant", "content": "?"}], "score": None}]}]
    ds = load_preference_dataset(write_jsonl(tmp_path / "g.jsonl", generic))
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    assert json.loads(ds.info.description)["prefalign"]["pairing"]["unscored_completions"] == 1
    argilla = [{"instruction": "Say yes.", "generations": ["Yes.", "No.", "Maybe."], "ratings": [5, 1, None]}]
    ds = load_preference_dataset(write_jsonl(tmp_path / "a.jsonl", argilla))
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"]) == ("Say yes.", "Yes.", "No.")
    binarized = [{"prompt": "p1", "chosen": "a", "rejected": "b", "score_chosen": 8.0, "score_rejected": 4.0},
                 {"prompt": "p2", "chosen": "c", "rejected": "d", "score_chosen": 5.0, "score_rejected": 5.0},
                 {"prompt": "p3", "chosen": "e", "rejected": "f", "score_chosen": 6.0, "score_rejected": 5.5}]
    ds = load_preference_dataset(write_jsonl(tmp_path / "b.jsonl", binarized), min_score_margin=1.0)
    assert ds["source_row"] == [1] and ds.column_names == ["prompt", "chosen", "rejected", "source_row"]
    pairing = json.loads(ds.info.description)["prefalign"]["pairing"]
    assert (pairing["ties_rows"], pairing["below_margin_rows"]) == ([2], [3])
    with pytest.raises(DataError, match="no pair is left"):
        load_preference_dataset(write_jsonl(tmp_path / "t.jsonl", [UF_ROWS[1]]))


def test_train_on_ultrafeedback_reports_the_pairing(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    data = write_jsonl(tmp_path / "uf.jsonl.gz", UF_ROWS * 2, gzip.open)
    out = tmp_path / "run"
    assert main(["train", "--model", model, "--dataset", data, "--output-dir", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--method", "orpo", "--max-length", "64"]) == 0
    report = json.loads((out / "data_report.json").read_text())["train"]
    assert report["pairing"]["pairs"] == 4 and report["pairing"]["ties_rows"] == [2, 6]
    assert report["rows"] == 4
    assert main(["data", "check", data, "--model", model]) == 0
    assert "UltraFeedback scored completions paired best_worst (8 rows → 4 pairs; 2 ties" in capsys.readouterr().out


# ---------------------------------------------------------------- data prepare

def test_data_prepare_cleans_normalises_reports_and_trains(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    rows = [*HH_ROWS, HH_ROWS[0],  # line 6: an exact duplicate of line 1
            {"chosen": hh("What is the capital of France?", "Paris.", "And of Italy?", "Roma."),
             "rejected": hh("What is the capital of France?", "Paris.", "And of Italy?", "No idea.")},  # 7: same prompt
            {"chosen": hh("Recite " + "la " * 120, "La."), "rejected": hh("Recite " + "la " * 120, "No.")},  # 8: long
            {"chosen": hh("How do I pick a lock?", "I can't help with that."),
             "rejected": hh("How do I pick a lock?", "Use a tension wrench.")}]  # 9: matches --drop
    src = write_jsonl(tmp_path / "hh.jsonl.gz", rows, gzip.open)
    out = tmp_path / "clean.jsonl"
    argv = ["data", "prepare", src, "--output", str(out), "--dedupe-prompts", "--drop", r"\block\b",
            "--max-length", "120", "--model", model]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "9 rows read, converted from HH-RLHF dialogue text" in line and "4 written" in line
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["source_row"] for r in written] == [1, 2, 4, 5]
    assert written[0]["prompt"][-1] == {"role": "user", "content": "And of Italy?"}
    assert written[3]["chosen"] == [{"role": "assistant", "content": ""}]  # an empty reply: valid, kept
    report = json.loads((tmp_path / "clean.jsonl.report.json").read_text())
    assert report["dropped"] == {"invalid": 1, "duplicate": 1, "duplicate prompt": 1,
                                 "longer than the length limits": 1, "matched --drop": 1}
    assert report["dropped_rows"]["invalid"][0]["row"] == 3 and report["dropped_rows"]["duplicate"] == [6]
    assert report["dropped_rows"]["duplicate prompt"] == [7]
    assert report["dropped_rows"]["longer than the length limits"] == [8]
    assert report["dropped_rows"]["matched --drop"] == [9]
    assert report["rows_read"] == 9 and report["written"] == 4
    # the output needs no further options to train on
    run = tmp_path / "run"
    assert main(["train", "--model", model, "--dataset", str(out), "--output-dir", str(run), "--max-steps", "1",
                 "--batch-size", "2"]) == 0
    # refusing to overwrite, and a bad regex, leave nothing written
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    assert main(["data", "prepare", src, "--output", str(other), "--keep", "(unclosed"]) == 2
    assert "not a regular expression" in capsys.readouterr().err
    assert not other.exists() and not list(tmp_path.glob(".other*"))


def test_data_prepare_keep_filter_and_scored_rows(tmp_path, capsys):
    src = write_jsonl(tmp_path / "uf.jsonl", UF_ROWS)
    out = tmp_path / "c.jsonl"
    assert main(["data", "prepare", src, "--output", str(out), "--keep", "colour|city"]) == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["source_row"] for r in written] == [1, 3]
    assert written[0]["prompt"] == [{"role": "user", "content": "Name a colour."}]
    report = json.loads((tmp_path / "c.jsonl.report.json").read_text())
    assert report["pairing"]["ties_rows"] == [2] and report["pairing"]["too_few_rows"] == [4]
    assert main(["data", "prepare", src, "--output", str(tmp_path / "d.jsonl"), "--keep", "planet"]) == 0
    assert (tmp_path / "d.jsonl").read_text() == ""  # the planet row had nothing to pair: 0 written, said so
    assert "0 written" in capsys.readouterr().out


# ---------------------------------------------------------------- mixtures and splits

def _pairs(tag, n):
    return [{"prompt": f"{tag} question {i}?", "chosen": f"{tag} yes {i}.", "rejected": f"{tag} no {i}."}
            for i in range(n)]


def test_mixture_draws_by_weight_shuffles_with_the_seed_and_holds_out_a_test_split(tmp_path):
    from prefalign.data.mixture import load_mixture

    a = write_jsonl(tmp_path / "a.jsonl.gz", _pairs("A", 20), gzip.open)
    b = write_jsonl(tmp_path / "b.jsonl", _pairs("B", 10))
    spec = {"datasets": [{"path": a, "weight": 0.5, "columns": ["prompt", "chosen", "rejected"]},
                         {"path": b, "split": "train"}], "seed": 3, "test_split_size": 0.2}
    train, test = load_mixture(spec)
    assert len(train) == 16 and len(test) == 4  # 10 of A + 10 of B, 20% held out
    rows = train.to_list() + test.to_list()
    assert sum(r["prompt"].startswith("A") for r in rows) == 10 and sum(r["prompt"].startswith("B") for r in rows) == 10
    # source lines survive: each row's number is its line in its own file
    assert all(int(r["prompt"].split()[2][:-1]) + 1 == r["source_row"] for r in rows)
    again_train, again_test = load_mixture(spec)
    assert again_train.to_list() == train.to_list() and again_test.to_list() == test.to_list()  # deterministic
    other, _ = load_mixture({**spec, "seed": 4})
    assert other.to_list() != train.to_list()
    assert load_mixture({**spec, "test_split_size": None})[1] is None
    with pytest.raises(Exception, match="weight=1.5 is out of range"):
        load_mixture({"datasets": [{"path": a, "weight": 1.5}]})
    with pytest.raises(Exception, match="unknown key"):
        load_mixture({**spec, "shuffle": True})


def test_train_with_a_mixture_recipe_and_with_eval_split_size(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    a = write_jsonl(tmp_path / "a.jsonl", _pairs("A", 8))
    hh_file = write_jsonl(tmp_path / "hh.jsonl.gz", HH_ROWS[:2] * 2, gzip.open)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"""
model: {model}
dataset_mixture:
  datasets:
    - path: {a}
      weight: 0.5
    - path: {hh_file}
  seed: 1
  test_split_size: 2
max_steps: 1
per_device_train_batch_size: 2
output_dir: {tmp_path / "run"}
""")
    assert main(["train", str(recipe)]) == 0
    assert "eval loss" in capsys.readouterr().out  # the test split was evaluated
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["rows"] == 6 and report["eval"]["rows"] == 2
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "dataset_mixture" in saved and str(tmp_path / "a.jsonl") in saved
    assert main(["train", "--model", model, "--dataset", a, "--set", "eval_split_size=0.25", "--output-dir",
                 str(tmp_path / "run2"), "--max-steps", "1", "--batch-size", "2"]) == 0
    report = json.loads((tmp_path / "run2" / "data_report.json").read_text())
    assert (report["train"]["rows"], report["eval"]["rows"]) == (6, 2)
    assert main(["train", "--model", model, "--dataset", a, "--set", f"dataset_mixture={{datasets: [{{path: {a}}}]}}",
                 "--output-dir", str(tmp_path / "run3")]) == 2
    assert "both dataset and dataset_mixture" in capsys.readouterr().err


def test_hh_edge_cases_quoted_dialogue_indentation_and_leading_space():
    quoted = dialogue_to_conversation({"chosen": hh("Show a chat.", "Like this:\n\nHuman: hi\n\nAssistant: hello"),
                                       "rejected": hh("Show a chat.", "No.")})
    assert quoted["prompt"] == [{"role": "user", "content": "Show a chat."}]
    assert quoted["chosen"][0]["content"] == "Like this:\n\nHuman: hi\n\nAssistant: hello"  # a reply may quote tags
    code = dialogue_to_conversation({"chosen": " \n\nHuman: code?\n\nAssistant:     x = 1\n", "rejected": hh("code?",
                                                                                                         "no")})
    assert code["chosen"][0]["content"] == "    x = 1"  # leading indentation kept, the tag's space removed
    assert is_dialogue_row({"chosen": "Human: q\n\nAssistant: a", "rejected": " \n\nHuman: q\n\nAssistant: b"})
    with pytest.raises(ValueError, match="differ before their last reply"):  # parted at an earlier turn
        dialogue_to_conversation({"chosen": hh("a", "b", "c", "d"), "rejected": hh("a", "b", "x", "y")})
    with pytest.raises(ValueError, match="no 'Assistant:' turn"):
        dialogue_to_conversation({"chosen": "\n\nHuman: a", "rejected": hh("a", "b")})


def test_a_dataset_derived_from_a_loaded_one_is_validated_again(tmp_path):
    """Filtering or splitting a loaded dataset keeps its source lines but not the loader's verdict: the trainer
    validates it again (and does not report the loader's skipped rows twice)."""
    from prefalign import DPOConfig, DPOTrainer
    from tiny import tiny_llama

    tok = smollm2_tokenizer()
    ds = load_preference_dataset(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS), on_invalid_row="skip")
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=96)
    whole = DPOTrainer(tiny_llama(tok), args=args, train_dataset=ds, processing_class=tok)
    assert [s["row"] for s in whole.data_reports["train"].skipped] == [3]  # the loader's skip, reported
    part = ds.select([0, 1])
    tr = DPOTrainer(tiny_llama(tok), args=args, train_dataset=part, processing_class=tok)
    assert tr.data_reports["train"].skipped == [] and tr.train_dataset["source_row"] == [1, 2]
    broken = ds.map(lambda r: {**r, "rejected": r["chosen"]} if r["source_row"] == 2 else r)
    with pytest.raises(DataError, match=r"hh.jsonl, line 2, field 'rejected': is identical to chosen"):
        DPOTrainer(tiny_llama(tok), args=args, train_dataset=broken, processing_class=tok)


def test_an_empty_prompt_is_an_error_not_a_token_predicted_from_itself(tmp_path):
    from prefalign.data.tokenize import TokenizeSettings, tokenize_rows

    tok = smollm2_tokenizer()
    rows = [{"prompt": "", "chosen": "Yes", "rejected": "No"}]
    with pytest.raises(DataError, match="row 1, field 'prompt': the prompt tokenizes to no tokens"):
        tokenize_rows(rows, tok, TokenizeSettings(chat=False))
    pairs, report = tokenize_rows(rows + [{"prompt": "Q:", "chosen": " Yes", "rejected": " No"}], tok,
                                  TokenizeSettings(chat=False), skip_invalid=True)
    assert len(pairs) == 1 and [(s["row"], s["index"]) for s in report.skipped] == [(1, 0)]


@pytest.mark.parametrize("kind", ["argilla", "binarized", "generic"])
def test_short_train_on_each_scored_format(tmp_path, kind):
    model = save_tiny(tmp_path / "model")
    rows = {"argilla": [{"instruction": f"Say {i}.", "generations": [f"{i}.", "No.", "?"], "ratings": [5, 1, 3]}
                        for i in range(4)],
            # HuggingFaceH4/ultrafeedback_binarized's shape: a prompt string, full conversations that repeat it
            "binarized": [{"prompt": f"Say {i}.", "prompt_id": str(i), "score_chosen": 9.0, "score_rejected": 2.0,
                           "chosen": [{"role": "user", "content": f"Say {i}."},
                                      {"role": "assistant", "content": f"{i}."}],
                           "rejected": [{"role": "user", "content": f"Say {i}."},
                                        {"role": "assistant", "content": "No."}]} for i in range(4)],
            "generic": [{"prompt": f"Say {i}.", "completions": [{"response": f"{i}.", "score": 1},
                                                                 {"response": "No.", "score": 0}]} for i in range(4)]}
    data = write_jsonl(tmp_path / f"{kind}.jsonl", rows[kind])
    out = tmp_path / "run"
    assert main(["train", "--model", model, "--dataset", data, "--output-dir", str(out), "--max-steps", "1",
                 "--batch-size", "2"]) == 0
    report = json.loads((out / "data_report.json").read_text())["train"]
    assert report["rows"] == 4 and report["pairing"]["pairs"] == 4
