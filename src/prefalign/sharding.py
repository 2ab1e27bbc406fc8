"""Sharded training (FSDP2, DeepSpeed ZeRO) beyond what `transformers.Trainer` does: FSDP on CPU processes, the live
reference sharded like the policy, and the few collective calls the reference precompute makes.

Which weights are sharded is asked in one place, speed/partition.py; this module acts on the whole run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger("prefalign")


def requested_fsdp_plugin(args: Any) -> Any | None:
    """The FSDP plugin a run asked for: the Trainer's ``fsdp`` / ``fsdp_config`` arguments, or ``accelerate launch``
    with an FSDP config (``ACCELERATE_USE_FSDP``, the plugin then read from the ``FSDP_*`` environment)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if getattr(args, "fsdp_plugin_args", None):
        return FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FullyShardedDataParallelPlugin()
    return None


def enable_fsdp_on_cpu(accelerator: Any, args: Any) -> bool:
    """Turn FSDP on for CPU processes (gloo) where it was asked for; True when it did.

    accelerate's state takes an FSDP plugin only for GPU-like devices: on CPU processes it keeps the distributed type
    ``MULTI_CPU`` and drops the plugin, so the run trains as plain data parallel without a word. FSDP2 itself runs on
    CPU over gloo, so the state is set to FSDP with the plugin asked for, as it would be on GPUs.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or getattr(state, "fsdp_plugin", None) is not None:
        return False
    plugin = requested_fsdp_plugin(args)
    if plugin is None:
        return False
    if plugin.fsdp_version != 2:
        from .errors import ConfigError

        raise ConfigError("FSDP version 1 does not run on CPU processes here. Fix: fsdp_version: 2 (fsdp_config "
                          "{'version': 2} or fsdp_version: 2 in the accelerate config).")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.info("FSDP2 on %d CPU processes (gloo)", accelerator.num_processes)
    return True


def shard_reference(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """A frozen reference model sharded as FSDP2 shards the policy (each decoder layer, then the rest), every unit
    resharded after its forward: each process holds 1/N of it between forwards. accelerate shards only a model that
    is prepared with its optimizer, so a live reference would otherwise be a whole copy on every process."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from .speed.allocator import decoder_layers

    if isinstance(model, FSDPModule):
        return model
    if any(p.device.type == "meta" for p in model.parameters()):
        from .errors import ConfigError

        raise ConfigError("the reference model has no weights on this process (FSDP's cpu_ram_efficient_loading "
                          "loads them on the main process only). Fix: fsdp_cpu_ram_efficient_loading: false, or "
                          "precompute_ref_log_probs: true.")
    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {"reshard_after_forward": True, "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
              "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def broadcast(value: Any) -> Any:
    """The main process's ``value`` on every process (any picklable object)."""
    _, size = world()
    if size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order, on every process."""
    _, size = world()
    if size == 1:
        return [value]
    out: list[Any] = [None] * size
    torch.distributed.all_gather_object(out, value)
    return out


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()
