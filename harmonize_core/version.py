"""The core's release label (``harmonize_core.__version__``), recorded in every stage's metrics.

A label, not a cache-key input: the keys follow the code that computes each stage (``tasks.code_digest``).
"""

__version__ = "0.1.0"
