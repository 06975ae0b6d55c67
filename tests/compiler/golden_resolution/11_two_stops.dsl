stop blocks.0
stop blocks.1