"""The erasure LoRA in the kohya key layout that ComfyUI, AUTOMATIC1111 and Forge load.

kohya's sd-scripts train Stable Diffusion 1.x/2.x on the diffusers UNet and name each adapted module
``lora_unet_`` + its diffusers module path with dots turned into underscores::

    down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k  (peft: ...to_k.lora_A.weight / lora_B.weight)
    -> lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight / .lora_up.weight
       lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha

``lora_down`` is peft's ``lora_A`` and ``lora_up`` its ``lora_B`` (Conv2d layers keep their kernel in ``lora_down``
and a 1x1 ``lora_up``, as in both formats). kohya applies ``up @ down * alpha / rank`` with ``rank`` =
``lora_down``'s first dimension, so each module's ``alpha`` is peft's scaling of that module times its rank: the
update is the same ``delta W`` peft applies (rank- and alpha-patterns and rsLoRA included). Every Linear and
Conv2d of the UNet converts (attention projections, feed-forward, ``proj_in``/``proj_out``, resnets' ``conv1``,
``conv2``, ``conv_shortcut`` and ``time_emb_proj``, down/up samplers, ``conv_in``, ``conv_out``, the timestep
embedding), with the names ComfyUI's LoRA key map and A1111's ``convert_diffusers_name_to_compvis`` look for
(checked here through diffusers' own kohya loader, which converts every one back to the same module). A
text-encoder LoRA (``--lora_on text_encoder|both``) is named the same way with the prefix ``lora_te_`` and the CLIP
text model's module path (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``), as kohya names SD 1.x/2.x's
text encoder (SDXL's two: ``lora_te1_`` and ``lora_te2_``). DoRA and LoRA biases have no kohya-LoRA equivalent and are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_PREFIXES = {"unet": KOHYA_UNET_PREFIX, "text_encoder": "lora_te_"}
KOHYA_SDXL_PREFIXES = {"unet": KOHYA_UNET_PREFIX, "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def kohya_lora_state_dict(
    model: torch.nn.Module, adapter_name: str, prefix: str = KOHYA_UNET_PREFIX
) -> dict[str, torch.Tensor]:
    """The adapter ``adapter_name`` of ``model`` (the UNet; the text encoder with ``prefix="lora_te_"``) as a kohya
    state dict (``lora_down``/``lora_up`` weights, ``alpha``)."""
    peft_state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(
                f"the LoRA holds {key!r}, which the kohya format (ComfyUI / A1111) cannot express; train a plain "
                "LoRA (no DoRA, no LoRA bias) to export one."
            )
        module = match["module"]
        if prefix.startswith("lora_te") and not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5 nests CLIP's layers one level less than kohya names them
        name = prefix + module.replace(".", "_")
        part = "lora_down" if match["part"] == "A" else "lora_up"
        kohya[f"{name}.{part}.weight"] = tensor.detach().contiguous()
        if part == "lora_down":
            scaling = model.get_submodule(match["module"]).scaling[adapter_name]
            rank = tensor.shape[0]
            kohya[f"{name}.alpha"] = torch.tensor(float(scaling) * rank, dtype=torch.float32)
    return kohya


def kohya_metadata(
    text_width: int | None, state_dict: Mapping[str, torch.Tensor], record: Mapping[str, Any]
) -> dict[str, str]:
    """The safetensors metadata A1111's and ComfyUI's LoRA browsers show (kohya ``ss_*`` keys) plus the erasure.

    ``text_width`` is the text embeddings' width (the UNet's ``cross_attention_dim``: 768 for SD 1.x, 1024 for
    SD 2.x, 2048 for SDXL). ``ss_network_dim`` / ``ss_network_alpha`` are written when every module shares them (the loaders use
    the per-module ``alpha`` tensors, never these)."""
    version = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}.get(
        text_width if isinstance(text_width, int) else 0
    )
    names = [concept["name"] for concept in record["concepts"]]
    base = str(record["pretrained_model_name_or_path"])
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_sd_model_name": base,
        "ss_training_comment": f"MUNBa concept erasure of {', '.join(names)} (munba-diffusion); apply at strength 1",
        "ss_v2": str(version == "sd_v2"),
        "munba_erasure": json.dumps({"concepts": names, "base_model": base}),
    }
    ranks = {tensor.shape[0] for key, tensor in state_dict.items() if key.endswith(".lora_down.weight")}
    alphas = {float(tensor) for key, tensor in state_dict.items() if key.endswith(".alpha")}
    if len(ranks) == 1 and len(alphas) == 1:
        metadata["ss_network_dim"] = str(ranks.pop())
        metadata["ss_network_alpha"] = str(alphas.pop())
    if version is not None:
        metadata["ss_base_model_version"] = version
    return metadata


def save_kohya_lora(
    models: Mapping[str, torch.nn.Module], adapter_name: str, record: Mapping[str, Any], path: str | Path
) -> Path:
    """Write the adapter of ``models`` (``unet`` and/or ``text_encoder``) as one kohya-layout safetensors file
    (with metadata) at ``path``."""
    path = Path(path)
    state_dict = {}
    prefixes = KOHYA_SDXL_PREFIXES if "text_encoder_2" in models else KOHYA_PREFIXES
    for component, model in models.items():
        state_dict.update(kohya_lora_state_dict(model, adapter_name, prefixes[component]))
    if "unet" in models:
        text_width = models["unet"].config.cross_attention_dim
    else:
        text_width = models["text_encoder"].config.hidden_size
    save_file(state_dict, str(path), metadata=kohya_metadata(text_width, state_dict, record))
    return path
