stop blocks.0
save blocks.1