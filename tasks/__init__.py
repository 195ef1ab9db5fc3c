"""Prefect tasks, one per stage (``tasks.stages``), their cache keys (``tasks.caching``), the run's backbone
(``tasks.backbones``), the device (``tasks.gpu``) and what a stage waits for (``tasks.waits``), over the storage
sub-package: one storage layer for local paths and ``s3://`` (``tasks.storage``) and the lock manager kept in it
(``tasks.storage.locks``), which ``manifests`` uses too."""
