"""KTOTrainer: Kahneman-Tversky Optimization on unpaired feedback (and on pairs, split into rows), TRL 1.13's numbers.

Each row is laid out as a pair whose chosen reply is its completion and whose rejected reply is its KL completion
(data/unpaired.py): ``[prompt | completion | KL completion]`` under the prefix-sharing mask, in which the KL
completion sees the prompt but not the completion. TRL's KL sequence is exactly that, ``prompt_i`` + another row's
completion, so one forward gives both log-probs and the prompt is computed once; the padded-pairs collator (flash
attention) gives the two sequences TRL runs. So the fast path, packing, the reference precompute and its disk cache
(DPOTrainer's) work unchanged: ``ref_chosen_logps`` holds the reference log-probs of the completion,
``ref_rejected_logps`` those of the KL completion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import Tensor
from transformers import PreTrainedModel, TrainerCallback

from .config import KTOConfig
from .data.load import ROW_COLUMN, skipped_entries, validated_rows
from .data.unpaired import UNPAIRED_ROWS, tokenize_unpaired, unpair_rows, weight_advice
from .errors import DataError
from .logps import PairLogps
from .losses import kto_loss
from .trainer import TOKENIZED_COLUMNS, DPOTrainer, row_options

logger = logging.getLogger("prefalign")


@dataclass
class UnpairedCollator:
    """A pair collator's batch of rows (completion as chosen, KL completion as rejected) plus each row's ``label``.
    The label comes first, so the Trainer's find_batch_size counts rows, not the packed rows of the model input."""

    pairs: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.pairs(examples)
        if "label" not in examples[0]:  # the reference precompute collates token ids only
            return batch
        return {"label": torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool), **batch}


class KTOTrainer(DPOTrainer):
    """Kahneman-Tversky Optimization (`prefalign.losses.kto_loss`), TRL 1.13's KTOTrainer signature and metrics.

    Rows: ``prompt`` / ``completion`` / ``label`` (text or messages; `data.unpaired`), or preference pairs, each
    split into a desirable and an undesirable row. Reference: as DPOTrainer (``ref_model``; with PEFT, the adapter
    disabled; else the untrained policy), precomputed and cached by default. The KL reference point
    ``z0 = max(0, mean over the batch of log pi(y'|x) - log pi_ref(y'|x))`` on mismatched pairs (each row's own prompt
    with its KL completion), averaged over processes and detached, as TRL. Logged: ``kl``, ``rewards/chosen``,
    ``rewards/rejected``, ``logps/chosen``, ``logps/rejected`` (each a batch's sum over its desirable / undesirable
    rows over their count, for batches that have such rows) and ``rewards/margins`` (batches that have both).
    """

    config_class = KTOConfig
    method = "kto"
    args: KTOConfig

    def __init__(self, model: str | PreTrainedModel | None = None, ref_model: str | PreTrainedModel | None = None,
                 args: KTOConfig | None = None, data_collator: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, compute_metrics: Any = None,
                 callbacks: list[TrainerCallback] | None = None, optimizers: tuple[Any, Any] = (None, None),
                 peft_config: Any = None, tokenizer: Any = None) -> None:
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         compute_metrics, callbacks, optimizers, peft_config, tokenizer)
        if data_collator is None:  # the reference precompute above needed only the pair layout
            self.data_collator = UnpairedCollator(self.data_collator)

    def _prepare_dataset(self, dataset: Any, name: str, args: KTOConfig) -> datasets.Dataset | None:  # type: ignore[override]
        """Unpaired rows (pairs split), validated once, tokenized with each row's KL completion; the class balance
        and TRL's weight check are logged for the training set."""
        if dataset is None:
            return None
        if isinstance(dataset, datasets.Dataset) and {*TOKENIZED_COLUMNS, "label"} <= set(dataset.column_names):
            return dataset
        raw = unpair_rows(validated_rows(dataset, name=f"{name} dataset", schema=UNPAIRED_ROWS, **row_options(args)))
        rows, report = tokenize_unpaired(
            raw.rows, self.tokenizer_, self._tokenize_settings(args),
            kl_chunk=args.per_device_train_batch_size if args.calculate_kl else None, source=raw.source,
            row_numbers=raw.row_numbers, row_label=raw.row_label, skip_invalid=args.on_invalid_row == "skip")
        dropped = {s.pop("index") for s in report.skipped}
        numbers = [n for i, n in enumerate(raw.row_numbers) if i not in dropped]
        if not rows:
            raise DataError(f"every row is invalid ({len(report.skipped) + len(raw.skipped)} skipped under "
                            "on_invalid_row=skip); nothing is left to train on.", source=raw.source,
                            fix="run `prefalign data check` on the data to list the problems")
        report.skipped = sorted(skipped_entries(raw) + report.skipped, key=lambda s: s["row"])
        report.rows += len(raw.skipped)
        report.converted_from, report.pairing = raw.converted_from, raw.pairing
        self.data_reports[name] = report
        for line in report.lines():
            logger.warning("%s: %s", raw.source, line)
        if name == "train":
            advice = weight_advice(report.desirable, report.undesirable, args.desirable_weight,
                                   args.undesirable_weight)
            if advice:
                logger.warning("%s: %s", raw.source, advice)
        return datasets.Dataset.from_list([{**r, ROW_COLUMN: n} for r, n in zip(rows, numbers, strict=True)])

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = TOKENIZED_COLUMNS + ["label", "ref_chosen_logps", "ref_rejected_logps"]

    def _weighted(self, out: PairLogps) -> tuple[Tensor, Tensor]:
        return out.chosen, out.rejected  # summed log-probs of the completion and of the KL completion

    def pair_losses(self, model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        args = self.args
        policy = self.batch_logps(model, inputs)
        ref_completion, ref_kl = self._reference_logps(model, inputs)
        if args.calculate_kl:
            kl = (policy.rejected - ref_kl).mean().detach()
            kl = self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)
        else:
            kl = torch.zeros((), device=policy.chosen.device)
        logratios = policy.chosen - ref_completion
        losses = kto_loss(logratios, inputs["label"], kl, beta=args.beta, desirable_weight=args.desirable_weight,
                          undesirable_weight=args.undesirable_weight, loss_type=args.loss_type)
        metrics = {"rewards": args.beta * logratios.detach(), "logps": policy.chosen.detach(),
                   "label": inputs["label"].bool(), "kl": kl}
        return losses, metrics

    def compute_loss(self, model: Any, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, dict]:
        losses, metrics = self.pair_losses(model, inputs)
        loss = losses.mean()  # TRL's mean over the concatenated desirable and undesirable losses
        self._record(self._metrics["train" if model.training else "eval"], metrics)
        return (loss, metrics) if return_outputs else loss

    def _record(self, store: dict[str, list[float]], m: dict[str, Tensor]) -> None:
        """TRL 1.13's bookkeeping: per batch, the sum over the desirable (undesirable) rows of all processes over
        their count, only for batches that have such rows; margins for batches that have both."""
        gather = self.accelerator.gather_for_metrics
        store["kl"].append(m["kl"].item())
        labels = m["label"]
        counts = {}
        for name, rows in (("chosen", labels), ("rejected", ~labels)):
            counts[name] = gather(rows.sum()).sum().item()
            if counts[name] > 0:
                for key in ("rewards", "logps"):
                    total = gather(m[key][rows].float().nansum()).nansum().item()
                    store[f"{key}/{name}"].append(total / counts[name])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            store["rewards/margins"].append(store["rewards/chosen"][-1] - store["rewards/rejected"][-1])
