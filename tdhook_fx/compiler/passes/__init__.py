"""Rewrite passes: one small module per statement kind, run in program order by `rewrite.rewrite`.

- `rewrite`: the driver (passes by statement kind, then the graph is finished once);
- `rewrite_context`: the state the passes share (the graph, where each site's value is now);
- `save`, `set_value`, `steer`, `patch`, `prune`, `stop`, `grad`: one pass each;
- `ops`: the functions the rewritten graph calls; `masks`: pruning masks; `meta`: node-meta keys.
"""
