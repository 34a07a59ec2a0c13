"""Benchmarks of heal's ops and pipelines against the baselines users have today.

``heal bench <name>`` and ``python benchmarks/<name>.py`` run the same code. Results go to
``<output-dir>/<name>-<device>.{json,md,png}``: ``heal bench`` writes ``./heal-bench-results/`` unless
``--output-dir`` says otherwise; the scripts write the repository's committed ``benchmarks/results/``.
Timings are reported, never asserted.
"""
