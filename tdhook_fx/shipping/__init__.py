"""Shipping and seeing compiled modules, built on `CompiledModule`'s public read surface only.

- `save` / `load`: one safetensors file (program, capture settings, bound tensors, a fingerprint
  of the base model); loading parses JSON and copies raw bytes, nothing runs;
- `export`: a standalone `torch.export` archive (.pt2) that loads without tdhook_fx;
- `audit` (with `pt2_format`, `pt2_code`, `schema`, `printable`): what a .pt2 could run when
  loaded, and `load_export`, which accepts only exactly what `export` writes;
- `draw`: graph pictures; `cli`: the `tdhook-fx` command line.
"""
