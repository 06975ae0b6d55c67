# check with: --model gpt2
save transformer.h[1].mpl
steer transformer.h[7].mlp += $v
