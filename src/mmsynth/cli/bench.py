"""`mmsynth bench`: make case files, run the benchmark on any case file, score any two image folders.

  mmsynth bench suites                                           list suites and their rows
  mmsynth bench make-cases --suite t2i --n 500 --seed 0 --out cases.jsonl
  mmsynth bench run --cases cases.jsonl [--model DIR] --json OUT.json    (or --suite S --n N, or --quick)
  mmsynth bench fidelity --real DIR --fake DIR [--extractor shapesclip|inception --weights PATH] [--model DIR]
Multi-process: accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
  --dynamo_backend no -m mmsynth.cli.main bench run ...   (cases split across processes, merged in order)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from mmsynth.cli.arguments import non_negative_int, positive_int, resolve_device, seed
from mmsynth.cli.sampling_options import add_sampling_arguments, sampling_kwargs
from mmsynth.errors import InputError
from mmsynth.io import check_output_dir, check_output_file
from mmsynth.models.shipped import DEFAULT_MODEL

SAMPLING_OPTIONS = ("steps", "cfg", "scheduler")  # bench run's --n and --seed choose cases, not images
USAGE = __doc__.split("\n\n", 1)[1].split("Multi-process")[0].rstrip() if __doc__ else ""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark: text alignment, fidelity (and control/layout/edit as methods ship) against ground truth",
        description="Score models against exact ground truth on case files; JSON, Markdown, HTML.\n\n" + USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bsub = p.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: _usage(p))

    s = bsub.add_parser("suites", help="list suites and rows")
    s.set_defaults(func=_suites)

    m = bsub.add_parser("make-cases", help="write a case file (JSONL, format in docs/bench.md)")
    m.add_argument("--suite", required=True, action="append", help="suite name (repeatable), or 'all'")
    m.add_argument("--n", type=positive_int, default=None, help="cases per category (default: the suite's, ~500)")
    m.add_argument("--seed", type=seed, default=0, help="scene and generation seed stream (default 0)")
    m.add_argument("--out", required=True, help="case file to write (JSONL)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing case file")
    m.set_defaults(func=_make_cases)

    r = bsub.add_parser("run", help="run the benchmark on a case file (or generated cases) and write a report")
    src = r.add_argument_group("cases (one of)")
    src.add_argument("--cases", action="append", help="case file(s) (JSONL); repeatable")
    src.add_argument("--suite", action="append", help="generate cases of this suite on the fly (repeatable, or 'all')")
    src.add_argument("--quick", action="store_true", help="every suite with a small n (a few minutes on a CPU)")
    r.add_argument("--n", type=positive_int, default=None,
                   help="with --suite: cases per category (default: the suite's)")
    r.add_argument("--seed", type=seed, default=0, help="with --suite/--quick: case seed (default 0)")
    r.add_argument("--model", default=None, help=f"model bundle directory (default: {DEFAULT_MODEL})")
    r.add_argument("--rows", default=None, help="comma-separated rows to run (default: all), e.g. ground_truth,t2i")
    r.add_argument("--categories", default=None,
                   help="comma-separated case categories to keep (default: all), e.g. palette; fidelity "
                        "reference cases are always kept")  # fmt: skip
    add_sampling_arguments(r, SAMPLING_OPTIONS)
    r.add_argument("--sweep", action="append", default=[], metavar="PARAM=V1,V2",
                   help="extra rows of each row that can vary PARAM, plotted: cfg, steps, eta, best_of (model rows), "
                        "s0, k, m (guidance rows), step_size (attend_excite), strength (img2img, swap), "
                        "keep_attention (swap), resample, resample_until, jump_length, blend, layout_strength "
                        "(inpaint), layout_strength, end (box_attention)")  # fmt: skip
    r.add_argument("--variant", action="append", default=[], metavar="ROW:P=V[,P=V]",
                   help="an extra row: ROW with these settings changed together (any --sweep setting the row "
                        "varies), named ROW[P=V,...], e.g. swap:strength=0.5,keep_attention=0.5; repeatable. "
                        "It runs even when --rows leaves ROW itself out")
    r.add_argument("--extractor", default="shapesclip", help="fidelity features: shapesclip (default) or inception")
    r.add_argument("--weights", default=None, help="local Inception weights file for --extractor inception")
    r.add_argument("--strict", action="store_true", help="fail on a case the model cannot honour (default: skip it)")
    r.add_argument("--json", dest="json_out", default=None,
                   help="write OUT.json, OUT.md, OUT.cases.jsonl (each case's verdict, row by row) and an HTML report")
    r.add_argument("--html", default=None, help="HTML report folder (default: OUT_report/ beside --json)")
    r.add_argument("--no-html", action="store_true", help="skip the HTML report")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing report (OUT.json, OUT.md, OUT.cases.jsonl and the HTML folder's files)")
    r.add_argument("--batch", type=positive_int, default=8, metavar="B",
                   help="cases per sampler call, each with its own prompt, seed and control inputs "
                        "(default 8; 1: each case alone)")
    r.add_argument("--panels", type=non_negative_int, default=4,
                   help="cases drawn per row in the HTML report (default 4)")
    r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_run)

    f = bsub.add_parser("fidelity", help="fidelity of any two PNG folders (Frechet distance, KID, P/R, diversity)")
    f.add_argument("--real", required=True, help="folder of real PNG images (searched recursively)")
    f.add_argument("--fake", required=True, help="folder of generated PNG images (searched recursively)")
    f.add_argument("--extractor", default="shapesclip", help="shapesclip (default: --model's CLIP) or inception")
    f.add_argument("--weights", default=None, help="local Inception weights file for --extractor inception")
    f.add_argument("--model", default=None, help=f"bundle whose CLIP gives the features (default: {DEFAULT_MODEL})")
    f.add_argument("--seed", type=seed, default=0, help="seed of KID's random subsets (default 0)")
    f.add_argument("--json", dest="json_out", default=None, help="also write the metrics as JSON (and OUT.md)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing OUT.json and OUT.md")
    f.add_argument("--device", default=None, help="torch device (default cpu)")
    f.set_defaults(func=_fidelity)
    _register_components(bsub)


def _register_components(bsub: Any) -> None:
    c = bsub.add_parser("components", help="score a bundle's parts: VAE reconstruction PSNR, CLIP retrieval top-1",
                        description="VAE reconstruction PSNR and CLIP text-to-image retrieval (exact and "
                        "caption-consistent top-1) on test-split scenes. Works on full bundles and on the partial "
                        "exports of `mmsynth train clip|vae` (missing parts are skipped with a note).")  # fmt: skip
    c.add_argument("--model", default=None, help="bundle or partial export (default: the shipped zoo)")
    c.add_argument("--n", type=positive_int, default=1000, help="test scenes (default 1000)")
    c.add_argument("--split", default="test", help="data split (default test)")
    c.add_argument("--seed", type=seed, default=0)
    c.add_argument("--json", default=None, help="also write the scores as JSON")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    c.set_defaults(func=_components)


def _components(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.components import clip_retrieval, miss_lines, vae_psnr, with_interval
    from mmsynth.io import write_json
    from mmsynth.models.bundle import load_component
    from mmsynth.models.shipped import resolve_model

    if args.json:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    model = resolve_model(args.model)
    if not model.is_dir():
        raise InputError(f"--model '{model}' is not a directory")
    scores: dict[str, Any] = {"model": str(model), "n": args.n}
    if (model / "vae").is_dir():
        scores["vae"] = vae_psnr(load_component(model, "vae"), n=args.n, split=args.split, seed=args.seed)
        p, j = scores["vae"]["psnr_db"], scores["vae"]["judge_pass"]
        print("VAE reconstruction PSNR: " + with_interval(p, 2, " dB", f", n={p['n']} {args.split} renders"))
        print("judge pass rate on the reconstructions: "
              + with_interval(j, 4, then="; the ceiling of a model drawing through this VAE"))
    else:
        print(f"no vae/ in {model}: VAE PSNR skipped")
    if (model / "clip").is_dir() and (model / "tokenizer").is_dir():
        clip, tok = load_component(model, "clip"), load_component(model, "tokenizer")
        scores["clip"] = clip_retrieval(clip, tok, n=args.n, split=args.split, seed=args.seed)
        for key in ("top1_exact", "top1_consistent"):
            r = scores["clip"][key]
            print(f"CLIP text->image retrieval {key}: " + with_interval(r, 4, then=f", n={r['n']}"))
        print("  top1_consistent by caption: " + ", ".join(
            f"{k} {r['value']:.3f} (n={r['n']})" for k, r in scores["clip"]["consistent_by_kind"].items()))  # fmt: skip
        for line in miss_lines(scores["clip"]):
            print("  " + line)
        print("  text-side ceiling (images embedded from their scenes' other captions): " + ", ".join(
            f"{k} {r['value']:.4f}" for k, r in scores["clip"]["text_side_ceiling"].items()))  # fmt: skip
    else:
        print(f"no clip/ + tokenizer/ in {model}: CLIP retrieval skipped")
    if args.json:
        write_json(scores, args.json)
    return 0


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _suites(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.bench import get_suite, suite_names

    for name in suite_names():
        s = get_suite(name)
        print(f"{name}: {s.description}")
        if s.pending and not s.rows:
            print(f"    ({s.pending})")
        for r in s.rows.values():
            print(f"    {r.name:<14} {r.kind:<9} {r.description}")
    return 0


def _suite_list(names: list[str]) -> list[str]:
    from mmsynth.evaluate.bench import get_suite, suite_names

    out: list[str] = []
    for n in names:
        for part in n.split(","):
            sel = [s for s in suite_names() if get_suite(s).make_cases is not None] if part == "all" else [part]
            for s in sel:
                get_suite(s)  # unknown name -> InputError listing the valid ones
                if s not in out:
                    out.append(s)
    return out


def _generated_cases(suites: list[str], n: int | None, seed: int, quick: bool) -> list[Any]:
    from mmsynth.evaluate.bench import get_suite, make_cases

    if n is not None and n < 1:
        raise InputError(f"--n must be >= 1, got {n}")
    cases = []
    for name in suites:
        s = get_suite(name)
        if s.make_cases is None:
            raise InputError(f"suite '{name}' has no case generator ({s.pending or 'no rows yet'})")
        cases += make_cases(name, n or (s.quick_n if quick else s.default_n), seed)
    return cases


def _check_report(
    json_out: str, overwrite: bool, html: str | None = None, no_html: bool = True
) -> tuple[Path, Path | None]:
    """Check, before any work, every file a report writes (OUT.json, OUT.md, OUT.cases.jsonl, the HTML folder)."""
    from mmsynth.evaluate.bench.report import cases_path, default_html_dir, markdown_path

    out = check_output_file(json_out, "--json", suffixes=(".json",), overwrite=overwrite)
    for path in (markdown_path(out), cases_path(out)):
        check_output_file(path, f"--json '{out}' (its report file)", overwrite=overwrite)
    if no_html:
        return out, None
    html_dir = Path(html) if html else default_html_dir(out)
    return out, check_output_dir(html_dir, "--html" if html else f"--json '{out}' (its HTML report folder)",
                                 overwrite=overwrite)


def _make_cases(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.bench import write_cases

    out = check_output_file(args.out, "--out", overwrite=args.overwrite)
    cases = _generated_cases(_suite_list(args.suite), args.n, args.seed, quick=False)
    write_cases(cases, out)
    print(f"wrote {len(cases)} case(s) to {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from mmsynth.evaluate.bench import (
        Distributed,
        RunContext,
        RunOptions,
        SamplerSettings,
        parse_sweep,
        parse_variant,
        read_cases,
    )
    from mmsynth.evaluate.bench.cases import keep_categories
    from mmsynth.evaluate.bench.generation import check_extractor
    from mmsynth.evaluate.bench.report import write_report
    from mmsynth.evaluate.bench.runner import run_bench
    from mmsynth.sample.request import GenerationRequest

    given = [bool(args.cases), bool(args.suite), args.quick]
    if sum(given) != 1:
        raise InputError("bench run: give exactly one of --cases FILE, --suite NAME or --quick")
    if args.html and not args.json_out:
        raise InputError("--html needs --json (the report sits beside the JSON)")
    if args.html and args.no_html:
        raise InputError("give --html DIR or --no-html, not both")
    if args.cases:  # options that only generate cases would be silently ignored
        ignored = [f"--{name}" for name, default in (("n", None), ("seed", 0)) if getattr(args, name) != default]
        if ignored:
            raise InputError(f"{ignored[0]} applies to generated cases (--suite, --quick), not to --cases files")
    json_out, html_dir = (None, None) if not args.json_out else _check_report(
        args.json_out, args.overwrite, args.html, args.no_html)
    check_extractor(args.extractor, args.weights)
    sampling = sampling_kwargs(args)
    GenerationRequest(**sampling).validate()  # same errors as generate
    sweeps = dict(parse_sweep(s) for s in args.sweep)
    variants = [parse_variant(v) for v in args.variant]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None

    if args.cases:
        cases = [c for path in args.cases for c in read_cases(path)]
        ids = [c.id for c in cases]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InputError(f"--cases: case id '{dup}' appears in more than one file; ids must be unique")
        source: dict[str, Any] = {"files": args.cases, "sha256": [_sha256(p) for p in args.cases]}
    else:
        names = _suite_list(args.suite) if args.suite else _suite_list(["all"])
        cases = _generated_cases(names, args.n, args.seed, quick=args.quick)
        source = {"generated": names, "seed": args.seed, "quick": args.quick}
    if args.categories:
        cases = keep_categories(cases, args.categories)
        source["categories"] = args.categories

    device = resolve_device(args.device)
    dist = Distributed.from_env(device)
    ctx = RunContext(
        model=args.model,
        device=dist.device or device,
        sampler=SamplerSettings(**sampling),
        extractor=args.extractor,
        weights=args.weights,
        progress=not args.quiet,
        batch_size=args.batch,
    )
    options = RunOptions(rows=rows, sweeps=sweeps, variants=variants, strict=args.strict, panels=args.panels,
                         include_pending=args.quick or (args.suite is not None and "all" in args.suite))  # fmt: skip
    result = run_bench(cases, ctx, options, dist)
    if result is None:  # not the main process: it only generated
        return 0
    result.environment["cases"] = source
    if json_out is not None:
        written = write_report(result, json_out, html_dir, overwrite=args.overwrite)
        print(result.markdown())
        print("wrote " + ", ".join(str(w) for w in written), file=sys.stderr)
    else:
        print(result.markdown())
    return 0


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fidelity(args: argparse.Namespace) -> int:
    import time

    from mmsynth.evaluate.bench import BenchResult, RowResult, RunContext
    from mmsynth.evaluate.bench.fidelity_suite import folder_fidelity, png_files
    from mmsynth.evaluate.bench.generation import check_extractor
    from mmsynth.evaluate.bench.report import markdown_path
    from mmsynth.evaluate.bench.results import environment
    from mmsynth.io import write_json, write_text

    check_extractor(args.extractor, args.weights)
    json_out = _check_report(args.json_out, args.overwrite)[0] if args.json_out else None
    png_files(args.real, "--real")  # folder errors before loading any model
    png_files(args.fake, "--fake")
    device = resolve_device(args.device or "cpu")
    ctx = RunContext(model=args.model, device=device, extractor=args.extractor, weights=args.weights)
    t = time.perf_counter()
    scored = folder_fidelity(args.real, args.fake, ctx.features(), seed=args.seed)
    wall = time.perf_counter() - t
    row = RowResult("fidelity", "folders", "method", f"{args.fake} vs {args.real}", scored.metrics, scored.unavailable,
                    n_cases=len(png_files(args.fake, "--fake")), wall_s=wall)  # fmt: skip
    env = environment(device, 1)
    env["extractor"] = args.extractor
    env["resize"] = "PIL bicubic to the extractor's input size"
    env["folders"] = {"real": str(args.real), "fake": str(args.fake), "n_real": len(png_files(args.real, "--real"))}
    result = BenchResult([row], environment=env, wall_s=wall)
    print(result.markdown())
    if json_out is not None:
        write_text(result.markdown(), markdown_path(json_out))
        write_json(result.to_dict(), json_out)
    return 0
