"""Train a tiny model a few steps with the speed path on, alone or as one of several CPU processes (DDP, or FSDP2
through the Trainer's ``fsdp`` arguments), and write the per-step losses: run by test_sharding.py.

    python shard_worker.py METHOD BATCH OUT [--fsdp full|sharded] [--lora] [--tied] [--save-steps N] [--resume DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import datasets

from prefalign import (
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    SFTConfig,
    SFTTrainer,
)
from tiny import conversational_rows, smollm2_tokenizer, tiny_llama

METHODS = {"dpo": (DPOConfig, DPOTrainer), "dpo-live": (DPOConfig, DPOTrainer), "orpo": (ORPOConfig, ORPOTrainer),
           "cpo": (CPOConfig, CPOTrainer), "kto": (KTOConfig, KTOTrainer), "sft": (SFTConfig, SFTTrainer)}


def _count_deepspeed_processes() -> None:
    """On a machine without GPUs accelerate's state counts one process under DeepSpeed (its backend is None), while
    DeepSpeed has started torch.distributed over gloo with all of them: give the state the real counts (a test-only
    stand-in for what accelerate does on GPUs)."""
    import torch.distributed as dist
    from accelerate.state import PartialState

    state = PartialState()
    if dist.is_initialized() and state.num_processes != dist.get_world_size():
        state.backend, state.num_processes = "gloo", dist.get_world_size()
        state.process_index, state.local_process_index = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("batch", type=int)
    parser.add_argument("out")
    parser.add_argument("--fsdp", choices=["full", "sharded"])
    parser.add_argument("--zero", type=int, choices=[2, 3], help="DeepSpeed ZeRO stage (deepspeed installed)")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tok = smollm2_tokenizer()
    config_class, trainer_class = METHODS[opts.method]
    extra = {"precompute_ref_log_probs": False} if opts.method == "dpo-live" else {}
    if opts.fsdp:
        state = "FULL_STATE_DICT" if opts.fsdp == "full" else "SHARDED_STATE_DICT"
        extra.update(fsdp=True, fsdp_config={"version": 2, "state_dict_type": state, "reshard_after_forward": True,
                                             "cpu_ram_efficient_loading": False})
    cpu = {"use_cpu": True}
    if opts.zero:
        # accelerate takes DeepSpeed only when not told use_cpu; on a machine without GPUs the gloo backend, named
        # here, then gives it the processes (DeepSpeed's CPU accelerator falls back to gloo without oneCCL)
        cpu = {"use_cpu": False, "ddp_backend": "gloo"}
        zero = {"stage": opts.zero, "stage3_gather_16bit_weights_on_model_save": True}  # whole weights saved
        extra["deepspeed"] = {"zero_optimization": zero, "zero_allow_untested_optimizer": True,
                              "train_micro_batch_size_per_gpu": "auto",  # no train_batch_size: DeepSpeed's own
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    saving = {"save_strategy": "steps", "save_steps": opts.save_steps} if opts.save_steps else {"save_strategy": "no"}
    args = config_class(**extra, **saving, output_dir=opts.out, per_device_train_batch_size=opts.batch,
                        max_steps=opts.steps, learning_rate=1e-3, report_to=[], **cpu, max_length=96, seed=0,
                        logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant")
    if opts.zero:
        _count_deepspeed_processes()
    peft = None
    if opts.lora:
        from peft import LoraConfig

        peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                          task_type="CAUSAL_LM")
    model = tiny_llama(tok, 1, tie_word_embeddings=opts.tied)
    trainer = trainer_class(model, args=args, train_dataset=datasets.Dataset.from_list(conversational_rows(16)),
                            processing_class=tok, peft_config=peft)
    trainer.train(resume_from_checkpoint=opts.resume)
    trainer.save_model(f"{opts.out}/final")
    reference = getattr(trainer, "reference_cache", {}).get("train")
    with open(f"{opts.out}/process-{trainer.args.process_index}.json", "w") as f:
        json.dump({"reference": reference[0] if reference else None, "fsdp": trainer.is_fsdp_enabled,
                   "deepspeed": trainer.is_deepspeed_enabled,
                   "world": trainer.accelerator.num_processes}, f)
    if trainer.is_world_process_zero():
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        with open(f"{opts.out}/losses.json", "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()
