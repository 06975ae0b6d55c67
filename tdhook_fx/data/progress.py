"""Progress bars (tqdm, the `progress` extra) for long runs: collect and sweeps."""

from __future__ import annotations

import contextlib

from tdhook_fx.errors import TdhookFxError


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def progress_bar(shown: bool, asked: bool | None, **tqdm_options):
    """A tqdm bar with `tqdm_options` when `shown`, else one that does nothing. Without tqdm
    installed, a bar the user asked for (`asked=True`) is an error; a default one is left out."""
    if not shown:
        yield _NoBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if asked:
            raise TdhookFxError("progress=True needs tqdm\n  hint: pip install tqdm") from None
        yield _NoBar()
        return
    with tqdm(**tqdm_options) as bar:
        yield bar
