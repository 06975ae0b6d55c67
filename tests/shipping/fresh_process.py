"""Run a .pt2 in a fresh Python process in which tdhook_fx and transformers cannot be imported.

Usage: python fresh_process.py ARCHIVE INPUTS OUTPUTS [BUFFER=VALUE ...]
INPUTS holds a torch.save'd tuple of tensors. OUTPUTS receives {"plain": outputs, "edited":
outputs after setting each BUFFER (e.g. runtime.alpha) to VALUE}, each output flattened to
{"logits": ..., "saved.NAME": ...}. Exits 3 if a blocked package got imported anyway.
"""

import sys

BLOCKED = ("tdhook_fx", "transformers")


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} must not be needed to load a standalone .pt2")


sys.meta_path.insert(0, _Blocker())

import torch


def _flat(result: dict) -> dict:
    flat = {key: value for key, value in result.items() if key != "saved"}
    flat.update({f"saved.{key}": value for key, value in result.get("saved", {}).items()})
    return flat


def main(archive, inputs_file, outputs_file, *edits):
    module = torch.export.load(archive).module()
    inputs = torch.load(inputs_file, weights_only=True)
    with torch.no_grad():
        plain = _flat(module(*inputs))
        for edit in edits:
            name, value = edit.split("=")
            module.get_buffer(name).fill_(float(value))
        edited = _flat(module(*inputs))
    torch.save({"plain": plain, "edited": edited}, outputs_file)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    if leaked:
        print(f"imported: {leaked}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main(*sys.argv[1:])
