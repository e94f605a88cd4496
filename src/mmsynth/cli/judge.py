"""`mmsynth judge`: score a folder (exchange format) or one image, or validate the judge on renders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmsynth.cli.arguments import positive_int, seed
from mmsynth.errors import InputError
from mmsynth.io import check_output_file, read_json_file, write_json
from mmsynth.train.config import MAX_WORKERS

USAGE = """\
  mmsynth judge DIR [--json OUT] [--layout]         score DIR/metadata.jsonl (file_name + prompt/scene/caption)
  mmsynth judge IMAGE [--prompt TEXT | --scene SPEC.json] [--json OUT]
                                                    detections in one image and which rules pass
  mmsynth judge validate [--n 2000] [--resolution 64 128] [--json OUT]
                                                    judge clean and degraded test renders against their specs"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "judge",
        help="score images against prompts or scene specs (object F1, attributes, binding, counts, relations)",
        description="The analytic judge: detects Shapes objects (colour, shape, size, box) and applies GenEval-like "
        "rules.\n\n" + USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="a folder with metadata.jsonl, an image file, or the word 'validate'")
    p.add_argument("--json", dest="json_out", help="also write the full report as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--prompt", help="(IMAGE) the caption the image should satisfy, e.g. 'two red circles left of "
                   "a blue square'")  # fmt: skip
    p.add_argument("--scene", help="(IMAGE) a scene spec JSON file the image should show")
    p.add_argument("--layout", action="store_true", help="(DIR, IMAGE with --scene) also score boxes: IoU, AP50")
    p.add_argument("--n", type=positive_int, default=None, help="(validate) number of test scenes (default 2000)")
    p.add_argument("--resolution", type=int, nargs="+", default=None, help="(validate) render sizes (default 64)")
    p.add_argument("--split", default=None, help="(validate) split of the scenes (default test)")
    p.add_argument("--seed", type=seed, default=None, help="(validate) scene and noise seed (default 0)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help=f"(validate) processes, at most {MAX_WORKERS} (default 1)")
    p.set_defaults(func=_run)


# which options each form of the command reads: any other is refused rather than silently ignored
VALIDATE_OPTIONS = ("n", "resolution", "split", "seed", "workers")
IMAGE_OPTIONS = ("prompt", "scene", "layout")


def _refuse_options(args: argparse.Namespace, names: tuple[str, ...], form: str) -> None:
    given = [n for n in names if getattr(args, n) not in (None, False)]
    if given:
        raise InputError(f"--{given[0]} does not apply to `judge {form}`; see 'mmsynth judge --help'")


def _run(args: argparse.Namespace) -> int:
    from mmsynth.evaluate import judge as J  # heavy imports only when the command runs

    if args.json_out is not None:  # before any work
        out = check_output_file(args.json_out, "--json", overwrite=args.overwrite).absolute()
        target = Path(args.target).absolute()
        inputs = [target, target / "metadata.jsonl", *([Path(args.scene).absolute()] if args.scene else [])]
        if out in inputs:
            raise InputError(f"--json '{args.json_out}' is an input of this command; write the report elsewhere")
    if args.target == "validate" and not Path("validate").exists():
        _refuse_options(args, IMAGE_OPTIONS, "validate")
        return _validate(args, J)
    _refuse_options(args, VALIDATE_OPTIONS, "DIR" if Path(args.target).is_dir() else "IMAGE")
    target = Path(args.target)
    if target.is_dir():
        if args.prompt or args.scene:
            raise InputError("judge DIR: --prompt/--scene apply to one IMAGE; DIR/metadata.jsonl says what to expect")
        report = J.judge_folder(target, layout=args.layout, progress=sys.stderr.isatty())
        print(report.table())
        if args.json_out:
            write_json(report.to_dict(), args.json_out)
        return 0
    if not target.exists():
        raise InputError(f"judge: '{target}' does not exist (expected a folder with metadata.jsonl, an image file)")
    return _one_image(args, J, target)


def _one_image(args: argparse.Namespace, J, target: Path) -> int:
    from mmsynth.evaluate.detect import detect_objects
    from mmsynth.io import load_image

    if args.prompt is not None and args.scene:
        raise InputError("judge IMAGE: give --prompt or --scene, not both")
    if args.layout and not args.scene:
        raise InputError("judge IMAGE: --layout scores boxes, which only a --scene gives")
    scene = None
    if args.scene:
        scene = read_json_file(args.scene, "--scene")
    image = load_image(target)
    if args.prompt is None and scene is None:
        dets = detect_objects(image)
        print(f"{target}: {len(dets)} object(s)")
        for i, d in enumerate(dets):
            print(_det_line(i, d))
        if args.json_out:
            write_json({"detections": [d.to_dict() for d in dets]}, args.json_out)
        return 0
    expectation = J.expectation_for(args.prompt, scene, layout=args.layout)
    from mmsynth.evaluate.scoring import score_image

    s = score_image(expectation, detect_objects(image))
    _print_verdict(target, args.prompt, s)
    if args.json_out:
        write_json(s.to_dict(), args.json_out)
    return 0


def _det_line(i: int, d) -> str:
    x0, y0, x1, y1 = d.box
    return (f"  [{i}] {d.size:<5} {d.color:<6} {d.shape:<8} box=({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) px  "
            f"fit={d.score:.2f}")  # fmt: skip


def _print_verdict(target: Path, prompt: str | None, s) -> None:
    def mark(ok: bool | None) -> str:
        return "n/a " if ok is None else ("PASS" if ok else "FAIL")

    print(f"{target}: {'PASS' if s.passed else 'FAIL'}" + (f"  (prompt: {prompt!r})" if prompt else ""))
    print(f"detections ({len(s.detections)}):")
    for i, d in enumerate(s.detections):
        print(_det_line(i, d))
    print("expected objects:")
    for i, e in enumerate(s.expected.objects):
        j = s.pairs[i]
        found = "nothing" if j is None else f"[{j}] {s.detections[j].color} {s.detections[j].shape}"
        size = f"{e.size} " if e.size else ""
        print(f"  {mark(s.hits[i])} {size}{e.color} {e.shape} -> {found}"
              + ("" if s.size_ok[i] is None else f"  size {mark(s.size_ok[i])}"))  # fmt: skip
    print(f"  {mark(s.count_ok)} count: {len(s.detections)} detected, {len(s.expected.objects)} expected")
    if s.binding_ok is not None:
        print(f"  {mark(s.binding_ok)} binding: every colour-shape group with its count")
    for (a, rel, b), ok in zip(s.expected.relations, s.relation_ok):
        ga, gb = s.expected.groups[a], s.expected.groups[b]
        print(f"  {mark(ok)} relation: {ga.color} {ga.shape} {rel} {gb.color} {gb.shape}")
    if s.box_ious is not None:
        print(f"  layout: box IoU per expected object {[round(v, 3) for v in s.box_ious]}")


def _validate(args: argparse.Namespace, J) -> int:
    from mmsynth.data.render import check_resolution

    args.n, args.resolution, args.split = args.n or 2000, args.resolution or [64], args.split or "test"
    args.seed, args.workers = args.seed or 0, args.workers or 1
    if args.workers > MAX_WORKERS:
        raise InputError(f"--workers must be at most {MAX_WORKERS}, got {args.workers}")
    for res in args.resolution:
        check_resolution(res)
    out = {}
    for res in args.resolution:
        reports = J.validate(args.n, res, split=args.split, seed=args.seed, workers=args.workers,
                             progress=sys.stderr.isatty())  # fmt: skip
        for cond, rep in reports.items():
            print(rep.table())
            print()
            out[f"{res}px_{cond}"] = rep.to_dict()
    if args.json_out:
        sizes = " ".join(map(str, args.resolution))
        cmd = f"mmsynth judge validate --n {args.n} --resolution {sizes} --seed {args.seed}"
        write_json({"command": cmd, "split": args.split, "degradation": {"noise_sigma": J.DEGRADE_NOISE,
                    "blur_sigma_px": J.DEGRADE_BLUR}, "results": out}, args.json_out)  # fmt: skip
    return 0
