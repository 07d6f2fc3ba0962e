"""A local transformers model as a backend, with constrained tool calls so even a 135M model produces usable
ones.

Loading lives in agent.backends.hf_loading, the prompt in hf_prompt, the decoder in hf_decoder.
`adapter=DIR` puts a tuned peft adapter (`python -m agent.tune train`) on the model
(agent.backends.hf_adapter);
`adapter=None` is the adapter shipped in the package on the packaged model (agent/backends/adapters/, none
for another model), "none" the base model.

Decoding, chosen because a 135M instruct model cannot be trusted to write a tool call (documented in the
report):
- Prompt: the model's chat template. If the template knows `tools`, tools and tool calls go through it;
otherwise the tool
  list is described in the system message and earlier calls/results are rendered as
  `<tool_call>{json}</tool_call>` /
  "Result of <tool>: ..." turns.
- constrained=True (default): every reply is one tool call in the form
  `<tool_call>\\n{"name": "<tool>", "arguments": {...}}\\n</tool_call>`. The tool name is picked by comparing
  the
  log-likelihood of each allowed name as a continuation (lm-evaluation-harness style, sum of token log-probs).
  The
  arguments are written after forced JSON prefixes, property by property from the tool's JSON schema: enums
  and booleans
  by log-likelihood of each allowed value; `patch_id`/`patch_ids` by log-likelihood among the patch ids seen
  in the
  conversation's tool results (so ids cannot be invented); other integers/numbers by greedy decoding
  restricted to digit
  tokens, then clamped to the schema's bounds; strings (reasons) by free greedy decoding, stopped at a quote;
  arrays item by item, continuing while "," is likelier than "]" (bounded by maxItems and `max_items`;
  `max_ids` for a region's patch ids). Optional
  properties without an enum/boolean type keep their defaults. Once `report_after` tool results are in the
  conversation only the terminal tool (report_suspects) may be chosen: a 135M model otherwise keeps looking
  forever. The result is checked against the JSON schema with
  `jsonschema` when that package is importable.
- constrained=False: plain greedy generation (max_new_tokens), then the first `<tool_call>`/JSON object is
parsed; this
  mode measures how often the model writes a valid call by itself.
Greedy everywhere, so replies are deterministic.
"""

from __future__ import annotations

import json
import os
import threading
import time
import types

from agent.backends.base import BackendUnavailable, LLMReply, ToolCall, Usage, recorded_count, tool_names
from agent.backends.hf_adapter import check_row_threshold, rows_settings
from agent.backends.hf_decoder import Decoder
from agent.backends.hf_loading import PACKAGED_GGUF, cache_root, load_model, packaged_gguf  # noqa: F401 -- API
from agent.backends.hf_prompt import CALL_CLOSE, CALL_OPEN, build_prompt, parse_free_tool_call, seen_patch_ids
from agent.backends.hf_rows import (
    ROW_LIMIT,
    row_preamble,
    row_questions,
    row_scores,
    rows_report_arguments,
)
from agent.backends.overview import overview_text, parse_overview_table, row_reason, select_rows
from agent.backends.policy import report_limits

PATCH_ID_FIELDS = {"patch_id", "patch_ids"}
DECODED_IDS = 6  # patch ids a decoded region names at most, unless max_ids says otherwise


class HFBackend:
    name = "hf"
    uses_guidance = False  # by default the guidance is not in its prompt (guidance_in_prompt)
    accepts_seconds_left = True  # chat(..., seconds_left=) stops generating by then (the loop's time budget)

    def __init__(
        self,
        model: str | None = None,
        *,
        gguf_file: str | None = None,
        constrained: bool = True,
        max_new_tokens: int = 160,
        max_items: int = 3,
        max_ids: int | None = None,
        max_string_tokens: int = 24,
        max_prompt_tokens: int = 6000,
        patch_ids: list[int] | None = None,
        seed: int = 0,
        threads: int | None = None,
        report_after: int | None | str = "auto",
        terminal_tool: str = "report_suspects",
        adapter: str | None = None,
        empty_arrays: bool | None = None,
        verbalization: str | None = None,
        reasons: str = "auto",
        row_share: float = 0.15,
        row_threshold: float | str | None = None,
        guidance_in_prompt: bool = False,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        check_row_threshold(row_threshold)  # before the model loads
        try:
            import torch
            import transformers
        except ImportError as err:
            raise BackendUnavailable(
                f"hf backend needs the hf extra (pip install 'scanagent[hf]'): {err}"
            ) from err
        self.torch = torch
        # False (the default): the user's guidance is not put in the prompt (agent.pipeline); the pipeline
        # applies it to the report (agent.guided_report). Why: measured (README, "Normal-feature guidance by
        # learned recognisers"), the tuned 135M model reports fewer rows whenever its prompt has guidance, and
        # its reading adds nothing to the report filter's. True puts the guidance back in the prompt
        self.guidance_in_prompt = bool(guidance_in_prompt)
        self.uses_guidance = self.guidance_in_prompt
        torch.manual_seed(seed)
        if (
            threads is not None
        ):  # on a shared machine, fewer threads than cores avoids oversubscription stalls
            torch.set_num_threads(threads)
        self.source, self.model, self.tokenizer = load_model(torch, transformers, model, gguf_file)
        self.model.eval()
        # a tuned adapter (agent.backends.hf_adapter); "none" or None = the base model
        self.adapter, self._forward_override, self.recipe = None, None, {}
        if adapter is None and model is None:  # the packaged model gets the packaged adapter, when shipped
            from agent.backends.hf_adapter import packaged_adapter

            shipped = packaged_adapter()
            adapter = str(shipped) if shipped is not None else None
        if adapter is not None and str(adapter) != "none":
            from agent.backends.hf_adapter import apply_adapter

            self.model, self._forward_override, self.recipe = apply_adapter(self.model, torch, adapter)
            self.adapter = str(adapter)
        # the overview size the adapter was trained on (agent.pipeline reads it); None = the configured budget
        self.overview_tokens: int | None = self.recipe.get("overview_tokens")
        # the overview it reads (agent.pipeline): the adapter's, else the compact one a 135M model can use
        self.verbalization: str = verbalization or self.recipe.get("verbalization") or "compact"
        if self.verbalization not in ("compact", "full"):
            raise BackendUnavailable(
                f"hf backend: verbalization must be compact or full, got {verbalization!r}"
            )
        # the compact overview's rows it was trained on (agent.pipeline reads it); None = the default 8
        try:
            self.compact_rows = recorded_count(
                self.recipe.get("compact_rows"), f"hf backend: the recipe of {self.adapter}", "compact_rows"
            )
        except ValueError as err:
            raise BackendUnavailable(str(err)) from None
        # arrays without minItems may be empty (an empty report); off for the base model, as it was measured
        self.empty_arrays = self.adapter is not None if empty_arrays is None else empty_arrays
        self.constrained = constrained
        self.max_new_tokens = max_new_tokens
        self.max_items = max_items  # items of an array (regions of a report)
        # patch ids of one region (a defect across several patches needs them all); None: the mode's own
        # bound, DECODED_IDS for a decoded report, ROW_LIMIT for one made of scored rows
        self.max_ids = max_ids
        self.max_string_tokens = max_string_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.fixed_patch_ids = patch_ids
        # "auto": an adapter trained on the report decision alone (recipe target "decisions": one-turn
        # episodes, the tool name never in its loss) reports at once; otherwise after 3 tool results. The
        # first such adapter, left to choose, called list_patches three times (35-60 s a turn) first.
        target = self.recipe.get("config", {}).get("target")
        # an adapter trained on a yes/no per shown row (agent.backends.hf_rows) scores the rows and reports
        # those at or above the threshold its training found, in the same single turn, at the operating point
        # asked (agent.backends.overview.OPERATING_POINTS; default: the recipe's best F2)
        self.row_threshold, self.row_question, self.operating_point = rows_settings(
            self.recipe, str(self.adapter), row_threshold
        )
        trained_on_decisions = target in ("decisions", "rows")
        if report_after == "auto":
            report_after = 0 if trained_on_decisions else 3
        if report_after is not None and not isinstance(report_after, int):
            raise BackendUnavailable(
                f"hf backend: report_after must be a number or auto, got {report_after!r}"
            )
        self.report_after = report_after
        # "auto": an adapter trained on the decisions alone never learned to write a reason (its free text was
        # "1.0.0.1.1...", one slow token at a time), so a region's reason quotes the overview row of its first
        # patch, as the ranker's does; otherwise (and with "model") the model writes it
        if reasons not in ("auto", "model", "statistics"):
            raise BackendUnavailable(
                f"hf backend: reasons must be auto, model or statistics, got {reasons!r}"
            )
        self.reasons = ("statistics" if trained_on_decisions else "model") if reasons == "auto" else reasons
        self._rows: dict[int, dict[str, float]] = {}  # the overview's rows by patch id (this call's)
        self._region_ids: list[int] = []  # the patch ids of the region being written
        self.terminal_tool = terminal_tool
        self.row_share = row_share  # with a rows adapter: the share of the scan's points a report may name
        self.template_has_tools = "tools" in (self.tokenizer.chat_template or "")
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        decoded = {
            i: self.tokenizer.decode([i]) for i, t in enumerate(vocab) if t is not None and len(t) <= 4
        }
        self._digit_ids = {i for i, s in decoded.items() if s and s.strip() == s and s.isdigit()}
        self._number_ids = self._digit_ids | {i for i, s in decoded.items() if s in (".", "-")}
        self._stop_ids = {i for i in (self.tokenizer.eos_token_id,) if i is not None}
        for special in ("<|im_end|>", "<|endoftext|>"):
            sid = self.tokenizer.convert_tokens_to_ids(special)
            if isinstance(sid, int) and sid != self.tokenizer.unk_token_id:
                self._stop_ids.add(sid)
        self._calls = 0
        # one decoder for every call, so a prompt's KV cache is reused for what the next prompt shares with it
        # (the system message and tools: about a third of a compact prompt's tokens)
        self._decoder = Decoder(self.model, self.tokenizer, self.torch)
        if self._forward_override is not None:  # prompt tuning: virtual tokens at the start of every cache
            self._decoder._forward = types.MethodType(self._forward_override, self._decoder)  # type: ignore[method-assign]
        self._decoder_lock = threading.Lock()

    # -- constrained arguments
    # ----------------------------------------------------------------------------------------
    def _value(
        self,
        dec: Decoder,
        schema: dict,
        field: str,
        endings: tuple[str, ...],
        ids: list[int] | None,
    ) -> None:
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
        elif kind == "string" and field == "reason" and self.reasons == "statistics":
            first = self._region_ids[0] if self._region_ids else None
            row = self._rows.get(first) if first is not None else None
            text = f"overview row of patch {first}: {row_reason(row)}" if row else "named by the model"
            text = text[: schema.get("maxLength", 10_000)].ljust(schema.get("minLength", 0), ".")
            dec.extend(json.dumps(text))
        elif kind == "string":
            dec.extend('"')
            produced = dec.generate(None, self._stop_ids, self.max_string_tokens, stop_text='"')
            cleaned = produced.replace("\\", "").replace("\n", " ")[: schema.get("maxLength", 10_000)]
            if len(cleaned) < schema.get("minLength", 0):
                cleaned = cleaned.ljust(schema["minLength"], ".")
            dec.set_text(dec.text[: len(dec.text) - len(produced)] + cleaned)
            dec.extend('"')
        elif kind == "array":
            self._array(dec, schema, field, ids)
        elif kind == "object" or "properties" in schema:
            self._object(dec, schema, ids)
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

    def _array(self, dec: Decoder, schema: dict, field: str, ids: list[int] | None) -> None:
        items = schema.get("items", {})
        lo = schema.get("minItems", 0 if self.empty_arrays else 1)
        ids_cap = DECODED_IDS if self.max_ids is None else self.max_ids
        cap = ids_cap if field == "patch_ids" else self.max_items
        hi = min(schema.get("maxItems", cap), max(cap, lo))
        remaining = list(ids) if ids else None
        if field == "patch_ids":
            self._region_ids = []
        dec.extend("[")
        if lo == 0 and "properties" in items and dec.choose(["]", "{"]) == "]":
            dec.extend("]")
            return
        count = 0
        while True:
            item_field = "patch_id" if field == "patch_ids" else field
            before = dec.text
            self._value(dec, items, item_field, (",", "]"), remaining)
            count += 1
            if remaining is not None and item_field == "patch_id":
                chosen = int(dec.text[len(before) :])
                self._region_ids.append(chosen)
                remaining = [i for i in remaining if i != chosen] or None
            if count >= hi or (item_field == "patch_id" and not remaining):
                break
            if count >= lo and dec.choose(["]", ", "]) == "]":
                break
            dec.extend(", ")
        dec.extend("]")

    def _object(self, dec: Decoder, schema: dict, ids: list[int] | None) -> None:
        required = set(schema.get("required", []))
        props = [
            (k, v)
            for k, v in schema.get("properties", {}).items()
            if k in required or "enum" in v or v.get("type") == "boolean"
        ]
        dec.extend("{")
        for n, (key, sub) in enumerate(props):
            dec.extend(("" if n == 0 else ", ") + json.dumps(key) + ": ")
            endings = (", ",) if n < len(props) - 1 else ("}",)
            self._value(dec, sub, key, endings, ids)
        dec.extend("}")

    # -- the Backend interface
    # ----------------------------------------------------------------------------------------
    def prompt(self, messages: list[dict], tools: list[dict]) -> str:
        """The exact prompt text a reply to `messages` is decoded after (what agent.tune trains on)."""
        return build_prompt(
            self.tokenizer,
            messages,
            tools,
            self.template_has_tools,
            self.max_prompt_tokens,
            brief_tools=self.verbalization == "compact",
        )

    def chat(self, messages: list[dict], tools: list[dict], *, seconds_left: float | None = None) -> LLMReply:
        """One reply; with `seconds_left` no forward pass starts after that many seconds (TimeoutError), so a
        call
        the loop gave up on stops computing instead of competing with the fallback."""
        deadline = None if seconds_left is None else time.monotonic() + seconds_left
        prompt = self.prompt(messages, tools)
        with self._decoder_lock:  # a call the loop gave up on stops at its next forward pass (the deadline)
            dec = self._decoder
            dec.deadline, dec.generated = deadline, 0
            try:
                dec.set_text(prompt)  # the cache keeps what this prompt shares with the last one
                dec.flush()
                prompt_tokens = len(dec.ids)
                self._calls += 1
                call_id = f"hf_{self._calls}"
                if self._scores_rows(messages, tools):
                    reply = self._rows_call(dec, messages, tools, call_id)
                elif self.constrained and tools:
                    reply = self._constrained_call(dec, messages, tools, call_id)
                else:
                    reply = self._free_reply(dec, tools, call_id)
            except BaseException:
                dec.reset()  # stopped part-way: its cache may not match its tokens
                raise
            # Like a server's count: every token of the reply (forced JSON punctuation included), not only
            # the decided ones.
            reply_tokens = len(dec._encode(dec.text)) - prompt_tokens
        reply.usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=max(reply_tokens, 1))
        return reply

    def _constrained_call(
        self, dec: Decoder, messages: list[dict], tools: list[dict], call_id: str
    ) -> LLMReply:
        start = len(dec.text)
        dec.extend(CALL_OPEN + '{"name": "')
        names = [t["function"]["name"] for t in tools]
        n_results = sum(1 for m in messages if m.get("role") == "tool")
        if self.report_after is not None and n_results >= self.report_after and self.terminal_tool in names:
            names = [
                self.terminal_tool
            ]  # a small model tends to look forever; after enough look-ups it must answer
        name = dec.choose(names, ('"',))
        dec.extend(name + '", "arguments": ')
        args_start = len(dec.text)
        schema = next(
            t["function"].get("parameters") or {"type": "object"}
            for t in tools
            if t["function"]["name"] == name
        )
        ids = self.fixed_patch_ids or seen_patch_ids(messages) or None  # the overview's and tools' ids
        self._rows = {int(r["id"]): r for r in parse_overview_table(overview_text(messages))[0]}
        self._object(dec, schema, ids)
        arguments = dec.text[args_start:]
        dec.extend("}" + CALL_CLOSE)
        self._validate(arguments, schema)
        return LLMReply(
            text=None, tool_calls=[ToolCall(id=call_id, name=name, arguments=arguments)], raw=dec.text[start:]
        )

    def _scores_rows(self, messages: list[dict], tools: list[dict]) -> bool:
        """A rows adapter reports by scoring the overview's rows when the report tool is offered and there is
        a patch table to score; a conversation without one is decoded like any other."""
        if self.row_threshold is None or self.terminal_tool not in tool_names(tools):
            return False
        return bool(parse_overview_table(overview_text(messages))[0])

    def _rows_call(self, dec: Decoder, messages: list[dict], tools: list[dict], call_id: str) -> LLMReply:
        """The terminal call from the model's yes/no score of every shown row (agent.backends.hf_rows)."""
        overview = overview_text(messages)
        rows, total = parse_overview_table(overview)
        ids, questions = row_questions(self.row_question, overview)
        scores = row_scores(dec, questions, row_preamble(self.row_question, overview))
        ranked = sorted(zip(ids, scores, rows), key=lambda t: (-t[1], t[0]))
        max_regions, max_ids = report_limits(tools)
        own = ROW_LIMIT if self.max_ids is None else self.max_ids
        limit = min(own, max_ids or own)
        chosen = select_rows(ranked, float(self.row_threshold or 0.0), limit, self.row_share, total)
        arguments = rows_report_arguments(chosen, max_regions, "tuned model")
        schema = next(
            t["function"].get("parameters") or {}
            for t in tools
            if t["function"]["name"] == self.terminal_tool
        )
        self._validate(arguments, schema)
        raw = CALL_OPEN + f'{{"name": "{self.terminal_tool}", "arguments": {arguments}}}' + CALL_CLOSE
        dec.extend(raw)
        return LLMReply(
            text=None,
            tool_calls=[ToolCall(id=call_id, name=self.terminal_tool, arguments=arguments)],
            raw=raw,
        )

    @staticmethod
    def _validate(arguments: str, schema: dict) -> None:
        """Check the constructed arguments against the tool's JSON schema (a bug here is ours, not the
        model's)."""
        try:
            import jsonschema
        except ImportError:
            return
        jsonschema.validate(json.loads(arguments), schema)

    def _free_reply(self, dec: Decoder, tools: list[dict], call_id: str) -> LLMReply:
        produced = dec.generate(None, self._stop_ids, self.max_new_tokens)
        call = parse_free_tool_call(produced, call_id) if tools else None
        if call is None:
            return LLMReply(text=produced, tool_calls=[], raw=produced)
        return LLMReply(text=None, tool_calls=[call], raw=produced)
