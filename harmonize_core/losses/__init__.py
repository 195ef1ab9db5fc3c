"""The loss terms of both passes as plain functions on tensors: content, masked Gram style, total variation and the
pass 2 weights (``terms``), and the histogram loss with its target and remapping (``histogram``). How their
gradients are masked and normalised is the objective's business (``optimisation.objective``).
"""
