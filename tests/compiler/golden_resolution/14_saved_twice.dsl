save blocks.0.up
save blocks.0.up