"""evaluate_models / eval/evaluate.py end to end on tiny pipelines: report, protocol, grid, LoRA, overwrite guard."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from munba_diffusion.evaluation import generate
from munba_diffusion.evaluation.evaluate import MetricOptions, evaluate_models
from munba_diffusion.evaluation.generate import GenerationSettings
from munba_diffusion.evaluation.prompt_sets import load_prompt_set
from tests.eval_helpers import save_tiny_clip
from tests.tiny_sd import build_tiny_sd_pipeline, save_tiny_sd

REPO = Path(__file__).resolve().parents[1]
SETTINGS = GenerationSettings(num_inference_steps=2, guidance_scale=4.0, batch_size=2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    base = save_tiny_sd(root / "tiny-sd", seed=0)
    pipe = build_tiny_sd_pipeline(seed=0)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    lora_dir = root / "lora"
    StableDiffusionPipeline.save_lora_weights(
        lora_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    )
    prompts = root / "prompts.csv"
    prompts.write_text(
        "prompt,seed,concept\na red circle,1,circle\na dog,2,dog\na blue square,3,square\na cat in a house,4,cat\n"
    )
    return {
        "base": base,
        "lora": lora_dir / "pytorch_lora_weights.safetensors",
        "prompts": prompts,
        "clip": save_tiny_clip(root / "clip"),
    }


def test_two_models_are_generated_scored_and_reported_with_their_protocol(assets, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    models = [str(assets["base"]), f"{assets['base']}::{assets['lora']}"]
    options = MetricOptions(clip_model=str(assets["clip"]))
    table = evaluate_models(
        models, assets["prompts"], out, metrics=["nudenet", "clip"], settings=SETTINGS, options=options, device="cpu"
    )

    report = json.loads((out / "report.json").read_text())
    labels = ["tiny-sd", "tiny-sd+pytorch_lora_weights"]
    assert list(report["results"]) == labels
    for label in labels:
        assert report["results"][label]["nudenet"]["num_images"] == 4
        assert 0 <= report["results"][label]["clip"]["clip_score"] <= 100
    protocol = report["protocol"]
    assert protocol["prompt_set"]["sha256"] == load_prompt_set(assets["prompts"]).sha256
    assert protocol["prompt_set"]["source_sha256"] == hashlib.sha256(assets["prompts"].read_bytes()).hexdigest()
    assert (protocol["generation"]["num_inference_steps"], protocol["generation"]["guidance_scale"]) == (2, 4.0)
    assert protocol["seeds"]["min"] == 1 and protocol["seeds"]["max"] == 4
    lora_model = protocol["models"][labels[1]]
    assert lora_model["lora_sha256"] == hashlib.sha256(assets["lora"].read_bytes()).hexdigest()
    assert lora_model["scheduler"] == "DDIMScheduler" and lora_model["native_resolution"] == 32
    assert protocol["metrics"]["nudenet"]["version"] == "3.4.2" and protocol["metrics"]["nudenet"]["threshold"] == 0.6
    assert len(protocol["metrics"]["nudenet"]["classes"]) == 9 and protocol["metrics"]["clip"]["model"] == str(
        assets["clip"]
    )
    assert protocol["libraries"]["nudenet"] == "3.4.2" and protocol["libraries"]["diffusers"] is not None

    # The LoRA is really applied: same prompt and seed, different picture.
    base_png = np.asarray(Image.open(out / "images" / labels[0] / "00000_1.png"), dtype=np.int16)
    lora_png = np.asarray(Image.open(out / "images" / labels[1] / "00000_1.png"), dtype=np.int16)
    assert np.abs(base_png - lora_png).mean() > 2

    markdown = (out / "report.md").read_text()
    assert table in markdown and all(f"| {label} |" in table for label in labels) and "CLIP score" in table
    assert "sha256" in markdown and "DDIMScheduler" in markdown and "FEMALE_BREAST_EXPOSED" in markdown
    assert Image.open(out / "grid.png").size == (220 + 2 * (192 + 4), 28 + 4 * (192 + 4))  # 2 models x 4 prompts

    # A second run refuses to replace the report; with overwrite it re-scores without remaking any image.
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate_models(
            models, assets["prompts"], out, metrics=["nudenet"], settings=SETTINGS, options=options, device="cpu"
        )
    made = []
    monkeypatch.setattr(generate, "save_png_atomic", lambda image, path: made.append(path))
    evaluate_models(
        models,
        assets["prompts"],
        out,
        metrics=["nudenet"],
        settings=SETTINGS,
        options=options,
        device="cpu",
        overwrite=True,
    )
    assert made == [] and list(json.loads((out / "report.json").read_text())["results"][labels[0]]) == ["nudenet"]


def run_cli(argv: list[str], capsys) -> str:
    """Run eval/evaluate.py's main in this process; return its one-line error (exit message or the parser's)."""
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "eval" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    code = exit_info.value.code
    if code == 2:  # refused by the parser: usage, then one "error:" line
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1
        return errors[0][errors[0].index("error:") :]
    assert isinstance(code, str)
    return code


def test_cli_reports_bad_input_in_one_line(assets, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text("{}")
    common = [
        "--model",
        str(assets["base"]),
        "--prompts",
        str(assets["prompts"]),
        "--output-dir",
        str(out),
        "--steps",
        "1",
    ]
    existing = run_cli([*common, "--metrics", "nudenet"], capsys)
    assert existing.startswith("error:") and "--overwrite" in existing and "\n" not in existing
    no_reference = run_cli([*common, "--metrics", "fid", "--overwrite"], capsys)
    assert "reference_dir (--reference_dir) is required" in no_reference and "\n" not in no_reference
    no_labels = run_cli([*common, "--metrics", "objects", "--overwrite"], capsys)
    assert "'label' column" in no_labels and "\n" not in no_labels
    two_labels = run_cli([*common, "--label", "a", "--label", "b", "--metrics", "nudenet", "--overwrite"], capsys)
    assert "label (--label)" in two_labels and "one per model" in two_labels and "\n" not in two_labels
    assert json.loads((out / "report.json").read_text()) == {} and not (out / "images").exists()
