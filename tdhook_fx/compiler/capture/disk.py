"""The persistent capture cache: a capture made in an earlier process, read back in milliseconds.

Capturing a transformer takes seconds (torch.export). A capture is stored, as JSON written
only by tdhook_fx (`stored_graph`: the graph's nodes, never a weight, never pickle or code),
in `$XDG_CACHE_HOME/tdhook_fx/captures` (`~/.cache/...` by default; `TDHOOK_FX_CAPTURE_CACHE_DIR`
names another folder), under a name hashed from everything the capture depends on
(`fingerprint.entry_name`). `TDHOOK_FX_CAPTURE_CACHE=0` turns it off; `tdhook-fx cache info` / `tdhook-fx cache clear` show and empty it.

A stored entry is hostile like any file. Each is signed with a key of the user's own
(`key` in the folder, 32 random bytes, mode 0600; the folder must be the user's and not
writable by others, else the cache is not used): an entry that tdhook_fx did not write with
that key, or that was changed since, is ignored before it is parsed. A signed entry is still
bounded in size and nesting before it is parsed, rebuilt only through `stored_graph`'s
allow-list, and used only once the rebuilt graph reproduces the eager model's outputs and
sites on the example (the caller checks that: it is what catches a key that misses something
the capture depends on). Whatever fails is ignored and written anew by the capture that
follows. Someone who can read the key can write as the user anyway (site-packages included):
the signature keeps out other users, other machines' caches and damaged files, not the user.

The folder holds at most `MAX_TOTAL` bytes of entries (the least recently used go first), and
temporary files a crashed writer left behind are removed after an hour.
"""

from __future__ import annotations

import gc
import hmac
import json
import os
import secrets
import stat
import tempfile
import time
from contextlib import contextmanager, suppress
from hashlib import sha256
from pathlib import Path

from torch import fx, nn

from tdhook_fx.compiler.capture import stored_graph
from tdhook_fx.compiler.capture.export import SHAPE_GUARDS
from tdhook_fx.compiler.capture.fingerprint import FORMAT
from tdhook_fx.compiler.capture.taps import SiteKey
from tdhook_fx.errors import StoredGraphInvalid

ENVIRONMENT = "TDHOOK_FX_CAPTURE_CACHE"  # "0": no persistent capture cache
FOLDER = "TDHOOK_FX_CAPTURE_CACHE_DIR"  # another folder for it (the tests use their own)
MAX_BYTES = 64 << 20  # one entry
MAX_TOTAL = 512 << 20  # all entries (GPT-2 small's is 0.65 MB)
MAX_DEPTH = 48  # JSON nesting (a node's arguments are lists of lists, a few deep)
STALE_SECONDS = 3600  # a temporary file this old was left by a writer that died
KEY = "key"
SUFFIX = ".json"
TEMPORARY = ".tmp-"
SIGNATURE = 64  # hex digits of the HMAC-SHA256 that starts an entry (then a newline, then the JSON)


def enabled() -> bool:
    return os.environ.get(ENVIRONMENT, "1").strip() != "0"


def directory() -> Path:
    """`$TDHOOK_FX_CAPTURE_CACHE_DIR` if set, else `$XDG_CACHE_HOME/tdhook_fx/captures`."""
    if os.environ.get(FOLDER):
        return Path(os.environ[FOLDER])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tdhook_fx" / "captures"


# ---- entries ----------------------------------------------------------------------------------


def save(name: str, graph_module: fx.GraphModule, frontend: str, site_keys: dict[str, SiteKey]) -> bool:
    """Store a capture under `name` (atomically: a reader sees the old entry or the new one);
    False when its graph is outside the stored format or the folder cannot be used."""
    guards = graph_module.meta.get(SHAPE_GUARDS) if frontend == "export" else []
    graph = stored_graph.encode(graph_module, guards)
    if graph is None:
        return False
    value = {
        "format": FORMAT,
        "frontend": frontend,
        "graph": graph,
        "sites": [[k.name, k.module, k.call, k.kind, k.item] for k in site_keys.values()],
    }
    body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    return len(body) <= MAX_BYTES and _write(name, body)


def _write(name: str, body: bytes) -> bool:
    folder = directory()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = _key(folder, create=True)
        if key is None:
            return False
        _replace(folder, f"{name}{SUFFIX}", _signature(key, name, body).encode() + b"\n" + body)
        _tidy(folder)
    except OSError:
        return False
    return True


def load(name: str, model: nn.Module) -> tuple[fx.GraphModule, str, dict[str, SiteKey]] | None:
    """The capture stored under `name`, rebuilt on `model`: (graph module, front end, site keys),
    or None where there is none or it is not valid (never raises for the entry's contents)."""
    folder = directory()
    path = folder / f"{name}{SUFFIX}"
    try:
        key = _key(folder, create=False)
        if key is None:
            return None
        with open(path, "rb") as file:
            raw = file.read(SIGNATURE + 1 + MAX_BYTES + 1)
        signature, body = raw[:SIGNATURE], raw[SIGNATURE + 1 :]
        if raw[SIGNATURE : SIGNATURE + 1] != b"\n" or not hmac.compare_digest(signature, _signature(key, name, body).encode()):
            return None  # not written by tdhook_fx with this user's key, or changed since
    except OSError:
        return None
    with suppress(OSError):  # (a folder that cannot be written is still read)
        os.utime(path)  # used: the last to be evicted
    try:
        with _collection_paused():
            value = parse(body)
            if not isinstance(value, dict) or set(value) != {"format", "frontend", "graph", "sites"}:
                raise StoredGraphInvalid("not a stored capture")
            if value["format"] != FORMAT or value["frontend"] not in ("fx", "export"):
                raise StoredGraphInvalid("another format or front end")
            sites = _sites(value["sites"])
            graph_module = stored_graph.decode(value["graph"], model)
    except (StoredGraphInvalid, RecursionError):
        return None
    return graph_module, value["frontend"], sites


def _signature(key: bytes, name: str, body: bytes) -> str:
    """HMAC-SHA256 of the entry's name and contents (an entry moved to another name fails)."""
    return hmac.new(key, name.encode() + b"\n" + body, sha256).hexdigest()


@contextmanager
def _collection_paused():
    """No garbage collection while an entry is read: its hundred thousand small JSON values
    trigger full collections over the whole heap (the model's, the user's), which took 0.25 s of
    a 0.35 s read of GPT-2 small. The values form no cycles; the next collection has them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse(raw: bytes):
    """JSON from `raw`, refused (`StoredGraphInvalid`) when too long, not UTF-8, nested deeper
    than `MAX_DEPTH` (counted before parsing) or holding NaN or infinities."""
    if len(raw) > MAX_BYTES:
        raise StoredGraphInvalid("too long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StoredGraphInvalid("not UTF-8") from None
    if _depth(text) > MAX_DEPTH:
        raise StoredGraphInvalid("nested too deeply")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError:
        raise StoredGraphInvalid("not JSON") from None


def _no_constant(name: str):
    raise StoredGraphInvalid(f"{name} in JSON")


def _depth(text: str) -> int:
    """The deepest nesting of brackets outside strings (JSON's strings escape quotes as \\")."""
    deepest = depth = 0
    inside = escaped = False
    for char in text:
        if inside:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                inside = False
        elif char == '"':
            inside = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _sites(value) -> dict[str, SiteKey]:
    if not isinstance(value, list) or len(value) > stored_graph.MAX_NODES:
        raise StoredGraphInvalid("bad site list")
    keys = {}
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 5):
            raise StoredGraphInvalid("bad site")
        name, module, call, kind, item = entry
        valid = (
            isinstance(name, str) and isinstance(module, str) and type(call) is int and call >= 0
            and kind in ("in", "out") and (item is None or type(item) in (int, str))
        )
        key = SiteKey(module, call, kind, item) if valid else None
        if key is None or key.name != name:
            raise StoredGraphInvalid("bad site")
        keys[name] = key
    return keys


# ---- the signing key and the folder ----------------------------------------------------------------


def _key(folder: Path, create: bool) -> bytes | None:
    """The user's signing key (made when `create` and missing or unsafe), or None where the
    folder or the key is not the user's alone."""
    if not _private(folder):
        return None
    path = folder / KEY
    key = _read_key(path)
    if key is not None or not create:
        return key
    if not path.exists():  # the first key: made once, even by processes starting together
        try:
            _replace(folder, KEY, secrets.token_bytes(SIGNATURE // 2).hex().encode(), exclusive=True)
        except FileExistsError:
            pass
    key = _read_key(path)  # whoever's link came first
    if key is None:  # what others could read or write signs nothing: a new key (old entries fail)
        key = secrets.token_bytes(SIGNATURE // 2)
        _replace(folder, KEY, key.hex().encode())
    return key


def _read_key(path: Path) -> bytes | None:
    """The key in `path` if it is a regular file of this user that nobody else can read."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:  # none, or a link
        return None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        text = file.read(SIGNATURE + 1)
    safe = stat.S_ISREG(info.st_mode) and _owned(info) and not info.st_mode & 0o077
    if safe and len(text) == SIGNATURE and all(c in b"0123456789abcdef" for c in text):
        return bytes.fromhex(text.decode())
    return None


def _private(folder: Path) -> bool:
    """Whether `folder` is a folder of this user that nobody else can write into."""
    try:
        info = os.stat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and _owned(info) and not info.st_mode & 0o022


def _owned(info: os.stat_result) -> bool:
    return not hasattr(os, "getuid") or info.st_uid == os.getuid()


def _replace(folder: Path, name: str, data: bytes, exclusive: bool = False) -> None:
    """Write `folder/name` atomically, readable by the user alone (a temporary file made with
    mode 0600, then renamed over the old one; `exclusive`: linked, FileExistsError if there is one)."""
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        if exclusive:
            os.link(temporary, folder / name)
        else:
            os.replace(temporary, folder / name)
    finally:
        Path(temporary).unlink(missing_ok=True)


# ---- housekeeping -----------------------------------------------------------------------------


def _tidy(folder: Path) -> None:
    """Remove temporary files left by dead writers, then the least recently used entries
    beyond `MAX_TOTAL` bytes (other processes may remove files meanwhile: never an error)."""
    now = time.time()
    sized = []
    for item in _listing(folder):
        try:
            facts = item.stat(follow_symlinks=False)
        except OSError:
            continue
        if item.name.startswith(TEMPORARY) and now - facts.st_mtime > STALE_SECONDS:
            Path(item.path).unlink(missing_ok=True)
        elif _is_entry(item):
            sized.append((facts.st_mtime, facts.st_size, item.path))
    total = 0
    for _, size, path in sorted(sized, reverse=True):  # the most recently used first: kept while they fit
        total += size
        if total > MAX_TOTAL:
            Path(path).unlink(missing_ok=True)


def _listing(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as found:
            return list(found)
    except OSError:
        return []


def _is_entry(item: os.DirEntry) -> bool:
    return item.name.endswith(SUFFIX) and len(item.name) == 64 + len(SUFFIX) and item.is_file(follow_symlinks=False)


def info() -> dict:
    """Where the cache is, whether it is on, and how many entries and bytes it holds."""
    folder = directory()
    entries = [item for item in _listing(folder) if _is_entry(item)]
    return {
        "folder": str(folder),
        "enabled": enabled(),
        "usable": _private(folder) or not folder.exists(),
        "entries": len(entries),
        "bytes": sum(e.stat().st_size for e in entries),
        "limit": MAX_TOTAL,
    }


def clear() -> int:
    """Remove every entry, the signing key and temporary files; returns the entries removed."""
    folder = directory()
    removed = 0
    for item in _listing(folder):
        if _is_entry(item) or item.name.startswith(TEMPORARY) or item.name == KEY:
            Path(item.path).unlink(missing_ok=True)
            removed += _is_entry(item)
    return removed
