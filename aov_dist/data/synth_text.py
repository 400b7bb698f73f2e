"""Conversations about synthetic images, in the Anomaly-Instruct (LLaVA) and VisA-D&R styles.

Training conversations (``instruct_conversation``) come in three shapes chosen per record:

* ``detect``: the paper's detection prompt and a bare "Yes"/"No";
* ``detect_explain``: the detection turn, then what/where the defect is, its likely cause and a
  suggestion (normal objects get a description instead);
* ``describe_first``: an open description first, the detection prompt as a later turn (so the
  Yes/No answer is not always in the first exchange: label derivation must search for it).

Reasoning questions for the benchmark (``reasoning_conversation``) mark each human turn with
``"type": "low-level"`` (perception: what and where) or ``"type": "complex"`` (cause and remedy),
the two groups VisA-D&R scores differently.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

DETECTION_PROMPT = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."

OBJECT_NAMES = {
    "screw": "screw", "bottle": "bottle", "pcb": "printed circuit board", "tile": "ceramic tile surface",
    "fabric": "woven fabric", "metal_plate": "metal plate",
}

# defect -> (noun phrase, likely cause, suggestion)
DEFECT_TEXT = {
    "scratch": ("a thin scratch", "abrasion against a sharp tool or another part during handling",
                "use protective fixtures when handling the parts and check the tooling for sharp edges"),
    "hole": ("a small hole", "a puncture or a material inclusion that broke out during forming",
             "check the raw material and the forming step, and reject punctured parts"),
    "crack": ("a jagged crack", "mechanical impact or thermal stress while the material cooled",
              "reduce impacts during transport and review the cooling or curing profile"),
    "stain": ("a stain", "contamination by oil, dirt or process residue",
              "clean the production line and add a washing step before packaging"),
    "missing_part": ("a missing piece", "a piece that broke off or was never formed or assembled",
                     "check the assembly or moulding station and reject incomplete parts"),
    "color_change": ("a discoloured area", "uneven coating, overheating or a chemical reaction on the surface",
                     "check the coating thickness and the process temperature"),
}

_CAUSE_QUESTIONS = ("What could have caused this defect?", "Why might this defect have appeared?")
_FIX_QUESTIONS = ("How could this be prevented in production?", "What do you suggest to avoid this defect?")
_WHERE_QUESTIONS = ("What is the defect and where is it located?", "Describe the anomaly and its position.")
_NORMAL_DESCRIPTIONS = (
    "The image shows a {obj}. Its surface and shape look intact: no scratches, holes, cracks, stains "
    "or missing parts are visible.",
    "This {obj} looks normal. The structure is complete and the colour is uniform.",
)


def image_tokens(n_images: int) -> str:
    """One ``<image>`` line per image, as the first human turn carries them."""
    return "<image>\n" * n_images


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def defect_sentence(cls: str, defect: str, location: str) -> str:
    return f"There is {DEFECT_TEXT[defect][0]} in the {location} of the {OBJECT_NAMES[cls]}."


def _detect_prompt(n_images: int) -> str:
    if n_images == 1:
        return image_tokens(1) + DETECTION_PROMPT
    return image_tokens(n_images) + f"These are {n_images} views of the same object. " + DETECTION_PROMPT


# How often each conversation shape is drawn (detect, detect_explain, describe_first). Mostly bare
# detection exchanges: on these a random-init tiny LLM learns to read the expert's adverb for its
# Yes/No within ~80 steps; with 20 % long explanations it had not after 200 (measured for the demo,
# docs/benchmarks.md). Pass other weights for data that exercises multi-turn label search.
SHAPE_WEIGHTS = (0.9, 0.1, 0.0)


def instruct_conversation(rng: np.random.Generator, cls: str, defect: Optional[str],
                          location: Optional[str], n_images: int,
                          shape_weights: tuple[float, float, float] = SHAPE_WEIGHTS) -> list[dict]:
    """A LLaVA conversation about one (possibly multi-view) object; defect=None means normal."""
    obj = OBJECT_NAMES[cls]
    answer = "Yes" if defect else "No"
    shape = ("detect", "detect_explain", "describe_first")[int(rng.choice(3, p=shape_weights))]
    if defect:
        what = defect_sentence(cls, defect, location or "center")
        cause = f"It was most likely caused by {DEFECT_TEXT[defect][1]}."
        fix = f"I suggest to {DEFECT_TEXT[defect][2]}."
    turns: list[tuple[str, str]]
    if shape == "detect":
        turns = [(_detect_prompt(n_images), answer)]
    elif shape == "detect_explain":
        if defect:
            turns = [(_detect_prompt(n_images), answer), (_pick(rng, _WHERE_QUESTIONS), what),
                     (_pick(rng, _CAUSE_QUESTIONS), cause), (_pick(rng, _FIX_QUESTIONS), fix)]
        else:
            turns = [(_detect_prompt(n_images), answer),
                     (f"Please describe the {obj}.", _pick(rng, _NORMAL_DESCRIPTIONS).format(obj=obj))]
    else:
        first = image_tokens(n_images) + f"Describe this {obj} and point out any anomaly."
        desc = (f"This is a {obj}. {what} The object is defective." if defect
                else _pick(rng, _NORMAL_DESCRIPTIONS).format(obj=obj))
        turns = [(first, desc), (DETECTION_PROMPT, answer)]
    return [msg for h, g in turns for msg in ({"from": "human", "value": h}, {"from": "gpt", "value": g})]


def reasoning_conversation(rng: np.random.Generator, cls: str, defect: str, location: str) -> list[dict]:
    """Multi-turn benchmark questions with reference answers about one anomalous image."""
    obj = OBJECT_NAMES[cls]
    turns = [
        ("low-level", image_tokens(1) + f"Is there any anomaly on this {obj}? If so, what is it and where is it?",
         "Yes. " + defect_sentence(cls, defect, location)),
        ("low-level", "What does the defective region look like?",
         f"It is {DEFECT_TEXT[defect][0]} that stands out from the surrounding surface of the {obj}."),
        ("complex", _pick(rng, _CAUSE_QUESTIONS), f"It was most likely caused by {DEFECT_TEXT[defect][1]}."),
        ("complex", _pick(rng, _FIX_QUESTIONS), f"I suggest to {DEFECT_TEXT[defect][2]}."),
    ]
    return [msg for kind, q, a in turns
            for msg in ({"from": "human", "value": q, "type": kind}, {"from": "gpt", "value": a})]
