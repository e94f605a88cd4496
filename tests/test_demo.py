"""`mmsynth demo` writes its whole showcase, with and without a text-to-image bundle."""

from mmsynth.cli.main import build_parser, main
from mmsynth.errors import InputError
from mmsynth.models.zoo import tiny_bundle


def test_demo_without_the_default_zoo_skips_t2i_with_a_reason(tmp_path, monkeypatch):
    def missing(model=None):
        raise InputError("the shipped Shapes zoo 'models/shapes-v1' is missing")

    build_parser()  # import every command module first, so none binds the patched function by name for good
    monkeypatch.setattr("mmsynth.models.shipped.resolve_model", missing)
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out)]) == 0
    for name in ("dataset.png", "annotators.png", "judge.png", "summary.md"):
        assert (out / name).exists(), name
    summary = (out / "summary.md").read_text()
    assert "Skipped" in summary and "models/shapes-v1" in summary
    assert "Clean renders passed" in summary


def test_demo_refuses_a_model_that_does_not_exist_before_any_work(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--model", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_demo_with_a_bundle_generates_and_judges(tmp_path):
    """A bundle carrying a canny ControlNet and a palette adapter: the controls section shows those two and the
    multi-control line, and skips the controls the bundle lacks."""
    import dataclasses

    from mmsynth.models.zoo import TINY, build_adapter, build_controlnet, random_bundle

    b = random_bundle(dataclasses.replace(TINY, unet_cross_attention_levels=(True, True, True)), 0)
    b.extras["controlnet_canny"] = build_controlnet(b.unet, b.vae_scale_factor)
    b.extras["adapter_palette"] = build_adapter(b.unet, b.vae_scale_factor)
    model = b.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--model", str(model), "--seeds", "1", "--steps", "2"]) == 0
    assert all((out / f).exists() for f in ("t2i.png", "controls.png", "guidance_edit.png"))
    summary = (out / "summary.md").read_text()
    assert "images pass the judge" in summary and "## Guidance and editing" in summary
    assert "(controlnet_canny, adapter_palette, multi)" in summary


def test_demo_controls_section_skips_a_bundle_without_controls(tmp_path):
    from mmsynth.cli.demo import _controls_section

    args = build_parser().parse_args(["demo", "--steps", "2"])
    text = _controls_section(tmp_path, args, tiny_bundle(0))
    assert "no ControlNet or T2I-Adapter components" in text and not (tmp_path / "controls.png").exists()


def test_demo_exemplar_section_draws_composer_and_paint_by_example_or_skips(tmp_path):
    """With both methods' components (random) the section draws a Composer line and a Paint-by-Example line; without
    them it says how to train them."""
    from mmsynth.cli.demo import _exemplar_section
    from mmsynth.models.composer import ComposerConditioner, composer_unet
    from mmsynth.models.exemplar_encoder import exemplar_encoder_from_clip
    from mmsynth.train.recipes.inpaint import inpainting_unet
    from mmsynth.train.recipes.paint_by_example import paint_by_example_unet

    args = build_parser().parse_args(["demo", "--steps", "2"])
    bare = tiny_bundle(0)
    assert "no Composer or Paint-by-Example components" in _exemplar_section(tmp_path, args, bare)
    b = tiny_bundle(0)
    net = ComposerConditioner(global_conditions={"histogram": 275}, out_channels=4, factor=b.vae_scale_factor,
                              context_dim=32, tokens_per_condition=1, width=8)  # fmt: skip
    b.extras["composer"] = net
    b.extras["composer_unet"] = composer_unet(b.unet, 4, net.global_dim)
    pbe = paint_by_example_unet(inpainting_unet(b.unet))
    b.extras["paint_by_example_unet"] = pbe
    b.extras["paint_by_example_encoder"] = exemplar_encoder_from_clip(b.clip, int(pbe.config.cross_attention_dim))
    text = _exemplar_section(tmp_path, args, b)
    assert "Composer (`mmsynth compose`) and Paint-by-Example" in text and (tmp_path / "exemplars.png").is_file()
