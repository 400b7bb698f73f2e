"""Conversations about synthetic images, in the Anomaly-Instruct (LLaVA) and VisA-D&R styles.

Every answer is written from the image's procedural ground truth (synth_images.SynthImage): the
object class, the defect kind, where the defect sits in a 3x3 grid of the object, and whether it is
darker or brighter than the surface around it. So a description is learnable from the pixels, and
``read_description`` can check a generated one fact by fact.

Training conversations (``instruct_conversation``) come in three shapes chosen per record:

* ``detect``: the paper's detection prompt and a bare "Yes"/"No";
* ``explain``: the benchmark's reasoning exchange (``explain_turns``): what and where, what it looks
  like, its likely cause and a suggestion; a normal object gets the short "no defect" answer;
* ``describe_first``: an open description first, the detection prompt as a later turn (so the
  Yes/No answer is not always in the first exchange: label derivation must search for it).

Reasoning questions for the benchmark (``reasoning_conversation``) are the ``explain`` turns of a
held-out image, each human turn marked ``"type": "low-level"`` (perception: what and where) or
``"type": "complex"`` (cause and remedy), the two groups VisA-D&R scores differently.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from aov_dist.data.synth_images import LOCATIONS, SynthImage

DETECTION_PROMPT = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."

OBJECT_NAMES = {
    "screw": "screw", "bottle": "bottle", "pcb": "printed circuit board", "tile": "ceramic tile surface",
    "fabric": "woven fabric", "metal_plate": "metal plate",
}

# defect -> (noun phrase, what it looks like, likely cause, suggestion)
DEFECT_TEXT = {
    "scratch": ("a thin scratch", "a thin, almost straight line",
                "abrasion against a sharp tool or another part during handling",
                "use protective fixtures when handling the parts and check the tooling for sharp edges"),
    "hole": ("a small hole", "a small round spot",
             "a puncture or a material inclusion that broke out during forming",
             "check the raw material and the forming step, and reject punctured parts"),
    "crack": ("a jagged crack", "a jagged, winding line",
              "mechanical impact or thermal stress while the material cooled",
              "reduce impacts during transport and review the cooling or curing profile"),
    "stain": ("a stain", "an irregular blotch",
              "contamination by oil, dirt or process residue",
              "clean the production line and add a washing step before packaging"),
    "missing_part": ("a missing piece", "an irregular gap in the material",
                     "a piece that broke off or was never formed or assembled",
                     "check the assembly or moulding station and reject incomplete parts"),
    "color_change": ("a discoloured area", "an irregular patch of another colour",
                     "uneven coating, overheating or a chemical reaction on the surface",
                     "check the coating thickness and the process temperature"),
}

_WHAT_WHERE = ("Is there any anomaly in the image? If so, what is it and where is it?",
               "Is anything wrong with the object in the image? Describe the defect and where it is.")
_LOOK = ("What does the defective region look like?", "How does the defect appear?")
_CAUSE = ("What could have caused this defect?", "Why might this defect have appeared?")
_FIX = ("How could this be prevented in production?", "What do you suggest to avoid this defect?")

# The conversation shapes and how often each is drawn (detect, explain, describe_first).
SHAPES = ("detect", "explain", "describe_first")
SHAPE_WEIGHTS = (0.6, 0.4, 0.0)


def image_tokens(n_images: int) -> str:
    """One ``<image>`` line per image, as the first human turn carries them."""
    return "<image>\n" * n_images


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def describe(shot: SynthImage, n_images: int = 1) -> str:
    """The what-and-where answer, led by the detection decision; for several views of one object the
    position (which differs per view) is left out."""
    obj = OBJECT_NAMES[shot.cls]
    if shot.defect is None:
        return f"No. The {obj} looks normal: its surface and shape are intact."
    noun = DEFECT_TEXT[shot.defect][0]
    if n_images > 1:
        return f"Yes. Every view shows {noun} on the {obj}."
    return f"Yes. There is {noun} in the {shot.location} of the {obj}."


def explain_turns(rng: np.random.Generator, shot: SynthImage, n_images: int = 1) -> list[tuple[str, str, str]]:
    """(kind, question, reference answer) of the reasoning exchange about one object."""
    first = image_tokens(n_images) + _pick(rng, _WHAT_WHERE)
    turns = [("low-level", first, describe(shot, n_images))]
    if shot.defect is None:
        return turns
    _, look, cause, fix = DEFECT_TEXT[shot.defect]
    obj = OBJECT_NAMES[shot.cls]
    turns += [("low-level", _pick(rng, _LOOK), f"It is {look}, {shot.shade} than the surrounding {obj}."),
              ("complex", _pick(rng, _CAUSE), f"It was most likely caused by {cause}."),
              ("complex", _pick(rng, _FIX), f"I suggest to {fix}.")]
    return turns


def _detect_prompt(n_images: int) -> str:
    if n_images == 1:
        return image_tokens(1) + DETECTION_PROMPT
    return image_tokens(n_images) + f"These are {n_images} views of the same object. " + DETECTION_PROMPT


def _messages(turns: list[tuple[str, str]]) -> list[dict]:
    return [msg for h, g in turns for msg in ({"from": "human", "value": h}, {"from": "gpt", "value": g})]


def instruct_conversation(rng: np.random.Generator, shot: SynthImage, n_images: int,
                          shape_weights: tuple[float, float, float] = SHAPE_WEIGHTS) -> list[dict]:
    """A LLaVA conversation about one (possibly multi-view) object; ``shot`` is its first view."""
    answer = "Yes" if shot.defect else "No"
    shape = SHAPES[int(rng.choice(len(SHAPES), p=shape_weights))]
    if shape == "detect":
        return _messages([(_detect_prompt(n_images), answer)])
    if shape == "explain":
        return _messages([(q, a) for _, q, a in explain_turns(rng, shot, n_images)])
    first = image_tokens(n_images) + "Describe the object in the image and point out any anomaly."
    return _messages([(first, describe(shot, n_images)), (DETECTION_PROMPT, answer)])


def reasoning_conversation(rng: np.random.Generator, shot: SynthImage) -> list[dict]:
    """The benchmark's questions and reference answers about one held-out image."""
    return [msg for kind, q, a in explain_turns(rng, shot)
            for msg in ({"from": "human", "value": q, "type": kind}, {"from": "gpt", "value": a})]


# ---------------------------------------------------------------- reading a description back

_NOUNS = {DEFECT_TEXT[d][0].split(" ", 1)[1]: d for d in DEFECT_TEXT}  # "thin scratch" -> scratch
_NAMES = {name: cls for cls, name in OBJECT_NAMES.items()}
_WHERE = re.compile(r"\bin the (" + "|".join(sorted((p for row in LOCATIONS for p in row), key=len, reverse=True))
                    + r") of the\b")


def read_description(text: str) -> dict[str, Optional[str]]:
    """The facts a what-and-where answer states: ``anomalous`` ("yes"/"no" from its first word),
    ``defect``, ``location`` and ``cls`` (None where the text names none, or more than one)."""
    def only(found: set[str]) -> Optional[str]:
        return next(iter(found)) if len(found) == 1 else None

    first = text.strip().split(" ", 1)[0].strip(".,!").lower()
    where = {m.group(1) for m in _WHERE.finditer(text)}
    return {"anomalous": first if first in ("yes", "no") else None,
            "defect": only({d for noun, d in _NOUNS.items() if noun in text}),
            "location": only(where),
            "cls": only({c for name, c in _NAMES.items() if re.search(rf"\b{re.escape(name)}\b", text)})}
