"""Batch scoring, the Ray-free half: inputs → rows → one Parquet file or a dataset folder.

`jobs/score.py` is the driver; it runs small local jobs in-process (`local`) and the rest with
Ray Data (`jobs/score_ray.py`). Everything they call lives here, one module per concern:
- `sources`: the inputs. Local folders, `s3://` prefixes and listing files (text, one path or URI
  per line, or a Parquet column), listed on the driver, sorted, each input once;
- `reader`: `read_objects`, the Ray Data read task's body, and part names (kept light: Ray workers
  unpickle it without importing torch or MLflow);
- `batch`: `Scorer`, the batch model, the per-batch code of both engines (the callable class of
  the Ray Data actor pool). It gets the `ModelRef` the driver resolved, loads the model once (on a
  thread, while the first batch decodes), and turns a batch of `{path, bytes}` rows into output
  rows, one per input row, with `error` set (and nulls elsewhere) for an object that cannot be
  decoded; `decode` and `predict` are its two stages;
- `local`: the in-process engine: `Scorer.decode` on threads ahead of `Scorer.predict`, no Ray;
- `plan`: `plan_scoring`, the driver-side checks (settings, inputs, output/resume/overwrite rules,
  the model resolved once into a `ModelRef`, its metadata) that run before any scoring starts,
  so bad input fails fast and nothing is written;
- `sinks`: the two output layouts (docs/scoring.md):
  * a single Parquet file for small local jobs: `write_scores` streams the rows into a temp file
    next to it and renames it into place at the end (atomic);
  * a dataset folder (large jobs, any `s3://` output): workers write `part-*.parquet` files, then
    `commit_dataset` checks every input is there exactly once and writes `_manifest.json` LAST,
    the commit marker. `--resume` keeps the complete parts and scores only the rest;
- `schema`: the output schema, its Parquet metadata and error rows;
- `summary`: `ScoreSummary`, written next to the output and logged to MLflow (`log_summary`).

This file imports nothing, so that `flowers.scoring.reader` stays light.
"""
