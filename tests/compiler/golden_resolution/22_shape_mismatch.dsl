save blocks.0.ln_1 as a
steer blocks.0.up += @a