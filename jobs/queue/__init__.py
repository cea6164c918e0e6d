"""A job queue in front of Ray Jobs: queues with limits and priorities, admission by free CPUs,
reasons for waiting, retries on infrastructure failure, state in a SQL store (docs/queue.md).

- `config`: the queues a cluster declares (YAML) and their limits;
- `store`: the one module that reads and writes the queue's state (PostgreSQL or SQLite, SQLAlchemy Core);
- `need`: how many CPUs a job declares, from its entry point's options and config;
- `dispatcher`: the restart-safe process that admits jobs to Ray Jobs and follows them;
- `api`: what `flowers submit`, `flowers jobs` and `flowers queues` call.
"""
