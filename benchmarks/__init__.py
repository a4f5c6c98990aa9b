"""Benchmarks of munba-diffusion: every runner behind BENCHMARKS.md, the classifier and CLIP ones included.

From a checkout run them as ``python -m benchmarks.<name>`` from the repository root; installed, the package is
``munba_diffusion.benchmarks`` and the classifier and CLIP benchmarks are the console scripts
``munba-unlearn-classifier`` and ``munba-unlearn-clip``. Imports between the runners are relative, so both work.

Each runner declares its options once (a dataclass of :func:`munba_diffusion.config.option` fields) and writes
``results.json`` (for machines), ``results.md`` (for people) and PNG plots through the one results writer
(:func:`benchmarks._common.write_results`), by default into ``benchmarks/results/<name>/``; BENCHMARKS.md records
the numbers with the command, machine and date.
"""
