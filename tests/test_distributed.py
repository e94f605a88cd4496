"""`generate --prompt-file` and the split across processes (accelerate's split_between_processes): the images of
a prompt file equal separate `generate` calls, and a real 2-process CPU launch writes the one-process folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mmsynth.cli.main import main
from mmsynth.sample.distributed import Distributed, chunk, merge_shards
from mmsynth.sample.png_metadata import read_request

SIZE = ["--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--quiet"]
PROMPTS = ["a red circle", "a blue square above a green triangle", "two yellow stars", "a purple circle",
           "a small red square"]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    return str(bundle.save_pretrained(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# five prompts\n" + "\n\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process(model_dir, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    assert main(["generate", "--prompt-file", str(prompt_file), "--seed", "7", "--model", model_dir, *SIZE,
                 "--out", str(out)]) == 0  # fmt: skip
    return out


def _images(out: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_prompt_file_images_equal_separate_generate_calls(model_dir, one_process, tmp_path):
    rows = _rows(one_process)
    assert [r["prompt"] for r in rows] == PROMPTS and [r["seed"] for r in rows] == [7, 8, 9, 10, 11]
    images = _images(one_process)
    for i in (0, 3):  # prompt i, seed --seed + i, alone
        alone = tmp_path / f"alone{i}"
        assert main(["generate", "--prompt", PROMPTS[i], "--seed", str(7 + i), "-n", "1", "--model", model_dir,
                     *SIZE, "--out", str(alone)]) == 0  # fmt: skip
        assert np.array_equal(_images(alone)[0], images[i])
        assert _rows(alone)[0]["request"] == rows[i]["request"]
    assert read_request(one_process / "images" / "0003.png") == rows[3]["request"]  # each PNG carries its request
    batch = json.loads((one_process / "request.json").read_text())
    assert [r["prompt"] for r in batch["requests"]] == PROMPTS and (one_process / "grid.png").is_file()
    assert len({a.tobytes() for a in images}) == len(images)


def test_jsonl_lines_give_their_own_seed_and_negative_prompt_and_n_images_each(model_dir, tmp_path):
    lines = [{"prompt": "a red circle", "seed": 40, "negative_prompt": "blue"}, {"prompt": "two yellow stars"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["generate", "--prompt-file", str(tmp_path / "p.jsonl"), "-n", "2", "--seed", "3",
                 "--negative-prompt", "green", "--model", model_dir, *SIZE, "--out", str(out)]) == 0  # fmt: skip
    rows = _rows(out)
    assert [(r["prompt"], r["seed"], r["request"]["negative_prompt"]) for r in rows] == [
        ("a red circle", 40, "blue"), ("a red circle", 41, "blue"),
        ("two yellow stars", 5, "green"), ("two yellow stars", 6, "green")]  # line 1: --seed + 1 x n
    alone = tmp_path / "alone"
    assert main(["generate", "--prompt", "two yellow stars", "--seed", "5", "-n", "2", "--negative-prompt", "green",
                 "--model", model_dir, *SIZE, "--out", str(alone)]) == 0  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(_images(alone), _images(out)[2:]))


def test_two_cpu_processes_through_accelerate_write_the_one_process_folder(model_dir, prompt_file, one_process,
                                                                             tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmsynth.cli.main", "generate",
                           "--prompt-file", str(prompt_file), "--seed", "7", "--model", model_dir,
                           *SIZE[:-1], "--out", str(out)],  # not --quiet: each process says what it got
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stdout  # the world size the main process saw
    # split_between_processes: contiguous chunks, the first process one more
    assert "process 0 of 2: 3 of 5 prompt(s)" in done.stderr and "process 1 of 2: 2 of 5 prompt(s)" in done.stderr
    assert all(np.array_equal(a, b) for a, b in zip(_images(out), _images(one_process), strict=True))
    for name in ("metadata.jsonl", "request.json"):
        assert (out / name).read_text() == (one_process / name).read_text()
    assert sorted(p.name for p in (out / "requests").iterdir()) == [f"{i:04d}.json" for i in range(5)]
    assert not list(out.parent.glob(".*tmp*"))  # the atomic write left no temp folder


def test_two_machines_from_accelerate_config_files_write_the_one_process_folder(model_dir, prompt_file, one_process,
                                                                                 tmp_path):
    """docs/multi-gpu.md's multi-node recipe, both 'machines' on this one: a config file per machine rank."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = tmp_path / "out"
    commands = []
    for rank in (0, 1):
        config = tmp_path / f"machine{rank}.yaml"
        config.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 2\n"
                          f"num_processes: 2\nmachine_rank: {rank}\nmain_process_ip: 127.0.0.1\n"
                          f"main_process_port: {port}\nmixed_precision: 'no'\n")
        commands.append([str(accelerate), "launch", "--config_file", str(config), "-m", "mmsynth.cli.main", "generate",
                         "--prompt-file", str(prompt_file), "--seed", "7", "--model", model_dir, *SIZE,
                         "--out", str(out)])  # fmt: skip
    second = subprocess.Popen(commands[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # its own process group: ended with its worker on failure
    try:
        first = subprocess.run(commands[0], env=env, capture_output=True, text=True, timeout=300)
        assert second.wait(timeout=60) == 0, second.stderr.read()[-3000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, 9)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "on 2 processes" in first.stdout
    assert all(np.array_equal(a, b) for a, b in zip(_images(out), _images(one_process), strict=True))
    assert (out / "metadata.jsonl").read_text() == (one_process / "metadata.jsonl").read_text()


def test_chunk_is_split_between_processes_and_merging_restores_the_order():
    from accelerate import PartialState

    def split(items, rank, world):  # accelerate's own split, as process `rank` of `world` would get it
        state = SimpleNamespace(num_processes=world, process_index=rank)
        with PartialState.split_between_processes(state, items) as mine:
            return list(mine)

    for n in range(8):
        for world in (1, 2, 3, 5):
            for rank in range(world):
                assert list(chunk(n, rank, world)) == split(list(range(n)), rank, world)
    items = list("abcdefg")
    parts = [[(i, items[i]) for i in chunk(7, r, 3)] for r in range(3)]
    assert merge_shards(parts[::-1], 7) == items
    one = Distributed()  # no launch: everything, numbered, and nothing imported
    assert one.split(items) == list(enumerate(items)) and one.collect(one.split(items), 7) == items
    with pytest.raises(ValueError, match="outside"):
        chunk(3, 2, 2)


@pytest.mark.parametrize("content,name,argv,message", [
    (None, "missing.txt", [], "does not exist"),
    ("# only a comment\n\n   \n", "p.txt", [], "has no prompts"),
    ('{"prompt": "a red circle"}\n\n{"prompt": "a", \n', "p.jsonl", [], "line 3 is not valid JSON"),
    ('{"prompt": "a", "sed": 3}\n', "p.jsonl", [], "line 1 has unknown key(s) ['sed']; valid: prompt"),
    ('{"prompt": "a", "seed": -1}\n', "p.jsonl", [], "line 1: seed must be an integer"),
    ('["a red circle"]\n', "p.jsonl", [], 'with a string "prompt"'),
    ("a red circle\n", "p.txt", ["--prompt", "a"], "do not combine it with --prompt"),
    ("a red circle\n", "p.txt", ["--replay", "r.json"], "do not combine it with --replay"),
    ("a red circle\n", "p.txt", ["--box", "0,0,1,1=circle"], "takes no layout (--box)"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, capsys, content, name, argv, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["generate", "--prompt-file", str(path), *argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mmsynth generate: error: --prompt-file")
    assert not out.exists()


def test_a_launch_without_a_prompt_file_is_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # two processes would draw the same images and race for --out
    assert main(["generate", "--prompt", "a red circle", "--out", str(tmp_path / "out")]) == 2
    assert "splits a --prompt-file across the processes" in capsys.readouterr().err
