"""Configs: every option's one documented home.

``DPOConfig`` and ``ORPOConfig`` extend `transformers.TrainingArguments`, so batch size, learning rate,
gradient accumulation, checkpoints, ``report_to`` and distributed settings work as in any Trainer. Field names
follow TRL where TRL has the option, so switching is a change of import.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .errors import ConfigError
from .losses import DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES

logger = logging.getLogger("prefalign")


def _check(cond: bool, name: str, value: Any, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r} is out of range: {rule}.")


@dataclass
class TrainConfig(TrainingArguments):
    """Options every prefalign trainer shares (SFT and the preference methods): data handling, model loading, the
    speed boundary.

    Defaults that differ from `TrainingArguments`: ``learning_rate`` 1e-6 and ``logging_steps`` 10 (as TRL).
    Unlike TRL, bf16 and gradient checkpointing stay off unless asked for, so CPU runs are exact fp32.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log metrics every N optimizer steps."})
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Max tokens of prompt + reply. Replies are cut from the right to fit and counted; a prompt "
                          "that leaves no room for a reply is an error (see max_prompt_length). None: no limit."})
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Cut prompts longer than this, keeping their end (the part nearest the reply); counted "
                          "and reported. None: prompts are never cut."})
    chat_template_for_text: bool = field(
        default=True,
        metadata={"help": "Plain-text rows are wrapped as a user turn and assistant replies and rendered with the "
                          "tokenizer's chat template, when it has one. False: tokenize the text as is and append EOS "
                          "to replies (TRL's behaviour for text rows)."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "The chat format, set on the tokenizer before any data is tokenised and saved with the run: "
                          "None: the tokenizer's own; 'chatml': ChatML for a model without a template (its special "
                          "tokens added, the embeddings resized, <|im_end|> as EOS and padding; "
                          "prefalign.setup_chat_format); a Jinja string (it contains '{%' or '{{'; replaces the "
                          "tokenizer's template, as alignment-handbook's chat_template); a path to a .jinja / "
                          ".j2 / .txt file holding one; or a model directory / hub id (its tokenizer's template)."})
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "TRL's name for the file form of chat_template (a .jinja / .j2 / .txt file), or a model "
                          "directory / hub id whose tokenizer's template, added tokens and EOS to take (TRL's "
                          "clone_chat_template; embeddings resized); sets chat_template."})
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for the chat template (TRL's name), e.g. {enable_thinking: false}: "
                          "passed to every apply_chat_template that renders this run's data (training, evaluation, "
                          "generation). A row's own chat_template_kwargs column is merged over them. A JSON object "
                          "string is read as one."})
    on_invalid_row: str = field(
        default="error",
        metadata={"help": "A row that cannot be trained on (unreadable, a missing or wrongly typed field, chosen == "
                          "rejected, HH-RLHF transcripts that differ before their last reply, a prompt leaving no "
                          "room under max_length): 'error' stops with one line naming it; 'skip' leaves it out, "
                          "counts it and lists it (row, field, reason) in the run's data_report.json.",
                  "choices": ["error", "skip"]})
    text_format: str = field(
        default="auto",
        metadata={"help": "'auto': text in Anthropic HH-RLHF's dialogue form (\\n\\nHuman: ... \\n\\nAssistant: "
                          "...) becomes a conversation: the turns before the last assistant reply are the prompt "
                          "messages, each reply one assistant message. 'raw': keep such text as it is (base models, "
                          "the DPO paper's setup).", "choices": ["auto", "raw"]})
    pairing: str = field(
        default="best_worst",
        metadata={"help": "How scored completions (UltraFeedback's completions + overall_score, Argilla's generations "
                          "+ ratings, completions: [{text, score}]) become pairs: 'best_worst' (highest vs lowest "
                          "score), 'best_random' (highest vs a random lower one, seeded), 'all_pairs' (every two "
                          "whose scores differ). Ties are skipped and counted.",
                  "choices": ["best_worst", "best_random", "all_pairs"]})
    min_score_margin: float = field(
        default=0.0,
        metadata={"help": "Keep a scored pair only when chosen's score exceeds rejected's by at least this much "
                          "(also filters binarized rows with score_chosen / score_rejected); the rest are counted "
                          "in data_report.json."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn off dropout in the policy and reference."})
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Keyword arguments for AutoModelForCausalLM.from_pretrained when the model is given by "
                          "name, e.g. {'dtype': 'bfloat16', 'attn_implementation': 'sdpa'}."})
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "What max_length keeps of a sequence that is too long (TRL's option; counted either way): "
                          "'keep_start' cuts replies (SFT: the sequence) from the right; 'keep_end' cuts the start "
                          "instead, keeping what is nearest the end of the reply (pairs: the shared prompt loses its "
                          "start until prompt + the longer reply fits, one prompt token always kept; a reply longer "
                          "than that loses its start too). TRL 1.16 deprecates 'keep_end'.",
                  "choices": ["keep_start", "keep_end"]})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model repository's own code when a model or tokenizer is loaded by name (TRL's "
                          "field; model_init_kwargs' trust_remote_code wins when both are given)."})
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "TRL's worker count for dataset preparation. Accepted with one log line: prefalign "
                          "validates and tokenises in this process, once, by source row."})
    padding_free: bool = field(
        default=False,
        metadata={"help": "TRL's padding-free batches (sequences flattened into one row). True sets packing: "
                          "prefalign's padding-free layout is prefix sharing plus packing (examples in shared rows, "
                          "masked from each other; one row of spans for SFT on CPU), with one log line. False "
                          "changes nothing."})
    pad_to_multiple_of: int | str | None = field(
        default=None,
        metadata={"help": "Pad batch length to a multiple of this. 'auto' (TRL 1.16's default): 128 on Neuron "
                          "(AWS Trainium), which compiles once per shape; no padding elsewhere."})
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Set as the tokenizer's padding token before tokenizing (as TRL; it must be in the "
                          "vocabulary). None: the tokenizer's own, else its EOS token. Padding never enters a loss."})
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "TRL 1.16's weight of a Mixture-of-Experts model's router load-balancing loss, added to "
                          "the loss as coef * aux_loss and logged as aux_loss (prefalign.router). None: the model "
                          "config's own router_aux_loss_coef; 0: off. A non-zero value is refused for a model without "
                          "router logits (as TRL 1.16)."})
    activation_offloading: bool = field(
        default=False,
        metadata={"help": "Keep the activations saved for backward in CPU memory (torch.autograd.graph.save_on_cpu) "
                          "while training on a GPU. On CPU they already live in host memory: nothing to offload "
                          "(one log line)."})
    on_nonfinite: str = field(
        default="stop",
        metadata={"help": "What a NaN or inf loss or gradient does: 'stop' ends training with an error naming the "
                          "step (checkpoints already written are kept; none is written after it), 'skip' drops that "
                          "optimizer step's gradients, counts it, and goes on; 'ignore' checks nothing and steps "
                          "on them (TRL's behaviour: the weights may become NaN).",
                  "choices": ["stop", "skip", "ignore"]})
    fast_path: bool = field(
        default=True,
        metadata={"help": "The speed boundary (prefalign/speed): fused, chunked LM head on reply positions only, lean "
                          "activations, grouped K/V heads, the CPU allocator policy, all switched on for train() / "
                          "evaluate() and undone after. False: the plain path (full logits, gather, mask; stock "
                          "modules; nothing switched on), the oracle the fast path is tested against: same numbers, "
                          "slower. For debugging."})
    packing: bool = field(
        default=True,
        metadata={"help": "With prefix_sharing: shorter pairs share a row (first-fit decreasing into rows no longer "
                          "than the batch's longest pair, a block-diagonal mask between them), so mixed-length "
                          "batches need fewer rows and less padding. Never makes a row longer; same log-probs."})
    lean_activations: bool = field(
        default=True,
        metadata={"help": "Llama-family MLPs and RMSNorms of the trained model keep fewer activations for backward "
                          "(gate and up instead of four intermediate-size tensors; the input instead of two "
                          "hidden-size ones; norm outputs saved by the projections they feed are rebuilt in "
                          "backward) and recompute the rest elementwise: 0.66 GB fewer saved bytes for SmolLM2-135M "
                          "with 4 pairs of 260 tokens, same values and gradients (prefalign/speed/layers.py; undone "
                          "when train() / evaluate() return)."})
    cpu_allocator_cache: bool = field(
        default=False,
        metadata={"help": "On CPU under glibc (Linux): keep freed memory in the process instead of returning it to "
                          "the kernel, so every step reuses the previous step's buffers rather than page-faulting "
                          "them again (measured: 5.7-5.9 instead of 5.9-6.4 s per long ORPO step). Process-wide and "
                          "for the life of the process (glibc cannot undo it exactly), so the library does it only "
                          "when asked; the prefalign command asks (its default is true). See "
                          "prefalign/speed/allocator.py."})
    release_cpu_memory_every: int = field(
        default=0,
        metadata={"help": "When training on CPU under glibc (Linux): every N decoder layers, in training forward "
                          "and backward (not in evaluation or generation), return the heap's free pages to the "
                          "kernel, so peak RSS follows the memory in use instead of the heap's high-water mark "
                          "(benchmark, long DPO: peak RSS 3.40 -> 2.90 GB with N=1, step time +16%). 0: never "
                          "(fastest). For the least memory combine N=1 with gradient_checkpointing and a small "
                          "logprob_chunk_rows; see README 'Memory'."})
    logprob_chunk_rows: int | None = field(
        default=None,
        metadata={"help": "Positions per LM-head chunk when computing log-probs: at most this many rows of "
                          "vocabulary-wide logits exist at once (memory vs. speed). Default: as many as fit in "
                          "256 MiB of float32 logits (1365 rows for a 49k vocabulary). When a batch's positions fit "
                          "in one chunk, backward reuses forward's softmax instead of recomputing it."})

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
        if self.max_length is not None:
            _check(self.max_length >= 2, "max_length", self.max_length, "must be >= 2 (a prompt token and a reply "
                                                                         "token)")
        if self.max_prompt_length is not None:
            _check(self.max_prompt_length >= 1, "max_prompt_length", self.max_prompt_length, "must be >= 1")
            if self.max_length is not None:
                _check(self.max_prompt_length < self.max_length, "max_prompt_length", self.max_prompt_length,
                       f"must be < max_length ({self.max_length})")
        _check(self.logprob_chunk_rows is None or self.logprob_chunk_rows >= 1, "logprob_chunk_rows",
               self.logprob_chunk_rows, "must be >= 1")
        _check(self.release_cpu_memory_every >= 0, "release_cpu_memory_every", self.release_cpu_memory_every,
               "must be >= 0 (0 = never)")
        _check(self.on_nonfinite in ("stop", "skip", "ignore"), "on_nonfinite", self.on_nonfinite,
               "must be 'stop', 'skip' or 'ignore'")
        _check(self.on_invalid_row in ("error", "skip"), "on_invalid_row", self.on_invalid_row,
               "must be 'error' or 'skip'")
        _check(self.text_format in ("auto", "raw"), "text_format", self.text_format, "must be 'auto' or 'raw'")
        _check(self.pairing in ("best_worst", "best_random", "all_pairs"), "pairing", self.pairing,
               "must be 'best_worst', 'best_random' or 'all_pairs'")
        _check(self.min_score_margin >= 0, "min_score_margin", self.min_score_margin, "must be >= 0")
        if self.dataset_num_proc is not None:
            logger.info("dataset_num_proc=%s is accepted; prefalign validates and tokenises in this process, once",
                        self.dataset_num_proc)
        if self.padding_free:
            logger.info("padding_free: true is read as packing: true (prefalign's padding-free layout)")
            self.packing = True
        if self.chat_template_path is not None:
            if self.chat_template not in (None, self.chat_template_path):
                raise ConfigError("chat_template and chat_template_path are both given; chat_template_path is TRL's "
                                  "name for its file form. Fix: keep one of them")
            self.chat_template = self.chat_template_path
        if isinstance(self.chat_template_kwargs, str):
            try:
                self.chat_template_kwargs = json.loads(self.chat_template_kwargs)
            except ValueError:
                pass  # refused just below, as any other non-mapping
        _check(self.chat_template_kwargs is None or isinstance(self.chat_template_kwargs, dict),
               "chat_template_kwargs", self.chat_template_kwargs,
               "must be a mapping of keyword arguments, e.g. {enable_thinking: false}")
        if self.chat_template is not None:
            from .chat_format import check_chat_template_option

            check_chat_template_option(self.chat_template)
        _check(self.truncation_mode in ("keep_start", "keep_end"), "truncation_mode", self.truncation_mode,
               "must be 'keep_start' or 'keep_end'")
        if self.use_liger_kernel:
            logger.info("use_liger_kernel: true is accepted; prefalign's own fused, chunked LM head (fast_path) does "
                        "the work Liger's kernels would (log-probs without full logits), so Liger is not loaded")
            self.use_liger_kernel = False  # the Trainer would otherwise patch the model with Liger's kernels
        self._selective_checkpointing = _selective_option(self)
        super().__post_init__()
        if isinstance(self.pad_to_multiple_of, str):
            value = self.pad_to_multiple_of.strip().lower()
            if value == "auto":  # TRL 1.16: Neuron compiles once per shape, so bound the shapes; elsewhere no padding
                self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None
            elif value in ("none", "null"):
                self.pad_to_multiple_of = None
            elif value.isdigit():
                self.pad_to_multiple_of = int(value)
            else:
                raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} is out of range: must be an "
                                  "integer >= 1, 'auto' or none.")
        if self.pad_to_multiple_of is not None:
            _check(isinstance(self.pad_to_multiple_of, int) and self.pad_to_multiple_of >= 1, "pad_to_multiple_of",
                   self.pad_to_multiple_of, "must be an integer >= 1, 'auto' or none")
        if self.activation_offloading and self.device.type == "cpu":
            logger.info("activation_offloading: true on CPU: the activations already live in CPU memory, so nothing "
                        "is offloaded")


def _selective_option(config: TrainingArguments) -> bool:
    """TRL 1.16's ``gradient_checkpointing_kwargs: {selective: true}`` (selective activation checkpointing: save
    the attention outputs, recompute the rest): checked, and taken out of the kwargs torch's checkpoint receives
    (prefalign.memory applies it)."""
    selective, reentrant = False, False
    for name in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):  # TRL's name, transformers 5's
        kwargs = getattr(config, name)
        if isinstance(kwargs, dict) and "selective" in kwargs:
            kwargs = dict(kwargs)
            selective = bool(kwargs.pop("selective")) or selective
            reentrant = bool(kwargs.get("use_reentrant")) or reentrant
            setattr(config, name, kwargs or None)
    if selective and not (config.gradient_checkpointing or config.activation_checkpointing):
        raise ConfigError("gradient_checkpointing_kwargs.selective: true needs gradient_checkpointing: true (it "
                          "chooses what checkpointing keeps). Fix: add gradient_checkpointing: true, or drop selective")
    if selective and reentrant:
        raise ConfigError("gradient_checkpointing_kwargs.selective: true needs non-reentrant checkpointing. Fix: set "
                          "use_reentrant: false, or leave it unset")
    return selective


@dataclass
class PreferenceConfig(TrainConfig):
    """Options shared by the preference trainers: how pairs are laid out in a batch."""

    prefix_sharing: bool = field(
        default=True,
        metadata={"help": "One row per pair, [prompt | chosen | rejected], with a 4-D attention mask so the prompt is "
                          "computed once. Used with attn_implementation 'sdpa', 'eager' or 'flex_attention' (a "
                          "BlockMask); flash-attention kernels take no mask and fall back to padded pairs. Same "
                          "log-probs either way."})


@dataclass
class ReferenceConfig(PreferenceConfig):
    """Options of the methods with a reference model (DPO, KTO): the moving reference of TR-DPO."""

    sync_ref_model: bool = field(
        default=False,
        metadata={"help": "TR-DPO (Gorbatovski et al. 2024), for DPO and KTO: every ref_model_sync_steps optimizer "
                          "steps the reference becomes ref_model_mixup_alpha * policy + (1 - alpha) * reference. The "
                          "reference then changes, so it is held in memory and run live (precompute_ref_log_probs is "
                          "turned off). Not with PEFT (its reference is the adapter-disabled policy)."})
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "TR-DPO's alpha in [0, 1]: the policy's share of the synced reference."})
    ref_model_sync_steps: int = field(
        default=512, metadata={"help": "TR-DPO: optimizer steps between reference updates."})
    precompute_ref_log_probs: bool | None = field(default=None, metadata={"help": "See DPOConfig / KTOConfig."})

    def __post_init__(self) -> None:
        _check(0.0 <= self.ref_model_mixup_alpha <= 1.0, "ref_model_mixup_alpha", self.ref_model_mixup_alpha,
               "must be in [0, 1]")
        _check(self.ref_model_sync_steps >= 1, "ref_model_sync_steps", self.ref_model_sync_steps, "must be >= 1")
        if self.sync_ref_model:
            self.precompute_ref_log_probs = False  # the reference changes during training: nothing to cache
        super().__post_init__()


@dataclass
class DPOConfig(ReferenceConfig):
    """Direct Preference Optimization (Rafailov et al. 2023). See `prefalign.losses.dpo_loss` for the equations."""

    beta: float = field(
        default=0.1,
        metadata={"help": "Strength of the KL pull towards the reference model: higher beta, smaller deviation. For "
                          "loss_type 'ipo' it is the paper's tau."})
    loss_type: list[str] | str = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"One or more of {', '.join(DPO_LOSS_TYPES)}; several are summed with loss_weights."})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "Weights for several loss types."})
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Assumed probability that a preference label is flipped, in [0, 0.5): conservative DPO for "
                          "'sigmoid' (TRL's sigmoid ignores it), the flip rate of 'robust', EXO's epsilon for "
                          "'exo_pair' (must be > 0; the paper suggests 1e-3), the smoothing of 'aot' / "
                          "'aot_unpaired'."})
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={"help": "f-divergence regulariser (f-DPO): 'reverse_kl' (standard DPO), 'forward_kl', "
                          "'js_divergence', 'alpha_divergence'. Only for loss types built on the chosen - rejected "
                          "score difference: sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft.",
                  "choices": ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]})
    ld_alpha: float | None = field(
        default=None,
        metadata={"help": "LD-DPO (Liu et al. 2024): reply log-probs count the first min(|chosen|, |rejected|) "
                          "tokens in full and the rest times ld_alpha, in [0, 1], against verbosity. None: plain "
                          "sums (1.0 is the same)."})
    f_alpha_divergence_coef: float = field(
        default=0.5, metadata={"help": "alpha of f_divergence_type 'alpha_divergence'."})
    discopop_tau: float = field(
        default=0.05, metadata={"help": "Temperature of loss_type 'discopop' (the paper's default, 0.05)."})
    use_weighting: bool = field(
        default=False,
        metadata={"help": "WPO (Zhou et al. 2024): weight each pair's loss by how likely the current policy is to "
                          "produce its two replies (each reply's exp of its mean per-token log-prob, normalised by the "
                          "token distribution's sum of squared probabilities; detached), so off-policy pairs count "
                          "less. Not with loss_type 'aot' / 'aot_unpaired' (they sort the batch). With 'sft', the "
                          "batch's NLL times the mean weight (TRL 1.13 fails on that combination)."})
    precompute_ref_log_probs: bool | None = field(
        default=None,
        metadata={"help": "Compute the reference log-probs of every train/eval pair once before training (cached on "
                          "disk under $PREFALIGN_HOME/cache, keyed by reference weights and tokenised data), then "
                          "free a separate reference model when training starts. Saves the reference forward pass on "
                          "every step. False: run the reference live each step (TRL's default). Unset (None): on, "
                          "except when a train or eval dataset is a stream (IterableDataset: it cannot be "
                          "precomputed), then off with one log line; True with a stream is an error."})
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size for precomputing; default per_device_eval_batch_size."})

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        _check(self.beta > 0, "beta", self.beta, "must be > 0")
        for lt in self.loss_type:
            if lt not in DPO_LOSS_TYPES:
                raise ConfigError(f"loss_type={lt!r} is not supported; choose from {', '.join(DPO_LOSS_TYPES)}.")
        if self.loss_weights is not None:
            _check(len(self.loss_weights) == len(self.loss_type), "loss_weights", self.loss_weights,
                   "needs one weight per loss_type")
        _check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "must be in [0, 0.5)")
        _check(self.f_divergence_type in F_DIVERGENCES, "f_divergence_type", self.f_divergence_type,
               f"must be one of {', '.join(F_DIVERGENCES)}")
        if self.f_divergence_type != "reverse_kl":
            other = [t for t in self.loss_type if t not in F_DIVERGENCE_LOSS_TYPES]
            _check(not other, "f_divergence_type", self.f_divergence_type,
                   f"has no generalisation for loss_type {', '.join(other)}; use it with "
                   f"{', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))}")
        _check("exo_pair" not in self.loss_type or self.label_smoothing > 0, "label_smoothing", self.label_smoothing,
               "must be > 0 for loss_type 'exo_pair' (the EXO paper suggests 1e-3)")
        _check(self.discopop_tau > 0, "discopop_tau", self.discopop_tau, "must be > 0")
        _check(self.ld_alpha is None or 0.0 <= self.ld_alpha <= 1.0, "ld_alpha", self.ld_alpha, "must be in [0, 1]")
        sorted_types = [t for t in self.loss_type if t in ("aot", "aot_unpaired")]
        if self.use_weighting and sorted_types:
            raise ConfigError(f"use_weighting (WPO) cannot weight loss_type {', '.join(sorted_types)}: it sorts the "
                              "batch's margins, so per-pair weights would not line up. Fix: drop use_weighting or "
                              "that loss type.")
        super().__post_init__()


@dataclass
class ReferenceFreeConfig(PreferenceConfig):
    """Options of TRL's experimental ORPO and CPO configs (no reference model), with their TRL meanings."""

    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Cut each reply to at most this many tokens (keeping its start), counted as max_length's "
                          "cuts are. TRL applies it to encoder-decoder models only; prefalign to every model. None: "
                          "only max_length limits replies."})
    padding_value: int | None = field(
        default=None,
        metadata={"help": "Token id padding positions hold; None: the tokenizer's pad token. Padding is masked, so "
                          "it never changes a loss."})
    generate_during_eval: bool = field(
        default=False,
        metadata={"help": "TRL logs sample generations to W&B / Comet at each evaluation. prefalign accepts it "
                          "with one log line and does not: `prefalign eval --prompts FILE` generates from the "
                          "trained model instead."})
    is_encoder_decoder: bool | None = field(
        default=None,
        metadata={"help": "TRL's flag for a model_init that builds an encoder-decoder model. prefalign trains "
                          "causal LMs only: true is refused; None / false change nothing."})

    def __post_init__(self) -> None:
        if self.max_completion_length is not None:
            _check(self.max_completion_length >= 1, "max_completion_length", self.max_completion_length,
                   "must be >= 1")
        if self.is_encoder_decoder:
            raise ConfigError("is_encoder_decoder: true: prefalign trains decoder-only (causal) language models. Fix: "
                              "remove is_encoder_decoder, or use TRL for an encoder-decoder model")
        if self.generate_during_eval:
            logger.info("generate_during_eval: true is accepted; prefalign does not generate during evaluation (TRL "
                        "logs samples to W&B / Comet): run `prefalign eval --prompts FILE` on the trained model")
        super().__post_init__()


@dataclass
class ORPOConfig(ReferenceFreeConfig):
    """Odds Ratio Preference Optimization (Hong et al. 2024): SFT and preference in one loss, no reference model.

    ``loss = NLL(chosen) + orpo_alpha * -log sigmoid(orpo_beta * log_odds_ratio)``. TRL's single ``beta`` is
    ``orpo_alpha`` (with ``orpo_beta`` = 1); passing ``beta`` sets ``orpo_alpha`` so TRL configs keep working.
    The defaults (alpha 0.1, beta 1.0) are the paper's loss with lambda = 0.1, TRL's default.
    """

    orpo_alpha: float = field(
        default=0.1,
        metadata={"help": "Strength of preference optimisation: weight of the odds-ratio term (the paper's lambda, "
                          "TRL's beta)."})
    orpo_beta: float = field(
        default=1.0,
        metadata={"help": "Temperature of the odds ratio: the log odds ratio is multiplied by it inside the sigmoid. "
                          "1.0 reproduces the paper."})
    beta: float | None = field(
        default=None, metadata={"help": "TRL's name for orpo_alpha; if given, it sets orpo_alpha."})
    trl_compat: bool = field(
        default=False,
        metadata={"help": "Reproduce TRL 1.13's ORPOTrainer: NLL over prompt and chosen tokens (the paper's covers "
                          "the chosen reply only), BOS prepended and EOS appended to each reply at token level when "
                          "missing. Off by default; used for parity tests and for matching old TRL runs."})

    def __post_init__(self) -> None:
        if self.beta is not None:
            if self.orpo_alpha not in (0.1, self.beta):
                raise ConfigError(f"beta={self.beta} and orpo_alpha={self.orpo_alpha} disagree; beta is TRL's name "
                                  "for orpo_alpha, so set only one of them.")
            self.orpo_alpha = self.beta
        _check(self.orpo_alpha > 0, "orpo_alpha", self.orpo_alpha, "must be > 0")
        _check(self.orpo_beta > 0, "orpo_beta", self.orpo_beta, "must be > 0")
        super().__post_init__()


@dataclass
class CPOConfig(ReferenceFreeConfig):
    """Contrastive Preference Optimization (Xu et al. 2024) and its relatives SimPO and AlphaPO: reference-free.

    ``loss = cpo_loss(loss_type) + cpo_alpha * NLL(chosen)``; see `prefalign.losses.cpo_loss`. Names and defaults
    as TRL 1.13's (experimental) CPOConfig.
    """

    beta: float = field(default=0.1, metadata={"help": "Temperature of the reward difference (SimPO: 2.0-2.5)."})
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "sigmoid (CPO), hinge, ipo, simpo (SimPO: length-normalised, target margin simpo_gamma), "
                          "alphapo (SimPO with AlphaPO's rewards, needs alpha != 0).",
                  "choices": ["sigmoid", "hinge", "ipo", "simpo", "alphapo"]})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Conservative smoothing of the sigmoid / simpo losses, in [0, 0.5)."})
    cpo_alpha: float = field(
        default=1.0, metadata={"help": "Weight of the NLL (behaviour-cloning) term on the chosen replies; 0: SimPO."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin gamma."})
    alpha: float = field(
        default=0.0, metadata={"help": "AlphaPO's reward shape: r = (1 - p^-alpha) / alpha; 0: log-probs."})
    trl_compat: bool = field(
        default=False,
        metadata={"help": "Reproduce TRL 1.13's CPOTrainer: BOS prepended and EOS appended to each reply at token "
                          "level when missing (after the chat template's own end-of-turn). For parity tests."})

    def __post_init__(self) -> None:
        _check(self.beta > 0, "beta", self.beta, "must be > 0")
        _check(self.loss_type in ("sigmoid", "hinge", "ipo", "simpo", "alphapo"), "loss_type", self.loss_type,
               "must be one of sigmoid, hinge, ipo, simpo, alphapo")
        _check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "must be in [0, 0.5)")
        _check(self.cpo_alpha >= 0, "cpo_alpha", self.cpo_alpha, "must be >= 0")
        _check(self.loss_type != "alphapo" or self.alpha != 0, "alpha", self.alpha,
               "must be != 0 for loss_type 'alphapo'")
        super().__post_init__()


@dataclass
class SimPOConfig(CPOConfig):
    """SimPO (Meng et al. 2024): CPOConfig with ``loss_type="simpo"``, no NLL term (``cpo_alpha=0``) and the paper's
    recommended beta 2.0 with gamma / beta = 0.5 (``simpo_gamma=1.0``)."""

    beta: float = field(default=2.0, metadata={"help": "Temperature of the reward difference (the paper: 2.0-2.5)."})
    loss_type: str = field(default="simpo", metadata={"help": "simpo, or alphapo (needs alpha != 0)."})
    cpo_alpha: float = field(default=0.0, metadata={"help": "Weight of an NLL term on the chosen replies."})
    simpo_gamma: float = field(default=1.0, metadata={"help": "Target reward margin gamma (gamma / beta = 0.5)."})


SFT_LOSS_TYPES = ("nll", "chunked_nll", "dft")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: next-token NLL on completions / assistant turns (or every token of text rows).

    Names and defaults as TRL 1.13's SFTConfig where it has the option (learning_rate 2e-5, max_length 1024), with
    two differences: ``packing`` is on (within a batch, by attention mask: see its help) and conversations train on
    their assistant turns by default (``assistant_only_loss``; TRL's default trains on every token).
    """

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak AdamW learning rate (TRL's SFT default)."})
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Max tokens per example; longer ones keep their start and are counted (a row left with no "
                          "loss token is an error, see on_invalid_row). None: no limit."})
    packing: bool = field(
        default=True,
        metadata={"help": "Examples of a batch share rows (first-fit decreasing into rows no longer than the batch's "
                          "longest example) with a block-diagonal attention mask and positions restarting at each "
                          "example: no example sees another, and the loss is the same as unpacked; less padding, "
                          "fewer rows. Needs attn_implementation 'sdpa', 'eager' or 'flex_attention' (flash-attention "
                          "kernels take no mask: padded rows instead). Unlike TRL's packing it never cuts an example "
                          "or changes which examples form a batch."})
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Prompt-completion (and preference) rows: loss on the completion only (None or True, as "
                          "TRL), or on prompt and completion (False)."})
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Conversational (messages) rows: loss on the assistant turns only (None or True; found by "
                          "rendering the chat template up to each turn, so no {% generation %} markers are needed), "
                          "or on every token (False, TRL's default)."})
    dataset_text_field: str = field(
        default="text", metadata={"help": "The column holding language-modelling text (TRL's name)."})
    loss_type: str = field(
        default="nll",
        metadata={"help": "'nll' (next-token negative log-likelihood; 'chunked_nll', TRL's name for its chunked "
                          "head, is the same here: prefalign's head is always chunked), or 'dft' (Dynamic "
                          "Fine-Tuning, Wu et al. 2025: each token's NLL weighted by its detached probability).",
                  "choices": list(SFT_LOSS_TYPES)})

    packing_strategy: str = field(
        default="bfd",
        metadata={"help": "TRL's way of packing: 'bfd' (best-fit decreasing, each example whole), 'bfd_split' "
                          "(long examples split across rows) or 'wrapped' (one stream cut into rows, examples split "
                          "and seeing each other). prefalign packs within each batch, first-fit decreasing, examples "
                          "whole and masked from each other, which is 'bfd' in spirit; the other two are accepted "
                          "with one log line saying so; TRL's earlier 'ffd' is read as 'bfd'.",
                  "choices": ["bfd", "bfd_split", "wrapped", "ffd"]})
    eval_packing: bool | None = field(
        default=None,
        metadata={"help": "Pack evaluation batches (as packing does for training). None: as packing. Packing never "
                          "changes the loss here, only the layout."})
    shuffle_dataset: bool = field(
        default=False,
        metadata={"help": "Shuffle the training rows once, seeded by seed, after tokenizing (as TRL, before "
                          "packing). The sampler still shuffles every epoch unless told otherwise."})
    eos_token: str | None = field(
        default=None,
        metadata={"help": "Set as the tokenizer's EOS token (it must be in the vocabulary), so text rows end with "
                          "it, and added to the model's generation EOS ids (as TRL). None: the tokenizer's own."})
    dataset_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "TRL's dataset preparation options. {skip_prepare_dataset: true}: the rows are already "
                          "tokenized (input_ids, with completion_mask, assistant_masks or labels saying which "
                          "tokens carry the loss; without them every token but the first does). Other keys have no "
                          "effect (as TRL 1.16) and are named in a warning."})

    def __post_init__(self) -> None:
        _check(self.loss_type in SFT_LOSS_TYPES, "loss_type", self.loss_type, f"must be one of {SFT_LOSS_TYPES}")
        if self.packing_strategy == "ffd":  # TRL < 0.20's name (the SmolLM3 SFT recipe); first-fit is ours
            logger.info("packing_strategy: ffd (first-fit decreasing, TRL's earlier name) is read as bfd: prefalign "
                        "packs each batch first-fit decreasing, examples whole")
            self.packing_strategy = "bfd"
        _check(self.packing_strategy in ("bfd", "bfd_split", "wrapped"), "packing_strategy", self.packing_strategy,
               "must be 'bfd', 'bfd_split', 'wrapped' (or TRL's earlier 'ffd', read as 'bfd')")
        if self.packing and self.packing_strategy != "bfd":
            logger.info("packing_strategy: %s is accepted; prefalign packs each batch's examples whole (first-fit "
                        "decreasing, masked from each other), so no example is split or sees another",
                        self.packing_strategy)
        unknown = sorted(set(self.dataset_kwargs or {}) - {"skip_prepare_dataset"})
        if unknown:
            logger.warning("dataset_kwargs: %s have no effect: only skip_prepare_dataset is read (as TRL 1.16)",
                           ", ".join(unknown))
        super().__post_init__()

    @property
    def skip_prepare_dataset(self) -> bool:
        """dataset_kwargs' skip_prepare_dataset: the rows are already token ids."""
        return bool((self.dataset_kwargs or {}).get("skip_prepare_dataset"))


@dataclass
class KTOConfig(ReferenceConfig):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired feedback: see `prefalign.losses.kto_loss`.

    Names and defaults as TRL 1.13's KTOConfig, except ``precompute_ref_log_probs`` (on, as prefalign's DPO; TRL:
    off) and ``train_sampling_strategy`` ('random'; TRL: 'sequential'): each row's KL completion is fixed once, from
    its neighbour in the dataset's order as in TRL, so shuffling keeps the estimate valid and the reference cache
    exact, while TRL's in-order sampling would give pairs split into rows every desirable row before any undesirable
    one. 'sequential' reproduces TRL's batches.
    """

    beta: float = field(
        default=0.1, metadata={"help": "Strength of the pull towards the reference model: higher beta, smaller "
                                       "deviation."})
    loss_type: str = field(
        default="kto",
        metadata={"help": "'kto' (the KTO paper, Eq. 7: rewards measured against the KL reference point) or "
                          "'apo_zero_unpaired' (APO-zero, D'Oosterlinck et al. 2024, unpaired: no KL term; "
                          "desirable completions pushed up, undesirable down).",
                  "choices": ["kto", "apo_zero_unpaired"]})
    desirable_weight: float = field(
        default=1.0, metadata={"help": "Weight of the desirable rows' losses (lambda_D): raise it when desirable rows "
                                       "are fewer (the paper: lambda_D n_D / (lambda_U n_U) in [1, 4/3])."})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "Weight of the undesirable rows' losses (lambda_U)."})
    precompute_ref_log_probs: bool | None = field(
        default=None,
        metadata={"help": "Compute the reference log-probs of every row's completion and KL completion once before "
                          "training (cached on disk under $PREFALIGN_HOME/cache, keyed by reference weights and "
                          "tokenised rows), then free a separate reference model when training starts. False: run "
                          "the reference live each step (TRL's default). Unset (None): on, except when a train or "
                          "eval dataset is a stream (IterableDataset: it cannot be precomputed), then off with one "
                          "log line; True with a stream is an error."})
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size for precomputing; default per_device_eval_batch_size."})
    train_sampling_strategy: str = field(
        default="random",
        metadata={"help": "Order of training rows: 'random' (prefalign's default) or 'sequential' (TRL's: batches "
                          "of consecutive rows, whose KL completions are each other's), or 'group_by_length'.",
                  "choices": ["random", "sequential", "group_by_length"]})

    @property
    def calculate_kl(self) -> bool:
        """Whether the loss uses the KL reference point (every loss type but apo_zero_unpaired)."""
        return self.loss_type != "apo_zero_unpaired"

    def __post_init__(self) -> None:
        _check(self.beta > 0, "beta", self.beta, "must be > 0")
        _check(self.loss_type in ("kto", "apo_zero_unpaired"), "loss_type", self.loss_type,
               "must be 'kto' or 'apo_zero_unpaired'")
        _check(self.desirable_weight >= 0, "desirable_weight", self.desirable_weight, "must be >= 0")
        _check(self.undesirable_weight >= 0, "undesirable_weight", self.undesirable_weight, "must be >= 0")
        _check(not self.calculate_kl or self.per_device_train_batch_size > 1, "per_device_train_batch_size",
               self.per_device_train_batch_size, "must be > 1 for loss_type 'kto' (the KL reference point is "
               "estimated from the other rows of a batch; with one row it equals the row's own reward)")
        super().__post_init__()
