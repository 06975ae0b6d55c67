"""Runtime values (`$name`) read from a call's TensorDict."""

from __future__ import annotations

from tensordict import NonTensorData, TensorDictBase, is_non_tensor

from tdhook_fx.errors import BindingError


def runtime_entry(td: TensorDictBase, name: str):
    """The runtime value `$name` a TensorDict holds: a tensor entry (per example when it has the
    batch dimensions), or a non-tensor entry (`td.set_non_tensor("pos", 3)`, a `NonTensorData`):
    one value for the whole call, such as a position, a scale or a function, which a tensor entry
    cannot be (tensordict wants the batch dimensions in front of every tensor)."""
    value = td.get(name, None)
    if value is None or not is_non_tensor(value):
        return value
    if isinstance(value, NonTensorData):
        return value.data
    rows = _flatten(value.tolist())  # a NonTensorStack: one entry per row, e.g. after torch.stack
    if any(row is not rows[0] and not _same(row, rows[0]) for row in rows):
        raise BindingError(
            f"${name} is a non-tensor entry that differs between the rows of the TensorDict; a non-tensor "
            "runtime value is one value for the whole call\n"
            f"  hint: per-example values are tensors with the batch dimensions in front (td[{name!r}] = "
            "torch.tensor([...])); one value per call: td.set_non_tensor(name, value) or cm(td, name=value)"
        )
    return rows[0]


def _flatten(rows) -> list:
    flat, stack = [], [rows]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # tensors of several elements, objects without ==
        return False
