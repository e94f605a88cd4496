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
    model = tmp_path / "tiny"
    tiny_bundle(0).save_pretrained(model)
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--model", str(model), "--seeds", "1", "--steps", "2"]) == 0
    assert (out / "t2i.png").exists() and (out / "guidance_edit.png").exists()
    summary = (out / "summary.md").read_text()
    assert "images pass the judge" in summary and "## Guidance and editing" in summary
