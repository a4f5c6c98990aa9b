"""The kohya-layout LoRA (ComfyUI / AUTOMATIC1111 / Forge) in every erased folder: keys, alpha, metadata, and
diffusers' own kohya loader giving the images of the diffusers-layout LoRA, for attention and conv/linear targets."""

import json
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from munba_diffusion.diffusion.export import export_erased_model, kohya_lora_state_dict
from munba_diffusion.diffusion.lora import target_module_names
from munba_diffusion.pipelines.munba import KOHYA_LORA_WEIGHT_NAME, LORA_WEIGHT_NAME
from tests.tiny_sd import add_random_lora, build_tiny_sd_pipeline, tiny_erasure_config

torch.set_num_threads(1)  # the tiny models run ~50x slower when 2 threads fight other jobs for 2 cores

STEPS = 3
SAME_LORA_ATOL = 1e-6  # the same update applied by the same peft layers: float rounding at most
CLEARLY_DIFFERENT = 0.05
KOHYA_KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe("a red circle", num_inference_steps=STEPS, generator=generator, output_type="np").images


def base_with_lora(folder, weight_name: str):
    """The tiny base pipeline with a LoRA file of ``folder`` loaded by diffusers' own loader."""
    pipe = build_tiny_sd_pipeline(0)
    pipe.load_lora_weights(folder, weight_name=weight_name)
    return pipe


def adapted_modules(pipe) -> set[str]:
    return {name for name, module in pipe.unet.named_modules() if hasattr(module, "lora_A") and module.lora_A}


def full_lora_pipeline():
    """A LoRA on every Linear/Conv2d of the UNet (resnets, samplers, conv_in/out, time embedding, attention, ff),
    with ranks and alphas that differ per module and rsLoRA scaling, so each module's alpha carries its own scale."""
    pipe = build_tiny_sd_pipeline(0)
    targets = target_module_names(pipe.unet, "full")
    config = LoraConfig(
        r=4,
        lora_alpha=8.0,
        init_lora_weights="gaussian",
        target_modules=targets,
        rank_pattern={"conv_in": 2, "down_blocks.0.resnets.0.conv1": 3},
        alpha_pattern={"conv_out": 1.0, "time_embedding.linear_1": 5.0},
        use_rslora=True,  # scale alpha / sqrt(r): the kohya alpha (scale x rank) is not peft's lora_alpha
    )
    pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    pipe.unet.add_adapter(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    record = tiny_erasure_config()
    record["lora_target"] = "full"
    record["run"]["target_modules"] = sorted(pipe.unet.peft_config["default"].target_modules)  # as the trainer does
    return pipe, targets, record


@pytest.fixture(scope="module")
def attention_export(tmp_path_factory):
    trained = build_tiny_sd_pipeline(0)
    add_random_lora(trained)  # cross-attention targets, rank 4, alpha 8
    folder = export_erased_model(trained, tmp_path_factory.mktemp("kohya") / "erased", tiny_erasure_config())
    return folder, generate(trained)


def test_keys_alpha_and_metadata(attention_export):
    folder, _ = attention_export
    with safe_open(folder / KOHYA_LORA_WEIGHT_NAME, "pt") as weights:
        keys = set(weights.keys())
        metadata = weights.metadata()
        tensors = {key: weights.get_tensor(key) for key in keys}
    assert all(KOHYA_KEY.match(key) for key in keys)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0.alpha" in keys
    modules = {key.split(".")[0] for key in keys}
    assert len(keys) == 3 * len(modules) and len(modules) == 4 * 4  # q, k, v, out of 4 transformer blocks
    for module in modules:
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == 4
        assert tensors[f"{module}.alpha"].shape == () and tensors[f"{module}.alpha"].item() == 8.0  # alpha/rank = 2
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_sd_model_name"] == "CompVis/stable-diffusion-v1-4"
    assert json.loads(metadata["munba_erasure"])["concepts"] == ["circle"]
    assert "lora_adapter_metadata" not in metadata  # diffusers must read the keys as kohya's, not as its own


def test_kohya_file_loads_in_diffusers_like_the_diffusers_lora_attention(attention_export):
    folder, trained_images = attention_export
    kohya = base_with_lora(folder, KOHYA_LORA_WEIGHT_NAME)
    diffusers_layout = base_with_lora(folder, LORA_WEIGHT_NAME)
    assert adapted_modules(kohya) == adapted_modules(diffusers_layout) and len(adapted_modules(kohya)) == 16
    kohya_images = generate(kohya)
    assert float(np.abs(kohya_images - generate(diffusers_layout)).max()) < SAME_LORA_ATOL
    assert float(np.abs(kohya_images - trained_images).max()) < SAME_LORA_ATOL
    assert float(np.abs(kohya_images - generate(build_tiny_sd_pipeline(0))).max()) > CLEARLY_DIFFERENT


def test_kohya_file_loads_in_diffusers_like_the_diffusers_lora_conv_and_linear(tmp_path):
    trained, targets, record = full_lora_pipeline()
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.downsamplers.0.conv"} <= set(targets)
    assert {"up_blocks.0.upsamplers.0.conv", "down_blocks.1.resnets.0.conv_shortcut"} <= set(targets)
    assert "mid_block.resnets.0.time_emb_proj" in targets
    folder = export_erased_model(trained, tmp_path / "erased", record)
    kohya_state = kohya_lora_state_dict(trained.unet, "default")

    def alpha(module: str) -> float:
        return kohya_state[f"lora_unet_{module}.alpha"].item()

    assert alpha("conv_in") == pytest.approx(8.0 * 2**0.5)  # r 2, alpha 8: scale 8 / sqrt(2) = kohya alpha / 2
    assert kohya_state["lora_unet_conv_in.lora_down.weight"].shape[0] == 2
    assert alpha("conv_out") == pytest.approx(1.0 * 4**0.5)
    assert alpha("time_embedding_linear_1") == pytest.approx(5.0 * 4**0.5)
    assert alpha("down_blocks_0_resnets_0_conv1") == pytest.approx(8.0 * 3**0.5)
    assert alpha("down_blocks_0_attentions_0_proj_in") == pytest.approx(8.0 * 4**0.5)
    assert kohya_state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (3, 32, 3, 3)
    assert kohya_state["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 3, 1, 1)
    with safe_open(folder / KOHYA_LORA_WEIGHT_NAME, "pt") as weights:
        assert "ss_network_dim" not in weights.metadata()  # ranks differ per module: only the tensors say
        assert {key.split(".")[0] for key in weights.keys()} == {
            "lora_unet_" + name.replace(".", "_") for name in targets
        }

    kohya = base_with_lora(folder, KOHYA_LORA_WEIGHT_NAME)
    diffusers_layout = base_with_lora(folder, LORA_WEIGHT_NAME)
    assert adapted_modules(kohya) == adapted_modules(diffusers_layout) == set(targets)  # every key converted
    kohya_images, trained_images = generate(kohya), generate(trained)
    assert float(np.abs(kohya_images - generate(diffusers_layout)).max()) < SAME_LORA_ATOL
    assert float(np.abs(kohya_images - trained_images).max()) < SAME_LORA_ATOL
    assert float(np.abs(kohya_images - generate(build_tiny_sd_pipeline(0))).max()) > CLEARLY_DIFFERENT


def test_dora_has_no_kohya_form():
    pipe = build_tiny_sd_pipeline(0)
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["conv_in"], use_dora=True))
    with pytest.raises(ValueError, match="cannot express") as error:
        kohya_lora_state_dict(pipe.unet, "default")
    assert "\n" not in str(error.value)
