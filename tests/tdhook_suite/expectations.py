"""What tdhook 0.3.0's own tests can and cannot show about tdhook_fx, with the reason for each.

`OUT_OF_SCOPE`: test files about parts of tdhook that tdhook_fx does not have (they are not
run). `BY_DESIGN`: tests that cannot pass because tdhook_fx compiles interventions instead of
installing hooks; each reason says which difference. Every other test of the sdist must pass.
"""

OUT_OF_SCOPE = {}

BY_DESIGN = {}
