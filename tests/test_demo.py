"""`mmsynth demo` writes its whole showcase, with and without a text-to-image bundle."""

from mmsynth.cli.main import main
from mmsynth.models.zoo import tiny_bundle


def test_demo_without_zoo_skips_t2i_with_a_reason(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--model", str(tmp_path / "no-such-model")]) == 0
    for name in ("dataset.png", "annotators.png", "judge.png", "summary.md"):
        assert (out / name).exists(), name
    summary = (out / "summary.md").read_text()
    assert "Skipped" in summary and "no-such-model" in summary
    assert "Clean renders passed" in summary


def test_demo_with_a_bundle_generates_and_judges(tmp_path):
    model = tmp_path / "tiny"
    tiny_bundle(0).save_pretrained(model)
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--model", str(model), "--seeds", "1", "--steps", "2"]) == 0
    assert (out / "t2i.png").exists() and (out / "guidance_edit.png").exists()
    summary = (out / "summary.md").read_text()
    assert "images pass the judge" in summary and "## Guidance and editing" in summary
