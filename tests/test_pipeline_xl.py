"""MunbaXLPipeline (pipelines/munba_xl.py): the SDXL twin of MunbaPipeline, on a tiny SDXL pipeline.

An erased SDXL folder is made here without the trainer: a random cross-attention LoRA on the tiny SDXL UNet,
saved with StableDiffusionXLPipeline.save_lora_weights, fused into a copy of the UNet and saved with
MunbaXLPipeline.save_pretrained.
"""

import ast
import copy
import importlib.util
import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from munba_diffusion.pipelines import munba as munba_module
from munba_diffusion.pipelines import munba_flux as munba_flux_module
from munba_diffusion.pipelines import munba_sd3 as munba_sd3_module
from munba_diffusion.pipelines import munba_xl as munba_xl_module
from munba_diffusion.pipelines.munba import MunbaPipeline
from munba_diffusion.pipelines.munba_xl import (
    ERASURE_ADAPTER_NAME,
    ERASURE_CONFIG_NAME,
    ERASURE_FILE_NAME,
    LORA_WEIGHT_NAME,
    PIPELINE_FILE_NAME,
    MunbaXLPipeline,
)
from tests.messages import captured_messages
from tests.tiny_sd import CROSS_ATTENTION_TARGETS, build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

torch.set_num_threads(1)  # the tiny models run ~50x slower when 2 threads fight other jobs for 2 cores

PROMPT = "a red circle"
STEPS = 3
FUSED_VS_LORA_ATOL = 1e-4  # fused W0 + dW versus W0 x + dW x: float rounding only
CLEARLY_DIFFERENT = 0.05  # the random LoRA moves pixels by ~0.5; tolerances above are far below this
DYNAMIC_MODULE = "diffusers_modules.local.munba"  # where diffusers' loader executes every local folder's munba.py


def generate(pipe: StableDiffusionXLPipeline, prompt: str | list[str] = PROMPT, seed: int = 0, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=STEPS, generator=generator, output_type="np", **kwargs).images


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def load_remote(folder: Path) -> DiffusionPipeline:
    """The folder's own munba.py, through diffusers' dynamic-module loader."""
    return DiffusionPipeline.from_pretrained(folder, custom_pipeline="munba", trust_remote_code=True)


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamic_module_afterwards():
    """Later test files load SD folders' munba.py into the same dynamic module; hand them a fresh one (munba.py
    drops leftover classes itself, this only keeps the test files independent)."""
    yield
    sys.modules.pop(DYNAMIC_MODULE, None)


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    """(erased SDXL folder, base SDXL folder, images of: the in-memory LoRA pipeline, the fused folder, the base
    folder)."""
    root = tmp_path_factory.mktemp("sdxl")
    base_folder = root / "base"
    build_tiny_sdxl_pipeline(0).save_pretrained(base_folder)

    trained = build_tiny_sdxl_pipeline(0)
    unet = trained.unet
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8.0, init_lora_weights="gaussian", target_modules=CROSS_ATTENTION_TARGETS),
        adapter_name=ERASURE_ADAPTER_NAME,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at zero; redraw it so the LoRA visibly changes the images
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    trained_images = generate(trained)

    fused_unet = copy.deepcopy(unet)
    fused_unet.fuse_lora(lora_scale=1.0, adapter_names=[ERASURE_ADAPTER_NAME])
    fused_unet.unload_lora()
    record = {
        "concepts": ["circle"],
        "fused": True,
        "lora_weight_name": LORA_WEIGHT_NAME,
        "base_model": str(base_folder),
    }
    fused = MunbaXLPipeline(**{**trained.components, "unet": fused_unet}, erasure=record)
    folder = root / "erased"
    fused.save_pretrained(folder)
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=ERASURE_ADAPTER_NAME),
        unet_lora_adapter_metadata=unet.peft_config[ERASURE_ADAPTER_NAME].to_dict(),
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    # the run record a trainer writes beside the LoRA; load_erasure reads the concept names and base model from it
    run_record = {"concepts": [{"name": "circle"}], "pretrained_model_name_or_path": str(base_folder)}
    (folder / ERASURE_CONFIG_NAME).write_text(json.dumps(run_record), encoding="utf-8")
    # references from the saved folders (an in-memory text_encoder_2 differs from its reloaded copy by ~1e-6)
    fused_images = generate(StableDiffusionXLPipeline.from_pretrained(folder))
    base_images = generate(StableDiffusionXLPipeline.from_pretrained(base_folder))
    return folder, base_folder, trained_images, fused_images, base_images


def test_the_folder_is_a_stock_sdxl_folder(erased, tmp_path):
    folder, _, trained_images, fused_images, base_images = erased
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionXLPipeline" and "erasure" not in model_index
    assert json.loads((folder / ERASURE_FILE_NAME).read_text())["concepts"] == ["circle"]
    assert (folder / PIPELINE_FILE_NAME).read_bytes() == Path(munba_xl_module.__file__).read_bytes()
    with captured_messages() as messages:
        plain = StableDiffusionXLPipeline.from_pretrained(folder)
        plain_auto = DiffusionPipeline.from_pretrained(folder)
    ours = ("erasure", "munba", "model_index", "not expected", ERASURE_FILE_NAME, LORA_WEIGHT_NAME, ERASURE_CONFIG_NAME)
    assert not [m for m in messages if any(word in m for word in ours)], messages
    assert type(plain) is StableDiffusionXLPipeline and type(plain_auto) is StableDiffusionXLPipeline
    # the capture does see the warning a record inside model_index.json would give (so its absence means something)
    in_index = Path(shutil.copytree(folder, tmp_path / "record-in-index"))
    index = json.loads((in_index / "model_index.json").read_text())
    (in_index / "model_index.json").write_text(json.dumps({**index, "erasure": {"concepts": [], "fused": True}}))
    with captured_messages() as messages:
        StableDiffusionXLPipeline.from_pretrained(in_index)
    assert [m for m in messages if "erasure" in m and "Please verify your model_index.json" in m]
    np.testing.assert_array_equal(generate(plain), fused_images)
    assert max_diff(trained_images, fused_images) < FUSED_VS_LORA_ATOL
    assert max_diff(base_images, fused_images) > CLEARLY_DIFFERENT


def test_both_munba_paths_give_the_xl_class_with_the_record(erased):
    folder, _, _, fused_images, _ = erased
    installed = MunbaXLPipeline.from_pretrained(folder)
    remote = load_remote(folder)
    assert type(installed) is MunbaXLPipeline
    assert type(remote).__name__ == "MunbaXLPipeline" and type(remote) is not MunbaXLPipeline  # the folder's munba.py
    assert isinstance(remote, StableDiffusionXLPipeline)
    for pipe in (installed, remote):
        assert pipe.erased_concepts == ["circle"]
        assert pipe.config.erasure == json.loads((folder / ERASURE_FILE_NAME).read_text())
        assert pipe.erasure_scale == 1.0
        np.testing.assert_array_equal(generate(pipe), fused_images)
    assert MunbaXLPipeline(**build_tiny_sdxl_pipeline(0).components).erased_concepts == []


def test_sd_and_sdxl_folders_load_one_after_the_other(erased, tmp_path):
    """diffusers executes every local folder's munba.py into one module object; the class the previous file
    defined there must not make the loader see two pipeline classes."""
    folder, _, _, fused_images, _ = erased
    sd_folder = tmp_path / "sd"
    MunbaPipeline(**build_tiny_sd_pipeline(0).components).save_pretrained(sd_folder)
    remote_sd = load_remote(sd_folder)
    assert type(remote_sd).__name__ == "MunbaPipeline"
    remote_xl = load_remote(folder)
    assert type(remote_xl).__name__ == "MunbaXLPipeline"
    np.testing.assert_array_equal(generate(remote_xl), fused_images)
    assert type(load_remote(sd_folder)).__name__ == "MunbaPipeline"
    # the SD pipeline loaded first still saves itself, though the shared module and file now hold another file
    remote_xl = load_remote(folder)
    remote_sd.save_pretrained(tmp_path / "sd_again")
    index = json.loads((tmp_path / "sd_again" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert (tmp_path / "sd_again" / "munba.py").read_bytes() == Path(munba_module.__file__).read_bytes()


def test_erasure_scale_on_the_fused_folder(erased):
    folder, _, _, fused_images, base_images = erased
    for pipe in (MunbaXLPipeline.from_pretrained(folder), load_remote(folder)):
        pipe.erasure_scale = 0.0  # loads the folder's LoRA with weight -1
        assert max_diff(generate(pipe), base_images) < FUSED_VS_LORA_ATOL
        pipe.erasure_scale = 0.5
        halfway = generate(pipe)
        assert max_diff(halfway, base_images) > CLEARLY_DIFFERENT
        assert max_diff(halfway, fused_images) > CLEARLY_DIFFERENT
        pipe.erasure_scale = 1.0  # the LoRA is disabled again: exactly the fused output
        np.testing.assert_array_equal(generate(pipe), fused_images)


def test_base_plus_load_erasure(erased):
    folder, base_folder, _, fused_images, base_images = erased
    pipe = MunbaXLPipeline.from_pretrained(base_folder)
    assert pipe.erased_concepts == []
    assert pipe.load_erasure(folder) is pipe
    assert pipe.erased_concepts == ["circle"] and pipe.erasure_scale == 1.0
    assert pipe.config.erasure == {
        "concepts": ["circle"],
        "fused": False,
        "lora_weight_name": LORA_WEIGHT_NAME,
        "base_model": str(base_folder),
    }
    assert max_diff(generate(pipe), fused_images) < FUSED_VS_LORA_ATOL
    pipe.erasure_scale = 0
    np.testing.assert_array_equal(generate(pipe), base_images)  # adapters disabled: exactly the base model
    pipe.erasure_scale = 0.5
    fused = MunbaXLPipeline.from_pretrained(folder)
    fused.erasure_scale = 0.5
    assert max_diff(generate(pipe), generate(fused)) < FUSED_VS_LORA_ATOL  # both run W0 + 0.5 dW


def test_compare_gives_same_seed_original_and_erased(erased):
    folder, _, _, fused_images, base_images = erased
    pipe = MunbaXLPipeline.from_pretrained(folder)
    result = pipe.compare(PROMPT, seed=0, num_inference_steps=STEPS)
    assert pipe.erasure_scale == 1.0  # restored
    assert len(result.original) == len(result.erased) == 1
    original, erased_image = np.asarray(result.original[0]), np.asarray(result.erased[0])
    np.testing.assert_array_equal(erased_image, np.asarray(pipe.numpy_to_pil(fused_images)[0]))
    assert np.abs(original.astype(int) - np.asarray(pipe.numpy_to_pil(base_images)[0]).astype(int)).max() <= 1
    assert np.abs(original.astype(int) - erased_image.astype(int)).max() > 255 * CLEARLY_DIFFERENT
    assert result.grid.size == (32, 2 * 32)
    with pytest.raises(ValueError, match="seed="):
        pipe.compare(PROMPT, generator=torch.Generator())


def test_save_pretrained_round_trips_a_loaded_fused_pipeline(erased, tmp_path):
    folder, _, _, fused_images, base_images = erased
    pipe = MunbaXLPipeline.from_pretrained(folder)
    pipe.erasure_scale = 0.0  # loads the folder's LoRA ...
    pipe.erasure_scale = 1.0  # ... which save_pretrained drops again (it is reloaded on demand)
    resaved = tmp_path / "resaved"
    pipe.save_pretrained(resaved)
    model_index = json.loads((resaved / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionXLPipeline" and "erasure" not in model_index
    assert (resaved / ERASURE_FILE_NAME).read_text() == (folder / ERASURE_FILE_NAME).read_text()
    assert (resaved / PIPELINE_FILE_NAME).read_bytes() == Path(munba_xl_module.__file__).read_bytes()
    assert (resaved / LORA_WEIGHT_NAME).read_bytes() == (folder / LORA_WEIGHT_NAME).read_bytes()
    np.testing.assert_array_equal(generate(StableDiffusionXLPipeline.from_pretrained(resaved)), fused_images)
    for reloaded in (MunbaXLPipeline.from_pretrained(resaved), load_remote(resaved)):
        assert reloaded.erased_concepts == ["circle"]
        np.testing.assert_array_equal(generate(reloaded), fused_images)
        reloaded.erasure_scale = 0.0  # the LoRA file was copied along
        assert max_diff(generate(reloaded), base_images) < FUSED_VS_LORA_ATOL


def test_misuse_is_refused(erased, tmp_path):
    folder, base_folder, _, _, _ = erased
    with pytest.raises(ValueError, match="already has an erasure fused"):
        MunbaXLPipeline.from_pretrained(folder).load_erasure(folder)
    with pytest.raises(ValueError, match=ERASURE_ADAPTER_NAME):
        MunbaXLPipeline.from_pretrained(base_folder).load_erasure(folder).save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="load_erasure"):
        MunbaXLPipeline.from_pretrained(base_folder).erasure_scale = 0.5
    no_lora = Path(shutil.copytree(folder, tmp_path / "no-lora"))
    (no_lora / LORA_WEIGHT_NAME).unlink()
    with pytest.raises(ValueError, match="load_erasure"):
        MunbaXLPipeline.from_pretrained(no_lora).erasure_scale = 0.0


def test_a_hub_snapshot_finds_the_record(erased, tmp_path):
    """A Hub id resolved from the local cache (offline): the record is read from the snapshot folder."""
    folder, _, _, _, _ = erased
    snapshot = tmp_path / "hub" / "models--someone--erased-circle-xl" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    pipe = MunbaXLPipeline.from_pretrained(
        "someone/erased-circle-xl", cache_dir=tmp_path / "hub", local_files_only=True
    )
    assert pipe.erased_concepts == ["circle"] and pipe.config.erasure["fused"] is True


def test_the_constructor_is_sdxls_plus_erasure():
    stock = list(inspect.signature(StableDiffusionXLPipeline.__init__).parameters.values())
    ours = list(inspect.signature(MunbaXLPipeline.__init__).parameters.values())
    assert [(p.name, p.default) for p in ours] == [(p.name, p.default) for p in stock] + [("erasure", None)]
    assert MunbaXLPipeline.__call__ is StableDiffusionXLPipeline.__call__


def test_pipeline_file_is_self_contained():
    path = Path(munba_xl_module.__file__)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in munba_xl.py"
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) <= {"torch", "diffusers", "transformers"}
    # loaded from the file alone, as diffusers' dynamic-module loader does, it defines one pipeline class
    spec = importlib.util.spec_from_file_location("standalone_munba_xl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipelines = [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, DiffusionPipeline) and value.__module__ == module.__name__
    ]
    assert [cls.__name__ for cls in pipelines] == ["MunbaXLPipeline"]


TO_SD_NAMES = {  # pipeline file -> (its name, the SD name): what may differ in the shared part, mapped to munba.py's
    "munba_xl.py": (("MunbaXLPipeline", "MunbaPipeline"), ("StableDiffusionXLPipeline", "StableDiffusionPipeline")),
    "munba_sd3.py": (
        ("MunbaSD3Pipeline", "MunbaPipeline"),
        ("StableDiffusion3Pipeline", "StableDiffusionPipeline"),
        ("the transformer", "the UNet"),  # where the LoRA lives
        ("transformer", "unet"),
    ),
    "munba_flux.py": (
        ("MunbaFluxPipeline", "MunbaPipeline"),
        ("FluxPipeline", "StableDiffusionPipeline"),
        ("the transformer", "the UNet"),
        ("transformer", "unet"),
    ),
}


class _WrappedText(ast.NodeTransformer):
    """Strings with their whitespace runs collapsed: text wrapped at other places (a longer name) compares equal."""

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        return ast.Constant(" ".join(node.value.split())) if isinstance(node.value, str) else node


def _normalised(source: str) -> str:
    """The code of ``source`` (an AST dump: formatting and comments aside), its strings' whitespace collapsed."""
    return ast.dump(_WrappedText().visit(ast.parse(source)))


def _definitions(path: Path) -> dict[str, str]:
    """Each top-level function, class method and constant of a pipeline file (normalised code), with the file's
    own names mapped to the SD ones (TO_SD_NAMES: so the files' shared parts compare equal)."""
    text = path.read_text()
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__init__":
                    found[f"{node.name}.{item.name}"] = ast.get_source_segment(text, item)
        elif isinstance(node, ast.Assign) and all(isinstance(target, ast.Name) for target in node.targets):
            found[node.targets[0].id] = ast.get_source_segment(text, node)
    mapped = {}
    for name, source in found.items():
        code = _normalised(source)  # before mapping: the names may be where a string was wrapped
        for theirs, sd in TO_SD_NAMES.get(path.name, ()):
            name, code = name.replace(theirs, sd), code.replace(theirs, sd)
        mapped[name] = code
    return mapped


@pytest.mark.parametrize("module", [munba_xl_module, munba_sd3_module, munba_flux_module], ids=["xl", "sd3", "flux"])
def test_the_shared_parts_match_munba_py(module):
    """Everything but __init__, the stock class name and where the LoRA lives (the UNet; SD3's and FLUX's
    transformer) is a copy of pipelines/munba.py: change every file."""
    sd = _definitions(Path(munba_module.__file__))
    other = _definitions(Path(module.__file__))
    assert sorted(set(sd) ^ set(other)) == []
    assert [name for name in sd if sd[name] != other[name]] == []
