"""Where weights live on this machine: the weights cache folder and the configured Caffe VGG19 of the paper preset.

Environment and file-system look-ups only (no torch), so the configuration (``config.paper_backbone``) can ask which
network the paper preset runs without importing the weights registry. ``weights`` re-exports every name here.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "HARMONIZE_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/painterly-harmonization/weights"
CONVENTION_MARK = "#"  # "<file>#caffe" names a weights file's input convention
CAFFE_VGG19_ENV = "HARMONIZE_CAFFE_VGG19"  # a Caffe VGG19 state dict (local path or s3:// URI) for the paper preset
CAFFE_VGG19_FILE = "vgg19-caffe.pth"  # ... or this file in the weights cache directory


def cache_dir() -> Path:
    """Return the weights cache directory: ``$HARMONIZE_CACHE_DIR`` or ``~/.cache/painterly-harmonization/weights``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def default_caffe_vgg19() -> str | None:
    """Return the configured Caffe VGG19 weights (``$HARMONIZE_CAFFE_VGG19``, else ``<cache>/vgg19-caffe.pth`` when
    it exists) as a weights source with the ``#caffe`` convention, or None when none is configured."""
    configured = os.environ.get(CAFFE_VGG19_ENV, "").strip()
    if not configured:
        candidate = cache_dir() / CAFFE_VGG19_FILE
        configured = str(candidate) if candidate.is_file() else ""
    if not configured:
        return None
    return configured if configured.endswith(f"{CONVENTION_MARK}caffe") else f"{configured}{CONVENTION_MARK}caffe"
