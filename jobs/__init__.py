"""Ray at the batch edge: entry points runnable as `python -m jobs.<name>` locally or via `ray job submit`.

cluster (the one `ray.init`), trial + tune (Ray Tune), study, score (Ray Data), deploy (the Serve app),
client (Ray Jobs SDK); options and entry are what the entry points and the `flowers` CLI share.
The library they call, `flowers`, imports no Ray.
"""
