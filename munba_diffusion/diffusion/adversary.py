"""Robust erasure (``--robust``): an adversarial forgetting player per concept, AdvUnlearn-style.

Every ``adversarial_every`` steps, for each concept, a prefix ``P`` of ``adversarial_tokens`` soft token embeddings
(:mod:`munba_diffusion.adversarial`) is searched against the *current* model (LoRA on) so that, with ``P`` before
the concept's forget prompts, it predicts what the frozen original predicts for the plain prompt:

    P* = argmin_P  E_rows || f_theta(x_t, t, enc(P ++ c)) - f_0(x_t, t, enc(c)) ||^2

(``adversarial_steps`` AdamW steps from the previous prefix, or from random tokens the first time; the rows are
x_t of the concept's own latent source, so no data is needed). This is the attacker of the white-box evaluation
with the original model's prediction in place of a target image: the data-free form of UnlearnDiffAtk's loss.
The last ``adversarial_prompts_kept`` prefixes are kept; each step the adversarial player draws its own forget rows,
gives each row a kept prefix, and takes the *same forget loss and frozen target* as the forgetting player
(``esd``, ``anchored_esd`` or ``anchor``, computed from the plain prompt), only with the student conditioned on
``enc(P ++ c)``. The bargaining then weighs robustness against preservation like any other player, instead of
robustness being bought with preservation (``--combiner sum`` adds it with a fixed weight instead).

The prefixes are soft (free embeddings): a stronger attacker than typed tokens, so erasure robust to them covers
the projected attacks of the evaluation too. The kept prefixes are saved in every checkpoint, so a resumed run is
bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adversarial import PrefixSearch, allowed_token_ids
from .family import denoise, family_of_pipeline
from .latents import LatentBatch, RowTokens
from .lora import adapters_disabled

ADVERSARIAL = "adversarial"
CHECKPOINT_NAME = "adversary.safetensors"
_REFRESH_SALT = 0xAD7E  # separates the search's random draws from the steps' batches


def adversarial_player_names(forget: list[str]) -> list[str]:
    """``adversarial`` for ``forget``, ``adversarial:<concept>`` for ``forget:<concept>``."""
    return [ADVERSARIAL + name[len("forget") :] for name in forget]


@dataclass(frozen=True)
class AdversarySettings:
    tokens: int
    every: int
    steps: int
    lr: float
    kept: int


class Adversary:
    """The kept adversarial prefixes of every concept, their search and the contexts they give."""

    def __init__(
        self, pipe, forget_prompts: list[list[str]], settings: AdversarySettings, device, resolution: int | None = None
    ):
        self.pipe, self.family = pipe, family_of_pipeline(pipe)
        self.settings, self.device, self.resolution = settings, device, resolution
        self.input_ids = [self.family.prefixed_ids(pipe, list(p), settings.tokens) for p in forget_prompts]
        vocabulary = self.family.prefix_vocabulary(pipe)
        allowed = allowed_token_ids(pipe.tokenizer, vocabulary.shape[0])
        self.search = PrefixSearch(vocabulary, allowed, lr=settings.lr, weight_decay=0.0, project=False)
        self.banks: list[list[torch.Tensor]] = [[] for _ in forget_prompts]
        self.last_losses: list[float] = [float("nan")] * len(forget_prompts)

    def due(self, step: int) -> bool:
        return step % self.settings.every == 0

    def _encode(self, concept: int, prompt_index: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        ids = self.input_ids[concept][prompt_index.cpu()]
        return self.family.encode_with_prefix(self.pipe, ids, prefix, resolution=self.resolution)

    def refresh(self, unet, sources, contexts: list[torch.Tensor], seed: int, step: int, batch_size: int, dtype):
        """Search a new prefix per concept against the current model and keep it (see the module docstring)."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + _REFRESH_SALT)
        for concept, (source, ctx) in enumerate(zip(sources, contexts)):
            rows: LatentBatch = source.sample(batch_size, generator)
            latents = rows.latents.to(self.device, dtype)
            timesteps = rows.timesteps.to(self.device)
            with torch.no_grad(), adapters_disabled(unet):
                original = denoise(unet, latents, timesteps, ctx[rows.prompt_index].to(self.device, dtype)).float()

            def loss(prefix: torch.Tensor, _iteration: int) -> torch.Tensor:
                context = self._encode(concept, rows.prompt_index, prefix).to(dtype)
                prediction = denoise(unet, latents, timesteps, context)
                return torch.nn.functional.mse_loss(prediction.float(), original)

            bank = self.banks[concept]
            start = (
                bank[-1].clone().requires_grad_(True) if bank else self.search.initial(self.settings.tokens, generator)
            )
            losses = self.search.run(start, loss, self.settings.steps)
            self.last_losses[concept] = losses[-1]
            bank.append(start.detach())
            del bank[: -self.settings.kept]

    def rows(self, data, batch_size: int, generator: torch.Generator) -> tuple[list[tuple], dict[str, RowTokens]]:
        """The adversarial players' rows of one micro-batch, per concept: (x_t, plain contexts, anchor contexts,
        adversarial contexts); and their tokens with prefixes (``adversarial/<i>``, for a text-encoder LoRA, which
        encodes them again). ``data`` is the run's :class:`.data.ErasureData`."""
        rows, tokens = [], {}
        for concept, (source, ctx, anchor) in enumerate(
            zip(data.forget_sources, data.forget_contexts, data.anchor_contexts)
        ):
            lat = source.sample(batch_size, generator)
            index = lat.prompt_index
            prefixes = self.draw(concept, len(index), generator)
            tokens[f"{ADVERSARIAL}/{concept}"] = RowTokens(self.input_ids[concept][index.cpu()], prefixes)
            rows.append((lat, ctx[index], anchor[index], self.contexts(concept, lat, prefixes)))
        return rows, tokens

    def log_values(self, names: list[str]) -> dict[str, float]:
        """The last search's final loss per adversarial player (``attack_loss/<player>``) for the run log."""
        players = [n for n in names if n.startswith(ADVERSARIAL)]
        return {f"attack_loss/{name}": loss for name, loss in zip(players, self.last_losses)}

    def draw(self, concept: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` prefixes (n, k, d) drawn from the concept's kept ones."""
        bank = self.banks[concept]
        choice = torch.randint(len(bank), (n,), generator=generator)
        return torch.stack([bank[i] for i in choice.tolist()])

    @torch.no_grad()
    def contexts(self, concept: int, rows: LatentBatch, prefixes: torch.Tensor) -> torch.Tensor:
        """``enc(P ++ c)`` for each row (B, L, D), with the row's prefix ``P`` (see :meth:`draw`)."""
        return self._encode(concept, rows.prompt_index, prefixes).float().cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kept prefixes, for a checkpoint (``bank.<concept>.<k>``)."""
        return {f"bank.{c}.{k}": p.contiguous().cpu() for c, bank in enumerate(self.banks) for k, p in enumerate(bank)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        banks: list[list[torch.Tensor]] = [[] for _ in self.banks]
        for key in sorted(state, key=lambda k: tuple(int(x) for x in k.split(".")[1:])):
            banks[int(key.split(".")[1])].append(state[key].float().to(self.device))  # where a fresh run has them
        self.banks = banks
