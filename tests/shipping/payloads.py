"""A pickle payload with a visible side effect: unpickling it writes the file `marker`."""

import io
import subprocess
import sys

import torch


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


def pickled(marker) -> bytes:
    """`torch.save` bytes (a zip with a pickle inside) whose loading runs the payload."""
    buffer = io.BytesIO()
    torch.save((Payload(marker),), buffer)
    return buffer.getvalue()


def run_in_subprocess(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a control: show that plain loading runs the payload)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
