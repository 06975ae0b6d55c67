"""The one method framework: tdhook's `prepare(model)` contexts and `HookedModule`, on compiled programs."""
