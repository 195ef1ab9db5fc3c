"""Where each part of the harmonised region finds its style: nearest-neighbour matching of feature patches
(``nearest``: pass 1's 3x3 patch cosine, pass 2's normalised-sum match at relu4_1, both chunked to a memory budget)
and pass 2's consistent mapping built on it (``mapping``: refinement, the used-style set and its upsampling).
"""
