"""export_erased_model: folder layout, LoRA file, config, model card (model-index included), overwrite protection,
atomicity, loader errors."""

import json
import os
import shutil

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from peft import LoraConfig
from PIL import Image
from safetensors import safe_open

import munba_diffusion.diffusion.export.card as card_module
import munba_diffusion.diffusion.export.folder as folder_module
import munba_diffusion.diffusion.export.hub as hub_module
from munba_diffusion.diffusion.config import ErasureTrainingConfig
from munba_diffusion.diffusion.export import (
    check_output_dir,
    erased_model_card,
    export_erased_model,
    push_erased_model_to_hub,
    read_evaluation_reports,
)
from munba_diffusion.diffusion.finish import finish_erasure
from munba_diffusion.diffusion.loading import load_erased_pipeline
from munba_diffusion.diffusion.lora import ADAPTER_NAME, target_module_names
from munba_diffusion.presets import ConceptPreset
from tests.tiny_sd import add_random_lora, build_tiny_sd_pipeline, save_tiny_sd, tiny_erasure_config

torch.set_num_threads(1)  # the tiny models run ~50x slower when 2 threads fight other jobs for 2 cores

EVALUATION = "| metric | original | erased |\n|---|---|---|\n| circle accuracy | 0.97 | 0.03 |"
PROMPT_SET = {"name": "/somewhere/prompts/eval/demo.csv", "size": 96, "sha256": "82c672e4aceb0edd"}
ERASED_DEMO = {
    "num_images": 96,
    "concept": "circle",
    "concept_kind": "shape",
    "num_concept_images": 24,
    "concept_rate": 0.041666666666666664,
    "concept_rate_ci95": [0.0074, 0.2024],
    "concept_rate_n": 24,
    "concept_rate_by_name": {"circle": {"rate": 0.0, "ci95": [0.0, 0.3244], "n": 8}},
    "kept_attribute_accuracy": 0.75,
    "kept_attribute_accuracy_ci95": [0.5506, 0.8800],
    "kept_attribute_accuracy_n": 24,
    "other_accuracy": 0.8888888888888888,
    "judge_kid_other": 0.012345678901234,
    "judge_kid_other_renders_std": None,
    "clip_score_other": 53.93284225463867,
    "clip_score_concept": 6.629644393920898,
    "clip_model": "/somewhere/clip",
}
ERASED_NUDENET = {
    "num_images": 96,
    "threshold": 0.6,
    "classes": ["FEMALE_BREAST_EXPOSED"],
    "class_counts": {"FEMALE_BREAST_EXPOSED": 3},
    "total_detections": 3,
    "nudity_rate": 0.03125,
    "nudity_rate_ci95": [0.0107, 0.0879],
    "nudity_rate_n": 96,
    "attack_threshold": 0.45,
    "attack_success_rate": 0.0625,
}
INTERVALS = {  # (metric, key) -> the metric_args a rate's interval becomes (rates without one have none)
    ("demo", "concept_rate"): {"ci95": [0.0074, 0.2024], "n": 24},
    ("demo", "kept_attribute_accuracy"): {"ci95": [0.5506, 0.8800], "n": 24},
    ("nudenet", "nudity_rate"): {"ci95": [0.0107, 0.0879], "n": 96},
}
REPORT = {  # report.json as the end-of-run evaluation writes it (the erased model labelled "erased")
    "results": {
        "original": {"demo": {**ERASED_DEMO, "concept_rate": 0.9166666666666666}, "fid": {"fid": 12.5}},
        "erased": {"demo": ERASED_DEMO, "nudenet": ERASED_NUDENET, "fid": {"fid": 13.25, "mode": "clean"}},
    },
    "protocol": {"prompt_set": PROMPT_SET, "models": {}},
}
MEASURED = {  # (metric, key) -> value: every measured number of the erased model in REPORT
    ("demo", "concept_rate"): 0.041666666666666664,
    ("demo", "kept_attribute_accuracy"): 0.75,
    ("demo", "other_accuracy"): 0.8888888888888888,
    ("demo", "judge_kid_other"): 0.012345678901234,
    ("demo", "clip_score_other"): 53.93284225463867,
    ("demo", "clip_score_concept"): 6.629644393920898,
    ("nudenet", "total_detections"): 3,
    ("nudenet", "nudity_rate"): 0.03125,
    ("nudenet", "attack_success_rate"): 0.0625,
    ("fid", "fid"): 13.25,
}


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
        evaluation_reports={"circle": REPORT},
        widget_images=[("a red circle", picture("red")), ("a blue square", picture("blue"))],
        hub_model_id="someone/erased-circle",
    )


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


def test_folder_layout(exported):
    assert sorted(os.listdir(exported)) == sorted(
        [
            "README.md",
            "app.py",
            "erasure_config.json",
            "images",
            "model_index.json",
            "munba.py",
            "munba_erasure.json",
            "munba_erasure_comfyui_a1111.safetensors",
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
    model_index = json.loads((exported / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline" and "erasure" not in model_index
    assert json.loads((exported / "munba_erasure.json").read_text()) == {
        "concepts": ["circle"],
        "fused": True,
        "lora_weight_name": "pytorch_lora_weights.safetensors",
        "base_model": "CompVis/stable-diffusion-v1-4",
    }


def test_lora_file_carries_adapter_metadata(exported):
    with safe_open(exported / "pytorch_lora_weights.safetensors", "pt") as weights:
        metadata = json.loads(weights.metadata()["lora_adapter_metadata"])
        keys = list(weights.keys())
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8.0  # alpha != r survives
    assert keys and all(key.startswith("unet.") and "attn2" in key for key in keys)
    assert all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys)  # one naming for every module


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
    for tool in ("ComfyUI", "AUTOMATIC1111", "Forge", "`munba_erasure_comfyui_a1111.safetensors`", "need `peft`"):
        assert tool in card.text


def assert_model_index_holds_the_report(card: ModelCard, name: str) -> None:
    """The card's model-index parses offline (YAML, huggingface_hub's own converters) into REPORT's numbers."""
    header = yaml.safe_load(card.content.split("---")[1])
    model_index = header["model-index"]
    model_name, results = model_index_to_eval_results(model_index)
    assert model_name == name
    assert eval_results_to_model_index(model_name, results) == model_index  # the Hub's round trip is lossless
    assert card.data.eval_results == results  # ModelCardData accepted it (it drops an invalid model-index)
    assert {(r.metric_config, r.metric_type): r.metric_value for r in results} == MEASURED
    for result in results:
        assert result.task_type == "text-to-image" and result.dataset_type == "demo"
        assert result.dataset_config == "circle" and result.dataset_revision == PROMPT_SET["sha256"]
        assert result.metric_value == REPORT["results"]["erased"][result.metric_config][result.metric_type]
    assert next(r for r in results if r.metric_type == "concept_rate").metric_name == "Concept rate"
    # A rate's interval and image count travel in metric_args; they are no results of their own.
    assert {(r.metric_config, r.metric_type): r.metric_args for r in results if r.metric_args} == INTERVALS


def test_model_card_model_index_equals_the_evaluation_report(exported):
    card = ModelCard.load(exported / "README.md")
    assert_model_index_holds_the_report(card, "erased-circle")


def test_model_card_without_evaluation_has_no_model_index():
    card = erased_model_card(tiny_erasure_config(), evaluation_reports={})
    assert "model-index" not in card.data.to_dict() and "model_name" not in card.data.to_dict()
    only_original = {"results": {"original": REPORT["results"]["original"], "base": {}}, "protocol": {}}
    assert (
        "model-index" not in erased_model_card(tiny_erasure_config(), evaluation_reports={"c": only_original}).content
    )


def test_model_card_names_what_replaced_the_concept():
    record = tiny_erasure_config()
    record["concepts"][0]["substitute_prompts"] = [["a blue circle", "a green circle"], ["a blue disc"]]
    row = next(
        line for line in erased_model_card(record, evaluation_reports={}).content.splitlines() if "| circle |" in line
    )
    assert "(unconditional)" in row and "a blue disc" not in row  # esd: the anchors, the substitutes unused
    record["forget_loss"] = "substitute"
    row = next(
        line for line in erased_model_card(record, evaluation_reports={}).content.splitlines() if "| circle |" in line
    )
    assert "`a blue circle`; `a blue disc`; `a green circle`" in row


def test_read_evaluation_reports(tmp_path):
    assert read_evaluation_reports(tmp_path) == {}
    for concept in ("circle", "square"):
        (tmp_path / "evaluation" / concept).mkdir(parents=True)
        (tmp_path / "evaluation" / concept / "report.json").write_text(json.dumps(REPORT))
    (tmp_path / "evaluation" / "images").mkdir()  # folders without a report are not evaluations
    assert read_evaluation_reports(tmp_path) == {"circle": REPORT, "square": REPORT}
    results = ModelCard(str(erased_model_card(tiny_erasure_config(), evaluation_reports={"square": REPORT}))).data
    assert {r.dataset_config for r in results.eval_results} == {"square"}


def test_finish_puts_the_evaluation_reports_into_the_model_index(tmp_path):
    """The trainer's last step: the evaluate callback writes report.json into the staging folder; the card built
    in the same staging folder carries its numbers."""
    pipe = build_tiny_sd_pipeline(0)
    pipe.unet.requires_grad_(False)
    targets = target_module_names(pipe.unet, "xattn")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=targets), adapter_name=ADAPTER_NAME)
    preset = ConceptPreset("circle", forget_prompts=("a circle",), preserve_prompts=("a square",), anchor_prompts=("",))
    config = ErasureTrainingConfig(
        concepts=[preset],
        output_dir=tmp_path / "erased-circle",
        rank=4,
        lora_alpha=8.0,
        resolution=32,
        validation_prompts=["a circle"],
        validation_seeds=1,
        validation_inference_steps=1,
    )
    seen = {}

    def evaluate(config, folder):
        seen["folder"] = folder
        (folder / "evaluation" / "circle").mkdir(parents=True)
        (folder / "evaluation" / "circle" / "report.json").write_text(json.dumps(REPORT))
        return EVALUATION

    finish_erasure(
        config, pipe, ["preserve", "circle"], train_seconds=0, pool_seconds=0, resolution=32, evaluate=evaluate
    )
    assert seen["folder"] != config.output_dir  # the staging folder
    assert_model_index_holds_the_report(ModelCard.load(config.output_dir / "README.md"), "erased-circle")


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
    assert json.loads((output_dir / "munba_erasure.json").read_text())["concepts"] == ["square"]
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
    assert json.loads((output_dir / "munba_erasure.json").read_text())["concepts"] == ["circle"]
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
    results |= {"munba_erasure.json", "munba_erasure_comfyui_a1111.safetensors", "app.py"}
    assert results <= set(patterns)
    assert not any(pattern.startswith("checkpoint") for pattern in patterns)
    with pytest.raises(FileNotFoundError, match="not an erased model folder"):
        push_erased_model_to_hub(tmp_path / "no-such-folder", "someone/x")
