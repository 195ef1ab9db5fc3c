"""Studies behind figures in docs/: longer experiments than ``python -m bench``, each with its own command line.

``bench.studies.iterations``: quality scores and losses against L-BFGS iterations (docs/quality.md, "Iteration
study"), ``python -m bench.studies.iterations --help``.
"""
