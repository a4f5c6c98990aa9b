"""Which layers the erasure LoRA trains, and the frozen teacher as the same model with adapters disabled.

Where the LoRA goes (``--lora_on``): the UNet (the default), the text encoder, or both. AdvUnlearn found the text
encoder the place where robust erasure transfers (an attack acts on the prompt, so a text encoder that no longer
maps any prompt near the concept is robust for every UNet it conditions); the bargaining is the same wherever the
adapter is. On the text encoder the LoRA adapts the self-attention projections (``q_proj``, ``k_proj``,
``v_proj``, ``out_proj``: the layers diffusers' LoRA training scripts adapt there).

UNet target sets (names as in ESD / MUNBa):

- ``xattn``:   cross-attention projections (``attn2.to_q/k/v/out.0``): what text conditioning flows through;
- ``noxattn``: every Linear/Conv2d except cross-attention and the timestep embedding (ESD's and MUNBa's nudity
  setting; for SDXL also except ``add_embedding``, which carries the pooled text embedding);
- ``attn``:    self- and cross-attention projections;
- ``full``:    every Linear/Conv2d layer peft can adapt.

Transformer target sets (SD3's and FLUX's MMDiT, where text and image tokens share joint attention and there is
no separate cross-attention):

- ``xattn``:   the prompt's own layers, the nearest analogue of the UNet's cross-attention: the text stream's
  projections (``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out``, through whose keys and values the image
  tokens read the prompt) and the prompt's two embeddings, ``context_embedder`` (its tokens) and
  ``time_text_embed.text_embedder`` (its pooled CLIP vector). The pooled vector is added to the timestep
  embedding that modulates every block, so it conditions the image without any attention: on the bundled flow
  demo it alone decides colour and shape (tokens of "a red circle" with the pooled vector of "a blue circle" draw
  blue circles: ``benchmarks/prompt_channels.py``), and a LoRA on the text stream alone has to fight it
  (BENCHMARKS.md section 10);
- ``image``:   the image stream's projections in the joint blocks (``attn.to_q/to_k/to_v/to_out.0``, and SD3.5
  Medium's second image self-attention ``attn2`` in its ``dual_attention_layers``);
- ``single``:  FLUX's single-stream blocks (``attn.to_q/to_k/to_v``, ``proj_mlp``, ``proj_out``; FLUX only);
- ``attn``:    every attention projection (text stream, image stream, and FLUX's single-stream attention) and,
  as ``xattn``, the prompt's embeddings;
- ``noxattn``: every Linear in the transformer blocks except the text stream's projections (the prompt's
  embeddings are outside the blocks);
- ``full``:    every Linear layer.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

TARGET_SETS = ("xattn", "noxattn", "attn", "full", "image", "single")
# Bumped whenever a transformer target set adapts other layers, so that results made under one meaning of a name
# are never continued under another. 2 (2026-12-01): xattn and attn gained the prompt's embeddings. Not bumped
# (2026-12-02) when image and attn gained SD3.5 Medium's second attention (attn2): no other model's layers changed,
# and a checkpoint made before on SD3.5 Medium is refused by its missing attn2 weights (load_lora_state_dict).
TRANSFORMER_TARGET_SETS_REVISION = 2
UNET_TARGET_SETS = ("xattn", "noxattn", "attn", "full")
_PROMPT_LAYERS = (  # xattn on a transformer: the text stream's projections and the prompt's two embeddings
    r"(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|^context_embedder|^time_text_embed\.text_embedder\.linear_[12])$"
)
_IMAGE_STREAM = r"^transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0)$"  # attn2: SD3.5-Medium
_SINGLE_ATTN = r"^single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)$"
_SINGLE = r"^single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)$"
LORA_MODULES = ("unet", "text_encoder", "both")
_ATTN_PROJ = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_NAME = "erasure"


@dataclass(frozen=True)
class ErasureLoraConfig:
    """LoRA settings of an erasure run."""

    rank: int = 4
    alpha: float | None = None  # None = rank (scale 1)
    target: str = "xattn"
    dropout: float = 0.0
    modules: str = "unet"  # where the adapter goes: unet, text_encoder or both

    def __post_init__(self) -> None:
        if self.target not in TARGET_SETS:
            raise ValueError(f"unknown LoRA target set {self.target!r}; choose one of {', '.join(TARGET_SETS)}")
        if self.modules not in LORA_MODULES:
            raise ValueError(f"unknown --lora_on {self.modules!r}; choose one of {', '.join(LORA_MODULES)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @property
    def on_unet(self) -> bool:
        return self.modules in ("unet", "both")

    @property
    def on_text_encoder(self) -> bool:
        return self.modules in ("text_encoder", "both")


def _is_transformer(model: nn.Module) -> bool:
    return hasattr(model, "transformer_blocks") and not hasattr(model, "down_blocks")


def transformer_module_names(model: nn.Module, target: str) -> list[str]:
    """Full module names of an SD3 / FLUX transformer that the target set adapts (see the module docstring)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        text = re.search(_PROMPT_LAYERS, name) is not None
        in_blocks = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        keep = {
            "xattn": text,
            "image": re.search(_IMAGE_STREAM, name) is not None,
            "single": re.search(_SINGLE, name) is not None,
            "attn": text or re.search(_IMAGE_STREAM, name) is not None or re.search(_SINGLE_ATTN, name) is not None,
            "noxattn": in_blocks and not text,
            "full": True,
        }[target]
        if keep:
            names.append(name)
    if not names:
        raise ValueError(f"the transformer has no layers in target set {target!r}")
    return names


def target_module_names(unet: nn.Module, target: str) -> list[str]:
    """Full module names of ``unet`` (the denoiser: a UNet, or an SD3 / FLUX transformer) that the target set
    adapts."""
    if target not in TARGET_SETS:
        raise ValueError(f"unknown LoRA target set {target!r}; choose one of {', '.join(TARGET_SETS)}")
    if _is_transformer(unet):
        return transformer_module_names(unet, target)
    if target not in UNET_TARGET_SETS:
        raise ValueError(
            f"LoRA target set {target!r} is for SD3 / FLUX transformers; a UNet takes {', '.join(UNET_TARGET_SETS)}"
        )
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
            keep = ".attn2." not in f".{name}." and not name.startswith(("time_embedding", "add_embedding"))
        else:
            keep = True
        if keep:
            names.append(name)
    if not names:
        raise ValueError(f"the UNet has no layers in target set {target!r}")
    return names


def text_encoder_module_names(text_encoder: nn.Module) -> list[str]:
    """The text encoder's LoRA targets: its self-attention projections, by their own names (``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj``, as diffusers' training scripts list them), which match however the model nests them
    (transformers 4's ``text_model.encoder...`` or 5's ``encoder...``)."""
    found = {n.rsplit(".", 1)[-1] for n, m in text_encoder.named_modules() if isinstance(m, nn.Linear)}
    names = [n for n in TEXT_ENCODER_TARGETS if n in found]
    if len(names) != len(TEXT_ENCODER_TARGETS):
        raise ValueError(
            f"the text encoder lacks self-attention projections {', '.join(TEXT_ENCODER_TARGETS)}; use --lora_on unet"
        )
    return names


def _lora_config(config: ErasureLoraConfig, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha or config.rank,
        lora_dropout=config.dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
    )


def _trainable_float32(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # LoRA weights train in float32 even when the model runs in half precision
        p.data = p.data.float()
    return params


def add_erasure_lora(unet, config: ErasureLoraConfig) -> list[nn.Parameter]:
    """Freeze ``unet``, attach the erasure adapter and return its (float32) trainable parameters."""
    unet.requires_grad_(False)
    unet.add_adapter(_lora_config(config, target_module_names(unet, config.target)), adapter_name=ADAPTER_NAME)
    return _trainable_float32(unet)


def add_text_encoder_lora(text_encoder, config: ErasureLoraConfig) -> list[nn.Parameter]:
    """Freeze the text encoder, attach the erasure adapter to its self-attention projections and return its
    (float32) trainable parameters.

    peft injects the adapter itself (leaving ``text_encoder.peft_config`` as transformers' ``add_adapter`` would):
    transformers 5's PEFT integration refuses peft older than 0.22.
    """
    text_encoder.requires_grad_(False)
    lora = _lora_config(config, text_encoder_module_names(text_encoder))
    inject_adapter_in_model(lora, text_encoder, adapter_name=ADAPTER_NAME)
    return _trainable_float32(text_encoder)


def add_erasure_loras(pipe, config: ErasureLoraConfig) -> list[nn.Parameter]:
    """The erasure adapter on the UNet and/or the text encoder(s) (``config.modules``); the trained parameters, the
    UNet's first."""
    params = add_erasure_lora(denoiser(pipe), config) if config.on_unet else []
    if config.on_text_encoder:
        for encoder in text_encoders(pipe):  # SDXL: both
            params += add_text_encoder_lora(encoder, config)
    return params


def denoiser(pipe) -> nn.Module:
    """The pipeline's denoiser: its UNet, or its transformer (SD3, FLUX)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def text_encoders(pipe) -> list[nn.Module]:
    """The pipeline's text encoders (SDXL and FLUX have two, SD3 three: its T5 may be absent)."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None]


def has_adapters(model) -> bool:
    return bool(getattr(model, "peft_config", None))


@contextmanager
def adapters_disabled(*models) -> Iterator[None]:
    """The frozen teacher: the same UNet (and text encoder) with adapters off (outputs equal the original model's
    exactly). Models without adapters are left as they are.

    ``disable_adapters`` also clears ``requires_grad`` of the adapter weights; ``enable_adapters`` restores it.
    """
    adapted = [model for model in models if has_adapters(model)]
    for model in adapted:
        _enable_adapters(model, False)
    try:
        yield
    finally:
        for model in adapted:
            _enable_adapters(model, True)


def _enable_adapters(model: nn.Module, enabled: bool) -> None:
    """What diffusers' ``enable_adapters`` / ``disable_adapters`` do, for any model (peft's layers themselves)."""
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's weights (peft naming), for checkpoints."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}


class StaleLoraTargetsError(ValueError):
    """A checkpoint's LoRA was made with an older meaning of its target set (no file of it is damaged)."""


def load_lora_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`lora_state_dict` (strict: every adapter weight must be present)."""
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora" in k]
    if not missing:
        return
    embeddings = [k for k in missing if k.startswith(("context_embedder.", "time_text_embed.text_embedder."))]
    second = [k for k in missing if re.match(r"transformer_blocks\.\d+\.attn2\.", k)]
    if embeddings and len(embeddings) + len(second) == len(missing):  # revision 2 added them: a run made before it
        raise StaleLoraTargetsError(
            f"checkpoint LoRA has no weights for the prompt's embeddings ({embeddings[0]}): it was made before xattn "
            f"and attn on SD3 / FLUX reached them (target sets revision {TRANSFORMER_TARGET_SETS_REVISION}) and cannot "
            "be continued; start a new run (a new --output_dir, or --overwrite_output_dir)"
        )
    if len(second) == len(missing):  # SD3.5 Medium's second attention, which image and attn reach since 2026-12-02
        raise StaleLoraTargetsError(
            f"checkpoint LoRA has no weights for SD3.5 Medium's second attention ({second[0]}): it was made before "
            "image and attn reached it and cannot be continued; start a new run (a new --output_dir, or "
            "--overwrite_output_dir)"
        )
    raise ValueError(
        f"checkpoint LoRA is missing {len(missing)} weights (e.g. {missing[0]}); was it made with the same "
        "--lora_target, --lora_on and --rank?"
    )
