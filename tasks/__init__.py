"""Prefect tasks, one per stage (``tasks.stages``), their cache keys (``tasks.caching``), the run's backbone
(``tasks.backbones``) and the storage layer for local paths and ``s3://`` (``tasks.storage``)."""
