"""The Ray edge shared by `jobs/` and `serve/`: how a process joins a cluster, and what its workers get.

`raylink.connect` holds the one `ray.init` of every entry point (study, tune, score, the Serve
deployer) and the env every worker is started with. It imports neither `jobs/` nor `serve/`, so
both can use it without importing each other; `raylink.ports` picks free ports for Ray-side servers.
Importing this package imports no Ray (the local cluster uses `raylink.ports` without it).
"""
