"""Shipping and seeing compiled modules: safe save/load (`io`), standalone `.pt2` export (`export`),
graph pictures (`draw`) and the `tdhook-fx` command line (`cli`). Built on `CompiledModule`'s
public read surface only."""
