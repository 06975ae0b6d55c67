"""Functions that rewritten graphs call (each appears as one readable node in `.code`).

They are plain, traceable torch code: torch.compile and torch.export trace through them.
"""

from __future__ import annotations

import warnings

import torch

from tdhook_fx.compiler.passes.masks import magnitude_mask
from tdhook_fx.compiler.shapes import broadcasts_to
from tdhook_fx.errors import BindingError, LayoutWarning


FITTED_SIGNATURES = 4096  # (value shape, site shape, dtypes) that passed `fit` silently; then forgotten at once
_FITTED: set[tuple] = set()


def fit(value: torch.Tensor, like: torch.Tensor, statement: str, site: str) -> torch.Tensor:
    """`value` checked to broadcast to `like` (the site's value) and cast to its dtype and device.

    A floating-point value is refused at an integer site (the cast would cut its fractions off,
    as a constant such as 3.9 is refused when compiling). A value of lower rank whose first size
    equals the site's first (the batch) size gets a `LayoutWarning` (eagerly; torch.compile
    traces without it): torch's broadcasting aligns it with the site's last dimensions, not with
    the batch, so a per-example value of shape (B,) would be added along the features.
    Eagerly, a signature (shapes and dtypes) that passed without a warning is not checked again.
    """
    eager = not torch.compiler.is_compiling()
    if eager and (value.shape, like.shape, value.dtype, like.dtype) in _FITTED:  # checked before, silently
        return value if value.dtype == like.dtype and value.device == like.device else value.to(like.device, like.dtype)
    # Compare ranks first: comparing shapes of different ranks element-wise would compare a
    # batch size with a feature width, a shape guard torch.compile/torch.export would keep.
    same = value.dim() == like.dim() and value.shape == like.shape
    if not same and value.dim() > 0 and not broadcasts_to(value.shape, like.shape):
        raise BindingError(
            f"{statement}: a runtime value of shape {tuple(value.shape)} does not fit "
            f"{site}, of shape {tuple(like.shape)} in this call\n"
            "  hint: the value must broadcast to the site by torch's rules; for a per-example "
            "vector at a (batch, seq, dim) site use shape (batch, 1, dim)"
        )
    if _is_real(value.dtype) and not _is_real(like.dtype):
        raise BindingError(
            f"{statement}: a runtime value of dtype {_name(value.dtype)} cannot go into {site}, which "
            f"holds {_name(like.dtype)} values: the cast would cut its fractions off\n"
            "  hint: pass whole numbers as an integer tensor (value.round().long())"
        )
    warned = not same and 0 < value.dim() < like.dim() and eager and _warn_if_batch_like(value, like, statement, site)
    if eager and not warned:  # the checks depend on shapes and dtypes only: once per signature
        if len(_FITTED) >= FITTED_SIGNATURES:
            _FITTED.clear()
        _FITTED.add((value.shape, like.shape, value.dtype, like.dtype))
    return value if value.dtype == like.dtype and value.device == like.device else value.to(like.device, like.dtype)


def _is_real(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _warn_if_batch_like(value: torch.Tensor, like: torch.Tensor, statement: str, site: str) -> bool:
    """Warn (and return True) if `value`'s first size is the site's batch size."""
    batch = like.shape[0]
    if batch > 1 and value.shape[0] == batch:
        per_example = (batch, *([1] * (like.dim() - value.dim())), *value.shape[1:])
        warnings.warn(
            f"{statement}: a runtime value of shape {tuple(value.shape)} at {site}, of shape "
            f"{tuple(like.shape)}, broadcasts along the site's last {value.dim()} dimension(s), not "
            f"along the batch, although its first size is the batch size {batch}\n"
            f"  hint: for one value per example give it shape {per_example}; for a value shared by the "
            f"batch give it the site's rank: shape {(1,) * (like.dim() - value.dim()) + tuple(value.shape)}",
            LayoutWarning,
            stacklevel=2,
        )
        return True
    return False


def call(function, *args) -> torch.Tensor:
    """Call a Python function bound as a runtime value (`$f(...)` in a program).

    The function gets its own copies of the tensors: one that changes its input in place
    changes nothing else (a value saved earlier at the site, the model's own later uses).
    """
    result = function(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    if not isinstance(result, torch.Tensor):
        name = getattr(function, "__name__", type(function).__name__)
        raise BindingError(f"the function {name} bound in the program returned a {type(result).__name__}, not a tensor")
    return result


def filled(like: torch.Tensor, value) -> torch.Tensor:
    """A new tensor shaped like `like`, every element set from `value` (broadcast)."""
    return torch.empty_like(like).copy_(value)


def assign(x: torch.Tensor, index: tuple, value, where: str | None = None) -> torch.Tensor:
    """`x` with `x[index] = value`, without changing `x`. (`where`: the statement, for errors.)"""
    out = x.clone()
    _put(out, index, value, where)
    return out


def steer_at(x: torch.Tensor, index: tuple, op: str, value, where: str | None = None) -> torch.Tensor:
    """`x` with `x[index] += value` (or -=, *=), without changing `x`."""
    out = x.clone()
    part = region(x, index, where)  # read from x, not out: writing out[index] must not change what backward saved
    _put(out, index, part + value if op == "+=" else part - value if op == "-=" else part * value)
    return out


def region(x: torch.Tensor, index: tuple, where: str | None = None) -> torch.Tensor:
    """`x[index]`, reading integer tensors in the index (runtime positions, `$pos`) as tensors.

    Python indexing turns a 0-dim integer tensor into a Python number, which torch.compile
    bakes into the graph: every new position would recompile. Here such an index goes to
    `aten.index` as a tensor instead (the same values), so it stays a graph input.
    Runtime positions and slice bounds are checked first (`where` names the statement).
    """
    basic, tensors = _split_index(x, index, where)
    if tensors is None:
        return x[index]
    return torch.ops.aten.index.Tensor(x[basic], tensors)


def _put(out: torch.Tensor, index: tuple, value, where: str | None = None) -> None:
    """`out[index] = value` in place, with integer tensors in the index read as in `region`."""
    basic, tensors = _split_index(out, index, where)
    if tensors is None:
        out[index] = value
        return
    value = torch.as_tensor(value, dtype=out.dtype, device=out.device)
    torch.ops.aten.index_put_(out[basic], tensors, value)  # out[basic] is a view: this writes into out


def _split_index(x: torch.Tensor, index: tuple, where: str | None = None) -> tuple[tuple, list | None]:
    """`index` as a basic index (ints, slices) and the tensor indices that follow it.

    `x[index] == aten.index(x[basic], tensors)`: each tensor item becomes a full slice in
    `basic` and takes its place in `tensors` (None for the other dimensions that remain), as
    Python's own indexing does it. `(index, None)` when there are no tensors in the index.
    """
    _check_runtime_index(x, index, where)
    if not any(isinstance(item, torch.Tensor) for item in index):
        return index, None
    items = list(index)
    for at, item in enumerate(items):
        if item is Ellipsis:
            items[at : at + 1] = [slice(None)] * (x.dim() - (len(items) - 1))
            break
    basic, tensors = [], []
    for item in items:
        if isinstance(item, torch.Tensor):
            basic.append(slice(None))
            tensors.append(item)
        elif isinstance(item, int):
            basic.append(item)  # removes its dimension
        else:
            basic.append(item)
            tensors.append(None)
    while tensors and tensors[-1] is None:
        tensors.pop()
    return tuple(basic), tensors


def _check_runtime_index(x: torch.Tensor, index: tuple, where: str | None) -> None:
    """Runtime positions (`[:, $pos]`) must be integers within their dimension, runtime slice
    bounds (`[$a:$b:$step]`) single integers and steps positive; a `BindingError` says which.

    The values are checked eagerly; while torch.compile traces only the dtypes are (its kernels
    check the range themselves), so that no position becomes part of a guard.
    """
    prefix = f"{where}: " if where else ""
    after_ellipsis = False
    for entry, item in enumerate(index, start=1):
        if item is Ellipsis:
            after_ellipsis = True
        elif isinstance(item, torch.Tensor):
            dim = entry - 1 - len(index) if after_ellipsis else entry - 1
            _check_position(x, item, dim, f"{prefix}index entry {entry}")
        elif isinstance(item, slice):
            for part, bound in zip(("start", "stop", "step"), (item.start, item.stop, item.step)):
                if isinstance(bound, torch.Tensor):
                    _check_bound(bound, part, f"{prefix}the {part} of the slice in index entry {entry}")


def _check_position(x: torch.Tensor, position: torch.Tensor, dim: int, label: str) -> None:
    if position.dtype == torch.bool or _is_real(position.dtype):
        raise BindingError(
            f"{label} is a runtime position of dtype {_name(position.dtype)}; positions are integers\n"
            "  hint: pass an integer tensor or a Python int (torch.tensor(3), 3)"
        )
    if torch.compiler.is_compiling() or position.numel() == 0:
        return
    size = x.shape[dim]
    outside = (position < -size) | (position >= size)
    if outside.any():
        value = int(position[outside].flatten()[0])
        raise BindingError(
            f"{label} is a runtime position {value}, out of range for dimension {dim % x.dim()}, of size {size}, "
            f"in this call\n  hint: positions lie from {-size} to {size - 1} (negative ones count from the end)"
        )


def _check_bound(bound: torch.Tensor, part: str, label: str) -> None:
    if bound.dim() != 0 or bound.dtype == torch.bool or _is_real(bound.dtype):
        raise BindingError(
            f"{label} is a runtime value of shape {tuple(bound.shape)} and dtype {_name(bound.dtype)}; "
            "a slice bound is one integer\n  hint: pass a Python int or a 0-dim integer tensor (torch.tensor(3))"
        )
    if part == "step" and not torch.compiler.is_compiling() and int(bound) <= 0:
        raise BindingError(
            f"{label} is {int(bound)}; torch indexes tensors with positive steps only\n"
            "  hint: pass a step of 1 or more"
        )


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over the batch (dimension 0), kept as a dimension of size 1."""
    return x.mean(0, keepdim=True)


def importance_mask(scores: torch.Tensor, weight: torch.Tensor, amount: int | float, dim: int | None) -> torch.Tensor:
    """A pruning mask for `weight` that zeroes the entries (or slices) with the lowest |scores|."""
    if scores.shape != weight.shape:
        raise BindingError(
            f"importance scores of shape {tuple(scores.shape)} do not match the pruned weight "
            f"of shape {tuple(weight.shape)}"
        )
    return magnitude_mask(scores.detach(), amount, dim).to(weight.dtype)


def receive_grad(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`x + delta`, where `delta` is a zero graph input: d(target)/d(delta) is the gradient at x.

    Without gradients the caller passes a zero that needs no gradient and `x` comes back as it
    is (`save grad`). (A 0-dim delta may be a real one: the gradient of a single element.)
    """
    return x + delta.to(x.dtype) if delta.requires_grad else x


def receive_grad_at(x: torch.Tensor, index: tuple, delta: torch.Tensor, where: str | None = None) -> torch.Tensor:
    """`x` with `delta` added to `x[index]` (`save grad SITE[INDEX]`), without changing `x`."""
    if not delta.requires_grad:
        return x
    out = x.clone()
    _put(out, index, region(x, index, where) + delta.to(x.dtype))
    return out


class OverrideGrad(torch.autograd.Function):
    """Identity forward; backward returns `rule(grad, *operands)` (operands get no gradient)."""

    @staticmethod
    def forward(ctx, x, rule, copy, *operands):
        ctx.rule = rule
        ctx.is_tensor = tuple(isinstance(o, torch.Tensor) for o in operands)
        ctx.others = tuple(o for o in operands if not isinstance(o, torch.Tensor))
        ctx.save_for_backward(*(o for o in operands if isinstance(o, torch.Tensor)))
        return x.clone() if copy else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        tensors, others = iter(ctx.saved_tensors), iter(ctx.others)
        operands = [next(tensors) if is_tensor else next(others) for is_tensor in ctx.is_tensor]
        return (ctx.rule(grad, *operands), None, None, *(None for _ in operands))


def override_grad(x: torch.Tensor, override, *operands) -> torch.Tensor:
    """`x` unchanged; its gradient is replaced by `override.rule(grad, *operands)` (`set grad`)."""
    return OverrideGrad.apply(x, override.rule, override.copy, *operands)
