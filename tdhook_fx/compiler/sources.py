"""The source text torch.fx keeps for each forward it generates, forgotten when no longer needed.

fx stores the Python source of every generated forward in a process-wide cache (and a lazy
`linecache` entry, so that tracebacks show the lines), and never removes it: about 200 KB per
GPT-2 compile, since a capture by torch.export generates dozens of graph modules it throws away.
`generated_code(keep)` wraps code that makes graph modules: when it ends, the sources made
meanwhile are forgotten, except those of the modules in `keep`, which are forgotten when each
module is freed. (Sources another thread's fx code makes during the same time are forgotten as
well: their tracebacks show no source lines; nothing else depends on them.)
"""

from __future__ import annotations

import linecache
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import fx
from torch.fx import graph_module as _fx_graph_module

_PREFIX = "<eval_with_key>."


@contextmanager
def generated_code(keep: list[fx.GraphModule]) -> Iterator[list[fx.GraphModule]]:
    """Forget the sources generated inside the block, but those of the modules put in `keep`."""
    loader = getattr(_fx_graph_module, "_loader", None)
    start = getattr(loader, "next_id", None)
    try:
        yield keep
    finally:
        if isinstance(start, int):
            kept = {_key_of(module) for module in keep}
            made = {f"{_PREFIX}{i}" for i in range(start, loader.next_id)}
            # a copy (one step under the GIL): other threads' fx code adds entries meanwhile
            for key in [k for k in loader.eval_cache.copy() if _base(k) in made and k not in kept]:
                _forget(key)
            for module, key in zip(keep, map(_key_of, keep)):
                if key is not None and _base(key) in made:
                    weakref.finalize(module, _forget, key)


def _key_of(module: fx.GraphModule) -> str | None:
    code = getattr(type(module).forward, "__code__", None)
    return code.co_filename if code is not None else None


def _base(key: str) -> str:
    return key.split(" ", 1)[0]


def _forget(key: str) -> None:
    loader = getattr(_fx_graph_module, "_loader", None)
    if loader is not None:
        loader.eval_cache.pop(key, None)
    linecache.cache.pop(key, None)
