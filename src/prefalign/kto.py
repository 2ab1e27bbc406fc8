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

from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import Tensor
from transformers import PreTrainedModel, TrainerCallback

from .config import KTOConfig, TrainConfig
from .data.load import RawData
from .data.tokenize import TokenizeReport
from .data.unpaired import UNPAIRED_ROWS, tokenize_unpaired, unpair_rows, weight_advice
from .logps import PairLogps
from .losses import kto_loss
from .trainer import TOKENIZED_COLUMNS, DPOTrainer


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
    ``compute_metrics`` gets per-row ``rewards`` / ``logps`` / ``kl`` arrays and each row's label (see _predictions).
    """

    config_class = KTOConfig
    method = "kto"
    aux_with_rejected = False  # TRL's router loss comes from the completions' forward, not the KL completions'
    schema = UNPAIRED_ROWS
    tokenized_columns = TOKENIZED_COLUMNS + ["label"]
    args: KTOConfig

    def __init__(self, model: str | PreTrainedModel | None = None, ref_model: str | PreTrainedModel | None = None,
                 args: KTOConfig | None = None, data_collator: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, compute_metrics: Any = None,
                 callbacks: list[TrainerCallback] | None = None, optimizers: tuple[Any, Any] = (None, None),
                 peft_config: Any = None, tokenizer: Any = None, preprocess_logits_for_metrics: Any = None) -> None:
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         compute_metrics, callbacks, optimizers, peft_config, tokenizer,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        if data_collator is None:  # the reference precompute above needed only the pair layout
            self.data_collator = UnpairedCollator(self.data_collator)

    def _prepare_dataset(self, dataset: Any, name: str, args: TrainConfig) -> Any:
        """As the pair trainers'; the completion's ids also under TRL's KTO name, ``completion_ids``."""
        prepared = super()._prepare_dataset(dataset, name, args)
        if isinstance(prepared, datasets.IterableDataset):  # a stream: the same column, row by row
            return prepared.map(lambda r: {"completion_ids": r["chosen_ids"]})
        if prepared is not None and "completion_ids" not in prepared.column_names:
            prepared = prepared.add_column("completion_ids", prepared["chosen_ids"])
        return prepared

    def _rows(self, raw: RawData, args: TrainConfig) -> RawData:
        return unpair_rows(raw)  # preference pairs become one desirable and one undesirable row

    def _tokenize(self, raw: RawData, args: TrainConfig) -> tuple[list[dict[str, Any]], TokenizeReport]:
        """Each row tokenized with its KL completion (its neighbour's, within chunks of the train batch size)."""
        return tokenize_unpaired(
            raw.rows, self.tokenizer_, self._tokenize_settings(args),
            kl_chunk=args.per_device_train_batch_size if args.calculate_kl else None, source=raw.source,
            row_numbers=raw.row_numbers, row_label=raw.row_label, skip_invalid=args.on_invalid_row == "skip")

    def _advice(self, report: TokenizeReport, name: str, args: TrainConfig) -> list[str]:
        """TRL's check of the class weights against the class balance, for the training set."""
        if name != "train":
            return []
        advice = weight_advice(report.desirable, report.undesirable, args.desirable_weight, args.undesirable_weight)
        return [advice] if advice else []

    def _weighted(self, out: PairLogps) -> tuple[Tensor, Tensor]:
        return out.chosen, out.rejected  # summed log-probs of the completion and of the KL completion

    def pair_losses(self, model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        args = self.args
        policy = self.batch_logps(model, inputs, policy=True)
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

    def _predictions(self, model: Any, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> tuple[Any, Tensor]:
        """Per row: ``{"rewards": beta * (policy - reference) log-prob of the completion, "logps": the policy's,
        "kl": the batch's KL estimate repeated}``, and label ids ``[B]``: 1 desirable, 0 undesirable (TRL's label)."""
        label = outputs["label"].long()
        rows = label.shape[0]
        return {"rewards": outputs["rewards"].float(), "logps": outputs["logps"].float(),
                "kl": outputs["kl"].detach().float().reshape(1).expand(rows).clone()}, label

    def compute_loss(self, model: Any, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, dict]:
        losses, metrics = self.pair_losses(model, inputs)
        loss = self.add_aux_loss(model, losses.mean())  # TRL's mean over the concatenated desirable and undesirable
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
