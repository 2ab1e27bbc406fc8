"""Train a tiny model for a few steps and write the per-step losses: run by test_multiprocess.py, alone or under
`accelerate launch` with several CPU processes."""

from __future__ import annotations

import json
import sys

import datasets

from prefalign import DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer
from tiny import conversational_rows, smollm2_tokenizer, tiny_llama


def main() -> None:
    method, batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(16))
    cls = ORPOConfig if method == "orpo" else DPOConfig
    extra = {"loss_type": ["sigmoid", "sft"]} if method == "dpo-rpo" else {}  # RPO: a token-mean NLL term too
    args = cls(**extra, output_dir=out, per_device_train_batch_size=batch, max_steps=4, learning_rate=1e-3,
               report_to=[],
               use_cpu=True, max_length=96, seed=0, logging_steps=1, save_strategy="no", disable_tqdm=True,
               lr_scheduler_type="constant")
    if method != "orpo":
        trainer = DPOTrainer(tiny_llama(tok, 1), args=args, train_dataset=ds, processing_class=tok)
    else:
        trainer = ORPOTrainer(tiny_llama(tok, 1), args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    if method != "orpo":  # whether each process computed (its share of) the reference log-probs or read them
        with open(f"{out}/reference-{trainer.args.process_index}.json", "w") as f:
            json.dump(trainer.reference_cache["train"][0], f)
    if trainer.is_world_process_zero():
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        with open(f"{out}/losses.json", "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()
