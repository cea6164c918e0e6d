"""Robustness evaluation, Ray-free: named image shifts (`shifts`), the shift suite over a split
(`suite`) and real out-of-distribution photos (`ood`). Called by `flowers evaluate`, the study's
robustness step and the tests."""
