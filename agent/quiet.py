"""Quiet third-party output for the CLIs: no progress bars or library warnings in a normal run, all of it with -v.

Why: a run's terminal is the product's answer (verdicts, reasons); transformers' GGUF conversion bars, hub progress bars
and FutureWarnings from torch/transformers bury it and say nothing about the scan. tqdm reads its TQDM_* settings when
it is imported, so this must run before torch, transformers or tqdm are imported (first thing in a CLI's main).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

QUIET_ENV = {
    "TQDM_DISABLE": "1",                       # every tqdm bar (transformers' GGUF de-quantisation uses tqdm)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",       # huggingface_hub and transformers' own bars (weight loading)
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
NOISY_MODULES = r"(transformers|gguf|torch|accelerate|huggingface_hub|tqdm|open3d|faiss)(\.|$)"


def quiet_third_party(verbose: bool = False) -> None:
    """Silence third-party progress bars, warnings and info logs unless `verbose` (settings the user made in the
    environment are kept)."""
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module=NOISY_MODULES)
    for name in ("transformers", "huggingface_hub", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported already (in-process callers): its switches, not its env
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
