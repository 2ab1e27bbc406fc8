"""LoRA and k-bit loading from recipe keys (TRL's ``ModelConfig`` names), and the adapter's place in a run directory.

``prefalign train`` reads ``use_peft: true`` and the ``lora_*`` keys into `LoraOptions`, builds the
``peft.LoraConfig`` TRL's ``get_peft_config`` would (task CAUSAL_LM, bias none; ``lora_target_modules`` None: PEFT's
default modules for the architecture, or ``all-linear``) and passes it to the trainer as ``peft_config``. The run
directory then holds the adapter in PEFT format (``adapter_config.json``, ``adapter_model.safetensors``); with
``merge_adapter: true`` also the merged full model in ``merged/``. DPO's reference is the adapter-disabled base.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

MERGED_DIR = "merged"


@dataclass
class LoraOptions:
    """The LoRA and quantization run keys, with TRL's names and meanings (trl.ModelConfig)."""

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of every weight."})
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (TRL's default 16)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA scaling alpha (TRL's default 32)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "Dropout on the LoRA path, in [0, 1) "
                                                                       "(TRL's default 0.05)."})
    lora_target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names to adapt, or 'all-linear'. None: PEFT's default for the "
                                        "architecture (q_proj, v_proj for Llama)."})
    lora_target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Parameter names to adapt directly (PEFT's target_parameters, e.g. MoE "
                                        "expert weights that are not nn.Linear modules), as TRL."})
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. embed_tokens, "
                                        "lm_head after chat_template: chatml added tokens)."})
    lora_task_type: str | None = field(default=None, metadata={"help": "Only CAUSAL_LM (TRL's default)."})
    use_rslora: bool | None = field(default=None, metadata={"help": "Rank-stabilised LoRA: scale alpha / sqrt(r)."})
    use_dora: bool | None = field(default=None, metadata={"help": "DoRA (weight-decomposed LoRA)."})
    merge_adapter: bool | None = field(
        default=None, metadata={"help": "Also write the adapter merged into the base weights, as a full model in "
                                        "<run>/merged/ (with the tokenizer)."})
    load_in_4bit: bool | None = field(default=None, metadata={"help": "Load the base in 4 bits (bitsandbytes, CUDA; "
                                                                        "LoRA only)."})
    load_in_8bit: bool | None = field(default=None, metadata={"help": "Load the base in 8 bits (bitsandbytes, CUDA; "
                                                                        "LoRA only)."})
    bnb_4bit_quant_type: str | None = field(default=None, metadata={"help": "'nf4' (default) or 'fp4'."})
    use_bnb_nested_quant: bool | None = field(default=None, metadata={"help": "Nested (double) 4-bit quantization."})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={"help": "Storage dtype of 4-bit weights."})

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if f.name != "use_peft" and getattr(self, f.name) not in (None, False)]
        if not self.use_peft and given:
            raise ConfigError(f"{given[0]} is set but use_peft is not true, so no adapter would be trained. Fix: add "
                              f"use_peft: true, or remove {given[0]}")
        if self.lora_r is not None and self.lora_r < 1:
            raise ConfigError(f"lora_r={self.lora_r!r} is out of range: must be an integer >= 1 (the adapter's rank).")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha={self.lora_alpha!r} is out of range: must be > 0.")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} is out of range: must be in [0, 1).")
        if self.lora_task_type not in (None, "CAUSAL_LM"):
            raise ConfigError(f"lora_task_type={self.lora_task_type!r}: prefalign trains causal LMs only. Fix: "
                              "remove it (CAUSAL_LM)")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both true. Fix: keep one of them")
        if self.bnb_4bit_quant_type not in (None, "nf4", "fp4"):
            raise ConfigError(f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r}: must be 'nf4' or 'fp4'.")

    @property
    def quantized(self) -> bool:
        return bool(self.load_in_4bit or self.load_in_8bit)


KEYS = tuple(f.name for f in fields(LoraOptions))


def lora_options(run: dict[str, Any]) -> LoraOptions:
    """The run's LoRA keys as a checked `LoraOptions` (their types were coerced by `prefalign.options`)."""
    return LoraOptions(**{k: run.get(k) for k in KEYS if run.get(k) is not None})


def lora_config(opts: LoraOptions) -> Any:
    """TRL's ``get_peft_config``: a ``peft.LoraConfig`` of the options, or None without ``use_peft``."""
    if not opts.use_peft:
        return None
    from peft import LoraConfig

    targets = opts.lora_target_modules
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]  # as TRL: ["all-linear"] means the string
    extra = {} if opts.lora_target_parameters is None else {"target_parameters": opts.lora_target_parameters}
    return LoraConfig(**extra, task_type="CAUSAL_LM", r=16 if opts.lora_r is None else opts.lora_r,
                      lora_alpha=32 if opts.lora_alpha is None else opts.lora_alpha,
                      lora_dropout=0.05 if opts.lora_dropout is None else opts.lora_dropout, bias="none",
                      target_modules=targets, modules_to_save=opts.lora_modules_to_save,
                      use_rslora=bool(opts.use_rslora), use_dora=bool(opts.use_dora))


def check_quantization(opts: LoraOptions) -> None:
    """k-bit loading needs bitsandbytes and a CUDA GPU; refuse it at start, not when the model loads."""
    if not opts.quantized:
        return
    import torch

    key = "load_in_4bit" if opts.load_in_4bit else "load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        missing = "the bitsandbytes package" if importlib.util.find_spec("bitsandbytes") is None else "a CUDA GPU"
        raise ConfigError(f"{key}: true needs bitsandbytes and a CUDA GPU, and this machine lacks {missing}. Fix: "
                          f"remove {key} (LoRA on the full-precision base works on any machine)")


def quantization_config(opts: LoraOptions, dtype: Any) -> Any:
    """TRL's ``get_quantization_config``; reached only where `check_quantization` passed (not run in this project's
    CPU-only tests)."""
    if not opts.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if opts.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_type=opts.bnb_4bit_quant_type or "nf4",
                              bnb_4bit_use_double_quant=bool(opts.use_bnb_nested_quant),
                              bnb_4bit_quant_storage=opts.bnb_4bit_quant_storage)


def save_merged(model: Any, tokenizer: Any, out: Path) -> Path:
    """Merge the trained adapter into the base weights and write a full model + tokenizer to ``out/merged``.

    Called last in a run: ``merge_and_unload`` folds the adapter into the in-memory base.
    """
    target = Path(out) / MERGED_DIR
    merged = model.merge_and_unload()
    merged.save_pretrained(str(target))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target))
    return target
