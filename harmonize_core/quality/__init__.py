"""The per-item quality scores (``scores``): what each measures and which way is better. The reconstruct stage
computes them after its image, so a change to the scores still changes that stage's code digest.
"""
