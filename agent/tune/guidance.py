"""Operator guidance for tuning episodes: what it says, how it changes the target, and paraphrases split
train/test.

Three kinds, each a set of paraphrases of one instruction. The first paraphrases of a set are used for
training
episodes and the last ones only for test episodes, so a measured gain on guided test episodes is not recall of
a
memorised sentence.
- `only_kind`: report only one defect kind ("only dents"); a scan whose defect is of another kind then has an
empty
  target.
- `ignore_region`: ignore one half of the part in normalised coordinates ("ignore everything with x above
0.2");
  target patches whose centre lies there are dropped.
- `normal_feature`: a feature that looks unusual is by design ("sharp edges are normal"); the ground truth
never
  names such features, so the target is the unguided one: the episode teaches that the guidance is not a
  defect.
"""

from __future__ import annotations

from dataclasses import dataclass

GUIDANCE_KINDS: tuple[str, ...] = ("only_kind", "ignore_region", "normal_feature")
TEST_PARAPHRASES = 2  # the last this many paraphrases of each set are kept for test episodes

# How an operator names each synthesized defect kind (scans.defects.DEFECT_TYPES).
KIND_WORDS: dict[str, str] = {
    "bulge": "bulges (bumps raised out of the surface)",
    "concavity": "dents (concave depressions)",
    "crack": "cracks",
    "hole": "holes (missing surface)",
    "broken": "broken-off pieces (missing material at an edge)",
    "scratch": "scratches",
}

PARAPHRASES: dict[str, tuple[str, ...]] = {
    "only_kind": (
        "Only report {what}. Other irregularities do not matter for this inspection.",
        "We are looking for {what} only; ignore any other kind of defect.",
        "Report {what} and nothing else.",
        "The customer complaint is about {what}. Name those regions only.",
        "Check this part for {what}; every other kind of flaw is out of scope.",
        "Restrict the report to {what}.",
    ),
    "ignore_region": (
        "Ignore everything with {axis} {side} {value} (normalised coordinates): the fixture covers "
        "that area.",
        "The region where {axis} is {side} {value} is masked by the clamp; do not report anything there.",
        "Do not report patches whose centre has {axis} {side} {value}.",
        "Anything at {axis} {side} {value} is outside the inspected zone.",
        "Leave out the part of the scan where {axis} {side} {value}; it is not inspected.",
        "Skip the area with {axis} {side} {value} in the normalised box.",
    ),
    "normal_feature": (
        "Sharp edges and ridges on this part are by design, not defects.",
        "The holes and bores on this part are intended features.",
        "Corners and steps of the outline are normal for this part.",
        "The teeth and slots are part of the design; do not report them as such.",
        "Sharp ridges are normal here.",
        "The bolt holes are by design.",
    ),
}


@dataclass(frozen=True)
class Guidance:
    """One piece of guidance as the operator writes it, plus what the target needs to follow it."""

    kind: str
    paraphrase: int
    text: str
    defect_kind: str | None = None  # only_kind: the one kind to report
    axis: str | None = None  # ignore_region: "x" | "y" | "z"
    above: bool = True  # ignore_region: ignore centre[axis] > value (else < value)
    value: float = 0.0

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "paraphrase": self.paraphrase,
            "text": self.text,
            "defect_kind": self.defect_kind,
            "axis": self.axis,
            "above": self.above,
            "value": self.value,
        }

    def ignores(self, centre: dict[str, float]) -> bool:
        """True when a patch centre (normalised x, y, z) lies in the region this guidance says to ignore."""
        if self.kind != "ignore_region" or self.axis is None:
            return False
        coordinate = centre[self.axis]
        return coordinate > self.value if self.above else coordinate < self.value

    def keeps_kind(self, defect_kind: str | None) -> bool:
        """False when the guidance restricts the report to another defect kind than the scan's."""
        return self.kind != "only_kind" or defect_kind == self.defect_kind


def paraphrase_ids(kind: str, split: str) -> list[int]:
    """Indices of the paraphrases of `kind` that episodes of `split` ("train" | "test") may use."""
    count = len(PARAPHRASES[kind])
    cut = count - TEST_PARAPHRASES
    return list(range(cut)) if split == "train" else list(range(cut, count))


def make_guidance(
    kind: str,
    paraphrase: int,
    *,
    defect_kind: str | None = None,
    axis: str = "x",
    above: bool = True,
    value: float = 0.0,
) -> Guidance:
    """The guidance text of one paraphrase, filled in."""
    template = PARAPHRASES[kind][paraphrase]
    if kind == "only_kind":
        if defect_kind not in KIND_WORDS:
            raise ValueError(
                f"only_kind guidance needs a defect kind of {sorted(KIND_WORDS)}, got {defect_kind!r}"
            )
        return Guidance(
            kind, paraphrase, template.format(what=KIND_WORDS[defect_kind]), defect_kind=defect_kind
        )
    if kind == "ignore_region":
        text = template.format(axis=axis, side="above" if above else "below", value=f"{value:.1f}")
        return Guidance(kind, paraphrase, text, axis=axis, above=above, value=round(value, 1))
    return Guidance(kind, paraphrase, template)
