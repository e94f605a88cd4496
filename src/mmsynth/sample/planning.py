"""Text -> layout planning (stage 1 of LLM-grounded diffusion, Lian et al.): a prompt becomes named boxes that the
layout controls (GLIGEN, layout guidance, regional prompts) then draw.

Two planners share one interface, `Planner.plan(prompt, seed) -> Layout`, picked by `get_planner(spec)`:
- "shapes": rule-based and exact for the Shapes caption grammar. The caption is parsed, each object gets a size
  and radius drawn as the dataset draws them, and objects are placed by seeded rejection sampling under the
  dataset's own rules (inside the image, same-colour objects apart, none too hidden, every stated relation holding
  by RELATION_MARGIN), so the boxes look like the training boxes and the caption is true of the planned scene.
- "llm:PATH": a local causal language model (any transformers folder) prompted LMD-style with in-context
  examples; its text answer is parsed by `parse_llm_layout`. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mmsynth.data import vocab
from mmsynth.data.captions import Group, parse_caption
from mmsynth.data.geometry import box_center
from mmsynth.data.scene import RELATION_MARGIN, Background, Scene, ShapeObject, placement_ok, relation_holds
from mmsynth.errors import InputError
from mmsynth.sample.layout import MAX_BOXES, Layout, LayoutObject

PLANNER_SPECS = ("shapes", "llm:PATH")
GRAMMAR_HINT = ("e.g. 'two red circles left of a blue square': groups COUNT [small|large] COLOR SHAPE joined by "
                "',', 'and', 'with' and a relation (left of, right of, above, below)")  # fmt: skip
PLACE_RESTARTS = 100  # whole-scene restarts before the Shapes planner gives up
PLACE_TRIES = 50  # positions tried per object within one restart
_EPS = 1e-3  # keeps sampled centres off the relation's boundary (centres are rounded to 4 decimals)


class Planner:
    """Turns a prompt into a Layout; `seed` varies the layout where the planner samples."""

    name = "planner"

    def plan(self, prompt: str, seed: int = 0) -> Layout:
        raise NotImplementedError


def _check_seed(seed: Any) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise InputError(f"planner seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    return int(seed)


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"planner prompt must be a non-empty text, got {prompt!r:.80}")
    return prompt


# ------------------------------------------------------------------------------------------ rule-based (Shapes)


def _box_offset(obj: ShapeObject) -> tuple[float, float]:
    """Box centre minus (cx, cy): non-zero for triangles and rotated shapes, and the same wherever the object sits
    inside the image (relations are between box centres)."""
    x, y = box_center(obj.box())
    return x - obj.cx, y - obj.cy


def _draw(rng: np.random.Generator, g: Group, gi: int, placed: list[ShapeObject], owner: list[int],
          relations: list[tuple[int, str, int]]) -> ShapeObject | None:  # fmt: skip
    """One candidate object of group `g` drawn as `scene._sample_object` draws it (size when the caption leaves it
    open, radius, rotation, centre inside the image with its margin), its centre drawn within the interval the
    relations to the objects already placed leave open. None when that interval is empty."""
    size = g.size or str(rng.choice(vocab.SIZES))
    radius = round(float(rng.uniform(*vocab.SIZE_RADIUS[size])), 4)
    rotation = 0.0 if g.shape == "circle" else round(float(rng.uniform(-15.0, 15.0)), 2)
    m = radius + 0.02
    obj = ShapeObject(shape=g.shape, color=g.color, size=size, cx=0.5, cy=0.5, radius=radius, rotation=rotation,
                      rgb=vocab.COLORS[g.color])  # fmt: skip
    dx, dy = _box_offset(obj)
    lo, hi = {"x": m, "y": m}, {"x": 1 - m, "y": 1 - m}
    for a, rel, b in relations:
        for other, o in zip(owner, placed):
            if (a, b) == (gi, other):
                r = rel  # new rel o
            elif (a, b) == (other, gi):
                r = vocab.INVERSE_RELATION[rel]  # o rel new  <=>  new inverse o
            else:
                continue
            ox, oy = box_center(o.box())
            if r == "left of":
                hi["x"] = min(hi["x"], ox - RELATION_MARGIN - dx - _EPS)
            elif r == "right of":
                lo["x"] = max(lo["x"], ox + RELATION_MARGIN - dx + _EPS)
            elif r == "above":
                hi["y"] = min(hi["y"], oy - RELATION_MARGIN - dy - _EPS)
            else:
                lo["y"] = max(lo["y"], oy + RELATION_MARGIN - dy + _EPS)
    if lo["x"] > hi["x"] or lo["y"] > hi["y"]:
        return None
    obj.cx = round(float(rng.uniform(lo["x"], hi["x"])), 4)
    obj.cy = round(float(rng.uniform(lo["y"], hi["y"])), 4)
    return obj


def _relations_hold(obj: ShapeObject, gi: int, placed: list[ShapeObject], owner: list[int],
                    relations: list[tuple[int, str, int]]) -> bool:  # fmt: skip
    for a, rel, b in relations:
        for other, o in zip(owner, placed):
            if (a, b) == (gi, other) and not relation_holds(obj, o, rel):
                return False
            if (a, b) == (other, gi) and not relation_holds(o, obj, rel):
                return False
    return True


def _boxes_apart(obj: ShapeObject, placed: list[ShapeObject]) -> bool:
    """`obj`'s box shares no area with any placed object's box."""
    x0, y0, x1, y1 = obj.box()
    return all(x1 <= b[0] or b[2] <= x0 or y1 <= b[1] or b[3] <= y0 for b in (o.box() for o in placed))


class ShapesPlanner(Planner):
    """Exact for the Shapes caption grammar: the caption is true of the planned scene (counts, colours, shapes,
    sizes, relations), and its boxes are distributed like the dataset's."""

    name = "shapes"

    def plan(self, prompt: str, seed: int = 0) -> Layout:
        prompt, seed = _check_prompt(prompt), _check_seed(seed)
        try:
            parsed = parse_caption(prompt)
        except InputError as exc:
            raise InputError(f"the shapes planner reads the Shapes caption grammar ({GRAMMAR_HINT}); {exc}") from None
        if not parsed.groups:
            raise InputError(f"the shapes planner found no objects in '{prompt}' ({GRAMMAR_HINT})")
        if parsed.n_objects > MAX_BOXES:
            raise InputError(f"'{prompt}' names {parsed.n_objects} objects; a layout holds at most {MAX_BOXES}")
        for a, rel, b in parsed.relations:
            if a == b:
                g = parsed.groups[a]
                raise InputError(f"'{prompt}' says the {g.color} {g.shape} is {rel} itself; relate two different "
                                 "colour-shape groups")  # fmt: skip
        objects = self._place(parsed.groups, parsed.relations, np.random.default_rng(seed), prompt)
        layout = Layout([LayoutObject(o.box(), o.phrase) for o in objects], prompt)
        layout.extra = {"planner": self.name, "seed": seed,
                        "objects": [{**asdict(o), "rgb": list(o.rgb)} for o in objects]}  # fmt: skip
        return layout

    @staticmethod
    def _place(groups: list[Group], relations: list[tuple[int, str, int]], rng: np.random.Generator,
               prompt: str) -> list[ShapeObject]:  # fmt: skip
        """Objects of every group in order (list order is depth, back to front, as in a Scene); whole-scene
        restarts when one cannot be placed, as `sample_scene` does. Boxes that do not overlap are asked for in the
        first half of the restarts (layout methods and the judge read each box alone); the rest fall back to the
        dataset's own rule, which lets objects overlap a little (too many large objects for disjoint boxes)."""
        wanted = [(gi, g) for gi, g in enumerate(groups) for _ in range(g.count)]
        for restart in range(PLACE_RESTARTS):
            disjoint = restart < PLACE_RESTARTS // 2
            placed: list[ShapeObject] = []
            owner: list[int] = []
            for gi, g in wanted:
                for _try in range(PLACE_TRIES):
                    cand = _draw(rng, g, gi, placed, owner, relations)
                    if (cand is not None and _relations_hold(cand, gi, placed, owner, relations)
                            and placement_ok([*placed, cand])
                            and (not disjoint or _boxes_apart(cand, placed))):  # fmt: skip
                        placed.append(cand)
                        owner.append(gi)
                        break
                else:
                    break
            if len(placed) == len(wanted):
                return placed
        raise InputError(f"the shapes planner could not place the objects of '{prompt}' in {PLACE_RESTARTS} attempts: "
                         "too many or too large objects for the image, or relations that contradict each other")


def planned_scene(layout: Layout) -> Scene:
    """The Shapes scene a ShapesPlanner layout stands for (a plain light background): to render it, or to check
    the prompt against it with `caption_true_of`."""
    objects = layout.extra.get("objects")
    if not isinstance(objects, list) or not objects:
        raise InputError("this layout carries no Shapes objects (only the shapes planner's layouts do)")
    return Scene.from_dict({"objects": objects, "background": asdict(Background("light", [(235, 235, 235)]))},
                           "planned scene")  # fmt: skip


# ------------------------------------------------------------------------------------------ language model (LMD)

LLM_FRAME = 512  # the examples' pixel frame, as in LMD: [x, y, w, h] in a 512 x 512 image, origin top left
LLM_MAX_NEW_TOKENS = 256
LLM_INSTRUCTIONS = (
    "You are an intelligent bounding box generator. I will provide you with a caption for an image. Your task is to "
    "generate the bounding boxes for the objects mentioned in the caption, along with a background prompt "
    f"describing the scene. The images are of size {LLM_FRAME}x{LLM_FRAME}. The top-left corner has coordinate "
    f"[0, 0]. The bottom-right corner has coordinate [{LLM_FRAME}, {LLM_FRAME}]. The bounding boxes should not go "
    "beyond the image boundaries. Each bounding box should be in the format of (object name, [top-left x "
    "coordinate, top-left y coordinate, box width, box height]) and should include exactly one object: 'two red "
    "circles' gets two boxes named 'red circle'. Please refer to the examples below for the desired format."
)
# Shapes captions whose answers the shapes planner writes (so they are exactly right), and one scene of the
# open world, from LMD's own prompt, for a model asked about other things
_SHAPES_EXAMPLES = ("two red circles left of a blue square", "a large green star above a small yellow triangle",
                    "three purple crosses")  # fmt: skip
_OPEN_EXAMPLE = (
    "a realistic image of a green car parked to the left of a blue truck, with a red air balloon and a bird in the "
    "sky",
    "[('green car', [21, 281, 211, 159]), ('blue truck', [269, 283, 209, 160]), ('red air balloon', "
    "[66, 8, 145, 135]), ('bird', [296, 44, 86, 56])]",
    "a realistic landscape scene",
)
_SHAPES_BACKGROUND = "a plain background"


def format_llm_objects(layout: Layout) -> str:
    """A layout as the answer the LLM is shown: [('red circle', [x, y, w, h]), ...] in the LLM_FRAME pixel frame."""
    items = []
    for o in layout.objects:
        x0, y0, x1, y1 = (round(v * LLM_FRAME) for v in o.box)
        items.append(f"('{o.phrase}', [{x0}, {y0}, {x1 - x0}, {y1 - y0}])")
    return "[" + ", ".join(items) + "]"


@functools.cache
def llm_examples() -> tuple[tuple[str, str, str], ...]:
    """The in-context examples: (caption, objects, background prompt)."""
    planner = ShapesPlanner()
    shapes = tuple((c, format_llm_objects(planner.plan(c, seed=0)), _SHAPES_BACKGROUND) for c in _SHAPES_EXAMPLES)
    return (*shapes, _OPEN_EXAMPLE)


def llm_prompt(caption: str) -> str:
    """The LMD-style text the LLM continues: instructions, the examples, then the caption and 'Objects:'."""
    blocks = [LLM_INSTRUCTIONS]
    for c, objects, background in llm_examples():
        blocks.append(f"Caption: {c}\nObjects: {objects}\nBackground prompt: {background}")
    blocks.append(f"Caption: {caption.strip()}\nObjects:")
    return "\n\n".join(blocks)


_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_QUOTED_BOX = re.compile(r"""['"]([^'"\n\[\]]{1,100})['"]\s*[,:]?\s*\[""" + ",".join([_NUM] * 4) + r"\]")
_BARE_BOX = re.compile(r"\b([A-Za-z][\w-]*(?: [A-Za-z][\w-]*){0,3})\s*[,:]?\s*\[" + ",".join([_NUM] * 4) + r"\]")
_BACKGROUND = re.compile(r"background prompt\s*:\s*([^\n]*)", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)
_NOT_PHRASES = {"box", "bbox", "boxes", "objects", "object", "objects:"}


def _shorten(text: str, n: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 3] + "..."


def parse_llm_layout(text: str, prompt: str = "") -> Layout:
    """The layout in an LLM's answer: ('phrase', [x, y, w, h]) items (quoted or not, in a list or not), in the
    LLM_FRAME pixel frame or, when every number is at most 1 and one has a decimal point, in fractions. Boxes are
    clipped to the image; degenerate ones are dropped, a leading article is dropped from a phrase, at most
    MAX_BOXES are kept. Text after the answer (the model going on with another 'Caption:') is ignored.
    InputError when no valid box is found."""
    answer = re.split(r"\n\s*Caption\s*:", text, maxsplit=1)[0]
    found = [(m.group(1), m.groups()[1:]) for m in _QUOTED_BOX.finditer(answer)]
    if not found:
        found = [(m.group(1), m.groups()[1:]) for m in _BARE_BOX.finditer(answer)]
    found = [(p, nums) for p, nums in found if p.strip().lower() not in _NOT_PHRASES]
    fractions = bool(found) and all(float(v) <= 1 for _, nums in found for v in nums) and any(
        "." in v for _, nums in found for v in nums)  # fmt: skip
    scale = 1.0 if fractions else float(LLM_FRAME)
    objects = []
    for phrase, nums in found:
        x, y, w, h = (float(v) / scale for v in nums)
        x0, y0, x1, y1 = (round(min(max(v, 0.0), 1.0), 4) for v in (x, y, x + w, y + h))
        name = _ARTICLE.sub("", " ".join(phrase.split()))
        if w > 0 and h > 0 and x1 - x0 >= 1e-3 and y1 - y0 >= 1e-3 and name:
            objects.append(LayoutObject((x0, y0, x1, y1), name))
    if not objects:
        raise InputError(f"the planner's output does not parse: {_shorten(text)!r} (expected items like "
                         "('red circle', [x, y, w, h]))")  # fmt: skip
    background = _BACKGROUND.search(answer)
    layout = Layout(objects[:MAX_BOXES], prompt)
    layout.extra = {"planner": "llm", "raw": text, "frame": "fraction" if fractions else LLM_FRAME,
                    "background": background.group(1).strip() if background else "",
                    "dropped": len(found) - len(objects[:MAX_BOXES])}  # fmt: skip
    return layout


class LLMPlanner(Planner):
    """A local causal LM (transformers AutoModelForCausalLM + AutoTokenizer from `path`), greedy decoding: the
    layout is a function of the prompt alone (`seed` is accepted for the interface and unused)."""

    name = "llm"

    def __init__(self, path: str | Path, max_new_tokens: int = LLM_MAX_NEW_TOKENS, device: str = "cpu") -> None:
        p = Path(path)
        if not p.is_dir():
            raise InputError(f"planner model folder '{p}' does not exist; give a local transformers causal-LM folder "
                             "(config.json, weights, tokenizer files): nothing is downloaded")  # fmt: skip
        if max_new_tokens < 1:
            raise InputError(f"planner max_new_tokens must be >= 1, got {max_new_tokens}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = _shorten(str(exc).splitlines()[0] if str(exc) else "", 120)
            raise InputError(f"planner model folder '{p}' is not a loadable causal language model "
                             f"({exc.__class__.__name__}: {why})") from None  # fmt: skip
        self.path, self.max_new_tokens, self.device = p, max_new_tokens, device

    def prompt_for(self, caption: str) -> str:
        return llm_prompt(caption)

    def generate(self, caption: str) -> str:
        """The model's greedy continuation of `llm_prompt(caption)` (new text only)."""
        import torch

        enc = self.tokenizer(self.prompt_for(caption), return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if limit and ids.shape[1] + self.max_new_tokens > limit:
            raise InputError(f"the planner's prompt is {ids.shape[1]} tokens and asks for {self.max_new_tokens} "
                             f"more; model '{self.path}' reads at most {limit}: shorten the prompt")  # fmt: skip
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None \
            else cfg.eos_token_id  # fmt: skip
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=pad)  # fmt: skip
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def plan(self, prompt: str, seed: int = 0) -> Layout:
        prompt = _check_prompt(prompt)
        _check_seed(seed)
        return parse_llm_layout(self.generate(prompt), prompt)


def get_planner(spec: str) -> Planner:
    """'shapes' or 'llm:PATH' (a local causal-LM folder)."""
    if spec == "shapes":
        return ShapesPlanner()
    if isinstance(spec, str) and spec.startswith("llm:"):
        path = spec[len("llm:"):]
        if not path.strip():
            raise InputError("planner 'llm:' needs a model folder: llm:PATH")
        return LLMPlanner(path)
    raise InputError(f"planner '{spec}' is not one of: shapes (rule-based, the Shapes caption grammar), llm:PATH "
                     "(a local transformers causal-LM folder)")  # fmt: skip
