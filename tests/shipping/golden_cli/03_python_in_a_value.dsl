save transformer.h[0].mlp
steer transformer.h[1].mlp += torch.randn(64)
