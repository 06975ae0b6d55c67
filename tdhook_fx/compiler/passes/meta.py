"""The keys passes write into `node.meta`, read by the tools that show a rewritten graph (draw, show)."""

INSERTED = "tdhook_fx"  # "inserted" (by a pass), "source" (a patch source run), "changed" (a masked weight)
SITE = "tdhook_fx_site"  # the site whose name a model value took when its tap went
GRAD_DELTA = "tdhook_fx_grad_delta"  # on a placeholder: the name of the gradient `save grad` returns through it
GRAD_CHAIN = "tdhook_fx_grad_chain"  # the site whose gradient chain the node is in (`set grad` ordering)
