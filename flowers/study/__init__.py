"""The study `make run` runs: its plan of trials (`plan`), the steps after Tune (`steps`:
champions, L4, L5; `robustness_step`), and its report (`report`, `report_html`)."""
