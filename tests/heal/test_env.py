"""``heal env``: versions, devices, op backends, the C++ build state and the switches."""

import json
import shutil
from importlib import metadata

import pytest
import torch

from heal.cli import main
from heal.environment import PACKAGES, collect, format_report, summary_line


def _installed(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def test_json_output_reports_real_versions_and_devices(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["packages"]) == set(PACKAGES)
    for dist, version in info["packages"].items():
        assert version == _installed(dist)
    assert info["packages"]["torch"] == torch.__version__
    assert info["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(info["torch"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for dev in info["torch"]["devices"]:
        assert dev["capability"].startswith("sm_")
    assert {e["name"] for e in info["cpp"]["extensions"]} == {"heal_entropy", "heal_pairwise", "heal_linear"}


def test_text_report_names_every_package(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for dist in PACKAGES:
        v = _installed(dist)
        line = next(ln for ln in out.splitlines() if ln.split() and ln.split()[0] == dist)
        assert (v or "not installed") in line
    assert "CPU tensors" in out and "CUDA tensors" in out


def test_switches_change_the_reported_backend(monkeypatch):
    monkeypatch.setenv("HEAL_KERNELS_BACKEND", "torch")
    info = collect()
    assert info["switches"]["HEAL_KERNELS_BACKEND"] == "torch"
    assert info["backends"]["cpu"].startswith("pure torch")
    assert info["backends"]["cuda"].startswith("error")

    monkeypatch.setenv("HEAL_KERNELS_BACKEND", "nonsense")
    assert collect()["backends"]["cpu"].startswith("invalid")

    monkeypatch.setenv("HEAL_KERNELS_BACKEND", "auto")
    monkeypatch.setenv("HEAL_KERNELS_NO_BUILD", "1")
    monkeypatch.setenv("HEAL_SOMETHING_NEW", "x")
    info = collect()
    assert info["cpp"]["build_disabled"] and not info["cpp"]["can_build"]
    assert "pure torch" in info["backends"]["cpu"]
    assert info["switches"]["HEAL_SOMETHING_NEW"] == "x"  # every HEAL_* variable is reported
    assert "HEAL_KERNELS_NO_BUILD=1" in format_report(info)


def test_missing_compiler_and_private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    info = collect()
    assert info["cpp"]["compiler"].startswith("not found")
    assert not info["cpp"]["can_build"]
    assert "pure torch" in info["backends"]["cpu"]
    for e in info["cpp"]["extensions"]:
        assert e["cache_dir"].startswith(str(tmp_path / "ext"))
        assert not e["built"]
    assert "cannot be built" in format_report(info)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_build_flag_builds_and_finds_the_cached_modules():
    info = collect(build=True)
    for e in info["cpp"]["extensions"]:
        assert e["loaded"], e
        assert e["built"], e  # the compiled module is where the report says it is cached
    assert info["backends"]["cpu"] == "C++/OpenMP extension"


def test_summary_line_for_report_headers():
    line = summary_line(collect())
    assert f"torch {torch.__version__}" in line
    assert "CPU ops:" in line


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_build_flag_reports_progress_on_stderr(monkeypatch, tmp_path, capfd):
    """`heal env --build` says what it builds while it builds, and that a second run only loads."""
    from heal_kernels import cpu

    src = tmp_path / "csrc" / "tiny.cpp"
    src.parent.mkdir()
    src.write_text('#include <pybind11/pybind11.h>\n'
                   'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("one", [] { return 1; }); }\n')
    monkeypatch.setattr(cpu, "EXTENSIONS", {"heal_test_env": [str(src)]})
    monkeypatch.setattr(cpu, "_CACHE", {})
    monkeypatch.setattr(cpu, "_BUILT", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("HEAL_KERNELS_NO_BUILD", raising=False)

    assert main(["env", "--build"]) == 0
    cap = capfd.readouterr()
    err = cap.err.splitlines()
    assert "heal env: C++ extension [1/1] heal_test_env: not built yet, compiling it" in err
    assert any(l.startswith("heal: building heal's C++ kernels (heal_test_env)") for l in err)
    assert any(l.startswith("heal: built heal_test_env in ") for l in err)
    assert "compiled now in" in cap.out and "heal_test_env" in cap.out

    monkeypatch.setattr(cpu, "_CACHE", {})  # as a new process would
    assert main(["env", "--build"]) == 0
    cap = capfd.readouterr()
    assert "heal env: C++ extension [1/1] heal_test_env: loading the cached build" in cap.err
    assert "heal: building" not in cap.err and "compiled now" not in cap.out
