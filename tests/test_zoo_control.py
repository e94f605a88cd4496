"""`mmsynth zoo ship control` and `mmsynth zoo curve`: a ControlNet / T2I-Adapter run shipped into a tiny bundle as
its control-suite component (loadable, nameable by the sampler, carded with its commands), refused without
--overwrite, and the condition-following curve: one point per snapshot, cached by step."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsynth.cli.main import main
from mmsynth.errors import InputError
from mmsynth.evaluate.ship import curve as curve_mod
from mmsynth.evaluate.ship.curve import METRICS, control_run, snapshots

FAST = ["--n", "1", "--steps", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny bundle with cross-attention in every down block (a full T2I-Adapter needs it), saved in float16 as
    the zoo ships, and the bundle object."""
    from mmsynth.models.zoo import TINY, random_bundle

    b = random_bundle(dataclasses.replace(TINY, unet_cross_attention_levels=(True, True, True)), seed=0)
    folder = tmp_path_factory.mktemp("base") / "zoo"
    b.save_pretrained(folder, dtype=torch.float16)
    return folder, b


def _network(b, recipe: str, seed: int, channels: int = 3) -> torch.nn.Module:
    """A tiny ControlNet or adapter whose weights differ by seed (a ControlNet's zero convolutions made non-zero, so
    it controls)."""
    from mmsynth.models.zoo import build_adapter, build_controlnet

    torch.manual_seed(seed)
    if recipe == "controlnet":
        net = build_controlnet(b.unet, b.vae_scale_factor, conditioning_channels=channels)
        with torch.no_grad():
            for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
                p.normal_(0, 0.05)
        return net
    return build_adapter(b.unet, b.vae_scale_factor, in_channels=channels)


def make_run(root: Path, base, recipe: str = "controlnet", condition: str = "canny", exports=(2, 4),
             final: int | None = 5, channels: int = 3) -> Path:  # fmt: skip
    """A control run folder as the trainer leaves it: config.yaml, log.csv, exports/step_N/<network>, final/ and
    summary.json (when `final`)."""
    from mmsynth.models.bundle import save_components
    from mmsynth.train.trainer import checkpoint_name

    folder, b = base
    network = "controlnet" if recipe == "controlnet" else "adapter"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(f"recipe: {recipe}\nout: {root}\nmax_steps: 5\nbatch_size: 2\nlr: 0.0001\n"
                                      f"mixed_precision: 'no'\nexport_every: 2\noptions:\n  base: {folder}\n"
                                      f"  condition: {condition}\n  conditioning_channels: {channels}\n")  # fmt: skip
    steps = [*exports, *([final] if final else [])]
    (root / "log.csv").write_text("step,loss,lr,sec_per_step,examples_per_sec\n" + "".join(
        f"{s},{0.1 / s:.4f},0.0001,36.0,0.05\n" for s in steps))  # fmt: skip
    for s in exports:
        save_components(root / "exports" / checkpoint_name(s), dtype=torch.float16,
                        **{network: _network(b, recipe, s, channels)})  # fmt: skip
    if final:
        save_components(root / "final", dtype=torch.float16, **{network: _network(b, recipe, final, channels)})
        (root / "summary.json").write_text(json.dumps({"recipe": recipe, "step": final}))
    return root


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture
def counted(monkeypatch):
    """The rows the curve runs through the bench, in order (each call of run_bench)."""
    import mmsynth.evaluate.bench as bench

    calls: list[str] = []
    real = bench.run_bench

    def run_bench(cases, ctx, options=None, *args, **kwargs):
        calls.extend(options.rows)
        return real(cases, ctx, options, *args, **kwargs)

    monkeypatch.setattr(bench, "run_bench", run_bench)
    return calls


def test_the_component_is_named_from_the_recipe_and_condition(tmp_path):
    def run(recipe: str, condition: str, name: str | None = None):
        folder = tmp_path / f"{recipe}_{condition}_{name}"
        folder.mkdir(exist_ok=True)
        (folder / "config.yaml").write_text(f"recipe: {recipe}\noptions:\n  condition: {condition}\n  base: b\n")
        return control_run(folder, name)

    assert (run("controlnet", "canny").component, run("controlnet", "canny").network) == ("controlnet_canny",
                                                                                          "controlnet")
    assert run("controlnet", "segmentation").metric == "segmentation_miou"
    depth = run("t2i-adapter", "depth")
    assert (depth.component, depth.cls, depth.network, depth.base) == ("adapter_depth", "T2IAdapter", "adapter", "b")
    assert run("t2i-adapter", "xdog").component == run("t2i-adapter", "lineart").component == "adapter_sketch"
    assert run("t2i-adapter", "lineart").category == "sketch"
    assert run("t2i-adapter", "palette").metric == "palette_error"
    assert run("controlnet", "depth", "controlnet_segmentation").category == "segmentation"  # --name overrides
    with pytest.raises(InputError, match="name the one it stands in for with --name"):
        run("controlnet", "hed")
    with pytest.raises(InputError, match="ships as one of controlnet_canny, controlnet_segmentation"):
        run("controlnet", "canny", "adapter_depth")
    with pytest.raises(InputError, match="this takes a control run"):
        run("t2i", "canny")
    with pytest.raises(InputError, match=r"has no config\.yaml"):
        control_run(tmp_path / "nothing")


def test_each_category_figure_is_one_the_control_suite_scores():
    from mmsynth.evaluate.bench import get_suite, make_cases

    cases = make_cases("control", 1, seed=0)
    scored = get_suite("control").score(None, cases, [c.render() for c in cases], []).metrics
    assert all(metric in scored for metric in METRICS.values())
    assert scored["canny_f1"].value == 1.0 and scored["depth_order"].value == 1.0


def test_shipping_a_controlnet_and_an_adapter_loads_measures_and_cards_them(tmp_path, base, capsys):
    from diffusers import ControlNetModel, T2IAdapter
    from safetensors import safe_open

    from mmsynth.models import Bundle
    from mmsynth.sample import GenerationRequest, sample
    from mmsynth.sample.controls import control_from_dict

    out, reports = tmp_path / "zoo", tmp_path / "reports"
    shutil.copytree(base[0], out)
    (out / "README.md").write_text("# zoo\n\nWeights: 9.9 MiB of safetensors (F16).\n\n## Quality\n\nq\n")
    run = make_run(tmp_path / "runs" / "controlnet_canny", base)
    args = ["zoo", "ship", "control", "--run", str(run), "--out", str(out), "--reports", str(reports), "--no-parts",
            *FAST, "--cfg", "3", "--curve-n", "1"]  # fmt: skip
    assert main(args) == 0
    shipped = out / "controlnet_canny"
    net = ControlNetModel.from_pretrained(out, subfolder="controlnet_canny")
    assert isinstance(net, ControlNetModel)
    with safe_open(str(shipped / "diffusion_pytorch_model.safetensors"), framework="pt") as st:
        assert {str(st.get_slice(k).get_dtype()) for k in st.keys()} == {"F16"}  # noqa: SIM118
    manifest = json.loads((out / "mmsynth_components.json").read_text())["components"]
    assert manifest["controlnet_canny"] == {"library": "diffusers", "class": "ControlNetModel"}
    card = shipped.joinpath("README.md").read_text()
    bench = (f"`mmsynth bench run --suite control --categories canny --n 1 --seed 4 --model {out} --rows "
             "ground_truth,vae_ceiling,no_control,controlnet_canny --steps 2 --cfg 3`")  # fmt: skip
    assert bench in card and "| controlnet_canny | 1 | " in card and "| no_control | 1 | " in card
    assert "| row | n | canny_f1 | canny_f1_low | canny_attribute_acc |" in card
    assert f"the final export `{run / 'final'}`: 5 steps of batch 2 (10 examples)" in card
    assert "logged wall time 0.05 h" in card and "condition: canny" in card  # 5 steps of 36 s; the config quoted
    curve_cmd = f"`mmsynth zoo curve --run {run} --model {out} --n 1 --seed 4 --steps 2 --cfg 3 --out {run / 'curve'}`"
    assert curve_cmd in card and "![canny_f1 against the training step](condition_curve.png)" in card
    assert "| no_control | " in card and "| 2 | " in card and "| 4 | " in card and "| 5 | " in card
    assert (shipped / "condition_curve.png").is_file() and (shipped / "metrics_control.json").is_file()
    assert ".tmp-" not in (shipped / "metrics_control.json").read_text() + card  # named as shipped
    bundle_card = (out / "README.md").read_text()
    assert "Control components: `controlnet_canny/` (ControlNet)" in bundle_card
    assert "Weights: 9.9 MiB" not in bundle_card and bundle_card.index("Control") < bundle_card.index("## Quality")
    assert not _leftovers(tmp_path)

    # refused without --overwrite, before any work: the bundle is as it was
    before = _tree(out)
    capsys.readouterr()
    assert main(args) == 2 and "already has controlnet_canny/ (pass --overwrite" in capsys.readouterr().err
    assert _tree(out) == before and not _leftovers(tmp_path)

    # an adapter run without snapshots (no curve) ships beside it; both are listed on the bundle card
    depth = make_run(tmp_path / "runs" / "adapter_depth", base, "t2i-adapter", "depth", exports=(), channels=1)
    assert main(["zoo", "ship", "control", "--run", str(depth), "--out", str(out), "--reports", str(reports),
                 "--no-parts", *FAST]) == 0  # fmt: skip
    assert isinstance(T2IAdapter.from_pretrained(out, subfolder="adapter_depth"), T2IAdapter)
    card = (out / "adapter_depth" / "README.md").read_text()
    assert "--categories depth" in card and "depth_order" in card and "## Condition-following curve" not in card
    assert "Control components: `adapter_depth/` (T2I-Adapter), `controlnet_canny/` (ControlNet)" in (
        out / "README.md").read_text()  # fmt: skip

    # the sampler's controls name both components of the shipped bundle
    bundle = Bundle.from_pretrained(out)
    r = bundle.resolution
    edges, depth_map = np.zeros((r, r), np.uint8), np.full((r, r), 128, np.uint8)
    edges[8, 4:28] = 255
    controls = [control_from_dict({"name": "controlnet", "model": "controlnet_canny", "image": edges}),
                control_from_dict({"name": "t2i-adapter", "model": "adapter_depth", "image": depth_map})]
    req = GenerationRequest(prompt="a red circle", steps=2, seed=0)
    plain = sample(bundle, req, progress=False).latents
    assert not torch.allclose(sample(bundle, req, controls[:1], progress=False).latents, plain)
    assert not torch.allclose(sample(bundle, req, controls[1:], progress=False).latents, plain)


def test_a_snapshot_ships_with_overwrite_and_reuses_the_cached_curve(tmp_path, base, counted):
    from mmsynth.evaluate.ship import ship_control

    out = tmp_path / "zoo"
    shutil.copytree(base[0], out)
    run = make_run(tmp_path / "runs" / "cn", base)

    def bench(argv):
        return main(list(argv))

    kwargs = dict(n=1, steps=2, curve_n=1, reports=tmp_path / "reports", parts=None)
    ship_control(run, out, bench, **kwargs)
    assert counted == ["no_control", "controlnet_canny", "controlnet_canny", "controlnet_canny"]  # 2, 4, final 5
    with pytest.raises(InputError, match="already has controlnet_canny"):
        ship_control(run, out, bench, step=2, **kwargs)
    with pytest.raises(InputError, match=r"has no export at step 3 .*snapshots at steps: 2, 4, 5\)"):
        ship_control(run, out, bench, step=3, overwrite=True, **kwargs)
    counted.clear()
    ship_control(run, out, bench, step=2, overwrite=True, **kwargs)
    assert counted == []  # every point of the curve was cached
    card = (out / "controlnet_canny" / "README.md").read_text()
    assert f"the snapshot `{run / 'exports' / 'step_0000002'}` (--step 2): 2 steps of batch 2" in card
    assert "logged wall time 0.02 h" in card  # the log up to step 2 only
    from mmsynth.models.bundle import load_component

    a = load_component(out, "controlnet_canny").state_dict()
    b = load_component(run / "exports" / "step_0000002", "controlnet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_curve_has_one_point_per_snapshot_and_reuses_cached_points(tmp_path, base, counted, capsys):
    run = make_run(tmp_path / "runs" / "cn", base)
    out = tmp_path / "curve"
    args = ["zoo", "curve", "--run", str(run), "--out", str(out), *FAST, "--quiet"]
    assert main(args) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert sorted(curve["points"], key=int) == ["2", "4", "5"] and (out / "curve.png").is_file()
    assert curve["settings"]["metric"] == "canny_f1" and curve["no_control"]["n"] == 1
    assert all(p["n"] == 1 and len(p["sha256"]) == 64 for p in curve["points"].values())
    assert curve["points"]["5"]["export"] == str(run / "final")
    printed = capsys.readouterr().out
    assert "| step | canny_f1 | n |" in printed and "| 4 | " in printed
    assert counted == ["no_control", "controlnet_canny", "controlnet_canny", "controlnet_canny"]

    counted.clear()  # rerun as the run goes on: only the new snapshot, and a re-exported one, are measured
    from mmsynth.models.bundle import save_components

    for step, seed in ((6, 6), (4, 9)):  # a new snapshot, and step 4 exported anew with other weights
        save_components(run / "exports" / f"step_{step:07d}", dtype=torch.float16,
                        controlnet=_network(base[1], "controlnet", seed))  # fmt: skip
    assert main(args) == 0
    assert counted == ["controlnet_canny", "controlnet_canny"]
    again = json.loads((out / "curve.json").read_text())
    assert sorted(again["points"], key=int) == ["2", "4", "5", "6"]
    assert again["points"]["2"] == curve["points"]["2"] and again["no_control"] == curve["no_control"]

    counted.clear()  # other settings: refused unless --overwrite; --every keeps the multiples
    capsys.readouterr()
    assert main([*args, "--seed", "5"]) == 2 and "under other settings (seed)" in capsys.readouterr().err
    assert main([*args, "--seed", "5", "--every", "4", "--overwrite"]) == 0
    assert sorted(json.loads((out / "curve.json").read_text())["points"]) == ["4"]
    assert counted == ["no_control", "controlnet_canny"]
    model = tmp_path / "copy"  # the same weights elsewhere keep their points; another UNet does not
    shutil.copytree(base[0], model)
    counted.clear()
    assert main([*args, "--seed", "5", "--every", "4", "--model", str(model)]) == 0 and counted == []
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-2] + b"\x00\x00")
    capsys.readouterr()
    assert main([*args, "--seed", "5", "--every", "4", "--model", str(model)]) == 2
    assert "under other settings (model_sha256)" in capsys.readouterr().err
    assert main([*args, "--seed", "5", "--every", "4", "--cfg", "3"]) == 2  # the guidance scale is a setting too
    assert "under other settings (sampler)" in capsys.readouterr().err


def test_the_curve_finds_snapshots_and_refuses_a_run_without_any(tmp_path, base):
    run = make_run(tmp_path / "runs" / "empty", base, exports=(), final=None)
    (run / "exports" / "step_0000003").mkdir(parents=True)  # an export being written: no config.json yet
    info = control_run(run)
    assert snapshots(info) == []
    with pytest.raises(InputError, match="has no snapshots"):
        curve_mod.condition_curve(info, tmp_path / "c", n=1, steps=2)
    with pytest.raises(InputError, match="has no final export"):
        curve_mod.export_folder(info)
    assert curve_mod.logged_wall_h(run) == 0.0
