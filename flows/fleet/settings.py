"""The fleet's names and timings, shared by the deployments, the zombie automation, the fan-out, the workers and the
command line. Plain constants: importing them costs nothing and loads no Prefect (``harmonize validate`` stays light).
"""

from __future__ import annotations

NIGHTLY = "0 2 * * *"
DEFAULT_POOL = "harmonize-gpu"
SHARD_QUEUE, COORDINATOR_QUEUE = "gpu", "coordinator"
MANIFEST_DEPLOYMENT = "nightly"
COORDINATOR_RUNS = 4
HEARTBEAT_SECONDS = 30  # Prefect's minimum
ZOMBIE_SECONDS = 3 * HEARTBEAT_SECONDS  # Prefect's docs: at least three heartbeats of silence before a run is dead
AUTOMATION_NAME = "harmonize: mark silent runs crashed"
SHARD_TAG = "harmonize-shard"  # the shard deployment's runs carry it; the zombie automation watches only them
