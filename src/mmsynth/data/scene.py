"""The scene spec: a small JSON-serialisable description that is the one source of truth.

`sample_scene(split, index, seed)` is a pure function; rendering, captions and every annotation
are pure functions of the returned `Scene`. Objects are stored back to front (list order = z).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage.color import lab2rgb, rgb2lab

from mmsynth.data import vocab
from mmsynth.data.geometry import box_center, box_of, polygon
from mmsynth.errors import InputError

SPEC_VERSION = 1
MAX_HIDDEN_FRACTION = 0.15  # an object may be at most this much covered by objects in front
SAME_COLOR_GAP = 0.04  # same-colour objects never touch (normalised distance between circumcircles)
RELATION_MARGIN = 0.10  # box centres must differ by this much (normalised) for a caption relation
COUNT_SCENE_FRACTION = 0.2  # multi-object scenes made of one colour-shape group
_PLACEMENT_RASTER = 128


@dataclass
class ShapeObject:
    """One object: class attributes plus exact placement. `rgb` is its rendered shade."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float
    rotation: float = 0.0
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def phrase(self) -> str:
        """The grounding phrase layout methods use, e.g. 'red circle'."""
        return f"{self.color} {self.shape}"

    def polygon(self) -> np.ndarray:
        return polygon(self.shape, self.cx, self.cy, self.radius, self.rotation)

    def box(self) -> tuple[float, float, float, float]:
        """Full (amodal) normalised xyxy box, clipped to the image."""
        return _clipped_box(self.shape, self.cx, self.cy, self.radius, self.rotation)


@functools.lru_cache(maxsize=4096)
def _clipped_box(shape: str, cx: float, cy: float, radius: float, rotation: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box_of(polygon(shape, cx, cy, radius, rotation))
    return max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)


@dataclass
class Background:
    """Nearly achromatic background: flat, two-colour gradient, or flat with mild smooth texture."""

    kind: str
    colors: list[tuple[int, int, int]]
    angle: float = 0.0
    texture_seed: int = 0


@dataclass
class Scene:
    """A whole scene. `split`/`index`/`seed` record where it came from (provenance, not rendering)."""

    objects: list[ShapeObject]
    background: Background
    split: str = "custom"
    index: int = 0
    seed: int = 0
    version: int = SPEC_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for o in d["objects"]:
            o["rgb"] = list(o["rgb"])
        d["background"]["colors"] = [list(c) for c in d["background"]["colors"]]
        return d

    @staticmethod
    def from_dict(d: Any, where: str = "scene") -> Scene:
        """Parse and validate a spec; errors name the field that is wrong and what is valid."""
        return _scene_from_dict(d, where)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


def _number(d: dict, key: str, where: str, lo: float, hi: float) -> float:
    _require(key in d, f"{where}: missing field '{key}'")
    v = d[key]
    _require(isinstance(v, int | float) and not isinstance(v, bool), f"{where}.{key}: expected a number, got {v!r}")
    _require(lo <= v <= hi, f"{where}.{key}: {v} is out of range [{lo}, {hi}]")
    return float(v)


def _integer(d: dict, key: str, where: str, default: int, lo: int = 0, hi: int = 2**63 - 1) -> int:
    """An optional integer field in [lo, hi] (provenance and seeds: what numpy's generators accept)."""
    v = d.get(key, default)
    _require(isinstance(v, int) and not isinstance(v, bool), f"{where}.{key}: expected an integer, got {v!r}")
    _require(lo <= v <= hi, f"{where}.{key}: {v} is out of range [{lo}, {hi}]")
    return int(v)


def _mapping(d: dict, key: str, where: str) -> dict:
    v = d.get(key, {})
    _require(isinstance(v, dict), f"{where}.{key}: expected a JSON object, got {type(v).__name__}")
    return dict(v)


def _rgb(v: Any, where: str) -> tuple[int, int, int]:
    ok = isinstance(v, list | tuple) and len(v) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in v)
    _require(ok, f"{where}: expected [r, g, b] integers in 0..255, got {v!r}")
    return (int(v[0]), int(v[1]), int(v[2]))


def _choice(d: dict, key: str, where: str, valid: tuple[str, ...]) -> str:
    _require(key in d, f"{where}: missing field '{key}'")
    _require(d[key] in valid, f"{where}.{key}: '{d[key]}' is not one of {', '.join(valid)}")
    return str(d[key])


SCENE_FIELDS = ("objects", "background", "split", "index", "seed", "version", "extra")
OBJECT_FIELDS = ("shape", "color", "size", "cx", "cy", "radius", "rotation", "rgb")
BACKGROUND_FIELDS = ("kind", "colors", "angle", "texture_seed")


def _known_fields(d: dict, valid: tuple[str, ...], where: str) -> None:
    """A misspelt field ("backgroud", "raduis") is an error, never silently a default."""
    unknown = [k for k in d if k not in valid]
    _require(not unknown, f"{where}: unknown field(s) {unknown}; valid: {', '.join(valid)}")


def _scene_from_dict(d: Any, where: str) -> Scene:
    _require(isinstance(d, dict), f"{where}: expected a JSON object, got {type(d).__name__}")
    _known_fields(d, SCENE_FIELDS, where)
    objs = d.get("objects")
    _require(isinstance(objs, list), f"{where}.objects: expected a list of objects")
    n_max = vocab.MAX_OBJECTS
    _require(1 <= len(objs) <= n_max, f"{where}.objects: expected 1..{n_max} objects, got {len(objs)}")
    objects = []
    for i, o in enumerate(objs):
        w = f"{where}.objects[{i}]"
        _require(isinstance(o, dict), f"{w}: expected a JSON object")
        _known_fields(o, OBJECT_FIELDS, w)
        color = _choice(o, "color", w, vocab.COLOR_NAMES)
        objects.append(
            ShapeObject(
                shape=_choice(o, "shape", w, vocab.SHAPES),
                color=color,
                size=_choice(o, "size", w, vocab.SIZES),
                cx=_number(o, "cx", w, 0.0, 1.0),
                cy=_number(o, "cy", w, 0.0, 1.0),
                radius=_number(o, "radius", w, 0.01, 0.5),
                rotation=_number(o, "rotation", w, -180.0, 180.0) if "rotation" in o else 0.0,
                rgb=_rgb(o["rgb"], f"{w}.rgb") if "rgb" in o else vocab.COLORS[color],
            )
        )
    bg = d.get("background")
    _require(isinstance(bg, dict), f"{where}.background: expected a JSON object")
    _known_fields(bg, BACKGROUND_FIELDS, f"{where}.background")
    kind = _choice(bg, "kind", f"{where}.background", vocab.BACKGROUND_KINDS)
    colors = bg.get("colors")
    n_colors = 2 if kind == "gradient" else 1
    _require(
        isinstance(colors, list) and len(colors) == n_colors,
        f"{where}.background.colors: a '{kind}' background needs {n_colors} colour(s)",
    )
    background = Background(
        kind=kind,
        colors=[_rgb(c, f"{where}.background.colors[{i}]") for i, c in enumerate(colors)],
        angle=_number(bg, "angle", f"{where}.background", -360.0, 360.0) if "angle" in bg else 0.0,
        texture_seed=_integer(bg, "texture_seed", f"{where}.background", 0, hi=2**32 - 1),
    )
    split = d.get("split", "custom")
    return Scene(
        objects=objects,
        background=background,
        split=str(split),
        index=_integer(d, "index", where, 0),
        seed=_integer(d, "seed", where, 0),
        version=_integer(d, "version", where, SPEC_VERSION, lo=1, hi=SPEC_VERSION),
        extra=_mapping(d, "extra", where),
    )


def load_scene_file(path: str | Path) -> Scene:
    """A scene spec from a JSON file: the spec itself, or a record holding it under "scene" (a metadata line)."""
    from mmsynth.io import read_json_file

    p = Path(path)
    d = read_json_file(p, "scene file")
    if isinstance(d, dict) and "scene" in d and "objects" not in d:
        d = d["scene"]
    return Scene.from_dict(d, where=f"scene file '{p}'")


# ---------------------------------------------------------------- relations and groups


def relation_holds(a: ShapeObject, b: ShapeObject, rel: str, margin: float = RELATION_MARGIN) -> bool:
    """Whether `a rel b` holds between box centres, by at least `margin` (normalised)."""
    ax, ay = box_center(a.box())
    bx, by = box_center(b.box())
    return {
        "left of": bx - ax > margin,
        "right of": ax - bx > margin,
        "above": by - ay > margin,
        "below": ay - by > margin,
    }[rel]


def groups(scene: Scene) -> list[list[int]]:
    """Object indices grouped by (colour, shape), in order of first appearance."""
    out: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(scene.objects):
        out.setdefault((o.color, o.shape), []).append(i)
    return list(out.values())


def group_relations(scene: Scene) -> list[tuple[int, str, int]]:
    """(group a, relation, group b) triples that hold for every pair of members."""
    gs = groups(scene)
    rels = []
    for ga, gb in itertools.permutations(range(len(gs)), 2):
        for rel in vocab.RELATIONS:
            if all(relation_holds(scene.objects[i], scene.objects[j], rel) for i in gs[ga] for j in gs[gb]):
                rels.append((ga, rel, gb))
    return rels


def object_relations(scene: Scene) -> list[tuple[int, str, int]]:
    """(object a, relation, object b) triples that hold between single objects."""
    return [
        (i, rel, j)
        for i, j in itertools.permutations(range(len(scene.objects)), 2)
        for rel in vocab.RELATIONS
        if relation_holds(scene.objects[i], scene.objects[j], rel)
    ]


# ---------------------------------------------------------------- sampling


@functools.cache
def _base_lab(color: str) -> np.ndarray:
    """CIELab of a named colour, computed once per name (every object of every scene asks for one)."""
    lab = rgb2lab(np.array(vocab.COLORS[color], dtype=np.float64)[None, None] / 255.0)[0, 0]
    lab.flags.writeable = False
    return lab


def _jitter_shade(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    lab = _base_lab(color) + rng.uniform(-1, 1, 3) * np.array(vocab.SHADE_JITTER_LAB)
    rgb = np.clip(lab2rgb(lab[None, None])[0, 0], 0, 1)
    return tuple(int(round(c * 255)) for c in rgb)  # type: ignore[return-value]


def _background_color(band: str, rng: np.random.Generator) -> tuple[int, int, int]:
    lo, hi = vocab.BACKGROUND_L[band]
    chroma = rng.uniform(0, vocab.BACKGROUND_MAX_CHROMA - 2.0)
    hue = rng.uniform(0, 2 * math.pi)
    lab = np.array([rng.uniform(lo, hi), chroma * math.cos(hue), chroma * math.sin(hue)])
    rgb = np.clip(lab2rgb(lab[None, None])[0, 0], 0, 1)
    return tuple(int(round(c * 255)) for c in rgb)  # type: ignore[return-value]


def _sample_background(rng: np.random.Generator) -> Background:
    kind = str(rng.choice(vocab.BACKGROUND_KINDS))
    band = str(rng.choice(["light", "dark"]))
    n = 2 if kind == "gradient" else 1
    return Background(
        kind=kind,
        colors=[_background_color(band, rng) for _ in range(n)],
        angle=float(round(rng.uniform(0, 360), 2)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def raster_object(obj: ShapeObject, n: int = _PLACEMENT_RASTER) -> np.ndarray:
    """n x n bool mask of the object's polygon (no supersampling): placement checks and owner maps."""
    mask = np.zeros((n, n), np.uint8)
    pts = np.round(obj.polygon() * n * 16).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def visible_fractions(objects: list[ShapeObject], n: int = _PLACEMENT_RASTER) -> list[float]:
    """Fraction of each object's area not covered by objects after it in the list (in front)."""
    masks = [raster_object(o, n) for o in objects]
    out = []
    for i, m in enumerate(masks):
        covered = np.zeros_like(m)
        for m2 in masks[i + 1 :]:
            covered |= m2
        area = max(int(m.sum()), 1)
        out.append(float((m & ~covered).sum()) / area)
    return out


def _apart(a: ShapeObject, b: ShapeObject) -> bool:
    """Same-colour objects never touch (other colours may overlap)."""
    return a.color != b.color or math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + SAME_COLOR_GAP


def _captionable(scene: Scene) -> bool:
    """One colour-shape group, or a caption relation between two groups."""
    return len(groups(scene)) == 1 or bool(group_relations(scene))


def placement_ok(objects: list[ShapeObject]) -> bool:
    """The dataset's placement rule for the last of `objects`: apart from the others, and every object still mostly
    visible (what the samplers of scenes and of planned layouts both keep)."""
    new = objects[-1]
    if not all(_apart(o, new) for o in objects[:-1]):
        return False
    return min(visible_fractions(objects)) >= 1.0 - MAX_HIDDEN_FRACTION


def _sample_object(
    rng: np.random.Generator, split: str, force_heldout: bool, like: ShapeObject | None = None
) -> ShapeObject:
    if like is not None:
        color, shape = like.color, like.shape
    elif force_heldout:
        combos = sorted(vocab.HELDOUT_COMBOS)
        color, shape = combos[int(rng.integers(len(combos)))]
    else:
        while True:
            color = str(rng.choice(vocab.COLOR_NAMES))
            shape = str(rng.choice(vocab.SHAPES))
            if split == "heldout" or (color, shape) not in vocab.HELDOUT_COMBOS:
                break
    size = str(rng.choice(vocab.SIZES))
    radius = float(rng.uniform(*vocab.SIZE_RADIUS[size]))
    rotation = 0.0 if shape == "circle" else float(rng.uniform(-15.0, 15.0))
    m = radius + 0.02
    return ShapeObject(
        shape=shape,
        color=color,
        size=size,
        cx=round(float(rng.uniform(m, 1 - m)), 4),
        cy=round(float(rng.uniform(m, 1 - m)), 4),
        radius=round(radius, 4),
        rotation=round(rotation, 2),
        rgb=_jitter_shade(color, rng),
    )


def _split_id(split: str) -> int:
    if split not in vocab.SPLITS:
        raise InputError(f"split '{split}' is not one of {', '.join(vocab.SPLITS)}")
    return vocab.SPLITS.index(split)


def sample_scene(split: str, index: int, seed: int = 0, n_objects: int | None = None) -> Scene:
    """The scene at (split, index, seed): a pure function, identical on every machine and worker.

    Objects are placed by seeded rejection sampling: same-colour objects never touch, no object is
    more than MAX_HIDDEN_FRACTION hidden, and multi-object scenes always have a caption relation.
    """
    if index < 0:
        raise InputError(f"index must be >= 0, got {index}")
    if not 0 <= seed < 2**63:
        raise InputError(f"seed must be an integer in [0, 2**63 - 1], got {seed}")
    if n_objects is not None and not 1 <= n_objects <= vocab.MAX_OBJECTS:
        raise InputError(f"n_objects must be in 1..{vocab.MAX_OBJECTS}, got {n_objects}")
    rng = np.random.default_rng([_split_id(split), int(seed), int(index), 0x5EED])
    background = _sample_background(rng)
    n = int(rng.integers(1, vocab.MAX_OBJECTS + 1)) if n_objects is None else n_objects
    while True:
        # a fifth of multi-object scenes repeat one colour-shape ("three green stars"): counting
        one_group = n > 1 and rng.random() < COUNT_SCENE_FRACTION
        objects: list[ShapeObject] = []
        for k in range(n):
            forced = split == "heldout" and k == 0
            like = objects[0] if one_group and objects else None
            for _attempt in range(100):
                cand = _sample_object(rng, split, forced, like)
                if placement_ok([*objects, cand]):
                    objects.append(cand)
                    break
            else:
                break
        if len(objects) < n:
            continue
        if split == "heldout":
            order = rng.permutation(n)  # the forced object is not always at the back
            objects = [objects[i] for i in order]
            if min(visible_fractions(objects)) < 1.0 - MAX_HIDDEN_FRACTION:
                continue
        scene = Scene(objects=objects, background=background, split=split, index=index, seed=seed)
        if _captionable(scene):
            return scene


def _rules_hold(scene: Scene) -> bool:
    """The sampler's rules on a finished scene: same-colour objects apart, none too hidden, a caption relation
    between any two groups, and the split's colour-shape combinations."""
    objs = scene.objects
    if not all(_apart(a, b) for a, b in itertools.combinations(objs, 2)):
        return False
    if min(visible_fractions(objs)) < 1.0 - MAX_HIDDEN_FRACTION:
        return False
    if any((o.color, o.shape) in vocab.HELDOUT_COMBOS for o in objs) != (scene.split == "heldout"):
        return False
    return _captionable(scene)


EDIT_KINDS = ("shape", "colour", "place", "count")  # what `minimal_edit` may change


def _inside(o: ShapeObject) -> bool:
    """The sampler's bounds: the whole object and a small margin lie inside the image."""
    m = o.radius + 0.02
    return m <= o.cx <= 1 - m and m <= o.cy <= 1 - m


def minimal_edit(
    scene: Scene, rng: np.random.Generator, tries: int = 20, kinds: tuple[str, ...] = ("shape", "colour")
) -> Scene | None:
    """The same scene with one thing changed: one object's shape or colour, ("place", two-object scenes of
    two groups) the two objects swapping places, or ("count") one object more of an existing object's colour and
    shape (any size, anywhere) or one object fewer, everything else kept (sizes, the background). A hard
    negative for contrastive training: only that word of a caption, a count, or the relation tells the two
    scenes apart (every caption names every group with its count). "place" is kept to two objects because
    every caption of such a scene states their relation, which the swap reverses: a caption of a larger edited
    scene may relate two objects that did not move, and so be true of the source too. None when no edit within
    `tries` keeps the sampler's rules."""
    if not kinds or set(kinds) - set(EDIT_KINDS):
        raise InputError(f"edit kinds must be some of {', '.join(EDIT_KINDS)}, got {', '.join(kinds) or 'none'}")
    for _ in range(tries):
        objects = list(scene.objects)
        k = int(rng.integers(len(objects)))  # drawn first, as before "place" existed: same stream, same edits
        kind = kinds[int(rng.random() * len(kinds))]
        if kind == "place":
            if len(objects) != 2 or len(groups(scene)) != 2:
                continue
            a, b = objects
            objects = [dataclasses.replace(a, cx=b.cx, cy=b.cy), dataclasses.replace(b, cx=a.cx, cy=a.cy)]
            if not all(_inside(o) for o in objects):
                continue
        elif kind == "count":
            more = len(objects) < vocab.MAX_OBJECTS and (len(objects) == 1 or rng.random() < 0.5)
            if more:  # drawn on top, like the sampler's last object; the rules below check what it hides
                objects.append(_sample_object(rng, scene.split, False, like=objects[k]))
            else:
                del objects[k]
        else:
            o = objects[k]
            if kind == "shape":
                shape = str(rng.choice([s for s in vocab.SHAPES if s != o.shape]))
                rotation = 0.0 if shape == "circle" else o.rotation or round(float(rng.uniform(-15.0, 15.0)), 2)
                objects[k] = dataclasses.replace(o, shape=shape, rotation=rotation)
            else:
                color = str(rng.choice([c for c in vocab.COLOR_NAMES if c != o.color]))
                objects[k] = dataclasses.replace(o, color=color, rgb=_jitter_shade(color, rng))
        edited = dataclasses.replace(scene, objects=objects)
        if _rules_hold(edited):
            return edited
    return None
