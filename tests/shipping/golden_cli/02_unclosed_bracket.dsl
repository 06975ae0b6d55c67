save transformer.h[0].mlp
set transformer.h[1].mlp[:, 0 = 0
