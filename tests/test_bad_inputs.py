"""Bad input gets one line that names the fix: every case of docs/bad_inputs.md, run in-process.

The cases below are the one source of truth: each is (surface, input, the fragment of the message that names the
fix). Every case runs in a fresh working folder that holds a user's files (:func:`make_workspace`) and must

- print exactly one line of error output (argparse's usage line, printed first for a parser error, is ignored) that
  holds the fragment, and exit with a non-zero status; a Python API case raises a one-line ValueError or OSError;
- fail before any model loads (the cases are quick);
- leave every file of the working folder byte-identical and add nothing to it.

``python -m tests.test_bad_inputs`` runs every case and rewrites docs/bad_inputs.md with the messages it printed;
:func:`test_the_doc_lists_exactly_the_cases` fails when the doc and the cases differ, and each case checks that the
doc shows its current message.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # also for `python -m tests.test_bad_inputs` (no conftest there)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402
import errno  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from munba_diffusion import io as munba_io  # noqa: E402
from munba_diffusion.bargaining import get_combiner  # noqa: E402
from munba_diffusion.benchmarks.classifier import main as classifier_main  # noqa: E402
from munba_diffusion.benchmarks.clip import main as clip_main  # noqa: E402
from munba_diffusion.classifiers.clip_unlearn import ClipUnlearnConfig  # noqa: E402
from munba_diffusion.classifiers.unlearn import UnlearnConfig  # noqa: E402
from munba_diffusion.commands.attack import main as attack_main  # noqa: E402
from munba_diffusion.commands.erase import main as erase_main  # noqa: E402
from munba_diffusion.commands.evaluate import main as evaluate_main  # noqa: E402
from munba_diffusion.diffusion.config import ErasureTrainingConfig  # noqa: E402
from munba_diffusion.diffusion.export import export_erased_model  # noqa: E402
from munba_diffusion.diffusion.loading import load_erased_pipeline  # noqa: E402
from munba_diffusion.evaluation.evaluate import EvaluationConfig, MetricOptions, evaluate_models  # noqa: E402
from munba_diffusion.evaluation.generate import GenerationSettings, ModelSpec  # noqa: E402
from munba_diffusion.evaluation.prompt_sets import load_prompt_set  # noqa: E402
from munba_diffusion.models import resolve_model_path  # noqa: E402
from munba_diffusion.presets import resolve_concept  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad_inputs.md"
PYTHON = "Python API"
PROGRESS_BAR = re.compile(r"^[^|]*:\s+\d+%\|")  # a tqdm line ("Loading weights:  40%|####  | 2/5 ...")
MAINS: dict[str, Callable] = {
    "train_erase.py": erase_main,
    "eval/evaluate.py": evaluate_main,
    "eval/attack.py": attack_main,
    "munba-unlearn-classifier": classifier_main,
    "munba-unlearn-clip": clip_main,
}
SURFACES = (*MAINS, PYTHON)
API = {  # the names a Python API case may call
    f.__name__: f
    for f in (
        ErasureTrainingConfig,
        EvaluationConfig,
        MetricOptions,
        GenerationSettings,
        ModelSpec,
        UnlearnConfig,
        ClipUnlearnConfig,
        load_erased_pipeline,
        export_erased_model,
        evaluate_models,
        get_combiner,
        resolve_concept,
        resolve_model_path,
        load_prompt_set,
    )
}


@dataclass(frozen=True)
class Case:
    """One bad input: on ``surface``, ``given`` (command-line arguments, or a Python call) is wrong as ``bad`` says,
    and the one line it gets contains ``expect``, which names the fix."""

    surface: str
    bad: str
    given: str
    expect: str


def T(bad: str, given: str, expect: str) -> Case:
    return Case("train_erase.py", bad, given, expect)


def E(bad: str, given: str, expect: str) -> Case:
    return Case("eval/evaluate.py", bad, given, expect)


def K(bad: str, given: str, expect: str) -> Case:
    return Case("eval/attack.py", bad, given, expect)


def C(bad: str, given: str, expect: str) -> Case:
    return Case("munba-unlearn-classifier", bad, given, expect)


def P(bad: str, given: str, expect: str) -> Case:
    return Case("munba-unlearn-clip", bad, given, expect)


def A(bad: str, given: str, expect: str) -> Case:
    return Case(PYTHON, bad, given, expect)


RUN = "--concept circle --output_dir run"  # train_erase.py's required options, where they are not the bad input
EVAL = "--model munba-demo --prompts eval/demo.csv --output_dir eval-run"  # the same for eval/evaluate.py
BENCH = "--output_dir bench-new"  # the benchmarks'
ATTACK = "--original munba-demo --concept red --prompts eval/demo.csv --output_dir attack-run"  # with --model

CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------------------------------- train_erase.py
    T("LoRA rank 0", f"{RUN} --rank 0", "rank (--rank) must be >= 1"),
    T("rank that is not a number", f"{RUN} --rank four", "argument --rank: invalid int value"),
    T("learning rate 0", f"{RUN} --learning_rate 0", "learning_rate (--learning_rate) must be > 0"),
    T("learning rate NaN", f"{RUN} --learning_rate nan", "learning_rate (--learning_rate) must be a finite number"),
    T("negative seed", f"{RUN} --seed -1", "seed (--seed) must be >= 0"),
    T("no training steps", f"{RUN} --max_train_steps 0", "max_train_steps (--max_train_steps) must be >= 1"),
    T("resolution below 8 pixels", f"{RUN} --resolution 4", "resolution (--resolution) must be >= 8"),
    T("negative ESD guidance", f"{RUN} --negative_guidance -1", "negative_guidance (--negative_guidance) must be >= 0"),
    T("LoRA alpha 0", f"{RUN} --lora_alpha 0", "lora_alpha (--lora_alpha) must be > 0"),
    T("unknown combiner", f"{RUN} --combiner nashh", "combiner (--combiner) must be one of nash, sum"),
    T("unknown forget loss", f"{RUN} --forget_loss mse", "forget_loss (--forget_loss) must be one of esd"),
    T("unknown LoRA target", f"{RUN} --lora_target everything", "lora_target (--lora_target) must be one of"),
    T("unknown latent source", f"{RUN} --latent_source noise", "latent_source (--latent_source) must be one of"),
    T("unknown mixed precision", f"{RUN} --mixed_precision fp8", "mixed_precision (--mixed_precision) must be one of"),
    T("unknown save dtype", f"{RUN} --save_dtype int8", "save_dtype (--save_dtype) must be one of"),
    T("unknown scheduler", f"{RUN} --lr_scheduler cosine_restarts", "lr_scheduler (--lr_scheduler) must be one of"),
    T("unknown tracker", f"{RUN} --report_to mlflow", "report_to (--report_to) must be one of none, tensorboard"),
    T(
        "unknown non-finite policy",
        f"{RUN} --nonfinite_gradients ignore",
        "nonfinite_gradients (--nonfinite_gradients) must be one of",
    ),
    T(
        "checkpoint limit 0",
        f"{RUN} --checkpoints_total_limit 0",
        "checkpoints_total_limit (--checkpoints_total_limit)",
    ),
    T("no validation seeds", f"{RUN} --validation_seeds 0", "validation_seeds (--validation_seeds) must be >= 1"),
    T("no --concept", "--output_dir run", "the following arguments are required: --concept"),
    T("no --output_dir", "--concept circle", "the following arguments are required: --output_dir"),
    T("--push_to_hub without a repository", f"{RUN} --push_to_hub", "--push_to_hub needs --hub_model_id"),
    T(
        "--push_to_hub while offline",
        f"{RUN} --push_to_hub --hub_model_id me/no-circle",
        "drop --push_to_hub and upload the folder later",
    ),
    T("8-bit Adam without bitsandbytes", f"{RUN} --use_8bit_adam", "--use_8bit_adam needs bitsandbytes (GPU)"),
    T("weights for a combiner without weights", f"{RUN} --combiner_weights 1 1", "or pass --combiner sum"),
    T("one weight for two players", f"{RUN} --combiner sum --combiner_weights 1", "needs 2 numbers"),
    T("image latents without images", f"{RUN} --latent_source images", "needs --forget_image_dir"),
    T("image folder that is a file", f"{RUN} --forget_image_dir notes.txt", "pass a folder of images"),
    T("misspelt preset", "--concept circel --output_dir run", "did you mean circle?"),
    T("empty free-text concept", "--concept text: --output_dir run", "write it as 'text:<phrase>'"),
    T("the same concept twice", f"{RUN} --concept circle", "pass each --concept once"),
    T("missing preset file", "--concept presets/missing.yaml --output_dir run", "pass an existing .yaml"),
    T(
        "preset YAML syntax error",
        "--concept presets/syntax.yaml --output_dir run",
        "presets/syntax.yaml line 3, column 1: not valid YAML",
    ),
    T(
        "preset with an unsafe YAML tag",
        "--concept presets/unsafe.yaml --output_dir run",
        "the tag !!python/object/apply:os.system is not allowed",
    ),
    T(
        "preset 'forget' that is a number",
        "--concept presets/types.yaml --output_dir run",
        "presets/types.yaml: 'forget' must be a list of strings",
    ),
    T(
        "preset 'name' that is a list",
        "--concept presets/name.yaml --output_dir run",
        "presets/name.yaml: 'name' must be a non-empty string",
    ),
    T(
        "preset prompt that is a number",
        "--concept presets/item.yaml --output_dir run",
        "entry 2 of 'forget' must be a string",
    ),
    T("misspelt preset key", "--concept presets/typo.yaml --output_dir run", "did you mean 'forget'?"),
    T(
        "preset with fewer anchors than prompts",
        "--concept presets/anchors.yaml --output_dir run",
        "give one anchor string, or one anchor per forget prompt",
    ),
    T(
        "preset with fewer substitutes than prompts",
        "--concept presets/substitutes.yaml --output_dir run",
        "'substitutes' must be a list with one entry per 'forget' prompt (2)",
    ),
    T(
        "substitute target with images of the concept",
        f"{RUN} --forget_loss substitute --forget_image_dir out/images",
        "drop one of the two (with images of the concept, use --forget_loss anchor)",
    ),
    T(
        "substitute that is itself erased",
        "--concept presets/self_substitute.yaml --forget_loss substitute --output_dir run",
        "the substitute 'a disc' is itself a forget prompt",
    ),
    T(
        "preset without 'forget'",
        "--concept presets/noforget.yaml --output_dir run",
        "needs at least 'name' and 'forget'",
    ),
    T("preset that is not UTF-8", "--concept presets/latin1.yaml --output_dir run", "save it as UTF-8"),
    T("missing prompt file", f"{RUN} --forget_prompts_file prompts/missing.txt", "pass a text file with one prompt"),
    T("prompt file without prompts", f"{RUN} --forget_prompts_file prompts/empty.txt", "write one prompt per line"),
    T("prompt file that is a folder", f"{RUN} --preserve_prompts_file prompts", "prompts is not a file"),
    T(
        "one prompt file for two concepts",
        f"{RUN} --concept square --forget_prompts_file prompts/forget.txt",
        "use preset .yaml files for several",
    ),
    T("--output_dir that is a file", "--concept circle --output_dir notes.txt", "is a file; pass a folder"),
    T(
        "--output_dir holding the user's files",
        "--concept circle --output_dir out",
        "holds files this project did not write (README.md, images)",
    ),
    T(
        "checkpoint that does not exist",
        f"{RUN} --resume_from_checkpoint checkpoint-9",
        'pass "latest" or a checkpoint-N folder',
    ),
    T(
        "earlier checkpoints, neither resumed nor replaced",
        "--concept circle --output_dir runs/rank",
        "pass --resume_from_checkpoint latest to continue it or --overwrite_output_dir",
    ),
    T(
        "resuming a run of another rank",
        "--concept circle --output_dir runs/rank --resume_from_checkpoint latest",
        "resume with the same --rank",
    ),
    T(
        "resuming a truncated run_config.json",
        "--concept circle --output_dir runs/truncated --resume_from_checkpoint latest",
        "cannot be read (JSONDecodeError); resume from another checkpoint",
    ),
    T(
        "resuming a torn checkpoint (no step.json)",
        "--concept circle --output_dir runs/torn --resume_from_checkpoint latest",
        "step.json (its step) cannot be read",
    ),
    T(
        "resuming a folder that is not a checkpoint",
        "--concept circle --output_dir runs/nolora --resume_from_checkpoint checkpoint-2",
        "is not a checkpoint of this trainer",
    ),
    T(
        "base model folder that is not a pipeline",
        f"{RUN} --pretrained_model_name_or_path mine",
        "is not a diffusers pipeline folder (no model_index.json)",
    ),
    T("base model folder that does not exist", f"{RUN} --pretrained_model_name_or_path ./missing", "does not exist;"),
    T(
        "a FLUX folder without its T5 encoder",
        f"{RUN} --pretrained_model_name_or_path fluxnot5",
        "has no T5 text encoder (text_encoder_2/), which FLUX needs for its prompt tokens",
    ),
    T(
        "a LoRA target set the model's family lacks",
        f"{RUN} --pretrained_model_name_or_path sd3 --lora_target single",
        "--lora_target single does not exist for Stable Diffusion 3; choose one of",
    ),
    T(
        "a FLUX guidance for a model without guidance input",
        f"{RUN} --pretrained_model_name_or_path sd3 --flux_guidance 3.5",
        "--flux_guidance is for guidance-distilled FLUX-dev; Stable Diffusion 3 takes no guidance input",
    ),
    T(
        "sharding the base over a one-process launch",
        f"{RUN} --pretrained_model_name_or_path sd3 --shard_base",
        "--shard_base splits the base model across processes and this launch has one: launch several",
    ),
    T(
        "sharding the base with latents drawn afresh",
        f"{RUN} --shard_base --latent_source fresh",
        "--latent_source fresh runs a different number of transformer passes on each process",
    ),
    T(
        "robust mode on a flow transformer",
        f"{RUN} --pretrained_model_name_or_path sd3 --robust",
        "--robust is not supported on Stable Diffusion 3 yet",
    ),
    T(
        "an SDXL refiner folder (no text_encoder)",
        f"{RUN} --pretrained_model_name_or_path refiner",
        "this is an SDXL refiner folder (image-to-image, no text_encoder)",
    ),
    T(
        "a pipeline class no family covers",
        f"{RUN} --pretrained_model_name_or_path kandinsky",
        "KandinskyV22Pipeline is not supported; erasure supports StableDiffusionPipeline (SD 1.x, 2.x)",
    ),
    T(
        "Hub id offline, not in the cache",
        f"{RUN} --pretrained_model_name_or_path someone/not-cached",
        "is not in the local Hugging Face cache",
    ),
    T(
        "a CLIP where a pipeline is expected",
        f"{RUN} --pretrained_model_name_or_path munba-demo-clip",
        "bundled pipeline models: munba-demo",
    ),
    T(
        "robust mode with no adversarial forgetting",
        f"{RUN} --robust --combiner sum --combiner_weights 1 1 0",
        "zero weight on every adversarial player",
    ),
    T("robust-mode option without --robust", f"{RUN} --adversarial_steps 3", "add --robust or drop it"),
    # ---------------------------------------------------------------------------------------- eval/attack.py
    K(
        "prefix length 0",
        f"--model munba-demo {ATTACK} --prefix_tokens 0",
        "prefix_tokens (--prefix_tokens) must be >= 1",
    ),
    K("attacked folder that is not a pipeline", f"--model mine {ATTACK}", "--model: "),
    K("NudeNet asked about a colour", f"--model munba-demo {ATTACK} --detector nudenet", "use --detector demo"),
    K(
        "white-box attack on a flow transformer",
        f"--model munba-demo-flow {ATTACK}",
        "the white-box attack's soft prompt prefixes are not available on Stable Diffusion 3 yet; run --attack replay",
    ),
    K(
        "a concept no detector judges",
        "--model munba-demo --original munba-demo --concept van-gogh --prompts eval/demo.csv --output_dir a",
        "no detector judges 'van-gogh'",
    ),
    K(
        "replay CSV without a prompt column",
        "--attack replay --model munba-demo --original munba-demo --concept red --prompts csv/noprompt.csv "
        "--output_dir a",
        "no 'prompt' column",
    ),
    # ---------------------------------------------------------------------------------------- eval/evaluate.py
    E("guidance NaN", f"{EVAL} --guidance nan", "guidance_scale (--guidance) must be a finite number"),
    E("negative guidance", f"{EVAL} --guidance -1", "guidance_scale (--guidance) must be >= 0"),
    E(
        "NudeNet threshold above 1",
        f"{EVAL} --nudenet_threshold 6",
        "nudenet_threshold (--nudenet_threshold) must be <= 1",
    ),
    E(
        "attack threshold above 1",
        f"{EVAL} --attack_threshold 1.5",
        "attack_threshold (--attack_threshold) must be <= 1",
    ),
    E("no sampler steps", f"{EVAL} --steps 0", "num_inference_steps (--steps) must be >= 1"),
    E("batch size 0", f"{EVAL} --batch_size 0", "batch_size (--batch_size) must be >= 1"),
    E("resolution not a multiple of 8", f"{EVAL} --resolution 30", "must be a multiple of 8"),
    E("unknown metric", f"{EVAL} --metrics clip bogus", "metrics (--metrics) must be one of nudenet, fid, clip"),
    E("unknown dtype", f"{EVAL} --dtype float64", "dtype (--dtype) must be one of float32"),
    E("unknown scheduler", f"{EVAL} --scheduler Foo", "such as DDIMScheduler"),
    E("unknown device", f"{EVAL} --device gpu", "must be a torch device such as cpu, cuda or cuda:1"),
    E("--limit 0", f"{EVAL} --limit 0", "limit (--limit) must be >= 1"),
    E("FID without a reference", f"{EVAL} --metrics fid", "reference_dir (--reference_dir) is required by the fid"),
    E(
        "FID reference that does not exist",
        f"{EVAL} --metrics fid --reference_dir stats.npz",
        "pass a folder of images or a .npz",
    ),
    E("two labels for one model", f"{EVAL} --label a --label b", "give one per model or none"),
    E("model spec without a LoRA", "--model munba-demo:: --prompts eval/demo.csv --output_dir e", "BASE::LORA_FILE"),
    E("demo concept that is not one", f"{EVAL} --metrics demo --concept dog", "concept (--concept)"),
    E("objects concept that is not an Imagenette class", f"{EVAL} --metrics objects --concept zebra", "Imagenette"),
    E("NudeNet asked about a colour", f"{EVAL} --metrics nudenet --concept red", "add --metrics demo"),
    E("missing prompt set", "--model munba-demo --prompts csv/missing.csv --output_dir e", "pass a CSV path"),
    E(
        "prompt set without a prompt column",
        "--model munba-demo --prompts csv/noprompt.csv --output_dir e",
        "no 'prompt' column",
    ),
    E("prompt set with a bad seed", "--model munba-demo --prompts csv/badseed.csv --output_dir e", "fix that cell"),
    E(
        "prompt set that is not UTF-8",
        "--model munba-demo --prompts csv/latin1.csv --output_dir e",
        "save it as UTF-8 CSV",
    ),
    E("--nudity_only on a set without nudity", f"{EVAL} --nudity_only", "needs a nudity_percentage column"),
    E("--category on a set without categories", f"{EVAL} --category sexual", "needs a categories column"),
    E("objects metric on a set without labels", f"{EVAL} --metrics objects", "use prompts/eval/imagenette_objects.csv"),
    E(
        "demo metric on a set without shapes",
        "--model munba-demo --prompts eval/artists.csv --output_dir e --metrics demo",
        "use a demo prompt set",
    ),
    E(
        "I2P offline",
        "--model munba-demo --prompts i2p --output_dir e",
        "go online once, or save it as CSV and pass the file",
    ),
    E(
        "--output_dir holding a report",
        "--model munba-demo --prompts eval/demo.csv --output_dir evalrun",
        "pass --overwrite to replace it",
    ),
    E(
        "--output_dir that is a file",
        "--model munba-demo --prompts eval/demo.csv --output_dir notes.txt",
        "pass a folder",
    ),
    E(
        "model folder that is not a pipeline",
        "--model mine --prompts eval/demo.csv --output_dir e",
        "is not a diffusers pipeline folder (no model_index.json)",
    ),
    E(
        "second model bad (refused before the first loads)",
        "--model munba-demo --model ./missing --prompts eval/demo.csv --output_dir e",
        "model ./missing does not exist",
    ),
    E(
        "Hub id offline, not in the cache",
        "--model someone/not-cached --prompts eval/demo.csv --output_dir e",
        "is not in the local Hugging Face cache",
    ),
    E(
        "missing LoRA file",
        "--model munba-demo::lora/missing.safetensors --prompts eval/demo.csv --output_dir e",
        "not found; pass BASE::path/to/pytorch_lora_weights.safetensors",
    ),
    E(
        "truncated LoRA safetensors",
        "--model munba-demo::lora/truncated.safetensors --prompts eval/demo.csv --output_dir e",
        "is damaged or not safetensors",
    ),
    E(
        "pickled LoRA (.bin)",
        "--model munba-demo::lora/lora.bin --prompts eval/demo.csv --output_dir e",
        "is a pickle, which is never loaded here",
    ),
    E(
        "pickle renamed .safetensors",
        "--model munba-demo::lora/pickled.safetensors --prompts eval/demo.csv --output_dir e",
        "convert it to .safetensors",
    ),
    E(
        "LoRA file without the .safetensors suffix",
        "--model munba-demo::lora/weights.txt --prompts eval/demo.csv --output_dir e",
        "must be a .safetensors file",
    ),
    # ---------------------------------------------------------------------------------------- classifier
    C("unknown model", f"{BENCH} --model vgg", "model (--model) must be one of"),
    C("unknown method", f"{BENCH} --methods salun", "methods (--methods) must be one of"),
    C("unknown combiner", f"{BENCH} --combiner nashh", "combiner (--combiner) must be one of"),
    C("no epochs", f"{BENCH} --epochs 0", "epochs (--epochs) must be >= 1"),
    C("no seeds", f"{BENCH} --seeds", "argument --seeds: expected at least one argument"),
    C("learning-rate grid with 0", f"{BENCH} --lr_grid 0", "lr_grid (--lr_grid) must be > 0"),
    C("no threads", f"{BENCH} --threads 0", "threads (--threads) must be >= 1"),
    C(
        "empty training subset",
        f"{BENCH} --max_train_samples 0",
        "max_train_samples (--max_train_samples) must be >= 1",
    ),
    C("unknown forget spec", f"{BENCH} --forget everything", "use random:FRACTION (e.g. random:0.1) or class:ID"),
    C("forget fraction above 1", f"{BENCH} --forget random:2", "use e.g. random:0.1"),
    C("forget class out of range", f"{BENCH} --forget class:99 --seeds 0", "the dataset has classes 0..9"),
    C("bad learning-rate override", f"{BENCH} --unlearn_lr munba=0", "such as class:munba=0.03"),
    C("unknown device", f"{BENCH} --device gpu", "must be a torch device such as cpu, cuda or cuda:1"),
    C("dataset offline, not cached", f"{BENCH} --dataset someone/not-cached", "pass 'digits' (offline)"),
    C("--output_dir holding results", "--output_dir bench", "pass --overwrite to replace it"),
    # ---------------------------------------------------------------------------------------- CLIP
    P("unknown class to forget", f"{BENCH} --forget hexagon", "valid labels: circle, square, triangle, cross"),
    P("template without {label}", f"{BENCH} --templates 'a photo'", "write e.g. 'a photo of a {label}.'"),
    P("unknown dtype", f"{BENCH} --dtype float64", "dtype (--dtype) must be one of float32"),
    P("unknown parameter set", f"{BENCH} --params everything", "params (--params) must be one of"),
    P("LoRA rank 0", f"{BENCH} --lora_rank 0", "lora_rank (--lora_rank) must be >= 1"),
    P("momentum 1", f"{BENCH} --momentum 1", "momentum (--momentum) must be < 1"),
    P("no steps", f"{BENCH} --steps 0", "steps (--steps) must be >= 1"),
    P("unknown device", f"{BENCH} --device gpu", "must be a torch device such as cpu, cuda or cuda:1"),
    P("CLIP offline, not cached", f"{BENCH} --model someone/not-cached", "pass a local CLIP folder or go online once"),
    P("--output_dir holding results", "--output_dir bench", "pass --overwrite to replace it"),
    # ---------------------------------------------------------------------------------------- Python API
    A("rank 0", "ErasureTrainingConfig(concepts=['circle'], output_dir='run', rank=0)", "rank (--rank) must be >= 1"),
    A("no concept", "ErasureTrainingConfig(concepts=[], output_dir='run')", "name at least one concept to erase"),
    A(
        "preset with an unsafe tag",
        "ErasureTrainingConfig(concepts=['presets/unsafe.yaml'], output_dir='run')",
        "remove the tag",
    ),
    A(
        "metrics as a string",
        "EvaluationConfig(model=['munba-demo'], prompts='demo', output_dir='e', metrics='clip')",
        "must be a list",
    ),
    A("no model", "EvaluationConfig(model=[], prompts='eval/demo.csv', output_dir='e')", "give at least one model"),
    A("guidance NaN", "GenerationSettings(guidance_scale=float('nan'))", "must be a finite number"),
    A(
        "NudeNet threshold 6",
        "MetricOptions(nudenet_threshold=6.0)",
        "nudenet_threshold (--nudenet_threshold) must be <= 1",
    ),
    A("model spec without a LoRA", "ModelSpec.parse('base::')", "use PATH or BASE::LORA_FILE"),
    A("unknown unlearning method", "UnlearnConfig(method='finetune')", "method (--method) must be one of"),
    A("learning rate 0", "UnlearnConfig(method='munba', lr=0.0)", "lr (--lr) must be > 0"),
    A("CLIP LoRA rank 0", "ClipUnlearnConfig(lora_rank=0)", "lora_rank (--lora_rank) must be >= 1"),
    A("unknown combiner", "get_combiner('nashh')", "choose one of nash, sum"),
    A("option a combiner lacks", "get_combiner('nash', weights=[1.0, 2.0])", "its options are"),
    A("misspelt preset", "resolve_concept('circel')", "did you mean circle?"),
    A("preset YAML with wrong types", "resolve_concept('presets/types.yaml')", "'forget' must be a list of strings"),
    A("a CLIP where a pipeline is expected", "resolve_model_path('munba-demo-clip')", "bundled pipeline models"),
    A("missing prompt set", "load_prompt_set('csv/missing.csv')", "pass a CSV path"),
    A("erased model folder that is not one", "load_erased_pipeline('mine')", "pass the folder the trainer wrote"),
    A("erased model folder that does not exist", "load_erased_pipeline('./missing')", "pass the erased model folder"),
    A(
        "exporting into the user's folder",
        "export_erased_model(None, 'out', {})",
        "choose an empty or new --output_dir (your files are never replaced)",
    ),
    A(
        "evaluating a pickled LoRA",
        "evaluate_models(['munba-demo::lora/lora.bin'], 'eval/demo.csv', 'e')",
        "is a pickle, which is never loaded here",
    ),
    A(
        "evaluating a folder that is not a pipeline",
        "evaluate_models(['munba-demo', 'mine'], 'eval/demo.csv', 'e')",
        "is not a diffusers pipeline folder",
    ),
)


# ------------------------------------------------------------------------------------------ the working folder
def _small_safetensors(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.zeros(4, 4)}, str(path))
    return path


def _checkpoint(run: Path, record: dict | None, *, step: bool = True, lora: bool = True) -> Path:
    folder = run / "checkpoints" / "checkpoint-2"
    folder.mkdir(parents=True)
    if lora:
        _small_safetensors(folder / "erasure_lora.safetensors")
    if step:
        (folder / "step.json").write_text(json.dumps({"global_step": 2}))
    if record is not None:
        (folder / "run_config.json").write_text(json.dumps(record))
    return folder


def make_workspace(root: Path) -> None:
    """The files the cases name: a user's notes, an output folder with the user's own README.md and images/, a
    folder that is not a pipeline, broken presets, prompt files and CSVs, LoRA files, runs with checkpoints,
    an earlier evaluation and benchmark results."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("my notes\n")
    (root / "out" / "images").mkdir(parents=True)
    (root / "out" / "README.md").write_text("# my project\n")
    (root / "out" / "images" / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\nmy cat")
    (root / "mine").mkdir()
    (root / "mine" / "notes.md").write_text("not a pipeline\n")
    for folder, class_name in (
        ("sd3", "StableDiffusion3Pipeline"),
        ("refiner", "StableDiffusionXLImg2ImgPipeline"),
        ("kandinsky", "KandinskyV22Pipeline"),
    ):
        (root / folder).mkdir()
        (root / folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    (root / "fluxnot5").mkdir()
    index = {"_class_name": "FluxPipeline", "text_encoder_2": [None, None], "transformer": ["diffusers", "x"]}
    (root / "fluxnot5" / "model_index.json").write_text(json.dumps(index))

    presets = root / "presets"
    presets.mkdir()
    (presets / "syntax.yaml").write_text("name: broken\nforget: [a circle\n")
    (presets / "unsafe.yaml").write_text('!!python/object/apply:os.system ["echo pwned > pwned.txt"]\n')
    (presets / "types.yaml").write_text("name: typed\nforget: 3\n")
    (presets / "name.yaml").write_text("name: [a, b]\nforget: [a circle]\n")
    (presets / "item.yaml").write_text("name: items\nforget: [a circle, 3]\n")
    (presets / "typo.yaml").write_text("name: typo\nforgett: [a circle]\n")
    (presets / "anchors.yaml").write_text("name: anchors\nforget: [a circle, a disc]\nanchor: [an object]\n")
    (presets / "substitutes.yaml").write_text("name: subs\nforget: [a circle, a disc]\nsubstitutes: [a square]\n")
    (presets / "self_substitute.yaml").write_text(
        "name: subs\nforget: [a circle, a disc]\nsubstitutes: [[a square, a disc], a cross]\n"
    )
    (presets / "noforget.yaml").write_text("name: nothing\n")
    (presets / "latin1.yaml").write_bytes("name: caf\xe9\nforget: [a caf\xe9]\n".encode("latin-1"))

    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "empty.txt").write_text("# nothing here\n\n")
    (prompts / "forget.txt").write_text("a circle\n")

    csvs = root / "csv"
    csvs.mkdir()
    (csvs / "noprompt.csv").write_text("text,seed\na circle,1\n")
    (csvs / "badseed.csv").write_text("prompt,seed\na circle,x\n")
    (csvs / "latin1.csv").write_bytes("prompt,seed\nun caf\xe9,1\n".encode("latin-1"))

    lora = root / "lora"
    good = _small_safetensors(lora / "good.safetensors").read_bytes()
    (lora / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (lora / "lora.bin").write_bytes(pickle.dumps({"weight": [0.0] * 16}))
    (lora / "pickled.safetensors").write_bytes(pickle.dumps({"weight": [0.0] * 16}))
    (lora / "weights.txt").write_bytes(good)

    same = ErasureTrainingConfig(concepts=["circle"], output_dir="runs/x").record()
    _checkpoint(
        root / "runs" / "rank", ErasureTrainingConfig(concepts=["circle"], output_dir="runs/x", rank=8).record()
    )
    truncated = _checkpoint(root / "runs" / "truncated", None)
    (truncated / "run_config.json").write_text(json.dumps(same)[:100])
    _checkpoint(root / "runs" / "torn", same, step=False)
    _checkpoint(root / "runs" / "nolora", same, lora=False)

    (root / "evalrun").mkdir()
    (root / "evalrun" / "report.json").write_text('{"results": {}}\n')
    (root / "bench").mkdir()
    (root / "bench" / "results.json").write_text('{"runs": []}\n')


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------------------ running a case
@dataclass(frozen=True)
class Outcome:
    status: int | None  # the exit status; None for a Python API case
    lines: list[str]  # the error lines (argparse's usage lines left out), or the exception as one line per line


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` without argparse's usage line and its continuation lines (and blank lines)."""
    lines, in_usage = [], False
    for line in stderr.splitlines():
        if line.startswith("usage:"):
            in_usage = True
        elif not (in_usage and line[:1].isspace()):
            in_usage = False
            if line.strip():
                lines.append(line)
    return lines


def run_case(case: Case, root: Path) -> Outcome:
    """Run ``case`` in-process with ``root`` as the working folder."""
    previous = Path.cwd()
    os.chdir(root)
    try:
        if case.surface == PYTHON:
            try:
                eval(case.given, {"__builtins__": {"float": float}}, dict(API))  # noqa: S307 the cases' own calls
            except (ValueError, OSError) as error:
                return Outcome(None, f"{type(error).__name__}: {error}".splitlines())
            raise AssertionError(f"{case.given} did not raise a ValueError or OSError")
        stderr = io.StringIO()
        with (
            contextlib.redirect_stderr(stderr),
            contextlib.redirect_stdout(io.StringIO()),
            warnings.catch_warnings(),
        ):
            # warnings go to stderr as in a real process (pytest would record them instead), with Python's filters
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)  # inserted first, so these win
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line)
            )
            try:
                MAINS[case.surface](shlex.split(case.given))
                status: int | str | None = 0
            except SystemExit as stop:
                status = stop.code
        if isinstance(status, str):  # sys.exit("message"): Python prints it and exits with 1
            stderr.write(status + "\n")
            status = 1
        return Outcome(status if status is not None else 0, error_lines(stderr.getvalue()))
    finally:
        os.chdir(previous)


def shown(message: str, root: Path) -> str:
    """``message`` as the doc shows it: the working folder and the repository as short names."""
    for path, name in ((root.resolve(), "."), (root, "."), (REPO, "<repo>")):
        message = message.replace(str(path), name)
    return message


# ------------------------------------------------------------------------------------------ the doc
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(number: int, case: Case) -> str:
    """The start of a case's table row (its message follows)."""
    return f"| {number} | {_cell(case.bad)} | `{_cell(case.given)}` | "


def render_doc(messages: list[str]) -> str:
    """docs/bad_inputs.md from :data:`CASES` and each case's message (in order); the fragment is in bold."""
    counts = {s: sum(c.surface == s for c in CASES) for s in SURFACES}
    lines = [
        "# Bad inputs and their one-line messages",
        "",
        "<!-- Generated by `python -m tests.test_bad_inputs` from the cases in tests/test_bad_inputs.py; "
        "tests/test_bad_inputs.py fails when this file and the cases differ. -->",
        "",
        "Every input below stops with exactly one line that names the fix (after argparse's usage line, for an "
        "option the parser refuses) and a non-zero exit status, before any model loads; a Python call raises a "
        "one-line `ValueError` or `OSError`. No file of the working folder is changed and none is added (a "
        "refused run may leave its new, empty `--output_dir`); nothing is unpickled. The part in bold is what "
        "the test checks; the rest is the message as printed.",
        "",
        f"{len(CASES)} cases: " + ", ".join(f"{s} {counts[s]}" for s in SURFACES) + ".",
        "",
        "The working folder of every case holds: `notes.txt`; `out/` (the user's `README.md` and `images/`); "
        "`mine/` (a folder that is not a pipeline); broken presets in `presets/`; prompt files in `prompts/`; "
        "CSVs in `csv/`; LoRA files in `lora/` (truncated, pickled, misnamed); runs in `runs/` whose "
        "`checkpoints/checkpoint-2` was written by hand (another rank, a truncated `run_config.json`, no "
        "`step.json`, no LoRA); `evalrun/report.json`; `bench/results.json`. The Hub is offline "
        "(`HF_HUB_OFFLINE=1`).",
        "",
    ]
    number = 0
    for surface in SURFACES:
        title = surface if surface == PYTHON else f"`{surface}`"
        given = "Call" if surface == PYTHON else "Arguments"
        lines += [f"## {title} ({counts[surface]})", "", f"| # | Bad input | {given} | Message |", "|---|---|---|---|"]
        for case, message in zip(_ordered(), messages):  # messages come in the doc's order
            if case.surface != surface:
                continue
            number += 1
            assert case.expect in message, f"{case}: {message!r} lacks {case.expect!r}"
            start = message.index(case.expect)
            end = start + len(case.expect)
            bold = f"{message[:start]}**{message[start:end]}**{message[end:]}"
            lines.append(_row(number, case) + _cell(bold) + " |")
        lines.append("")
    return "\n".join(lines)


def _ordered() -> list[Case]:
    return [c for s in SURFACES for c in CASES if c.surface == s]


def documented_messages(text: str) -> dict[Case, str]:
    """The message the doc shows for each case it lists in the order of :data:`CASES` (a case the doc lacks or
    lists differently is left out)."""
    found, rows = {}, [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    for number, (case, row) in enumerate(zip(_ordered(), rows), start=1):
        start = _row(number, case)
        if row.startswith(start) and row.endswith(" |"):
            found[case] = row[len(start) : -2].replace("\\|", "|").replace("**", "")
    return found


def write_doc() -> None:
    """Run every case in a fresh working folder and write docs/bad_inputs.md."""
    messages = {}
    with tempfile.TemporaryDirectory() as scratch:
        for number, case in enumerate(CASES):
            root = Path(scratch) / str(number)
            make_workspace(root)
            outcome = run_case(case, root)
            messages[case] = shown(outcome.lines[0] if len(outcome.lines) == 1 else " / ".join(outcome.lines), root)
    DOC.write_text(render_doc([messages[c] for c in _ordered()]), encoding="utf-8")
    print(f"wrote {DOC} ({len(CASES)} cases)")


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture
def workspace(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "work"
    make_workspace(root)
    return root


@pytest.mark.parametrize("case", CASES, ids=[f"{c.surface}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_gets_one_line_that_names_the_fix(case: Case, workspace: Path):
    before = snapshot(workspace)
    outcome = run_case(case, workspace)

    assert len(outcome.lines) == 1, f"{case.given}: expected one line, got {outcome.lines}"
    assert case.expect in outcome.lines[0], f"{case.given}: {outcome.lines[0]!r} lacks {case.expect!r}"
    if case.surface != PYTHON:
        assert outcome.status not in (0, None), f"{case.given}: exit status {outcome.status}"
    after = snapshot(workspace)
    changed = sorted(p for p in before if after.get(p, b"<gone>") != before[p])
    assert not changed, f"{case.given} changed the user's files {changed}"
    added = sorted(p for p in set(after) - set(before) if after[p] is not None)  # (an empty folder may be left)
    assert not added, f"{case.given} left the files {added}"
    documented = documented_messages(DOC.read_text(encoding="utf-8")).get(case)
    assert documented == shown(outcome.lines[0], workspace), (
        f"docs/bad_inputs.md shows another message for {case.given!r}; run `python -m tests.test_bad_inputs`"
    )


def test_the_doc_lists_exactly_the_cases():
    assert len(CASES) >= 50 and len(set(CASES)) == len(CASES)
    assert {c.surface for c in CASES} == set(SURFACES)
    text = DOC.read_text(encoding="utf-8")
    messages = documented_messages(text)
    assert len(messages) == len(CASES), "docs/bad_inputs.md lists other cases; run `python -m tests.test_bad_inputs`"
    assert text == render_doc([messages[c] for c in _ordered()]), "run `python -m tests.test_bad_inputs`"


def test_a_full_disk_while_evaluating_is_one_line_and_leaves_no_partial_file(workspace: Path, monkeypatch):
    """Every write goes through io.atomic_write; a full disk there is one line naming the fix, exit status 1."""
    real_open = munba_io._open_temporary

    class FullDisk:
        def __init__(self, handle):
            self._handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

    def open_on_a_full_disk(path, binary):
        temporary, handle = real_open(path, binary)
        return temporary, FullDisk(handle)

    monkeypatch.setattr(munba_io, "_open_temporary", open_on_a_full_disk)
    before = snapshot(workspace)
    case = E("disk full", "--model munba-demo --prompts eval/demo.csv --limit 1 --steps 1 --output_dir e", "")
    outcome = run_case(case, workspace)

    lines = [line for line in outcome.lines if not PROGRESS_BAR.match(line)]  # the model loaded: its progress bars
    assert outcome.status == 1 and len(lines) == 1, outcome
    assert "no space left" in lines[0] and "pass another --output_dir" in lines[0]
    after = snapshot(workspace)
    assert all(after.get(p) == before[p] for p in before)
    assert not [p for p in after if p.endswith(".munba-tmp")], "a partial file was left"


@pytest.mark.parametrize(
    ("script", "given", "expect"),
    [
        ("train_erase.py", "--concept presets/unsafe.yaml --output_dir run", "the tag !!python/object/apply:os.system"),
        (
            "eval/evaluate.py",
            "--model munba-demo::lora/truncated.safetensors --prompts eval/demo.csv --output_dir e",
            "is damaged or not safetensors",
        ),
    ],
)
def test_the_scripts_print_one_line_in_a_real_process(script, given, expect, workspace: Path):
    """The same refusal from a real process: nothing else on stderr (no traceback, warning or log line)."""
    before = snapshot(workspace)
    result = subprocess.run(
        [sys.executable, str(REPO / script), *shlex.split(given)],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    lines = error_lines(result.stderr)
    assert result.returncode != 0 and len(lines) == 1 and expect in lines[0], result.stderr
    assert snapshot(workspace) == before and not (workspace / "pwned.txt").exists()


if __name__ == "__main__":
    write_doc()
