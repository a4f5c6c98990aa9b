"""``--shard_base``: the frozen transformer sharded across the launch's processes (PyTorch FSDP2), the LoRA whole.

An erasure trains a LoRA of a few million weights on a frozen base of up to 12 billion (FLUX.1: about 24 GB in
bf16). When the base does not fit one card, each process keeps ``1/N`` of every frozen weight and gathers one
transformer block at a time for its forward and backward (``torch.distributed.fsdp.fully_shard`` on each block of
the family's :attr:`~.family.ModelFamily.shard_blocks`, then on the rest of the transformer). The LoRA's weights are
``ignored_params``: whole on every process, with gradients FSDP does not touch, so the bargained update sees exactly
what data parallelism gives it: each process's per-player gradients, all-reduced by
:class:`munba_diffusion.step.BargainedUpdate` before the Gram matrix. Every process takes the same step.

Why the trainer calls ``fully_shard`` itself rather than Accelerate's FSDP plugin: the plugin shards the models
handed to ``accelerator.prepare`` as a whole, trained weights included, so each player's LoRA gradient would arrive
as a slice; Accelerate enables the plugin on GPU launches only, so no CPU run could check it; and its checkpoints
expect one prepared model per optimizer. Accelerate still launches the processes and owns the process group.

Every forward of the sharded transformer is collective: all processes run it together (training, and the
before/after grid). The base never changes, so the export reloads it whole on the main process, from the files the
run loaded, and copies the trained LoRA in (:func:`reloaded_transformer`). The trainer saves a checkpoint first, so a reload that
fails (the base moved, the Hub unreachable) loses nothing: the same command with ``--resume_from_checkpoint latest``
exports again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from .base_model import load_base_transformer, loaded_folder
from .lora import add_erasure_lora, load_lora_state_dict, lora_state_dict


def shard_frozen_denoiser(
    model: nn.Module, block_lists: Sequence[str], trained: Sequence[nn.Parameter], device: torch.device
) -> None:
    """Shard ``model``'s frozen weights over every process of the default process group, one FSDP unit per block
    of each ``model.<name>`` in ``block_lists`` and one for the rest; ``trained`` (the LoRA) stays whole, moved to
    ``device``. Buffers and frozen shards move to ``device`` as FSDP places them."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415 (PyTorch 2.6+; preflight asks for 2.7)

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for param in trained:
        param.data = param.data.to(device)
    ignored = set(trained)
    for name in block_lists:
        for block in getattr(model, name):
            fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)


def local_elements(model: nn.Module) -> tuple[int, int]:
    """``(held here, in all)`` of the frozen weights' elements: what this process stores, and the model's total."""
    held = total = 0
    for param in model.parameters():
        if param.requires_grad:
            continue
        local = param.to_local() if hasattr(param, "to_local") else param
        held += local.numel()
        total += param.numel()
    return held, total


def reloaded_transformer(config, sharded: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The erased transformer whole, on the CPU, for the export (main process): the base reloaded in the training
    dtype (it never changed: only the LoRA trained), with the adapter of ``config.lora`` attached and the trained LoRA
    of ``sharded`` (whole on every process) copied in (every adapter weight, or an error).

    The base is read from the pipeline folder ``sharded`` was loaded from: for a Hub id, the cached snapshot of the
    commit the run started on, so a Hub update during the run cannot change the base under the trained LoRA. Only a
    transformer that does not name its folder is resolved again from ``--pretrained_model_name_or_path``."""
    folder = loaded_folder(sharded)
    if folder is not None and (folder / "model_index.json").is_file():
        source, revision = str(folder), None
    else:
        source, revision = config.pretrained_model_name_or_path, config.revision
    model = load_base_transformer(source, revision=revision, variant=config.variant, torch_dtype=dtype)
    add_erasure_lora(model, config.lora)
    load_lora_state_dict(model, {name: value.cpu() for name, value in lora_state_dict(sharded).items()})
    return model
