"""The erasure training configuration: every option of ``train_erase.py`` declared once.

Each field carries its default, help text and rule (:func:`munba_diffusion.config.option`); the command-line parser
is generated from it (:func:`munba_diffusion.config.build_parser`) and the exported run record is derived from it
(:meth:`ErasureTrainingConfig.record`). Constructing the configuration checks every field and the rules between
fields, and resolves the concepts (preset files and prompt files are read; no model is loaded), so bad input fails
before anything slow happens. Argument names follow diffusers' training scripts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..bargaining import COMBINERS
from ..config import check_options, config_record, option
from ..models import bundled_model_names
from ..presets import ConceptPreset, compose_substitutes, read_prompt_file, resolve_concept
from ..step import nonfinite_gradients_option, player_gradients_option
from .adversary import ADVERSARIAL, adversarial_player_names
from .latents import LATENT_SOURCES
from .lora import LORA_MODULES, TARGET_SETS, ErasureLoraConfig
from .losses import FORGET_LOSSES
from .players import NEIGHBOURS

CHECKPOINTS_DIR = "checkpoints"  # inside output_dir
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_DTYPES = ("float32", "float16", "bfloat16")
TRACKERS = ("none", "tensorboard", "wandb", "all")
WEIGHTED_COMBINERS = ("sum",)  # the combiners that take fixed per-player weights


@dataclass
class ErasureTrainingConfig:
    """Everything an erasure run needs; ``train_erasure(ErasureTrainingConfig(...))`` runs it."""

    # what to erase
    concepts: list[str | ConceptPreset] = option(
        help="preset name (see prompts/presets), a preset .yaml, or 'text:<phrase>'; repeat to erase several "
        "concepts at once (each is its own player)",
        flag="concept",
        repeat=True,
    )
    output_dir: Path = option(help="where the erased model folder is written (checkpoints and logs go inside it)")
    # the model
    pretrained_model_name_or_path: str = option(
        DEFAULT_MODEL,
        f"Hub id, local diffusers folder, or a bundled model ({', '.join(bundled_model_names('pipeline'))})",
    )
    revision: str | None = option(None, "Hub revision of the base model")
    variant: str | None = option(None, "weight variant of the base model, e.g. fp16")
    forget_prompts_file: Path | None = option(
        None, "replace the forget prompts (one per line; a single --concept only)"
    )
    preserve_prompts_file: Path | None = option(None, "replace the preservation prompts (one per line)")
    anchor_prompt: str | None = option(None, "replace the anchor prompt of every forget prompt")
    # the method
    forget_loss: str = option(
        "esd",
        "forget target: esd (negative guidance from the empty prompt), anchored_esd (negative guidance relative to "
        "the anchor: removes only what the concept adds to it; equal to esd for an empty anchor), anchor (map to "
        "the anchor prompt's image) or substitute (anchored_esd relative to the preset's substitutes, default its "
        "anchors, on x_t from the substitutes' own trajectories: the concept is replaced by each in turn)",
        choices=FORGET_LOSSES,
    )
    negative_guidance: float = option(1.0, "eta of the esd, anchored_esd and substitute targets", low=0.0)
    combiner: str = option("nash", "how the players' gradients are combined each step", choices=COMBINERS)
    combiner_weights: list[float] | None = option(
        None,
        "fixed weights for --combiner sum, one per player in the order of the run record's players: preservation, "
        "neighbours (with --neighbour_player), each concept's forgetting player, each adversarial player (--robust)",
        low=0.0,
    )
    neighbour_player: bool = option(
        False,
        "bargain the concepts' neighbours (the preset's 'neighbours') as their own preservation player "
        "instead of folding them into the preservation prompts",
    )
    robust: bool = option(
        False,
        "robust erasure: add an adversarial forgetting player per concept, whose prompts carry prefixes searched "
        "against the current model every --adversarial_every steps (AdvUnlearn-style; see diffusion/adversary.py)",
    )
    adversarial_every: int = option(5, "robust mode: search new adversarial prefixes every N steps", low=1)
    adversarial_steps: int = option(10, "robust mode: AdamW steps of each prefix search", low=1)
    adversarial_tokens: int = option(5, "robust mode: soft tokens per adversarial prefix", low=1, high=70)
    adversarial_lr: float = option(0.01, "robust mode: learning rate of the prefix search", low=0.0, low_open=True)
    adversarial_prompts_kept: int = option(4, "robust mode: newest adversarial prefixes kept per concept", low=1)
    lora_target: str = option(
        "xattn",
        "which denoiser layers the LoRA adapts (UNet: xattn, noxattn, attn, full; SD3 / FLUX transformers also "
        "image, FLUX also single; xattn is the text stream and the prompt's embeddings there: see diffusion/lora.py)",
        choices=TARGET_SETS,
    )
    lora_on: str = option(
        "unet",
        "where the erasure LoRA goes: the denoiser (the UNet; SD3's / FLUX's transformer), the text encoder (its "
        "self-attention projections; AdvUnlearn's choice for robust erasure) or both",
        choices=LORA_MODULES,
    )
    rank: int = option(4, "LoRA rank", low=1)
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank, i.e. scale 1)", low=0.0, low_open=True)
    # latents
    latent_source: str = option(
        "pool",
        "where the noisy latents come from: a pool of the frozen model's sampling "
        "trajectories, fresh trajectories every step, or image folders",
        choices=LATENT_SOURCES,
    )
    pool_trajectories: int = option(2, "frozen-model trajectories per prompt in the pool", low=1)
    sampler_steps: int = option(25, "sampler steps of the frozen model's trajectories", low=1)
    sampler_guidance_scale: float = option(
        7.5,
        "guidance scale of the frozen model's trajectories (not used by FLUX, which has no unconditional branch)",
        low=0.0,
    )
    flux_guidance: float | None = option(
        None,
        "FLUX-dev only: the embedded guidance the targets and trajectories are made at (default 3.5, FluxPipeline's "
        "default)",
        low=0.0,
    )
    forget_image_dir: Path | None = option(None, "images of the concept instead of data-free latents")
    preserve_image_dir: Path | None = option(None, "images for the preservation player instead of data-free latents")
    # training
    overwrite_output_dir: bool = option(False, "replace the results of an earlier run in --output_dir")
    seed: int = option(0, "seed of every random choice of the run", low=0)
    resolution: int | None = option(None, "training resolution in pixels (default: the model's native size)", low=8)
    train_batch_size: int = option(1, "rows per player, micro-batch and process", low=1)
    max_train_steps: int = option(500, "optimizer steps", low=1)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", low=1)
    gradient_checkpointing: bool = option(
        False, "recompute the denoiser's activations in the backward pass to save memory"
    )
    shard_base: bool = option(
        False,
        "SD3 / FLUX on GPUs the base does not fit: shard the frozen transformer across the launch's processes "
        "(PyTorch FSDP2, one unit per block; the LoRA stays whole on each, every process takes the same step)",
    )
    use_8bit_adam: bool = option(False, "bitsandbytes' 8-bit AdamW (GPU; pip install bitsandbytes)")
    learning_rate: float = option(1e-4, "AdamW learning rate", low=0.0, low_open=True)
    lr_scheduler: str = option("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "warm-up steps of the learning-rate schedule", low=0)
    max_grad_norm: float = option(1.0, "clip the combined gradient of the LoRA to this norm (0 disables)", low=0.0)
    mixed_precision: str | None = option(
        None, "no, fp16 or bf16 (default: accelerate config's choice, else no)", choices=MIXED_PRECISIONS
    )
    save_dtype: str = option(
        "float32",
        "dtype of the exported pipeline; half-precision training (--mixed_precision) keeps the frozen "
        "weights in half precision in memory only, the folder is saved in this dtype",
        choices=SAVE_DTYPES,
    )
    enable_xformers_memory_efficient_attention: bool = option(False, "use xformers attention (GPU, optional extra)")
    report_to: str = option("none", "experiment tracker", choices=TRACKERS)
    checkpointing_steps: int = option(500, "save a resumable checkpoint every this many steps (0: never)", low=0)
    checkpoints_total_limit: int | None = option(None, "keep at most this many checkpoints", low=1)
    resume_from_checkpoint: str | None = option(None, 'a checkpoint-N folder or "latest"')
    nonfinite_gradients: str = nonfinite_gradients_option()
    player_gradients: str = player_gradients_option()
    # validation and sharing
    validation_prompts: list[str] | None = option(
        None,
        "prompts of the before/after grid (default: a few forget and preserve prompts); repeat for several",
        flag="validation_prompt",
        repeat=True,
    )
    validation_seeds: int = option(2, "seeds per validation prompt", low=1)
    validation_guidance_scale: float | None = option(
        None,
        "guidance scale of the validation images and evaluation (default 7.5; FLUX-dev: the embedded guidance it "
        "trains at, --flux_guidance; FLUX-schnell: 0)",
        low=0.0,
    )
    validation_inference_steps: int = option(25, "sampler steps of the validation images and evaluation", low=1)
    evaluate: bool = option(True, "skip the end-of-run evaluation", flag="no_evaluation")
    push_to_hub: bool = option(False, "upload the output folder to the Hub at the end")
    hub_model_id: str | None = option(None, "Hub repository to push to, e.g. your-name/sd14-no-nudity")
    hub_token: str | None = option(None, "Hub token (default: the logged-in token)", secret=True)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.mixed_precision is None:
            self.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if isinstance(self.concepts, (str, ConceptPreset)):
            self.concepts = [self.concepts]
        check_options(self)
        self._check_paths()
        self._check_combiner_weights()
        self._check_robust()
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/sd14-no-nudity)")
        if self.shard_base and self.latent_source == "fresh":
            raise ValueError(
                "--latent_source fresh runs a different number of transformer passes on each process, and with "
                "--shard_base every pass is collective: use --latent_source pool (the default) or images"
            )
        if self.latent_source == "images" and self.forget_image_dir is None:
            raise ValueError("--latent_source images needs --forget_image_dir (and optionally --preserve_image_dir)")
        if self.forget_loss == "substitute" and self.forget_image_dir is not None:
            raise ValueError(
                "--forget_loss substitute draws x_t from the substitutes' own trajectories, not from "
                "--forget_image_dir; drop one of the two (with images of the concept, use --forget_loss anchor)"
            )
        self.concepts = self._resolved_concepts()
        self.preserve_prompts()
        self.neighbour_prompts()

    def _check_paths(self) -> None:
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"output_dir (--output_dir) {self.output_dir} is a file; pass a folder")
        for name in ("forget_image_dir", "preserve_image_dir"):
            folder = getattr(self, name)
            if folder is not None:
                folder = Path(folder)
                setattr(self, name, folder)
                if not folder.is_dir():
                    raise ValueError(f"{name} (--{name}) is not a folder: {folder}; pass a folder of images")
        resume = self.resume_from_checkpoint
        if (
            resume not in (None, "latest")
            and not Path(resume).exists()
            and not (self.output_dir / CHECKPOINTS_DIR / resume).exists()
        ):
            raise ValueError(
                f"resume_from_checkpoint (--resume_from_checkpoint) {resume} does not exist; pass "
                f'"latest" or a checkpoint-N folder of {self.output_dir / CHECKPOINTS_DIR}'
            )

    def _check_combiner_weights(self) -> None:
        if self.combiner_weights is None:
            return
        if self.combiner not in WEIGHTED_COMBINERS:
            raise ValueError(
                f"combiner_weights (--combiner_weights) are used by --combiner "
                f"{' or '.join(WEIGHTED_COMBINERS)} only; drop them or pass --combiner sum"
            )
        players = len(self.player_names())
        if len(self.combiner_weights) != players:
            raise ValueError(
                f"combiner_weights (--combiner_weights) needs {players} numbers, one per player "
                f"({', '.join(self.player_names())}); got {len(self.combiner_weights)}"
            )

    def _check_robust(self) -> None:
        adversarial = [f.name for f in dataclasses.fields(self) if f.name.startswith("adversarial_")]
        if not self.robust:
            changed = [n for n in adversarial if getattr(self, n) != _DEFAULTS[n]]
            if changed:
                raise ValueError(f"--{changed[0]} sets the robust mode; add --robust or drop it")
            return
        if self.combiner_weights is not None:
            names = self.player_names()
            if not any(w > 0 for n, w in zip(names, self.combiner_weights) if n.startswith(ADVERSARIAL)):
                raise ValueError(
                    "--robust with a zero weight on every adversarial player trains no adversarial forgetting; give "
                    f"the adversarial players ({', '.join(n for n in names if n.startswith(ADVERSARIAL))}) a "
                    "weight above 0 in --combiner_weights or drop --robust"
                )

    def _resolved_concepts(self) -> list[ConceptPreset]:
        """Every concept as a preset, with the prompt-file and anchor overrides applied."""
        concepts = [c if isinstance(c, ConceptPreset) else resolve_concept(c) for c in self.concepts]
        if not concepts:
            raise ValueError("concepts (--concept) is required: name at least one concept to erase")
        if len({c.name for c in concepts}) != len(concepts):
            raise ValueError("the same concept is given twice; pass each --concept once")
        if self.forget_prompts_file is not None:
            if len(concepts) > 1:
                raise ValueError(
                    "--forget_prompts_file replaces one concept's prompts; use preset .yaml files for several"
                )
            forget = read_prompt_file(self.forget_prompts_file)
            concepts[0] = replace(
                concepts[0],
                forget_prompts=forget,
                anchor_prompts=(concepts[0].anchor_prompts[0],) * len(forget),
                substitute_prompts=(),
            )
        if self.preserve_prompts_file is not None:
            preserve = read_prompt_file(self.preserve_prompts_file)
            concepts = [replace(c, preserve_prompts=preserve) for c in concepts]
        if self.anchor_prompt is not None:
            concepts = [
                replace(c, anchor_prompts=(self.anchor_prompt,) * len(c.forget_prompts), substitute_prompts=())
                for c in concepts
            ]
        # the overrides are now part of the concepts: a record re-read as a configuration applies them once
        self.forget_prompts_file = self.preserve_prompts_file = self.anchor_prompt = None
        if self.forget_loss == "substitute":
            concepts = compose_substitutes(concepts)
            forget = {p for c in concepts for p in c.forget_prompts}
            for c in concepts:
                erased = sorted(set(c.training_pairs("substitute")[1]) & forget)
                if erased:
                    raise ValueError(
                        f"concept {c.name!r}: the substitute {erased[0]!r} is itself a forget prompt; replace it in "
                        "the preset's 'substitutes' (or 'anchor') with a prompt that keeps the concept out"
                    )
        return concepts

    def _kept(self, prompts: list[str]) -> list[str]:
        """``prompts`` without repeats and without anything a concept forgets."""
        forget = {p for c in self.concepts for p in c.forget_prompts}
        return list(dict.fromkeys(p for p in prompts if p not in forget))

    def preserve_prompts(self) -> list[str]:
        """The preservation player's prompts: the concepts' ``preserve`` prompts (and their neighbours, unless the
        neighbours are their own player), minus anything one of them forgets."""
        neighbours = [p for c in self.concepts for p in c.neighbour_prompts]
        own = [p for c in self.concepts for p in c.preserve_prompts]
        if self.neighbour_player:  # the neighbours are their own player's prompts, not this one's
            kept = [p for p in self._kept(own) if p not in set(neighbours)]
        else:
            kept = self._kept(own + neighbours)
        if not kept:
            raise ValueError(
                "no preservation prompts left; give the concept 'preserve' prompts or --preserve_prompts_file"
            )
        return kept

    def neighbour_prompts(self) -> list[str]:
        """The neighbour player's prompts (``--neighbour_player``): the concepts' ``neighbours``."""
        kept = self._kept([p for c in self.concepts for p in c.neighbour_prompts])
        if self.neighbour_player and not kept:
            raise ValueError(
                "--neighbour_player needs neighbours: add a 'neighbours' list to the concept's preset (prompts/README.md)"
            )
        return kept

    @property
    def lora(self) -> ErasureLoraConfig:
        return ErasureLoraConfig(rank=self.rank, alpha=self.lora_alpha, target=self.lora_target, modules=self.lora_on)

    def player_names(self) -> list[str]:
        """``preserve``, ``neighbours`` (with ``--neighbour_player``), one forgetting player per concept (``forget``
        alone when there is one), then with ``--robust`` one adversarial player per concept (``adversarial``)."""
        forget = ["forget"] if len(self.concepts) == 1 else [f"forget:{c.name}" for c in self.concepts]
        adversarial = adversarial_player_names(forget) if self.robust else []
        return ["preserve", *([NEIGHBOURS] if self.neighbour_player else []), *forget, *adversarial]

    def record(self) -> dict[str, Any]:
        """Every option as JSON values (the concepts in full, secrets left out): the run record's ``config``."""
        return config_record(self)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ErasureTrainingConfig)}
