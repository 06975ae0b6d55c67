steer transformer.h[2].mlp = $alpha * $v
