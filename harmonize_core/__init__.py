"""Deep Painterly Harmonization (Luan et al. 2018) in PyTorch, faithful to the authors' code.

Pure functions on tensors: no orchestration, no storage. Three lines harmonize one item::

    from harmonize_core import harmonize, load_item, preset
    content, style, mask = load_item("naive.jpg", "painting.jpg", "mask.jpg")
    outputs = harmonize(content, style, mask, preset("quick"))   # {stage: StageOutput(image, metrics)}
"""

from .config import HarmonizeConfig, apply_overrides, preset
from .errors import HarmonizeError, InputError, WeightsUnavailableError
from .io import load_item, save_outputs
from .optimisation.progress import Iterate
from .passes.stages import STAGES, StageOutput, harmonize
from .version import __version__

__all__ = [
    "STAGES",
    "__version__",
    "HarmonizeConfig",
    "HarmonizeError",
    "InputError",
    "Iterate",
    "StageOutput",
    "WeightsUnavailableError",
    "apply_overrides",
    "harmonize",
    "load_item",
    "preset",
    "save_outputs",
]
