"""Local stand-ins for the alignment-handbook recipes' models and datasets, and the one function that turns a recipe
into a local one, so `tests/test_handbook_recipes.py` (and `scripts/handbook_check.py`) run the 22 recipes offline.

Each dataset stand-in is what ``hf download --repo-type dataset ID --local-dir DIR`` leaves: a ``README.md`` whose
YAML header has the hub's ``configs:`` (``data_files`` per split) and parquet shards at the paths it names
(``data/<split>-00000-of-00001.parquet``, or ``data/<config>/<split>-...`` for datasets with named configurations),
with the published column names and types (message lists, structs, scores), a handful of deterministic rows each.
Columns were taken from the dataset cards' ``dataset_info``; where a card lists more columns than the recipes use,
the stand-in keeps the ones that could trip a loader (extra message lists, structs, ratings).

`localize` changes a recipe only as the handbook target allows: model and dataset ids become local paths; what
this machine cannot do offline on a CPU is switched off (``push_to_hub`` with ``hub_model_revision``, flash-attention,
k-bit loading, bitsandbytes optimizers when bitsandbytes is missing, wandb); and sizes shrink to a test's (steps,
batch, lengths, held-out rows). Every change is listed in `CHANGED_KEYS`; everything else stays as written.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

HANDBOOK_DIR = Path(__file__).resolve().parent / "handbook"
HANDBOOK_COMMIT = "925acdfe4b2b4e38c3dabd1851bc418f0b656351"
METHODS = ("sft", "dpo", "orpo")


def recipe_paths() -> list[Path]:
    """The 22 recipes, ``recipes/<family>/<method>/<name>.yaml``, sorted."""
    return sorted(p for p in (HANDBOOK_DIR / "recipes").glob("*/*/*.yaml") if p.parent.name in METHODS)


def recipe_id(path: Path) -> str:
    return str(path.relative_to(HANDBOOK_DIR / "recipes"))


def recipe_method(path: Path) -> str:
    """The handbook picks the script (scripts/sft.py, dpo.py, orpo.py) by the recipe's directory."""
    return path.parent.name


# ----- rows in the published shapes ----------------------------------------------------------------------------------
def _msg(role: str, content: str) -> dict[str, str]:
    return {"content": content, "role": role}


def _question(i: int, tag: str) -> str:
    return f"[{tag}] What is {i} plus {i + 1}?"


def _good(i: int) -> str:
    return f"{2 * i + 1}."


def _bad(i: int) -> str:
    return f"I am not sure, maybe {3 * i + 7}, or something else entirely."


def _conversation(i: int, tag: str, system: str | None = None, turns: int = 1) -> list[dict[str, str]]:
    out = [_msg("system", system)] if system else []
    for t in range(turns):
        out += [_msg("user", _question(i + t, tag)), _msg("assistant", _good(i + t))]
    return out


def ultrafeedback_rows(n: int, tag: str) -> list[dict[str, Any]]:
    """HuggingFaceH4/ultrafeedback_binarized: prompt text, prompt_id, chosen / rejected / messages as full
    conversations (user turn + assistant reply), float scores."""
    rows = []
    for i in range(n):
        q = _question(i, tag)
        rows.append({"prompt": q, "prompt_id": f"{tag}-{i:04d}",
                     "chosen": [_msg("user", q), _msg("assistant", _good(i))],
                     "rejected": [_msg("user", q), _msg("assistant", _bad(i))],
                     "messages": [_msg("user", q), _msg("assistant", _good(i))],
                     "score_chosen": 8.0 + (i % 2), "score_rejected": 3.0 + (i % 3) / 2})
    return rows


def orca_dpo_rows(n: int, tag: str) -> list[dict[str, Any]]:
    """HuggingFaceH4/orca_dpo_pairs: chosen / rejected are system + user + assistant conversations; prompt text."""
    rows = []
    for i in range(n):
        q, sys = _question(i, tag), "You are a helpful assistant, who always provide explanation."
        rows.append({"chosen": [_msg("system", sys), _msg("user", q), _msg("assistant", _good(i))],
                     "rejected": [_msg("system", sys), _msg("user", q), _msg("assistant", _bad(i))],
                     "prompt": q})
    return rows


def cai_rows(n: int, tag: str) -> list[dict[str, Any]]:
    """HuggingFaceH4/cai-conversation-harmless (and grok-conversation-harmless): the critique / revision turns as
    {content, role} structs, messages and chosen / rejected as full conversations."""
    rows = []
    for i in range(n):
        q = _question(i, tag)
        rows.append({"index": i, "prompt": q,
                     "init_prompt": _msg("user", q), "init_response": _msg("assistant", _bad(i)),
                     "critic_prompt": _msg("user", "Identify ways the response is harmful."),
                     "critic_response": _msg("assistant", "It is unsure."),
                     "revision_prompt": _msg("user", "Rewrite the response."),
                     "revision_response": _msg("assistant", _good(i)),
                     "messages": [_msg("user", q), _msg("assistant", _good(i))],
                     "chosen": [_msg("user", q), _msg("assistant", _good(i))],
                     "rejected": [_msg("user", q), _msg("assistant", _bad(i))]})
    return rows


def h4_sft_rows(n: int, tag: str, system: str | None = None) -> list[dict[str, Any]]:
    """The H4-formatted SFT sets (ultrachat_200k, deita, Magpie-Pro-...-H4, capybara, ...): prompt, prompt_id and a
    ``messages`` conversation; some multi-turn."""
    return [{"prompt": _question(i, tag), "prompt_id": f"{tag}-{i:04d}",
             "messages": _conversation(i, tag, system, turns=1 + i % 2)} for i in range(n)]


def smoltalk_rows(n: int, tag: str) -> list[dict[str, Any]]:
    """HuggingFaceTB/smoltalk and smol-smoltalk: messages (some with a system turn) and source."""
    return [{"messages": _conversation(i, tag, "You are a concise assistant." if i % 3 == 0 else None),
             "source": tag} for i in range(n)]


def _template_kwargs(thinking: bool, i: int) -> dict[str, Any]:
    tool = '{"name": "add", "description": "Add two numbers", "parameters": {"a": "int", "b": "int"}}'
    return {"custom_instructions": "Answer briefly." if i % 2 else "", "enable_thinking": thinking,
            "python_tools": [tool] if i % 4 == 1 else [], "xml_tools": [tool] if i % 4 == 3 else []}


def _reply(i: int, thinking: bool, good: bool = True) -> str:
    text = _good(i) if good else _bad(i)
    return f"<think>\nAdd {i} and {i + 1}.\n</think>\n{text}" if thinking else text


def smoltalk2_sft_rows(n: int, split: str) -> list[dict[str, Any]]:
    """HuggingFaceTB/smoltalk2 SFT: messages (``/no_think`` or ``/think`` in a system turn on some rows),
    chat_template_kwargs {custom_instructions, enable_thinking, python_tools, xml_tools}, source."""
    thinking = split.endswith("_think") and not split.endswith("no_think")
    flag = "/think" if thinking else "/no_think"
    rows = []
    for i in range(n):
        msgs = [_msg("system", f"Answer briefly. {flag}")] if i % 2 else []
        msgs += [_msg("user", _question(i, split[:12])), _msg("assistant", _reply(i, thinking))]
        rows.append({"messages": msgs, "chat_template_kwargs": _template_kwargs(thinking, i), "source": split})
    return rows


def smoltalk2_pref_rows(n: int, split: str) -> list[dict[str, Any]]:
    """HuggingFaceTB/smoltalk2 Preference: chosen / rejected conversations, prompt text, chat_template_kwargs,
    source."""
    thinking = not split.endswith("no_think")
    rows = []
    for i in range(n):
        q = _question(i, split[:12])
        rows.append({"chosen": [_msg("user", q), _msg("assistant", _reply(i, thinking))],
                     "rejected": [_msg("user", q), _msg("assistant", _reply(i, thinking, good=False))],
                     "prompt": q, "chat_template_kwargs": _template_kwargs(thinking, i), "source": split})
    return rows


def smoltalk2_mid_rows(n: int, split: str) -> list[dict[str, Any]]:
    """HuggingFaceTB/smoltalk2 Mid: messages and source."""
    return [{"messages": [_msg("user", _question(i, split[:12])), _msg("assistant", _reply(i, True))],
             "source": split} for i in range(n)]


def capybara_dpo_rows(n: int, tag: str) -> list[dict[str, Any]]:
    """argilla/distilabel-capybara-dpo-7k-binarized: multi-turn chosen / rejected conversations sharing all but the
    last reply, the source conversation as {input, output} items, generations, integer ratings, model names."""
    rows = []
    for i in range(n):
        history = _conversation(i, tag, turns=i % 2)
        q = _question(i + 10, tag)
        rows.append({"source": "Capybara", "conversation": [{"input": q, "output": _good(i + 10)}],
                     "original_response": _good(i + 10), "generation_prompt": [q],
                     "raw_generation_responses": [_bad(i)], "new_generations": [_good(i + 10), _bad(i)],
                     "prompt": q,
                     "chosen": history + [_msg("user", q), _msg("assistant", _good(i + 10))],
                     "rejected": history + [_msg("user", q), _msg("assistant", _bad(i + 10))],
                     "rating_chosen": 5, "rating_rejected": 2 + i % 2, "chosen_model": "gpt-4",
                     "rejected_model": "mistral-7b"})
    return rows


def dpo_mix_rows(n: int, tag: str) -> list[dict[str, Any]]:
    """argilla/dpo-mix-7k: dataset (its source), chosen / rejected full conversations, float ratings."""
    return [{"dataset": "capybara", "chosen": _conversation(i, tag),
             "rejected": [_msg("user", _question(i, tag)), _msg("assistant", _bad(i))],
             "chosen_rating": 5.0, "rejected_rating": 2.5} for i in range(n)]


# ----- the datasets the recipes name ---------------------------------------------------------------------------------
RowsFn = Callable[[int, str], list[dict[str, Any]]]
_PREFS = ("train_prefs", "test_prefs")
_SFT = ("train_sft", "test_sft")


def _h4_sft(splits: tuple[str, ...] = _SFT, system: str | None = None) -> dict[str, Any]:
    return {"layout": "flat", "configs": {"default": {s: (lambda n, t, sy=system: h4_sft_rows(n, t, sy))
                                                      for s in splits}}}


# id → {"layout": "flat" (data/<split>-...) or "nested" (data/<config>/<split>-...), "configs": {config: {split:
# rows(n, tag)}}}. Splits are the published ones the recipes use (and their train/test partners).
SMOLTALK2_SFT_SPLITS = (
    "smoltalk_smollm3_everyday_conversations_no_think", "smoltalk_smollm3_systemchats_30k_no_think",
    "tulu_3_sft_personas_instruction_following_no_think", "hermes_function_calling_v1_no_think",
    "smoltalk_smollm3_smol_magpie_ultra_no_think", "smoltalk_multilingual_8languages_lang_5_no_think",
    "table_gpt_no_think", "OpenHermes_2.5_no_think", "OpenThoughts3_1.2M_no_think_no_think",
    "Mixture_of_Thoughts_science_no_think", "smoltalk_smollm3_explore_instruct_rewriting_no_think",
    "smoltalk_smollm3_smol_rewrite_no_think", "smoltalk_smollm3_smol_summarize_no_think",
    "LongAlign_64k_context_lang_annotated_lang_6_no_think", "multi_turn_reasoning_if_think",
    "smoltalk_everyday_convs_reasoning_Qwen3_32B_think", "smoltalk_systemchats_Qwen3_32B_think",
    "xlam_traces_no_think", "smolagents_toolcalling_traces_think", "s1k_1.1_think",
    "LongAlign_64k_Qwen3_32B_yarn_131k_think", "aya_dataset_Qwen3_32B_think",
    "smoltalk_multilingual8_Qwen3_32B_think", "OpenThoughts3_1.2M_think", "table_gpt_Qwen3_32B_think")

DATASETS: dict[str, dict[str, Any]] = {
    "HuggingFaceH4/ultrafeedback_binarized": {"layout": "flat", "configs": {"default": {
        s: ultrafeedback_rows for s in ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen",
                                        "test_gen")}}},
    "HuggingFaceH4/orca_dpo_pairs": {"layout": "flat", "configs": {"default": dict.fromkeys(_PREFS, orca_dpo_rows)}},
    "HuggingFaceH4/cai-conversation-harmless": {"layout": "flat", "configs": {"default": dict.fromkeys(
        ("test_sft", "test_prefs", "train_sft", "train_prefs"), cai_rows)}},
    "HuggingFaceH4/grok-conversation-harmless": {"layout": "flat", "configs": {"default": dict.fromkeys(
        ("test_sft", "test_prefs", "train_sft", "train_prefs"), cai_rows)}},
    "HuggingFaceH4/ultrachat_200k": _h4_sft(("train_sft", "test_sft", "train_gen", "test_gen")),
    "HuggingFaceH4/deita-10k-v0-sft": _h4_sft(("train_sft", "test_sft", "train_gen", "test_gen")),
    "HuggingFaceH4/airoboros-3.2": _h4_sft(),
    "HuggingFaceH4/Code-Feedback": _h4_sft(),
    "HuggingFaceH4/orca-math-word-problems-200k": _h4_sft(),
    "HuggingFaceH4/SystemChat": _h4_sft(system="You are a pirate. Answer as one."),
    "HuggingFaceH4/capybara": _h4_sft(),
    "HuggingFaceTB/Magpie-Pro-300K-Filtered-H4": _h4_sft(),
    "HuggingFaceTB/self-oss-instruct-sc2-H4": _h4_sft(),
    "HuggingFaceTB/OpenHermes-2.5-H4": _h4_sft(),
    "HuggingFaceTB/everyday-conversations-llama3.1-2k": _h4_sft(),
    "HuggingFaceTB/instruct-data-basics-smollm-H4": _h4_sft(),
    "HuggingFaceTB/smoltalk": {"layout": "nested", "configs": {"all": dict.fromkeys(("train", "test"),
                                                                                    smoltalk_rows)}},
    "HuggingFaceTB/smol-smoltalk": {"layout": "flat", "configs": {"default": dict.fromkeys(("train", "test"),
                                                                                           smoltalk_rows)}},
    "HuggingFaceTB/smoltalk2": {"layout": "nested", "configs": {
        "Mid": dict.fromkeys(("Llama_Nemotron_Post_Training_Dataset_reasoning_r1", "OpenThoughts3_1.2M"),
                             smoltalk2_mid_rows),
        "Preference": dict.fromkeys(("llama_3.1_tulu_3_8b_preference_mixture_no_think",
                                     "tulu_3_8b_pref_mix_Qwen3_32B_Qwen3_0.6B_think"), smoltalk2_pref_rows),
        "SFT": dict.fromkeys(SMOLTALK2_SFT_SPLITS, smoltalk2_sft_rows)}},
    "argilla/distilabel-capybara-dpo-7k-binarized": {"layout": "flat", "configs": {"default": {
        "train": capybara_dpo_rows}}},
    "argilla/dpo-mix-7k": {"layout": "flat", "configs": {"default": dict.fromkeys(("train", "test"),
                                                                                  dpo_mix_rows)}},
}


def _shard(split: str) -> str:
    return f"{split}-00000-of-00001.parquet"


def write_snapshot(root: Path, dataset_id: str, rows_per_split: int = 12, layout: str = "hub") -> Path:
    """``dataset_id``'s stand-in under ``root/<org>__<name>``, laid out as ``hf download`` leaves it; with
    ``layout="saved"``, the same rows as one ``DatasetDict.save_to_disk`` of every split (a diagnostic, to see what
    fails behind the snapshot layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = DATASETS[dataset_id]
    out = root / dataset_id.replace("/", "__")
    if layout == "saved":
        import datasets

        datasets.DatasetDict({split: datasets.Dataset.from_list(rows(rows_per_split, split))
                              for splits in spec["configs"].values() for split, rows in splits.items()}
                             ).save_to_disk(str(out))
        return out
    configs = []
    for config, splits in spec["configs"].items():
        folder = "data" if spec["layout"] == "flat" else f"data/{config}"
        files = []
        for split, rows in splits.items():
            (out / folder).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows(rows_per_split, split)), out / folder / _shard(split))
            files.append({"split": split, "path": f"{folder}/{split}-*"})
        configs.append({"config_name": config, "data_files": files})
    header = yaml.safe_dump({"configs": configs, "license": "other"}, sort_keys=False)
    (out / "README.md").write_text(f"---\n{header}---\n\n# Stand-in for {dataset_id}\n", encoding="utf-8")
    return out


# ----- recipes → local recipes ----------------------------------------------------------------------------------------
# The keys `localize` may change, and why; the test asserts nothing else differs.
CHANGED_KEYS = {
    "model_name_or_path": "a tiny random model directory",
    "dataset_name": "the local stand-in", "dataset_mixture": "ids → local stand-ins; test_split_size (a row count "
    "above the stand-in's size) → 2", "dataset_mixer": "ids → local stand-ins",
    "output_dir": "a temporary directory",
    "push_to_hub": "false (offline)", "hub_model_revision": "dropped with the push (no TRL / handbook field)",
    "attn_implementation": "flash_attention_2 → sdpa (no flash_attn, no CUDA)", "use_flash_attention_2": "false",
    "load_in_4bit": "false (no bitsandbytes / CUDA)", "load_in_8bit": "false (no bitsandbytes / CUDA)",
    "optim": "a bitsandbytes optimizer → adamw_torch, only when bitsandbytes is not installed",
    "report_to": "wandb removed (not installed; offline)",
    "max_steps": "2", "num_train_epochs": "1 (max_steps decides)", "eval_steps": "1", "logging_steps": "1",
    "save_steps": "2 when a step count", "per_device_train_batch_size": "2", "per_device_eval_batch_size": "2",
    "gradient_accumulation_steps": "at most 2",
    "max_length": "at most 1024", "max_seq_length": "at most 1024", "max_prompt_length": "at most 512",
}
# Not 256: SmolLM3's template alone (system block with metadata, instructions, tools) nears 300 tokens, and a row
# with nothing left to train on is refused. Padding goes to the longest row, so a higher cap costs nothing here.
MAX_LENGTH, MAX_PROMPT_LENGTH = 1024, 512


def dataset_ids(recipe: dict[str, Any]) -> Iterator[str]:
    """Every dataset id a recipe names (dataset_name, dataset_mixture members, the old dataset_mixer)."""
    if recipe.get("dataset_name"):
        yield recipe["dataset_name"]
    for member in (recipe.get("dataset_mixture") or {}).get("datasets", []):
        yield member["id"]
    yield from recipe.get("dataset_mixer") or {}


def _bnb_optim(name: str) -> bool:
    return bool(re.search(r"8bit|bnb|^paged_", name))


def localize(recipe: dict[str, Any], model_dir: str, data_dirs: dict[str, str], output_dir: str) -> dict[str, Any]:
    """The recipe with only the changes `CHANGED_KEYS` names (see the module docstring)."""
    out = dict(recipe)
    out["model_name_or_path"] = model_dir
    out["output_dir"] = output_dir
    if "dataset_name" in out:
        out["dataset_name"] = data_dirs[out["dataset_name"]]
    if "dataset_mixture" in out:
        mix = dict(out["dataset_mixture"])
        mix["datasets"] = [{**m, "id": data_dirs[m["id"]]} for m in mix["datasets"]]
        size = mix.get("test_split_size")
        if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
            mix["test_split_size"] = 2
        out["dataset_mixture"] = mix
    if "dataset_mixer" in out:
        out["dataset_mixer"] = {data_dirs[k]: v for k, v in out["dataset_mixer"].items()}
    # offline / CPU impossibilities
    if "push_to_hub" in out:
        out["push_to_hub"] = False
    # hub_model_id / hub_strategy / hub_private_repo stay: without push_to_hub they are inert, as in transformers.
    # hub_model_revision (pref_align_scan) names the branch to push to, and is no field of TRL's or the handbook's
    # configs at 925acdf (their parser would refuse it too): dropped with the push.
    out.pop("hub_model_revision", None)
    if out.get("attn_implementation") == "flash_attention_2":
        out["attn_implementation"] = "sdpa"
    if out.get("use_flash_attention_2"):
        out["use_flash_attention_2"] = False
    for key in ("load_in_4bit", "load_in_8bit"):
        if out.get(key):
            out[key] = False
    if _bnb_optim(str(out.get("optim", ""))) and importlib.util.find_spec("bitsandbytes") is None:
        out["optim"] = "adamw_torch"
    if isinstance(out.get("report_to"), (list, str)):
        reporters = [out["report_to"]] if isinstance(out["report_to"], str) else out["report_to"]
        kept = [r for r in reporters if r != "wandb"]
        if kept != reporters:
            out["report_to"] = kept or "none"
    # sizes for a test
    out["max_steps"] = 2
    if "num_train_epochs" in out:
        out["num_train_epochs"] = 1
    for key, value in (("eval_steps", 1), ("logging_steps", 1)):
        if key in out:
            out[key] = value
    out["logging_steps"] = 1
    if isinstance(out.get("save_steps"), int) and out["save_steps"] > 2:
        out["save_steps"] = 2
    out["per_device_train_batch_size"] = 2
    if "per_device_eval_batch_size" in out:
        out["per_device_eval_batch_size"] = 2
    if out.get("gradient_accumulation_steps", 1) > 2:
        out["gradient_accumulation_steps"] = 2
    for key, cap in (("max_length", MAX_LENGTH), ("max_seq_length", MAX_LENGTH),
                     ("max_prompt_length", MAX_PROMPT_LENGTH)):
        if isinstance(out.get(key), int) and out[key] > cap:
            out[key] = cap
    return out


def prepare(recipe_path: Path, work: Path, model_dir: str, data_root: Path, layout: str = "hub") -> tuple[Path, Path]:
    """Write ``recipe_path``'s local version under ``work``; returns (local recipe, its output_dir). Dataset
    stand-ins are written once under ``data_root``."""
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    dirs = {}
    for ds in dataset_ids(recipe):
        target = data_root / ds.replace("/", "__")
        done = (target / "README.md").exists() or (target / "dataset_dict.json").exists()
        dirs[ds] = str(target if done else write_snapshot(data_root, ds, layout=layout))
    name = recipe_id(recipe_path).replace("/", "__").removesuffix(".yaml")
    out_dir = work / name / "run"
    local = localize(recipe, model_dir, dirs, str(out_dir))
    path = work / name / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(local, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path, out_dir


# ----- running one ---------------------------------------------------------------------------------------------------
def finite_losses(run_dir: Path) -> list[float]:
    """Every loss logged in ``run_dir/metrics.jsonl`` (train and eval); the caller checks they are finite."""
    import json

    values = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        values += [float(v) for k, v in record.items() if k in ("loss", "train_loss", "eval_loss")]
    return values


def run_one(recipe_path: Path, work: Path, model_dir: str, data_root: Path, layout: str = "hub") -> tuple[bool, str]:
    """``prefalign train LOCAL_RECIPE --method M`` in this process: (ran, one line: the error or what ran)."""
    import contextlib
    import io
    import math

    from prefalign.cli import main

    local, out_dir = prepare(recipe_path, work, model_dir, data_root, layout)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(["train", str(local), "--method", recipe_method(recipe_path), "--overwrite"])
    except BaseException as e:  # a traceback is a finding too: report its last line
        if isinstance(e, KeyboardInterrupt):
            raise
        return False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:2000]
    if code != 0:
        text = err.getvalue()  # a progress bar may share the error's line: split at the error, not at newlines
        lines = ["prefalign: error" + part.split("\n")[0] for part in text.split("prefalign: error")[1:]]
        return False, (lines[-1] if lines else f"exit {code}: {text.strip().splitlines()[-1:]}")[:2000]
    losses = finite_losses(out_dir)
    if not losses or not all(math.isfinite(v) for v in losses):
        return False, f"losses not finite or none logged: {losses}"
    return True, f"{len(losses)} finite losses"
