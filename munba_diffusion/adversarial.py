"""Adversarial prompt prefixes: a few token embeddings, put in front of a prompt, optimised by gradient.

Shared by the white-box attack (:mod:`munba_diffusion.evaluation.attack`, UnlearnDiffAtk-style) and the robust
erasure mode of the trainer (AdvUnlearn-style adversarial player). The prompt ``c`` is tokenised as
``[BOS] p_1 .. p_k c_1 .. c_n [EOS] [PAD]...``: the ``k`` prefix slots hold placeholder ids whose embeddings are
replaced, inside the text encoder's token-embedding layer, by the adversarial vectors ``P`` (k, d). Everything
after the token embedding (positions, causal attention, final norm) is the text encoder's own, so gradients reach
``P`` through the real model and the pooled output still sits at the EOS token.

Projection (PEZ, Wen et al. 2023, "Hard Prompts Made Easy"): the forward pass uses ``proj(P)``, each row replaced
by the vocabulary embedding of highest cosine similarity; the gradient of the loss at ``proj(P)`` is applied to
``P`` (straight-through). The result is a real token sequence: a prompt a user could type.

    >>> import torch
    >>> vocab = torch.eye(4)
    >>> project_to_vocabulary(torch.tensor([[0.9, 0.1, 0.0, 0.0]]), vocab, torch.arange(4))
    tensor([0])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


def special_token_ids(tokenizer) -> set[int]:
    """BOS, EOS, padding and unknown ids: never used as prefix tokens."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    ids |= set(getattr(tokenizer, "all_special_ids", []))
    return {i for i in ids if i is not None}


def allowed_token_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """The ids a prefix may take: every vocabulary id but the special ones."""
    banned = special_token_ids(tokenizer)
    return torch.tensor([i for i in range(vocab_size) if i not in banned], dtype=torch.long)


def prefixed_input_ids(tokenizer, prompts: list[str], prefix_length: int) -> torch.Tensor:
    """Token ids (B, L) of ``prompts`` with ``prefix_length`` placeholder slots right after BOS.

    The prompt is truncated so that BOS, the prefix, the prompt and EOS fit the tokenizer's ``model_max_length``;
    the placeholders are BOS ids (any id but EOS works: their embeddings are replaced, and CLIP pools at EOS).
    """
    length = tokenizer.model_max_length
    if prefix_length < 1 or prefix_length > length - 2:
        raise ValueError(f"prefix length must be between 1 and {length - 2}; got {prefix_length}")
    rows = []
    for prompt in prompts:
        body = tokenizer(prompt, add_special_tokens=False).input_ids[: length - 2 - prefix_length]
        ids = [tokenizer.bos_token_id, *[tokenizer.bos_token_id] * prefix_length, *body, tokenizer.eos_token_id]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows.append(ids + [pad] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


@contextlib.contextmanager
def prefix_embeddings(text_encoder, prefix: torch.Tensor, rows: torch.Tensor | None = None) -> Iterator[None]:
    """Inside the block, the text encoder's token embeddings at positions 1..k are ``prefix``.

    ``prefix`` is (k, d) (the same prefix for every row) or (B, k, d); ``rows`` (B,) bool, when given, limits the
    replacement to the rows where it is true (the others keep their own tokens' embeddings). Implemented as a
    forward hook on the token-embedding layer, so it works for any text encoder whose ``get_input_embeddings()``
    is that layer.
    """
    layer = text_encoder.get_input_embeddings()

    def replace(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        k = prefix.shape[-2]
        slots = prefix.to(output.dtype).expand(output.shape[0], k, output.shape[-1])
        if rows is not None:
            slots = torch.where(rows.to(output.device)[:, None, None], slots, output[:, 1 : 1 + k])
        return torch.cat([output[:, :1], slots, output[:, 1 + k :]], dim=1)

    handle = layer.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encode_with_prefix(
    text_encoder, input_ids: torch.Tensor, prefix: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """The text encoder's hidden states (B, L, D) for ``input_ids`` whose prefix slots hold ``prefix`` (only in
    ``rows``, when given: see :func:`prefix_embeddings`)."""
    with prefix_embeddings(text_encoder, prefix, rows):
        return text_encoder(input_ids.to(text_encoder.device))[0]


def project_to_vocabulary(embeddings: torch.Tensor, vocabulary: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per row of ``embeddings`` (k, d), the allowed vocabulary id of highest cosine similarity (k,)."""
    candidates = torch.nn.functional.normalize(vocabulary[allowed].float(), dim=-1)
    rows = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    return allowed.to(embeddings.device)[(rows @ candidates.T.to(rows.device)).argmax(dim=-1)]


@dataclass
class PrefixSearch:
    """Gradient search for a prefix ``P`` (k, d) that minimises ``loss(P)``; AdamW as in UnlearnDiffAtk.

    ``project``: optimise through the vocabulary projection (straight-through), so the prefix is real tokens;
    otherwise ``P`` stays a free (soft) embedding, a stronger attacker that no typed prompt can reproduce.
    """

    vocabulary: torch.Tensor  # (V, d) the text encoder's token-embedding matrix
    allowed: torch.Tensor  # ids the projection may pick
    lr: float = 0.01
    weight_decay: float = 0.1
    project: bool = True

    def initial(self, prefix_length: int, generator: torch.Generator) -> torch.Tensor:
        """Embeddings of ``prefix_length`` random allowed tokens (a fresh, trainable leaf)."""
        picks = self.allowed[torch.randint(len(self.allowed), (prefix_length,), generator=generator)]
        return self.vocabulary[picks].detach().clone().float().requires_grad_(True)

    def effective(self, soft: torch.Tensor) -> torch.Tensor:
        """What the model sees: ``proj(P)`` with the gradient passed straight through to ``P``, or ``P``."""
        if not self.project:
            return soft
        hard = self.vocabulary[project_to_vocabulary(soft.detach(), self.vocabulary, self.allowed)].float()
        return soft + (hard.to(soft.device) - soft).detach()

    def token_ids(self, soft: torch.Tensor) -> torch.Tensor:
        return project_to_vocabulary(soft.detach(), self.vocabulary, self.allowed)

    def run(
        self,
        soft: torch.Tensor,
        loss: Callable[[torch.Tensor, int], torch.Tensor],
        iterations: int,
        *,
        stop: Callable[[torch.Tensor, int], bool] | None = None,
    ) -> list[float]:
        """Take ``iterations`` AdamW steps on ``soft`` in place; ``loss(effective prefix, iteration)`` is the
        objective. After each step, ``stop(soft, iteration)`` may end the search early. Returns the losses."""
        optimizer = torch.optim.AdamW([soft], lr=self.lr, weight_decay=self.weight_decay)
        losses = []
        for iteration in range(iterations):
            value = loss(self.effective(soft), iteration)
            if not torch.isfinite(value):
                raise FloatingPointError(f"the attack loss became {value.item()} at iteration {iteration}")
            # only the prefix's gradient: a model's own parameters (a LoRA in training) are left untouched
            (soft.grad,) = torch.autograd.grad(value, [soft])
            optimizer.step()
            losses.append(float(value.detach()))
            if stop is not None and stop(soft, iteration):
                break
        return losses


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser should predict for ``add_noise(latents, noise, t)`` in the scheduler's prediction space:
    the noise (epsilon), or the velocity ``sqrt(a_t) eps - sqrt(1 - a_t) x_0`` (v-prediction, SD 2.x)."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction type {kind!r} is not supported by the attack; use an epsilon or v model")
