"""Plain-tensor calls of a hooked module, as tdhook's: tensors in, the model's outputs out.

tdhook's hooked module hands plain arguments to a `TensorDictModule`, whose `dispatch` puts
positional tensors at the `in_keys` in order (keywords by key name, nested keys joined with
"_") in a TensorDict of batch size `[]`, runs, and returns the entries at the model's
`out_keys`: one tensor, or a tuple. `hooked(torch.randn(10))` does the same here; what the
method writes besides (a cache, attributions) stays where the method puts it (the context's
cache, the probes).
"""

from __future__ import annotations

from tensordict import TensorDict, TensorDictBase

from tdhook_fx.compiler.capture import key_name
from tdhook_fx.errors import InvalidArgumentType, MissingInputKey


def is_plain_call(args: tuple, kwargs: dict) -> bool:
    """Whether a call passes tensors (or keywords) rather than one TensorDict."""
    if args:
        return not isinstance(args[0], TensorDictBase)
    return not isinstance(kwargs.get("tensordict"), TensorDictBase)


def as_tensordict(in_keys, args: tuple, kwargs: dict) -> TensorDictBase:
    """The TensorDict (batch size `[]`) that tdhook's `dispatch` builds from plain arguments."""
    values = {}
    remaining = list(args)
    kwargs = dict(kwargs)
    for key in in_keys:
        name = "_".join(key) if isinstance(key, tuple) else key
        if remaining:
            if name in kwargs:
                raise InvalidArgumentType(f"{key_name(key)!r} is given both by position and by keyword")
            values[key] = remaining.pop(0)
        elif name in kwargs:
            values[key] = kwargs.pop(name)
    if remaining:
        raise InvalidArgumentType(
            f"{len(args)} positional inputs given, but the module reads {len(in_keys)}: "
            f"{[key_name(k) for k in in_keys]}"
        )
    if kwargs:
        raise MissingInputKey(
            f"unknown keyword input(s) {sorted(kwargs)}; the module reads {[key_name(k) for k in in_keys]}"
        )
    td = TensorDict({}, batch_size=[])
    for key, value in values.items():
        td.set(key, value)
    return td


def plain_outputs(td: TensorDictBase, out_keys):
    """The model's outputs in `td`: one value, or a tuple in `out_keys` order."""
    found = tuple(td.get(key, None) for key in out_keys)
    return found[0] if len(found) == 1 else found
