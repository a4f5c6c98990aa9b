"""Peak memory of one erasure step and storage per erased concept: our LoRA recipe vs the ESD way.

- ``ours``: the trainer's step: one UNet with a LoRA adapter; the frozen teacher is the same UNet with adapters
  disabled; per-player gradients from one LoRA forward and one backward over all players' rows (the default
  gradient source ``fast``), Nash weights, AdamW over the LoRA weights only.
- ``ours_per_player``: the same with the reference gradient source ``per_player`` (one LoRA forward + gradient per
  player, one player's graph alive at a time).
- ``ordinary``: an ordinary (un-bargained) LoRA step on the same rows: the same frozen forwards, one LoRA forward
  over all players' rows, one ``backward`` of the summed losses (the reference of the fast path's memory target).
- ``esd``: ESD's recipe (Gandikota et al. 2023): a second full UNet copy as the frozen teacher, the trained layers
  of the student fully fine-tuned (their gradients and AdamW states), one ``backward`` of the forget loss only
  (ESD has no preservation term, so its step does less work than ours).
- ``esd_two_players``: the ESD way with our preservation player added (one backward of ``L_r + L_f``): the same
  work per step as ours, so the difference is only the teacher copy and full fine-tuning.

Each variant runs in a fresh subprocess: peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) after two steps (so
AdamW's states exist) minus the peak after the imports and a warm-up step of both variants on a 1.6M-parameter
UNet (which moves lazy imports and library initialisation into the baseline). Next to that process measure, two
counts that do not depend on the allocator or the machine's load: the bytes of the tensors the variant holds
between steps (every UNet's weights and buffers, the trained parameters' AdamW states) and the peak bytes autograd
keeps for the backward pass during a step (``torch.autograd.graph.saved_tensors_hooks``; weights excluded). The
same comparison is also given from parameter counts alone (weights + gradients + AdamW states, no activations) for
every LoRA target set. Storage: the LoRA file is written and measured; the full UNet safetensors file of the ESD
way is written too (``--no_write_unet``: computed from parameter counts x bytes instead).

With ``--players 2 3 5 9`` the trainer's variants (``ours``, ``ours_per_player``, ``ordinary``) are measured for
each number of players K (preserve + K-1 concepts, one x_t each); the ESD way is measured for K = 2 only.

    python -m benchmarks.memory --architecture sd15 --output_dir benchmarks/results/memory
    python -m benchmarks.memory --architecture sd15 --players 2 3 5 9 --variants ours ours_per_player ordinary \
        --analytic_targets xattn --output_dir benchmarks/results/memory_players
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from munba_diffusion.config import check_options, config_record, option, parse_config
from munba_diffusion.diffusion.lora import TARGET_SETS
from munba_diffusion.io import machine_record

from ._common import (
    RESULTS_ROOT,
    UNET_ARCHITECTURES,
    build_unet,
    check_results,
    erasure_step,
    markdown_table,
    random_erasure_batch,
    run_script,
    save_figure,
    tuples,
    write_results,
)

VARIANTS = ("ours", "ours_per_player", "ordinary", "esd", "esd_two_players")
TRAINER_VARIANTS = {"ours": "nash", "ours_per_player": "nash_per_player", "ordinary": "single_backward"}
ESD_VARIANTS = ("esd", "esd_two_players")
CHILD_MARKER = "MEMORY_RESULT "


@dataclass(frozen=True)
class MemoryConfig:
    """Options of ``python -m benchmarks.memory``."""

    architecture: str = option("sd15", "the UNet architecture (random weights)", choices=tuple(UNET_ARCHITECTURES))
    lora_targets: tuple[str, ...] = option(
        ("xattn",),
        "target sets measured in subprocesses (noxattn's ESD way needs ~17 GiB for sd15)",
        choices=TARGET_SETS,
    )
    analytic_targets: tuple[str, ...] = option(
        ("xattn", "noxattn", "attn", "full"), "target sets compared from parameter counts", choices=TARGET_SETS
    )
    rank: int = option(4, "LoRA rank", low=1)
    latent_size: int = option(16, "latent height/width (one x_t per player)", low=1)
    steps: int = option(2, "optimizer steps before the peak is read (AdamW's states exist after the first)", low=1)
    variants: tuple[str, ...] = option(("ours", *ESD_VARIANTS), "the variants measured", choices=VARIANTS)
    players: tuple[int, ...] = option(
        (2,), "numbers of players K (preserve + K-1 concepts); the ESD way is measured for K = 2 only", low=2
    )
    parallel: bool = option(False, "run the variants' processes at the same time")
    threads: int = option(1, "torch CPU threads of each process", low=1)
    write_unet: bool = option(
        True, "compute the full UNet file size from parameter counts instead of writing it", flag="no_write_unet"
    )
    output_dir: Path = option(RESULTS_ROOT / "memory", "folder for results.json, results.md and memory.png")
    overwrite: bool = option(False, "replace results already in --output_dir")

    def __post_init__(self) -> None:
        tuples(self)
        check_options(self)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def warm_up(target: str, rank: int) -> None:
    """Run both variants' steps once on the 1.6M-parameter ``sd15-tiny`` UNet, so that lazy imports and library
    initialisation (thread pools, oneDNN caches, code pages) land in the baseline, not in a variant's peak."""
    import copy

    from munba_diffusion.diffusion.lora import ErasureLoraConfig, add_erasure_lora

    unet = build_unet("sd15-tiny")
    teacher = copy.deepcopy(unet).requires_grad_(False)
    batch, uncond = random_erasure_batch(unet, 1, 8, torch.Generator().manual_seed(0))
    params = trained_layer_parameters(unet.requires_grad_(False), target)
    for p in params:
        p.requires_grad_(True)
    esd_step(unet, teacher, batch, uncond, params, torch.optim.AdamW(params), preserve=True)
    params = add_erasure_lora(unet, ErasureLoraConfig(rank=rank, target=target))
    for step_variant in TRAINER_VARIANTS.values():
        erasure_step(step_variant, unet, batch, uncond, params, torch.optim.AdamW(params), torch.device("cpu"))


def esd_step(
    student, teacher, batch, uncond, params, optimizer, max_grad_norm: float = 1.0, preserve: bool = False
) -> None:
    """ESD's step: the teacher copy gives eps(x_t, "") and eps(x_t, c_f); the student regresses onto the negative
    guidance target; one backward; AdamW over the trained layers. ``preserve`` adds our preservation loss (the
    teacher's prediction on the preserve batch) to the one backward."""
    from munba_diffusion.diffusion.losses import esd_target, forget_loss, preservation_loss
    from munba_diffusion.step import clip_gradients_

    (lat, ctx, _), (plat, pctx) = batch.forget[0], batch.preserve
    xs, ts, cs = [lat.latents, lat.latents], [lat.timesteps, lat.timesteps], [uncond.expand_as(ctx), ctx]
    if preserve:
        xs, ts, cs = xs + [plat.latents], ts + [plat.timesteps], cs + [pctx]
    with torch.no_grad():
        frozen = teacher(torch.cat(xs), torch.cat(ts), encoder_hidden_states=torch.cat(cs)).sample
    b = lat.latents.shape[0]
    if preserve:
        student_eps = student(
            torch.cat([lat.latents, plat.latents]),
            torch.cat([lat.timesteps, plat.timesteps]),
            encoder_hidden_states=torch.cat([ctx, pctx]),
        ).sample
    else:
        student_eps = student(lat.latents, lat.timesteps, encoder_hidden_states=ctx).sample
    loss = forget_loss(student_eps[:b], esd_target(frozen[:b], frozen[b : 2 * b], 1.0))
    if preserve:
        loss = loss + preservation_loss(student_eps[b:], frozen[2 * b :])
    loss.backward()
    clip_gradients_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trained_layer_parameters(unet, target: str) -> list[torch.nn.Parameter]:
    """Weights and biases of the layers a target set names (what ESD fine-tunes fully)."""
    from munba_diffusion.diffusion.lora import target_module_names

    modules = dict(unet.named_modules())
    return [p for name in target_module_names(unet, target) for p in modules[name].parameters(recurse=False)]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def held_tensor_bytes(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages a variant holds between steps: the modules' weights, buffers and
    gradients and the optimizer's states (shared storages counted once)."""
    storages: dict[int, int] = {}

    def add(tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            add(tensor)
            add(tensor.grad)
    for state in optimizer.state.values():
        for value in state.values():
            add(value)
    return sum(storages.values())


@contextmanager
def saved_activation_peak(exclude: list[torch.nn.Module]) -> Iterator[dict[str, int]]:
    """``{"peak_bytes": n}``: the most bytes autograd kept for backward at any time inside the block.

    Every tensor saved for backward is counted once per storage while the graph that saved it lives (it is
    released when its node is freed); the weights and buffers of ``exclude`` are not activations and are not
    counted. Counts, not allocator readings: the same on any machine and under any load.
    """
    weights = {t.untyped_storage().data_ptr() for m in exclude for t in [*m.parameters(), *m.buffers()]}
    live: dict[int, list[int]] = {}  # storage -> [bytes, references]
    result = {"peak_bytes": 0}
    current = 0

    class Saved:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

    def release(key: int) -> None:
        nonlocal current
        entry = live[key]
        entry[1] -= 1
        if entry[1] == 0:
            current -= entry[0]
            del live[key]

    def pack(tensor: torch.Tensor):
        nonlocal current
        key = tensor.untyped_storage().data_ptr()
        if key in weights:
            return tensor
        holder = Saved(tensor)
        if key not in live:
            live[key] = [tensor.untyped_storage().nbytes(), 0]
            current += live[key][0]
            result["peak_bytes"] = max(result["peak_bytes"], current)
        live[key][1] += 1
        weakref.finalize(holder, release, key)
        return holder

    def unpack(packed):
        return packed.tensor if isinstance(packed, Saved) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield result


def save_and_measure(state: dict[str, torch.Tensor], directory: Path, name: str) -> int:
    from safetensors.torch import save_file

    path = directory / name
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def child(
    variant: str,
    architecture: str,
    target: str,
    rank: int,
    latent_size: int,
    steps: int,
    write_unet: bool,
    players: int = 2,
) -> dict:
    """Build the variant, run ``steps`` steps, report peak RSS above the post-import baseline, the bytes of the
    tensors it holds and the peak bytes saved for backward."""
    from munba_diffusion.diffusion.lora import ErasureLoraConfig, add_erasure_lora, lora_state_dict

    warm_up(target, rank)
    baseline = peak_rss_bytes()
    unet = build_unet(architecture)
    batch, uncond = random_erasure_batch(unet, 1, latent_size, torch.Generator().manual_seed(0), players=players)
    result: dict = {
        "variant": variant,
        "players": players,
        "baseline_peak_rss_bytes": baseline,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        if variant in TRAINER_VARIANTS:
            params = add_erasure_lora(unet, ErasureLoraConfig(rank=rank, target=target))
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            modules = [unet]
            with saved_activation_peak(modules) as saved:
                for _ in range(steps):
                    erasure_step(TRAINER_VARIANTS[variant], unet, batch, uncond, params, optimizer, torch.device("cpu"))
            result["peak_rss_bytes"] = peak_rss_bytes()
            result["saved_bytes"] = save_and_measure(lora_state_dict(unet), Path(scratch), "lora.safetensors")
            result["saved_what"] = "LoRA weights (safetensors, float32)"
        else:
            import copy

            unet.requires_grad_(False)
            teacher = copy.deepcopy(unet)
            params = trained_layer_parameters(unet, target)
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, lr=1e-5)
            modules = [unet, teacher]
            with saved_activation_peak(modules) as saved:
                for _ in range(steps):
                    esd_step(unet, teacher, batch, uncond, params, optimizer, preserve=variant == "esd_two_players")
            result["peak_rss_bytes"] = peak_rss_bytes()
            state = unet.state_dict()
            if write_unet and variant == "esd":
                result["saved_bytes"] = save_and_measure(state, Path(scratch), "unet.safetensors")
                result["saved_what"] = "full UNet (safetensors, float32), written and measured"
            else:
                result["saved_bytes"] = tensor_bytes(state.values())
                result["saved_what"] = "full UNet (float32), parameter count x 4 bytes (not written)"
        result["held_tensor_bytes"] = held_tensor_bytes(modules, optimizer)
        result["saved_activation_peak_bytes"] = saved["peak_bytes"]
    result["trainable_parameters"] = sum(p.numel() for p in params)
    result["seconds"] = time.perf_counter() - start
    result["peak_minus_baseline_bytes"] = result["peak_rss_bytes"] - baseline
    return result


def analytic_bytes(architecture: str, targets: list[str], rank: int) -> dict:
    """fp32 weights + gradients + AdamW states from parameter counts (no activations), per target set.

    ours = UNet + LoRA x (1 weight + 2 per-player gradients + 1 combined gradient + 2 AdamW states);
    esd  = 2 UNets + trained layers x (1 gradient + 2 AdamW states).
    """
    from diffusers import UNet2DConditionModel

    from munba_diffusion.diffusion.lora import ErasureLoraConfig, add_erasure_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_ARCHITECTURES[architecture])
    total = sum(p.numel() for p in unet.parameters())
    out = {}
    for target in targets:
        trained = sum(p.numel() for p in trained_layer_parameters(unet, target))
        with torch.device("meta"):
            lora_unet = UNet2DConditionModel(**UNET_ARCHITECTURES[architecture])
        lora = sum(p.numel() for p in add_erasure_lora(lora_unet, ErasureLoraConfig(rank=rank, target=target)))
        ours, esd = 4 * (total + 6 * lora), 4 * (2 * total + 3 * trained)
        out[target] = {
            "unet_parameters": total,
            "trained_layer_parameters": trained,
            "lora_parameters": lora,
            "ours_bytes": ours,
            "esd_bytes": esd,
            "ratio": ours / esd,
            "lora_file_bytes": 4 * lora,
            "unet_file_bytes_fp32": 4 * total,
            "unet_file_bytes_fp16": 2 * total,
        }
    return out


def child_command(config: MemoryConfig, variant: str, target: str, players: int = 2) -> list[str]:
    """The command that measures one variant in a fresh process (:func:`child_main` with a JSON spec)."""
    spec = {
        "variant": variant,
        "players": players,
        "architecture": config.architecture,
        "target": target,
        "rank": config.rank,
        "latent_size": config.latent_size,
        "steps": config.steps,
        "write_unet": config.write_unet,
        "threads": config.threads,
    }
    code = f"from {__package__}.memory import child_main; child_main()"
    return [sys.executable, "-c", code, json.dumps(spec)]


def child_main() -> None:
    """The child process: measure the variant of the JSON spec in ``sys.argv[1]`` and print its result line."""
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.pop("threads"))
    print(CHILD_MARKER + json.dumps(child(**spec)), flush=True)


def run_children(config: MemoryConfig, target: str, players: int = 2) -> dict[str, dict]:
    """Each variant in its own process: one after the other, or all at once with ``--parallel`` (peak RSS is
    per process, so running them together changes only the wall time)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    if "." not in __package__:  # run from a checkout as ``benchmarks.memory``: the child needs the checkout too
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))

    def start(variant: str) -> subprocess.Popen:
        return subprocess.Popen(
            child_command(config, variant, target, players),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(variant: str, proc: subprocess.Popen) -> dict:
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith(CHILD_MARKER)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"memory child {variant}/{target} failed (exit {proc.returncode}): {stderr.strip()[-2000:]}"
            )
        return json.loads(lines[-1][len(CHILD_MARKER) :])

    variants = [v for v in config.variants if players == 2 or v not in ESD_VARIANTS]  # ESD's step has 2 players
    if config.parallel:
        procs = {variant: start(variant) for variant in variants}
        return {variant: finish(variant, proc) for variant, proc in procs.items()}
    return {variant: finish(variant, start(variant)) for variant in variants}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


VARIANT_LABELS = {
    "ours": "ours (trainer)",
    "ours_per_player": "ours, per-player passes",
    "ordinary": "ordinary LoRA step",
    "esd": "ESD way (forget loss only)",
    "esd_two_players": "ESD way + preservation player",
}


PLOT_LABELS = {
    "ours": "ours\n(trainer)",
    "ours_per_player": "ours\n(per-player)",
    "ordinary": "ordinary\nLoRA step",
    "esd": "ESD way\n(forget only)",
    "esd_two_players": "ESD way\n+ preserve",
}


def markdown(results: dict) -> str:
    rows = []
    for target, m in results["measured"].items():
        for variant, r in m["runs"].items():
            rows.append(
                [
                    target,
                    VARIANT_LABELS[variant],
                    f"{r['trainable_parameters'] / 1e6:.2f}M",
                    gib(r["peak_minus_baseline_bytes"]),
                    gib(r["peak_rss_bytes"]),
                    gib(r["held_tensor_bytes"]),
                    gib(r["saved_activation_peak_bytes"]),
                ]
            )
    measured = markdown_table(
        [
            "target",
            "variant",
            "trained params",
            "peak - baseline",
            "peak RSS",
            "tensors held (weights, Adam)",
            "peak saved for backward",
        ],
        rows,
    )
    ratios = [
        f"- {target} {name.replace('_over_', ' / ')}: "
        + (f"**{value:.3f}x**" if value is not None else "n/a (no RSS growth)")
        for target, m in results["measured"].items()
        for name, value in m["ratios"].items()
    ]
    measured += "\n" + "\n".join(ratios) + "\n"
    rows = [
        [
            t,
            f"{a['lora_parameters'] / 1e6:.2f}M",
            f"{a['trained_layer_parameters'] / 1e6:.1f}M",
            gib(a["ours_bytes"]),
            gib(a["esd_bytes"]),
            f"{a['ratio']:.3f}x",
        ]
        for t, a in results["analytic"].items()
    ]
    analytic = markdown_table(
        [
            "target",
            "LoRA params",
            "ESD trained params",
            "ours (weights+grads+Adam)",
            "ESD way (weights+grads+Adam)",
            "ours / ESD",
        ],
        rows,
    )
    rows = []
    for target, m in results["measured"].items():
        if "ours" not in m["runs"] or "esd" not in m["runs"]:
            continue
        o, e = m["runs"]["ours"], m["runs"]["esd"]
        rows.append(
            [
                target,
                f"{o['saved_bytes'] / 2**20:.2f} MiB ({o['saved_what']})",
                f"{gib(e['saved_bytes'])} ({e['saved_what']})",
                f"{e['saved_bytes'] / o['saved_bytes']:.0f}x",
            ]
        )
    storage = markdown_table(["target", "ours per concept", "ESD way per concept", "ESD / ours"], rows)
    s, mach = results["settings"], results["machine"]
    return (
        f"# Peak memory of one erasure step and storage per concept ({s['architecture']}, latents "
        f"1x4x{s['latent_size']}x{s['latent_size']} per player, LoRA rank {s['rank']}, CPU float32)\n\n"
        f"Measured (fresh subprocess per variant, ru_maxrss after {s['steps']} steps minus after imports; the "
        "tensor columns are byte counts, independent of the allocator):\n\n"
        f"{measured}\nFrom parameter counts (fp32, no activations):\n\n{analytic}\nStorage:\n\n{storage}\n"
        f"{mach['cpu']}, {mach['nproc']} cores, {mach['memory_gib']} GiB, {mach['date_utc']}.\n\n"
        "![memory](memory.png)\n"
    )


def plot(results: dict, path: Path) -> None:
    """Peak RSS above the baseline per variant (measured) and weights + gradients + AdamW per target set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    measured = results["measured"]
    if len(measured) == 1:
        ((target, m),) = measured.items()
        names = list(m["runs"])
        values = [m["runs"][v]["peak_minus_baseline_bytes"] / 2**30 for v in names]
        bars = left.bar(
            [PLOT_LABELS[v] for v in names],
            values,
            color=["crimson" if v == "ours" else "tab:gray" for v in names],
        )
        left.bar_label(bars, fmt="%.2f GiB", fontsize=8)
        left.set_title(f"measured peak RSS - baseline ({target}, {results['settings']['architecture']})", fontsize=10)
        left.tick_params(axis="x", labelsize=7)
    else:  # one group of bars per (target, K)
        variants = [v for v in VARIANTS if any(v in m["runs"] for m in measured.values())]
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            xs = [x for x, m in enumerate(measured.values()) if v in m["runs"]]
            ys = [m["runs"][v]["peak_minus_baseline_bytes"] / 2**30 for m in measured.values() if v in m["runs"]]
            left.bar([x + (i - (len(variants) - 1) / 2) * width for x in xs], ys, width=width, label=VARIANT_LABELS[v])
        left.set_xticks(range(len(measured)), list(measured), fontsize=7)
        left.legend(fontsize=7)
        left.set_title(f"measured peak RSS - baseline ({results['settings']['architecture']})", fontsize=10)
    left.set_ylabel("GiB")
    targets = list(results["analytic"])
    x = range(len(targets))
    right.bar(
        [i - 0.2 for i in x],
        [results["analytic"][t]["ours_bytes"] / 2**30 for t in targets],
        width=0.4,
        label="ours (LoRA)",
        color="crimson",
    )
    right.bar(
        [i + 0.2 for i in x],
        [results["analytic"][t]["esd_bytes"] / 2**30 for t in targets],
        width=0.4,
        label="ESD way",
        color="tab:gray",
    )
    right.set_xticks(list(x), targets)
    right.set_ylabel("GiB (fp32 weights + gradients + AdamW)")
    right.set_title("from parameter counts, per LoRA target set", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def memory_ratios(runs: dict[str, dict]) -> dict[str, float | None]:
    """ours / each other variant measured, for peak RSS above the baseline, held tensors and saved activations."""
    ratios: dict[str, float | None] = {}
    keys = (
        ("peak_minus_baseline_bytes", "{}_over_{}"),
        ("held_tensor_bytes", "held_{}_over_{}"),
        ("saved_activation_peak_bytes", "saved_{}_over_{}"),
    )
    pairs = [("ours", b) for b in ("ordinary", "ours_per_player", *ESD_VARIANTS)] + [("ours_per_player", "ordinary")]
    for key, name in keys:
        for a, b in pairs:
            if a in runs and b in runs:
                # an RSS difference can read 0 on a loaded machine: no ratio then, rather than a crash
                ratios[name.format(a, b)] = runs[a][key] / runs[b][key] if runs[b][key] > 0 else None
    return ratios


def run(config: MemoryConfig) -> dict:
    torch.set_num_threads(config.threads)
    check_results(config.output_dir, config.overwrite)
    machine = machine_record()
    measured = {}
    for target in config.lora_targets:
        for players in config.players:
            runs = run_children(config, target, players)
            label = target if players == 2 else f"{target}, K={players}"
            measured[label] = {"target": target, "players": players, "runs": runs, "ratios": memory_ratios(runs)}
    results = {
        "benchmark": "memory",
        "machine": machine,
        "settings": config_record(config),
        "measured": measured,
        "analytic": analytic_bytes(config.architecture, list(config.analytic_targets), config.rank),
    }
    write_results(
        config.output_dir, results, markdown, overwrite=config.overwrite, plot=plot, plot_name="memory.png", echo=True
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(MemoryConfig, argv, description=__doc__, prog="python -m benchmarks.memory"))


if __name__ == "__main__":
    run_script(main, "memory")
