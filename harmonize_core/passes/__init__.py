"""The algorithm's stages in order: the masks (``masks``: dilation, feathering, per-layer masks), the coarse pass
(``pass1``), the refinement pass (``pass2``) with its style weight estimated from the painting (``tau``), and the
five stage functions the pipeline runs one by one, with the in-memory driver ``harmonize`` (``stages``).
"""
