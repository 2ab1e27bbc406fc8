"""Run TRL's own trainer tests against prefalign: the repository's test files unchanged but for the import of the
classes under test, hub models and datasets replaced by local stand-ins of the same shapes; once with TRL's classes
(the baseline) and once with prefalign's. The check of issue 27, item 6.

    PYTHONPATH=src python scripts/trl_tests_check.py --trl-src /work/.mirror/huggingface+trl/repo \\
        [--files dpo,kto,sft,orpo,cpo] [-k EXPR] [--modes trl,prefalign|none] [--jobs N] [--json out.json] \\
        [--keep DIR] [--reuse earlier.json junit-trl-dpo.xml ...]

``--trl-src`` is a TRL git directory (bare or not: the tests are taken from HEAD with ``git archive``), a checkout
(its ``tests/``) or a ``tests`` folder. Nothing of TRL is kept in this repository: the files are read at run time.

What the harness adds around the copied files, and nothing else:

- a ``conftest.py`` above TRL's ``tests/`` that points ``datasets.load_dataset`` at local stand-ins of the hub
  datasets the tests name (``trl-internal-testing/zen`` in every configuration, ``toolcall``, ``harmony``), serves
  the ``trl-internal-testing/tiny-*ForCausalLM*`` models from a local Hugging Face cache (offline), skips a test that
  needs a hub id with no stand-in (vision-language models, NemotronH, gated models), gives ``lazy_shared_datadir``
  (pytest-datadir), stubs ``trl.import_utils.is_*_available`` names this TRL lacks (``False``) and the other names
  the test files import from ``trl`` that it lacks (the tests using them are skipped in both runs);
- the import rewrite: ``from trl import DPOConfig, DPOTrainer`` (and KTO, SFT, ``trl.experimental.orpo`` / ``cpo``)
  becomes ``from prefalign import ...`` in the prefalign copy; every other import stays TRL's.

The model stand-ins are 2-layer random models built from configs of the same family (``tests/tiny.py``), over the
embedded SmolLM2 tokenizer with the family's own chat template (TRL ships them in ``trl/chat_templates``) and the
template's special tokens added. Tests run as TRL's CI runs them on a CPU: ``-m "not slow"``, TRL's own skip
markers (accelerator, vllm, liger, bitsandbytes) as they are. ``--jobs 2`` runs two pytest processes at once;
``--reuse`` puts earlier runs (their ``--json``, or a work directory's ``junit-<mode>-<file>.xml``) into the report,
so the slow TRL baseline need not be rerun when only prefalign changed.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

FILES = {
    "dpo": "tests/test_dpo_trainer.py",
    "kto": "tests/test_kto_trainer.py",
    "sft": "tests/test_sft_trainer.py",
    "orpo": "tests/experimental/test_orpo_trainer.py",
    "cpo": "tests/experimental/test_cpo_trainer.py",
}
HELPERS = (
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/testing_utils.py",
    "tests/testing_constants.py",
    "tests/data",
    "tests/experimental/__init__.py",
)
UNDER_TEST = frozenset(
    {
        "DPOConfig",
        "DPOTrainer",
        "KTOConfig",
        "KTOTrainer",
        "SFTConfig",
        "SFTTrainer",
        "ORPOConfig",
        "ORPOTrainer",
        "CPOConfig",
        "CPOTrainer",
    }
)
HUB_ID = re.compile(
    r"""["']((?:trl-internal-testing|google|Qwen|stanfordnlp|kernels-community|HuggingFaceTB|"""
    r"""meta-llama)/[A-Za-z0-9_.-]+)["']"""
)


# ----- the import rewrite ---------------------------------------------------------------------------------------------
def rewrite_imports(source: str) -> str:
    """Point the module-level imports of the classes under test at prefalign; every other name stays imported from
    where it was (an import of both kinds is split in two)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []
    for node in tree.body:
        if not (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and (node.module == "trl" or node.module.startswith("trl."))
        ):
            continue
        ours = [a for a in node.names if a.name in UNDER_TEST]
        if not ours:
            continue
        rest = [a for a in node.names if a.name not in UNDER_TEST]

        def names(aliases: list[ast.alias]) -> str:
            return ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in aliases)

        new = f"from prefalign import {names(ours)}\n"
        if rest:
            new = f"from {node.module} import {names(rest)}\n" + new
        edits.append((node.lineno - 1, node.end_lineno, new))
    for start, end, new in reversed(edits):
        lines[start:end] = [new]
    return "".join(lines)


# ----- hub ids --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelId:
    hub_id: str
    cls_name: str  # e.g. Qwen2ForCausalLM
    variant: str  # e.g. "2.5", "" when none


def parse_model_id(hub_id: str) -> ModelId | None:
    """``trl-internal-testing/tiny-<Class>[-<variant>]`` → its parts; None for any other id."""
    m = re.fullmatch(r"trl-internal-testing/tiny-([A-Za-z0-9_]+?)(?:-([A-Za-z0-9_.-]+))?", hub_id)
    if not m:
        return None
    return ModelId(hub_id, m.group(1), m.group(2) or "")


def hub_ids(source: str) -> set[str]:
    """The hub ids a test source names as string literals."""
    return set(HUB_ID.findall(source))


# family: (tests/tiny.py FAMILIES key or None for a generic config, chat template file in trl/chat_templates or None)
FAMILY = {
    "Qwen2ForCausalLM": ("qwen2", "qwen2_5"),
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "qwen3"),
    "GptOssForCausalLM": ("gpt_oss", "gptoss"),
    "Cohere2ForCausalLM": ("cohere2", "cohere2"),
    "CohereForCausalLM": (None, "cohere"),
    "Olmo3ForCausalLM": ("olmo3", "qwen2_5"),
    "Lfm2ForCausalLM": ("lfm2", "lfm2"),
    "GemmaForCausalLM": ("gemma", "gemma"),
    "Gemma2ForCausalLM": ("gemma2", "gemma"),
    "LlamaForCausalLM": (None, "llama3_2"),
    "MistralForCausalLM": (None, None),
    "Phi3ForCausalLM": (None, "phi3"),
    "GPTNeoXForCausalLM": (None, None),
    "DeepseekV3ForCausalLM": (None, "deepseekv3"),
    "Glm4MoeForCausalLM": (None, "glm4moe"),
    "T5ForConditionalGeneration": (None, None),
}
VARIANT_TEMPLATE = {
    ("Lfm2ForCausalLM", "2.5"): "lfm2_2_5",
    ("LlamaForCausalLM", "3.1"): "llama3_1",
    ("LlamaForCausalLM", "3"): "llama3",
}
SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=1024,
    moe_intermediate_size=16,
    n_routed_experts=4,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_group=1,
    topk_group=1,
    rotary_dim=8,
    d_model=32,
    d_ff=64,
    d_kv=8,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
)


def standin_plan(model: ModelId) -> tuple[str | None, str | None] | None:
    """(tiny.py family or None for generic, chat template name) for a causal LM id; None when there is no
    stand-in (vision-language, seq2seq and families not listed)."""
    if model.cls_name == "RemoteForCausalLM":
        return ("qwen2", "qwen2_5")
    if model.cls_name not in FAMILY:
        return None
    family, template = FAMILY[model.cls_name]
    return family, VARIANT_TEMPLATE.get((model.cls_name, model.variant), template)


def snapshot_dir(hub_cache: Path, hub_id: str) -> Path:
    """Where the Hugging Face cache keeps ``hub_id``'s files (one fixed revision, refs/main pointing at it)."""
    repo = hub_cache / ("models--" + hub_id.replace("/", "--"))
    commit = hashlib.sha1(hub_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


# ----- building the stand-ins -----------------------------------------------------------------------------------------
def _family_tokenizer(template: str | None):
    """The SmolLM2 tokenizer with the family's chat template and its ``<|...|>`` tokens added as special tokens."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import smollm2_tokenizer

    tok = smollm2_tokenizer()
    if template:
        import trl

        text = (Path(trl.__file__).parent / "chat_templates" / f"{template}.jinja").read_text(encoding="utf-8")
        specials = sorted(set(re.findall(r"<\|[A-Za-z0-9_./-]+\|>|<\|[A-Za-z_]+\|>", text)) - set(tok.get_vocab()))
        if specials:
            tok.add_tokens(specials, special_tokens=True)
        tok.chat_template = text
    tok.pad_token = "<|endoftext|>"
    return tok


def _generic_model(cls_name: str, tok):
    import torch
    import transformers

    config_cls = getattr(transformers, cls_name).config_class
    defaults = config_cls().to_dict()
    cfg = {k: v for k, v in SMALL.items() if k in defaults}
    cfg.update(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    if defaults.get("is_encoder_decoder"):  # T5: the decoder starts from the pad token
        cfg["decoder_start_token_id"] = tok.pad_token_id
    if "layer_types" in defaults and defaults["layer_types"]:
        cfg["layer_types"] = defaults["layer_types"][:2]
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config_cls(**cfg))


REMOTE_CONFIG = """from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "remote"
"""
REMOTE_MODELING = """from transformers import Qwen2ForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
"""


def build_model(model: ModelId, hub_cache: Path) -> str | None:
    """Write the stand-in of ``model`` into the hub cache; the reason it has none, or None when built."""
    plan = standin_plan(model)
    if plan is None:
        return f"no stand-in for {model.cls_name} (a family the harness does not build: vision-language and others)"
    family, template = plan
    out = snapshot_dir(hub_cache, model.hub_id)
    if (out / "config.json").is_file():
        return None
    try:
        tok = _family_tokenizer(template)
        if family is not None:
            from tiny import tiny_family

            net = tiny_family(family, tok)
        else:
            net = _generic_model(model.cls_name, tok)
        out.mkdir(parents=True, exist_ok=True)
        net.save_pretrained(out)
        tok.save_pretrained(out)
        if model.cls_name == "RemoteForCausalLM":
            cfg = json.loads((out / "config.json").read_text())
            cfg.update(
                model_type="remote",
                architectures=["RemoteForCausalLM"],
                auto_map={
                    "AutoConfig": "configuration_remote.RemoteConfig",
                    "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
                },
            )
            (out / "config.json").write_text(json.dumps(cfg, indent=2))
            (out / "configuration_remote.py").write_text(REMOTE_CONFIG)
            (out / "modeling_remote.py").write_text(REMOTE_MODELING)
    except Exception as err:  # noqa: BLE001 - a family this transformers cannot build small is reported, not fatal
        shutil.rmtree(out, ignore_errors=True)
        return f"stand-in for {model.cls_name} could not be built: {type(err).__name__}: {str(err).splitlines()[0]}"
    return None


def _zen_lines() -> list[tuple[str, str, str]]:
    """19 (prompt, good ending, bad ending) triples in the Zen's shape: "X is better than" + " Y."."""
    things = [
        "Beautiful",
        "Explicit",
        "Simple",
        "Complex",
        "Flat",
        "Sparse",
        "Readability",
        "Practicality",
        "Errors",
        "Now",
        "Namespaces",
        "Special cases",
        "In the face of ambiguity",
        "There should be one",
        "Although never",
        "If the implementation",
        "Unless explicitly",
        "Refuse",
        "Although that way",
    ]
    good = [
        "ugly",
        "implicit",
        "complex",
        "complicated",
        "nested",
        "dense",
        "counts",
        "beats purity",
        "should never pass silently",
        "is better than never",
        "are one honking great idea",
        "aren't special",
        "refuse the temptation to guess",
        "obvious way to do it",
        "is often better than right now",
        "is hard to explain, it's a bad idea",
        "silenced",
        "the temptation to guess",
        "may not be obvious",
    ]
    bad = [
        "the moon",
        "a sandwich",
        "green",
        "seven",
        "the ocean",
        "tuesday",
        "a cat",
        "loud",
        "nothing",
        "the sky",
        "a bicycle",
        "purple",
        "the river",
        "a hat",
        "a spoon",
        "the wind",
        "bananas",
        "a drum",
        "the road",
    ]
    return [(f"{t} is better than", f" {g}.", f" {b}.") for t, g, b in zip(things, good, bad, strict=True)]


def zen_rows(config: str) -> list[dict[str, Any]]:
    """The rows of ``trl-internal-testing/zen``'s ``config`` (train then test), in TRL's dataset formats."""
    rows = []
    for i, (p, g, b) in enumerate(_zen_lines()):
        q = f"What is better than {g.strip(' .')}?" if i % 2 else f"{p}?"
        user = [{"role": "user", "content": q}]
        good = [{"role": "assistant", "content": f"{p}{g}"}]
        bad = [{"role": "assistant", "content": f"{p}{b}"}]
        rows.append(
            {
                "standard_language_modeling": {"text": f"{p}{g}"},
                "standard_prompt_only": {"prompt": p},
                "standard_prompt_completion": {"prompt": p, "completion": g},
                "standard_preference": {"prompt": p, "chosen": g, "rejected": b},
                "standard_implicit_prompt_preference": {"chosen": f"{p}{g}", "rejected": f"{p}{b}"},
                "standard_unpaired_preference": {"prompt": p, "completion": g if i % 3 else b, "label": bool(i % 3)},
                "standard_stepwise_supervision": {"prompt": p, "completions": [g, b], "labels": [True, False]},
                "conversational_language_modeling": {"messages": user + good},
                "conversational_prompt_only": {"prompt": user},
                "conversational_prompt_completion": {"prompt": user, "completion": good},
                "conversational_preference": {"prompt": user, "chosen": good, "rejected": bad},
                "conversational_implicit_prompt_preference": {"chosen": user + good, "rejected": user + bad},
                "conversational_unpaired_preference": {
                    "prompt": user,
                    "completion": good if i % 3 else bad,
                    "label": bool(i % 3),
                },
            }[config]
        )
    return rows


ZEN_CONFIGS = (
    "standard_language_modeling",
    "standard_prompt_only",
    "standard_prompt_completion",
    "standard_preference",
    "standard_implicit_prompt_preference",
    "standard_unpaired_preference",
    "standard_stepwise_supervision",
    "conversational_language_modeling",
    "conversational_prompt_only",
    "conversational_prompt_completion",
    "conversational_preference",
    "conversational_implicit_prompt_preference",
    "conversational_unpaired_preference",
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "multiply",
            "description": "Multiply two integers.",
            "parameters": {
                "type": "object",
                "required": ["a", "b"],
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            },
        },
    }
]


def toolcall_rows(config: str) -> list[dict[str, Any]]:
    """``trl-internal-testing/toolcall``: a user question, an assistant tool call (no content), the tool's answer
    and the final reply; ``tools`` as a JSON string."""
    rows = []
    for i in range(12):
        a, b = i + 2, i + 3
        user = [{"role": "user", "content": f"What is {a} times {b}?"}]
        call = {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}],
        }
        answer = [{"role": "tool", "name": "multiply", "content": str(a * b)}]
        good = [call] + answer + [{"role": "assistant", "content": f"{a} times {b} is {a * b}."}]
        bad = [{"role": "assistant", "content": f"{a} times {b} is {a * b + 1}."}]
        if config == "language_modeling":
            rows.append({"messages": user + good, "tools": json.dumps(TOOLS)})
        else:
            rows.append({"prompt": user, "chosen": good, "rejected": bad, "tools": json.dumps(TOOLS)})
    return rows


def harmony_rows(config: str) -> list[dict[str, Any]]:
    """``trl-internal-testing/harmony`` (GPT-OSS): assistant turns with a ``thinking`` field."""
    rows = []
    for p, g, b in _zen_lines():
        user = [{"role": "user", "content": f"{p}?"}]
        good = [{"role": "assistant", "thinking": "The Zen says so.", "content": f"{p}{g}"}]
        bad = [{"role": "assistant", "thinking": "A guess.", "content": f"{p}{b}"}]
        rows.append(
            {
                "language_modeling": {"messages": user + good},
                "prompt_completion": {"prompt": user, "completion": good},
                "preference": {"prompt": user, "chosen": good, "rejected": bad},
            }[config]
        )
    return rows


def build_datasets(root: Path) -> dict[str, dict[str, dict[str, str]]]:
    """Parquet files per (dataset id, config, split) under ``root``; the map of their paths."""
    import datasets

    specs = [("trl-internal-testing/zen", c, zen_rows) for c in ZEN_CONFIGS]
    specs += [("trl-internal-testing/toolcall", c, toolcall_rows) for c in ("language_modeling", "preference")]
    specs += [
        ("trl-internal-testing/harmony", c, harmony_rows)
        for c in ("language_modeling", "prompt_completion", "preference")
    ]
    out: dict[str, dict[str, dict[str, str]]] = {}
    for hub_id, config, make in specs:
        rows = make(config)
        splits = {"train": rows[:-2], "test": rows[-2:]}
        for split, part in splits.items():
            path = root / hub_id / config / f"{split}.parquet"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                datasets.Dataset.from_list(part).to_parquet(str(path))
            out.setdefault(hub_id, {}).setdefault(config, {})[split] = str(path)
    return out


# ----- what runs inside pytest (imported by the conftest the harness writes) ------------------------------------------
_MANIFEST: dict[str, Any] = {}


def install(manifest_path: str) -> None:
    """Patch this pytest process: datasets' loader to the local stand-ins, TRL's missing availability checks."""
    import datasets

    _MANIFEST.update(json.loads(Path(manifest_path).read_text()))
    original = datasets.load_dataset

    def load_dataset(path: str, name: str | None = None, *args: Any, **kwargs: Any):
        local = _MANIFEST["datasets"].get(path)
        if local is None:
            return original(path, name, *args, **kwargs)
        configs = local
        if name is None:
            name = "default" if "default" in configs else next(iter(configs))
        if name not in configs:
            raise ValueError(f"stand-in of {path} has no config {name!r}: {sorted(configs)}")
        kwargs.pop("data_files", None)
        return original("parquet", *args, data_files=configs[name], **kwargs)

    datasets.load_dataset = load_dataset
    import trl.import_utils as iu

    for missing in _MANIFEST.get("stub_availability", []):
        if not hasattr(iu, missing):
            setattr(iu, missing, lambda: False)
    import importlib

    for module_name, names in _MANIFEST.get("missing_trl_names", {}).items():
        module = importlib.import_module(module_name)
        for name in names:
            if not hasattr(module, name):
                setattr(module, name, _Missing(f"{module_name}.{name}"))


class _Missing:
    """Stands for a name the test file imports from TRL that the installed TRL lacks; tests using it are skipped."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.qualname} is not in the installed TRL")


def unmapped(ids: set[str]) -> list[str]:
    known = set(_MANIFEST.get("models", {})) | set(_MANIFEST.get("datasets", {}))
    return sorted(i for i in ids if i not in known)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Skip, before running, a test whose source or parameters name a hub id that has no local stand-in."""
    import inspect

    import pytest

    cache: dict[Any, set[str]] = {}
    cache_src: dict[Any, str] = {}
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None:
            continue
        if fn not in cache:
            try:
                cache[fn] = hub_ids(inspect.getsource(fn))
            except (OSError, TypeError):
                cache[fn] = set()
        ids = set(cache[fn])
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            # the literals of a parametrize list are alternatives: keep only the values this item runs with
            for mark in item.iter_markers("parametrize"):
                ids -= hub_ids(repr(mark.args[1] if len(mark.args) > 1 else ""))
            ids |= {v for v in callspec.params.values() if isinstance(v, str) and HUB_ID.fullmatch(repr(v))}
        missing = unmapped(ids)
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"no local stand-in for {missing[0]}"))
            continue
        names = {n for ns in _MANIFEST.get("missing_trl_names", {}).values() for n in ns}
        used = sorted(n for n in names if re.search(rf"\b{re.escape(n)}\b", _source(fn, cache_src)))
        if used:
            item.add_marker(pytest.mark.skip(reason=f"uses {used[0]}, which the installed TRL does not have"))


def _source(fn: Any, cache: dict[Any, str]) -> str:
    import inspect

    if fn not in cache:
        try:
            cache[fn] = inspect.getsource(fn)
        except (OSError, TypeError):
            cache[fn] = ""
    return cache[fn]


CONFTEST = '''"""Written by prefalign's scripts/trl_tests_check.py: local stand-ins for the hub, nothing else."""
import importlib.util
import pathlib
import sys

import pytest

_spec = importlib.util.spec_from_file_location("trl_tests_check", {script!r})
_harness = importlib.util.module_from_spec(_spec)
sys.modules["trl_tests_check"] = _harness
_spec.loader.exec_module(_harness)
_harness.install({manifest!r})
pytest_collection_modifyitems = _harness.pytest_collection_modifyitems


@pytest.fixture
def lazy_shared_datadir():
    return pathlib.Path(__file__).parent / "tests" / "data"
'''
PYTEST_INI = """[pytest]
markers =
    slow: TRL's slow tests
filterwarnings =
    ignore::DeprecationWarning
    ignore::FutureWarning
"""


# ----- the driver -----------------------------------------------------------------------------------------------------
def extract_tests(src: Path, dest: Path) -> None:
    """TRL's ``tests/`` from a git directory (HEAD), a checkout or a tests folder into ``dest/tests``."""
    dest.mkdir(parents=True, exist_ok=True)
    if (src / "objects").is_dir() and (src / "HEAD").is_file():
        archive = subprocess.run(
            ["git", f"--git-dir={src}", "archive", "HEAD", "tests"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "x", "-C", str(dest)], input=archive, check=True)
        return
    tests = src / "tests" if (src / "tests" / "testing_utils.py").is_file() else src
    if not (tests / "testing_utils.py").is_file():
        raise SystemExit(
            f"error: {src} is neither a TRL git directory, a checkout nor its tests folder "
            "(no testing_utils.py). Fix: pass e.g. --trl-src /work/.mirror/huggingface+trl/repo"
        )
    shutil.copytree(tests, dest / "tests")


def prepare_copy(tests_src: Path, dest: Path, files: list[str], prefalign: bool, script: Path, manifest: Path) -> None:
    """One runnable copy: the helpers and the chosen test files, imports rewritten when ``prefalign``."""
    for rel in HELPERS + tuple(FILES[f] for f in files):
        src = tests_src / rel
        if not src.exists():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        elif prefalign and rel in FILES.values():
            target.write_text(rewrite_imports(src.read_text()))
        else:
            shutil.copy2(src, target)
    (dest / "conftest.py").write_text(CONFTEST.format(script=str(script), manifest=str(manifest)))
    (dest / "pytest.ini").write_text(PYTEST_INI)


def missing_trl_names(tests_src: Path, files: list[str]) -> dict[str, list[str]]:
    """Names the chosen test files import at module level from ``trl.*`` that this TRL lacks (the tests come from a
    newer or older TRL than the one installed): module → names. The harness stubs them and skips the tests that use
    them, so one missing helper does not stop a whole file from being collected."""
    import importlib

    out: dict[str, list[str]] = {}
    for f in files:
        path = tests_src / FILES[f]
        if not path.is_file():
            continue
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("trl")):
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                continue
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            if missing:
                out.setdefault(node.module, []).extend(sorted(set(missing) - set(out.get(node.module, []))))
    return out


def missing_availability(tests_src: Path) -> list[str]:
    """``is_*_available`` names the helpers import from ``trl.import_utils`` that this TRL does not have."""
    import trl.import_utils as iu

    names = []
    for rel in ("tests/testing_utils.py", "tests/conftest.py"):
        path = tests_src / rel
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "trl.import_utils":
                names += [a.name for a in node.names if a.name.startswith("is_") and not hasattr(iu, a.name)]
    return sorted(set(names))


@dataclass
class Outcome:
    status: str  # passed, failed, skipped
    reason: str = ""
    seconds: float = 0.0


@dataclass
class FileRun:
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes.values())


def one_line(text: str, width: int = 160) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def parse_junit(path: Path) -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    if not path.is_file():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        seconds = float(case.get("time") or 0)
        status, reason = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
                reason = child.get("message") or next(iter((child.text or "").strip().splitlines()[-1:]), "")
                break
            if child.tag == "skipped":
                status, reason = "skipped", child.get("message") or ""
        if status == "passed" and test_id in out and out[test_id].status == "failed":
            continue  # a teardown error reported as a second case
        out[test_id] = Outcome(status, one_line(reason), seconds)
    return out


def run_file(copy: Path, rel: str, env: dict[str, str], k: str | None, junit: Path) -> FileRun:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-m",
        "not slow",
        "-rN",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit1",
        rel,
    ]
    if k:
        cmd += ["-k", k]
    start = time.perf_counter()
    log = junit.with_suffix(".log")  # pytest's own lines, one per test (-v), to follow a long run
    with log.open("w") as out:
        subprocess.run(cmd + ["-v"], cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    run = FileRun(parse_junit(junit), time.perf_counter() - start)
    if not run.outcomes:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        run.note = one_line(" | ".join(tail), 300)
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trl-src", type=Path, required=True, help="TRL git directory, checkout or tests folder")
    p.add_argument("--files", default="dpo,kto,sft,orpo,cpo", help="comma-separated subset of " + ",".join(FILES))
    p.add_argument("-k", default=None, help="pytest -k expression, passed on")
    p.add_argument(
        "--modes",
        default="trl,prefalign",
        help="trl (baseline), prefalign, both (default), or none (only report the --reuse runs)",
    )
    p.add_argument("--json", type=Path, help="write the per-test outcomes and counts here")
    p.add_argument("--jobs", type=int, default=1, help="pytest processes at once (each with one torch thread)")
    p.add_argument("--keep", type=Path, help="work directory to keep and reuse (stand-ins are built once)")
    p.add_argument(
        "--reuse",
        type=Path,
        nargs="*",
        default=[],
        metavar="JSON",
        help="earlier --json outputs whose (mode, file) runs fill in what this run does not run (e.g. "
        "the TRL baseline, which changes only with TRL)",
    )
    args = p.parse_args()
    files = [f.strip() for f in args.files.split(",") if f.strip()]
    bad = [f for f in files if f not in FILES]
    modes = [m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "none"]
    if bad or not files or any(m not in ("trl", "prefalign") for m in modes) or not (modes or args.reuse):
        print(
            f"error: --files takes {','.join(FILES)} and --modes trl,prefalign (got {args.files!r}, {args.modes!r})",
            file=sys.stderr,
        )
        return 2
    if not modes:  # --modes none: only the report of the --reuse runs
        import trl

        report(load_runs(args.reuse), files, trl.__version__, args.json, [])
        return 0
    tmp = tempfile.TemporaryDirectory(prefix="trl-tests-")
    work = args.keep.resolve() if args.keep else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    import trl

    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    extract_tests(args.trl_src.resolve(), src)
    sources = "".join((src / FILES[f]).read_text() for f in files if (src / FILES[f]).is_file())
    missing_files = [FILES[f] for f in files if not (src / FILES[f]).is_file()]

    start = time.perf_counter()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hub_cache = work / "hub"
    models: dict[str, str] = {}
    no_standin: dict[str, str] = {}
    for hub_id in sorted(hub_ids(sources)):
        parsed = parse_model_id(hub_id)
        if parsed is None:
            continue
        why = build_model(parsed, hub_cache)
        if why is None:
            models[hub_id] = str(snapshot_dir(hub_cache, hub_id))
        else:
            no_standin[hub_id] = why
    data = build_datasets(work / "datasets")
    manifest = work / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "models": models,
                "datasets": data,
                "stub_availability": missing_availability(src),
                "missing_trl_names": missing_trl_names(src, list(FILES)),
            },
            indent=1,
        )
    )
    print(
        f"stand-ins: {len(models)} models, {len(data)} datasets in {time.perf_counter() - start:.0f} s; "
        f"no stand-in: {', '.join(sorted(no_standin)) or '-'}",
        flush=True,
    )

    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_CACHE=str(hub_cache),
        HF_HOME=str(work / "hf-home"),
        HF_DATASETS_CACHE=str(work / "hf-datasets-cache"),
        WANDB_DISABLED="true",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [x for x in [env.get("PYTHONPATH")] if x])
    script = Path(__file__).resolve()
    results: dict[str, dict[str, FileRun]] = {m: {} for m in modes}
    for mode in modes:
        copy = work / mode
        if copy.exists():
            shutil.rmtree(copy)
        prepare_copy(src, copy, files, mode == "prefalign", script, manifest)
    if args.jobs > 1:  # pytest processes side by side, one torch thread each
        env.setdefault("OMP_NUM_THREADS", "1")
    jobs = [(m, f) for f in files for m in modes if FILES[f] not in missing_files]

    def one(job: tuple[str, str]) -> tuple[str, str, FileRun]:
        mode, f = job
        run = run_file(work / mode, FILES[f], env, args.k, work / f"junit-{mode}-{f}.xml")
        print(
            f"{mode:9s} {f:4s} passed {run.count('passed'):3d} failed {run.count('failed'):3d} "
            f"skipped {run.count('skipped'):3d} ({run.seconds:.0f} s){'  ' + run.note if run.note else ''}",
            flush=True,
        )
        return mode, f, run

    with concurrent.futures.ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        for mode, f, run in pool.map(one, jobs):
            results[mode][f] = run
    for mode, runs in load_runs(args.reuse).items():
        for f, run in runs.items():
            if f in files:
                results.setdefault(mode, {}).setdefault(f, run)
    report(results, files, trl.__version__, args.json, missing_files)
    tmp.cleanup()
    return 0


def load_runs(paths: list[Path]) -> dict[str, dict[str, FileRun]]:
    """(mode → file → FileRun) from earlier --json outputs or ``junit-<mode>-<file>.xml`` files of a work directory,
    merged test by test (a later one wins for a test both have), so a file's run may be put together from parts
    (e.g. a -k rerun)."""
    out: dict[str, dict[str, FileRun]] = {}

    def merge(mode: str, f: str, run: FileRun) -> None:
        have = out.setdefault(mode, {}).setdefault(f, FileRun())
        whole = set(run.outcomes) >= set(have.outcomes)  # a rerun of the whole file replaces its time too
        have.outcomes.update(run.outcomes)
        have.seconds = run.seconds if whole else have.seconds + run.seconds
        have.note = run.note or have.note

    for path in paths:
        if path.suffix == ".xml":
            _, mode, f = path.stem.split("-", 2)
            merge(mode, f, FileRun(parse_junit(path), 0.0))
            continue
        for mode, runs in json.loads(path.read_text())["runs"].items():
            for f, r in runs.items():
                merge(
                    mode, f, FileRun({t: Outcome(**o) for t, o in r["tests"].items()}, r["seconds"], r.get("note", ""))
                )
    return out


def report(
    results: dict[str, dict[str, FileRun]],
    files: list[str],
    trl_version: str,
    json_path: Path | None,
    missing_files: list[str],
) -> None:
    modes = sorted(results, key=lambda m: m != "trl")  # the baseline first
    print(f"\nTRL {trl_version} tests at the given source; per file, passed / failed / skipped:\n")
    print("| file | " + " | ".join(f"{m} passed | failed | skipped | s" for m in modes) + " |")
    print("|---|" + "---|---|---|---|" * len(modes))
    totals = {m: [0, 0, 0, 0.0] for m in modes}
    for f in files:
        cells = []
        for m in modes:
            run = results[m].get(f)
            if run is None:
                cells.append("- | - | - | -")
                continue
            c = [run.count("passed"), run.count("failed"), run.count("skipped"), run.seconds]
            totals[m] = [a + b for a, b in zip(totals[m], c, strict=True)]
            cells.append(f"{c[0]} | {c[1]} | {c[2]} | {c[3]:.0f}")
        print(f"| {f} | " + " | ".join(cells) + " |")
    print("| all | " + " | ".join(f"{t[0]} | {t[1]} | {t[2]} | {t[3]:.0f}" for t in totals.values()) + " |")
    regressions = []
    if "trl" in results and "prefalign" in results:
        for f in files:
            base, ours = results["trl"].get(f), results["prefalign"].get(f)
            if base is None or ours is None:
                continue
            for test_id, o in ours.outcomes.items():
                b = base.outcomes.get(test_id)
                if b is not None and b.status == "passed" and o.status != "passed":
                    regressions.append((test_id, o.status, o.reason))
        ran = sum(1 for f in files for o in results["trl"].get(f, FileRun()).outcomes.values() if o.status != "skipped")
        print(f"\n{len(regressions)} tests pass under TRL and not under prefalign; {ran} ran (not skipped) under TRL:")
        for test_id, status, reason in sorted(regressions):
            print(f"  {status:7s} {test_id}: {reason}")
    if missing_files:
        print(f"\nnot in this TRL source: {', '.join(missing_files)}")
    if json_path:
        payload = {
            "trl_version": trl_version,
            "files": files,
            "runs": {
                m: {
                    f: {
                        "seconds": r.seconds,
                        "note": r.note,
                        "counts": {s: r.count(s) for s in ("passed", "failed", "skipped")},
                        "tests": {t: vars(o) for t, o in r.outcomes.items()},
                    }
                    for f, r in results[m].items()
                }
                for m in modes
            },
            "regressions": [{"test": t, "status": s, "reason": r} for t, s, r in regressions],
        }
        json_path.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    sys.exit(main())
