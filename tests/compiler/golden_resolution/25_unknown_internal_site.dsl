save blocks[0].attn:output
