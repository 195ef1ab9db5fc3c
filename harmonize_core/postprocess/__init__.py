"""The reconstruction stage (filt_cnn_artifact.m): chroma guided filtering, the PatchMatch nearest-neighbour field
and voting that rebuild the harmonised region from the painting's own patches (``patchmatch``), and the stage's
steps put together (``reconstruct``).
"""
