"""heal_kernels knows nothing of heal: no module under heal_kernels/ imports ``heal`` or ``heal.*``
(read with ``ast``, nothing imported; imports inside functions and ``if`` blocks count too)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "heal_kernels"
UPPER = "heal"


def _upward_imports(path: Path):
    """``(line, text)`` of every import of ``heal`` / ``heal.*`` in ``path`` (absolute imports: a
    relative import stays inside heal_kernels)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name == UPPER or name.startswith(UPPER + "."):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_heal_kernels_never_imports_heal():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) >= 10, f"found only {len(modules)} modules under {PACKAGE}"
    bad = [f"{p.relative_to(ROOT)}:{line}: {text}" for p in modules for line, text in _upward_imports(p)]
    assert not bad, "heal_kernels imports heal (the dependency points the other way):\n" + "\n".join(bad)


def test_the_check_sees_every_form(tmp_path):
    """The reader catches each spelling of an upward import, and leaves heal_kernels' own alone."""
    src = tmp_path / "m.py"
    src.write_text(
        "import heal\n"
        "import os, heal.bench.eda as e\n"
        "from heal import selection\n"
        "from heal.bench.eda import make_batch\n"
        "def f():\n"
        "    from heal.bench import eda\n"
        "if True:\n"
        "    import heal.cli\n"
        "import heal_kernels\n"
        "from heal_kernels.triton import aot\n"
        "from . import shapes\n"
        "from .heal import x\n"
        "import healthy\n"
    )
    assert [line for line, _ in _upward_imports(src)] == [1, 2, 3, 4, 6, 8]
