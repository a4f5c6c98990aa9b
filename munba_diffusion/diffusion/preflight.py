"""What a run needs from the machine, checked before any model loads: trackers, xformers, the Hub, the launcher and
its processes.

Each missing piece is one line that names the install command or the working launch command.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from huggingface_hub import get_token

from ..io import is_offline
from .config import ErasureTrainingConfig

MULTI_CPU_COMMAND = "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N train_erase.py ..."
MULTI_GPU_COMMAND = "accelerate launch --multi_gpu --num_processes N train_erase.py ..."


def check_run_environment(config: ErasureTrainingConfig) -> None:
    """Raise a one-line ValueError for a tracker, attention kernel or Hub upload this machine cannot provide."""
    for tracker in ("tensorboard", "wandb"):
        if config.report_to == tracker and importlib.util.find_spec(tracker) is None:
            raise ValueError(
                f"--report_to {tracker} needs the {tracker} package: pip install "
                f'"munba-diffusion[{tracker}]" (or --report_to none)'
            )
    if config.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs xformers (GPU only): pip install "
            '"munba-diffusion[xformers]", or drop the flag (PyTorch\'s SDPA attention is the default)'
        )
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--use_8bit_adam needs bitsandbytes (GPU): pip install bitsandbytes, or drop the flag")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1"):
        raise ValueError(
            "the trainer shards with its own --shard_base, not Accelerate's FSDP plugin (which would shard the LoRA "
            f"too): launch data parallel (`{MULTI_GPU_COMMAND}`) and add --shard_base when the base does not fit a GPU"
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1"):
        raise ValueError(
            "the trainer does not support DeepSpeed (it would copy the whole model to every GPU): launch data parallel "
            f"(`{MULTI_GPU_COMMAND}`), with --shard_base on SD3 / FLUX when the base does not fit a GPU"
        )
    if config.shard_base and tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 7):
        raise ValueError(
            f"--shard_base needs PyTorch 2.7 or newer (FSDP2's fully_shard with ignored_params), this is "
            f"{torch.__version__}: pip install -U torch, or drop --shard_base"
        )
    if config.shard_base and launched_processes() < 2:
        raise ValueError(
            "--shard_base splits the base model across processes and this launch has one: launch several "
            f"(`{MULTI_GPU_COMMAND}`; on CPUs `{MULTI_CPU_COMMAND}`), or drop --shard_base"
        )
    if config.push_to_hub:
        if is_offline():
            raise ValueError(
                "--push_to_hub cannot upload while offline (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE, or "
                "drop --push_to_hub and upload the folder later with `hf upload`"
            )
        if not (config.hub_token or get_token()):
            raise ValueError("--push_to_hub needs a Hub token: run `hf auth login` or pass --hub_token")


def launched_processes() -> int:
    """How many processes the launcher was asked for: WORLD_SIZE (torchrun, accelerate multi-process) or, for
    ``accelerate launch --num_processes N`` that fell back to one process, the launcher's own command line."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return world
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux, or no access: nothing more to learn
        return world
    if not any("accelerate" in part for part in parent) or "--num_processes" not in parent:
        return world
    value = parent[parent.index("--num_processes") + 1] if parent.index("--num_processes") + 1 < len(parent) else ""
    return int(value) if value.isdigit() else world


def check_processes(num_processes: int) -> None:
    """Refuse a launch whose processes each see only themselves (they would all write one folder)."""
    asked = launched_processes()
    if asked > 1 and num_processes == 1:
        raise ValueError(
            f"launched as {asked} processes but each one runs alone (no distributed backend); on CPUs "
            f"run `{MULTI_CPU_COMMAND}`, on GPUs `{MULTI_GPU_COMMAND}`, or launch one process"
        )
