"""Erased SD3 and FLUX.1 folders (write_erased_model) and their Munba pipelines (pipelines/munba_sd3.py,
pipelines/munba_flux.py), on tiny pipelines: SD3 with and without T5, FLUX.1-dev and -schnell.

Each folder comes from the exporter itself: a random LoRA on the tiny transformer (image- and text-stream attention
projections and the prompt's two embeddings, the layers ``xattn`` adds there), written by ``write_erased_model``. Then the three ways to load it and the LoRA file on the base model
must all give the erased model's images, and ``erasure_scale = 0`` the base model's.
"""

import ast
import importlib.util
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig
from safetensors import safe_open

from munba_diffusion.diffusion.export import write_erased_model
from munba_diffusion.diffusion.export.card import erased_model_card
from munba_diffusion.diffusion.family import FLUX, STABLE_DIFFUSION_3, absent_components
from munba_diffusion.diffusion.loading import load_erased_pipeline
from munba_diffusion.pipelines import munba_flux as munba_flux_module
from munba_diffusion.pipelines import munba_sd3 as munba_sd3_module
from munba_diffusion.pipelines.munba import (
    ERASURE_FILE_NAME,
    KOHYA_LORA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    PIPELINE_FILE_NAME,
)
from munba_diffusion.pipelines.munba_flux import MunbaFluxPipeline
from munba_diffusion.pipelines.munba_sd3 import MunbaSD3Pipeline
from tests.tiny_flow import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from tests.tiny_sd import tiny_erasure_config

torch.set_num_threads(1)  # the tiny models run ~50x slower when 2 threads fight other jobs for 2 cores

PROMPT = "a red circle"
STEPS = 2
SIZE = 32
# attention of both streams (FLUX: also its single-stream blocks'); FLUX needs more than to_q for a visible change
# the joint and single blocks' attention, and the prompt's embeddings (tokens and pooled vector) that xattn adapts
FLOW_TARGETS = (
    r"^((single_)?transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_k_proj|add_v_proj|to_out\.0)"
    r"|context_embedder|time_text_embed\.text_embedder\.linear_[12])$"
)
FUSED_VS_LORA_ATOL = 1e-4  # fused W0 + dW versus W0 x + dW x: float rounding only
CLEARLY_DIFFERENT = 0.05  # the random LoRA moves pixels by far more; the tolerances above are far below this
DYNAMIC_MODULE = "diffusers_modules.local.munba"  # where diffusers' loader executes every local folder's munba.py


@dataclass(frozen=True)
class Case:
    name: str
    build: object  # seed -> a tiny pipeline
    stock: type
    munba: type
    family: object


CASES = [
    Case("sd3", lambda: build_tiny_sd3_pipeline(0), StableDiffusion3Pipeline, MunbaSD3Pipeline, STABLE_DIFFUSION_3),
    Case(
        "sd3-no-t5",
        lambda: build_tiny_sd3_pipeline(0, t5=False),
        StableDiffusion3Pipeline,
        MunbaSD3Pipeline,
        STABLE_DIFFUSION_3,
    ),
    Case("flux-dev", lambda: build_tiny_flux_pipeline(0), FluxPipeline, MunbaFluxPipeline, FLUX),
    Case(
        "flux-schnell",
        lambda: build_tiny_flux_pipeline(0, guidance_embeds=False),
        FluxPipeline,
        MunbaFluxPipeline,
        FLUX,
    ),
]


@dataclass(frozen=True)
class Erased:
    case: Case
    folder: Path
    base_folder: Path
    absent: dict  # the None keywords of model_index's null components (SD3 without T5: text_encoder_3, tokenizer_3)
    trained: torch.Tensor  # images of the in-memory pipeline with the LoRA
    base: torch.Tensor  # images of the base folder, loaded with the stock class


def generate(pipe: DiffusionPipeline, seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator, output_type="pt"
    ).images


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def add_random_transformer_lora(pipe: DiffusionPipeline, *, strength: float = 0.5) -> LoraConfig:
    """A LoRA (rank 4, alpha 8: tiny_erasure_config's) on the transformer, B redrawn so that it changes images."""
    config = LoraConfig(r=4, lora_alpha=8.0, init_lora_weights="gaussian", target_modules=FLOW_TARGETS)
    pipe.transformer.requires_grad_(False)
    torch.manual_seed(0)
    pipe.transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * strength)
    return config


def flow_record(case: Case, pipe: DiffusionPipeline, base_folder: Path) -> dict:
    record = tiny_erasure_config(base_model=str(base_folder))
    record["run"]["target_modules"] = [FLOW_TARGETS]
    record["run"]["family"] = case.family.describe(pipe)
    return record


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamic_module_afterwards():
    """Later test files load other folders' munba.py into the same dynamic module; hand them a fresh one."""
    yield
    sys.modules.pop(DYNAMIC_MODULE, None)


@pytest.fixture(scope="module", params=CASES, ids=[case.name for case in CASES])
def erased(request, tmp_path_factory) -> Erased:
    case = request.param
    root = tmp_path_factory.mktemp(case.name)
    base_folder = root / "base"
    case.build().save_pretrained(base_folder)
    absent = absent_components(json.loads((base_folder / "model_index.json").read_text()))
    trained = case.build()
    add_random_transformer_lora(trained)
    folder = root / "erased"
    folder.mkdir()
    write_erased_model(trained, folder, flow_record(case, trained, base_folder))
    assert trained.transformer.peft_config  # the caller's pipeline keeps its adapter
    base = generate(case.stock.from_pretrained(base_folder, **absent))
    return Erased(case, folder, base_folder, absent, generate(trained), base)


def test_the_folder_is_a_stock_folder_with_the_erasure_fused_in(erased):
    """(a) stock diffusers loads the folder (SD3 without T5: with text_encoder_3=None, tokenizer_3=None) as its own
    class, and its images are the LoRA model's."""
    folder, case = erased.folder, erased.case
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == case.stock.__name__ and "erasure" not in model_index
    assert (folder / "transformer").is_dir() and not (folder / "unet").exists()
    assert not (folder / KOHYA_LORA_WEIGHT_NAME).exists()  # no kohya naming of these transformers
    assert (folder / PIPELINE_FILE_NAME).read_bytes() == Path(inspect.getfile(case.munba)).read_bytes()
    if case.name == "sd3-no-t5":
        assert model_index["text_encoder_3"] == [None, None] and not (folder / "text_encoder_3").exists()
    assert ("text_encoder_3" in erased.absent) == (case.name == "sd3-no-t5")
    record = json.loads((folder / "erasure_config.json").read_text())
    assert record["run"]["target_modules"] == [FLOW_TARGETS]
    with safe_open(str(folder / LORA_WEIGHT_NAME), "pt") as lora:
        assert lora.keys() and all(key.startswith("transformer.") for key in lora.keys())
    plain = DiffusionPipeline.from_pretrained(folder, **erased.absent)
    assert type(plain) is case.stock
    fused = generate(plain)
    assert max_diff(fused, erased.trained) < FUSED_VS_LORA_ATOL
    assert max_diff(fused, erased.base) > CLEARLY_DIFFERENT


def test_both_munba_ways_give_the_family_class_with_the_record(erased):
    """(b) custom_pipeline="munba" (the folder's munba.py), the installed class and load_erased_pipeline: no extra
    keywords (T5 is optional there), the erased concepts, the fused images."""
    folder, case = erased.folder, erased.case
    fused = generate(case.stock.from_pretrained(folder, **erased.absent))
    remote = DiffusionPipeline.from_pretrained(folder, custom_pipeline="munba", trust_remote_code=True)
    installed = case.munba.from_pretrained(folder)
    assert type(remote).__name__ == case.munba.__name__ and type(remote) is not case.munba
    assert isinstance(remote, case.stock) and type(installed) is case.munba
    assert type(load_erased_pipeline(folder)) is case.munba
    for pipe in (remote, installed):
        assert pipe.erased_concepts == ["circle"] and pipe.erasure_scale == 1.0
        assert pipe.config.erasure == json.loads((folder / ERASURE_FILE_NAME).read_text())
        if case.stock is StableDiffusion3Pipeline:
            assert (pipe.text_encoder_3 is None) == (case.name == "sd3-no-t5")
        assert torch.equal(generate(pipe), fused)


def test_the_lora_file_on_the_stock_base_model(erased):
    """(c) the stock pipeline's own load_lora_weights puts the folder's LoRA on the base model."""
    pipe = erased.case.stock.from_pretrained(erased.base_folder, **erased.absent)
    pipe.load_lora_weights(erased.folder, weight_name=LORA_WEIGHT_NAME)
    assert max_diff(generate(pipe), erased.trained) < FUSED_VS_LORA_ATOL


def test_erasure_scale_zero_is_the_base_model(erased):
    """(d) base + LoRA at scale 0 is exactly the base model; the fused folder at 0 is it up to float rounding."""
    case = erased.case
    on_base = case.munba.from_pretrained(erased.base_folder).load_erasure(erased.folder)
    assert on_base.erased_concepts == ["circle"] and on_base.config.erasure["fused"] is False
    assert max_diff(generate(on_base), erased.trained) < FUSED_VS_LORA_ATOL
    on_base.erasure_scale = 0
    assert torch.equal(generate(on_base), erased.base)
    fused = case.munba.from_pretrained(erased.folder)
    fused.erasure_scale = 0.0  # loads the folder's LoRA with weight -1
    assert max_diff(generate(fused), erased.base) < FUSED_VS_LORA_ATOL
    fused.erasure_scale = 1.0
    assert max_diff(generate(fused), erased.trained) < FUSED_VS_LORA_ATOL


def test_compare_reads_the_prompt_as_the_erasure_was_trained(erased):
    """compare() draws what a direct call draws, and on FLUX-schnell with the trainer's 256 T5 tokens (FluxPipeline
    pads to 512 unless told, which draws another image)."""
    pipe = erased.case.munba.from_pretrained(erased.folder)
    pipe.set_progress_bar_config(disable=True)
    options = erased.case.family.call_options(pipe)
    assert options == ({"max_sequence_length": 256} if erased.case.name == "flux-schnell" else {})
    compared = pipe.compare(PROMPT, seed=0, num_inference_steps=STEPS, height=SIZE, width=SIZE).erased[0]

    def direct(**extra):
        generator = torch.Generator("cpu").manual_seed(0)
        call = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "generator": generator, **extra}
        return np.asarray(pipe(PROMPT, output_type="pil", **call).images[0])

    assert np.array_equal(np.asarray(compared), direct(**options))
    if options:
        assert not np.array_equal(np.asarray(compared), direct())


def test_the_model_card_names_the_family(erased):
    case = erased.case
    record = json.loads((erased.folder / "erasure_config.json").read_text())
    card = str(erased_model_card(record, model_id="someone/erased"))
    assert f"{case.munba.__name__}.from_pretrained" in card and f"plain `{case.stock.__name__}`" in card
    assert "`transformer/`" in card and "`unet/`" not in card and KOHYA_LORA_WEIGHT_NAME not in card
    assert "transformer target set" in card
    no_t5_hint = 'StableDiffusion3Pipeline.from_pretrained("someone/erased", text_encoder_3=None, tokenizer_3=None)'
    assert (no_t5_hint in card) == (case.stock is StableDiffusion3Pipeline)


@pytest.mark.parametrize("module", [munba_sd3_module, munba_flux_module], ids=["sd3", "flux"])
def test_pipeline_file_is_self_contained(module):
    path = Path(module.__file__)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {path.name}"
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) <= {"torch", "diffusers", "transformers"}
    spec = importlib.util.spec_from_file_location(f"standalone_{path.stem}", path)
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)
    pipelines = [
        value
        for value in vars(standalone).values()
        if isinstance(value, type) and issubclass(value, DiffusionPipeline) and value.__module__ == standalone.__name__
    ]
    assert len(pipelines) == 1


@pytest.mark.parametrize(
    ("stock", "munba", "optional"),
    [
        (StableDiffusion3Pipeline, MunbaSD3Pipeline, {"text_encoder_3", "tokenizer_3"}),
        (FluxPipeline, MunbaFluxPipeline, set()),
    ],
    ids=["sd3", "flux"],
)
def test_the_constructor_is_the_stock_one_plus_erasure(stock, munba, optional):
    """The stock constructor's parameters in order, plus erasure; SD3's T5 pair defaults to None (optional)."""
    theirs = list(inspect.signature(stock.__init__).parameters.values())
    ours = list(inspect.signature(munba.__init__).parameters.values())
    expected = [(p.name, None if p.name in optional else p.default) for p in theirs] + [("erasure", None)]
    assert [(p.name, p.default) for p in ours] == expected
    assert set(munba._optional_components) == set(stock._optional_components) | optional
    assert munba.__call__ is stock.__call__
