"""SFTTrainer: supervised fine-tuning, the first stage of the course's workflow, on the same machinery as DPO.

Rows are validated and tokenized once (data/sft.py), batches are packed by attention mask (data/collate.py's
LMCollator), log-probs of the labelled tokens come from the completion-only chunked head inside the speed boundary
(logps.lm_logps), and the loss is their negative sum over the number of labelled tokens: of the global batch while
training (the Trainer's ``num_items_in_batch``, so gradient accumulation and several processes give the loss of one
big batch, as TRL), of the batch in evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
from torch import Tensor
from transformers import PreTrainedModel, TrainerCallback

from .config import SFTConfig, TrainConfig
from .data.collate import LMCollator
from .data.load import ROW_COLUMN, RawData
from .data.sft import SFT_ROWS, SFTTokenizeSettings, tokenize_sft_rows
from .data.tokenize import TokenizeReport
from .logps import custom_mask_refusal, lm_inputs, lm_logps, mask_kind, own_logits
from .models import unwrap
from .router import load_balancing_loss
from .speed.attention import takes_segments
from .speed.head import HeadStats
from .trainer import _Trainer, logger, refuse_transform


class SFTTrainer(_Trainer):
    """Supervised fine-tuning with TRL's signature: ``SFTTrainer(model, args, train_dataset=..., ...)``.

    Data: ``text`` rows (every token), ``messages`` rows (assistant turns), ``prompt`` + ``completion`` rows (the
    completion), or preference rows (prompt + chosen). ``formatting_func(row) -> str`` turns each row into text
    first, as in TRL. Logs ``loss``, ``mean_token_accuracy`` (the share of labelled tokens that were the model's top
    prediction) and ``num_tokens`` (tokens trained on so far, prompts included, padding not). Pre-tokenized rows
    (``input_ids``) and tool-call conversations are taken as TRL takes them (data/sft.py).

    ``compute_metrics`` gets the full logits and the labels, as TRL's (see ``_predictions``): this costs one more
    forward with full logits per evaluation batch, made only when compute_metrics (or predict()) asks for them.
    """

    config_class = SFTConfig
    method = "sft"
    schema = SFT_ROWS
    tokenized_columns = ["input_ids", "loss_mask"]
    uses_num_items_in_batch = True
    args: SFTConfig

    def __init__(self, model: str | PreTrainedModel | None = None, args: SFTConfig | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, compute_metrics: Any = None,
                 callbacks: list[TrainerCallback] | None = None, optimizers: tuple[Any, Any] = (None, None),
                 peft_config: Any = None, tokenizer: Any = None,
                 formatting_func: Callable[[dict[str, Any]], str] | None = None,
                 preprocess_logits_for_metrics: Any = None) -> None:
        self.formatting_func = formatting_func
        self._trained_tokens = 0
        super().__init__(model, None, args, data_collator, train_dataset, eval_dataset, processing_class,
                         compute_metrics, callbacks, optimizers, peft_config, tokenizer,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)

    def _prepare_dataset(self, dataset: Any, name: str, args: TrainConfig) -> datasets.Dataset | None:
        if dataset is not None:
            refuse_transform(dataset, name)
        if dataset is not None and not (isinstance(dataset, datasets.Dataset)
                                        and {*self.tokenized_columns, ROW_COLUMN} <= set(dataset.column_names)):
            if getattr(args, "skip_prepare_dataset", False) and isinstance(dataset, datasets.IterableDataset):
                return dataset.map(lambda r, i: _prepared_row(r, i + 1, name), with_indices=True,
                                   remove_columns=_stream_columns(dataset))
            if getattr(args, "skip_prepare_dataset", False):
                dataset = _prepared_rows(dataset, name)
            else:
                dataset = self._as_text_rows(dataset, args)
        prepared = super()._prepare_dataset(dataset, name, args)
        if isinstance(prepared, datasets.IterableDataset):  # TRL's labels column (user code reads it), on the fly
            prepared = prepared.map(lambda r: {"labels": _labels(r["input_ids"], r["loss_mask"])})
        elif prepared is not None and "labels" not in prepared.column_names:
            prepared = prepared.add_column("labels", [_labels(ids, mask) for ids, mask in
                                                      zip(prepared["input_ids"], prepared["loss_mask"], strict=True)])
        if prepared is not None and getattr(args, "shuffle_dataset", False):  # as TRL: every dataset it prepares
            prepared = prepared.shuffle(seed=args.seed)
        return prepared

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        """Evaluation batches packed as ``eval_packing`` says (None: as training's ``packing``)."""
        eval_packing = getattr(self.args, "eval_packing", None)
        if eval_packing is None or eval_packing == self.args.packing or not isinstance(self.data_collator,
                                                                                      LMCollator):
            return super().get_eval_dataloader(eval_dataset)
        train_collator = self.data_collator
        self.data_collator = self._default_collator(self.model, self.tokenizer_, self.args, pack=eval_packing)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _as_text_rows(self, dataset: Any, args: Any) -> Any:
        """Apply formatting_func, and read ``dataset_text_field`` as ``text`` (TRL's two ways to name the text)."""
        field = getattr(args, "dataset_text_field", "text")
        if self.formatting_func is None and field == "text":
            return dataset
        if isinstance(dataset, datasets.IterableDataset):  # a stream: formatted as it is read
            formatting_func = self.formatting_func
            if formatting_func is not None:
                return dataset.map(lambda r: {"text": formatting_func(r)}, remove_columns=_stream_columns(dataset))
            return dataset.map(lambda r: {"text": r[field]}, remove_columns=[field])
        rows = dataset.to_list() if isinstance(dataset, datasets.Dataset) else list(dataset)
        if self.formatting_func is not None:
            rows = [{"text": self.formatting_func(r)} for r in rows]
        else:
            rows = [{("text" if k == field else k): v for k, v in r.items() if k != "text"} for r in rows]
        return datasets.Dataset.from_list(rows)

    def _tokenize(self, raw: RawData, args: TrainConfig) -> tuple[list[dict[str, Any]], TokenizeReport]:
        settings = SFTTokenizeSettings(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                       completion_only_loss=getattr(args, "completion_only_loss", None),
                                       assistant_only_loss=getattr(args, "assistant_only_loss", None),
                                       chat=args.chat_template_for_text, truncation_mode=args.truncation_mode,
                                       chat_template_kwargs=args.chat_template_kwargs)
        return tokenize_sft_rows(raw.rows, self.tokenizer_, settings, source=raw.source, row_numbers=raw.row_numbers,
                                 row_label=raw.row_label, skip_invalid=args.on_invalid_row == "skip")

    def _default_collator(self, model: Any, tokenizer: Any, args: TrainConfig, pack: bool | None = None) -> Any:
        refusal = custom_mask_refusal(model)
        if (args.packing if pack is None else pack) and refusal is not None:
            logger.warning("packing: off for %s: %s", type(unwrap(model)).__name__, refusal)
        pack = (args.packing if pack is None else pack) and mask_kind(model) is not None
        # one row of spans where the speed boundary's attention runs each span alone (CPU SDPA; a sliding window
        # comes with transformers' mask, applied within each span), else masked rows (logps.kernel_mask)
        flat = pack and args.fast_path and args.device.type == "cpu" and takes_segments(unwrap(model))
        return LMCollator(tokenizer.pad_token_id, args.pad_to_multiple_of, pack=pack, flat=flat)

    def _predictions(self, model: Any, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> tuple[Any, Tensor]:
        """As TRL's SFTTrainer: the model's full logits ``[rows, L, vocab]`` and ``labels`` ``[rows, L]`` in row layout
        (a position's label is predicted by the position before it; -100 where no loss: prompt, padding, each
        sequence's first token), so TRL's compute_metrics functions work unchanged. This costs one more forward
        with full logits per evaluation batch (training's loss never builds them); it runs only when predictions
        are asked for (``compute_metrics`` set, or ``predict()``)."""
        logits = own_logits(model(**lm_inputs(model, inputs), use_cache=False).logits, inputs["input_ids"])
        return logits.detach(), inputs["labels"]

    def compute_loss(self, model: Any, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, dict]:
        stats = HeadStats("hits")
        path = self._speed.path if self._speed is not None else None
        if self.router is None:
            logps = lm_logps(model, inputs, path, stats)
        else:  # TRL 1.16's router loss over the batch's tokens, padding not counted (prefalign.router)
            with self.router.collect(model) as router_logits:
                logps = lm_logps(model, inputs, path, stats)
            self._aux_loss = load_balancing_loss(router_logits, inputs["token_mask"], self.router.num_experts,
                                                 self.router.top_k)
        if self.args.loss_type == "dft":  # Dynamic Fine-Tuning: each token's NLL times its (detached) probability
            token_losses = -logps.exp().detach() * logps
        else:
            token_losses = -logps
        if num_items_in_batch is not None:  # training: over the labelled tokens of the global batch
            loss = token_losses.sum() / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        else:
            loss = token_losses.sum() / max(token_losses.numel(), 1)
        # TRL: the aux loss is a per-micro-batch mean; over the global batch's tokens it is averaged over the steps
        steps = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
        loss = self.add_aux_loss(model, loss, steps)
        hits = stats.get("hits")
        if hits.numel():
            self.log_metric(model, "mean_token_accuracy", hits.float().mean())
        if model.training:
            tokens = inputs["token_count"].reshape(1)  # the batch's tokens, padding not counted
            self._trained_tokens += int(self.accelerator.gather_for_metrics(tokens).sum().item())
            self._metrics["train"]["num_tokens"] = [float(self._trained_tokens)]
        return (loss, {"logps": logps.detach()}) if return_outputs else loss


def _labels(ids: list[int], mask: list[int]) -> list[int]:
    """TRL's ``labels``: the token where the loss is taken, -100 elsewhere."""
    return [t if m else -100 for t, m in zip(ids, mask, strict=True)]


def _prepared_rows(dataset: Any, name: str) -> datasets.Dataset:
    """TRL's ``dataset_kwargs: {skip_prepare_dataset: true}``: rows already tokenized. ``input_ids`` are taken as
    they are; the loss covers ``completion_mask`` / ``assistant_masks`` where given, else the tokens whose
    ``labels`` are not -100, else every token (never the first: nothing predicts it)."""
    rows = dataset.to_list() if isinstance(dataset, datasets.Dataset) else list(dataset)
    return datasets.Dataset.from_list([{**_prepared_row(row, n, name), ROW_COLUMN: n}
                                       for n, row in enumerate(rows, start=1)])


def _prepared_row(row: dict[str, Any], n: int, name: str) -> dict[str, list[int]]:
    """One already-tokenized row (see _prepared_rows) as ``input_ids`` + ``loss_mask``."""
    from .errors import DataError

    ids = row.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
        raise DataError("has no input_ids list, and dataset_kwargs.skip_prepare_dataset says the rows are "
                        "already tokenized.", source=f"{name} dataset", row=n, field="input_ids",
                        fix="tokenize the rows first, or remove skip_prepare_dataset")
    mask = row.get("completion_mask") or row.get("assistant_masks")
    if mask is None and row.get("labels") is not None:
        mask = [int(label != -100) for label in row["labels"]]
    mask = [int(bool(m)) for m in (mask or [1] * len(ids))]
    if len(mask) != len(ids):
        raise DataError(f"its loss mask has {len(mask)} entries for {len(ids)} input_ids.",
                        source=f"{name} dataset", row=n, field="input_ids", fix="give one mask entry per token")
    return {"input_ids": ids, "loss_mask": [0, *mask[1:]]}


def _stream_columns(dataset: datasets.IterableDataset) -> list[str]:
    """A stream's columns (a generator's: those of its first row)."""
    return dataset.column_names or list(next(iter(dataset), {}).keys())
