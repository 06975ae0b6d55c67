"""Speed on top of the compiler: batched patching sweeps (`sweep`) over a graph cut at sites (`split`)."""
