"""core: the DEQ engine (solvers, DEQ graphs, backward passes, norms, regularisers).

Offers every public name of TorchDEQ 0.1 with the same meaning; see ../README.md.
"""
