"""The tdhook_fx tour (run with `make demo`)."""

import tdhook_fx

PROGRAM = """
# read every MLP, steer the third one, and prune a weight
save  transformer.h[*].mlp
steer transformer.h[2].mlp += $alpha * $v
prune transformer.h[0].mlp.c_fc.weight 50% by magnitude
"""

print("The program, in canonical form:")
print(tdhook_fx.parse(PROGRAM))
print()
print("A mistake, as tdhook_fx reports it:")
try:
    tdhook_fx.parse("steer transformer.h[2].mlp = $alpha * $v")
except tdhook_fx.DslSyntaxError as error:
    print(error)
