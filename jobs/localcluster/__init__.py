"""A real multi-node cluster on this machine: `flowers cluster up|down|env|kill|restart` and the tests' fixture.

What `up` starts, each on a free port picked at run time (one module each):
- `postgres`: PostgreSQL 15 as the `postgres` user in a data dir of its own, databases `mlflow` and `queue`;
- `objectstore`: moto's S3 server (127.0.0.1) with the bucket `flowers`, fixed dummy credentials, us-east-1;
- `mlflow_server`: `mlflow server` (127.0.0.1) on that PostgreSQL, artifacts proxied to s3://flowers/mlflow;
- `ray_nodes`: a Ray head with 0 CPUs and token authentication, and N worker nodes joined with
  `ray start --address`, each in its own mount namespace with an empty read-only tmpfs over the
  driver's folders (`masks`), so a driver-local path fails on a worker as on another machine;
- `dispatcher`: the job queue's dispatcher, next to the head.

Every process starts in a session of its own (setsid, `procs`) and `down` ends each session whole, so
a node's raylet, workers and agents go with it. `cluster` holds `up` and `LocalCluster`, which reads
the state file (`cluster.json` in the state dir) that records what runs where.
`python -m jobs.localcluster reap PID STATE_DIR` stops a cluster once PID exits (the tests' reaper).

No Ray import: nodes are `ray start` processes, and the readiness check is a Ray client in a
subprocess (a pytest process may already hold a local Ray of its own).
"""
from __future__ import annotations

from jobs.localcluster.cluster import (STATE_FILE, LocalCluster, default_state_dir, down, kill_worker,
                                       reap_when_gone, restart_worker, unavailable_reason, up)
from jobs.localcluster.objectstore import AWS_ENV, BUCKET, storage_env
from jobs.localcluster.postgres import queue_url
from jobs.localcluster.procs import ClusterError, alive, end_sessions, pick_ports, session_members
from jobs.localcluster.ray_nodes import client_env, default_masks, ray_binary

__all__ = ["AWS_ENV", "BUCKET", "STATE_FILE", "ClusterError", "LocalCluster", "alive", "client_env", "default_masks",
           "default_state_dir", "down", "end_sessions", "kill_worker", "pick_ports", "queue_url", "ray_binary",
           "reap_when_gone", "restart_worker", "session_members", "storage_env", "unavailable_reason", "up"]
