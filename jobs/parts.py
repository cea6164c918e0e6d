"""Part-file names for scoring's dataset output. Every Ray Data write task unpickles `PartNames`, so
this module imports only Ray Data's base class and `flowers.scoring.reader`: a write task that lands in
a fresh worker starts in well under a second instead of importing `jobs.score` (torch, MLflow:
about 5 s of CPU and 1 GB)."""
from __future__ import annotations

from ray.data.datasource import FilenameProvider

from flowers.scoring.reader import part_name


class PartNames(FilenameProvider):
    """`part-<write id>-<task>-<i>.parquet`: a retried write task rewrites its own part."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return part_name(write_uuid, task_index)
