"""The fast gradient source (one forward and one backward over all players' rows) against the reference (one pass
per player): the same per-player gradients to 1e-5 relative in float32, on the SD UNet's LoRA on attention and
convolution layers, with gradient checkpointing on and off, with gradient accumulation, under two processes, and
through the training loop; the fallback for parameters it does not cover."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from munba_diffusion.bargaining import get_combiner
from munba_diffusion.diffusion.latents import LatentBatch
from munba_diffusion.diffusion.lora import ErasureLoraConfig, add_erasure_lora
from munba_diffusion.diffusion.players import ErasureBatch, erasure_player_gradients, erasure_players
from munba_diffusion.row_gradients import RowGroupGradients
from munba_diffusion.step import BargainedUpdate, PlayerGradientSource, RowPlayers
from tests.tiny_sd import build_tiny_sd_pipeline, save_tiny_sd

CPU = torch.device("cpu")
NAMES = ["preserve", "neighbours", "forget:a", "forget:b"]
RTOL = 1e-5


def lora_unet(target: str, *, seed: int = 2, checkpointing: bool = False, identity: bool = False):
    """The tiny SD UNet with an erasure LoRA moved off the identity (so that no player's gradient is ~0)."""
    unet = build_tiny_sd_pipeline(seed=seed).unet
    params = add_erasure_lora(unet, ErasureLoraConfig(rank=2, target=target))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if not identity:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return unet, params


def four_players(seed: int = 0) -> tuple[ErasureBatch, torch.Tensor]:
    """preserve (3 rows), neighbours (2), two concepts (2 and 1 rows), and the unconditional context."""
    generator = torch.Generator().manual_seed(seed)

    def rows(b):
        return LatentBatch(
            torch.zeros(b, dtype=torch.long),
            torch.randn(b, 4, 16, 16, generator=generator),
            torch.randint(0, 1000, (b,), generator=generator),
        )

    def ctx(b):
        return torch.randn(b, 8, 32, generator=generator)

    batch = ErasureBatch(
        forget=[(rows(2), ctx(2), ctx(2)), (rows(1), ctx(1), ctx(1))],
        preserve=(rows(3), ctx(3)),
        neighbours=(rows(2), ctx(2)),
    )
    return batch, ctx(1)


def players_of(unet, batch, uncond, loss="esd", names=NAMES) -> RowPlayers:
    return erasure_players(unet, batch, uncond, loss, 0.5, names, CPU, torch.float32)


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(got, want))
    den = sum(float(b.double().pow(2).sum()) for b in want)
    return (num / den) ** 0.5


def assert_same_gradients(got: dict, want: dict) -> None:
    """Per player: the whole gradient within RTOL relative, and every tensor within RTOL of that player's scale."""
    for name in want:
        assert relative_error(got[name], want[name]) < RTOL, name
        scale = max(float(w.abs().max()) for w in want[name])
        for a, b in zip(got[name], want[name]):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("target", ["attn", "full"])
def test_fast_gradients_equal_the_per_player_passes(target, checkpointing):
    """attn: Linear LoRA of self- and cross-attention; full: every Linear and Conv2d (3x3 resnet convolutions,
    stride-2 downsampling, 1x1 projections, the timestep MLP) with peft's Conv2d LoRA (kernel down, 1x1 up)."""
    unet, params = lora_unet(target, checkpointing=checkpointing)
    batch, uncond = four_players()
    players = players_of(unet, batch, uncond)
    fast, fast_values = PlayerGradientSource("fast")(players, params, loss_scale=3.0)
    reference, values = PlayerGradientSource("per_player")(players, params, loss_scale=3.0)
    assert_same_gradients(fast, reference)
    for name in NAMES:
        assert fast_values[name] == pytest.approx(values[name], rel=RTOL)
        assert any(float(g.abs().max()) > 0 for g in fast[name])
    conv = [p for p in params if p.dim() == 4]
    assert (target == "full") == bool(conv)  # the conv targets are really exercised
    assert RowGroupGradients(unet, params).fallback == []


def test_players_with_equal_rows_take_one_batched_product_per_layer():
    unet, params = lora_unet("full")
    generator = torch.Generator().manual_seed(5)

    def rows():
        return LatentBatch(
            torch.zeros(2, dtype=torch.long), torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([5, 900])
        )

    def ctx():
        return torch.randn(2, 8, 32, generator=generator)

    batch = ErasureBatch(forget=[(rows(), ctx(), ctx()), (rows(), ctx(), ctx())], preserve=(rows(), ctx()))
    names = ["preserve", "forget:a", "forget:b"]
    players = players_of(unet, batch, ctx()[:1], names=names)
    assert players.rows == [2, 2, 2]
    fast, _ = PlayerGradientSource("fast")(players, params)
    reference, _ = PlayerGradientSource("per_player")(players, params)
    assert_same_gradients(fast, reference)


def test_checkpointing_recomputes_the_forward_and_adds_each_gradient_once():
    unet, params = lora_unet("full")
    batch, uncond = four_players()
    plain, _ = PlayerGradientSource("fast")(players_of(unet, batch, uncond), params)
    unet.enable_gradient_checkpointing()
    calls = {"n": 0}
    layer = unet.get_submodule("down_blocks.0.resnets.0.conv1.lora_A.erasure")  # inside a checkpointed block
    layer.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    checkpointed, _ = PlayerGradientSource("fast")(players_of(unet, batch, uncond), params)
    assert calls["n"] == 2  # the forward, then its recomputation in the backward
    assert_same_gradients(checkpointed, plain)


def test_the_players_fast_gradients_add_up_to_the_gradient_of_the_summed_loss():
    unet, params = lora_unet("full")
    batch, uncond = four_players()
    players = players_of(unet, batch, uncond, loss="anchored_esd")
    fast, _ = PlayerGradientSource("fast")(players, params)
    total = torch.autograd.grad(sum(players.joint_losses().values()), params)
    summed = [sum(fast[name][j] for name in NAMES) for j in range(len(params))]
    assert relative_error(summed, list(total)) < 1e-6


@pytest.mark.parametrize("loss", ["esd", "anchored_esd", "anchor"])
def test_fast_path_at_the_identity_lora_keeps_the_preservation_loss_exactly_zero(loss):
    """The frozen targets of the joint forward come from the joint batch's shape: no rounding-noise gradient."""
    unet, params = lora_unet("attn", identity=True)
    batch, uncond = four_players()
    grads, values = PlayerGradientSource("fast")(players_of(unet, batch, uncond, loss=loss), params)
    assert values["preserve"] == 0.0 and values["neighbours"] == 0.0
    assert all(float(g.abs().max()) == 0 for name in ("preserve", "neighbours") for g in grads[name])
    assert any(float(g.abs().max()) > 0 for g in grads["forget:a"])


def test_erasure_player_gradients_take_the_source_flag():
    unet, params = lora_unet("attn")
    batch, uncond = four_players()
    args = (unet, batch, uncond, "esd", 0.5, NAMES, params, CPU, torch.float32)
    fast, fast_values = erasure_player_gradients(*args, source="fast")
    reference, values = erasure_player_gradients(*args)  # the reference stays the function's default
    assert_same_gradients(dict(zip(NAMES, fast)), dict(zip(NAMES, reference)))
    with pytest.raises(ValueError, match="player_gradients must be one of fast, per_player"):
        PlayerGradientSource("joint")


def test_parameters_the_fast_path_does_not_cover_fall_back_and_the_log_says_so_once(caplog):
    unet, params = lora_unet("attn")
    norm = unet.conv_norm_out.weight  # a GroupNorm weight: no per-row product covers it
    norm.requires_grad_(True)
    params = [*params, norm]
    batch, uncond = four_players()
    source = PlayerGradientSource("fast")
    with caplog.at_level(logging.WARNING, logger="munba_diffusion.step"):
        fast, _ = source(players_of(unet, batch, uncond), params)
        source(players_of(unet, batch, uncond), params)
    reference, _ = PlayerGradientSource("per_player")(players_of(unet, batch, uncond), params)
    assert_same_gradients(fast, reference)
    said = [r.getMessage() for r in caplog.records if "per-player passes" in r.getMessage()]
    assert len(said) == 1 and "1 of" in said[0] and "conv_norm_out.weight" in said[0]


class Toy(nn.Module):
    """Rows stay apart in every layer; ``flat`` runs on rows and pixels flattened into one dimension."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
        self.linear = nn.Linear(4, 5)
        self.flat = nn.Linear(5, 5)
        self.circular = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")

    def forward(self, x):
        h = self.dilated(torch.tanh(self.conv(x)))
        h = torch.tanh(self.circular(h))
        h = self.linear(h.flatten(2).transpose(1, 2))  # (N, pixels, 5)
        return self.flat(h.reshape(-1, 5)).reshape(h.shape)  # first dimension N x pixels, not N


def test_row_groups_on_linear_and_conv_layers_and_the_runtime_fallback():
    model = Toy()
    params = list(model.parameters())
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sizes = [1, 3, 2]
    bounds = [(0, 1), (1, 4), (4, 6)]

    def losses(out):
        return [out[a:b].pow(2).mean() * (k + 1) for k, (a, b) in enumerate(bounds)]

    grouped = RowGroupGradients(model, params)
    assert grouped.fallback == ["circular.weight", "circular.bias"]  # known before the forward
    with grouped.rows(sizes):
        got = grouped.backward(sum(losses(model(x))))
        assert set(grouped.fallback) == {"circular.weight", "circular.bias", "flat.weight", "flat.bias"}
    assert "forward" not in model.linear.__dict__  # the layers are themselves again
    for k, (a, b) in enumerate(bounds):
        want = torch.autograd.grad(model(x[a:b]).pow(2).mean() * (k + 1), params)  # the group's rows alone
        for j, name in enumerate(n for n, _ in model.named_parameters()):
            if name.startswith(("circular", "flat")):
                assert got[k][j] is None
            else:
                torch.testing.assert_close(got[k][j], want[j], rtol=1e-5, atol=1e-7)


def test_bad_row_groups_are_clear_errors():
    model = Toy()
    with pytest.raises(ValueError, match="every group needs at least one row"):
        with RowGroupGradients(model, list(model.parameters())).rows([2, 0]):
            pass


def test_gradient_accumulation_fast_equals_per_player():
    unet, params = lora_unet("full")
    written = {}
    for source in ("fast", "per_player"):
        update = BargainedUpdate(params, get_combiner("nash"), max_grad_norm=1.0, player_gradients=source)
        for micro in range(2):
            batch, uncond = four_players(seed=10 + micro)
            update.accumulate_players(players_of(unet, batch, uncond), weight=0.5)
        diag = update.write_gradients()
        written[source] = ([p.grad.clone() for p in params], diag)
        for p in params:
            p.grad = None
    (fast, fast_diag), (reference, diag) = written["fast"], written["per_player"]
    assert_same_gradients({"grad": fast}, {"grad": reference})
    assert fast_diag.weights == pytest.approx(diag.weights, rel=1e-4)
    assert fast_diag.grad_norms == pytest.approx(diag.grad_norms, rel=RTOL)
    assert fast_diag.losses == pytest.approx(diag.losses, rel=RTOL)


def _two_process_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def mean(g: torch.Tensor) -> torch.Tensor:  # what accelerator.reduce(g, reduction="mean") does
        g = g.clone()
        dist.all_reduce(g)
        return g / world

    unet, params = lora_unet("full", checkpointing=rank == 1)
    results = {}
    for source in ("fast", "per_player"):
        update = BargainedUpdate(params, get_combiner("nash"), reduce=mean, player_gradients=source)
        batch, uncond = four_players(seed=100 + rank)  # each process has its own rows
        update.accumulate_players(players_of(unet, batch, uncond))
        diag = update.write_gradients()
        results[source] = {"grads": [p.grad.clone() for p in params], "grad_norms": diag.grad_norms}
        for p in params:
            p.grad = None
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_fast_equals_per_player(tmp_path):
    """Two gloo processes with different rows (one with gradient checkpointing): the per-player sums are averaged
    across processes before the Gram matrix, so both processes write the same gradient, and fast = per_player."""
    import torch.multiprocessing as mp

    # forked: the children start with the modules already imported (CPU only, so forking torch is safe)
    mp.start_processes(
        _two_process_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        assert_same_gradients({"grad": result["fast"]["grads"]}, {"grad": result["per_player"]["grads"]})
        assert result["fast"]["grad_norms"] == pytest.approx(result["per_player"]["grad_norms"], rel=RTOL)
    for source in ("fast", "per_player"):
        assert_same_gradients({"grad": ranks[0][source]["grads"]}, {"grad": ranks[1][source]["grads"]})


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


def _train(folder, out, source: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    import train_erase

    train_erase.main(
        [
            "--pretrained_model_name_or_path",
            str(folder),
            "--concept",
            "text:a red circle",
            "--concept",
            "text:a blue square",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "3",
            "--gradient_accumulation_steps",
            "2",
            "--train_batch_size",
            "2",
            "--lora_target",
            "noxattn",
            "--learning_rate",
            "1e-3",
            "--sampler_steps",
            "3",
            "--pool_trajectories",
            "1",
            "--validation_inference_steps",
            "1",
            "--validation_seeds",
            "1",
            "--no_evaluation",
            "--player_gradients",
            source,
        ]
    )
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    return load_file(str(out / "pytorch_lora_weights.safetensors")), log


def test_the_training_loop_gives_the_same_lora_with_fast_and_per_player_gradients(tiny_sd_folder, tmp_path):
    """Three players (preserve and two concepts), conv LoRA, gradient accumulation, three AdamW steps."""
    fast, fast_log = _train(tiny_sd_folder, tmp_path / "fast", "fast")
    reference, log = _train(tiny_sd_folder, tmp_path / "per_player", "per_player")
    assert fast.keys() == reference.keys()
    moved = [k for k in fast if "lora_B" in k and float(fast[k].abs().max()) > 0]
    assert moved, "the LoRA did not move"
    for key in fast:
        # AdamW's first steps move every element by about the learning rate whatever its gradient's size, so the
        # gradients' rounding differences show up at elements with tiny gradients: allow 1% of one step (1e-3)
        torch.testing.assert_close(fast[key], reference[key], rtol=1e-4, atol=1e-5)
    changes = [(fast[k], reference[k]) for k in fast if "lora_B" in k]  # B starts at 0: B is its change
    assert relative_error([a for a, _ in changes], [b for _, b in changes]) < 1e-4
    for a, b in zip(fast_log, log):
        assert a["status"] == b["status"]
        numbers = [k for k in b if k.startswith(("loss/", "grad_norm/", "weight/"))]
        assert len(numbers) == 9  # three players
        for key in numbers:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
