"""Benchmarks of munba-diffusion (run from the repository root, e.g. ``python -m benchmarks.overhead``).

Each script writes ``results.json`` (for machines), ``results.md`` (for people) and PNG plots into
``benchmarks/results/<name>/``; BENCHMARKS.md records the numbers with the command, machine and date.
"""
