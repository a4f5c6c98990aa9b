"""MunbaPipeline: the load paths of an erased folder, erasure_scale, compare, save/load, the file's self-containment."""

import ast
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from munba_diffusion.diffusion.export import export_erased_model
from munba_diffusion.diffusion.loading import load_erased_pipeline
from munba_diffusion.pipelines import munba as munba_module
from munba_diffusion.pipelines.munba import (
    ERASURE_ADAPTER_NAME,
    ERASURE_FILE_NAME,
    KOHYA_LORA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    MunbaPipeline,
)
from tests.messages import captured_messages
from tests.tiny_sd import add_random_lora, build_tiny_sd_pipeline, tiny_erasure_config

torch.set_num_threads(1)  # the tiny models run ~50x slower when 2 threads fight other jobs for 2 cores

PROMPT = "a red circle"
STEPS = 3
FUSED_VS_LORA_ATOL = 1e-4  # fused W0 + dW versus W0 x + dW x: float rounding only
CLEARLY_DIFFERENT = 0.05  # the random LoRA moves pixels by ~0.5; tolerances above are far below this


def generate(pipe: StableDiffusionPipeline, prompt: str = PROMPT, seed: int = 0, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=STEPS, generator=generator, output_type="np", **kwargs).images


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def base_munba() -> MunbaPipeline:
    return MunbaPipeline(**build_tiny_sd_pipeline(0).components)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(erased folder, images of the in-memory LoRA pipeline it was exported from, images of the base model)."""
    trained = build_tiny_sd_pipeline(0)
    add_random_lora(trained)
    folder = export_erased_model(trained, tmp_path_factory.mktemp("export") / "erased", tiny_erasure_config())
    return folder, generate(trained), generate(build_tiny_sd_pipeline(0))


def test_all_load_paths_give_the_erased_images(exported):
    folder, trained_images, base_images = exported
    plain = DiffusionPipeline.from_pretrained(folder)
    remote = DiffusionPipeline.from_pretrained(folder, custom_pipeline="munba", trust_remote_code=True)
    installed = MunbaPipeline.from_pretrained(folder)
    checked = load_erased_pipeline(folder)
    checked_remote = load_erased_pipeline(folder, trust_remote_code=True)
    lora = base_munba().load_erasure(folder)

    assert type(plain) is StableDiffusionPipeline
    assert type(remote).__name__ == "MunbaPipeline" and type(remote) is not MunbaPipeline  # the folder's munba.py
    assert type(installed) is MunbaPipeline and type(checked) is MunbaPipeline
    fused_images = generate(plain)
    for pipe in (remote, installed, checked, checked_remote):
        np.testing.assert_array_equal(generate(pipe), fused_images)
    assert max_diff(generate(lora), fused_images) < FUSED_VS_LORA_ATOL
    assert max_diff(trained_images, fused_images) < FUSED_VS_LORA_ATOL
    assert max_diff(base_images, fused_images) > CLEARLY_DIFFERENT


def test_erased_concepts_are_known_on_every_munba_path(exported):
    folder, _, _ = exported
    remote = DiffusionPipeline.from_pretrained(folder, custom_pipeline="munba", trust_remote_code=True)
    assert remote.erased_concepts == ["circle"]
    assert MunbaPipeline.from_pretrained(folder).erased_concepts == ["circle"]
    lora = base_munba().load_erasure(folder)
    assert lora.erased_concepts == ["circle"]
    assert lora.config.erasure["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert base_munba().erased_concepts == []


def legacy_folder(folder: Path, destination: Path) -> Path:
    """The folder as earlier versions wrote it: the erasure record as an "erasure" entry of model_index.json."""
    legacy = Path(shutil.copytree(folder, destination))
    index = json.loads((legacy / "model_index.json").read_text())
    index["erasure"] = json.loads((legacy / ERASURE_FILE_NAME).read_text())
    (legacy / "model_index.json").write_text(json.dumps(index))
    (legacy / ERASURE_FILE_NAME).unlink()
    return legacy


def test_plain_loading_prints_no_warning(exported, tmp_path):
    folder, _, _ = exported
    assert "erasure" not in json.loads((folder / "model_index.json").read_text())
    with captured_messages() as messages:
        DiffusionPipeline.from_pretrained(folder)
    assert not [m for m in messages if "erasure" in m or "model_index" in m or "not expected" in m], messages
    # the capture does see the warning that the old layout gave (so its absence above means something)
    legacy = legacy_folder(folder, tmp_path / "legacy")
    with captured_messages() as messages:
        DiffusionPipeline.from_pretrained(legacy)
    assert [m for m in messages if "erasure" in m and "Please verify your model_index.json" in m]


def test_earlier_folders_with_the_record_in_model_index_still_load(exported, tmp_path):
    folder, _, _ = exported
    legacy = legacy_folder(folder, tmp_path / "legacy")
    assert MunbaPipeline.from_pretrained(legacy).erased_concepts == ["circle"]
    assert load_erased_pipeline(legacy, trust_remote_code=True).erased_concepts == ["circle"]


def test_custom_pipeline_reads_the_record_and_dials_the_erasure(exported):
    folder, _, base_images = exported
    remote = DiffusionPipeline.from_pretrained(folder, custom_pipeline="munba", trust_remote_code=True)
    assert remote.config.erasure == json.loads((folder / ERASURE_FILE_NAME).read_text())
    assert remote.erasure_scale == 1.0
    remote.erasure_scale = 0.0
    assert max_diff(generate(remote), base_images) < FUSED_VS_LORA_ATOL


def test_a_hub_snapshot_finds_the_record(exported, tmp_path):
    """A Hub id resolved from the local cache (offline): the record is read from the snapshot folder."""
    folder, _, _ = exported
    snapshot = tmp_path / "hub" / "models--someone--erased-circle" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    pipe = MunbaPipeline.from_pretrained("someone/erased-circle", cache_dir=tmp_path / "hub", local_files_only=True)
    assert pipe.erased_concepts == ["circle"] and pipe.config.erasure["fused"] is True


def test_erasure_scale_on_base_plus_lora(exported):
    folder, _, base_images = exported
    pipe = base_munba().load_erasure(folder)
    assert pipe.erasure_scale == 1.0
    erased = generate(pipe)
    pipe.erasure_scale = 0
    np.testing.assert_array_equal(generate(pipe), base_images)  # adapters disabled: exactly the base model
    pipe.erasure_scale = 0.5
    halfway = generate(pipe)
    pipe.erasure_scale = 1
    np.testing.assert_array_equal(generate(pipe), erased)
    assert max_diff(halfway, base_images) > CLEARLY_DIFFERENT
    assert max_diff(halfway, erased) > CLEARLY_DIFFERENT


def test_erasure_scale_on_fused_folder_matches_base_plus_lora(exported):
    folder, _, base_images = exported
    fused = MunbaPipeline.from_pretrained(folder)
    lora = base_munba().load_erasure(folder)
    fused_images = generate(fused)
    for scale in (0.0, 0.5, 1.5):
        fused.erasure_scale = lora.erasure_scale = scale
        assert max_diff(generate(fused), generate(lora)) < FUSED_VS_LORA_ATOL
    fused.erasure_scale = 0
    assert max_diff(generate(fused), base_images) < FUSED_VS_LORA_ATOL
    fused.erasure_scale = 1
    np.testing.assert_array_equal(generate(fused), fused_images)  # the LoRA is disabled again: exact fused output


def test_erasure_scale_errors():
    with pytest.raises(ValueError, match="load_erasure"):
        base_munba().erasure_scale = 0.5
    pipe = base_munba()
    pipe.register_to_config(erasure={"concepts": ["x"], "fused": False})
    with pytest.raises(ValueError, match="finite"):
        pipe.erasure_scale = float("nan")


def test_fused_folder_without_lora_file_keeps_scale_one_only(exported, tmp_path):
    folder, _, _ = exported
    copy = Path(shutil.copytree(folder, tmp_path / "no-lora"))
    (copy / LORA_WEIGHT_NAME).unlink()
    pipe = MunbaPipeline.from_pretrained(copy)
    pipe.erasure_scale = 1.0
    with pytest.raises(ValueError, match="load_erasure") as error:
        pipe.erasure_scale = 0.0
    assert "\n" not in str(error.value)


def test_compare_gives_same_seed_original_and_erased(exported):
    folder, _, base_images = exported
    pipe = base_munba().load_erasure(folder)
    pipe.erasure_scale = 0.5
    result = pipe.compare([PROMPT, "a blue square"], seed=0, num_inference_steps=STEPS)
    assert pipe.erasure_scale == 0.5  # restored
    assert len(result.original) == len(result.erased) == 2
    np.testing.assert_array_equal(np.asarray(result.original[0]), np.asarray(pipe.numpy_to_pil(base_images)[0]))
    pipe.erasure_scale = 1.0
    erased_first = pipe.numpy_to_pil(generate(pipe, [PROMPT, "a blue square"]))[0]
    np.testing.assert_array_equal(np.asarray(result.erased[0]), np.asarray(erased_first))
    assert result.grid.size == (2 * 32, 2 * 32)
    grid = np.asarray(result.grid)
    np.testing.assert_array_equal(grid[32:, :32], np.asarray(result.erased[0]))  # erased row below the original
    with pytest.raises(ValueError, match="seed="):
        pipe.compare(PROMPT, generator=torch.Generator())


def test_call_is_stable_diffusions(exported):
    folder, _, _ = exported
    assert MunbaPipeline.__call__ is StableDiffusionPipeline.__call__
    pipe = MunbaPipeline.from_pretrained(folder)
    steps = []
    with_negative = generate(
        pipe,
        negative_prompt="a blue square",
        callback_on_step_end=lambda p, i, t, kwargs: steps.append(i) or kwargs,
    )
    assert steps == list(range(STEPS))
    assert max_diff(with_negative, generate(pipe)) > CLEARLY_DIFFERENT


def test_save_pretrained_keeps_the_folder_loadable_three_ways(exported, tmp_path):
    folder, _, base_images = exported
    pipe = MunbaPipeline.from_pretrained(folder)
    pipe.erasure_scale = 0.0  # loads the folder's LoRA ...
    pipe.erasure_scale = 1.0  # ... which save_pretrained drops again (it is reloaded on demand)
    pipe.save_pretrained(tmp_path / "resaved")
    resaved = tmp_path / "resaved"
    model_index = json.loads((resaved / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline" and "erasure" not in model_index
    assert (resaved / ERASURE_FILE_NAME).read_text() == (folder / ERASURE_FILE_NAME).read_text()
    assert (resaved / "munba.py").read_bytes() == Path(munba_module.__file__).read_bytes()
    assert (resaved / KOHYA_LORA_WEIGHT_NAME).read_bytes() == (folder / KOHYA_LORA_WEIGHT_NAME).read_bytes()
    expected = generate(MunbaPipeline.from_pretrained(folder))
    np.testing.assert_array_equal(generate(DiffusionPipeline.from_pretrained(resaved)), expected)
    reloaded = DiffusionPipeline.from_pretrained(resaved, custom_pipeline="munba", trust_remote_code=True)
    assert reloaded.erased_concepts == ["circle"]
    np.testing.assert_array_equal(generate(reloaded), expected)
    reloaded.erasure_scale = 0.0  # the LoRA file was copied along
    assert max_diff(generate(reloaded), base_images) < FUSED_VS_LORA_ATOL


def test_save_pretrained_refuses_attached_lora(exported, tmp_path):
    folder, _, _ = exported
    with pytest.raises(ValueError, match=ERASURE_ADAPTER_NAME):
        base_munba().load_erasure(folder).save_pretrained(tmp_path / "out")
    fused = MunbaPipeline.from_pretrained(folder)
    fused.erasure_scale = 0.5
    with pytest.raises(ValueError, match="erasure_scale = 1"):
        fused.save_pretrained(tmp_path / "out2")


def test_load_erasure_refuses_a_fused_pipeline(exported):
    folder, _, _ = exported
    with pytest.raises(ValueError, match="already has an erasure fused"):
        MunbaPipeline.from_pretrained(folder).load_erasure(folder)


def test_load_erasure_from_a_bare_lora_folder(exported, tmp_path):
    folder, _, _ = exported
    (tmp_path / "lora").mkdir()
    shutil.copy(folder / LORA_WEIGHT_NAME, tmp_path / "lora" / LORA_WEIGHT_NAME)
    pipe = base_munba().load_erasure(tmp_path / "lora")
    assert pipe.erased_concepts == []  # no erasure_config.json beside it: the names are unknown
    assert max_diff(generate(pipe), generate(MunbaPipeline.from_pretrained(folder))) < FUSED_VS_LORA_ATOL


def test_pipeline_file_is_self_contained():
    path = Path(munba_module.__file__)
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in munba.py"
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) <= {"torch", "diffusers", "transformers"}
    # loaded from the file alone, as diffusers' dynamic-module loader does, it defines one pipeline class
    spec = importlib.util.spec_from_file_location("standalone_munba", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipelines = [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, DiffusionPipeline) and value.__module__ == module.__name__
    ]
    assert [cls.__name__ for cls in pipelines] == ["MunbaPipeline"]
