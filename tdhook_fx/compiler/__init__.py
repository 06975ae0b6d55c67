"""The compiler: DSL program + model -> a rewritten graph module.

    pipeline.compile(model, program, example=...)
      capture/   model + example -> a tapped graph and its site table (cached per model)
      resolve    AST + site table -> the IR (one intervention per concrete site), every error at once
      ir         the resolved program (printable)
      passes/    IR + graph -> the rewritten graph, one small pass per statement kind
      compiled   CompiledModule: the rewritten graph behind a TensorDict (or tensor) interface
      runner     the rewritten graph with attribute paths resolved once (fast eager calls)

`graphs` and `shapes` hold small facts about fx graphs and tensor shapes that several stages use.
"""
