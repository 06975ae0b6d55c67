"""The tdhook_fx tour (run with `make demo`): write a program, compile it onto a GPT-2, read the
rewritten code, run it, draw it, save it safely, load it back, export a standalone .pt2 and run
that in a fresh Python process that has neither tdhook_fx nor transformers.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tensordict import TensorDict

import tdhook_fx
from tdhook_fx import zoo

PROGRAM = """
# read every MLP, steer the third one, and prune a weight
save  transformer.h[*].mlp
steer transformer.h[2].mlp += $alpha * $v
prune transformer.h[0].mlp.c_fc.weight 50% by magnitude
"""

# The .pt2 is run by this script in a new process: only torch is importable there.
FRESH_PROCESS = r"""
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tdhook_fx", "transformers"):
            raise ImportError(f"{name} is not needed to run the .pt2")

sys.meta_path.insert(0, Refuse())
import torch

archive, inputs, outputs = sys.argv[1:]
module = torch.export.load(archive).module()
ids = torch.load(inputs, weights_only=True)
with torch.no_grad():
    steered = module(ids)
    module.runtime.alpha.fill_(0.0)  # runtime values are buffers: edit them, no re-export
    unsteered = module(ids)
torch.save({"logits": steered["logits"], "mlp2": steered["saved"]["transformer.h.2.mlp"],
            "logits_alpha0": unsteered["logits"]}, outputs)
print("  fresh process: loaded with torch only; tdhook_fx or transformers imported:",
      any(m.split(".")[0] in ("tdhook_fx", "transformers") for m in sys.modules))
"""


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="tdhook_fx_tour_"))

    section("1. a program is data")
    print(tdhook_fx.parse(PROGRAM))
    print("\nA mistake, as tdhook_fx reports it:")
    try:
        tdhook_fx.parse("steer transformer.h[2].mlp = $alpha * $v")
    except tdhook_fx.DslSyntaxError as error:
        print(error)

    section("2. compile it onto a GPT-2 (random weights, no download)")
    sample = zoo.gpt2()
    cm = tdhook_fx.compile(sample.model, PROGRAM, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    print(f"front end: {cm.frontend}; runtime values: {cm.runtime_names}; saved: {len(cm.saved_names)} values")
    print("The lines of cm.code that the program inserted (all of it: print(cm.code);"
          " marked: tdhook-fx show gpt2 PROGRAM):")
    for line in cm.code.splitlines():
        if any(word in line for word in ("steer_", "fit_", "prune", "alpha * v")):
            print("   ", line.split(";  ")[0].strip())

    section("3. run it")
    cm.bind(alpha=torch.tensor(4.0), v=torch.randn(64, generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    td = cm(TensorDict(input_ids=ids, batch_size=[3]))
    print(f"logits {tuple(td['logits'].shape)}")
    for name in cm.saved_names:
        value = td["saved", name]
        print(f"saved {name}: {tuple(value.shape)}, mean {value.mean():+.4f}")

    section("4. draw it")
    for suffix in (".svg", ".html"):
        print("wrote", cm.draw(out / f"steered{suffix}"))

    section("5. save it (safetensors: JSON + tensors, nothing runs on loading) and load it back")
    saved = cm.save(out / "steered.safetensors")
    print("wrote", saved)
    colleague = zoo.gpt2()  # a colleague rebuilds the same base model
    loaded = tdhook_fx.load(saved, colleague.model)
    again = loaded(TensorDict(input_ids=ids, batch_size=[3]))
    same = torch.equal(again["logits"], td["logits"]) and all(
        torch.equal(again["saved", n], td["saved", n]) for n in cm.saved_names
    )
    print(f"loaded onto a rebuilt GPT-2: same logits and saved values: {same}")
    try:
        tdhook_fx.load(saved, zoo.gpt2(n_layer=2).model)
    except tdhook_fx.ExportError as error:
        print("loading onto another architecture is refused:")
        print("  " + "\n  ".join(str(error).splitlines()[:4]))

    section("6. export a standalone .pt2 and run it in a fresh process")
    print(cm.export(out / "steered.pt2"))
    print(tdhook_fx.inspect_export(out / "steered.pt2"))
    torch.save(ids, out / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(out / "steered.pt2"), str(out / "ids.pt"), str(out / "outputs.pt")],
        check=True,
    )
    fresh = torch.load(out / "outputs.pt", weights_only=True)
    print(f"  same logits as in this process: {torch.allclose(fresh['logits'], td['logits'], atol=1e-5)}")
    print(f"  same saved value: {torch.allclose(fresh['mlp2'], td['saved', 'transformer.h.2.mlp'], atol=1e-5)}")
    unsteered = cm.bind(alpha=torch.tensor(0.0))(TensorDict(input_ids=ids, batch_size=[3]))["logits"]
    print(f"  with runtime.alpha = 0 it matches alpha = 0 here: {torch.allclose(fresh['logits_alpha0'], unsteered, atol=1e-5)}")
    print(f"\nFiles are in {out}")


if __name__ == "__main__":
    main()
