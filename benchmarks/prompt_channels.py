"""Which of a flow demo prompt's two channels decides the image: its tokens or its pooled vector.

SD3 and FLUX condition the transformer on a prompt twice: its token embeddings enter the joint attention through
the text stream, and its pooled CLIP vector is added to the timestep embedding that modulates every block. For
each pair of demo captions (A, B) that differ in one attribute (colour: red and blue; shape: circle and cross),
this benchmark generates images from A's tokens with B's pooled vector (the pipeline's own ``prompt_embeds`` and
``pooled_prompt_embeds`` inputs; the unconditional branch is the empty prompt's, as the pipeline forms it) and the
demo judge says whose attribute each image shows: the tokens' (A), the pooled vector's (B) or neither. Each
caption alone (tokens and pooled vector its own) is the control. Shares carry 95% Wilson intervals.

It is why ``xattn`` on a transformer adapts the prompt's embeddings as well as the text stream
(``munba_diffusion/diffusion/lora.py``, BENCHMARKS.md section 10): a LoRA that cannot reach the channel that
decides the attribute has to fight it.

    python -m benchmarks.prompt_channels --output_dir benchmarks/results/prompt_channels
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from munba_diffusion.config import option, parse_config
from munba_diffusion.demo import COLOURS, SHAPES, canonical_caption, load_demo_judge
from munba_diffusion.diffusion.base_model import base_model_family, load_base_pipeline
from munba_diffusion.diffusion.family import STABLE_DIFFUSION_3
from munba_diffusion.evaluation.intervals import format_rate, wilson_interval

from ._common import RESULTS_ROOT, check_results, markdown_table, run_script, save_figure, write_results

SEED = 7000  # image k of every pair and control uses seed SEED + k: the same noise for every prompt combination
SWAPS = {"colour": ("red", "blue"), "shape": ("circle", "cross")}
CHANNELS = ("tokens", "pooled", "neither")  # whose attribute an image of a swapped pair shows
SHOWN = 4  # images of each swapped pair in pairs.png


@dataclass(frozen=True, kw_only=True)
class PromptChannelsConfig:
    """Options of ``python -m benchmarks.prompt_channels``."""

    model: str = option("munba-demo-flow", "an SD3-style pipeline of the demo world (bundled name or folder)")
    images: int = option(16, "images per prompt combination (seeds 7000 + k)", low=1)
    steps: int = option(28, "sampler steps", low=1)
    guidance: float = option(4.0, "classifier-free guidance", low=0)
    threads: int = option(1, "torch CPU threads", low=1)
    output_dir: Path = option(RESULTS_ROOT / "prompt_channels", "folder for results.json and results.md")
    overwrite: bool = option(False, "replace results already in --output_dir")


def swapped_pairs() -> list[tuple[str, str, str]]:
    """(attribute, tokens' caption, pooled vector's caption): both directions of every swap, for each value of the
    other attribute."""
    pairs = []
    for attribute, (first, second) in SWAPS.items():
        for other in SHAPES if attribute == "colour" else COLOURS:
            for a, b in ((first, second), (second, first)):
                if attribute == "colour":
                    pairs.append((attribute, canonical_caption(other, a), canonical_caption(other, b)))
                else:
                    pairs.append((attribute, canonical_caption(a, other), canonical_caption(b, other)))
    return pairs


def _attribute_of(caption: str, attribute: str) -> str:
    values = COLOURS if attribute == "colour" else SHAPES
    return next(v for v in values if v in caption.split())


def _encode(pipe, caption: str) -> tuple[torch.Tensor, ...]:
    """The pipeline's own encoding: (embeds, negative embeds, pooled, negative pooled)."""
    return pipe.encode_prompt(caption, None, None, do_classifier_free_guidance=True)


@torch.no_grad()
def images_of(pipe, tokens: str, pooled: str, config: PromptChannelsConfig) -> torch.Tensor:
    """``config.images`` images (B, 3, H, W) in [0, 1] drawn from ``tokens``' embeddings and ``pooled``'s vector."""
    embeds, negative, _, negative_pooled = _encode(pipe, tokens)
    pooled_embeds = _encode(pipe, pooled)[2]
    n = config.images
    return pipe(
        prompt_embeds=embeds.repeat(n, 1, 1),
        negative_prompt_embeds=negative.repeat(n, 1, 1),
        pooled_prompt_embeds=pooled_embeds.repeat(n, 1),
        negative_pooled_prompt_embeds=negative_pooled.repeat(n, 1),
        num_inference_steps=config.steps,
        guidance_scale=config.guidance,
        generator=[torch.Generator().manual_seed(SEED + k) for k in range(n)],
        output_type="pt",
    ).images


def judged(judge, images: torch.Tensor) -> list[tuple[str, str]]:
    """(shape, colour) the judge sees in each image."""
    verdict = judge.classify(images)
    return [(SHAPES[s], COLOURS[c]) for s, c in zip(verdict.shape.tolist(), verdict.colour.tolist())]


def _demo_attributes(caption: str) -> tuple[str, str]:
    return _attribute_of(caption, "shape"), _attribute_of(caption, "colour")


def _whose(seen: str, attribute: str, tokens: str, pooled: str) -> str:
    """The channel (:data:`CHANNELS`) whose caption asks for the value ``seen`` of ``attribute``."""
    if seen == _attribute_of(tokens, attribute):
        return "tokens"
    return "pooled" if seen == _attribute_of(pooled, attribute) else "neither"


def run(config: PromptChannelsConfig) -> tuple[dict, dict[tuple[str, str], torch.Tensor]]:
    """The results, and the first :data:`SHOWN` images of each swapped pair by (tokens' caption, pooled's caption)."""
    torch.set_num_threads(config.threads)
    check_results(config.output_dir, config.overwrite)
    family = base_model_family(config.model)
    if family is not STABLE_DIFFUSION_3:
        raise ValueError(f"{config.model} is {family.title}; this benchmark takes an SD3 model of the demo world")
    pipe = load_base_pipeline(config.model)
    pipe.set_progress_bar_config(disable=True)
    judge = load_demo_judge()
    pairs = swapped_pairs()
    captions = sorted({c for _, a, b in pairs for c in (a, b)})
    progress = tqdm(total=len(captions) + len(pairs), desc="prompt combinations")
    controls = {}
    for caption in captions:
        seen = judged(judge, images_of(pipe, caption, caption, config))
        controls[caption] = wilson_interval(sum(v == _demo_attributes(caption) for v in seen), len(seen))
        progress.update()
    rows, tally, shown = [], {a: Counter() for a in SWAPS}, {}
    for attribute, tokens, pooled in pairs:
        index = 0 if attribute == "shape" else 1
        images = images_of(pipe, tokens, pooled, config)
        shown[tokens, pooled] = images[:SHOWN]
        counts = Counter(_whose(v[index], attribute, tokens, pooled) for v in judged(judge, images))
        tally[attribute].update(counts)
        rows.append(
            {"attribute": attribute, "tokens_of": tokens, "pooled_of": pooled, **{c: counts[c] for c in CHANNELS}}
        )
        progress.update()
    progress.close()
    summary = {
        attribute: {channel: wilson_interval(counts[channel], sum(counts.values())) for channel in CHANNELS}
        for attribute, counts in tally.items()
    }
    settings = {**asdict(config), "output_dir": str(config.output_dir), "seed": SEED}
    return {"settings": settings, "controls": controls, "pairs": rows, "summary": summary}, shown


def plot(shown: dict[tuple[str, str], torch.Tensor], path: Path) -> None:
    """One row per swapped pair (its first images), labelled with whose tokens and whose pooled vector drew it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(images) for images in shown.values())
    figure, axes = plt.subplots(len(shown), columns, figsize=(1.1 * columns + 2.6, 1.1 * len(shown)), squeeze=False)
    for row, ((tokens, pooled), images) in enumerate(shown.items()):
        for column, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if column < len(images):
                ax.imshow(images[column].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[row][0].set_ylabel(f"tokens: {tokens}\npooled: {pooled}", rotation=0, ha="right", va="center", fontsize=7)
    figure.suptitle("tokens of one caption, pooled vector of another: whose attribute is drawn?", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def markdown(results: dict) -> str:
    s = results["settings"]
    head = (
        f"# Which prompt channel decides the image ({s['model']})\n\n![each swapped pair's first images](pairs.png)\n\n"
        f"{s['images']} images per combination (seeds {s['seed']} + k), {s['steps']} steps, guidance {s['guidance']}; "
        "the demo judge's verdict on the swapped attribute. Tokens: the image shows the attribute of the caption "
        "whose token embeddings it was given; pooled: that of the caption whose pooled vector it was given.\n\n"
    )
    summary = markdown_table(
        ["attribute", "follows the tokens % [95% CI]", "follows the pooled vector % [95% CI]", "neither %"],
        [
            [attribute] + [_rate(entry[c]) for c in CHANNELS[:2]] + [f"{100 * entry['neither']['rate']:.1f}"]
            for attribute, entry in results["summary"].items()
        ],
    )
    pairs = markdown_table(
        ["attribute", "tokens of", "pooled vector of", "tokens", "pooled", "neither"],
        [
            [r["attribute"], r["tokens_of"], r["pooled_of"], r["tokens"], r["pooled"], r["neither"]]
            for r in results["pairs"]
        ],
    )
    controls = markdown_table(
        ["caption alone", "judged right for shape and colour % [95% CI]"],
        [[c, _rate(v)] for c, v in results["controls"].items()],
    )
    return head + summary + "\n## Each pair\n\n" + pairs + "\n## Controls\n\n" + controls


def _rate(entry: dict) -> str:
    """A Wilson-interval entry as ``99.2 [95.7, 99.9]`` (percent; the table headers carry the unit)."""
    return format_rate(entry["rate"], (entry["low"], entry["high"])).replace("%", "")


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(PromptChannelsConfig, argv, description=__doc__, prog="python -m benchmarks.prompt_channels")
    results, shown = run(config)
    write_results(
        config.output_dir,
        results,
        markdown,
        overwrite=config.overwrite,
        plot=lambda _, path: plot(shown, path),
        plot_name="pairs.png",
        echo=True,
    )
    return results


if __name__ == "__main__":
    run_script(main, "prompt_channels")
