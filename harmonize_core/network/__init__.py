"""The feature network: the VGG architectures as data (``architecture``), the input conventions
(``preprocessing``), the weights registry of hash-checked sources (``weights``) and where weights live on this
machine (``weights_cache``), and the network built from the tables and loaded with weights (``vgg``).

The registry never imports the network: a weights digest needs no network built.
"""
