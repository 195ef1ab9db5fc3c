"""Prefect flows: ``harmonize_manifest`` (``flows.harmonize``) over a manifest, and the ``harmonize`` CLI.

Import submodules directly (``from flows.harmonize import harmonize_manifest``); this package stays light so that
``harmonize validate`` does not import Prefect.
"""
