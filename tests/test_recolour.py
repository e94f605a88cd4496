"""Recolour guidance for prompt swaps: the colour-region annotator, confined guidance, the edit's request and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmsynth.annotate import annotate
from mmsynth.data.render import render_scene
from mmsynth.data.scene import sample_scene
from mmsynth.errors import InputError
from mmsynth.sample import GenerationRequest, UniversalGuidance, edit_request, sample
from mmsynth.sample.recolour import colour_change, recolour_guidance
from mmsynth.sample.sampler import Context


@pytest.fixture(scope="module")
def scene_and_render(bundle):
    """A one-object test scene rendered at the tiny bundle's resolution, with its instance map."""
    scene = sample_scene("test", 3, 0, n_objects=1)
    rendered = render_scene(scene, bundle.resolution)
    return scene, rendered


def _caption(obj, color=None, shape=None):
    return f"a {color or obj.color} {shape or obj.shape}"


def test_color_region_finds_the_objects_pixels(scene_and_render):
    scene, rendered = scene_and_render
    obj = scene.objects[0]
    region = annotate("color-region", rendered.image, color=obj.color) > 0
    truth = rendered.instance > 0
    iou = (region & truth).sum() / (region | truth).sum()
    assert iou > 0.8  # anti-aliased edges may fall either way
    other = next(c for c in ("red", "blue") if c != obj.color)
    assert not (annotate("color-region", rendered.image, color=other) > 0).any()  # backgrounds are achromatic
    with pytest.raises(InputError, match="color"):
        annotate("color-region", rendered.image, color="mauve")


def test_colour_change_reads_the_one_swapped_colour_word():
    assert colour_change("a red circle", "a blue circle") == ("red", "blue")
    assert colour_change("two red stars left of a green square", "two red stars left of a cyan square") == (
        "green", "cyan")
    for src, dst, message in (("a red circle", "a red square", "same shapes"),
                              ("a red circle", "a red circle", "exactly one colour"),
                              ("a red circle and a green square", "a blue circle and a cyan square", "exactly one")):
        with pytest.raises(InputError, match=message):
            colour_change(src, dst)


def test_a_guidance_mask_confines_both_guidance_terms(bundle):
    """Outside the mask's latent cells the guided eps equals the unguided one; inside it moves."""
    r = bundle.resolution
    mask = np.zeros((r, r), np.uint8)
    mask[: r // 2, : r // 2] = 255
    target = np.zeros((r, r, 3), np.uint8)
    target[..., 2] = 255
    for kw in ({"s0": 50.0}, {"s0": 0.0, "m": 3, "lr": 0.5}):
        ug = UniversalGuidance(guide="palette", params={"target": target}, mask=mask, **kw)
        request = GenerationRequest(prompt="a red circle", steps=4, cfg=3.0, n=1)
        ctx = Context.create(bundle, request, [ug])
        ug.prepare(ctx)
        z = ctx.noise()
        step = ctx.make_step(1)
        with torch.enable_grad():
            zg = z.clone().requires_grad_(True)
            out = ctx.predict(zg, step)
            guided = ug.after(ctx, step, zg, out)
        change = (guided - out.detach()).abs().sum(dim=1)[0]
        h = change.shape[0]
        assert change[h // 2:, :].max() == 0 and change[:, h // 2:].max() == 0
        assert change[: h // 2, : h // 2].max() > 0


def test_recolour_edit_is_replayable_alone_and_in_a_batch(bundle, scene_and_render):
    scene, rendered = scene_and_render
    obj, image = scene.objects[0], rendered.image
    new = next(c for c in ("red", "blue") if c != obj.color)
    src, dst = _caption(obj), _caption(obj, color=new)
    req = edit_request(image, src, dst, steps=4, cfg=3.0, strength=0.5, recolour=2)
    guidance = req.controls[-1]
    assert guidance["name"] == "universal-guidance" and guidance["guide"] == "region" and guidance["m"] == 2
    first = sample(bundle, req, progress=False)
    again = sample(bundle, GenerationRequest.from_json(first.requests[0].to_json()), progress=False)
    assert torch.equal(first.latents, again.latents)
    plain = sample(bundle, edit_request(image, src, dst, steps=4, cfg=3.0, strength=0.5), progress=False)
    assert not torch.equal(first.latents, plain.latents)  # the guidance acted
    flipped = np.ascontiguousarray(image[:, ::-1])
    batch = sample(bundle, edit_request([image, flipped], [src, src], [dst, dst], steps=4, cfg=3.0, strength=0.5,
                                        recolour=2), progress=False)
    alone = sample(bundle, edit_request(flipped, src, dst, steps=4, cfg=3.0, strength=0.5, seed=1, recolour=2),
                   progress=False)
    assert np.abs(alone.images[0].astype(int) - batch.images[1].astype(int)).max() <= 2
    replay = sample(bundle, GenerationRequest.from_dict(batch.requests[1].to_dict()), progress=False)
    assert np.abs(replay.images[0].astype(int) - batch.images[1].astype(int)).max() <= 2


def test_recolour_refuses_what_it_cannot_do(bundle, scene_and_render):
    scene, rendered = scene_and_render
    obj = scene.objects[0]
    absent = next(c for c in ("red", "blue", "green") if c != obj.color)
    with pytest.raises(InputError, match=f"no {absent} pixels"):
        recolour_guidance(rendered.image, _caption(obj, color=absent), _caption(obj, color=obj.color))
    with pytest.raises(InputError, match=r"recolour \(backward guidance steps"):
        edit_request(rendered.image, _caption(obj), _caption(obj, color=absent), recolour=-1)
    with pytest.raises(InputError, match="guidance mask is all black"):
        UniversalGuidance(guide="region", params={"mask": np.ones((8, 8), np.uint8), "color": "red"},
                          mask=np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="list of as many params"):
        UniversalGuidance(guide=["region", "region"], params={"color": "red"})
    with pytest.raises(InputError, match="guide is not"):
        UniversalGuidance(guide="region", params=[{"color": "red"}])


def test_cli_edit_with_recolour_and_its_bad_input(bundle, scene_and_render, tmp_path, capsys):
    from mmsynth.cli.main import main

    scene, rendered = scene_and_render
    obj = scene.objects[0]
    new = next(c for c in ("red", "blue") if c != obj.color)
    model = bundle.save_pretrained(tmp_path / "tiny")
    Image.fromarray(rendered.image).save(tmp_path / "in.png")
    argv = ["edit", str(tmp_path / "in.png"), "--source-prompt", _caption(obj), "--steps", "3", "--strength", "0.5",
            "--recolour", "1", "--model", str(model), "--quiet"]
    assert main([*argv, "--prompt", _caption(obj, color=new), "--out", str(tmp_path / "ok")]) == 0
    names = [c["name"] for c in json.loads((tmp_path / "ok" / "request.json").read_text())["controls"]]
    assert names == ["inverted-latents", "universal-guidance"]
    assert main([*argv, "--prompt", _caption(obj, shape="cross" if obj.shape != "cross" else "star"),
                 "--out", str(tmp_path / "bad")]) == 2
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("mmsynth")]
    assert len(err) == 1 and "same shapes" in err[0]
    assert not (tmp_path / "bad").exists()
