"""Training: the one loop (`loop.fit`), its losses (`tasks`), the frozen-trunk feature cache,
the L4 ensemble builder, the L5 distillation and the tail they share (`stages`)."""
