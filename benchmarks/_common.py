"""Pieces the benchmark scripts share: the one results writer, option helpers, UNet builders, random erasure
batches, one timed erasure step per variant, and demo-world erasure runs with their scores.

Every benchmark declares its command line once, as a dataclass of :func:`munba_diffusion.config.option` fields;
:func:`munba_diffusion.config.parse_config` builds the parser (``--output_dir`` flags with ``--output-dir``
aliases). Every benchmark writes ``<stem>.json`` / ``<stem>.md`` through :func:`write_results`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import torch

from munba_diffusion.config import check_options, option
from munba_diffusion.diffusion.base_model import base_model_family, hub_commit
from munba_diffusion.diffusion.family import FlowFamily
from munba_diffusion.diffusion.lora import TARGET_SETS, TRANSFORMER_TARGET_SETS_REVISION
from munba_diffusion.io import atomic_write, check_results_dir, machine_record, write_json_atomic, write_text_atomic
from munba_diffusion.models import DEMO_MODEL, model_folder_sha256

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
PLAYERS = ["preserve", "forget"]

SD15_UNET_CONFIG = dict(
    # stable-diffusion-v1-5/unet/config.json, written out (random weights: no download needed)
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
    use_linear_projection=False,
)
SD15_TINY_UNET_CONFIG = {
    # SD 1.5's block structure at a tiny width, for tests and CPU dry runs of the GPU script
    **SD15_UNET_CONFIG,
    "sample_size": 8,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
}
SD15_SMALL_UNET_CONFIG = {
    # SD 1.5's block structure at a fifth of its width (25M parameters), for quick memory comparisons
    **SD15_UNET_CONFIG,
    "sample_size": 8,
    "block_out_channels": (64, 128, 256, 256),
    "layers_per_block": 1,
}
SDXL_UNET_CONFIG = dict(
    # stable-diffusion-xl-base-1.0/unet/config.json, written out (random weights: no download needed)
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280-wide pooled text embedding
    norm_num_groups=32,
)
SDXL_TINY_UNET_CONFIG = {
    # SDXL's block structure at a tiny width, for tests and CPU dry runs of the GPU script
    **SDXL_UNET_CONFIG,
    "sample_size": 8,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 4, 4),
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
}
UNET_ARCHITECTURES = {
    "sd15": SD15_UNET_CONFIG,
    "sd15-small": SD15_SMALL_UNET_CONFIG,
    "sd15-tiny": SD15_TINY_UNET_CONFIG,
    "sdxl": SDXL_UNET_CONFIG,
    "sdxl-tiny": SDXL_TINY_UNET_CONFIG,
}
TEXT_SEQUENCE_LENGTH = 77
FLUX_DEV_TRANSFORMER_CONFIG = dict(
    # FLUX.1-dev/transformer/config.json, written out (random weights: no download needed); 12B parameters
    patch_size=1,
    in_channels=64,  # 16 latent channels x a 2x2 patch per token
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,  # T5-XXL's width
    pooled_projection_dim=768,  # CLIP-L's pooled projection
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_TINY_TRANSFORMER_CONFIG = {
    # FLUX.1-dev's block structure (double- and single-stream blocks, guidance embedding) at a tiny width, for CPU
    # dry runs of the GPU script
    **FLUX_DEV_TRANSFORMER_CONFIG,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
TRANSFORMER_ARCHITECTURES = {"flux": FLUX_DEV_TRANSFORMER_CONFIG, "flux-tiny": FLUX_TINY_TRANSFORMER_CONFIG}
FLUX_TEXT_LENGTHS = {"flux": 512, "flux-tiny": 16}  # T5 tokens: FluxPipeline's max_sequence_length for dev


# ------------------------------------------------------------------------------------------ results
def check_results(output_dir: str | Path, overwrite: bool, stem: str = "results") -> Path:
    """Refuse (one-line ``FileExistsError`` naming ``--overwrite``) a folder holding ``<stem>.json`` or ``<stem>.md``
    unless ``overwrite``; nothing is created. Call it before the work, so that a run never ends in a refusal."""
    return check_results_dir(output_dir, (f"{stem}.json", f"{stem}.md"), overwrite=overwrite)


def write_results(
    output_dir: str | Path,
    results: Mapping[str, Any],
    markdown: Callable[[Mapping[str, Any]], str],
    *,
    overwrite: bool = False,
    stem: str = "results",
    plot: Callable[[Mapping[str, Any], Path], None] | None = None,
    plot_name: str | None = None,
    echo: bool = False,
) -> list[Path]:
    """The results writer of every benchmark: ``<stem>.json`` (strict JSON; NaN becomes null), the plot (if any),
    ``<stem>.md`` (``markdown(results)``), each written atomically into ``output_dir`` (created if needed).

    Earlier results are refused unless ``overwrite`` (see :func:`check_results`). Results without a ``machine``
    entry get one (:func:`munba_diffusion.io.machine_record`). ``echo`` prints the Markdown. Returns the paths:
    JSON, Markdown, then the plot.
    """
    folder = check_results(output_dir, overwrite, stem)
    folder.mkdir(parents=True, exist_ok=True)
    if "machine" not in results:
        results = {**results, "machine": machine_record()}
    paths = [write_json_atomic(folder / f"{stem}.json", results)]
    if plot is not None:
        plot(results, folder / (plot_name or f"{stem}.png"))
    text = markdown(results)
    paths.append(write_text_atomic(folder / f"{stem}.md", text))
    if plot is not None:
        paths.append(folder / (plot_name or f"{stem}.png"))
    if echo:
        print(text)
    return paths


def save_figure(figure, path: Path) -> None:
    """Save a matplotlib figure atomically (format from the suffix)."""
    with atomic_write(path) as handle:
        figure.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")


def run_script(main: Callable[[], object], name: str) -> None:
    """Run a benchmark's ``main``; bad input and missing files end it with a one-line error."""
    try:
        main()
    except (ValueError, OSError, RuntimeError) as error:
        sys.exit(f"{name}: error: {error}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ options
def check_device(device: str) -> None:
    """A one-line ValueError unless ``device`` is a torch device string (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"device (--device) must be a torch device such as cpu, cuda or cuda:1; got {device!r}"
        ) from None


def options_of(config: Any, cls: type) -> dict[str, Any]:
    """The values of ``config``'s fields that ``cls`` (a dataclass) also has, by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in names}


def tuples(config: Any) -> None:
    """Turn the list values of a frozen dataclass into tuples (the parser gives lists)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list):
            object.__setattr__(config, f.name, tuple(value))


# ------------------------------------------------------------------------------------------ models
def build_unet(architecture: str, seed: int = 0):
    """A randomly initialised ``UNet2DConditionModel`` with one of :data:`UNET_ARCHITECTURES`' configs."""
    from diffusers import UNet2DConditionModel

    if architecture not in UNET_ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(UNET_ARCHITECTURES)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_ARCHITECTURES[architecture])


def build_flux_transformer(architecture: str, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised ``FluxTransformer2DModel`` with one of :data:`TRANSFORMER_ARCHITECTURES`' configs,
    initialised on ``device`` (FLUX.1-dev's 12B parameters take minutes and 48 GB of host memory to initialise on
    a CPU) in float32, then cast to ``dtype``."""
    from diffusers import FluxTransformer2DModel

    if architecture not in TRANSFORMER_ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(TRANSFORMER_ARCHITECTURES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = FluxTransformer2DModel(**TRANSFORMER_ARCHITECTURES[architecture])
    return model.to(dtype)


def load_unet(model: str, seed: int = 0):
    """``sd15`` / ``sd15-small`` / ``sd15-tiny`` (random weights) or the UNet of a pipeline folder / ``munba-demo``."""
    if model in UNET_ARCHITECTURES:
        return build_unet(model, seed)
    from munba_diffusion.diffusion.base_model import load_base_pipeline

    return load_base_pipeline(model).unet


def player_names(players: int) -> list[str]:
    """The trainer's names of ``players`` players: ``preserve`` and one forgetting player per concept."""
    if players < 2:
        raise ValueError(f"an erasure step needs at least 2 players; got {players}")
    return PLAYERS if players == 2 else ["preserve", *(f"forget:c{i}" for i in range(1, players))]


def random_erasure_batch(unet, batch_size: int, latent_size: int, generator: torch.Generator, players: int = 2):
    """An ``ErasureBatch`` of ``players`` players (preserve and ``players - 1`` concepts; their names:
    :func:`player_names`) of random x_t, timesteps and text contexts shaped for ``unet``, plus the unconditional
    context. Timing and memory do not depend on the values."""
    from diffusers import FluxTransformer2DModel

    from munba_diffusion.diffusion.latents import LatentBatch
    from munba_diffusion.diffusion.players import ErasureBatch

    if isinstance(unet, FluxTransformer2DModel):
        return random_flux_erasure_batch(unet, batch_size, latent_size, generator, players=players)
    channels, dim = unet.config.in_channels, unet.config.cross_attention_dim

    def latents() -> LatentBatch:
        return LatentBatch(
            torch.zeros(batch_size, dtype=torch.long),
            torch.randn(batch_size, channels, latent_size, latent_size, generator=generator),
            torch.randint(0, 1000, (batch_size,), generator=generator),
        )

    # SDXL's conditioning carries one more row: the pooled embedding and the time ids (munba_diffusion.diffusion.family)
    length = TEXT_SEQUENCE_LENGTH + (unet.config.get("addition_embed_type") == "text_time")

    def context() -> torch.Tensor:
        return torch.randn(batch_size, length, dim, generator=generator)

    forget = [(latents(), context(), context()) for _ in range(players - 1)]
    batch = ErasureBatch(forget=forget, preserve=(latents(), context()))
    return batch, torch.randn(1, length, dim, generator=generator)


def random_flux_erasure_batch(
    model, batch_size: int, latent_size: int, generator: torch.Generator, players: int = 2, text_length: int = 512
):
    """:func:`random_erasure_batch` for a FLUX transformer, in the trainer's layout
    (:mod:`munba_diffusion.diffusion.family`): (B, C, H, W) latents of C = ``in_channels / 4`` channels (packed
    into 2x2-patch tokens by ``denoise``), float timesteps (the flow scheduler's sigma x 1000) and per row
    ``text_length`` random T5 states (FluxPipeline's 512 for FLUX.1-dev by default) followed by the packed row
    ``[pooled, guidance, 0...]`` (a random pooled CLIP vector; FLUX-dev's guidance 3.5)."""
    from munba_diffusion.diffusion.family import FLUX_GUIDANCE
    from munba_diffusion.diffusion.latents import LatentBatch
    from munba_diffusion.diffusion.players import ErasureBatch

    if latent_size % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: the latent size must be even; got {latent_size}")
    config = model.config
    channels, dim, pooled = config.in_channels // 4, config.joint_attention_dim, config.pooled_projection_dim

    def latents() -> LatentBatch:
        return LatentBatch(
            torch.zeros(batch_size, dtype=torch.long),
            torch.randn(batch_size, channels, latent_size, latent_size, generator=generator),
            torch.rand(batch_size, generator=generator) * 1000,
        )

    def context(rows: int = batch_size) -> torch.Tensor:
        extra = torch.zeros(rows, 1, dim)
        extra[:, 0, :pooled] = torch.randn(rows, pooled, generator=generator)
        if config.guidance_embeds:
            extra[:, 0, pooled] = FLUX_GUIDANCE
        return torch.cat([torch.randn(rows, text_length, dim, generator=generator), extra], dim=1)

    forget = [(latents(), context(), context()) for _ in range(players - 1)]
    batch = ErasureBatch(forget=forget, preserve=(latents(), context()))
    return batch, context(1)


# ------------------------------------------------------------------------------------------ step variants
STEP_VARIANTS = ("nash", "nash_per_player", "sum", "sum_plain", "single_backward")
"""How one erasure step turns the players' losses into ``.grad`` (AdamW step and clipping in all):

- ``nash`` / ``sum``: the trainer's path with its default gradient source ``fast`` (``erasure_players`` +
  ``PlayerGradientSource("fast")``: frozen forwards, one LoRA forward over all players' rows, one backward whose
  LoRA layers sum their per-row products per player), float64 Gram matrix, combiner weights;
- ``nash_per_player``: the same with the reference source ``per_player`` (one LoRA forward + ``autograd.grad`` per
  player on that player's rows);
- ``sum_plain``: the ``fast`` per-player gradients added, no Gram matrix, no weights;
- ``single_backward``: an ordinary (non-bargained) step, the cost floor: the same frozen forward, one LoRA
  forward over all players' rows, ``(sum_i L_i).backward()``.
"""


def erasure_gradients(
    variant: str,
    unet,
    batch,
    uncond,
    params: list[torch.nn.Parameter],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    autocast: bool = False,
) -> None:
    """Write the update direction of ``variant`` (see :data:`STEP_VARIANTS`) on ``batch`` into ``params``' ``.grad``."""
    from munba_diffusion.bargaining import get_combiner
    from munba_diffusion.diffusion.players import erasure_players
    from munba_diffusion.step import BargainedUpdate

    if variant not in STEP_VARIANTS:
        raise ValueError(f"unknown step variant {variant!r}; choose one of {', '.join(STEP_VARIANTS)}")

    def autocast_context():
        return torch.autocast(device.type, dtype=dtype, enabled=autocast)

    names = player_names(1 + len(batch.forget))
    players = erasure_players(unet, batch, uncond, "esd", 1.0, names, device, dtype, autocast=autocast_context)
    if variant == "single_backward":  # the frozen forwards of the fast path, then one ordinary backward
        sum(players.joint_losses().values()).backward()
        return
    key = (variant, id(unet), *map(id, params))
    if key not in _UPDATES:  # one per run, as in the trainer (its gradient source finds the LoRA layers once)
        if len(_UPDATES) >= len(STEP_VARIANTS):
            _UPDATES.clear()
        combiner = {"nash_per_player": "nash", "sum_plain": "sum"}.get(variant, variant)
        source = "per_player" if variant == "nash_per_player" else "fast"
        _UPDATES[key] = BargainedUpdate(params, get_combiner(combiner), player_gradients=source)
    update = _UPDATES[key]
    if variant == "sum_plain":
        grads, _ = update.gradient_source(players, params)
        for p, *player_grads in zip(params, *grads.values()):
            p.grad = reduce(torch.add, player_grads)
        return
    update.accumulate_players(players)
    update.write_gradients()


_UPDATES: dict[tuple, Any] = {}


def erasure_step(
    variant: str,
    unet,
    batch,
    uncond,
    params: list[torch.nn.Parameter],
    optimizer,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_grad_norm: float = 1.0,
    autocast: bool = False,
) -> None:
    """One optimizer step of ``variant``: its gradients, clipping of ``params`` to ``max_grad_norm``, AdamW."""
    from munba_diffusion.step import clip_gradients_

    erasure_gradients(variant, unet, batch, uncond, params, device, dtype, autocast)
    clip_gradients_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def quantiles(values: Sequence[float]) -> dict:
    """Median, quartiles, min and count of ``values``."""
    values = sorted(values)
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2], "min": values[0], "n": len(values)}


# ------------------------------------------------------------------------------------------ demo erasure runs
@dataclass(frozen=True, kw_only=True)
class ErasureSettings:
    """The erasure hyperparameters every method of a benchmark shares (no per-method tuning); the defaults are
    the demo erasure settings of README.md's quick start."""

    model: str = option(DEMO_MODEL, "base model: a bundled name, a diffusers pipeline folder or a Hub id")
    steps: int = option(200, "optimizer steps of each erasure", low=1)
    batch_size: int = option(4, "rows per player and step", low=1)
    learning_rate: float = option(1e-3, "AdamW learning rate", low=0, low_open=True)
    lora_target: str = option("attn", "which UNet layers the LoRA adapts", choices=TARGET_SETS)
    rank: int = option(4, "LoRA rank", low=1)
    negative_guidance: float = option(1.0, "eta of the esd, anchored_esd and substitute forget targets", low=0.0)
    sampler_steps: int = option(10, "DDIM steps of the frozen model's sampler", low=1)
    sampler_guidance_scale: float = option(
        4.0,
        "guidance of the frozen model's sampler (also the guidance of each run's before/after grid)",
        low=0,
        flag="sampler_guidance",
    )
    pool_trajectories: int = option(2, "frozen-model trajectories per prompt in the pool", low=1)
    latent_source: str = option("pool", "where x_t comes from (the benchmark sets it per run)", cli=False)
    grid_steps: int = option(10, "sampler steps of each run's before/after grid (not used by the scores)", low=1)

    def __post_init__(self) -> None:
        tuples(self)
        check_options(self)

    def erasure_record(self) -> dict[str, Any]:
        """These settings as a dict (what results record as ``settings.erasure``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ErasureSettings)}


@dataclass(frozen=True)
class EvalSettings:
    """How erased models are scored: the demo prompt set (or its first rows of each kind) and the sampler."""

    prompts: str = "demo"
    steps: int = 25
    guidance_scale: float = 4.0  # the demo model was trained with guidance 4 in mind (README.md)
    max_prompts: int | None = None


@dataclass(frozen=True, kw_only=True)
class DemoBenchmarkOptions(ErasureSettings):
    """The options of the benchmarks that erase from the demo model and score the results (sampling, tradeoff)."""

    concept: str = option("circle", "the concept to erase")
    eval_prompts: str = option(EvalSettings.prompts, "bundled prompt set name or CSV with shape/colour columns")
    eval_steps: int = option(EvalSettings.steps, "sampler steps of the scored images", low=1)
    eval_guidance: float = option(EvalSettings.guidance_scale, "guidance of the scored images", low=0)
    max_eval_prompts: int | None = option(None, "score only the first N prompts of each (shape, colour)", low=1)
    threads: int = option(1, "torch CPU threads", low=1)
    work_dir: Path | None = option(
        None, "new or empty folder that keeps the erased models and images (default: a temporary folder)"
    )
    overwrite: bool = option(False, "replace results already in --output_dir")

    @property
    def evaluation(self) -> EvalSettings:
        return EvalSettings(self.eval_prompts, self.eval_steps, self.eval_guidance, self.max_eval_prompts)

    def run_settings(self) -> dict[str, Any]:
        """What results record as ``settings`` and what resumed runs must share (:func:`check_run_settings`); on an
        SD3 / FLUX model also the revision of the transformer target sets (what ``--lora_target`` names there)."""
        erasure = self.erasure_record()
        erasure["model_content"] = model_content(self.model)
        if isinstance(base_model_family(self.model), FlowFamily):  # SD3 and FLUX
            erasure["transformer_target_sets"] = TRANSFORMER_TARGET_SETS_REVISION
        return {"erasure": erasure, "evaluation": dataclasses.asdict(self.evaluation)}


def model_content(model: str) -> str | None:
    """What names ``model``'s content: ``sha256:<hex>`` of a local or bundled folder's files
    (:func:`~munba_diffusion.models.model_folder_sha256`), else the Hub commit its id resolves to (``commit:<hex>``;
    None when it cannot be resolved), so that a resumable benchmark refuses to continue runs made on other weights
    under the same name (:func:`check_run_settings`): the bundled demos are retrained between releases."""
    digest = model_folder_sha256(model)
    if digest is not None:
        return f"sha256:{digest}"
    commit = hub_commit(model)
    return None if commit is None else f"commit:{commit}"


def run_erasure(
    settings: ErasureSettings,
    concepts: Sequence[str],
    output_dir: Path,
    *,
    seed: int,
    combiner: str,
    combiner_weights: list[float] | None = None,
    latent_source: str | None = None,
    **options: Any,
) -> dict:
    """Train one erasure with the library's trainer (no final evaluation); returns its timing. ``options`` are
    further ErasureTrainingConfig fields (e.g. ``forget_loss``, ``neighbour_player``)."""
    from munba_diffusion.diffusion.config import ErasureTrainingConfig
    from munba_diffusion.diffusion.train import train_erasure

    config = ErasureTrainingConfig(
        pretrained_model_name_or_path=settings.model,
        concepts=list(concepts),
        output_dir=output_dir,
        combiner=combiner,
        combiner_weights=combiner_weights,
        lora_target=settings.lora_target,
        rank=settings.rank,
        negative_guidance=settings.negative_guidance,
        train_batch_size=settings.batch_size,
        max_train_steps=settings.steps,
        learning_rate=settings.learning_rate,
        seed=seed,
        latent_source=latent_source or settings.latent_source,
        pool_trajectories=settings.pool_trajectories,
        sampler_steps=settings.sampler_steps,
        sampler_guidance_scale=settings.sampler_guidance_scale,
        validation_guidance_scale=settings.sampler_guidance_scale,
        checkpointing_steps=0,
        validation_seeds=1,
        validation_inference_steps=settings.grid_steps,
        evaluate=False,
        overwrite_output_dir=True,
        **options,
    )
    train_erasure(config)
    run = json.loads((output_dir / "erasure_config.json").read_text())["run"]
    pool = float(run["latent_pool_seconds"])
    train = float(run["train_seconds"])
    log = [json.loads(line) for line in (output_dir / "logs" / "train_log.jsonl").read_text().splitlines() if line]
    return {
        "setup_seconds": pool,
        "loop_seconds": train - pool,
        "step_seconds": (train - pool) / settings.steps,
        "skipped_steps": sum(bool(r.get("skipped")) for r in log),
        "final_log": log[-1],
        "saved_bytes": {
            "lora_file": (output_dir / "pytorch_lora_weights.safetensors").stat().st_size,
            "unet_folder": folder_bytes(output_dir / "unet"),
            "output_folder": folder_bytes(output_dir),
        },
    }


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def eval_prompt_set(eval_settings: EvalSettings, work_dir: Path):
    """The prompt set to score on; with ``max_prompts`` its first rows of each (shape, colour) pair, in order."""
    from munba_diffusion.evaluation.prompt_sets import load_prompt_set
    from munba_diffusion.presets import eval_prompts_path

    given = Path(eval_settings.prompts)
    path = given if given.is_file() else eval_prompts_path(eval_settings.prompts)
    if eval_settings.max_prompts is None:
        return load_prompt_set(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    per_pair: dict[tuple[str, str], int] = {}
    kept = []
    for row in rows:
        key = (row.get("shape", ""), row.get("colour", ""))
        if per_pair.get(key, 0) < eval_settings.max_prompts:
            per_pair[key] = per_pair.get(key, 0) + 1
            kept.append(row)
    work_dir.mkdir(parents=True, exist_ok=True)
    subset = work_dir / f"{path.stem}_first{eval_settings.max_prompts}.csv"
    with open(subset, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return load_prompt_set(subset)


def generate_for_eval(model: str, eval_settings: EvalSettings, out_dir: Path, label: str) -> Path:
    """Generate the evaluation prompt set with ``model``; returns the folder of images (with its manifest)."""
    from munba_diffusion.evaluation.generate import (
        GenerationSettings,
        ModelSpec,
        generate_images,
        load_pipeline,
        model_protocol,
    )

    settings = GenerationSettings(
        num_inference_steps=eval_settings.steps, guidance_scale=eval_settings.guidance_scale, batch_size=32
    )
    spec = ModelSpec(model, label=label)
    pipe = load_pipeline(spec, settings, torch.device("cpu"))
    folder = out_dir / "images" / label
    generate_images(
        pipe,
        eval_prompt_set(eval_settings, out_dir),
        folder,
        settings,
        model=model_protocol(spec, pipe),
        overwrite=True,
    )
    return folder


def concept_scores(folder: Path, concepts: Sequence[str], judge=None) -> dict:
    """Demo-world scores of a generated folder for one or several erased concepts at once, with the evaluator's own
    rules (:mod:`munba_diffusion.evaluation.demo`: an image that is no demo scene counts as neither the concept nor
    correct).

    Per concept: its concept rate and kept-attribute accuracy; over the rows that ask for none of the concepts: other
    accuracy and judge KID against true renders (with its render baseline); over all rows: the unrecognisable rate.
    Every rate K comes with its 95% Wilson interval and count (``K_ci95``, ``K_n``), as in the evaluator's reports.
    """
    from munba_diffusion.demo import load_demo_judge
    from munba_diffusion.evaluation.demo import concept_kind, demo_concept_scores, judge_kid_scores, judged_names
    from munba_diffusion.evaluation.intervals import rate_fields
    from munba_diffusion.evaluation.manifest import collect_images, images_to_tensor, load_rgb, require_field

    judge = judge or load_demo_judge()
    entries = collect_images(folder)
    shapes = require_field(entries, "shape", "the demo scores", every_row=False)
    colours = require_field(entries, "colour", "the demo scores", every_row=False)
    images = images_to_tensor([load_rgb(e.path) for e in entries])
    with torch.no_grad():
        judged_shapes, judged_colours = judged_names(judge.classify(images))
    result: dict = {"num_images": len(entries), "concepts": {}}
    asks = {"shape": shapes, "colour": colours}
    for concept in concepts:
        scores = demo_concept_scores(shapes, colours, judged_shapes, judged_colours, concept)
        keys = ("concept_rate", "kept_attribute_accuracy")
        result["concepts"][concept] = {
            "num_concept_images": scores["num_concept_images"],
            **{k + suffix: scores[k + suffix] for k in keys for suffix in ("", "_ci95", "_n")},
        }
    other = [i for i in range(len(entries)) if all(asks[concept_kind(c)][i] != c for c in concepts)]
    pick = lambda values: [values[i] for i in other]  # noqa: E731
    result["num_other_images"] = len(other)
    others = demo_concept_scores(pick(shapes), pick(colours), pick(judged_shapes), pick(judged_colours), None)
    result.update({"other_accuracy" + suffix: others["other_accuracy" + suffix] for suffix in ("", "_ci95", "_n")})
    result.update(rate_fields("unrecognisable_rate", [s is None for s in judged_shapes]))
    seeds = [int(entries[i].record["seed"]) for i in other]
    kid = judge_kid_scores(judge, images[other], pick(shapes), pick(colours), seeds)
    result["judge_kid_other"] = kid["judge_kid"]
    result["judge_kid_other_renders"] = kid["judge_kid_renders"]
    return result


def single_concept_scores(scores: dict, concept: str) -> dict:
    """:func:`concept_scores` of one concept as a flat dict."""
    return {**scores["concepts"][concept], **{k: v for k, v in scores.items() if k != "concepts"}}


def select_runs(plan: list, finished: Callable[[Any], bool], report_only: bool, runs_limit: int | None):
    """(runs to take now, runs reported as missing) of a resumable benchmark's ``plan``: with ``report_only`` the
    runs already ``finished``, else the first ``runs_limit`` (all of them when None)."""
    if report_only:
        done = [run for run in plan if finished(run)]
        return done, [run for run in plan if run not in done]
    if runs_limit is not None:
        return plan[:runs_limit], plan[runs_limit:]
    return plan, []


def check_run_settings(
    path: Path, settings: Mapping[str, Any], *, runs: Path | None = None, replace: bool = False
) -> None:
    """Record in ``path`` the settings a resumable benchmark's runs (the JSON files in ``runs``, by default the
    folder of ``path``) are made with, and refuse (one-line ``ValueError``) to continue or report runs made with
    other ones: a finished run would otherwise be reported under settings it never had. ``replace`` records the new
    settings anyway (the caller has cleared the runs); so does a folder holding no run yet."""
    runs = path.parent if runs is None else runs
    if path.is_file() and not replace:
        changed = _changed_settings(json.loads(path.read_text()), json.loads(json.dumps(settings)))
        if changed and any(run != path for run in runs.glob("*.json")):
            raise ValueError(
                f"{runs} holds runs made with other settings ({'; '.join(changed)}); "
                f"use those settings, pass a new output folder, or delete {runs} to make them again"
            )
    write_json_atomic(path, settings)


def _changed_settings(recorded: Any, now: Any, prefix: str = "") -> list[str]:
    """``"name: recorded there, now here"`` for every leaf setting that differs (nested dicts by dotted name)."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        return [
            change
            for key in sorted(set(recorded) | set(now))
            for change in _changed_settings(recorded.get(key), now.get(key), f"{prefix}{key}.")
        ]
    return [] if recorded == now else [f"{prefix.rstrip('.')}: {recorded!r} there, {now!r} now"]


@contextmanager
def work_folder(path: Path | None, prefix: str) -> Iterator[Path]:
    """Scratch space for erased models and images: ``path`` (must be new or empty; kept) or a temporary
    folder (deleted at the end)."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
            yield Path(scratch)
        return
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"--work_dir {path} is not empty; pass a new or empty folder")
    path.mkdir(parents=True, exist_ok=True)
    yield path
