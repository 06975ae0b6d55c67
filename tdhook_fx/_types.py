"""tdhook's TensorDict key helpers (`tdhook._types`), for code that imports them from there."""

from __future__ import annotations

from tensordict import TensorDictBase

from tdhook_fx.errors import InvalidArgumentType


def is_nested_key(value: object) -> bool:
    """Whether `value` is a TensorDict key: a string or a non-empty tuple of strings."""
    return isinstance(value, str) or (
        isinstance(value, tuple) and bool(value) and all(isinstance(part, str) for part in value)
    )


def append_key_suffix(key, suffix: str):
    """`key` with `suffix` added to its last part: ("a", "b") + "_x" -> ("a", "b_x")."""
    if not is_nested_key(key):
        raise InvalidArgumentType("key must be a string or non-empty tuple of strings")
    if not isinstance(suffix, str):
        raise InvalidArgumentType("suffix must be a string")
    return f"{key}{suffix}" if isinstance(key, str) else (*key[:-1], f"{key[-1]}{suffix}")


def join_keys(prefix, key) -> tuple[str, ...]:
    """One flat tuple key from two keys: ("a", "b") and "c" -> ("a", "b", "c")."""
    if not is_nested_key(prefix) or not is_nested_key(key):
        raise InvalidArgumentType("prefix and key must be strings or non-empty tuples of strings")
    return (*_parts(prefix), *_parts(key))


def _parts(key) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else tuple(key)


def tensor_leaf_items(data: TensorDictBase):
    """(nested key, value) for every leaf of `data` that is not itself a TensorDict."""
    return (
        (key, value)
        for key, value in data.items(include_nested=True, leaves_only=False)
        if not isinstance(value, TensorDictBase)
    )
