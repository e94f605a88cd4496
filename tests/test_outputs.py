"""What commands write, and what they must never touch: --overwrite replaces only a command's own files, written
files follow the umask, failed writes leave nothing, and warnings say what a command silently dropped before."""

from __future__ import annotations

import logging
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmsynth.cli.main import main
from mmsynth.errors import InputError
from mmsynth.io import atomic_dir, check_output_dir, check_output_file, save_image, write_text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mmsynth.models.zoo import tiny_bundle

    d = tmp_path_factory.mktemp("model") / "tiny"
    tiny_bundle(0).save_pretrained(d)
    return d


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_text("x", tmp_path / "a.txt")
        save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "b.png")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "c.txt").write_text("c")
            fd = os.open(tmp / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors writes its files
            os.close(fd)
        from mmsynth.models.zoo import tiny_bundle

        tiny_bundle(0).save_pretrained(tmp_path / "model")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "b.png") == 0o666 & ~umask
    assert _mode(tmp_path / "folder") == _mode(tmp_path / "model" / "unet") == 0o777 & ~umask
    assert _mode(tmp_path / "folder" / "private.bin") == 0o666 & ~umask
    assert _mode(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors") == 0o666 & ~umask


def test_a_failed_write_leaves_no_temp_file_and_no_folder_it_made(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "new" / "deeper" / "out") as tmp:
        (tmp / "half.png").write_text("half")
        raise RuntimeError("the command failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError):
        save_image(object(), tmp_path / "a" / "b.png")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_the_entries_it_wrote(tmp_path):
    dest = tmp_path / "out"
    (dest / "images").mkdir(parents=True)
    (dest / "images" / "0009.png").write_text("an earlier run's image")
    (dest / "thesis.txt").write_text("thesis")
    with pytest.raises(InputError, match="not empty"), atomic_dir(dest) as tmp:
        (tmp / "images").mkdir()
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "images").mkdir()
        (tmp / "images" / "0000.png").write_text("new")
        (tmp / "summary.md").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["images", "summary.md", "thesis.txt"]
    assert [p.name for p in (dest / "images").iterdir()] == ["0000.png"]  # images/ is the command's: replaced whole
    assert (dest / "thesis.txt").read_text() == "thesis"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders beside it


def test_an_existing_folder_is_filled_from_inside_it(tmp_path, monkeypatch):
    """Writing into '.' or an existing folder needs only that folder to be writable, not its parent."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with atomic_dir(".") as tmp:
        assert tmp.parent.resolve() == (tmp_path / "here").resolve()
        (tmp / "a.txt").write_text("a")
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_output_checks_name_the_problem(tmp_path):
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(InputError, match=r"already exists .*--overwrite"):
        check_output_file(tmp_path / "f.json", "--json")
    assert check_output_file(tmp_path / "f.json", "--json", overwrite=True) == tmp_path / "f.json"
    with pytest.raises(InputError, match="is a folder"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(InputError, match=r"must end with \.png"):
        check_output_file(tmp_path / "x.jpg", "--out", suffixes=(".png",))
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_file(tmp_path / "f.json" / "x.json", "--json")
    with pytest.raises(InputError, match="is a file; expected a folder"):
        check_output_dir(tmp_path / "f.json")
    assert check_output_dir(tmp_path / "new" / "folder") == tmp_path / "new" / "folder"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_generate_overwrite_keeps_the_users_files(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--model", str(model_dir), "--prompt", "a red circle", "--steps", "1", "-n", "1", "--quiet",
            "--out", str(out)]  # fmt: skip
    assert main([*argv, "-n", "2"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000.png"]  # the earlier 0001.png went with images/


def test_invert_writes_both_files_or_neither(model_dir, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "rec.png").write_text("an existing file")
    argv = ["invert", str(tmp_path / "in.png"), "--prompt", "a red circle", "--model", str(model_dir), "--steps", "1",
            "--quiet", "--out", str(tmp_path / "x.safetensors"), "--reconstruct", str(tmp_path / "rec.png")]
    assert main(argv) == 2  # --reconstruct exists: refused before the inversion writes x
    assert not (tmp_path / "x.safetensors").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "x.safetensors").exists() and Image.open(tmp_path / "rec.png").size == (32, 32)


def test_train_overwrite_starts_over_and_keeps_other_files(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "vae", "--max-steps", "1", "--batch-size", "2", "--out", str(out), "--no-progress",
            "--set", "checkpoint_every=1", "--set", "sample_every=0", "--set", "num_workers=0"]  # fmt: skip
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(argv) == 2  # a non-empty folder that is not this run's
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "checkpoints" / "step_0000001").is_dir() and (out / "notes.txt").read_text() == "mine"
    weights = next((out / "checkpoints" / "step_0000001").glob("*.safetensors"))
    assert _mode(weights) == 0o666 & ~_umask()  # accelerate writes them 0600
    assert main(argv) == 2  # checkpoints there now: --resume or --overwrite
    assert main([*argv, "--overwrite"]) == 0


def test_a_prompt_past_the_tokenizer_limit_warns_with_the_words_it_drops(model_dir, caplog):
    from mmsynth.models import Bundle
    from mmsynth.sample import GenerationRequest, sample

    bundle = Bundle.from_pretrained(model_dir)
    limit = bundle.tokenizer.model_max_length
    prompt = " and ".join(["a red circle"] * limit) + " and a lonely blue star"
    with caplog.at_level(logging.WARNING):
        sample(bundle, GenerationRequest(prompt=prompt, steps=1, cfg=1.0), progress=False)
    assert any("lonely blue star" in r.getMessage() and str(limit) in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sample(bundle, GenerationRequest(prompt="a red circle", steps=1, cfg=1.0), progress=False)
    assert not [r for r in caplog.records if "limit" in r.getMessage()]


def test_help_names_only_options_that_exist(capsys):
    assert main(["invert", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--height" not in text and "--width" not in text


def test_a_closed_output_pipe_is_not_a_traceback():
    """`mmsynth ... | head`: the reader leaves early; the command ends with 141 (a shell's SIGPIPE code), quietly."""
    script = ("import sys; import mmsynth.cli.data as d; from mmsynth.cli.main import main\n"
              "d._spec = lambda args: print('x' * 4_000_000)\n"  # far more than a pipe buffers
              "sys.exit(main(['data', 'spec']))")  # fmt: skip
    shell = subprocess.run(f"{sys.executable} -c {shlex.quote(script)} | head -c 1; echo \" ${{PIPESTATUS[0]}}\"",
                           shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert "Traceback" not in shell.stderr, shell.stderr
    assert shell.stdout == "x 141\n"


def test_a_model_that_gives_nan_is_an_error_not_a_garbage_image():
    import torch

    from mmsynth.models.zoo import tiny_bundle
    from mmsynth.sample import GenerationRequest, sample

    bundle = tiny_bundle(0)
    with torch.no_grad():
        bundle.unet.conv_out.bias.fill_(float("nan"))  # as a corrupt weights file would
    with pytest.raises(InputError, match="NaN or infinite latents"):
        sample(bundle, GenerationRequest(prompt="a red circle", steps=2), progress=False)
    bundle = tiny_bundle(0)
    with torch.no_grad():
        bundle.vae.decoder.conv_out.bias.fill_(float("nan"))  # the decoder alone
    with pytest.raises(InputError, match="NaN or infinite pixels"):
        sample(bundle, GenerationRequest(prompt="a red circle", steps=2), progress=False)
