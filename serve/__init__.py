"""Ray Serve application for flowers: see serve/app.py and serve/config.yaml."""
