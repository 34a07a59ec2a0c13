"""The C++ extension loader: what the cache key hashes, one stderr line when a build starts and one
when it ends (none when the build comes from the cache), and a second checkout of the same sources
loading the first one's build without compiling or asking ninja."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from heal_kernels import cpu

TINY = textwrap.dedent("""\
    #include <pybind11/pybind11.h>
    #include "tiny.h"
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("add", &tiny_add); }
    """)
TINY_H = "#define TINY_OFFSET 0\nstatic int tiny_add(int a, int b) { return a + b + TINY_OFFSET; }\n"

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")


def _checkout(root, source=TINY, header=TINY_H):
    root.mkdir(parents=True)
    (root / "tiny.cpp").write_text(source)
    (root / "tiny.h").write_text(header)
    return root / "tiny.cpp"


def test_cache_key_hashes_contents_not_paths(tmp_path, monkeypatch):
    a = _checkout(tmp_path / "checkout-a" / "csrc")
    b = _checkout(tmp_path / "venvs" / "other" / "csrc")
    key = cpu.extension_key("tiny", [a])
    assert len(key) == 10 and cpu.extension_key("tiny", [b]) == key  # same sources elsewhere: same build
    assert cpu._tagged_name("tiny", [b]) == f"tiny_{key}"

    b.write_text(TINY.replace("{ m.def", "{  m.def"))  # one source byte
    assert cpu.extension_key("tiny", [b]) != key
    b.write_text(TINY)
    assert cpu.extension_key("tiny", [b]) == key
    (b.parent / "tiny.h").write_text(TINY_H.replace("OFFSET 0", "OFFSET 1"))  # an included header
    assert cpu.extension_key("tiny", [b]) != key
    (b.parent / "tiny.h").write_text(TINY_H)

    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")  # another torch
    assert cpu.extension_key("tiny", [b]) != key
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "extension_flags", lambda: ["-O2"])  # other compile flags
    assert cpu.extension_key("tiny", [b]) != key


def test_the_shipped_extensions_hash_their_header():
    """csrc/heal_simd.h is included by entropy.cpp and linear.cpp: it is part of their key."""
    assert (cpu.csrc_dir() / "heal_simd.h").is_file()
    keys = {name: cpu.extension_key(name) for name in cpu.EXTENSIONS}
    assert len(set(keys.values())) == len(keys)
    info = cpu.extension_info()
    for row in info:
        assert row["module"] == f"{row['name']}_{keys[row['name']]}"
        assert os.path.basename(row["cache_dir"]) == row["module"]  # one folder per key


@needs_compiler
def test_build_says_so_and_a_second_checkout_reuses_it(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("HEAL_KERNELS_NO_BUILD", raising=False)
    monkeypatch.setattr(cpu, "_CACHE", {})
    monkeypatch.setattr(cpu, "_BUILT", {})
    a = _checkout(tmp_path / "a")
    b = _checkout(tmp_path / "b")

    mod = cpu.load_extension("heal_test_tiny", [str(a)])
    err = capfd.readouterr().err
    assert mod is not None and mod.add(2, 3) == 5
    assert "heal: building heal's C++ kernels (heal_test_tiny), once per source version" in err
    assert "heal: built heal_test_tiny in " in err
    assert set(cpu.builds_this_process()) == {"heal_test_tiny"}
    tagged = cpu._tagged_name("heal_test_tiny", [a])
    so = tmp_path / "ext" / tagged / f"{tagged}.so"
    assert so.is_file()
    stamp = so.stat().st_mtime_ns

    # a second checkout (other path, same bytes) in a fresh process: loads the build, compiles
    # nothing, never runs torch's builder (whose ninja file names the first checkout's paths)
    script = textwrap.dedent(f"""\
        import torch.utils.cpp_extension as ce
        def refuse(*a, **k):
            raise SystemExit("cpp_extension.load was called")
        ce.load = refuse
        from heal_kernels import cpu
        mod = cpu.load_extension("heal_test_tiny", [{str(b)!r}])
        print("add", mod.add(20, 22), "built", sorted(cpu.builds_this_process()))
        """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "add 42 built []"
    assert "heal:" not in run.stderr  # quiet when cached
    assert so.stat().st_mtime_ns == stamp

    # an edited source is a new build, announced again, next to the old one
    b.write_text(TINY.replace("{ m.def", "{  m.def"))
    monkeypatch.setattr(cpu, "_CACHE", {})
    assert cpu.load_extension("heal_test_tiny", [str(b)]).add(1, 1) == 2
    assert "heal: building heal's C++ kernels (heal_test_tiny)" in capfd.readouterr().err
    assert so.is_file() and len(list((tmp_path / "ext").iterdir())) == 2
