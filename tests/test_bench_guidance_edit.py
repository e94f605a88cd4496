"""The `guidance` and `edit` bench suites: cases, metrics on constructed images, row categories, sweeps, cost."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from mmsynth.data import render
from mmsynth.data.vocab import HELDOUT_COMBOS
from mmsynth.errors import InputError
from mmsynth.evaluate.bench import (
    Case,
    RunContext,
    RunOptions,
    SamplerSettings,
    generate_shard,
    get_suite,
    make_cases,
    parse_sweep,
    parse_variant,
    read_cases,
    run_bench,
    write_cases,
)
from mmsynth.evaluate.bench.cases import keep_categories
from mmsynth.evaluate.bench.edit_suite import inpaint_prompt, mask_array, new_object, source_image


@pytest.fixture(scope="module")
def edit_cases():
    return make_cases("edit", 3, seed=0)


@pytest.fixture(scope="module")
def guidance_cases():
    return make_cases("guidance", 3, seed=0)


def _ctx(bundle, steps=2):
    return RunContext(bundle_obj=bundle, sampler=SamplerSettings(steps=steps))


def test_edit_cases_round_trip_and_describe_real_edits(tmp_path, edit_cases):
    write_cases(edit_cases, tmp_path / "c.jsonl")
    back = read_cases(tmp_path / "c.jsonl")
    assert [c.to_dict() for c in back] == [c.to_dict() for c in edit_cases]
    for c in back:
        src = c.extra.get("source")
        if c.category == "swap":
            a, b = source_image(c), c.render()
            (o,), (n,) = c.scene.objects, [*src_objects(c)]
            assert o.color != n.color and o.shape == n.shape and (o.color, o.shape) not in HELDOUT_COMBOS
            assert c.extra["source_prompt"] != c.prompt and not np.array_equal(a, b)
        elif c.category == "inpaint":
            m = mask_array(c)
            outside = ~m
            assert 0 < m.mean() < 0.6
            assert np.array_equal(source_image(c)[outside], c.render()[outside])  # the edit stays inside the mask
        else:
            assert src is None and np.array_equal(source_image(c), c.render())


def src_objects(case: Case):
    from mmsynth.evaluate.bench.edit_suite import source_scene

    return source_scene(case).objects


def test_edit_metrics_on_constructed_outputs(bundle, edit_cases):
    suite = get_suite("edit")
    ctx = _ctx(bundle)
    edits = [c for c in edit_cases if c.category != "inversion"]
    perfect = suite.score(ctx, edits, [c.render() for c in edits], [])
    assert perfect.metrics["edit_success"].value == 1.0
    assert perfect.metrics["inpaint_inside_acc"].value == 1.0
    assert perfect.metrics["inpaint_outside_psnr"].value == 100.0  # pixel-identical outside the mask (capped)
    unchanged = suite.score(ctx, edits, [source_image(c) for c in edits], [])
    assert unchanged.metrics["edit_success"].value == 0.0  # the colour did not change
    assert unchanged.metrics["inpaint_inside_acc"].value == 0.0
    assert unchanged.metrics["kept_psnr"].value == 100.0
    shifted = [np.roll(c.render(), 16, axis=1) for c in edits]  # right colour and shape, wrong place
    moved = suite.score(ctx, edits, shifted, [])
    assert moved.metrics["edit_success"].value == 0.0 and moved.metrics["kept_psnr"].value < 30
    inv = [c for c in edit_cases if c.category == "inversion"]
    noisy = [np.clip(c.render().astype(int) + np.random.default_rng(0).integers(-8, 9, (64, 64, 3)), 0, 255)
             .astype(np.uint8) for c in inv]  # fmt: skip
    m = suite.score(ctx, inv, noisy, []).metrics["inversion_psnr"]
    assert 30 < m.value < 35 and m.n == len(inv) and m.low < m.value < m.high  # 8-level uniform noise: ~31.9 dB


def test_guidance_metrics_on_constructed_outputs(bundle, guidance_cases):
    suite = get_suite("guidance")
    ctx = _ctx(bundle)
    gt = suite.score(ctx, guidance_cases, [c.render() for c in guidance_cases], [])
    assert gt.metrics["palette_error"].value == 0.0 and gt.metrics["palette_attribute_acc"].value == 1.0
    assert gt.metrics["box_ap50"].value == 1.0 and gt.metrics["box_attribute_acc"].value == 1.0
    flipped = suite.score(ctx, guidance_cases, [c.render()[:, ::-1].copy() for c in guidance_cases], [])
    assert flipped.metrics["palette_error"].value > 5
    assert flipped.metrics["box_ap50"].value < 1.0
    for c in guidance_cases:
        if c.category == "box":
            assert len({o.color for o in c.scene.objects}) == len(c.scene.objects)


def test_rows_run_only_their_categories_with_cost_ratios_and_sweeps(bundle, guidance_cases, edit_cases):
    cases = [c for c in guidance_cases if c.id.endswith("0000")] + [
        c for c in edit_cases if c.category in ("swap", "inpaint") and c.id.endswith("0000")]
    opts = RunOptions(rows=["unguided", "palette", "box", "regenerate", "img2img", "inpaint", "inpaint_latent_only"],
                      sweeps=dict([parse_sweep("s0=2"), parse_sweep("strength=0.5")]),
                      variants=[parse_variant("inpaint:resample=2,cfg=3")])
    res = run_bench(cases, _ctx(bundle), opts).to_dict()
    g, e = res["results"]["guidance"], res["results"]["edit"]
    assert res["rows"]["guidance"]["palette"]["n_cases"] == 1 and res["rows"]["guidance"]["unguided"]["n_cases"] == 2
    assert "box_ap50" not in g["palette"] and "palette_error" not in g["box"]
    assert g["unguided"]["cost_ratio"] == 1.0 and g["palette"]["cost_ratio"] > 0
    assert res["rows"]["guidance"]["palette[s0=2]"]["settings"]["s0"] == 2.0
    assert res["rows"]["edit"]["img2img[strength=0.5]"]["settings"]["strength"] == 0.5
    assert "box[s0=2]" in g and "regenerate[s0=2]" not in e
    settings = res["rows"]["edit"]["inpaint[resample=2,cfg=3]"]["settings"]
    assert settings["resample"] == 2.0 and settings["cfg"] == 3.0  # both changed in one row
    assert e["inpaint[resample=2,cfg=3]"]["inpaint_outside_psnr"] == 100.0
    assert e["inpaint"]["inpaint_outside_psnr"] == 100.0  # known pixels pasted back exactly
    assert e["inpaint_latent_only"]["inpaint_outside_psnr"] < 100.0  # latent blending alone does not keep them


def test_inversion_rows_reconstruct_and_cases_are_checked(bundle, edit_cases):
    inv = [c for c in edit_cases if c.category == "inversion"][:1]
    res = run_bench(inv, _ctx(bundle), RunOptions(rows=["inversion", "ground_truth"], sweeps={"steps": [3]}))
    d = res.to_dict()
    assert set(d["results"]["edit"]) == {"inversion", "inversion[steps=3]"}  # no ground truth: source == target
    assert d["rows"]["edit"]["inversion"]["settings"]["steps"] == 50 and d["rows"]["edit"]["inversion"]["settings"][
        "cfg"] == 1.0
    bad = dataclasses.replace(next(c for c in edit_cases if c.category == "swap"), extra={"make_seed": 0})
    with pytest.raises(InputError, match=r"extra\.source"):
        get_suite("edit").check(bad)


@pytest.mark.parametrize("text,message", [
    ("k=1.5", "whole numbers >= 1"), ("strength=0", "in \\(0, 1\\]"), ("s0=-1", ">= 0"), ("bogus=1", "one of cfg"),
])  # fmt: skip
def test_bad_sweeps_name_what_is_valid(text, message):
    with pytest.raises(InputError, match=message):
        parse_sweep(text)


@pytest.mark.parametrize("text,rows,message", [
    ("swap", None, "expected ROW:PARAM=V"), ("swap:strength=0.5,0.6", None, "PARAM one of cfg"),
    ("swap:strength=1.5", None, "in \\(0, 1\\]"), ("nope:cfg=1", None, "unknown row 'nope'"),
    ("palette:strength=0.5", None, "cannot vary strength"),
])  # fmt: skip
def test_bad_variants_name_what_is_valid(bundle, edit_cases, text, rows, message):
    with pytest.raises(InputError, match=message):
        run_bench(edit_cases[:1], _ctx(bundle), RunOptions(rows=rows, variants=[parse_variant(text)]))


def test_a_variant_runs_without_its_base_row_and_categories_filter_cases(bundle, guidance_cases):
    palette = keep_categories(guidance_cases, "palette")
    assert palette and {c.category for c in palette} == {"palette"}
    with pytest.raises(InputError, match="the cases have box, palette"):
        keep_categories(guidance_cases, "palette,nope")
    opts = RunOptions(rows=["unguided"], variants=[parse_variant("palette:s0=2")])
    res = run_bench(palette[:1], _ctx(bundle), opts).to_dict()
    assert set(res["results"]["guidance"]) == {"unguided", "palette[s0=2]"}  # not the base 'palette' row
    assert res["rows"]["guidance"]["palette[s0=2]"]["settings"]["s0"] == 2.0


def test_inpaint_cases_render_the_new_object_inside_the_mask(edit_cases):
    for c in edit_cases:
        if c.category == "inpaint":
            new = c.scene.objects[c.extra["target_object"]]
            x0, y0, x1, y1 = new.box()
            m = mask_array(c)
            assert m[int(y0 * 64) + 1, int(x0 * 64) + 1] and m[int(y1 * 64) - 2, int(x1 * 64) - 2]
            assert render(c.scene, 64).shape == (64, 64, 3)


def test_the_object_prompt_setting_names_only_the_new_object(bundle, edit_cases):
    case = next(c for c in edit_cases if c.category == "inpaint")
    new = new_object(case)
    scene_ctx = _ctx(bundle)
    object_ctx = dataclasses.replace(scene_ctx, params={"object_prompt": 1})
    assert inpaint_prompt(scene_ctx, case) == case.prompt and " and " in case.prompt  # both objects
    assert inpaint_prompt(object_ctx, case) == f"a {new.color} {new.shape}"
    row = dataclasses.replace(get_suite("edit").rows["inpaint"], overrides={"steps": 3, "object_prompt": 1})
    todo = [c for c in edit_cases if c.category == "inpaint"]
    alone = [img for _, img in generate_shard(dataclasses.replace(scene_ctx, batch_size=1), row, todo)]
    batch = [img for _, img in generate_shard(dataclasses.replace(scene_ctx, batch_size=3), row, todo)]
    plain = [img for _, img in generate_shard(scene_ctx, dataclasses.replace(row, overrides={"steps": 3}), todo)]
    for a, b, p in zip(alone, batch, plain):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
        assert np.abs(a.astype(int) - p.astype(int)).max() > 2  # the prompt reached the sampler


@pytest.mark.parametrize(("row_name", "category"), [("palette_backward", "palette"), ("box", "box"),
                                                    ("box_backward", "box")])
def test_guided_rows_batch_to_the_images_of_cases_guided_alone(bundle, guidance_cases, row_name, category):
    row = get_suite("guidance").rows[row_name]
    row = dataclasses.replace(row, overrides={"s0": 200.0, "k": 2})  # strong, with recurrence: guidance must act
    todo = [c for c in guidance_cases if c.category == category]
    alone = [img for _, img in generate_shard(dataclasses.replace(_ctx(bundle), batch_size=1), row, todo)]
    batch = [img for _, img in generate_shard(dataclasses.replace(_ctx(bundle), batch_size=3), row, todo)]
    plain = [img for _, img in generate_shard(_ctx(bundle), get_suite("guidance").rows["unguided"], todo)]
    for a, b, u in zip(alone, batch, plain):  # each image guided by its own case's guide only
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
        assert np.abs(a.astype(int) - u.astype(int)).max() > 10


def test_the_layout_attention_row_batches_to_the_images_of_cases_alone_and_acts(bundle, guidance_cases):
    row = dataclasses.replace(get_suite("guidance").rows["box_attention"], overrides={"layout_strength": 1.0})
    todo = [c for c in guidance_cases if c.category == "box"]
    alone = [img for _, img in generate_shard(dataclasses.replace(_ctx(bundle), batch_size=1), row, todo)]
    batch = [img for _, img in generate_shard(dataclasses.replace(_ctx(bundle), batch_size=3), row, todo)]
    plain = [img for _, img in generate_shard(_ctx(bundle), get_suite("guidance").rows["unguided"], todo)]
    for a, b, u in zip(alone, batch, plain):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
        assert np.abs(a.astype(int) - u.astype(int)).max() > 2


@pytest.mark.parametrize(("row_name", "category"), [("inversion_dpmpp-2m", "inversion"), ("img2img", "swap"),
                                                    ("inversion_null_text", "inversion"),
                                                    ("inpaint", "inpaint"), ("inpaint_latent_only", "inpaint"),
                                                    ("inpaint_guided", "inpaint"), ("inpaint_resample", "inpaint"),
                                                    ("inpaint_layout", "inpaint"),
                                                    ("swap", "swap"), ("swap_attention", "swap"),
                                                    ("swap_partial", "swap"), ("swap_recolour", "swap")])
def test_edit_rows_batch_to_the_images_of_cases_edited_alone(bundle, edit_cases, row_name, category):
    row = dataclasses.replace(get_suite("edit").rows[row_name], overrides={"steps": 3})
    todo = [c for c in edit_cases if c.category == category]
    alone = [img for _, img in generate_shard(dataclasses.replace(_ctx(bundle), batch_size=1), row, todo)]
    batch = [img for _, img in generate_shard(dataclasses.replace(_ctx(bundle), batch_size=3), row, todo)]
    for a, b in zip(alone, batch):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert len({a.tobytes() for a in batch}) == len(batch)


def test_the_inpainting_unet_row_runs_on_a_bundle_that_has_one_and_is_skipped_otherwise(bundle, edit_cases):
    from mmsynth.models.bundle import INPAINTING_UNET
    from mmsynth.train.recipes.inpaint import inpainting_unet

    todo = [c for c in edit_cases if c.category == "inpaint"][:2]
    plain = run_bench(todo, _ctx(bundle), RunOptions(rows=["inpaint_unet"])).to_dict()
    assert not plain["results"]["edit"]["inpaint_unet"]  # no metrics: every case skipped
    assert plain["rows"]["edit"]["inpaint_unet"]["n_skipped"] == 2 and "lacks inpainting_unet" in json.dumps(plain)
    unet = inpainting_unet(bundle.unet)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:] = 0.3 * torch.randn_like(unet.conv_in.weight[:, 4:])
    rich = dataclasses.replace(bundle, extras={INPAINTING_UNET: unet.eval()})
    res = run_bench(todo, _ctx(rich), RunOptions(rows=["inpaint", "inpaint_unet"])).to_dict()["results"]["edit"]
    assert res["inpaint_unet"]["inpaint_outside_psnr"] == 100.0
    row = dataclasses.replace(get_suite("edit").rows["inpaint_unet"], overrides={"steps": 3})
    alone = [img for _, img in generate_shard(dataclasses.replace(_ctx(rich), batch_size=1), row, todo)]
    batch = [img for _, img in generate_shard(dataclasses.replace(_ctx(rich), batch_size=2), row, todo)]
    base = [img for _, img in generate_shard(_ctx(rich), get_suite("edit").rows["inpaint"], todo)]
    for a, b, p in zip(alone, batch, base):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
        assert np.abs(a.astype(int) - p.astype(int)).max() > 2  # 'inpaint' keeps to the text-to-image UNet


def test_paste_metrics_tell_a_copied_exemplar_from_the_drawn_object(bundle, edit_cases):
    """exemplar_ssim: the exemplar resized into the mask scores ~1 (a paste), the true render of the edit low."""
    import cv2

    from mmsynth.evaluate.bench.edit_suite import PASTE_SSIM, exemplar_image, exemplar_ssim, mask_array

    todo = [c for c in edit_cases if c.category == "inpaint"]
    for c in todo:
        ys, xs = np.nonzero(mask_array(c))
        pasted = source_image(c).copy()
        h, w = ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()
        pasted[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1] = cv2.resize(exemplar_image(c), (w, h),
                                                                           interpolation=cv2.INTER_AREA)
        assert exemplar_ssim(c, pasted) > 0.99
        assert exemplar_ssim(c, c.render()) < PASTE_SSIM
    scored = get_suite("edit").score(_ctx(bundle), todo, [c.render() for c in todo], []).metrics
    assert scored["paste_rate"].value == 0.0 and scored["exemplar_ssim"].value < PASTE_SSIM


def test_the_paint_by_example_row_runs_on_a_bundle_with_the_components_and_is_skipped_otherwise(bundle, edit_cases):
    from mmsynth.models.exemplar_encoder import exemplar_encoder_from_clip
    from mmsynth.train.recipes.inpaint import inpainting_unet
    from mmsynth.train.recipes.paint_by_example import paint_by_example_unet

    todo = [c for c in edit_cases if c.category == "inpaint"][:2]
    plain = run_bench(todo, _ctx(bundle), RunOptions(rows=["paint_by_example"])).to_dict()
    assert plain["rows"]["edit"]["paint_by_example"]["n_skipped"] == 2 and "lacks paint_by_example" in json.dumps(
        plain)
    unet = paint_by_example_unet(inpainting_unet(bundle.unet))
    encoder = exemplar_encoder_from_clip(bundle.clip, width=int(unet.config.cross_attention_dim))
    rich = dataclasses.replace(bundle, extras={"paint_by_example_unet": unet.eval(),
                                               "paint_by_example_encoder": encoder.eval()})
    res = run_bench(todo, _ctx(rich), RunOptions(rows=["paint_by_example"])).to_dict()["results"]["edit"]
    assert res["paint_by_example"]["inpaint_outside_psnr"] == 100.0 and "paste_rate" in res["paint_by_example"]
