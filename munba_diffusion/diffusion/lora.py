"""Which UNet layers the erasure LoRA trains, and the frozen teacher as the same UNet with adapters disabled.

Target sets (names as in ESD / MUNBa):

- ``xattn``:   cross-attention projections (``attn2.to_q/k/v/out.0``): what text conditioning flows through;
- ``noxattn``: every Linear/Conv2d except cross-attention and the timestep embedding (ESD's and MUNBa's nudity
  setting);
- ``attn``:    self- and cross-attention projections;
- ``full``:    every Linear/Conv2d layer peft can adapt.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

TARGET_SETS = ("xattn", "noxattn", "attn", "full")
_ATTN_PROJ = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
ADAPTER_NAME = "erasure"


@dataclass(frozen=True)
class ErasureLoraConfig:
    """LoRA settings of an erasure run."""

    rank: int = 4
    alpha: float | None = None  # None = rank (scale 1)
    target: str = "xattn"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.target not in TARGET_SETS:
            raise ValueError(f"unknown LoRA target set {self.target!r}; choose one of {', '.join(TARGET_SETS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")


def target_module_names(unet: nn.Module, target: str) -> list[str]:
    """Full module names of ``unet`` that the target set adapts."""
    if target not in TARGET_SETS:
        raise ValueError(f"unknown LoRA target set {target!r}; choose one of {', '.join(TARGET_SETS)}")
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        is_attn = re.search(_ATTN_PROJ, name) is not None
        is_xattn = is_attn and ".attn2." in f".{name}"
        if target == "xattn":
            keep = is_xattn
        elif target == "attn":
            keep = is_attn
        elif target == "noxattn":
            keep = ".attn2." not in f".{name}." and not name.startswith("time_embedding")
        else:
            keep = True
        if keep:
            names.append(name)
    if not names:
        raise ValueError(f"the UNet has no layers in target set {target!r}")
    return names


def add_erasure_lora(unet, config: ErasureLoraConfig) -> list[nn.Parameter]:
    """Freeze ``unet``, attach the erasure adapter and return its (float32) trainable parameters."""
    unet.requires_grad_(False)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha or config.rank,
        lora_dropout=config.dropout,
        init_lora_weights="gaussian",
        target_modules=target_module_names(unet, config.target),
    )
    unet.add_adapter(lora, adapter_name=ADAPTER_NAME)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # LoRA weights train in float32 even when the UNet runs in half precision
        p.data = p.data.float()
    return params


@contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """The frozen teacher: the same UNet with its adapters off (outputs equal the original model's exactly).

    ``disable_adapters`` also clears ``requires_grad`` of the adapter weights; ``enable_adapters`` restores it.
    """
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights (peft naming), for checkpoints."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}


def load_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`lora_state_dict` (strict: every adapter weight must be present)."""
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora" in k]
    if missing:
        raise ValueError(
            f"checkpoint LoRA is missing {len(missing)} weights (e.g. {missing[0]}); was it made with the same --lora_target and --rank?"
        )
