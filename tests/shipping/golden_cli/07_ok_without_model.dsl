save 1
steer 2 *= $scale
