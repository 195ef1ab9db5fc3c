"""Prefect flows, thin over ``tasks``: ``harmonize_manifest`` (``flows.harmonize``) over a manifest, its shards
(``flows.shard``) and items (``flows.item``), the plan, the summary and the run's records; the fleet machinery
(``flows.fleet``), the run report (``flows.report``) and the ``harmonize`` command (``flows.cli``) as sub-packages.

Import submodules directly (``from flows.harmonize import harmonize_manifest``); this package stays light so that
``harmonize validate`` does not import Prefect.
"""
