"""Tune the packaged SmolLM2 on inspection episodes: LoRA or prompt tuning (peft), on CPU, deterministic by
seed.

Each training example is the prompt the hf backend would decode after (`HFBackend.prompt`: the chat template
with
the tool list) followed by the text its constrained decoder writes for the episode's target call
(`<tool_call>{"name": "report_suspects", "arguments": ...}</tool_call>`); the loss is on the target tokens
only.
Episodes whose prompt is longer than `max_tokens` are skipped (counted in the recipe), one example per step in
a
seeded order, AdamW, a fixed number of steps (or fewer when `max_minutes` runs out: the recipe says how many
ran).

Output folder: peft's adapter_config.json + adapter_model.safetensors, recipe.json (method, seed, steps,
episodes
hash, overview tokens, losses) and SHA256SUMS, written to a temporary folder and renamed, so a folder either
holds a
whole adapter or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.backends.hf_adapter import CHECKSUM_FILE, RECIPE_FILE, file_sha256
from agent.backends.hf_backend import CALL_CLOSE, CALL_OPEN
from agent.tune.episodes import EPISODES_FILE, MANIFEST_FILE

PROMPT_INIT = "Name only the patches whose statistics show a defect; report none on a normal scan."


@dataclass(frozen=True)
class TrainConfig:
    method: str = "lora"  # "lora" | "prompt"
    steps: int = 200
    lr: float | None = None  # default: 2e-4 for LoRA, 3e-2 for prompt tuning
    lora_rank: int = 8
    lora_alpha: int = 16
    # LoRA on the last this many decoder layers only: the frozen layers below need no backward pass (their
    # inputs need no gradient), which is most of a CPU step's cost; 0 = every layer
    lora_layers: int = 8
    virtual_tokens: int = 16
    max_tokens: int = 3072  # longer examples are skipped
    # "decisions": the loss covers the call from the regions list to the end of the first region's ids: what
    # the constrained decoder decides from the model's likelihoods (report or not, which ids, when to stop).
    # The forced prefix (tool name, keys) is prompt; the reason and confidence are left to the base model.
    # With "full" (the whole call) ~40 free-text tokens dominate the mean loss: a LoRA trained 247 steps that
    # way wrote empty reports on every scan, training ones included (log-likelihood of the empty report -0.5,
    # of the target -10.7). "rows": a yes/no per shown row (agent.tune.row_training), LoRA only.
    target: str = "decisions"
    # target rows: how a row is asked about (agent.backends.hf_rows.ROW_QUESTIONS); quoting the line scored
    # rows better on held-out episodes (README, The tuned agent)
    row_question: str = "line"
    threads: int = 2
    seed: int = 0
    max_minutes: float | None = None

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.method == "lora" else 3e-2)


REGIONS_KEY = '"regions":'  # the decoder forces the call up to here; SmolLM2's tokens split cleanly after it


def target_text(episode: dict, target: str = "full") -> str:
    """What the constrained hf decoder writes for the episode's target call (its exact spacing), then end of
    turn; with ``target="decisions"``, only up to the end of the first region's patch ids (TrainConfig)."""
    call = episode["target"]["tool_calls"][0]["function"]
    text = CALL_OPEN + f'{{"name": "{call["name"]}", "arguments": {call["arguments"]}}}' + CALL_CLOSE
    if target == "full":
        return text
    if target != "decisions":
        raise ValueError(f"unknown target {target!r}; use full or decisions")
    regions = json.loads(call["arguments"])["regions"]
    head = text.partition(REGIONS_KEY)[0] + REGIONS_KEY + " ["
    if not regions:
        return head + "]"
    return head + '{"patch_ids": [' + ", ".join(str(i) for i in regions[0]["patch_ids"]) + "]"


def episodes_hash(directory: Path) -> str:
    return file_sha256(directory / EPISODES_FILE)


def build_examples(
    backend: Any, episodes: list[dict], max_tokens: int, target_kind: str = "full"
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(prompt ids, target ids) per episode within `max_tokens`, and how many were skipped as too long."""
    tok = backend.tokenizer
    end = tok.eos_token or ""
    examples, skipped = [], 0
    for episode in episodes:
        prompt = tok(backend.prompt(episode["messages"], episode["tools"]), add_special_tokens=False)[
            "input_ids"
        ]
        text = target_text(episode, target_kind)
        head = ""
        if target_kind == "decisions":  # the decoder forces everything up to the regions list: no loss on it
            head, _, rest = text.partition(REGIONS_KEY)
            head, text = head + REGIONS_KEY, rest
        prompt = prompt + tok(head, add_special_tokens=False)["input_ids"] if head else prompt
        target = tok(text + (end if target_kind == "full" else ""), add_special_tokens=False)["input_ids"]
        if len(prompt) + len(target) > max_tokens:
            skipped += 1
            continue
        examples.append((prompt, target))
    return examples, skipped


def peft_model(model: Any, tokenizer: Any, config: TrainConfig, torch: Any) -> Any:
    """The base model wrapped with a fresh LoRA or prompt-tuning adapter (seeded initialisation)."""
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(config.seed)
    if config.method == "lora":
        n_layers = int(model.config.num_hidden_layers)
        top = min(config.lora_layers, n_layers) if config.lora_layers > 0 else n_layers
        spec = LoraConfig(
            layers_to_transform=list(range(n_layers - top, n_layers)),
            task_type=TaskType.CAUSAL_LM,
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
        return get_peft_model(model, spec)
    if config.method != "prompt":
        raise ValueError(f"unknown method {config.method!r}; use lora or prompt")
    tuned = get_peft_model(
        model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.virtual_tokens)
    )
    # start from the embeddings of a task sentence (peft's TEXT init would load a tokenizer by name)
    ids = tokenizer(PROMPT_INIT, add_special_tokens=False)["input_ids"]
    ids = (ids * (config.virtual_tokens // max(len(ids), 1) + 1))[: config.virtual_tokens]
    with torch.no_grad():
        words = model.get_input_embeddings()(torch.tensor(ids))
        tuned.prompt_encoder["default"].embedding.weight.copy_(words)
    return tuned


def target_loss(model: Any, torch: Any, prompt: list[int], target: list[int]) -> Any:
    """Mean cross-entropy of the target tokens after the prompt (and the virtual tokens, for prompt tuning).

    The vocabulary projection runs on the target positions only: over a 2k-token prompt, full logits are
    most of
    the memory of a step and none of its loss."""
    base = model.get_base_model()
    embeds = base.get_input_embeddings()(torch.tensor([prompt + target]))
    if model.peft_config["default"].is_prompt_learning:
        embeds = torch.cat([model.get_prompt(batch_size=1).to(embeds.dtype), embeds], dim=1)
    hidden = base.model(inputs_embeds=embeds).last_hidden_state
    start = hidden.shape[1] - len(target) - 1
    logits = base.lm_head(hidden[0, start:-1])
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(target))


def train_adapter(
    episodes_dir: Path,
    out: Path,
    config: TrainConfig,
    *,
    episodes: list[dict],
    backend_factory: Callable[[], Any],
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Train one adapter on `episodes` (the training split) and write it to `out`; returns the recipe."""
    backend = backend_factory()
    torch = backend.torch
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rows = config.target == "rows"  # a yes/no per shown row (agent.tune.row_training)
    if rows and config.method != "lora":
        raise ValueError("target rows trains a LoRA adapter only (--method lora)")
    if rows:
        from agent.tune import row_training

        yes_no = row_training.answer_tokens(backend.tokenizer)
        row_examples, skipped = row_training.row_examples(
            backend, episodes, config.max_tokens, config.row_question
        )
        pos_weight = row_training.positive_weight(row_examples) if row_examples else 1.0
        examples: list[Any] = row_examples
    else:
        examples, skipped = build_examples(backend, episodes, config.max_tokens, config.target)
    if not examples:
        raise ValueError(f"{episodes_dir}: no training episode fits in {config.max_tokens} tokens")
    model = peft_model(backend.model, backend.tokenizer, config, torch)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=config.learning_rate(), weight_decay=0.0)
    order = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    started = time.perf_counter()
    cpu_started = time.process_time()
    cpu_seconds = 0.0
    steps_done = 0
    sequence: list[int] = []
    for step in range(config.steps):
        if config.max_minutes is not None and time.perf_counter() - started > 60 * config.max_minutes:
            break
        if not sequence:
            sequence = torch.randperm(len(examples), generator=order).tolist()
        example = examples[sequence.pop()]
        if rows:
            loss = row_training.row_loss(model, torch, example, yes_no, pos_weight)
        else:
            loss = target_loss(model, torch, *example)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        losses.append(round(float(loss.detach()), 4))
        cpu_seconds = time.process_time() - cpu_started
        steps_done = step + 1
        if progress is not None and (step % 10 == 0 or step == config.steps - 1):
            progress(
                f"step {step + 1}/{config.steps} loss {float(loss.detach()):.3f} "
                f"({time.perf_counter() - started:.0f} s, {cpu_seconds:.0f} s CPU)"
            )
    train_seconds = time.perf_counter() - started
    threshold = {}
    if rows:  # the report's cut-off, on the trained model (eval mode: no dropout; there is none anyway)
        model.eval()
        threshold = row_training.fitted_threshold(model, torch, examples, yes_no)
        threshold["positive_weight"] = round(pos_weight, 4)
    manifest_path = episodes_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    recipe = {
        "format": "scanagent-adapter",
        "method": config.method,
        "config": asdict(config),
        "learning_rate": config.learning_rate(),  # the one used (config.lr None = the method's default)
        "steps_done": steps_done,
        "examples": len(examples),
        "skipped_too_long": skipped,
        "episodes": Path(episodes_dir).name,  # its name, no path of this machine: the hash says which
        "scans_per_part": manifest.get("config", {}).get("scans_per_part"),  # to make the episodes again
        "feature_share": manifest.get("config", {}).get("feature_share"),  # None: made before features
        "guided_per_scan": manifest.get("config", {}).get("guided_per_scan"),
        "severity": manifest.get("config", {}).get("severity"),  # None: made before the flag (1 1)
        "episodes_sha256": episodes_hash(episodes_dir),
        "overview_tokens": manifest.get("config", {}).get("overview_tokens"),
        "verbalization": manifest.get("config", {}).get("verbalization", "full"),
        "compact_rows": manifest.get("config", {}).get("compact_rows"),  # None: episodes made before the flag
        "base_model": os.path.basename(str(backend.source)),
        "seconds": round(train_seconds, 1),  # the training steps (a rows threshold's pass is not counted)
        # CPU time of the training loop (all threads): with 2 free cores, wall time is about half of it
        "cpu_seconds": round(cpu_seconds, 1),
        "steps_per_second": round(steps_done / max(train_seconds, 1e-9), 4),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "loss_first10": losses[:10],
        "loss_last10": losses[-10:],
        **threshold,
    }
    write_adapter(model, out, recipe)
    if not model.peft_config["default"].is_prompt_learning:
        model.unload()  # LoRA layers were injected into the backend's model: take them out again
    return recipe


def retrain_commands(recipe: dict) -> str:
    """The two commands that make this adapter again (episodes with the recipe's overview rows, then training
    with its method, target, row question, learning rate and the steps it ran)."""
    config = recipe.get("config", {})
    episodes = "python -m agent.tune episodes --out EPISODES"
    if recipe.get("scans_per_part"):
        episodes += f" --scans-per-part {recipe['scans_per_part']}"
    if recipe.get("compact_rows"):
        episodes += f" --compact-rows {recipe['compact_rows']}"
    if recipe.get("feature_share") is not None:
        episodes += f" --feature-share {recipe['feature_share']}"
    if recipe.get("guided_per_scan") not in (None, 1):
        episodes += f" --guided-per-scan {recipe['guided_per_scan']}"
    if recipe.get("severity") not in (None, [1.0, 1.0]):
        low, high = recipe["severity"]
        episodes += f" --severity {low} {high}"
    train = f"python -m agent.tune train --episodes EPISODES --out DIR --method {recipe.get('method')}"
    if config.get("target", "decisions") != "decisions":
        train += f" --target {config['target']}"
    if config.get("target") == "rows":
        train += f" --row-question {config.get('row_question', 'id')}"
    if recipe.get("learning_rate") is not None:
        train += f" --lr {recipe['learning_rate']}"
    train += f" --steps {recipe.get('steps_done', config.get('steps'))} --threads {config.get('threads')}"
    return f"`{episodes}` then `{train}`"


def model_card(recipe: dict) -> str:
    """The adapter's README: what it is, what it was trained on and how, from its recipe (peft's own card is
    an empty template that names this machine's cache path)."""
    config = recipe.get("config", {})
    if config.get("target") == "rows":
        if recipe.get("row_threshold_recall") is not None:
            reaches = (
                f"{recipe['row_threshold_recall']}, the threshold with the best F2 (recall weighted twice) "
                f"on the training rows (`row_threshold=f1`: {recipe.get('row_threshold')}, the best F1)"
            )
        else:
            reaches = f"{recipe.get('row_threshold')}, the threshold with the best F1 on the training rows"
        job = (
            "answer yes or no for every patch row of scanagent's compact scan overview (is it a "
            f"defect?); the hf backend reports the rows whose log P(yes) - log P(no) reaches {reaches}."
        )
    else:
        job = (
            "read scanagent's compact scan overview and call `report_suspects` with the patches that carry a "
            "defect (an empty report on a normal scan), following operator guidance."
        )
    lines = [
        f"# scanagent inspection adapter ({recipe.get('method')})",
        "",
        f"A {recipe.get('method')} adapter for `{recipe.get('base_model')}` (the packaged "
        f"SmolLM2-135M-Instruct), trained by `python -m agent.tune train` to {job}",
        "",
        f"- episodes: `{recipe.get('episodes')}` (sha256 `{recipe.get('episodes_sha256')}`), "
        f"{recipe.get('examples')} training examples ({recipe.get('skipped_too_long')} skipped as too long), "
        f"{recipe.get('verbalization')} overview",
        f"- steps: {recipe.get('steps_done')} of {config.get('steps')}, "
        f"lr {recipe.get('learning_rate', config.get('lr'))}, seed "
        f"{config.get('seed')}, {config.get('threads')} thread(s), {recipe.get('seconds')} s wall",
        f"- loss, first / last 10 steps: {recipe.get('loss_first10')} / {recipe.get('loss_last10')}",
        "",
        "Every file here is listed in SHA256SUMS and checked when the hf backend loads the folder. "
        f"Retrain: {retrain_commands(recipe)}.",
    ]
    return "\n".join(lines) + "\n"


def finish_adapter_dir(directory: Path, recipe: dict) -> None:
    """recipe.json, our model card, the base model named by its file (not a cache path), then SHA256SUMS."""
    config_path = directory / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = recipe.get("base_model")
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True), encoding="utf-8")
    (directory / "README.md").write_text(model_card(recipe), encoding="utf-8")
    (directory / RECIPE_FILE).write_text(json.dumps(recipe, indent=1, sort_keys=True), encoding="utf-8")
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != CHECKSUM_FILE)
    sums = "".join(f"{file_sha256(directory / n)}  {n}\n" for n in names)
    (directory / CHECKSUM_FILE).write_text(sums, encoding="utf-8")


def write_adapter(model: Any, out: Path, recipe: dict) -> None:
    """peft's folder + recipe.json + model card + SHA256SUMS, through a temporary folder renamed at the
    end."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        finish_adapter_dir(tmp, recipe)
        if out.exists():  # never replace what is there (the CLI refuses earlier, with exit 2)
            raise FileExistsError(f"{out}: already exists; choose a new adapter folder")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def adapter_digest(out: Path) -> str:
    """One sha256 over the adapter's checksum file: the adapter's identity in reports."""
    return hashlib.sha256((out / CHECKSUM_FILE).read_bytes()).hexdigest()
