"""Tools built on hvdtrain's core: `compare`, `bench` (allreduce, train, synthetic, convergence,
fit), `doctor`, and what they share (launcher command lines, tables, plots).

The top layer: a tool imports the core through public names only, never a private (`_x`) name of
the core or of another tool, and nothing in the core imports a tool (`hvdtrain.cli` reaches them
through a table of module names). tests/test_imports.py checks both.
"""
