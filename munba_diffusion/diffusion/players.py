"""The players of an erasure step: their frozen targets, their losses and their gradients over the LoRA.

Every optimizer step has 1 + K players: ``preserve`` (keep the frozen model's predictions on neighbouring prompts)
and one forgetting player per erased concept. The frozen teacher is the same UNet with its adapter disabled
(:func:`munba_diffusion.diffusion.lora.adapters_disabled`); the loss formulas are in
:mod:`munba_diffusion.diffusion.losses`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..step import player_gradients
from .latents import LatentBatch
from .lora import adapters_disabled
from .losses import esd_target, forget_loss, preservation_loss

NEIGHBOURS = "neighbours"  # the optional preservation player of the concepts' neighbours (--neighbour_player)


@dataclass
class ErasureBatch:
    """Inputs of one micro-step: per forget player its x_t, timesteps, prompt contexts; same for preserve (and for
    the neighbours, when they are their own player)."""

    forget: list[tuple[LatentBatch, torch.Tensor, torch.Tensor]]  # (latents, concept ctx, anchor ctx)
    preserve: tuple[LatentBatch, torch.Tensor]
    neighbours: tuple[LatentBatch, torch.Tensor] | None = None

    def preservation_rows(self, name: str) -> tuple[LatentBatch, torch.Tensor]:
        return self.neighbours if name == NEIGHBOURS else self.preserve


def forget_names(names: list[str]) -> list[str]:
    """The forgetting players among ``names``, in the order of ``ErasureBatch.forget``."""
    return [n for n in names if n.startswith("forget")]


def _predict(unet, latents: torch.Tensor, timesteps: torch.Tensor, contexts: torch.Tensor, device, dtype):
    return unet(
        latents.to(device, dtype), timesteps.to(device), encoder_hidden_states=contexts.to(device, dtype)
    ).sample


def frozen_targets(
    unet, batch: ErasureBatch, uncond: torch.Tensor, loss: str, eta: float, names: list[str], device, dtype
) -> dict[str, torch.Tensor]:
    """Every player's constant target from the frozen model (adapters disabled, no grad): the frozen prediction
    on the preservation rows, and per forget player its ``esd``, ``anchored_esd`` or ``anchor`` target
    (:mod:`munba_diffusion.diffusion.losses`).

    The preserve rows go through the frozen model on their own, in the same batch shape as the LoRA forward of
    :func:`player_loss`: kernels may round differently for other batch shapes, and then the preservation loss of
    the identity LoRA at step 0 would be rounding noise (~1e-10) instead of exactly 0, and its gradient a noise
    direction that the bargaining would treat as a player's wish.
    """
    with torch.no_grad(), adapters_disabled(unet):
        targets = {}
        for name in names:
            if not name.startswith("forget"):
                plat, pctx = batch.preservation_rows(name)
                targets[name] = _predict(unet, plat.latents, plat.timesteps, pctx, device, dtype)
        for name, (lat, ctx, anchor_ctx) in zip(forget_names(names), batch.forget):
            if loss in ("esd", "anchored_esd"):
                reference = uncond.expand_as(ctx) if loss == "esd" else anchor_ctx  # what the concept is measured from
                b = lat.latents.shape[0]
                both = _predict(
                    unet,
                    torch.cat([lat.latents, lat.latents]),
                    torch.cat([lat.timesteps, lat.timesteps]),
                    torch.cat([reference, ctx]),
                    device,
                    dtype,
                )
                targets[name] = esd_target(both[:b], both[b:], eta)
            else:
                targets[name] = _predict(unet, lat.latents, lat.timesteps, anchor_ctx, device, dtype)
    return targets


def player_loss(
    unet, batch: ErasureBatch, name: str, names: list[str], target: torch.Tensor, device, dtype
) -> torch.Tensor:
    """One player's loss from a LoRA forward over that player's rows only."""
    if not name.startswith("forget"):
        lat, ctx = batch.preservation_rows(name)
        return preservation_loss(_predict(unet, lat.latents, lat.timesteps, ctx, device, dtype), target)
    lat, ctx, _ = batch.forget[forget_names(names).index(name)]
    return forget_loss(_predict(unet, lat.latents, lat.timesteps, ctx, device, dtype), target)


def erasure_player_gradients(
    unet,
    batch: ErasureBatch,
    uncond: torch.Tensor,
    loss: str,
    eta: float,
    names: list[str],
    params: list[torch.nn.Parameter],
    device,
    dtype,
    *,
    loss_scale: float = 1.0,
    autocast=contextlib.nullcontext,
) -> tuple[list[list[torch.Tensor]], dict[str, float]]:
    """Each player's gradient of ``loss_scale * L_i`` over ``params``, and each ``L_i``'s value.

    The frozen model gives all targets (no graph); then each player runs its own LoRA forward and
    ``autograd.grad``, so only one player's graph is alive at a time and each backward covers only that player's
    rows (a joint forward would make every player's backward run through the whole batch). ``autocast`` is a
    context-manager factory such as ``accelerator.autocast``.
    """
    with autocast():
        targets = frozen_targets(unet, batch, uncond, loss, eta, names, device, dtype)
    grads, values = [], {}
    for name in names:
        with autocast():
            value = player_loss(unet, batch, name, names, targets[name], device, dtype)
        values[name] = float(value.detach())
        grads.append(player_gradients(value * loss_scale, params, retain_graph=False))
    return grads, values
