"""Tuned adapters on the hf backend's model: LoRA merged into the weights, prompt tuning as a cached prefix.

Why two paths: a LoRA adapter (peft) changes weights only, so it is merged once (`merge_and_unload`) and the
backend
decodes exactly as with the base model, at the same speed. Prompt tuning prepends learned "virtual token"
embeddings
to every input; peft does that inside `forward`, which would prepend them again on every incremental step of
the
backend's KV-cached decoder. So for prompt tuning the virtual tokens are run once into the cache, and the
decoder
sees a cache whose length excludes them (its crops are relative, so they keep the prefix).

An adapter folder is what `python -m agent.tune train` writes: adapter_config.json + adapter_model.safetensors
(peft's layout) + recipe.json (episodes hash, seed, steps, method, overview tokens) + SHA256SUMS.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from agent.backends.base import BackendUnavailable
from agent.backends.hf_rows import ROW_QUESTIONS
from agent.backends.overview import operating_threshold

RECIPE_FILE = "recipe.json"
CHECKSUM_FILE = "SHA256SUMS"
# the adapter shipped in the package (agent/backends/adapters/<name>/), loaded by default on the
# packaged model
PACKAGED_ADAPTER = "smollm2-135m-inspect"


def packaged_adapter() -> Path | None:
    """The shipped adapter's folder, or None when this install has none (then the base model is used)."""
    folder = Path(__file__).resolve().parent / "adapters" / PACKAGED_ADAPTER
    return folder if (folder / "adapter_config.json").is_file() else None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_recipe(directory: Path) -> dict:
    """The adapter's recipe (empty for a plain peft folder without one)."""
    path = directory / RECIPE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BackendUnavailable(f"hf backend: {path} is not JSON ({err.msg})") from None


def check_adapter_dir(directory: Path) -> None:
    """Refuse a folder that is not a peft adapter, or whose files do not match the checksums written with
    it."""
    if not directory.is_dir():
        raise BackendUnavailable(f"hf backend: adapter folder {directory} does not exist or is not a folder")
    if not (directory / "adapter_config.json").is_file():
        raise BackendUnavailable(
            f"hf backend: {directory} has no adapter_config.json (not a peft adapter folder)"
        )
    sums = directory / CHECKSUM_FILE
    if not sums.is_file():
        return
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        target = directory / name
        if not target.is_file() or file_sha256(target) != digest:
            raise BackendUnavailable(f"hf backend: {target} does not match its checksum in {sums}")
    rows_settings(read_recipe(directory), str(directory))


def rows_settings(
    recipe: dict, source: str, threshold: object = None
) -> tuple[float | None, str, str | None]:
    """(the report threshold, the row question form, the operating point) of an adapter trained on a yes/no
    per overview row (recipe target "rows"; agent.backends.hf_rows); (None, "id", None) for any other adapter.
    `threshold` picks the operating point (`agent.backends.overview.operating_threshold`): by default the
    recipe's best-F2 threshold, or its best-F1 one where it records none. A rows recipe without a threshold,
    with an unknown form, or an option it cannot meet is refused here, before the model loads."""
    config = recipe.get("config", {})
    form = str(config.get("row_question", "id"))
    if config.get("target") != "rows":
        if threshold is not None:
            raise BackendUnavailable(
                "hf backend: row_threshold needs an adapter trained on rows (recipe target rows)"
            )
        return None, form, None
    try:
        best_f1 = float(recipe["row_threshold"])
        recall = recipe.get("row_threshold_recall")
        best_f2 = None if recall is None else float(recall)
    except (KeyError, TypeError, ValueError):
        raise BackendUnavailable(
            f"hf backend: the recipe of {source} has target rows but no row_threshold"
        ) from None
    if form not in ROW_QUESTIONS:
        raise BackendUnavailable(
            f"hf backend: the recipe of {source} asks rows in an unknown form {form!r} "
            f"(known: {', '.join(ROW_QUESTIONS)})"
        )
    try:
        value, point = operating_threshold(threshold, best_f1, best_f2, f"the recipe of {source}")
    except ValueError as err:
        raise BackendUnavailable(f"hf backend: {err}") from None
    return value, form, point


def check_row_threshold(option: object) -> None:
    """Refuse a row_threshold option that is neither an operating point nor a finite number (it may come
    from a command line as any text), before the model loads."""
    try:
        operating_threshold(option, 0.0, 0.0, "row_threshold")
    except ValueError as err:
        raise BackendUnavailable(f"hf backend: {err}") from None


class OffsetCache:
    """The decoder's view of a KV cache that starts with `offset` virtual tokens: lengths exclude them."""

    def __init__(self, inner: Any, offset: int):
        self.inner, self.offset = inner, offset

    def get_seq_length(self) -> int:
        return self.inner.get_seq_length() - self.offset

    def crop(self, length: int) -> None:
        if length >= 0:  # an absolute length counts real tokens only
            length += self.offset
        self.inner.crop(length)


def prefix_forward(model: Any, torch: Any, virtual: Any) -> Any:
    """A decoder `_forward` replacement that starts every fresh cache with the virtual tokens."""
    from transformers import DynamicCache

    def forward(decoder: Any, new_ids: list[int], **model_kwargs: Any) -> Any:
        deadline = getattr(decoder, "deadline", None)  # the loop's time budget, as the plain decoder keeps it
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("hf backend: generation stopped at the call's time limit")
        if decoder.cache is None:
            inner = DynamicCache()
            with torch.no_grad():
                model(inputs_embeds=virtual[None], use_cache=True, **{decoder.cache_keyword: inner})
            decoder.cache = OffsetCache(inner, int(virtual.shape[0]))
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor([new_ids]),
                use_cache=True,
                **{decoder.cache_keyword: decoder.cache.inner},
                **model_kwargs,
            )
        return out.logits[0]

    return forward


def apply_adapter(model: Any, torch: Any, directory: str | Path) -> tuple[Any, Any, dict]:
    """(model to decode with, a `_forward` override or None, the recipe) for the adapter in `directory`."""
    path = Path(directory)
    check_adapter_dir(path)
    try:
        from peft import PeftModel
    except ImportError as err:
        raise BackendUnavailable(
            f"hf backend: loading an adapter needs peft (pip install 'scanagent[hf]'): {err}"
        )
    try:
        tuned = PeftModel.from_pretrained(model, str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise BackendUnavailable(f"hf backend: cannot load the adapter in {path}: {err}") from err
    tuned.eval()
    recipe = read_recipe(path)
    if tuned.peft_config["default"].is_prompt_learning:
        virtual = tuned.get_prompt_embedding_to_save("default").detach()
        base = tuned.get_base_model()
        return base, prefix_forward(base, torch, virtual), recipe
    return tuned.merge_and_unload(), None, recipe
