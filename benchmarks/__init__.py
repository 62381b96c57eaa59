"""Benchmarks of MKL-VisITA: one script per concern, each printing a table and saving JSON.

    python -m benchmarks.run [--quick] [--out docs/results/benchmarks]

Decisions: wall-clock figures depend on the machine and its load, so each script measures a model and its baseline
in the same run (ratios hold on a noisy machine) and records the machine in its JSON; ``--quick`` runs a few
seconds on tiny inputs so a test can check each script's output shape (never a time).
"""
