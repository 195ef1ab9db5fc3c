"""The optimisation both passes share: the objective's evaluation (``objective``: loss terms at the network's taps,
masked and normalised gradients), the window of a layer's soft mask where the terms live (``window``), the L-BFGS
driver with its stopping rules (``lbfgs``), and the progress event each evaluation reports (``progress``).
"""
