"""DPOTrainer and ORPOTrainer: `transformers.Trainer` subclasses whose only job is the loss.

The data path (load → format → tokenize → collate) and the losses live in their own modules; here a batch becomes
log-probs (logps.py; fast inside the speed boundary, speed/), log-probs become per-pair losses and metrics
(losses.py), their mean is the loss, and metrics are averaged and logged with TRL's names. Everything else
(optimisation, accumulation, checkpoints, evaluation loops, `accelerate launch`) is the Trainer's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from . import speed
from .chat_format import apply_chat_template_option
from .checkpoints import CheckpointMixin, GracefulStop
from .config import CPOConfig, DPOConfig, ORPOConfig, PreferenceConfig, TrainConfig
from .data.collate import PairCollator, PrefixSharedCollator
from .data.load import (
    PREFERENCE_ROWS,
    ROW_COLUMN,
    RawData,
    RowSchema,
    skipped_entries,
    validated_chunk,
    validated_rows,
)
from .data.tokenize import TokenizeReport, TokenizeSettings, tokenize_rows
from .errors import ConfigError, DataError, NonFiniteError
from .logps import PairLogps, custom_mask_refusal, mask_kind, pair_logps, router_token_weights
from .losses import cpo_loss, dpo_loss, nll_loss, orpo_loss, pair_metrics, wpo_weights
from .memory import activation_offload, selective_checkpointing
from .models import load_model, load_tokenizer, unwrap
from .ref_sync import SyncReference, check_pair
from .router import Router, find_router, is_moe, load_balancing_loss, router_coefficient
from .sharding import enable_fsdp_on_cpu, shard_reference
from .speed.precision import autocast_dtype, cpu_bf16_hint, cpu_bf16_note

logger = logging.getLogger("prefalign")
TOKENIZED_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


class MetricsJsonlCallback(TrainerCallback):
    """Append every log record (step, epoch, metrics) to ``<output_dir>/metrics.jsonl`` on the main process."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class _Trainer(CheckpointMixin, Trainer):
    """What every prefalign trainer shares: model and tokenizer loading, dataset validation and tokenisation (once,
    by source row), the speed boundary, the non-finite check, metric bookkeeping. Subclasses say which rows they
    take (``schema``), how rows become token ids (``_tokenize``), how a batch is laid out (``_default_collator``)
    and what the loss is (``compute_loss``)."""

    config_class: type[TrainConfig] = TrainConfig
    method = "train"
    schema: RowSchema = PREFERENCE_ROWS
    tokenized_columns: list[str] = TOKENIZED_COLUMNS
    extra_columns: list[str] = []  # other columns a batch carries (precomputed reference log-probs)
    # the Trainer passes num_items_in_batch (the global token count) to compute_loss only when this is True
    uses_num_items_in_batch = False

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        ref_model: str | PreTrainedModel | None = None,
        args: TrainConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        peft_config: Any = None,
        tokenizer: Any = None,
        preprocess_logits_for_metrics: Any = None,
    ) -> None:
        processing_class = _processing_class(processing_class, tokenizer)
        model_name = model if isinstance(model, str) or model is None else getattr(model, "name_or_path", "model")
        if args is None:
            args = self.config_class(output_dir=f"{Path(str(model_name)).name}-{self.method.upper()}")
        elif type(args) is TrainingArguments:  # a plain TrainingArguments becomes this method's config (as TRL)
            args = self.config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})
        if args.fp16 and args.device.type == "cpu":
            raise ConfigError("fp16 mixed precision does not run on CPU: accelerate would silently train in float32 "
                              "there. Fix: bf16: true (CPU autocast), or float16 weights (model_init_kwargs: {dtype: "
                              "float16}) without fp16, or a GPU.")
        if args.bf16 and args.device.type == "cpu" and (note := cpu_bf16_note()) is not None:
            logger.warning("bf16: %s", note)
        elif (not (args.bf16 or args.fp16) and args.device.type == "cpu" and _float32_weights(model, args)
              and (hint := cpu_bf16_hint()) is not None):
            logger.info("bf16: %s", hint)
        _check_datasets(args, train_dataset, eval_dataset)
        if ref_model is not None and ref_model is model:
            raise ConfigError("`model` and `ref_model` cannot be the same object (the reference must not train). Fix: "
                              "omit ref_model (the untrained policy is then the reference), or pass another copy.")
        if model is None or isinstance(model, str):
            model = load_model(model, **_init_kwargs(args))
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ConfigError(f"{type(model).__name__} is an encoder-decoder model; prefalign trains decoder-only "
                              "(causal LM) models, whose log-probs its fast path and prefix sharing compute. Fix: use "
                              "a causal LM, or TRL's experimental ORPO / CPO trainers for encoder-decoder models.")
        if processing_class is None:
            processing_class = load_tokenizer(model.name_or_path or model_name,
                                              **({"trust_remote_code": True} if args.trust_remote_code else {}))
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        apply_chat_template_option(model, tokenizer, args.chat_template, source=str(model_name))
        set_special_tokens(model, tokenizer, args)
        # TRL 1.16's router auxiliary loss (prefalign.router): its weight, whether it is on, and where the logits are
        self.router_aux_loss_coef = router_coefficient(model, args.router_aux_loss_coef)
        self.aux_loss_enabled = is_moe(model) and self.router_aux_loss_coef != 0.0
        self.router: Router | None = find_router(model) if self.aux_loss_enabled else None
        self._aux_loss: Tensor | None = None  # the last policy forward's, until compute_loss adds it
        self.tokenizer_ = tokenizer
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if mask_kind(model) == "block" and args.device.type == "cpu" and train_dataset is not None:
            raise ConfigError("attn_implementation 'flex_attention' cannot train on CPU (PyTorch has no CPU backward "
                              "for flex attention). Fix: use attn_implementation 'sdpa' (model_init_kwargs), or a GPU.")
        if args.disable_dropout:
            _disable_dropout(model)
        self._speed: speed.Speed | None = None  # set while train() / evaluate() / the reference precompute run
        self.ref_model = self._make_reference(model, ref_model, args, peft_config)
        self.data_reports: dict[str, TokenizeReport] = {}
        self._stream_reports: set[str] = set()  # data_reports of streams, filled as they are read
        train_dataset = self._prepare_dataset(train_dataset, "train", args)
        if isinstance(eval_dataset, Mapping) and not isinstance(eval_dataset, datasets.Dataset):
            eval_dataset = {k: self._prepare_dataset(v, k, args) for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._prepare_dataset(eval_dataset, "eval", args)
        if data_collator is None:
            data_collator = self._default_collator(model, tokenizer, args)
        self.graceful_stop = GracefulStop()
        callbacks = list(callbacks or []) + [MetricsJsonlCallback(Path(args.output_dir) / "metrics.jsonl"),
                                             self.graceful_stop]
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        if hasattr(self.model, "add_model_tags"):  # the model card's tags: TRL's ("trl", the method) and ours
            self.model.add_model_tags(["trl", self.method, "prefalign"])
        # We compute our own loss. Without num_items_in_batch the Trainer scales it for gradient accumulation.
        self.model_accepts_loss_kwargs = self.uses_num_items_in_batch
        self.nonfinite_skipped: list[int] = []  # optimizer steps whose gradients were dropped (on_nonfinite='skip')
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if self.ref_model is not None and self.accelerator.is_fsdp2:
            self.ref_model = shard_reference(self.ref_model, self.accelerator)  # 1/N per process, as the policy
        elif self.ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(self.ref_model, evaluation_mode=True)

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; FSDP asked for on CPU processes is turned on (sharding.enable_fsdp_on_cpu)."""
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True

    # ----- the speed boundary -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def fast(self) -> Iterator[speed.Speed]:
        """The one place the speed machinery is switched on (speed.enable) and off again, by exception too.

        train(), evaluate(), predict() and the reference precompute run inside it; nested calls (evaluation during
        training) share the outer one. Outside it, log-probs take the plain path (same numbers, slower).
        """
        if self._speed is not None:
            yield self._speed
            return
        handle = speed.enable(self.model, self.args)
        self._speed = handle
        try:
            yield handle
        finally:
            self._speed = None
            handle.undo()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        selective = getattr(self.args, "_selective_checkpointing", False)
        try:
            with self.fast(), selective_checkpointing(self.model, selective):
                return super().train(*args, **kwargs)
        finally:
            self._log_stream_reports()

    def compute_loss_context_manager(self) -> Any:
        """The Trainer's context for the forward, plus activation_offloading's (prefalign.memory) while training."""
        stack = contextlib.ExitStack()
        stack.enter_context(super().compute_loss_context_manager())
        if self.model.training:
            stack.enter_context(activation_offload(self.args.activation_offloading, self.args.device))
        return stack

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self.fast():
            return super().predict(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As the Trainer's; under FSDP with sharded checkpoints the run directory still gets whole weights, so it
        loads with ``from_pretrained`` as a one-process run's does (checkpoints keep FSDP's shards for resuming)."""
        super().save_model(output_dir, _internal_call)
        if (self.is_fsdp_enabled and not _internal_call
                and "SHARDED_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type)):
            state_dict = self.accelerator.get_state_dict(self.model)  # collective: every process takes part
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def create_optimizer(self, model: Any = None) -> Any:
        optimizer = super().create_optimizer(model)
        # FSDP2 / DeepSpeed swap the optimizer's parameters for their shards after this: no state made up front
        if self._speed is not None and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            self._speed.prepare_optimizer(optimizer)
        return optimizer

    def _make_reference(self, model: Any, ref_model: Any, args: TrainConfig, peft_config: Any) -> Any:
        return None

    def _default_collator(self, model: Any, tokenizer: Any, args: TrainConfig) -> Any:
        raise NotImplementedError

    def _rows(self, raw: RawData, args: TrainConfig) -> RawData:
        """Validated rows as the trainer tokenizes them (KTO splits pairs into unpaired rows); as they are here."""
        return raw

    def _tokenize(self, raw: RawData, args: TrainConfig) -> tuple[list[dict[str, Any]], TokenizeReport]:
        """Validated rows → token-id examples and what tokenisation cut or skipped."""
        raise NotImplementedError

    def _advice(self, report: TokenizeReport, name: str, args: TrainConfig) -> list[str]:
        """Warnings about a prepared dataset beyond its report's own lines (KTO: TRL's class-weight check)."""
        return []

    def _prepare_dataset(self, dataset: Any, name: str, args: TrainConfig) -> datasets.Dataset | None:
        """Tokenize rows (validated once: see data.load.validated_rows); tokenized datasets pass."""
        if dataset is None:
            return None
        refuse_transform(dataset, name)
        if isinstance(dataset, datasets.IterableDataset):
            return self._prepare_stream(dataset, name, args)
        # prepared here before (its source rows numbered); a user's pre-tokenized rows are validated and truncated
        if isinstance(dataset, datasets.Dataset) and set(self.tokenized_columns) | {ROW_COLUMN} <= set(
                dataset.column_names):
            return dataset
        raw = self._rows(validated_rows(dataset, name=f"{name} dataset", schema=self.schema, **row_options(args)),
                         args)
        pairs, report = self._tokenize(raw, args)
        dropped = {s.pop("index") for s in report.skipped}
        numbers = [n for i, n in enumerate(raw.row_numbers) if i not in dropped]
        if not pairs:
            raise DataError(f"every row is invalid ({len(report.skipped) + len(raw.skipped)} skipped under "
                            "on_invalid_row=skip); nothing is left to train on.", source=raw.source,
                            fix="run `prefalign data check` on the data to list the problems")
        report.skipped = sorted(skipped_entries(raw) + report.skipped, key=lambda s: s["row"])
        report.rows += len(raw.skipped)
        report.converted_from, report.pairing = raw.converted_from, raw.pairing
        self.data_reports[name] = report
        for line in report.lines() + self._advice(report, name, args):
            logger.warning("%s: %s", raw.source, line)
        return datasets.Dataset.from_list([{**p, ROW_COLUMN: n} for p, n in zip(pairs, numbers, strict=True)])

    def _prepare_stream(self, dataset: datasets.IterableDataset, name: str,
                        args: TrainConfig) -> datasets.IterableDataset:
        """A stream, tokenized on the fly (IterableDataset.map, as TRL): each chunk of ``per_device_train_batch_size``
        rows is validated (data.load.validated_chunk: the checks one row allows, rows numbered from 1 in stream
        order) and tokenized as it is read (KTO's KL completions pair rows within the chunk). Skipped and truncated
        rows are counted in ``data_reports[name]`` as the stream is read, once per row however many passes; they are
        logged when train() / evaluate() end. No whole-dataset statistics: the stream is never read in full here."""
        columns = dataset.column_names
        if columns is None:  # a generator's stream: its columns are those of its first row
            columns = list(next(iter(dataset), {}).keys())
        if set(self.tokenized_columns) <= set(columns):
            return dataset
        report = TokenizeReport()
        self.data_reports[name] = report
        self._stream_reports.add(name)
        counted: set[int] = set()  # chunks already counted (by their first row), as a stream is read every epoch
        source, options = f"{name} dataset", row_options(args)

        def prepare(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            raw = validated_chunk(rows, [i + 1 for i in indices], source, self.schema, **options)
            unpaired = self._rows(raw, args) if raw.rows else raw
            pairs, part = self._tokenize(unpaired, args) if raw.rows else ([], TokenizeReport())
            for entry in part.skipped:
                entry.pop("index")
            if indices[0] not in counted:
                counted.add(indices[0])
                _merge_report(report, part, len(rows), skipped_entries(raw))
            # no source_row column: a stream's rows are named by their running index in the messages above
            return {c: [p[c] for p in pairs] for c in self.tokenized_columns}

        # KTO pairs each row's completion with another row's of its chunk: chunks are the train batch size
        chunk = max(args.per_device_train_batch_size, 1)
        return dataset.map(prepare, batched=True, batch_size=chunk, with_indices=True, remove_columns=columns)

    def _log_stream_reports(self) -> None:
        """What the streams read so far skipped or cut (their rows are counted as they are read)."""
        for name in sorted(self._stream_reports):
            for line in self.data_reports[name].lines():
                logger.warning("%s dataset (stream, %d rows read): %s", name, self.data_reports[name].rows, line)

    def _finish_eval_dataset(self, dataset: Any, name: str) -> Any:
        return dataset

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """As Trainer.evaluate; a dataset passed here gets the same validation and tokenisation as at construction."""
        outer = self._speed is None  # not an evaluation during train()
        with self.fast():
            if isinstance(eval_dataset, Mapping) and not isinstance(eval_dataset, datasets.Dataset):
                # each set prepared on its own and evaluated under eval_<name>_ (as TRL 1.16), not via the Trainer's
                # own loop over a dict, which would come back here with a prepared set
                metrics: dict[str, float] = {}
                for key, dataset in eval_dataset.items():
                    prepared = self._finish_eval_dataset(self._prepare_dataset(dataset, key, self.args), key)
                    metrics.update(super().evaluate(prepared, ignore_keys, f"{metric_key_prefix}_{key}"))
            elif eval_dataset is not None and not isinstance(eval_dataset, str):
                prepared = self._prepare_dataset(eval_dataset, metric_key_prefix, self.args)
                metrics = super().evaluate(self._finish_eval_dataset(prepared, metric_key_prefix), ignore_keys,
                                           metric_key_prefix)
            else:
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if outer:
            self._log_stream_reports()
        return metrics

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        if _is_stream(dataset) and dataset.column_names is None:  # a stream we tokenized: only the batch's columns
            return dataset
        return super()._remove_unused_columns(dataset, description)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = self.tokenized_columns + self.extra_columns

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        """The Trainer's step, then a check that the loss and every gradient are finite (see on_nonfinite)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.on_nonfinite == "ignore":  # TRL's behaviour: no check
            return loss
        what = nonfinite_part(loss, model)
        if what is None:
            return loss
        step = self.state.global_step + 1
        if self.args.on_nonfinite == "skip":
            model.zero_grad(set_to_none=True)  # the optimizer skips parameters without gradients
            self.nonfinite_skipped.append(step)
            logger.warning("step %d: non-finite %s; skipped that step's gradients (on_nonfinite='skip')", step, what)
            return torch.zeros_like(loss)
        raise NonFiniteError(f"non-finite {what} at step {step}; training stopped before that step's update, and "
                             "checkpoints written earlier are kept. Fix: lower the learning rate, check the data, "
                             "or set on_nonfinite='skip'.")

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Tensor, Any, Tensor | None]:
        """The loss; and unless ``prediction_loss_only`` (the Trainer asks for predictions when ``compute_metrics``
        is set, and in ``predict()``), ``(predictions, label_ids)`` for ``compute_metrics`` (see ``_predictions``).
        A dict of predictions loses the keys in ``ignore_keys``."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            predictions, labels = self._predictions(model, inputs, outputs)
        if isinstance(predictions, dict) and ignore_keys:
            predictions = {k: v for k, v in predictions.items() if k not in ignore_keys}
        return loss.detach(), predictions, labels

    def _predictions(self, model: Any, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> tuple[Any, Tensor]:
        """``(predictions, label_ids)`` of one batch for compute_metrics, from compute_loss's per-pair metrics."""
        raise NotImplementedError

    def add_aux_loss(self, model: Any, loss: Tensor, steps: int = 1) -> Tensor:
        """``loss + router_aux_loss_coef * aux_loss / steps`` when the policy forward collected one (TRL 1.16; SFT
        divides by the accumulation steps when its loss is over the global batch), logged as ``aux_loss``;
        ``loss`` otherwise."""
        aux, self._aux_loss = self._aux_loss, None
        if aux is None:
            return loss
        self.log_metric(model, "aux_loss", aux)
        return loss + self.router_aux_loss_coef * aux.to(loss.device) / steps

    def log_metric(self, model: Any, key: str, value: Tensor) -> None:
        """Record one batch's value of a metric (averaged over processes now, over batches when logged)."""
        gathered = self.accelerator.gather_for_metrics(value.detach().float().reshape(-1))
        self._metrics["train" if model.training else "eval"][key].append(gathered.mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stored = self._metrics[mode]
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{k}": sum(v) / len(v) for k, v in stored.items() if v})
        stored.clear()
        super().log(logs, start_time)


def _in_vocabulary(tokenizer: Any, token: str, name: str) -> None:
    if token not in tokenizer.get_vocab():
        raise ConfigError(f"{name}={token!r} is not in the tokenizer's vocabulary. Fix: use a token the tokenizer has "
                          f"(its EOS is {tokenizer.eos_token!r}), or remove {name}")


def set_special_tokens(model: Any, tokenizer: Any, args: TrainConfig) -> None:
    """TRL's ``eos_token`` (SFT) and ``pad_token``: set on the tokenizer before any data is tokenized; a new EOS
    also becomes the model's and joins its generation EOS ids. Without a pad token, EOS pads (as TRL)."""
    eos = getattr(args, "eos_token", None)
    if eos is not None:
        _in_vocabulary(tokenizer, eos, "eos_token")
        tokenizer.eos_token = eos
        config = getattr(model, "config", None)
        if config is not None:
            config.get_text_config().eos_token_id = tokenizer.eos_token_id
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            ids = generation.eos_token_id
            ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
            if tokenizer.eos_token_id not in ids:
                generation.eos_token_id = [tokenizer.eos_token_id, *ids]
    pad = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
    if args.pad_token is not None:
        _in_vocabulary(tokenizer, pad, "pad_token")
    if pad is not None and tokenizer.pad_token != pad:
        tokenizer.pad_token = pad


class _PreferenceTrainer(_Trainer):
    """What the pair trainers (DPO, ORPO, CPO) share: pair tokenisation and layout, the batch → log-probs contract,
    per-pair losses whose mean is the loss."""

    config_class: type[PreferenceConfig] = PreferenceConfig
    method = "preference"
    extra_columns = ["ref_chosen_logps", "ref_rejected_logps"]

    def _tokenize_settings(self, args: PreferenceConfig) -> TokenizeSettings:
        return TokenizeSettings(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                max_completion_length=getattr(args, "max_completion_length", None),
                                truncation_mode=args.truncation_mode, chat=args.chat_template_for_text,
                                chat_template_kwargs=args.chat_template_kwargs)

    def _tokenize(self, raw: RawData, args: TrainConfig) -> tuple[list[dict[str, Any]], TokenizeReport]:
        return tokenize_rows(raw.rows, self.tokenizer_, self._tokenize_settings(args), source=raw.source,
                             row_numbers=raw.row_numbers, row_label=raw.row_label,
                             skip_invalid=args.on_invalid_row == "skip")

    def _default_collator(self, model: Any, tokenizer: Any, args: PreferenceConfig) -> Any:
        pad_id = getattr(args, "padding_value", None)  # ORPO / CPO: TRL's padding_value
        pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
        refusal = custom_mask_refusal(model)
        if args.prefix_sharing and refusal is not None:
            logger.warning("prefix_sharing: off for %s: %s", type(unwrap(model)).__name__, refusal)
        if args.prefix_sharing and mask_kind(model) is not None:
            return PrefixSharedCollator(pad_id, args.pad_to_multiple_of, args.packing)
        return PairCollator(pad_id, args.pad_to_multiple_of)

    # ----- loss ---------------------------------------------------------------------------------------------------
    # TRL's sequences per pair that the router loss counts: prompt + chosen and prompt + rejected (KTO: the first)
    aux_with_rejected = True

    def batch_logps(self, model: Any, inputs: dict[str, Tensor], nll_on_prompt: bool = False,
                    log_sum_sq: bool = False, policy: bool = False) -> PairLogps:
        """The batch → numbers contract (logps.pair_logps), on the fast path inside ``fast()``. For the ``policy``
        forward of a Mixture-of-Experts model, also its router loss (kept for ``add_aux_loss``)."""
        path = self._speed.path if self._speed is not None else None
        if not policy or self.router is None:
            return pair_logps(model, inputs, path, nll_on_prompt=nll_on_prompt, log_sum_sq=log_sum_sq)
        with self.router.collect(model) as logits:
            out = pair_logps(model, inputs, path, nll_on_prompt=nll_on_prompt, log_sum_sq=log_sum_sq)
        weights = router_token_weights(inputs, plain=path is None, with_rejected=self.aux_with_rejected)
        self._aux_loss = load_balancing_loss(logits, weights, self.router.num_experts, self.router.top_k)
        return out

    def token_total(self, counts: Tensor) -> Tensor:
        """The token count a token-mean NLL divides by: this batch's, or under several processes the global count
        over the number of processes (their gradients are averaged), so every process count gives the same loss."""
        total = counts.sum().float()
        world = self.accelerator.num_processes
        if world > 1:
            total = self.accelerator.reduce(total.detach(), reduction="sum") / world
        return total

    def pair_losses(self, model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair losses ``[B]`` and per-pair metrics of one batch."""
        raise NotImplementedError

    def _predictions(self, model: Any, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> tuple[Any, Tensor]:
        """Per-pair numbers the loss computed anyway, as ``{metric name: [B] tensor}`` (``rewards/chosen``,
        ``rewards/rejected``, ``logps/chosen``, ..., the logged metrics' names; a batch-level value such as ORPO's
        ``nll_loss`` repeated per pair), and label ids ``[B]`` of zeros: class 0, the chosen reply, is the preferred
        one, so ``argmax([rewards/chosen, rewards/rejected]) == label`` is the reward accuracy."""
        pairs = inputs["chosen_mask"].shape[0]
        predictions = {k: _per_pair(v, pairs) for k, v in outputs.items()}
        return predictions, torch.zeros(pairs, dtype=torch.long, device=inputs["chosen_mask"].device)

    def compute_loss(self, model: Any, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, dict]:
        losses, metrics = self.pair_losses(model, inputs)
        loss = self.add_aux_loss(model, losses.mean())  # the one reduction: the mean over the batch's pairs
        for key, value in metrics.items():
            self.log_metric(model, key, value)
        return (loss, metrics) if return_outputs else loss


def nonfinite_part(loss: Tensor, model: torch.nn.Module) -> str | None:
    """``"loss"`` or ``"gradient of NAME"`` when that is NaN or infinite, else None.

    One fused norm over all gradients screens them (NaN/inf if any element is; ~20x cheaper than a pass per tensor on
    SmolLM2-135M). In half precision the norm itself can overflow while every element is finite (fp16's largest value
    is 65504), so a tripped screen is confirmed tensor by tensor before anything is called non-finite.
    """
    if not torch.isfinite(loss).all():
        return "loss"
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named or torch.isfinite(torch.nn.utils.get_total_norm([g for _, g in named])):
        return None
    return next((f"gradient of {n}" for n, g in named if not torch.isfinite(g).all()), None)


def refuse_transform(dataset: Any, name: str) -> None:
    """A ``Dataset.with_transform()`` function runs at every access, but rows are prepared once here: refused (as
    TRL 1.16 does, with words its users know) rather than applied once and silently frozen."""
    if isinstance(dataset, datasets.Dataset) and dataset.format.get("type") == "custom":
        raise ConfigError(f"the {name} dataset has a Dataset.with_transform() transform, which runs at every access; "
                          "prefalign prepares rows once (with or without dataset_kwargs' skip_prepare_dataset), so it "
                          "would run only once. Fix: apply it with Dataset.map() first and pass the result, or pass "
                          "trainer-ready rows (input_ids, labels) without a transform.")


def _is_stream(dataset: Any) -> bool:
    return isinstance(dataset, datasets.IterableDataset)


def _streams(dataset: Any) -> bool:
    """Whether a dataset, or one of a dict's, is a stream."""
    if isinstance(dataset, Mapping) and not isinstance(dataset, datasets.Dataset):
        return any(_is_stream(d) for d in dataset.values())
    return _is_stream(dataset)


def _check_datasets(args: TrainConfig, train_dataset: Any, eval_dataset: Any) -> None:
    """TRL 1.16's construction checks on the datasets, and what a stream needs (max_steps, dispatch_batches=False,
    the reference run live)."""
    if train_dataset is None:
        raise ConfigError("`train_dataset` is required (as TRL). Fix: pass train_dataset=...; to only evaluate, pass "
                          "the evaluation rows as train_dataset too and call evaluate().")
    if isinstance(train_dataset, datasets.IterableDatasetDict) or (
            isinstance(train_dataset, Mapping) and not isinstance(train_dataset, datasets.Dataset)):
        raise ConfigError(f"`train_dataset` must be one dataset, not a {type(train_dataset).__name__} of splits. Fix: "
                          "pick a split, e.g. train_dataset=dataset['train'].")
    if _is_stream(train_dataset):
        if args.max_steps is None or args.max_steps <= 0:
            raise ConfigError("train_dataset is a stream (IterableDataset), whose length is unknown, so the number of "
                              "steps cannot be derived from epochs. Fix: set max_steps (as transformers requires).")
    # a stream's batches are read by each process (as TRL; accelerate's dispatching concatenates them, which fails
    # on a short batch); unset, that is also what map-style data gets, so eval streams passed later work too
    if args.accelerator_config.dispatch_batches is None:
        args.accelerator_config.dispatch_batches = False
    elif args.accelerator_config.dispatch_batches and (_is_stream(train_dataset) or _streams(eval_dataset)):
        logger.warning("dispatch_batches: off, a dataset is a stream (as TRL; each process reads its own batches)")
        args.accelerator_config.dispatch_batches = False
    if not hasattr(args, "precompute_ref_log_probs") or not (_is_stream(train_dataset) or _streams(eval_dataset)):
        if getattr(args, "precompute_ref_log_probs", False) is None:
            args.precompute_ref_log_probs = True
        return
    if args.precompute_ref_log_probs:
        raise ConfigError("`precompute_ref_log_probs=True` is not supported with IterableDataset (a stream is read "
                          "as training goes; its reference log-probs cannot be computed up front). Fix: set "
                          "precompute_ref_log_probs=False (or leave it unset: streams then run the reference live), "
                          "or use a map-style Dataset.")
    if args.precompute_ref_log_probs is None:
        logger.warning("precompute_ref_log_probs: off, the reference runs live on each batch (a dataset is a stream, "
                       "which cannot be precomputed)")
        args.precompute_ref_log_probs = False


def _merge_report(report: TokenizeReport, part: TokenizeReport, rows: int, skipped: list[dict[str, Any]]) -> None:
    """Add one streamed chunk's counts (``rows`` read, ``skipped`` by validation) to its dataset's report."""
    report.rows += rows
    report.skipped = sorted(report.skipped + skipped + part.skipped, key=lambda s: s["row"])
    for name in ("prompt_truncated", "chosen_truncated", "rejected_truncated", "sequence_truncated",
                 "prompt_rerendered"):
        getattr(report, name).extend(getattr(part, name))
    report.converted_from = report.converted_from or part.converted_from


def _per_pair(value: Tensor, pairs: int) -> Tensor:
    """A metric as a float ``[pairs]`` tensor: per-pair values as they are, a batch-level value repeated."""
    value = value.detach().float().reshape(-1)
    return value.expand(pairs).clone() if value.numel() == 1 and pairs != 1 else value


def _processing_class(processing_class: Any, tokenizer: Any) -> Any:
    """``tokenizer=`` is TRL's older name for ``processing_class`` (the course's notebooks use it): both work."""
    if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
        raise ConfigError("both processing_class and tokenizer are given. Fix: pass one of them (tokenizer is the "
                          "older name of processing_class)")
    return processing_class if processing_class is not None else tokenizer


def row_options(args: TrainConfig) -> dict[str, Any]:
    """The config fields that decide which rows a dataset yields (data/load.py's read_valid_rows options)."""
    return {"text_format": args.text_format, "on_invalid_row": args.on_invalid_row, "pairing": args.pairing,
            "min_score_margin": args.min_score_margin, "seed": args.data_seed if args.data_seed is not None
            else args.seed}


def _float32_weights(model: Any, args: TrainConfig) -> bool:
    """Whether the run trains float32 weights: a loaded model's own dtype, else the dtype it will be loaded in."""
    if isinstance(model, torch.nn.Module):
        return getattr(model, "dtype", torch.float32) == torch.float32
    dtype = _init_kwargs(args).get("dtype")
    return dtype in (None, "auto", "float32", torch.float32)


def _init_kwargs(args: TrainConfig) -> dict[str, Any]:
    kwargs = dict(args.model_init_kwargs or {})
    if "torch_dtype" in kwargs:  # the pre-transformers-5 name
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    if args.trust_remote_code:  # TRL's field; an explicit model_init_kwargs value wins
        kwargs.setdefault("trust_remote_code", True)
    return kwargs


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _warn_if_most_rows_go_unused(args: Any, rows: int) -> None:
    """The precompute scores every row once; a run of max_steps that sees under half of them (a short run on a
    whole published split) would spend most of that on rows it never trains on, so say so before it starts."""
    if not args.max_steps or args.max_steps <= 0:
        return
    seen = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if 2 * seen < rows:
        logger.warning("precompute_ref_log_probs: scoring the reference on all %d training rows, but max_steps=%d "
                       "sees %d of them. To score only the rows trained on, set precompute_ref_log_probs: false "
                       "(the reference then runs live on each batch, held in memory beside the policy)",
                       rows, args.max_steps, seen)


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class DPOTrainer(_PreferenceTrainer):
    """Direct Preference Optimization.

    Reference model: ``ref_model`` if given; else, with ``peft_config`` (or a PEFT model), the base model with the
    adapter disabled; else the untrained policy itself. With ``precompute_ref_log_probs`` (default) its log-probs are
    computed before the first step and no second model is kept; with live reference passes, a frozen copy of the
    policy in the policy's own dtype (as TRL 1.13; older TRL kept an fp32 copy).

    ``compute_metrics`` gets per-pair arrays named as the logged metrics (``rewards/chosen``, ``logps/chosen``, ...)
    and label ids of zeros (the chosen reply is class 0): see ``_PreferenceTrainer._predictions``. The same holds
    for ORPO and CPO.
    """

    config_class = DPOConfig
    method = "dpo"
    args: DPOConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reference_cache: dict[str, tuple[str, str]] = {}  # dataset -> ("read" | "computed", cache file)
        self.reference_sync: SyncReference | None = None
        super().__init__(*args, **kwargs)
        self._reference_released = False
        if getattr(self.args, "sync_ref_model", False):  # DPO's and KTO's option (ReferenceConfig)
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ConfigError("sync_ref_model is not supported with DeepSpeed or FSDP here: their processes hold "
                                  "slices of the policy, which cannot be blended into the reference as is. Fix: drop "
                                  "sync_ref_model or train under plain DDP (accelerate launch without them).")
            self.reference_sync = SyncReference(self.ref_model, self.args.ref_model_mixup_alpha,
                                                self.args.ref_model_sync_steps)
            self.add_callback(self.reference_sync)
            logger.warning("sync_ref_model (TR-DPO): the reference moves towards the policy every %d steps (alpha "
                           "%g), so it is held in memory and run live each step; precompute_ref_log_probs is off",
                           self.args.ref_model_sync_steps, self.args.ref_model_mixup_alpha)
        if self.args.precompute_ref_log_probs:
            self.train_dataset = self._with_reference_logps(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._with_reference_logps(v, k) for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self._with_reference_logps(self.eval_dataset, "eval")

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """With precomputed reference log-probs, the reference is freed as training starts: every number it can give
        the datasets passed so far is cached. Until then (as TRL) evaluate() takes new eval sets, the reference being
        ``ref_model`` or the untrained policy. Without PEFT the policy was the reference, so no copy was ever made.
        A ``ref_model`` passed as a model object is the caller's and stays (``trainer.ref_model``, as TRL), so eval
        sets passed after training still get their reference log-probs from it."""
        if self.args.precompute_ref_log_probs and not self._reference_released and not self._user_reference and (
                self.ref_model is not None or not _is_peft(self.accelerator.unwrap_model(self.model))):
            self.ref_model = None
            self._reference_released = True
        return super().train(*args, **kwargs)

    def _with_reference_logps(self, dataset: Any, name: str) -> Any:
        """Add ref_chosen_logps / ref_rejected_logps columns, from the disk cache when possible."""
        if _is_stream(dataset):
            raise ConfigError(f"`precompute_ref_log_probs=True` is not supported with IterableDataset (the {name} "
                              "dataset is a stream). Fix: use a map-style Dataset, or build the trainer with "
                              "precompute_ref_log_probs=False.")
        if dataset is None or "ref_chosen_logps" in dataset.column_names:
            return dataset
        if self._reference_released:
            raise ConfigError(f"Cannot compute reference log-probs for a dataset passed to evaluate() after training "
                              f"started (the {name} dataset): the reference model was freed when training started "
                              "(precompute_ref_log_probs). Fix: pass it as eval_dataset "
                              "when building the trainer, evaluate it before train(), or set "
                              "precompute_ref_log_probs=False (the reference is then kept for later eval sets).")
        from tqdm.auto import tqdm

        from .reference import (
            batched_pair_logps,
            cache_path,
            data_fingerprint,
            model_fingerprint,
            read_cache,
            shared_pair_logps,
            write_cache,
        )
        from .sharding import barrier, broadcast, gather, world

        ref = self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(self.model)
        rows = dataset.select_columns(TOKENIZED_COLUMNS).to_list()
        alpha = getattr(self.args, "ld_alpha", None)  # LD-DPO weights the sums (KTOConfig has no ld_alpha)
        variant = "" if alpha is None else f"-ld{alpha!r}"
        # As TRL: the reference runs under the policy's autocast, so at step 0 policy and reference agree to the bit
        # instead of differing by bf16 rounding. The weights' dtypes are in the model fingerprint; the autocast dtype
        # goes in the key here (an fp32 cache is never read under bf16 autocast, nor the reverse).
        with self.accelerator.autocast():
            amp = autocast_dtype(self.accelerator.device)
        variant += f"-amp-{str(amp).removeprefix('torch.')}" if amp is not None else ""
        rank, size = world()
        # the main process's weights name the cache (under FSDP's cpu_ram_efficient_loading it alone holds them)
        path = cache_path(broadcast(model_fingerprint(ref, skip="lora_") if rank == 0 else None),
                          data_fingerprint(rows) + variant)
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        whole = not any(p.device.type == "meta" for p in ref.parameters())
        values = read_cache(path) if rank == 0 else None
        cached = broadcast(values is not None)
        if cached and rank != 0:
            values = read_cache(path)
        elif not cached:
            if name == "train" and self.is_world_process_zero():
                _warn_if_most_rows_go_unused(self.args, len(rows))
            bar = tqdm(total=len(rows), desc=f"reference log-probs ({name})", leave=False,
                       disable=not self.is_world_process_zero())
            try:
                with self.fast(), self.accelerator.autocast():
                    if size > 1 and all(gather(whole)):
                        # every process scores its share of the batches; each gets all the numbers
                        values = shared_pair_logps(self._weighted_reference, rows, self.data_collator, batch_size,
                                                   self.accelerator.device, rank, size, gather, bar.update)
                    elif rank == 0:  # only the main process holds the weights: it scores every batch
                        values = batched_pair_logps(self._weighted_reference, rows, self.data_collator, batch_size,
                                                    self.accelerator.device, bar.update)
            finally:
                bar.close()
            if rank == 0:
                write_cache(path, *values)
            barrier()
            if values is None:
                values = read_cache(path)
        chosen, rejected = values
        self.reference_cache[name] = ("read" if cached else "computed", str(path))
        if cached:
            logger.info("%s: reference log-probs read from %s", name, path)
        return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column("ref_rejected_logps",
                                                                                 rejected.tolist())

    def _finish_eval_dataset(self, dataset: Any, name: str) -> Any:
        return self._with_reference_logps(dataset, name) if self.args.precompute_ref_log_probs else dataset

    def _make_reference(self, model: Any, ref_model: Any, args: PreferenceConfig, peft_config: Any) -> Any:
        if getattr(args, "sync_ref_model", False) and _is_peft(model):
            raise ConfigError("sync_ref_model cannot be used with PEFT: the reference is the policy with its adapter "
                              "disabled, so there is no separate reference to update. Fix: drop sync_ref_model or "
                              "train without LoRA.")
        self._user_reference = ref_model is not None and not isinstance(ref_model, str)  # the caller's model
        if isinstance(ref_model, str):
            ref_model = load_model(ref_model, **_init_kwargs(args))
        if getattr(args, "sync_ref_model", False) and ref_model is not None:
            check_pair(ref_model, model)
        if ref_model is None and not _is_peft(model) and not getattr(args, "precompute_ref_log_probs", False):
            ref_model = copy.deepcopy(model)  # live reference: a frozen copy of the untrained policy
        if ref_model is not None:
            if args.disable_dropout:
                _disable_dropout(ref_model)
            ref_model.eval()
            ref_model.requires_grad_(False)
        return ref_model

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # a checkpoint of a TR-DPO run carries the moving reference, so resuming continues from it
        if (self.reference_sync is not None and output_dir is not None and self.args.should_save
                and Path(output_dir).name.startswith("checkpoint-")):
            self.reference_sync.save(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.reference_sync is not None:
            self.reference_sync.load(resume_from_checkpoint)

    def _weighted(self, out: PairLogps) -> tuple[Tensor, Tensor]:
        """Summed reply log-probs, or with ``ld_alpha`` LD-DPO's: the shared length in full, the rest times alpha."""
        alpha = self.args.ld_alpha
        if alpha is None:
            return out.chosen, out.rejected
        return (out.chosen_shared + alpha * (out.chosen - out.chosen_shared),
                out.rejected_shared + alpha * (out.rejected - out.rejected_shared))

    def _live_reference(self, model: Any, inputs: dict[str, Tensor]) -> PairLogps:
        """The reference's log-probs of a batch: ``ref_model``, else the policy with its adapter disabled (PEFT),
        else the policy itself (before training, for the precompute)."""
        if self._reference_released:
            raise ConfigError("this batch has no precomputed reference log-probs and the reference model was freed "
                              "when training started. Fix: pass the dataset as eval_dataset when building the trainer, "
                              "or set precompute_ref_log_probs=False (the reference is then kept for later eval sets).")
        with torch.no_grad():
            if self.ref_model is not None:
                return self.batch_logps(self.ref_model, inputs)
            inner = self.accelerator.unwrap_model(model)
            with inner.disable_adapter() if _is_peft(inner) else contextlib.nullcontext():
                return self.batch_logps(model, inputs)

    def _weighted_reference(self, inputs: dict[str, Tensor]) -> PairLogps:
        out = self._live_reference(self.model, inputs)
        chosen, rejected = self._weighted(out)
        return dataclasses.replace(out, chosen=chosen, rejected=rejected)

    def _reference_logps(self, model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self._weighted(self._live_reference(model, inputs))

    def pair_losses(self, model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        args = self.args
        policy = self.batch_logps(model, inputs, log_sum_sq=args.use_weighting, policy=True)
        chosen, rejected = self._weighted(policy)
        ref_chosen, ref_rejected = self._reference_logps(model, inputs)
        weights = args.loss_weights or [1.0] * len(args.loss_type)
        pair_weights = None if not args.use_weighting else wpo_weights(
            policy.chosen, policy.rejected, policy.chosen_log_sum_sq, policy.rejected_log_sum_sq,
            policy.chosen_tokens, policy.rejected_tokens)
        losses: Tensor | float = 0.0
        for loss_type, weight in zip(args.loss_type, weights, strict=True):
            if loss_type == "sft":
                part = nll_loss(policy.chosen, self.token_total(policy.chosen_tokens))
                if pair_weights is not None:  # as TRL: the batch's NLL, times each pair's weight
                    part = part.mean().expand_as(pair_weights)
            else:
                part, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=args.beta,
                                   loss_type=loss_type, label_smoothing=args.label_smoothing,
                                   chosen_lengths=policy.chosen_tokens, rejected_lengths=policy.rejected_tokens,
                                   f_divergence_type=args.f_divergence_type,
                                   f_alpha_divergence_coef=args.f_alpha_divergence_coef,
                                   discopop_tau=args.discopop_tau)
            if pair_weights is not None:
                part = part * pair_weights
            losses = losses + weight * part
        metrics = pair_metrics(args.beta * (chosen - ref_chosen), args.beta * (rejected - ref_rejected), chosen,
                               rejected)
        return losses, metrics  # type: ignore[return-value]


class _ReferenceFreeTrainer(_PreferenceTrainer):
    """What ORPO and CPO share: TRL's signature without ref_model, and TRL's token-level BOS / EOS in trl_compat."""

    def __init__(self, model: str | PreTrainedModel | None = None, args: PreferenceConfig | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, compute_metrics: Any = None,
                 callbacks: list[TrainerCallback] | None = None, optimizers: tuple[Any, Any] = (None, None),
                 peft_config: Any = None, tokenizer: Any = None, preprocess_logits_for_metrics: Any = None) -> None:
        # TRL's ORPOTrainer / CPOTrainer signature: no ref_model, args second.
        super().__init__(model, None, args, data_collator, train_dataset, eval_dataset, processing_class,
                         compute_metrics, callbacks, optimizers, peft_config, tokenizer,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)

    def _tokenize_settings(self, args: PreferenceConfig) -> TokenizeSettings:
        settings = super()._tokenize_settings(args)
        if getattr(args, "trl_compat", False):
            settings.ensure_bos = settings.ensure_eos = True
        return settings


class ORPOTrainer(_ReferenceFreeTrainer):
    """Odds Ratio Preference Optimization: no reference model, one forward pass over chosen and rejected.

    The NLL term covers the chosen reply's tokens (the paper's definition), averaged over all chosen reply tokens
    in the batch. ``ORPOConfig(trl_compat=True)`` reproduces TRL 1.13 instead (see its help).
    """

    config_class = ORPOConfig
    method = "orpo"
    args: ORPOConfig

    def pair_losses(self, model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.batch_logps(model, inputs, nll_on_prompt=self.args.trl_compat, policy=True)
        nll = nll_loss(out.nll, self.token_total(out.nll_tokens))  # a token mean over the (global) batch
        return orpo_loss(out.chosen / out.chosen_tokens.clamp(min=1), out.rejected / out.rejected_tokens.clamp(min=1),
                         nll, alpha=self.args.orpo_alpha, beta=self.args.orpo_beta)


class CPOTrainer(_ReferenceFreeTrainer):
    """CPO, SimPO and AlphaPO (`prefalign.losses.cpo_loss`): reference-free, one forward pass over both replies, plus
    ``cpo_alpha`` times the NLL of the chosen replies (a token mean over the global batch). TRL 1.13 computes the
    same NLL (its labels mask the prompt); ``trl_compat`` adds its token-level BOS / EOS."""

    config_class = CPOConfig
    method = "cpo"
    args: CPOConfig

    def pair_losses(self, model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        args = self.args
        out = self.batch_logps(model, inputs, policy=True)
        chosen, rejected = out.chosen, out.rejected
        if args.loss_type in ("ipo", "simpo", "alphapo"):  # length-normalised rewards
            chosen, rejected = chosen / out.chosen_tokens.clamp(min=1), rejected / out.rejected_tokens.clamp(min=1)
        losses, metrics = cpo_loss(chosen, rejected, beta=args.beta, loss_type=args.loss_type,
                                   label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma,
                                   alpha=args.alpha)
        nll = nll_loss(out.chosen, self.token_total(out.chosen_tokens))
        metrics["nll_loss"] = nll.detach()
        return losses + args.cpo_alpha * nll, metrics
