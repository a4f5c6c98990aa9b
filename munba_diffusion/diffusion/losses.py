r"""The two players' losses for concept erasure (pure functions of noise predictions).

Notation: :math:`\epsilon_\theta(x_t, c)` is the LoRA model's noise prediction, :math:`\epsilon^*(x_t, c)` the
frozen model's (same UNet, adapters disabled), :math:`c_f` a forget prompt, :math:`c_a` its anchor prompt,
:math:`\varnothing` the empty prompt and :math:`c_r` a preservation prompt.

- ``esd`` (negative guidance, ESD):
  :math:`L_f = \| \epsilon_\theta(x_t, c_f) - [\epsilon^*(x_t, \varnothing) - \eta(\epsilon^*(x_t, c_f) - \epsilon^*(x_t, \varnothing))] \|^2`
- ``anchor`` (MUNBa / concept ablation): :math:`L_f = \| \epsilon_\theta(x_t, c_f) - \epsilon^*(x_t, c_a) \|^2`
- preservation: :math:`L_r = \| \epsilon_\theta(x_t, c_r) - \epsilon^*(x_t, c_r) \|^2`

All are means over elements (``F.mse_loss``); targets are constants (computed without gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FORGET_LOSSES = ("esd", "anchor")


def esd_target(eps_uncond: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """Negative-guidance target :math:`\\epsilon^*(\\varnothing) - \\eta(\\epsilon^*(c_f) - \\epsilon^*(\\varnothing))`."""
    return eps_uncond - eta * (eps_concept - eps_uncond)


def forget_loss(eps_student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the LoRA model's prediction for a forget prompt to its (constant) target."""
    return F.mse_loss(eps_student.float(), target.detach().float())


def preservation_loss(eps_student: torch.Tensor, eps_frozen: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the LoRA model's prediction to the frozen model's on a preservation prompt."""
    return F.mse_loss(eps_student.float(), eps_frozen.detach().float())
