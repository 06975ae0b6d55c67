# steer the middle layer
save transformer.h[1].mlp
steer transformer.h[1].mlp += $alpha * * $v