"""The fleet: the manifest flow's items on many GPU machines, through Prefect's own machinery.

``settings`` (the names and timings every part shares: plain constants), ``automation`` (the zombie-run automation
that marks a silent shard run Crashed), ``deploy`` (the work pool, its queues, the shard and manifest deployments),
``fanout`` (a run's items sent as shard runs to the pool and collected, lost ones resubmitted) and ``workers``
(``harmonize worker``: one Prefect worker per GPU, supervised). The flows they run stay in ``flows.harmonize`` and
``flows.shard``.
"""
