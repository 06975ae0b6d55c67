save transformer.h[0].mlp
sav transformer.h[1].mlp