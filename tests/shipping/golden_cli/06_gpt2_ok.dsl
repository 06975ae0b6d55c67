# check with: --model gpt2
save transformer.h[*].mlp
steer transformer.h[2].mlp += $alpha * $v
