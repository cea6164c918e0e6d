"""Ray entry points: `python -m jobs.<name>` locally or via `ray job submit`."""
