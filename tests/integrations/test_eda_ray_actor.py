"""Inside a Ray actor started with default options (as verl's trainer process is), torch runs one
thread (Ray sets OMP_NUM_THREADS=1), and heal's EDA still uses every CPU the process may run on."""

import os

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=max(1, len(os.sched_getaffinity(0))), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_default_ray_actor_eda_uses_the_affinity_cpus(local_ray):
    @ray.remote
    class Probe:
        def run(self):
            import torch

            from heal.reward import EDAConfig, eda_step
            from heal_kernels.ops import pairwise as pw

            seen = []
            real = pw._run_cpu_ext

            def spy(ext, st, short_first, grouped, threads, rows=None, share=None):
                seen.append(threads)
                return real(ext, st, short_first, grouped, threads, rows, share)

            pw._run_cpu_ext = spy
            try:
                _, metrics = eda_step(torch.rand(6, 40), torch.ones(6, 40), ["m", "m", "m", "g", "g", "g"], None,
                                      EDAConfig(general_sources=("g",), min_length=0))
            finally:
                pw._run_cpu_ext = real
            return {
                "omp_env": os.environ.get("OMP_NUM_THREADS"),
                "torch_threads": torch.get_num_threads(),
                "affinity": len(os.sched_getaffinity(0)),
                "kernel_threads": seen,
                "eda_threads_metric": metrics["eda/threads"],
                "extension": pw._cpu_ext() is not None,
            }

    out = ray.get(Probe.remote().run.remote())
    assert out["omp_env"] == "1" and out["torch_threads"] == 1, out  # what Ray does to its actors
    if not out["extension"]:
        pytest.skip("the C++ extension cannot be built here")
    assert out["kernel_threads"] == [out["affinity"]], out
    assert out["eda_threads_metric"] == out["affinity"], out
