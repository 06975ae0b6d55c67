save blocks.9
steer blocks.0.up += @nope
save blocks.0.atn