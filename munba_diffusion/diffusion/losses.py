r"""The two players' losses for concept erasure (pure functions of noise predictions).

Notation: :math:`\epsilon_\theta(x_t, c)` is the LoRA model's noise prediction, :math:`\epsilon^*(x_t, c)` the
frozen model's (same UNet, adapters disabled), :math:`c_f` a forget prompt, :math:`c_a` its anchor prompt,
:math:`\varnothing` the empty prompt and :math:`c_r` a preservation prompt.

- ``esd`` (negative guidance, ESD):
  :math:`L_f = \| \epsilon_\theta(x_t, c_f) - [\epsilon^*(x_t, \varnothing) - \eta(\epsilon^*(x_t, c_f) - \epsilon^*(x_t, \varnothing))] \|^2`
- ``anchored_esd`` (negative guidance relative to the anchor): the same with the anchor prompt in place of the
  empty one, :math:`L_f = \| \epsilon_\theta(x_t, c_f) - [\epsilon^*(x_t, c_a) - \eta(\epsilon^*(x_t, c_f) - \epsilon^*(x_t, c_a))] \|^2`.
  ``esd`` pushes the prediction away from everything the prompt adds to the empty prompt ("a red circle": the
  colour *and* the shape), so the rest of the prompt goes with the concept; ``anchored_esd`` removes only what the
  concept adds to its anchor ("a red circle" minus "a circle": the redness) and keeps the rest. With an empty
  anchor (free-text concepts) the two are the same. The right choice when the preset's anchors say what must stay.
- ``anchor`` (MUNBa / concept ablation): :math:`L_f = \| \epsilon_\theta(x_t, c_f) - \epsilon^*(x_t, c_a) \|^2`:
  the concept is mapped to a fixed substitute (the anchor's own image), the right choice when the user names one.
  Its x_t come from the forget prompt's own trajectories.
- ``substitute`` (replace the concept by its substitutes): ``anchored_esd``'s target with the substitute prompt
  :math:`c_s` as the reference, :math:`L_f = \| \epsilon_\theta(x_t, c_f) - [\epsilon^*(x_t, c_s) - \eta(\epsilon^*(x_t, c_f) - \epsilon^*(x_t, c_s))] \|^2`,
  on x_t drawn from the *substitute's own* trajectories. At :math:`\eta = 0` this is model-based concept ablation:
  the regression's optimum at each x_t is the denoiser of the substitutes' distribution, so the forget prompt draws
  the substitute's images; :math:`\eta > 0` also pushes away from the concept. When a forget prompt has several
  substitutes (the preset's ``substitutes``, one row per pair), the optimum is the denoiser of their mixture: the
  concept is replaced by each in turn, not by one fixed substitute. Substitutes must not contain the concept ("a
  circle" draws red circles too), which is why the demo colours name the other colours.
- preservation: :math:`L_r = \| \epsilon_\theta(x_t, c_r) - \epsilon^*(x_t, c_r) \|^2`

All are means over elements (``F.mse_loss``); targets are constants (computed without gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FORGET_LOSSES = ("esd", "anchored_esd", "anchor", "substitute")
GUIDED_LOSSES = ("esd", "anchored_esd", "substitute")  # targets formed by negative guidance


def esd_target(eps_reference: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """Negative-guidance target :math:`\\epsilon^*(r) - \\eta(\\epsilon^*(c_f) - \\epsilon^*(r))`, with the
    reference prompt :math:`r` the empty prompt (``esd``) or the anchor (``anchored_esd``)."""
    return eps_reference - eta * (eps_concept - eps_reference)


def forget_loss(eps_student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the LoRA model's prediction for a forget prompt to its (constant) target."""
    return F.mse_loss(eps_student.float(), target.detach().float())


def preservation_loss(eps_student: torch.Tensor, eps_frozen: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the LoRA model's prediction to the frozen model's on a preservation prompt."""
    return F.mse_loss(eps_student.float(), eps_frozen.detach().float())
