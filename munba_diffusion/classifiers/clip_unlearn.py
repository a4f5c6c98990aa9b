r"""Class unlearning for a transformers ``CLIPModel`` used as a zero-shot classifier.

Zero-shot classifier: class ``c``'s text embedding averages its prompt templates,

.. math::

    t_c = \mathrm{normalize}\Big(\tfrac{1}{T} \sum_{k=1}^{T} \mathrm{normalize}(E_{text}(\mathrm{template}_k(c)))\Big),
    \qquad \mathrm{logits}(x)_c = s \cdot \cos(E_{image}(x), t_c),

with ``s = exp(logit_scale)`` the model's own temperature. Both encoders run in the model's dtype; the logits
and losses are computed in float32.

Players (as in the MUNBa paper's CLIP experiment):

- ``preserve = CE(logits(x_r), y_r)`` on a batch of retained-class images with their true labels,
- ``forget = CE(logits(x_f), y~_f)`` on a batch of forgotten-class images, ``y~`` drawn uniformly from all classes
  other than the true one, anew every step.

Methods on the same budget (steps, batches, optimiser): ``ft`` minimises ``preserve`` only, ``rl`` minimises
``preserve + forget``, ``munba`` combines the two players' gradients with a combiner (Nash bargaining by default)
through :func:`munba_diffusion.step.write_bargained_gradients`.

Trainable parameters: the attention projections (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) of the text
encoder, the image encoder or both, trained directly or through LoRA adapters (peft). They are kept in float32
whatever the model's dtype, so that an fp16/bf16 CLIP (the official code's overflow) still gets finite
gradients; a gradient that is not finite (a ``munba`` player's or the baselines' summed objective's) raises
:class:`~munba_diffusion.step.NonFiniteGradientError` or, with ``nonfinite_gradients="skip"``, skips the step
(parameters unchanged) and counts it.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from tqdm.auto import tqdm

from ..bargaining import COMBINERS, get_combiner
from ..clip_features import clip_image_embeddings, clip_text_embeddings
from ..config import check_options, option
from ..step import (
    max_grad_norm_option,
    nonfinite_gradients_option,
    write_bargained_gradients,
    write_objective_gradients,
)
from .metrics import accuracy
from .unlearn import _random_wrong_labels

CLIP_METHODS: tuple[str, ...] = ("ft", "rl", "munba")
ADAPTERS: tuple[str, ...] = ("lora", "direct")
ATTENTION_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
# parameter set -> the CLIPModel sub-models whose attention projections train
PARAM_SETS: dict[str, tuple[str, ...]] = {
    "text-attention": ("text_model",),
    "image-attention": ("vision_model",),
    "all-attention": ("text_model", "vision_model"),
}


def check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    """Raise a one-line ValueError naming the choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose from {', '.join(choices)}")


def check_templates(templates: Sequence[str]) -> None:
    """Raise a one-line ValueError unless there is at least one template and each holds ``{label}``."""
    if not templates:
        raise ValueError("no prompt templates given; pass e.g. 'a photo of a {label}.'")
    bad = [t for t in templates if "{label}" not in t]
    if bad:
        raise ValueError(f"prompt template(s) {bad} lack '{{label}}'; write e.g. 'a photo of a {{label}}.'")


@dataclass(frozen=True)
class ZeroShotTask:
    """The label set and prompt templates of a zero-shot classifier; each template holds ``{label}``."""

    class_names: tuple[str, ...]
    templates: tuple[str, ...] = ("a photo of a {label}.",)

    def __post_init__(self) -> None:
        if len(self.class_names) < 2:
            raise ValueError(f"a zero-shot task needs at least 2 classes, got {list(self.class_names)}")
        check_templates(self.templates)

    def prompts(self) -> list[str]:
        """All prompts, class-major: ``templates[k].format(label=class_names[c])`` at ``c * T + k``."""
        return [t.format(label=name) for name in self.class_names for t in self.templates]

    def class_ids(self, names: Sequence[str]) -> list[int]:
        """Indices of ``names``; a name outside the label set is a one-line ValueError naming the valid labels."""
        unknown = [name for name in names if name not in self.class_names]
        if unknown:
            raise ValueError(
                f"unknown class(es) {', '.join(map(repr, unknown))}; valid labels: {', '.join(self.class_names)}"
            )
        return [self.class_names.index(name) for name in names]


@dataclass
class LabelledImages:
    """CLIP-preprocessed images ``(N, 3, H, W)`` (the model's own image processor) and integer labels ``(N,)``."""

    pixel_values: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> LabelledImages:
        return LabelledImages(self.pixel_values[indices], self.labels[indices])


@dataclass(frozen=True)
class ClipUnlearnConfig:
    """One unlearning run: the method, which parameters train and how, and the optimiser budget.

    Every method takes ``steps`` SGD steps (momentum, weight decay, constant ``lr``) on the trainable parameters;
    each step sees one retain batch and (``rl``, ``munba``) one forget batch of ``batch_size`` images.
    """

    method: str = option(
        "munba", "ft (preserve only), rl (preserve + forget) or munba (bargained players)", choices=CLIP_METHODS
    )
    combiner: str = option("nash", "how munba combines the players' gradients", choices=COMBINERS)
    params: str = option("text-attention", "which attention projections train", choices=tuple(PARAM_SETS))
    adapter: str = option(
        "lora", "train LoRA adapters on the projections or the projections directly", choices=ADAPTERS
    )
    lora_rank: int = option(8, "LoRA rank", low=1)
    lora_alpha: float = option(8.0, "LoRA alpha (the adapter output is scaled by alpha / rank)", low=0, low_open=True)
    steps: int = option(50, "optimizer steps", low=1)
    batch_size: int = option(32, "images per retain and per forget batch", low=1)
    lr: float = option(0.01, "constant learning rate", low=0, low_open=True)
    momentum: float = option(0.9, "SGD momentum", low=0, high=1, high_open=True)
    weight_decay: float = option(5e-4, "SGD weight decay (L2 penalty)", low=0)
    max_grad_norm: float | None = max_grad_norm_option()
    nonfinite_gradients: str = nonfinite_gradients_option()

    def __post_init__(self) -> None:
        check_options(self)


# ----------------------------------------------------------------------------------------------- zero-shot
def class_text_embeddings(model: nn.Module, tokenizer, task: ZeroShotTask) -> torch.Tensor:
    """``(C, D)`` float32 unit class embeddings ``t_c`` (template average of unit prompt embeddings)."""
    device = next(model.parameters()).device
    tokens = tokenizer(task.prompts(), padding=True, truncation=True, return_tensors="pt").to(device)
    embeddings = clip_text_embeddings(model, tokens["input_ids"], tokens.get("attention_mask"))
    prompts = F.normalize(embeddings.float(), dim=-1)
    per_class = prompts.view(len(task.class_names), len(task.templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def zero_shot_logits(model: nn.Module, pixel_values: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` float32 logits ``exp(logit_scale) * cos(image, t_c)``."""
    images = clip_image_embeddings(model, pixel_values.to(device=text_embeddings.device, dtype=_model_dtype(model)))
    return model.logit_scale.float().exp() * F.normalize(images.float(), dim=-1) @ text_embeddings.T


@torch.no_grad()
def zero_shot_probabilities(
    model: nn.Module, tokenizer, task: ZeroShotTask, pixel_values: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """``(N, C)`` softmax of the zero-shot logits, on the CPU."""
    text = class_text_embeddings(model, tokenizer, task)
    return torch.cat(
        [
            zero_shot_logits(model, pixel_values[i : i + batch_size], text).softmax(dim=-1).cpu()
            for i in range(0, len(pixel_values), batch_size)
        ]
    )


def zero_shot_accuracy(model: nn.Module, tokenizer, task: ZeroShotTask, images: LabelledImages) -> float:
    """Percentage of ``images`` whose zero-shot prediction over ``task``'s classes is the label."""
    return accuracy(zero_shot_probabilities(model, tokenizer, task, images.pixel_values), images.labels)


def evaluate_clip_unlearning(
    model: nn.Module,
    tokenizer,
    task: ZeroShotTask,
    test: LabelledImages,
    forget_ids: Sequence[int],
    heldout: tuple[ZeroShotTask, LabelledImages] | None = None,
) -> dict[str, float | None]:
    """Zero-shot accuracy (%) on the test images of the forgotten classes (``forget_acc``), of the retained classes
    (``retain_acc``), and on a held-out task (``heldout_acc``, ``None`` without one); all over all of ``task``'s
    classes."""
    probabilities = zero_shot_probabilities(model, tokenizer, task, test.pixel_values)
    is_forget = torch.isin(test.labels, torch.tensor(list(forget_ids)))
    return {
        "forget_acc": accuracy(probabilities[is_forget], test.labels[is_forget]),
        "retain_acc": accuracy(probabilities[~is_forget], test.labels[~is_forget]),
        "heldout_acc": None if heldout is None else zero_shot_accuracy(model, tokenizer, *heldout),
    }


# ----------------------------------------------------------------------------------------------- parameters
def _model_dtype(model: nn.Module) -> torch.dtype:
    return model.logit_scale.dtype


def _is_half(model: nn.Module) -> bool:
    return _model_dtype(model) in (torch.float16, torch.bfloat16)


def attention_module_pattern(params: str) -> str:
    """Regex (full match) of the attention projection modules of parameter set ``params`` in a ``CLIPModel``."""
    check_choice("parameter set", params, tuple(PARAM_SETS))
    towers = "|".join(PARAM_SETS[params])
    return rf"({towers})\.encoder\.layers\.\d+\.self_attn\.({'|'.join(ATTENTION_PROJECTIONS)})"


def _run_in_float32(module: nn.Module, output_dtype: torch.dtype) -> None:
    """Make ``module`` hold float32 weights inside a half-precision model: inputs in float32, output cast back."""
    module.float()
    module.register_forward_pre_hook(
        lambda _m, args: tuple(a.float() if torch.is_floating_point(a) else a for a in args)
    )
    module.register_forward_hook(lambda _m, _args, output: output.to(output_dtype))


def prepare_trainable(model: nn.Module, config: ClipUnlearnConfig) -> list[nn.Parameter]:
    """Freeze ``model`` except the chosen attention projections (direct) or LoRA adapters on them; returns the
    trainable parameters, all float32. Modifies ``model`` in place."""
    pattern = re.compile(attention_module_pattern(config.params))
    model.requires_grad_(False)
    if config.adapter == "lora":
        lora = LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=pattern.pattern
        )
        inject_adapter_in_model(lora, model)
        trainable = [p for name, p in model.named_parameters() if "lora_" in name]
        for param in trainable:  # peft keeps the base dtype here; its LoRA layers cast their input to the adapter's
            param.data = param.data.float()
    else:
        modules = [m for name, m in model.named_modules() if pattern.fullmatch(name)]
        if _is_half(model):
            for module in modules:
                _run_in_float32(module, _model_dtype(model))
        trainable = [p for m in modules for p in m.parameters()]
    if not trainable:
        raise ValueError(f"no attention projections match parameter set {config.params!r}; is this a CLIPModel?")
    for param in trainable:
        param.requires_grad_(True)
    return trainable


# ----------------------------------------------------------------------------------------------- unlearning
def _cycle(indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled batches of ``indices`` forever (a new permutation per pass; the last short batch is kept)."""
    while True:
        yield from indices[torch.randperm(len(indices), generator=generator)].split(batch_size)


def player_losses(
    model: nn.Module, tokenizer, task: ZeroShotTask, retain: LabelledImages, forget: LabelledImages | None = None
) -> dict[str, torch.Tensor]:
    """``{"preserve": CE(retain), "forget": CE(forget)}`` (float32) from one forward pass of both batches; pass
    the forget batch with its random labels, or ``None`` for ``preserve`` alone."""
    device = next(model.parameters()).device
    text = class_text_embeddings(model, tokenizer, task)
    batches = [retain] if forget is None else [retain, forget]
    logits = zero_shot_logits(model, torch.cat([b.pixel_values for b in batches]), text)
    labels = torch.cat([b.labels for b in batches]).to(device)
    losses = {"preserve": F.cross_entropy(logits[: len(retain)], labels[: len(retain)])}
    if forget is not None:
        losses["forget"] = F.cross_entropy(logits[len(retain) :], labels[len(retain) :])
    return losses


def split_forget_retain(labels: torch.Tensor, forget_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the images whose label is (not) among ``forget_ids``."""
    is_forget = torch.isin(labels, torch.tensor(list(forget_ids)))
    if not is_forget.any() or is_forget.all():
        raise ValueError(
            f"the training set needs images of both forgotten and retained classes; "
            f"got {int(is_forget.sum())} of {len(labels)} in classes {list(forget_ids)}"
        )
    return torch.nonzero(is_forget).flatten(), torch.nonzero(~is_forget).flatten()


def unlearn_clip(
    original: nn.Module,
    tokenizer,
    task: ZeroShotTask,
    train: LabelledImages,
    forget_ids: Sequence[int],
    config: ClipUnlearnConfig,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``original`` trained with ``config.method`` to forget classes ``forget_ids`` of ``task``.

    Retain and forget batches, random labels and LoRA initialisation come from ``seed`` through separate
    generators, so every method sees the same retain batches. Returns the model (adapters left unmerged) and a
    training record: ``skipped_steps`` (non-finite gradients), the last step's losses and, for ``munba``, the
    mean cosine between the players' gradients and the mean bargaining weights.
    """
    forget_idx, retain_idx = split_forget_retain(train.labels, forget_ids)
    model = copy.deepcopy(original).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        params = prepare_trainable(model, config)
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    combiner = get_combiner(config.combiner)
    retain_batches = _cycle(retain_idx, config.batch_size, torch.Generator().manual_seed(seed))
    forget_batches = _cycle(forget_idx, config.batch_size, torch.Generator().manual_seed(seed + 1))
    label_generator = torch.Generator().manual_seed(seed + 2)
    num_classes = len(task.class_names)
    record: dict[str, Any] = {"skipped_steps": 0, "cos_phi": [], "weights": []}

    for _ in tqdm(range(config.steps), desc=config.method, leave=False, disable=not progress):
        optimizer.zero_grad(set_to_none=True)
        retain = train.subset(next(retain_batches))
        if config.method == "ft":
            losses = player_losses(model, tokenizer, task, retain)
        else:
            forget = train.subset(next(forget_batches))
            forget.labels = _random_wrong_labels(forget.labels, num_classes, label_generator)
            losses = player_losses(model, tokenizer, task, retain, forget)
        if config.method == "munba":
            diagnostics = write_bargained_gradients(
                losses, params, combiner, max_grad_norm=config.max_grad_norm, nonfinite=config.nonfinite_gradients
            )
            if diagnostics.skipped:
                record["skipped_steps"] += 1
                continue
            record["cos_phi"].append(diagnostics.cos_phi)
            record["weights"].append(diagnostics.weights)
        else:  # one backward pass of the summed losses, as these baselines are usually run
            if not write_objective_gradients(
                sum(losses.values()),
                params,
                name="+".join(losses),
                max_grad_norm=config.max_grad_norm,
                nonfinite=config.nonfinite_gradients,
            ):
                record["skipped_steps"] += 1
                continue
        optimizer.step()
        record["last_losses"] = {name: float(loss.detach()) for name, loss in losses.items()}
    return model, _summarise_record(record)


def _summarise_record(record: dict[str, Any]) -> dict[str, Any]:
    summary = {"skipped_steps": record["skipped_steps"], "last_losses": record.get("last_losses")}
    if record["cos_phi"]:
        cosines = [c for c in record["cos_phi"] if c is not None and math.isfinite(c)]
        summary["mean_cos_phi"] = sum(cosines) / len(cosines) if cosines else None
        summary["mean_weights"] = [sum(w) / len(record["weights"]) for w in zip(*record["weights"])]
    return summary
