"""Benchmarks of heal's ops and pipelines against the baselines users have today.

``heal bench <name>`` and ``python benchmarks/<name>.py`` run the same code. Results go to
``benchmarks/results/<name>-<device>.{json,md,png}``. Timings are reported, never asserted.
"""
