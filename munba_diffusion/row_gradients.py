r"""Per-group gradients of Linear and Conv2d weights from one backward pass over all groups' rows.

A batch of ``N`` rows is split into consecutive groups (one per player): rows ``[a_k, b_k)`` belong to group ``k``.
When each group's loss ``L_k`` depends only on its own rows (every row passes the network on its own, as in a UNet:
group norm, attention and convolutions never mix rows), one backward of ``sum_k L_k`` gives every row ``n`` of a
layer's output the gradient ``g_n = dL_k / dy_n`` of its own group's loss. For a Linear layer ``y = x W^T + b`` the
weight gradient is a sum of per-row terms, so group ``k``'s gradient is the same contraction restricted to its rows:

.. math::

    \nabla_W L_k = \sum_{n=a_k}^{b_k - 1} \sum_t g_{n,t}\, x_{n,t}^\top, \qquad
    \nabla_b L_k = \sum_{n=a_k}^{b_k - 1} \sum_t g_{n,t},

(``t`` runs over tokens or pixels); for a Conv2d the same holds with ``x`` unfolded, computed by the convolution's
own weight-gradient kernel on the group's rows. This is the per-sample-gradient technique of Opacus and
``torch.func`` (input times output gradient, per row) summed per group instead of kept per row: ``K`` products over
the groups' rows cost what the ordinary backward's one product over all rows costs, and nothing of the size of a
per-sample gradient is ever held. For a LoRA layer (``lora_B(lora_A(x)) * s``) both factors are such layers.

:class:`RowGroupGradients` applies it to the trained parameters of a module. While it is active, every Linear or
Conv2d (exact classes, zero padding) that owns trained parameters computes group ``k``'s rows with
``W + Delta_k`` (and ``b + delta_k``), where ``Delta`` is a zero tensor of shape ``(K, *W.shape)`` that requires
grad: the output is unchanged, and autograd's gradient of ``Delta_k`` is exactly the sum above. With groups of
equal size a Linear runs as one batched product (``torch.bmm`` over ``(K, rows/K * tokens, in)``); a Conv2d runs
one convolution per group. One ``torch.autograd.grad`` over the ``Delta`` tensors then returns every group's
gradient, computed by autograd's own kernels (no Python in the backward), and the parameters' own ``.grad`` is
never touched. Gradient checkpointing (non-reentrant: the forward runs again inside the backward) recomputes the
same ``W + Delta_k``, so each group's gradient is counted once.

A parameter it cannot handle is left to the caller (``fallback``): one that is not the weight or bias of such a
layer, one owned by two modules, and (found during the forward) that of a layer called on a tensor whose first
dimension is not the batch's ``N`` rows (the rows could not be told apart there).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_KINDS = (nn.Linear, nn.Conv2d)


class _Tap:
    """One layer's trained weight and bias (indices among the trained parameters) and, while rows are grouped,
    their per-group offsets: zeros of shape ``(K, *param.shape)`` added to the parameter in the forward, so that
    autograd's gradient of offset ``k`` is group ``k``'s gradient of the parameter."""

    __slots__ = ("weight", "bias", "weight_offset", "bias_offset")

    def __init__(self, weight: int | None, bias: int | None) -> None:
        self.weight, self.bias = weight, bias
        self.weight_offset: torch.Tensor | None = None
        self.bias_offset: torch.Tensor | None = None

    def start(self, params: list[torch.nn.Parameter], groups: int) -> None:
        def zeros(index: int | None) -> torch.Tensor | None:
            if index is None:
                return None
            p = params[index]
            return torch.zeros((groups, *p.shape), dtype=p.dtype, device=p.device, requires_grad=True)

        self.weight_offset, self.bias_offset = zeros(self.weight), zeros(self.bias)

    def stop(self) -> None:
        self.weight_offset = self.bias_offset = None

    def offsets(self) -> list[tuple[int, torch.Tensor]]:
        return [(j, t) for j, t in ((self.weight, self.weight_offset), (self.bias, self.bias_offset)) if j is not None]


def _per_group(param: torch.Tensor | None, offset: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """``param + offset`` (``K x shape``), or the parameter repeated over the groups when it is not trained."""
    if param is None:
        return None
    return param.expand(groups, *param.shape) if offset is None else param + offset


def _applicable(module: nn.Module) -> bool:
    if type(module) not in _KINDS or "forward" in module.__dict__:  # a subclass or a wrapped forward: not ours
        return False
    return not isinstance(module, nn.Conv2d) or (module.padding_mode == "zeros" and not isinstance(module.padding, str))


class RowGroupGradients:
    """Per-group gradients of ``params`` from one forward and one backward over all groups' rows.

    ::

        grouped = RowGroupGradients(model, params)   # finds the layers once; reuse it for every batch
        with grouped.rows([3, 2]):                  # rows 0-2: group 0, rows 3-4: group 1
            losses = ...                      # one forward of model over the 5 rows; loss k from group k's rows only
            per_group = grouped.backward(losses[0] + losses[1])
        # per_group[k][j]: d losses[k] / d params[j]; None for params[j] in grouped.fallback

    Args:
        module: holds the layers that own ``params`` (e.g. the UNet with its LoRA adapter).
        params: the trained parameters.

    Attributes:
        fallback: names (``module.named_parameters`` names, else ``param<j>``) of the parameters the per-row
            contraction does not cover; known before the forward except for layers found to run on other than
            the batch's rows (complete after the forward).
    """

    def __init__(self, module: nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
        self.module = module
        self.params = list(params)
        self.rows_total = 0
        self.bounds: list[tuple[int, int]] = []
        self.equal_groups = False
        index = {id(p): j for j, p in enumerate(self.params)}
        names = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
        self._names = [names.get(id(p), f"param{j}") for j, p in enumerate(self.params)]
        owners: dict[int, list[nn.Module]] = {}
        for layer in module.modules():
            for p in layer._parameters.values():
                if p is not None and id(p) in index:
                    owners.setdefault(index[id(p)], []).append(layer)
        self._taps: dict[nn.Module, _Tap] = {}
        covered: set[int] = set()
        for layer in {id(m): m for ms in owners.values() for m in ms}.values():
            slots = {attr: index.get(id(p)) for attr, p in layer._parameters.items() if p is not None}
            trained = [j for j in slots.values() if j is not None]
            if not _applicable(layer) or any(len(owners[j]) > 1 for j in trained):
                continue
            self._taps[layer] = _Tap(slots.get("weight"), slots.get("bias"))
            covered.update(trained)
        self._uncovered = set(range(len(self.params))) - covered
        self._forwards = {layer: self._grouped_forward(layer, tap) for layer, tap in self._taps.items()}
        self._unbatched: set[nn.Module] = set()
        self._active = False

    @property
    def fallback(self) -> list[str]:
        return [self._names[j] for j in sorted(self._fallback_indices())]

    def _fallback_indices(self) -> set[int]:
        out = set(self._uncovered)
        for layer in self._unbatched:
            tap = self._taps[layer]
            out.update(j for j in (tap.weight, tap.bias) if j is not None)
        return out

    @contextmanager
    def rows(self, sizes: Sequence[int]) -> Iterator[RowGroupGradients]:
        """While active, the covered layers compute per-group gradients for a batch of ``sum(sizes)`` rows, group
        ``k`` being the ``sizes[k]`` rows after the first ``sizes[0] + ... + sizes[k-1]``; on exit the layers are
        themselves again."""
        if not sizes or any(int(s) < 1 for s in sizes):
            raise ValueError(f"every group needs at least one row; got sizes {list(sizes)}")
        if self._active:
            raise RuntimeError("RowGroupGradients.rows is already active")
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + int(size))
        self.rows_total = starts[-1]
        self.bounds = list(zip(starts[:-1], starts[1:]))
        self.equal_groups = len(set(sizes)) == 1
        for tap in self._taps.values():
            tap.start(self.params, len(self.bounds))
        # a layer whose forward was wrapped since (e.g. by accelerate's hooks) keeps it, and its parameters fall back
        self._unbatched = {layer for layer in self._taps if "forward" in layer.__dict__}
        replaced = [layer for layer in self._taps if layer not in self._unbatched]
        for layer in replaced:
            layer.__dict__["forward"] = self._forwards[layer]  # an instance attribute: nn.Module.__call__ finds it
        self._active = True
        try:
            yield self
        finally:
            for layer in replaced:
                layer.__dict__.pop("forward", None)
            for tap in self._taps.values():
                tap.stop()
            self._active = False

    def _grouped_forward(self, layer: nn.Module, tap: _Tap):
        original = type(layer).forward.__get__(layer)
        conv = isinstance(layer, nn.Conv2d)
        parameters = layer._parameters

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return original(x)
            if x.dim() < 2 or x.shape[0] != self.rows_total or layer in self._unbatched:
                self._unbatched.add(layer)  # its rows cannot be told apart: its parameters fall back
                return original(x)
            groups = len(self.bounds)
            weight = _per_group(parameters["weight"], tap.weight_offset, groups)
            bias = _per_group(parameters.get("bias"), tap.bias_offset, groups)
            if conv:
                return torch.cat(
                    [
                        F.conv2d(
                            x[a:b],
                            weight[k],
                            None if bias is None else bias[k],
                            layer.stride,
                            layer.padding,
                            layer.dilation,
                            layer.groups,
                        )
                        for k, (a, b) in enumerate(self.bounds)
                    ]
                )
            if not self.equal_groups:
                return torch.cat(
                    [
                        F.linear(x[a:b], weight[k], None if bias is None else bias[k])
                        for k, (a, b) in enumerate(self.bounds)
                    ]
                )
            rows = x.reshape(groups, -1, x.shape[-1])  # group k's rows and tokens: (K, rows/K * tokens, in)
            if bias is None:
                out = torch.bmm(rows, weight.transpose(1, 2))
            else:
                out = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
            return out.reshape(*x.shape[:-1], out.shape[-1])

        return forward

    def backward(self, loss: torch.Tensor) -> list[list[torch.Tensor | None]]:
        """One backward of ``loss`` (the sum of the groups' losses, any constant factors included), inside
        :meth:`rows` (gradient checkpointing runs the layers' forwards again during it); returns
        ``per_group[k][j]``: zeros where group ``k`` does not reach ``params[j]``, None for :attr:`fallback`."""
        if not self._active:
            raise RuntimeError("call RowGroupGradients.backward inside RowGroupGradients.rows")
        fallback = self._fallback_indices()
        offsets = [(j, t) for tap in self._taps.values() for j, t in tap.offsets() if j not in fallback]
        grads: list[torch.Tensor | None] = [None] * len(offsets)
        if loss.requires_grad and offsets:
            grads = list(torch.autograd.grad(loss, [t for _, t in offsets], allow_unused=True))
        sums: dict[int, torch.Tensor] = {j: g for (j, _), g in zip(offsets, grads) if g is not None}
        return [
            [
                None if j in fallback else (sums[j][k] if j in sums else torch.zeros_like(p))
                for j, p in enumerate(self.params)
            ]
            for k in range(len(self.bounds))
        ]
