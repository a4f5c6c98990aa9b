"""export_erased_model: folder layout, LoRA file, config, model card, overwrite protection, atomicity, loader errors."""

import json
import os
import shutil

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open

import munba_diffusion.diffusion.export.card as card_module
import munba_diffusion.diffusion.export.folder as folder_module
import munba_diffusion.diffusion.export.hub as hub_module
from munba_diffusion.diffusion.export import check_output_dir, export_erased_model, push_erased_model_to_hub
from munba_diffusion.diffusion.loading import load_erased_pipeline
from tests.tiny_sd import add_random_lora, build_tiny_sd_pipeline, save_tiny_sd, tiny_erasure_config

torch.set_num_threads(1)  # the tiny models run ~50x slower when 2 threads fight other jobs for 2 cores

EVALUATION = "| metric | original | erased |\n|---|---|---|\n| circle accuracy | 0.97 | 0.03 |"


@pytest.fixture(scope="module")
def trained():
    pipe = build_tiny_sd_pipeline(0)
    add_random_lora(pipe)
    return pipe


def picture(colour: str) -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export_erased_model(
        trained,
        tmp_path_factory.mktemp("export") / "erased-circle",
        tiny_erasure_config(),
        before_after=picture("white"),
        evaluation_markdown=EVALUATION,
        widget_images=[("a red circle", picture("red")), ("a blue square", picture("blue"))],
        hub_model_id="someone/erased-circle",
    )


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


def test_folder_layout(exported):
    assert sorted(os.listdir(exported)) == sorted(
        [
            "README.md",
            "erasure_config.json",
            "images",
            "model_index.json",
            "munba.py",
            "pytorch_lora_weights.safetensors",
            "scheduler",
            "text_encoder",
            "tokenizer",
            "unet",
            "vae",
        ]
    )
    assert sorted(os.listdir(exported / "images")) == ["before_after.png", "widget_0.png", "widget_1.png"]
    unet_files = os.listdir(exported / "unet")
    assert "diffusion_pytorch_model.safetensors" in unet_files
    with safe_open(exported / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert not [key for key in weights.keys() if "lora" in key or "base_layer" in key]  # fused, plain keys


def test_lora_file_carries_adapter_metadata(exported):
    with safe_open(exported / "pytorch_lora_weights.safetensors", "pt") as weights:
        metadata = json.loads(weights.metadata()["lora_adapter_metadata"])
        keys = list(weights.keys())
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8.0  # alpha != r survives
    assert keys and all(key.startswith("unet.") and "attn2" in key for key in keys)


def test_run_record_is_the_configuration_plus_run_statistics(exported):
    stored = json.loads((exported / "erasure_config.json").read_text())
    assert stored == json.loads(json.dumps(tiny_erasure_config())) | {k: stored[k] for k in ("versions", "created")}
    assert [c["name"] for c in stored["concepts"]] == ["circle"]
    assert stored["concepts"][0]["forget_prompts"] == ["a circle", "a red circle"]
    assert stored["rank"] == 4 and stored["lora_alpha"] == 8.0 and stored["max_train_steps"] == 10
    assert "hub_token" not in stored  # secrets never reach the record
    assert {"torch", "diffusers", "transformers", "peft"} <= set(stored["versions"])
    assert stored["created"].endswith("+00:00")


def test_model_card(exported):
    card = ModelCard.load(exported / "README.md")
    header = yaml.safe_load(card.content.split("---")[1])
    assert header == card.data.to_dict()
    assert header["library_name"] == "diffusers"
    assert header["pipeline_tag"] == "text-to-image"
    assert header["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert header["base_model_relation"] == "finetune"
    assert header["license"] == "creativeml-openrail-m"
    assert {"stable-diffusion", "diffusers", "lora", "concept-erasure", "munba"} <= set(header["tags"])
    assert [entry["text"] for entry in header["widget"]] == ["a red circle", "a blue square"]
    assert all((exported / entry["output"]["url"]).is_file() for entry in header["widget"])
    assert "**circle**" in card.text
    assert "| circle accuracy | 0.97 | 0.03 |" in card.text
    assert "images/before_after.png" in card.text
    for way in ('from_pretrained("someone/erased-circle")', 'custom_pipeline="munba"', "load_erasure("):
        assert way in card.text
    assert "`esd`" in card.text and "`nash`" in card.text and "rank 4, alpha 8.0" in card.text


def test_model_card_for_a_local_base_model(trained, tmp_path):
    config = tiny_erasure_config(base_model=str(tmp_path))
    folder = export_erased_model(trained, tmp_path / "out", config)
    header = ModelCard.load(folder / "README.md").data.to_dict()
    assert "base_model" not in header and "base_model_relation" not in header  # not a Hub id
    assert header["license"] == "other"
    assert not (folder / "images").exists()
    config["license"] = "apache-2.0"  # a base model whose card declares its licence
    folder = export_erased_model(trained, tmp_path / "out", config, overwrite_output_dir=True)
    assert ModelCard.load(folder / "README.md").data.license == "apache-2.0"


def test_caller_unet_keeps_its_adapter_and_weights(tmp_path):
    pipe = build_tiny_sd_pipeline(0)
    add_random_lora(pipe)
    before = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}
    export_erased_model(pipe, tmp_path / "out", tiny_erasure_config())
    after = pipe.unet.state_dict()
    assert list(pipe.unet.peft_config) == ["default"]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_existing_results_need_overwrite_and_other_files_survive(trained, tmp_path):
    output_dir = tmp_path / "out"
    (output_dir / "checkpoint-10").mkdir(parents=True)
    (output_dir / "checkpoint-10" / "state.txt").write_text("training state")
    export_erased_model(trained, output_dir, tiny_erasure_config("circle"))
    assert (output_dir / "checkpoint-10" / "state.txt").read_text() == "training state"
    with pytest.raises(FileExistsError, match="--overwrite_output_dir") as error:
        export_erased_model(trained, output_dir, tiny_erasure_config("square"))
    assert_one_line(error)
    assert json.loads((output_dir / "erasure_config.json").read_text())["concepts"][0]["name"] == "circle"

    export_erased_model(trained, output_dir, tiny_erasure_config("square"), overwrite_output_dir=True)
    assert json.loads((output_dir / "model_index.json").read_text())["erasure"]["concepts"] == ["square"]
    assert (output_dir / "checkpoint-10" / "state.txt").read_text() == "training state"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or retired folders left


def test_failed_export_leaves_no_output_dir(trained, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(card_module, "ModelCard", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_erased_model(trained, tmp_path / "out", tiny_erasure_config())
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_folder(trained, tmp_path, monkeypatch):
    output_dir = export_erased_model(trained, tmp_path / "out", tiny_erasure_config("circle"))
    (output_dir / "train.log").write_text("log")
    old_files = sorted(os.listdir(output_dir))

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(folder_module, "_save_lora", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_erased_model(trained, output_dir, tiny_erasure_config("square"), overwrite_output_dir=True)
    assert sorted(os.listdir(output_dir)) == old_files
    assert json.loads((output_dir / "model_index.json").read_text())["erasure"]["concepts"] == ["circle"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert load_erased_pipeline(output_dir).erased_concepts == ["circle"]


def test_bad_inputs_give_one_line_errors(trained, tmp_path):
    def raises(error_type, match, function, *args, **kwargs):
        with pytest.raises(error_type, match=match) as error:
            function(*args, **kwargs)
        assert_one_line(error)

    no_adapter = build_tiny_sd_pipeline(0)
    raises(ValueError, "exactly one LoRA", export_erased_model, no_adapter, tmp_path / "a", tiny_erasure_config())
    config = tiny_erasure_config()
    config["rank"] = 8
    raises(ValueError, "do not match the UNet adapter", export_erased_model, trained, tmp_path / "a", config)
    (tmp_path / "file").write_text("x")
    raises(FileExistsError, "is a file", check_output_dir, tmp_path / "file")
    assert not (tmp_path / "a").exists()


def test_loader_checks_the_folder_first(exported, tmp_path):
    def raises(error_type, match, path, **kwargs):
        with pytest.raises(error_type, match=match) as error:
            load_erased_pipeline(path, **kwargs)
        assert_one_line(error)

    raises(FileNotFoundError, "not a folder", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    raises(FileNotFoundError, "not a diffusers pipeline folder", tmp_path / "empty")
    lora_only = tmp_path / "lora-only"
    lora_only.mkdir()
    shutil.copy(exported / "pytorch_lora_weights.safetensors", lora_only)
    raises(FileNotFoundError, r"load_erasure\(", lora_only)
    raises(ValueError, "without an erasure", save_tiny_sd(tmp_path / "base"))

    no_code = shutil.copytree(exported, tmp_path / "no-code")
    (no_code / "munba.py").unlink()
    fix = r"has no munba\.py; load it with MunbaPipeline\.from_pretrained"
    raises(FileNotFoundError, fix, no_code, trust_remote_code=True)
    assert load_erased_pipeline(no_code).erased_concepts == ["circle"]  # the installed class needs no munba.py


def test_push_uploads_results_only(exported, tmp_path, monkeypatch):
    folder = shutil.copytree(exported, tmp_path / "erased")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.bin").write_text("x")
    calls = {}

    class Repo:
        repo_id = "someone/erased-circle"

    class Commit:
        commit_url = "https://huggingface.co/someone/erased-circle/commit/0"

    monkeypatch.setattr(hub_module, "create_repo", lambda repo_id, **kwargs: calls.update(repo=kwargs) or Repo())
    monkeypatch.setattr(hub_module, "upload_folder", lambda **kwargs: calls.update(upload=kwargs) or Commit())
    assert push_erased_model_to_hub(folder, "someone/erased-circle", private=True) == Commit.commit_url
    assert calls["repo"]["private"] is True
    patterns = calls["upload"]["allow_patterns"]
    results = {"model_index.json", "munba.py", "README.md", "pytorch_lora_weights.safetensors", "unet/*", "images/*"}
    assert results <= set(patterns)
    assert not any(pattern.startswith("checkpoint") for pattern in patterns)
    with pytest.raises(FileNotFoundError, match="not an erased model folder"):
        push_erased_model_to_hub(tmp_path / "no-such-folder", "someone/x")
