"""Benchmarks, a chaos run and their shared helpers (issue 7, "Proof").

``python -m bench`` runs every benchmark in sequence (``make bench``); ``python -m bench.chaos``
runs the chaos test (``make chaos``). Each benchmark prints a table and writes its numbers to
``bench/results/<name>.json``. Every run uses scratch databases it creates and drops.
"""
