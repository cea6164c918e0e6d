"""Everything that talks to MLflow: model references and aliases (`uris`), the champion gate
(`governance`), the MLflow model flavour (`flavor`), run logging (`tracking`) and run names and
descriptions (`run_notes`)."""
