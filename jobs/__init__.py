"""Ray at the batch edge: entry points runnable as `python -m jobs.<name>` locally or via `ray job submit`.

trial + tune (Ray Tune), study, score (Ray Data), deploy (the Serve app), client (Ray Jobs SDK), queue/
(the job queue), localcluster/ (`flowers cluster up`); options and entry are what the entry points and the
`flowers` CLI share. They join Ray through `raylink.connect` (shared with serve/). The library they call,
`flowers`, imports no Ray.
"""
