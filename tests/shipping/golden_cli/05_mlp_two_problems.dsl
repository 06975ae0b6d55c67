# check with: --model mlp
save 1
steer 2[:, 99] += $v
prune 4.bias 200
