"""The players of an erasure step: their frozen targets, their losses and their gradients over the LoRA.

Every optimizer step has 1 + K players: ``preserve`` (keep the frozen model's predictions on neighbouring prompts)
and one forgetting player per erased concept. The frozen teacher is the same UNet with its adapter disabled
(:func:`munba_diffusion.diffusion.lora.adapters_disabled`); the loss formulas are in
:mod:`munba_diffusion.diffusion.losses`.

The LoRA model is conditioned on the rows' precomputed contexts (the frozen text encoder's), or, when the text
encoder carries the LoRA too (``--lora_on text_encoder|both``), on the rows' tokens encoded again with the LoRA on
(:func:`lora_contexts`); the teacher then encodes the same rows in the same call shape with the adapter off, so
that the identity LoRA's preservation loss is exactly 0 (see :func:`frozen_targets`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..step import PlayerGradientSource, RowPlayers
from .adversary import ADVERSARIAL
from .family import denoise
from .latents import LatentBatch, RowTokens
from .lora import adapters_disabled
from .losses import GUIDED_LOSSES, esd_target, forget_loss, preservation_loss

NEIGHBOURS = "neighbours"  # the optional preservation player of the concepts' neighbours (--neighbour_player)


@dataclass
class ErasureBatch:
    """Inputs of one micro-step: per forget player its x_t, timesteps, prompt contexts; same for preserve (and for
    the neighbours, when they are their own player; and for the adversarial players of ``--robust``, whose rows
    also carry the adversarial contexts the LoRA model sees, see :mod:`.adversary`)."""

    forget: list[tuple[LatentBatch, torch.Tensor, torch.Tensor]]  # (latents, concept ctx, anchor ctx)
    preserve: tuple[LatentBatch, torch.Tensor]
    neighbours: tuple[LatentBatch, torch.Tensor] | None = None
    adversarial: list[tuple[LatentBatch, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # + adversarial ctx
    tokens: dict[str, RowTokens] | None = None  # per row group (:func:`row_group`), with a text-encoder LoRA

    def preservation_rows(self, name: str) -> tuple[LatentBatch, torch.Tensor]:
        return self.neighbours if name == NEIGHBOURS else self.preserve


def row_group(name: str, names: list[str]) -> str:
    """The key of player ``name``'s rows in :attr:`ErasureBatch.tokens`: ``forget/<i>`` and ``adversarial/<i>``
    (the i-th concept), ``preserve`` or ``neighbours``."""
    if name.startswith(ADVERSARIAL):
        return f"{ADVERSARIAL}/{adversarial_names(names).index(name)}"
    if name.startswith("forget"):
        return f"forget/{forget_names(names).index(name)}"
    return name


@dataclass(frozen=True)
class TextLora:
    """The text encoder(s) carrying the LoRA (``--lora_on text_encoder|both``) and how rows' tokens become the
    denoiser's conditioning through them: the family's encoding (:mod:`.family`), adversarial prefixes included."""

    pipe: Any
    family: Any
    resolution: int

    @property
    def encoders(self) -> list:
        return self.family.text_encoders(self.pipe)

    def encode(self, ids: torch.Tensor, prefix: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        return self.family.encode_with_prefix(self.pipe, ids, prefix, rows, self.resolution)


def lora_contexts(batch: ErasureBatch, players: list[str], names: list[str], text_lora: TextLora | None = None):
    """The contexts the LoRA model is conditioned on for ``players``' rows, concatenated in order.

    Without a text-encoder LoRA, the rows' precomputed contexts; with one, the rows' tokens encoded in one call of
    the text encoder(s) as they are (LoRA on, with grad; or under ``adapters_disabled``, the teacher's contexts in
    the same call shape), adversarial rows with their soft prefixes.
    """
    if text_lora is None:
        return torch.cat([player_rows(batch, name, names)[1] for name in players])
    tokens = [batch.tokens[row_group(name, names)] for name in players]
    ids = torch.cat([t.ids for t in tokens])
    prefixed = [t for t in tokens if t.prefix is not None]
    if not prefixed:
        return text_lora.encode(ids)
    device, shape = text_lora.encoders[0].device, prefixed[0].prefix.shape[1:]
    prefix = torch.cat(
        [
            t.prefix.to(device) if t.prefix is not None else torch.zeros(len(t.ids), *shape, device=device)
            for t in tokens
        ]
    )
    rows = torch.cat([torch.full((len(t.ids),), t.prefix is not None) for t in tokens])
    return text_lora.encode(ids, prefix, rows)


def _encoders(text_lora: TextLora | None) -> list:
    return text_lora.encoders if text_lora is not None else []


def forget_names(names: list[str]) -> list[str]:
    """The forgetting players among ``names``, in the order of ``ErasureBatch.forget``."""
    return [n for n in names if n.startswith("forget")]


def adversarial_names(names: list[str]) -> list[str]:
    """The adversarial players among ``names``, in the order of ``ErasureBatch.adversarial``."""
    return [n for n in names if n.startswith(ADVERSARIAL)]


def is_forgetting(name: str) -> bool:
    """Whether player ``name`` forgets (a concept's forgetting player or its adversarial player)."""
    return name.startswith(("forget", ADVERSARIAL))


def _predict(unet, latents: torch.Tensor, timesteps: torch.Tensor, contexts: torch.Tensor, device, dtype):
    """The denoiser's prediction in the model's own space (epsilon or v: the targets are formed there too)."""
    return denoise(unet, latents.to(device, dtype), timesteps.to(device), contexts.to(device, dtype))


def frozen_targets(
    unet,
    batch: ErasureBatch,
    uncond: torch.Tensor,
    loss: str,
    eta: float,
    names: list[str],
    device,
    dtype,
    text_lora: TextLora | None = None,
) -> dict[str, torch.Tensor]:
    """Every player's constant target from the frozen model (adapters disabled, no grad): the frozen prediction
    on the preservation rows, and per forget player its ``esd``, ``anchored_esd`` or ``anchor`` / ``substitute`` target
    (:mod:`munba_diffusion.diffusion.losses`).

    The preserve rows go through the frozen model on their own, in the same batch shape as the LoRA forward of
    :func:`player_loss`: kernels may round differently for other batch shapes, and then the preservation loss of
    the identity LoRA at step 0 would be rounding noise (~1e-10) instead of exactly 0, and its gradient a noise
    direction that the bargaining would treat as a player's wish.
    """
    with torch.no_grad(), adapters_disabled(unet, *_encoders(text_lora)):
        targets = {}
        for name in names:
            if not is_forgetting(name):
                plat = batch.preservation_rows(name)[0]
                pctx = lora_contexts(batch, [name], names, text_lora)
                targets[name] = _predict(unet, plat.latents, plat.timesteps, pctx, device, dtype)
        forgetting = list(zip(forget_names(names), batch.forget))
        if batch.adversarial is not None:  # the same targets, from the plain prompts of the adversarial rows
            forgetting += [(n, rows[:3]) for n, rows in zip(adversarial_names(names), batch.adversarial)]
        for name, (lat, ctx, anchor_ctx) in forgetting:
            targets[name] = _forget_target(unet, lat, ctx, anchor_ctx, uncond, loss, eta, device, dtype)
    return targets


def _forget_target(unet, lat: LatentBatch, ctx, anchor_ctx, uncond, loss: str, eta: float, device, dtype):
    """A forgetting player's target on its rows (call with the adapters disabled and no grad)."""
    if loss in GUIDED_LOSSES:
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
        return esd_target(both[:b], both[b:], eta)
    return _predict(unet, lat.latents, lat.timesteps, anchor_ctx, device, dtype)


def player_rows(batch: ErasureBatch, name: str, names: list[str]) -> tuple[LatentBatch, torch.Tensor]:
    """The rows a player's LoRA forward runs on: its x_t (with their timesteps) and its prompt contexts."""
    if name.startswith(ADVERSARIAL):
        lat, _, _, adversarial_ctx = batch.adversarial[adversarial_names(names).index(name)]
        return lat, adversarial_ctx
    if not name.startswith("forget"):
        return batch.preservation_rows(name)
    lat, ctx, _ = batch.forget[forget_names(names).index(name)]
    return lat, ctx


def loss_of(name: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A player's loss from the LoRA model's prediction on its own rows (a mean over them)."""
    return forget_loss(prediction, target) if is_forgetting(name) else preservation_loss(prediction, target)


def player_loss(
    unet,
    batch: ErasureBatch,
    name: str,
    names: list[str],
    target: torch.Tensor,
    device,
    dtype,
    text_lora: TextLora | None = None,
) -> torch.Tensor:
    """One player's loss from a LoRA forward over that player's rows only."""
    lat = player_rows(batch, name, names)[0]
    ctx = lora_contexts(batch, [name], names, text_lora)
    return loss_of(name, _predict(unet, lat.latents, lat.timesteps, ctx, device, dtype), target)


def joint_rows(batch: ErasureBatch, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Every player's rows in one batch, in ``names`` order: (x_t, timesteps, contexts); ``None`` when their shapes
    cannot be stacked (e.g. prompt contexts of different lengths)."""
    rows = [player_rows(batch, name, names) for name in names]
    if len({lat.latents.shape[1:] for lat, _ in rows}) > 1 or len({ctx.shape[1:] for _, ctx in rows}) > 1:
        return None
    return (
        torch.cat([lat.latents for lat, _ in rows]),
        torch.cat([lat.timesteps for lat, _ in rows]),
        torch.cat([ctx for _, ctx in rows]),
    )


def joint_frozen_targets(
    unet,
    batch: ErasureBatch,
    uncond: torch.Tensor,
    loss: str,
    eta: float,
    names: list[str],
    device,
    dtype,
    text_lora: TextLora | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`frozen_targets` for one LoRA forward over all players' rows (:func:`joint_rows`).

    The frozen model runs on the joint batch in its shape, so that each preservation target comes from the same
    batch shape as the LoRA forward (the identity LoRA then has a preservation loss of exactly 0, see
    :func:`frozen_targets`); a forget player's rows in it carry its concept's context (``esd``,
    ``anchored_esd``: the concept's prediction) or its anchor's (``anchor``: the target itself). The reference
    predictions of ``esd`` / ``anchored_esd`` come from one more frozen forward over the forget rows.
    """
    forget = forget_names(names)
    latents, timesteps, contexts = joint_rows(batch, names)
    sizes = [player_rows(batch, name, names)[0].latents.shape[0] for name in names]
    guided = loss in GUIDED_LOSSES
    with torch.no_grad(), adapters_disabled(unet, *_encoders(text_lora)):
        if text_lora is not None:  # the same call shape as the LoRA model's contexts
            contexts = lora_contexts(batch, names, names, text_lora)
        if not guided:  # anchor: the target is the anchor prompt's own prediction
            contexts = torch.cat(
                [
                    batch.forget[forget.index(n)][2].to(c.device, c.dtype) if n in forget else c
                    for n, c in zip(names, contexts.split(sizes))
                ]
            )
        own = dict(zip(names, _predict(unet, latents, timesteps, contexts, device, dtype).split(sizes)))
        targets = {name: own[name] for name in names if name not in forget or not guided}
        if forget and guided:
            rows = batch.forget
            reference = torch.cat([uncond.expand_as(ctx) if loss == "esd" else anchor for _, ctx, anchor in rows])
            predicted = _predict(
                unet,
                torch.cat([lat.latents for lat, _, _ in rows]),
                torch.cat([lat.timesteps for lat, _, _ in rows]),
                reference,
                device,
                dtype,
            ).split([lat.latents.shape[0] for lat, _, _ in rows])
            for name, from_reference in zip(forget, predicted):
                targets[name] = esd_target(from_reference, own[name], eta)
        # the adversarial players' targets come from their plain prompts, not the contexts the LoRA model sees
        for name, rows in zip(adversarial_names(names), batch.adversarial or []):
            targets[name] = _forget_target(unet, *rows[:3], uncond, loss, eta, device, dtype)
    return targets


def erasure_players(
    unet,
    batch: ErasureBatch,
    uncond: torch.Tensor,
    loss: str,
    eta: float,
    names: list[str],
    device,
    dtype,
    *,
    autocast=contextlib.nullcontext,
    text_lora: TextLora | None = None,
    lora_module=None,
) -> RowPlayers:
    """The players of one micro-batch for the update owner's gradient sources (:class:`munba_diffusion.step.
    RowPlayers`): each player's loss from its own LoRA forward (targets of :func:`frozen_targets`), and all losses
    from one LoRA forward over all players' rows (targets of :func:`joint_frozen_targets`). ``autocast`` is a
    context-manager factory such as ``accelerator.autocast``. ``text_lora``: the text encoder(s) when they carry
    the LoRA (the rows' contexts are then encoded with them, see :func:`lora_contexts`); ``lora_module``: the module
    holding every trained layer (default ``unet``; e.g. an ``nn.ModuleDict`` of the UNet and the text encoder)."""
    per_player_targets: dict[str, torch.Tensor] = {}

    def one(name: str) -> torch.Tensor:
        with autocast():
            if not per_player_targets:  # computed once, when a per-player pass first needs them
                per_player_targets.update(
                    frozen_targets(unet, batch, uncond, loss, eta, names, device, dtype, text_lora)
                )
            return player_loss(unet, batch, name, names, per_player_targets[name], device, dtype, text_lora)

    rows = joint_rows(batch, names)
    sizes = [player_rows(batch, name, names)[0].latents.shape[0] for name in names]

    def joint() -> dict[str, torch.Tensor]:
        with autocast():
            targets = joint_frozen_targets(unet, batch, uncond, loss, eta, names, device, dtype, text_lora)
            latents, timesteps, _ = rows
            contexts = lora_contexts(batch, names, names, text_lora)
            predictions = _predict(unet, latents, timesteps, contexts, device, dtype).split(sizes)
            return {name: loss_of(name, p, targets[name]) for name, p in zip(names, predictions)}

    if rows is None:
        return RowPlayers(list(names), one)
    module = unet if lora_module is None else lora_module
    return RowPlayers(list(names), one, module=module, rows=sizes, joint_losses=joint)


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
    source: str = "per_player",
    text_lora: TextLora | None = None,
    lora_module=None,
) -> tuple[list[list[torch.Tensor]], dict[str, float]]:
    """Each player's gradient of ``loss_scale * L_i`` over ``params`` (in ``names`` order), and each ``L_i``'s
    value, from the gradient ``source`` (:class:`munba_diffusion.step.PlayerGradientSource`).

    ``per_player``: the frozen model gives all targets (no graph); then each player runs its own LoRA forward and
    ``autograd.grad``, so only one player's graph is alive at a time and each backward covers only that player's
    rows. ``fast``: one LoRA forward and one backward over all players' rows.
    """
    players = erasure_players(
        unet,
        batch,
        uncond,
        loss,
        eta,
        names,
        device,
        dtype,
        autocast=autocast,
        text_lora=text_lora,
        lora_module=lora_module,
    )
    grads, values = PlayerGradientSource(source)(players, params, loss_scale=loss_scale)
    return [grads[name] for name in names], values
