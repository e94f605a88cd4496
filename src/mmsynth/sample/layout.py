"""Layouts: named boxes (GLIGEN's grounding input, the layout-guidance methods' targets), validated once for all.

A layout is a list of {box: [x0, y0, x1, y1], phrase: "red circle"} (boxes as fractions of the image, origin top
left) plus an optional global prompt. Every layout method reads it from the same JSON:

    {"prompt": "a red circle left of a blue square",
     "objects": [{"box": [0.1, 0.3, 0.4, 0.6], "phrase": "red circle"},
                 {"box": [0.6, 0.3, 0.9, 0.6], "phrase": "blue square"}]}

(a bare list of objects is a layout without a prompt). The attention-based methods (forward and backward guidance)
move the attention of the phrase's own tokens, so for them each phrase must be words of the prompt;
`phrase_token_positions` finds them, allowing the plural of a shape word ("red circle" in "two red circles").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mmsynth.errors import InputError

MAX_BOXES = 30  # GLIGEN's maximum number of grounding tokens (diffusers' pipeline pads to 30)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_boxes(boxes: Any, phrases: Any, where: str, max_boxes: int = MAX_BOXES) -> None:
    """Boxes inside [0, 1] with x0 < x1 and y0 < y1, one non-empty phrase each, at most `max_boxes` of them."""
    if not isinstance(boxes, (list, tuple)) or not boxes:
        raise InputError(f"{where}: give at least one box as [x0, y0, x1, y1] (fractions of the image), got "
                         f"{boxes!r:.80}")
    if len(boxes) > max_boxes:
        raise InputError(f"{where}: {len(boxes)} boxes; at most {max_boxes} (GLIGEN's limit) are allowed")
    for i, b in enumerate(boxes):
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_number(v) for v in b)):
            raise InputError(f"{where}: box {i} must be four numbers [x0, y0, x1, y1], got {b!r:.80}")
        if not (0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1):
            raise InputError(f"{where}: box {i} {list(b)} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                             "(fractions of the image, origin top left)")
    if not isinstance(phrases, (list, tuple)):
        raise InputError(f"{where}: phrases must be a list of strings, one per box, got {phrases!r:.80}")
    if len(phrases) != len(boxes):
        raise InputError(f"{where}: {len(boxes)} boxes but {len(phrases)} phrases; give one phrase per box")
    for i, p in enumerate(phrases):
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"{where}: the phrase of box {i} must be a non-empty string, got {p!r:.80}")


@dataclass(frozen=True)
class LayoutObject:
    box: tuple[float, float, float, float]
    phrase: str


@dataclass
class Layout:
    """Named boxes and an optional global prompt (see the module docstring); valid by construction."""

    objects: list[LayoutObject]
    prompt: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # what a planner adds (e.g. its raw text), not validated

    def __post_init__(self) -> None:
        check_boxes([list(o.box) for o in self.objects], [o.phrase for o in self.objects], "layout")
        if not isinstance(self.prompt, str):
            raise InputError(f"layout: prompt must be a string, got {self.prompt!r:.80}")

    @property
    def boxes(self) -> list[list[float]]:
        return [list(o.box) for o in self.objects]

    @property
    def phrases(self) -> list[str]:
        return [o.phrase for o in self.objects]

    @classmethod
    def from_lists(cls, boxes: Any, phrases: Any, prompt: str = "", where: str = "layout") -> Layout:
        check_boxes(boxes, phrases, where)
        return cls([LayoutObject(tuple(float(v) for v in b), p.strip()) for b, p in zip(boxes, phrases)],  # type: ignore[arg-type]
                   prompt)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "objects": [{"box": list(o.box), "phrase": o.phrase} for o in self.objects]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "layout") -> Layout:
        """From the JSON form (an object with "objects" and optional "prompt", or a bare list of objects)."""
        if isinstance(data, list):
            data = {"objects": data}
        if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
            raise InputError(f'{where} must be {{"prompt": ..., "objects": [{{"box": [x0, y0, x1, y1], "phrase": '
                             f'...}}, ...]}} or a list of such objects, got {json.dumps(data)[:80]}')
        unknown = set(data) - {"prompt", "objects"}
        if unknown:
            raise InputError(f"{where} has unknown field(s) {sorted(unknown)}; valid: prompt, objects")
        boxes, phrases = [], []
        for i, o in enumerate(data["objects"]):
            if not isinstance(o, dict) or set(o) != {"box", "phrase"}:
                raise InputError(f'{where}: object {i} must be {{"box": [x0, y0, x1, y1], "phrase": "red circle"}}, '
                                 f"got {json.dumps(o)[:80]}")
            boxes.append(o["box"])
            phrases.append(o["phrase"])
        prompt = data.get("prompt") or ""
        return cls.from_lists(boxes, phrases, prompt, where)

    @classmethod
    def load(cls, path: str | Path) -> Layout:
        """A layout JSON file; InputError naming the file when it is missing or malformed."""
        p = Path(path)
        where = f"layout file '{p}'"
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{where} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{where} is not readable JSON ({exc.__class__.__name__}: {exc})") from None
        return cls.from_dict(data, where)


def _shape_plurals() -> dict[str, str]:
    from mmsynth.data import vocab

    return dict(vocab.SHAPE_PLURALS)


def phrase_token_positions(tokenizer: Any, prompt: str, phrase: str, where: str) -> list[int]:
    """Token positions of `phrase` in `prompt` as the sampler tokenises it (first occurrence), the phrase's last
    word also matching its plural ("red circle" is found in "two red circles"). InputError when it is not there."""
    from mmsynth.models.tokenizer import tokenize_padded

    ids = tokenize_padded(tokenizer, prompt).input_ids
    words = phrase.split()
    variants = [phrase]
    plural = _shape_plurals().get(words[-1]) if words else None
    if plural:
        variants.append(" ".join([*words[:-1], plural]))
    for text in variants:
        sub = tokenizer(text, add_special_tokens=False).input_ids
        for i in range(len(ids) - len(sub) + 1):
            if sub and ids[i: i + len(sub)] == sub:
                return list(range(i, i + len(sub)))
    raise InputError(f"{where}: phrase '{phrase}' is not in the prompt '{prompt}'; attention-based layout methods "
                     "move the attention of the phrase's own words, so each phrase must be words of the prompt")


def missing_phrases(tokenizer: Any, layout: Layout, prompt: str) -> list[str]:
    """The layout's phrases that are not words of `prompt` (what attention-based methods cannot ground)."""
    missing = []
    for phrase in layout.phrases:
        try:
            phrase_token_positions(tokenizer, prompt, phrase, "layout")
        except InputError:
            missing.append(phrase)
    return missing



def scene_layout(scene: Any) -> Layout:
    """A Shapes scene's layout (a `Scene` or its dict): every object's amodal box and phrase ("red circle"), back to
    front, at most MAX_BOXES: what GLIGEN trains on and what the layout suite asks for."""
    from mmsynth.data.scene import Scene

    sc = scene if isinstance(scene, Scene) else Scene.from_dict(scene)
    objects = sc.objects[:MAX_BOXES]
    return Layout.from_lists([list(o.box()) for o in objects], [o.phrase for o in objects])

# ---------------------------------------------------------------------------------------------- controls' options
# A layout control's boxes/phrases: one layout shared by every image of the batch, or one per image (lists of lists).
def _is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value)


def _per_image_boxes(boxes: Any) -> bool:
    """boxes given per image: a list whose items are lists of boxes (not boxes themselves)."""
    return isinstance(boxes, list) and bool(boxes) and all(isinstance(b, list) and not _is_box(b) for b in boxes)


def per_image_layout(boxes: Any) -> bool:
    """True when a layout control's boxes are given per image (a list of n lists of boxes)."""
    return _per_image_boxes(boxes)


def _check_layout(boxes: Any, phrases: Any, where: str) -> None:
    if isinstance(phrases, list) and not all(isinstance(p, str) and p.strip() for p in phrases):
        raise InputError(f"{where} phrases must be a list of non-empty strings, one per box, got {phrases!r:.80}")
    check_boxes(boxes, phrases, where)


def check_layout_option(boxes: Any, phrases: Any, where: str) -> None:
    """A layout control's boxes and phrases: one shared list of boxes with one phrase each, or one such pair of lists
    per image (boxes as a list of lists of boxes, phrases as a list of lists of strings). Boxes are checked by
    check_boxes (inside [0, 1], x0 < x1, y0 < y1, at most 30)."""
    if _per_image_boxes(boxes):
        if not isinstance(phrases, list) or len(phrases) != len(boxes) or not all(isinstance(p, list) for p in phrases):
            raise InputError(f"{where} boxes are given per image; give phrases per image too, as many")
        for i, (b, p) in enumerate(zip(boxes, phrases)):
            _check_layout(b, p, f"{where} (image {i})")
    else:
        _check_layout(boxes, phrases, where)


def layout_option_for_image(key: str, value: Any, i: int) -> Any:
    """Image i's boxes or phrases as `to_dict` wrote them: a shared list, or list i of a list of lists."""
    if key == "boxes":
        return value[i] if _per_image_boxes(value) else value
    return value[i] if isinstance(value, list) and value and isinstance(value[0], list) else value


def image_layouts(boxes: Any, phrases: Any, n: int, where: str,
                  nouns: tuple[str, str] = ("box lists", "phrase lists")) -> list[tuple[list, list]]:
    """(boxes, phrases) of each of the n images of the batch (a per-image layout must have one entry per image)."""
    from mmsynth.sample.controls import check_batch_length

    if _per_image_boxes(boxes):
        check_batch_length(boxes, n, where, nouns[0])
        check_batch_length(phrases, n, where, nouns[1])
        return [(list(boxes[i]), list(phrases[i])) for i in range(n)]
    return [(list(boxes), list(phrases))] * n


def phrases_token_positions(tokenizer: Any, prompt: str, phrases: list[str], where: str) -> list[list[int]]:
    """The token positions of each phrase in `prompt` (phrase_token_positions: first occurrence, plurals of shape words
    allowed); one InputError naming every phrase the prompt lacks."""
    found: list[list[int]] = []
    missing: list[str] = []
    for phrase in phrases:
        try:
            found.append(phrase_token_positions(tokenizer, prompt, phrase, where))
        except InputError:
            missing.append(phrase)
    if len(missing) == 1:
        raise InputError(f"{where}: phrase '{missing[0]}' is not in the prompt '{prompt}'; attention-based layout "
                         "methods move the attention of the phrase's own words, so each phrase must be words of the "
                         "prompt")
    if missing:
        names = ", ".join(f"'{m}'" for m in missing)
        raise InputError(f"{where}: phrases {names} are not in the prompt '{prompt}'; attention-based layout methods "
                         "move the attention of the phrase's own words, so each phrase must be words of the prompt")
    return found



class LayoutOptions:
    """Mixin of the controls with `boxes` and `phrases` fields (one layout, or one per image): how a request keeps
    image i's values (put it before `Control` in the bases)."""

    per_image: ClassVar[tuple[str, ...]] = ("boxes", "phrases")

    @classmethod
    def option_for_image(cls, key: str, value: Any, i: int) -> Any:
        """A list of boxes (or phrases) is shared by every image; a list of such lists has one per image."""
        if key in ("boxes", "phrases"):
            return layout_option_for_image(key, value, i)
        return super().option_for_image(key, value, i)  # type: ignore[misc]

# ---------------------------------------------------------------------------------------------- methods
# a layout method -> (the control that draws a layout, its boxes field, its phrases field)
LAYOUT_METHODS: dict[str, tuple[str, str, str]] = {
    "gligen": ("gligen", "boxes", "phrases"),
    "backward": ("layout-guidance", "boxes", "phrases"),
    "forward": ("layout-attention", "boxes", "phrases"),
    "regional": ("regional-prompt", "regions", "prompts"),
}


def layout_method_control(method: str, boxes: Any, phrases: Any, **options: Any) -> Any:
    """The control of `method` drawing `boxes`/`phrases` (one layout, or one list of each per image), with its other
    `options` (e.g. a `schedule` dict); validated by the control itself."""
    from mmsynth.sample.controls import control_from_dict

    if method not in LAYOUT_METHODS:
        raise InputError(f"unknown layout method '{method}'; valid: {', '.join(LAYOUT_METHODS)}")
    name, box_field, phrase_field = LAYOUT_METHODS[method]
    return control_from_dict({"name": name, box_field: boxes, phrase_field: phrases, **options},
                             where=f"layout method {method}")
