save blocks.1.up as late
steer blocks.0.up += @late