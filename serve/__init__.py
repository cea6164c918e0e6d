"""The flowers Ray Serve app: a batched ensemble and the INT8 student (also the HTTP ingress).

    app.py          the application builder (`serve deploy` import path: serve.app:build_app)
    deployments.py  the Ensemble and Student deployments (the Student is the HTTP ingress)
    follower.py     the Follower deployment: polls the registry, referees each route's rollout (canary, shadow)
    versions.py     a model replica's loaded versions: load + warm up, switch, drain, canary pick, shadow stats
    explainer.py    the Explainer deployment: Grad-CAM for POST /v1/explain/{model}, off the prediction path
    http.py         request validation and JSON errors
    schemas.py      what the API says about itself: response models, request bodies, errors (OpenAPI)
    web.py          GET / (the web page), /static/..., /docs and /redoc from package data (static/)
    gate.py         batch admission in front of @serve.batch; the only use of Serve internals
    metrics.py      the app's Prometheus metrics
    config.py       Serve config YAMLs (config.yaml) and deployment versions
    ingress_env.py  the HTTP front (HAProxy or Ray's Python proxy), decided before Ray starts
    options.py      command-line options of `flowers serve` and `python -m jobs.deploy`
    run.py          start Ray + Serve and run the app
"""
