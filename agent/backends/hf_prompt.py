"""The hf backend's prompt: the conversation folded into what a local model's chat template can render.

If the template knows `tools`, tools and tool calls go through it; otherwise the tool list is described in the
system message and earlier calls/results are rendered as `<tool_call>{json}</tool_call>` / "Result of <tool>:
..."
turns. Also here: the patch ids the conversation has shown (the only ids a constrained call may name) and the
parser for a tool call a model wrote freely.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent.backends.base import ToolCall, parse_json_object, tool_call_names

CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"


def describe_tools(tools: list[dict], brief: bool = False) -> str:
    """The tool list for a template without tools; `brief` gives names and arguments only (the compact
    prompt for small models, where each description would cost more tokens than it teaches)."""
    lines = [
        "You can call these tools. Answer with exactly one call written as",
        '<tool_call>\n{"name": "<tool name>", "arguments": {<JSON arguments>}}\n</tool_call>',
        "Tools:",
    ]
    for t in tools:
        fn = t["function"]
        props = (fn.get("parameters") or {}).get("properties", {})
        args = ", ".join(f"{k}: {v.get('type', 'object')}" for k, v in props.items())
        summary = (fn.get("description") or "").strip().split("\n")[0]
        lines.append(f"- {fn['name']}({args})" + ("" if brief else f": {summary}"))
    return "\n".join(lines)


def template_messages(
    messages: list[dict], tools: list[dict], template_has_tools: bool, brief_tools: bool = False
) -> list[dict]:
    """Messages the chat template can render: tool turns folded into plain roles when it does not know
    tools."""
    names = tool_call_names(messages)
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if template_has_tools:
            if m.get("tool_calls"):
                calls = [
                    {
                        "type": "function",
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": parse_json_object(c["function"]["arguments"]) or {},
                        },
                    }
                    for c in m["tool_calls"]
                ]
                out.append({"role": "assistant", "content": content, "tool_calls": calls})
            else:
                out.append({"role": role, "content": content})
            continue
        if role == "assistant" and m.get("tool_calls"):
            content = "".join(
                CALL_OPEN
                + f'{{"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}}}'
                + CALL_CLOSE
                for c in m["tool_calls"]
            )
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            out.append(
                {
                    "role": "user",
                    "content": f"Result of {names.get(m.get('tool_call_id', ''), 'tool')}: {content}",
                }
            )
        else:
            out.append({"role": role, "content": content})
    if not template_has_tools:
        description = describe_tools(tools, brief_tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + description}
        else:
            out.insert(0, {"role": "system", "content": description})
    return out


def build_prompt(
    tokenizer: Any,
    messages: list[dict],
    tools: list[dict],
    template_has_tools: bool,
    max_prompt_tokens: int,
    brief_tools: bool = False,
) -> str:
    """The chat template's text for the conversation, its oldest long turns cut until it fits the budget."""
    msgs = template_messages(messages, tools, template_has_tools, brief_tools)
    kwargs = {"tools": tools} if template_has_tools else {}
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    # Too long for the budget: shorten the oldest long turns after the first two (system + task) until it
    # fits.
    for cut in range(2, len(msgs)):
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_prompt_tokens:
            break
        if len(msgs[cut]["content"]) > 400:
            msgs[cut] = {**msgs[cut], "content": msgs[cut]["content"][:400] + " ...[cut]"}
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    return text


def seen_patch_ids(messages: list[dict]) -> list[int]:
    """Patch ids that the overview's table and the tool results showed, in first-seen order: the only ids the
    model may name (the compact overview shows a few patches; naming another would be a guess)."""
    from agent.backends.overview import overview_text, parse_overview_table

    seen: dict[int, None] = {int(r["id"]): None for r in parse_overview_table(overview_text(messages))[0]}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k in ("patch_id", "patch_ids", "id", "neighbours", "neighbors"):
                    for x in v if isinstance(v, list) else [v]:
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


def parse_free_tool_call(text: str, call_id: str) -> ToolCall | None:
    """The first `{"name": ..., "arguments": ...}` in free text; arguments keep their raw text when not valid
    JSON."""
    match = re.search(r'"name"\s*:\s*"([^"]+)"', text)
    if match is None:
        return None
    rest = text[match.end() :]
    args_match = re.search(r'"arguments"\s*:\s*', rest)
    if args_match is None:
        return ToolCall(id=call_id, name=match.group(1), arguments="{}")
    raw = rest[args_match.end() :]
    try:
        _, end = json.JSONDecoder().raw_decode(raw)
        return ToolCall(id=call_id, name=match.group(1), arguments=raw[:end])
    except json.JSONDecodeError:  # keep the malformed text: the loop names the problem in its repair prompt
        return ToolCall(id=call_id, name=match.group(1), arguments=raw.split("</tool_call>")[0].strip())
