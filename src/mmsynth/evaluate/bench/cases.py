"""Benchmark cases: a scene spec plus what is asked of the model, one JSON object per line (JSONL).

A case file is the benchmark's unit of exchange: `mmsynth bench make-cases` writes one, `mmsynth bench
run --cases` scores any of them, so private case sets work like ours. Every condition is derived from
the scene spec (exact maps via `mmsynth.annotate.from_scene`) unless a case embeds its own map.
The format is documented field by field in docs/bench.md; `read_cases` validates every line before
anything runs, and names the line and the field that is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmsynth.data.render import check_resolution, render
from mmsynth.data.scene import Scene
from mmsynth.errors import InputError
from mmsynth.io import read_jsonl, write_text

CASE_FORMAT = "mmsynth.case/1"
DEFAULT_RESOLUTION = 64
_FIELDS = ("format", "id", "suite", "category", "scene", "prompt", "negative_prompt", "controls", "layout", "mask",
           "seed", "resolution", "group", "reference", "extra")  # fmt: skip


@dataclass
class ControlSpec:
    """A spatial condition the case asks for: an annotator kind (+ params), or an embedded map (path or data URI)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    map: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.params:
            d["params"] = dict(self.params)
        if self.map is not None:
            d["map"] = self.map
        return d


@dataclass
class Case:
    """One benchmark case. `reference` cases are not generated for: they are the real set of fidelity metrics.

    `seed` is the generation seed of this case alone, so a case gives the same image in any shard or batch.
    """

    id: str
    suite: str
    scene: Scene
    category: str = "default"
    prompt: str = ""
    negative_prompt: str = ""
    controls: list[ControlSpec] = field(default_factory=list)
    layout: bool = False
    mask: dict[str, Any] | None = None
    seed: int = 0
    resolution: int = DEFAULT_RESOLUTION
    group: str | None = None
    reference: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    base_dir: Path | None = field(default=None, compare=False, repr=False)  # where relative map paths live

    # ------------------------------------------------------------ what the case needs
    def requirements(self) -> list[str]:
        """Capabilities a model needs to honour this case: 'text', 'control:<kind>', 'layout', 'inpaint'."""
        need = ["text"]
        need += [f"control:{c.kind}" for c in self.controls]
        if self.layout:
            need.append("layout")
        if self.mask is not None:
            need.append("inpaint")
        return need

    def render(self) -> np.ndarray:
        """The ground-truth image of the case's scene at its resolution."""
        return render(self.scene, self.resolution)

    def condition_maps(self) -> dict[str, np.ndarray]:
        """Each control's condition map: the embedded map when given, else derived from the spec."""
        from mmsynth.annotate import from_scene
        from mmsynth.sample.controls import decode_array

        out = {}
        for c in self.controls:
            if c.map is not None:
                src = c.map
                if not src.startswith("data:") and self.base_dir is not None and not Path(src).is_absolute():
                    src = str(self.base_dir / src)
                out[c.kind] = decode_array(src, f"case {self.id}: control '{c.kind}' map")
            else:
                out[c.kind] = from_scene(c.kind, self.scene, self.resolution, **c.params)
        return out

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": CASE_FORMAT, "id": self.id, "suite": self.suite, "category": self.category,
                             "prompt": self.prompt}  # fmt: skip
        if self.negative_prompt:
            d["negative_prompt"] = self.negative_prompt
        if self.controls:
            d["controls"] = [c.to_dict() for c in self.controls]
        if self.layout:
            d["layout"] = True
        if self.mask is not None:
            d["mask"] = dict(self.mask)
        d["seed"] = self.seed
        d["resolution"] = self.resolution
        if self.group is not None:
            d["group"] = self.group
        if self.reference:
            d["reference"] = True
        if self.extra:
            d["extra"] = dict(self.extra)
        d["scene"] = self.scene.to_dict()
        return d

    @staticmethod
    def from_dict(d: Any, where: str = "case", base_dir: Path | None = None) -> Case:
        """Validate one case object; errors read '<where>: field '<name>': what is wrong and what is valid'."""
        return _case_from_dict(d, where, base_dir)


# ---------------------------------------------------------------- validation


def _bad(where: str, name: str, msg: str) -> InputError:
    return InputError(f"{where}: field '{name}': {msg}")


def _typed(d: dict, name: str, types: type | tuple[type, ...], where: str, default: Any, what: str) -> Any:
    if name not in d:
        return default
    v = d[name]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):  # JSON true is not an int here
        raise _bad(where, name, f"expected {what}, got {v!r:.60}")
    return v


def _controls(v: Any, where: str) -> list[ControlSpec]:
    from mmsynth.annotate import scene_kinds

    if not isinstance(v, list):
        raise _bad(where, "controls", f"expected a list of {{'kind': ..., 'params': {{}}}} objects, got {v!r:.60}")
    kinds = scene_kinds()
    out = []
    for i, c in enumerate(v):
        name = f"controls[{i}]"
        if not isinstance(c, dict) or "kind" not in c:
            raise _bad(where, name, "expected an object with a 'kind'")
        unknown = sorted(set(c) - {"kind", "params", "map"})
        if unknown:
            raise _bad(where, name, f"unknown key(s) {unknown}; valid: kind, params, map")
        if c["kind"] not in kinds:
            raise _bad(where, f"{name}.kind", f"'{c['kind']}' is not one of {', '.join(kinds)}")
        params = c.get("params", {})
        if not isinstance(params, dict):
            raise _bad(where, f"{name}.params", f"expected an object of annotator parameters, got {params!r:.60}")
        m = c.get("map")
        if m is not None and not isinstance(m, str):
            raise _bad(where, f"{name}.map", "expected an image path (relative to the case file) or a PNG data URI")
        out.append(ControlSpec(str(c["kind"]), dict(params), m))
    return out


def _mask(v: Any, scene: Scene, where: str) -> dict[str, Any] | None:
    if v is None:
        return None
    if isinstance(v, dict) and set(v) == {"object"}:
        k = v["object"]
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(scene.objects):
            raise _bad(where, "mask.object", f"expected an object index in 0..{len(scene.objects) - 1}, got {k!r}")
        return {"object": k}
    if isinstance(v, dict) and set(v) == {"box"}:
        b = v["box"]
        ok = isinstance(b, list) and len(b) == 4 and all(isinstance(x, int | float) and 0 <= x <= 1 for x in b)
        if not ok or not (b[0] < b[2] and b[1] < b[3]):
            raise _bad(where, "mask.box", f"expected [x0, y0, x1, y1] normalised with x0 < x1, y0 < y1, got {b!r:.60}")
        return {"box": [float(x) for x in b]}
    raise _bad(where, "mask", f"expected null, {{'object': INDEX}} or {{'box': [x0, y0, x1, y1]}}, got {v!r:.60}")


def _case_from_dict(d: Any, where: str, base_dir: Path | None) -> Case:
    from mmsynth.evaluate.bench.registry import suite_names

    if not isinstance(d, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {unknown}; valid: {', '.join(_FIELDS)}")
    fmt = d.get("format", CASE_FORMAT)
    if fmt != CASE_FORMAT:
        raise _bad(where, "format", f"unsupported {fmt!r}; expected {CASE_FORMAT!r}")
    for name in ("id", "suite", "scene"):
        if name not in d:
            raise _bad(where, name, "missing (required: id, suite, scene)")
    cid = _typed(d, "id", str, where, "", "a string")
    if not cid:
        raise _bad(where, "id", "must not be empty")
    suite = _typed(d, "suite", str, where, "", "a string")
    if suite not in suite_names():
        raise _bad(where, "suite", f"'{suite}' is not one of {', '.join(suite_names())}")
    scene = Scene.from_dict(d["scene"], where=f"{where}: field 'scene'")
    seed = _typed(d, "seed", int, where, 0, "a non-negative integer")
    if seed < 0:
        raise _bad(where, "seed", f"expected a non-negative integer, got {seed}")
    resolution = _typed(d, "resolution", int, where, DEFAULT_RESOLUTION, "an integer image side")
    try:
        check_resolution(resolution)
    except InputError as exc:
        raise _bad(where, "resolution", str(exc)) from None
    prompt = _typed(d, "prompt", str, where, "", "a string")
    return Case(
        id=cid,
        suite=suite,
        scene=scene,
        category=_typed(d, "category", str, where, "default", "a string"),
        prompt=prompt,
        negative_prompt=_typed(d, "negative_prompt", str, where, "", "a string"),
        controls=_controls(d["controls"], where) if "controls" in d else [],
        layout=_typed(d, "layout", bool, where, False, "true or false"),
        mask=_mask(d.get("mask"), scene, where),
        seed=seed,
        resolution=resolution,
        group=_typed(d, "group", (str, type(None)), where, None, "a string or null"),
        reference=_typed(d, "reference", bool, where, False, "true or false"),
        extra=_typed(d, "extra", dict, where, {}, "an object"),
        base_dir=base_dir,
    )


# ---------------------------------------------------------------- files


def read_cases(path: str | Path) -> list[Case]:
    """Parse and validate every line of a case file (blank lines skipped); ids must be unique."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"case file '{p}' does not exist or is not a file (write one with `mmsynth bench make-cases`)")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for n, obj, where in read_jsonl(p):
        case = Case.from_dict(obj, where, base_dir=p.parent)
        if case.id in seen:
            raise _bad(where, "id", f"'{case.id}' already used on line {seen[case.id]}; ids must be unique")
        seen[case.id] = n
        cases.append(case)
    if not cases:
        raise InputError(f"case file '{p}' has no cases")
    return cases


def cases_to_jsonl(cases: list[Case]) -> str:
    return "".join(json.dumps(c.to_dict(), separators=(",", ":")) + "\n" for c in cases)


def write_cases(cases: list[Case], path: str | Path) -> None:
    """Write cases as JSONL atomically."""
    write_text(cases_to_jsonl(cases), path)


def keep_categories(cases: list[Case], categories: str) -> list[Case]:
    """The cases of the named categories ('palette,box'), plus every fidelity reference case (the real set)."""
    wanted = {c.strip() for c in categories.split(",") if c.strip()}
    present = sorted({c.category for c in cases if not c.reference})
    unknown = sorted(wanted - set(present))
    if not wanted or unknown:
        raise InputError(f"--categories: no cases of {', '.join(unknown) or 'any category'}; "
                         f"the cases have {', '.join(present) or 'none'}")  # fmt: skip
    return [c for c in cases if c.reference or c.category in wanted]
