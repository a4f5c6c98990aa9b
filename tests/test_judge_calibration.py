"""Re-measures the judge's "unrecognisable" threshold, ``munba_diffusion.demo.judge.SCENE_FIT_THRESHOLD``.

The threshold must keep true renders recognised and reject garbage. As a test this runs a smaller sample than the one
the constant's comment quotes and asserts the same separation; as a script it runs the full measurement and prints
the table the comment was written from:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m tests.test_judge_calibration
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from munba_diffusion.demo import COLOURS, SHAPES, load_demo_judge, render_scene
from munba_diffusion.demo.judge import SCENE_FIT_THRESHOLD, scene_fit
from munba_diffusion.demo.world import IMAGE_SIZE, scenes_to_tensor
from tests.demo_models import ASKS, damage_unet, demo_pipeline, draw

QUANTILES = (0.0, 0.01, 0.5, 0.99, 1.0)


def renders(n: int, seed: int = 99) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    scenes = [render_scene(rng, SHAPES[rng.integers(4)], COLOURS[rng.integers(4)]) for _ in range(n)]
    return torch.from_numpy(scenes_to_tensor(scenes))


def garbage(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """``n`` images of each kind of non-scene: noise of several sorts, blank canvases, two-colour pixel noise."""
    g = torch.Generator().manual_seed(seed)
    size = (n, 3, IMAGE_SIZE, IMAGE_SIZE)
    constant = torch.rand(n, 3, 1, 1, generator=g).expand(size).contiguous()
    sets = {
        "uniform noise": torch.rand(size, generator=g),
        "gaussian noise": (0.5 + 0.25 * torch.randn(size, generator=g)).clamp(0, 1),
        "constant colour": constant,
        "constant + faint noise": (constant + 0.02 * torch.randn(size, generator=g)).clamp(0, 1),
    }
    for width in (3, 5, 9):  # noise blurred over width px, contrast restored to a render's
        pad = IMAGE_SIZE + width - 1
        blurred = F.avg_pool2d(torch.rand(n, 3, pad, pad, generator=g), width, stride=1)
        blurred = (blurred - blurred.mean((1, 2, 3), keepdim=True)) / blurred.std((1, 2, 3), keepdim=True)
        sets[f"noise blurred {width}px"] = (0.5 + 0.2 * blurred).clamp(0, 1)
    colours = torch.rand(n, 2, 3, 1, 1, generator=g)
    mask = (torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) < 0.5).float()
    sets["two-colour pixel noise"] = colours[:, 0] * mask + colours[:, 1] * (1 - mask)
    return sets


def pipeline_images(seeds_per_caption: int, steps: int) -> dict[str, torch.Tensor]:
    """The demo model's images for every caption: intact, and with a destroyed UNet (zeroed; weights + 1.0 std)."""
    asks = ASKS * seeds_per_caption
    out = {"demo model (intact)": draw(demo_pipeline(), asks, steps)}
    pipe = demo_pipeline()
    damage_unet(pipe, 1.0)
    out["demo model, UNet + 1.0 std noise"] = draw(pipe, asks, steps)
    damage_unet(pipe, None)
    out["demo model, zeroed UNet"] = draw(pipe, asks, steps)
    return out


def measure(n_renders: int, n_garbage: int, seeds_per_caption: int, steps: int) -> dict:
    """Scene-fit quantiles per set, the garbage pooled, and the midpoint threshold they suggest."""
    generated = pipeline_images(seeds_per_caption, steps)
    sets = {"renders": renders(n_renders), **garbage(n_garbage)}
    sets.update({k: v for k, v in generated.items() if "intact" not in k})
    fits = {name: scene_fit(images) for name, images in sets.items()}
    pooled = torch.cat([f for name, f in fits.items() if name != "renders"])
    render_q01 = float(fits["renders"].quantile(0.01))
    garbage_q99 = float(pooled.quantile(0.99))
    intact = scene_fit(generated["demo model (intact)"])
    return {
        "quantiles": {
            name: [float(f.quantile(q)) for q in QUANTILES]
            for name, f in {**fits, "garbage (pooled)": pooled, "demo model (intact)": intact}.items()
        },
        "render_q01": render_q01,
        "garbage_q99": garbage_q99,
        "midpoint": (render_q01 + garbage_q99) / 2,
        "renders_recognised": float((fits["renders"] >= SCENE_FIT_THRESHOLD).float().mean()),
        "garbage_rejected": float((pooled < SCENE_FIT_THRESHOLD).float().mean()),
        "intact_recognised": float((intact >= SCENE_FIT_THRESHOLD).float().mean()),
        "sizes": {name: len(f) for name, f in fits.items()} | {"demo model (intact)": len(intact)},
    }


def test_threshold_separates_renders_from_garbage():
    m = measure(n_renders=1000, n_garbage=200, seeds_per_caption=1, steps=4)
    assert m["renders_recognised"] >= 0.99 and m["garbage_rejected"] >= 0.99
    assert m["intact_recognised"] >= 0.95  # the original model's own images stay recognised
    # The constant sits inside the measured gap, near the midpoint rule that set it.
    assert m["garbage_q99"] < SCENE_FIT_THRESHOLD < m["render_q01"]
    assert abs(m["midpoint"] - SCENE_FIT_THRESHOLD) <= 0.05


def test_the_judge_calls_garbage_unrecognisable_and_renders_recognised():
    judge = load_demo_judge()
    real = judge.classify(renders(64, seed=5))
    noise = judge.classify(garbage(8)["uniform noise"])
    assert bool(real.recognised.all()) and not bool(noise.recognised.any())
    assert (real.scene_fit >= SCENE_FIT_THRESHOLD).equal(real.recognised)
    # Its softmax alone could not have said so: the judge is confident on plenty of noise.
    assert float(noise.shape_probs.max(-1).values.max()) > 0.9


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = measure(n_renders=5000, n_garbage=2000, seeds_per_caption=3, steps=8)
    print(f"{'set':36s} {'n':>5s}  " + "  ".join(f"q{q:<5g}" for q in QUANTILES))
    for name, values in result["quantiles"].items():
        n = result["sizes"].get(
            name, sum(v for k, v in result["sizes"].items() if k not in ("renders", "demo model (intact)"))
        )
        print(f"{name:36s} {n:5d}  " + "  ".join(f"{v:.3f}" for v in values))
    print(
        f"renders q01 {result['render_q01']:.3f}, garbage q99 {result['garbage_q99']:.3f}, midpoint "
        f"{result['midpoint']:.3f}; at SCENE_FIT_THRESHOLD = {SCENE_FIT_THRESHOLD}: renders recognised "
        f"{result['renders_recognised']:.4f}, garbage rejected {result['garbage_rejected']:.4f}, intact demo model "
        f"recognised {result['intact_recognised']:.4f}"
    )
