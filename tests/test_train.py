"""The one trainer: configs, each recipe for a few tiny steps, exact resume, the train CLI."""

from __future__ import annotations

import csv
import itertools
import shutil

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from mmsynth.cli.main import main
from mmsynth.errors import InputError
from mmsynth.models.bundle import Bundle
from mmsynth.models.zoo import tiny_bundle
from mmsynth.train import get_recipe, load_config, train
from mmsynth.train.data import StepBatches

FAST = {"num_workers": "0", "log_every": "1", "warmup_steps": "1", "sample_every": "0", "options.zoo": "tiny"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny bundle on disk: its tokenizer/text_encoder/clip and vae stand in for CLIP and VAE runs."""
    path = tmp_path_factory.mktemp("zoo") / "tiny"
    tiny_bundle(seed=1).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process; tests that change mixed precision need a fresh one."""
    yield
    AcceleratorState._reset_state()


def run(recipe, out, resume=False, stop_after=None, export_only=False, **overrides):
    config, options = load_config(get_recipe(recipe), overrides={**FAST, "out": str(out), **overrides})
    return train(config, options, resume=resume, progress=False, stop_after=stop_after, export_only=export_only)

def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_config_layers_and_errors(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("recipe: t2i\nlr: 0.001\noptions:\n  snr_gamma: null\n  caption_dropout: 0.2\n")
    config, options = load_config(
        get_recipe("t2i"), yaml_file, {"lr": "3e-4", "options.prediction_type": "v_prediction"}
    )
    assert config.lr == 3e-4 and config.batch_size == 64  # CLI beats YAML; recipe default kept
    assert options.snr_gamma is None and options.caption_dropout == 0.2 and options.prediction_type == "v_prediction"
    assert config.out == "runs/t2i"
    with pytest.raises(InputError, match=r"unknown config key 'lrate'; valid keys: .*\blr\b"):
        load_config(get_recipe("t2i"), overrides={"lrate": "1"})
    with pytest.raises(InputError, match=r"unknown config key 'options.gamma'; valid keys: .*options.snr_gamma"):
        load_config(get_recipe("t2i"), overrides={"options.gamma": "1"})
    with pytest.raises(InputError, match="'batch_size' expects int"):
        load_config(get_recipe("vae"), overrides={"batch_size": "many"})
    with pytest.raises(InputError, match="'max_steps' must be > 0"):
        load_config(get_recipe("vae"), overrides={"max_steps": "0"})
    with pytest.raises(InputError, match="prediction_type"):
        load_config(get_recipe("t2i"), overrides={"options.prediction_type": "sample"})
    with pytest.raises(InputError, match="unknown recipe 'gan'; valid recipes: clip, composer, controlnet, gligen, "
                                         "inpaint, paint-by-example, t2i, t2i-ad"):
        get_recipe("gan")


def test_step_batches_partition_examples_across_steps_micro_steps_and_processes():
    seen = []
    for rank in range(2):
        for batch in StepBatches(0, 3, batch_size=4, grad_accum=2, world=2, rank=rank):
            seen.extend(batch)
    assert sorted(seen) == list(range(3 * 2 * 2 * 4))
    resumed = list(StepBatches(1, 3, batch_size=4, grad_accum=2, world=2, rank=1))
    assert resumed == list(StepBatches(0, 3, batch_size=4, grad_accum=2, world=2, rank=1))[2:]


def test_clip_recipe_trains_and_exports_text_encoder_and_tokenizer(tmp_path):
    result = run("clip", tmp_path / "clip", max_steps="2", batch_size="8")
    rows = read_log(tmp_path / "clip" / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    from mmsynth.models.bundle import load_component

    text_encoder = load_component(result.export, "text_encoder")
    clip = load_component(result.export, "clip")
    tok = load_component(result.export, "tokenizer")
    ids = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():  # the exported text encoder is exactly the CLIP text tower
        assert torch.allclose(text_encoder(ids).pooler_output, clip.text_model(ids).pooler_output)


def test_clip_freeze_text_trains_only_the_vision_side(tmp_path):
    first = run("clip", tmp_path / "a", max_steps="1", batch_size="8")
    second = run("clip", tmp_path / "b", max_steps="2", batch_size="8",
                 **{"options.init": str(first.export), "options.freeze_text": "true"})  # fmt: skip
    from mmsynth.models.bundle import load_component

    a, b = load_component(first.export, "clip"), load_component(second.export, "clip")
    same = lambda m, n: all(torch.equal(x, y) for x, y in zip(m.parameters(), n.parameters()))  # noqa: E731
    assert same(a.text_model, b.text_model) and same(a.text_projection, b.text_projection)
    assert not same(a.vision_model, b.vision_model)
    with pytest.raises(InputError, match=r"needs 'options\.init'"):
        run("clip", tmp_path / "c", max_steps="1", batch_size="8", **{"options.freeze_text": "true"})


def test_clip_grows_the_vision_tower_of_its_init_and_keeps_the_text_tower(tmp_path, parts):
    from mmsynth.models.bundle import load_component

    result = run("clip", tmp_path / "c", max_steps="2", batch_size="8", **{
        "options.init": str(parts), "options.freeze_text": "true", "options.vision_layers": "3"})  # fmt: skip
    before, after = load_component(parts, "clip"), load_component(result.export, "clip")
    assert before.config.vision_config.num_hidden_layers == 1 and after.config.vision_config.num_hidden_layers == 3
    a, b = before.text_model.state_dict(), after.text_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the UNet's text encoder is untouched
    assert not torch.equal(after.vision_model.encoder.layers[2].mlp.fc2.weight, torch.zeros_like(
        after.vision_model.encoder.layers[2].mlp.fc2.weight))  # the new layers trained
    with pytest.raises(InputError, match=r"options\.vision_layers' grows the vision tower of 'options\.init'"):
        run("clip", tmp_path / "d", max_steps="1", batch_size="8", **{"options.vision_layers": "3"})
    with pytest.raises(InputError, match=r"options\.vision_layers' must be >= 0"):
        run("clip", tmp_path / "e", max_steps="1", batch_size="8", **{
            "options.init": str(parts), "options.vision_layers": "-1"})


def test_clip_refines_the_vision_patches_of_its_init(tmp_path, parts):
    from mmsynth.models.bundle import load_component

    before = load_component(parts, "clip")
    patch = before.config.vision_config.patch_size // 2
    result = run("clip", tmp_path / "c", max_steps="2", batch_size="8", **{
        "options.init": str(parts), "options.freeze_text": "true", "options.vision_patch": str(patch)})  # fmt: skip
    after = load_component(result.export, "clip")
    assert after.config.vision_config.patch_size == patch
    a, b = before.text_model.state_dict(), after.text_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match=r"options\.vision_patch' refines the vision tower of 'options\.init'"):
        run("clip", tmp_path / "d", max_steps="1", batch_size="8", **{"options.vision_patch": "2"})
    with pytest.raises(InputError, match=r"must divide the vision tower's patch size"):
        run("clip", tmp_path / "e", max_steps="1", batch_size="8", **{
            "options.init": str(parts), "options.vision_patch": "3"})


def test_clip_hard_negatives_pair_each_scene_with_its_minimal_edit(tmp_path):
    from mmsynth.data.scene import Scene
    from mmsynth.data.torch_dataset import ShapesDataset
    from mmsynth.train.data import HardNegativePairs

    pairs, plain = HardNegativePairs("train", seed=3), ShapesDataset("train", seed=3)
    edited = 0
    for j in range(0, 40, 2):
        base, twin = Scene.from_dict(pairs[j]["scene"]), Scene.from_dict(pairs[j + 1]["scene"])
        assert torch.equal(pairs[j]["pixel_values"], plain[j]["pixel_values"])
        changed = [(a, b) for a, b in zip(base.objects, twin.objects) if a != b]
        if len(base.objects) == len(twin.objects) and len(changed) == 1:
            (a, b), = changed
            assert (a.shape != b.shape) != (a.color != b.color)  # one attribute, the other kept
            assert (a.cx, a.cy, a.size, a.radius) == (b.cx, b.cy, b.size, b.radius)
            assert not torch.equal(pairs[j]["pixel_values"], pairs[j + 1]["pixel_values"])
            edited += 1
        else:  # no edit kept the rules: the odd index is its own plain scene
            assert torch.equal(pairs[j + 1]["pixel_values"], plain[j + 1]["pixel_values"])
    assert edited >= 15
    places = HardNegativePairs("train", seed=3, kinds=("place",))
    moved = 0
    for j in range(0, 120, 2):  # two-object scenes of two groups (~1 in 6) get one
        base, twin = Scene.from_dict(places[j]["scene"]), Scene.from_dict(places[j + 1]["scene"])
        if [(o.color, o.shape, o.radius) for o in base.objects] == [(o.color, o.shape, o.radius) for o in twin.objects]:
            centres = sorted((o.cx, o.cy) for o in base.objects)
            assert sorted((o.cx, o.cy) for o in twin.objects) == centres and base != twin  # two swapped places
            moved += 1
    assert moved >= 3  # 4 of these 60 pairs (seed 3): the other two-object scenes break a rule when swapped
    result = run("clip", tmp_path / "hn", max_steps="2", batch_size="8", **{"options.hard_negatives": "true"})
    assert len(read_log(tmp_path / "hn" / "log.csv")) == 2 and (result.export / "clip").is_dir()
    with pytest.raises(InputError, match=r"batch_size must be even, got 7"):
        run("clip", tmp_path / "hn3", max_steps="1", batch_size="7", **{"options.hard_negatives": "true"})
    with pytest.raises(InputError, match="needs data: shapes"):
        run("clip", tmp_path / "hn2", max_steps="1", batch_size="8", data=str(tmp_path),
            **{"options.hard_negatives": "true"})  # fmt: skip


def test_hard_negative_groups_hold_a_scene_and_edits_naming_other_groups():
    from mmsynth.data.captions import caption_true_of, captions
    from mmsynth.data.scene import Scene, groups
    from mmsynth.data.torch_dataset import ShapesDataset
    from mmsynth.train.data import HardNegativePairs

    pairs, fours = HardNegativePairs("train", seed=3), HardNegativePairs("train", seed=3, group=4, kinds=("shape",) * 2
                                                                         + ("colour", "count"))  # fmt: skip
    plain, edits = ShapesDataset("train", seed=3), 0
    for first in range(0, 80, 4):
        members = [Scene.from_dict(fours[first + k]["scene"]) for k in range(4)]
        assert members[0] == Scene.from_dict(plain[first]["scene"])
        named = []
        for k, scene in enumerate(members[1:], start=1):
            if scene == Scene.from_dict(plain[first + k]["scene"]):
                continue  # no edit found: the index's own plain scene
            edits += 1
            key = sorted((scene.objects[m[0]].color, scene.objects[m[0]].shape, len(m)) for m in groups(scene))
            assert key not in named
            named.append(key)
            others = [m for m in members if m is not scene]
            assert not any(caption_true_of(c, o) for c in captions(scene, 4) for o in others)
    assert edits >= 50
    # a group's first edit is the pair's edit, whatever the group size
    assert Scene.from_dict(HardNegativePairs("train", seed=3, group=4)[9]["scene"]) == \
        Scene.from_dict(pairs[9]["scene"])  # fmt: skip
    with pytest.raises(InputError, match="group >= 2, got 1"):
        HardNegativePairs("train", group=1)


def test_vae_edge_weights_favour_edges_and_keep_the_mean():
    from mmsynth.data import render, sample_scene
    from mmsynth.train.recipes.vae import edge_weights

    x = torch.from_numpy(render(sample_scene("test", 1), 64)).permute(2, 0, 1)[None].float() / 127.5 - 1
    w = edge_weights(x, 10.0)
    assert torch.allclose(w.mean(), torch.tensor(1.0)) and w.max() > 5 * w.min()
    assert torch.equal(edge_weights(x, 0.0), torch.ones_like(w))


def test_vae_recipe_records_latent_scaling_factor(tmp_path):
    result = run("vae", tmp_path / "vae", max_steps="2", batch_size="4", sample_every="2",
                 **{"options.scale_examples": "8", "options.edge_weight": "5"})  # fmt: skip
    from mmsynth.models.bundle import load_component

    vae = load_component(result.export, "vae")
    assert vae.config.scaling_factor != 1.0 and vae.config.scaling_factor > 0
    assert (tmp_path / "vae" / "samples" / "step_0000002.png").exists()
    assert {"psnr", "kl", "l1"} <= set(read_log(tmp_path / "vae" / "log.csv")[0])


@pytest.mark.parametrize(("prediction_type", "precision"), [("epsilon", "no"), ("v_prediction", "bf16")])
def test_t2i_recipe_exports_a_bundle_diffusers_runs(tmp_path, parts, prediction_type, precision):
    # bf16 on a CPU: autocast, with the frozen VAE and text encoder kept exact for the export
    result = run(
        "t2i", tmp_path / "t2i", max_steps="2", batch_size="4", sample_every="2", mixed_precision=precision,
        **{"options.clip": str(parts), "options.vae": str(parts), "options.prediction_type": prediction_type,
           "options.sample_steps": "2", "options.sample_prompts": "a red circle,"},
    )  # fmt: skip
    bundle = Bundle.from_pretrained(result.export)
    assert bundle.scheduler.config.prediction_type == prediction_type
    assert bundle.clip is not None and bundle.resolution == 32
    fresh = tiny_bundle(seed=1)
    # VAE stayed frozen (the export stores float16 weights by default, loaded back as float32)
    assert torch.equal(next(bundle.vae.parameters()), next(fresh.vae.parameters()).half().float())
    assert (tmp_path / "t2i" / "samples" / "step_0000002.png").exists()


def test_t2i_fine_tunes_a_base_bundle_and_keeps_its_text_encoder_and_vae_frozen(tmp_path, parts):
    (parts / "README.md").write_text("the base's card")
    out = tmp_path / "base"
    result = run("t2i", out, max_steps="2", batch_size="4", **{"options.base": str(parts)})
    assert (out / "base_card.md").read_text() == "the base's card"
    base, exported = Bundle.from_pretrained(parts), Bundle.from_pretrained(result.export)
    for name in ("text_encoder", "vae"):  # frozen (the export stores float16, loaded back as float32)
        a, b = getattr(exported, name).parameters(), getattr(base, name).parameters()
        assert all(torch.equal(x, y.half().float()) for x, y in zip(a, b))
    assert any(not torch.equal(x, y.half().float()) for x, y in zip(exported.unet.parameters(), base.unet.parameters()))


def test_t2i_grounding_loss_trains_and_logs_both_terms(tmp_path, parts):
    run("t2i", tmp_path / "grounded", max_steps="2", batch_size="4",
        **{"options.base": str(parts), "options.grounding_weight": "0.01", "options.caption_dropout": "0"})  # fmt: skip
    rows = read_log(tmp_path / "grounded" / "log.csv")
    for row in rows:
        assert 0 < float(row["grounding"]) <= 1  # tiny random UNet: its tokens attend everywhere
        assert float(row["loss"]) == pytest.approx(float(row["denoising"]) + 0.01 * float(row["grounding"]), rel=1e-4)
    with pytest.raises(InputError, match=r"options\.grounding_weight' must be >= 0"):
        run("t2i", tmp_path / "bad", max_steps="1", batch_size="4",
            **{"options.base": str(parts), "options.grounding_weight": "-1"})  # fmt: skip


def test_cubic_timesteps_favour_high_noise(parts):
    """T2I-Adapter's draw, t = (1 - u^3) T: a recipe sets the class attribute; uniform is the default."""
    from mmsynth.train.recipes.t2i import TextToImageRecipe

    class Cubic(TextToImageRecipe):
        timestep_sampling = "cubic"

    def recipe(cls):
        r = cls(*load_config(get_recipe("t2i"), overrides={**FAST, "options.base": str(parts)}))
        r.build()
        r.place(torch.device("cpu"), torch.float32)
        return r

    torch.manual_seed(0)
    uniform, cubic = (recipe(c).draw_timesteps(20000) for c in (TextToImageRecipe, Cubic))
    steps = 1000
    assert int(cubic.min()) >= 0 and int(cubic.max()) < steps and cubic.dtype == torch.long
    high = lambda t: float((t >= 800).float().mean())  # noqa: E731
    assert high(uniform) == pytest.approx(0.2, abs=0.02)
    assert high(cubic) == pytest.approx(0.2 ** (1 / 3), abs=0.02)  # P(1 - u^3 >= 0.8) = P(u <= 0.2^(1/3))

    class Logit(TextToImageRecipe):
        timestep_sampling = "logit"

    with pytest.raises(InputError, match=r"timestep_sampling must be one of uniform, cubic, got 'logit'"):
        recipe(Logit)


def _params(path):
    return load_file(path / "checkpoints" / "step_0000004" / "model.safetensors")


def test_resume_continues_exactly(tmp_path, parts):
    common = {
        "batch_size": "3", "grad_accum": "2", "checkpoint_every": "2",
        "options.clip": str(parts), "options.vae": str(parts), "options.caption_dropout": "0.5",
    }  # fmt: skip
    run("t2i", tmp_path / "once", max_steps="4", **common)
    run("t2i", tmp_path / "split", max_steps="4", stop_after=2, **common)  # killed after the step-2 checkpoint
    run("t2i", tmp_path / "split", max_steps="4", resume=True, **common)
    once, split = read_log(tmp_path / "once" / "log.csv"), read_log(tmp_path / "split" / "log.csv")
    assert [r["step"] for r in split] == ["1", "2", "3", "4"]
    for a, b in zip(once, split):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    pa, pb = _params(tmp_path / "once"), _params(tmp_path / "split")
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)
    ea = Bundle.from_pretrained(tmp_path / "once" / "final").unet.state_dict()  # EMA weights
    eb = Bundle.from_pretrained(tmp_path / "split" / "final").unet.state_dict()
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-5, atol=1e-6)
    # --export-only rewrites final/ from the newest checkpoint's EMA weights, and leaves the log alone
    log = (tmp_path / "once" / "log.csv").read_text()
    shutil.rmtree(tmp_path / "once" / "final")
    result = run("t2i", tmp_path / "once", max_steps="4", export_only=True, **common)
    assert result.step == 4 and (tmp_path / "once" / "log.csv").read_text() == log
    again = Bundle.from_pretrained(tmp_path / "once" / "final").unet.state_dict()
    assert all(torch.equal(ea[k], again[k]) for k in ea)
    with pytest.raises(InputError, match="no complete checkpoint to export"):
        run("t2i", tmp_path / "empty", max_steps="4", export_only=True, **common)
    # and the check can fail: a different seed gives different weights
    run("t2i", tmp_path / "other", max_steps="4", seed="1", **common)
    assert any(not torch.allclose(pa[k], _params(tmp_path / "other")[k]) for k in pa)


def test_resume_refuses_mismatches_and_corrupt_checkpoints(tmp_path):
    out = tmp_path / "clip"
    run("clip", out, max_steps="2", batch_size="4", checkpoint_every="1")
    with pytest.raises(InputError, match="already has checkpoints: pass --resume"):
        run("clip", out, max_steps="3", batch_size="4")
    with pytest.raises(InputError, match="batch_size=4, this run has batch_size=5"):
        run("clip", out, max_steps="3", batch_size="5", resume=True)
    state = out / "checkpoints" / "step_0000002" / "model.safetensors"
    state.write_bytes(b"garbage")
    with pytest.raises(InputError, match="corrupt or incomplete"):
        run("clip", out, max_steps="3", batch_size="4", resume=True)
    shutil.rmtree(out / "checkpoints" / "step_0000002")  # keep_checkpoints=2 left step 1
    result = run("clip", out, max_steps="3", batch_size="4", resume=True)
    assert result.step == 3
    assert [r["step"] for r in read_log(out / "log.csv")] == ["1", "2", "3"]


def test_train_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "clip", "--max-steps", "1", "--batch-size", "4", "--out", str(out), "--no-progress"]
    sets = [x for k, v in FAST.items() for x in ("--set", f"{k}={v}")]
    assert main([*args, *sets]) == 0
    assert (out / "final" / "text_encoder" / "config.json").exists()
    assert main(["train", "clip", "--set", "options.zom=tiny"]) == 2
    assert "unknown config key 'options.zom'" in capsys.readouterr().err
    assert main(["train", "clip", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["train", "nope"]) == 2
    assert main(["train", "--help"]) == 0
    assert "--resume" in capsys.readouterr().out


def test_time_limit_stops_at_a_step_with_a_checkpoint_and_resume_finishes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "clip", "--max-steps", "3", "--batch-size", "4", "--out", str(out), "--no-progress",
            "--set", "checkpoint_every=100", *[x for k, v in FAST.items() for x in ("--set", f"{k}={v}")]]  # fmt: skip
    assert main([*args, "--max-minutes", "1e-9"]) == 0  # out of time once the first step is done
    assert "stopped clip at step 1 of 3" in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000001"]  # saved though not due
    assert not (out / "final").exists()
    assert main([*args, "--resume", "--max-minutes", "60"]) == 0  # time enough: runs to the end and exports
    assert [r["step"] for r in read_log(out / "log.csv")] == ["1", "2", "3"]
    assert (out / "final" / "clip" / "config.json").exists()
    assert main([*args, "--out", str(tmp_path / "other"), "--max-minutes", "0"]) == 2
    assert "--max-minutes: must be a number > 0, got 0" in capsys.readouterr().err
    config, options = load_config(get_recipe("clip"), overrides={**FAST, "out": str(tmp_path / "x")})
    with pytest.raises(InputError, match="time limit must be a positive number of seconds"):
        train(config, options, progress=False, time_limit_s=-1.0)


CONFIGS = sorted((__import__("pathlib").Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    """Every config in configs/ loads with the recipe it names (unknown keys fail) and writes to runs/STEM."""
    import yaml

    recipe = yaml.safe_load(path.read_text())["recipe"]
    config, _options = load_config(get_recipe(recipe), path)
    assert config.recipe == recipe and config.out == f"runs/{path.stem}"


def test_latent_cache_builds_resumes_extends_and_feeds_t2i(tmp_path, parts):
    """Pre-encoded latents: equal to encoding the rendered scene, resumable by shard, refused for another VAE."""
    from mmsynth.data.torch_dataset import ShapesDataset
    from mmsynth.models.bundle import load_component
    from mmsynth.train.latent_cache import LatentCacheExamples, build_latent_cache

    cache = tmp_path / "cache"
    opts = {"shard_size": 4, "batch_size": 3, "num_workers": 0, "progress": False}
    build_latent_cache(parts, cache, n=6, **opts)
    examples = LatentCacheExamples(cache, seed=0)
    assert examples.n == 6 and len(examples.captions) == 6
    vae = load_component(parts, "vae")
    for index in (0, 5, 6):  # index 6 starts epoch 2: another permutation of the same 6 scenes
        ex = examples[index]
        scene = examples._order(index)
        rendered = ShapesDataset("train", 0, 32)[scene]
        assert ex["caption"] in ex["captions"] == rendered["captions"]
        with torch.no_grad():
            want = vae.encode(rendered["pixel_values"][None]).latent_dist.parameters
        torch.testing.assert_close(ex["latent_params"], want[0], atol=2e-3, rtol=1e-2)

    (cache / "shard_00001.safetensors").unlink()  # as if the build was killed while writing shard 1
    with pytest.raises(InputError, match=r"incomplete \(1 shards missing, first shard_00001\)"):
        LatentCacheExamples(cache)
    kept = (cache / "shard_00000.safetensors").stat().st_mtime_ns
    build_latent_cache(parts, cache, n=10, **opts)  # resumes shard 1 and extends by shard 2
    assert (cache / "shard_00000.safetensors").stat().st_mtime_ns == kept
    assert LatentCacheExamples(cache).n == 10 and (cache / "shard_00002.jsonl").exists()
    with pytest.raises(InputError, match="seed=0, this build asks seed=1"):
        build_latent_cache(parts, cache, n=6, seed=1, **opts)

    common = {"max_steps": "2", "batch_size": "4", "options.clip": str(parts), "options.vae": str(parts)}
    result = run("t2i", tmp_path / "t2i", data=str(cache), **common)
    assert result.step == 2 and all(float(r["loss"]) > 0 for r in read_log(tmp_path / "t2i" / "log.csv"))
    other = tmp_path / "other"
    tiny_bundle(seed=2).save_pretrained(other)
    with pytest.raises(InputError, match=r"was encoded with the VAE in .* which differs from options\.vae"):
        run("t2i", tmp_path / "t2i_other", data=str(cache), **{**common, "options.vae": str(other)})
    with pytest.raises(InputError, match=r"is a latent cache .* recipe 'vae' needs images"):
        run("vae", tmp_path / "vae", data=str(cache), max_steps="1", batch_size="4")
    with pytest.raises(InputError, match=r"grounding_weight needs each example's scene.*data: shapes"):
        run("t2i", tmp_path / "t2i_grounded", data=str(cache), **{**common, "options.grounding_weight": "0.01"})


def test_cache_latents_cli(tmp_path, parts, capsys):
    out = tmp_path / "cache"
    args = ["data", "cache-latents", "--vae", str(parts), "--out", str(out), "--shard-size", "2", "--workers", "0"]
    assert main([*args, "--n", "2"]) == 0
    assert "latent cache of 2 'train' scenes" in capsys.readouterr().out
    assert main([*args, "--n", "2", "--seed", "3"]) == 2
    assert "use another --out folder" in capsys.readouterr().err
    missing = ["data", "cache-latents", "--vae", str(tmp_path / "nope"), "--n", "2", "--out", str(tmp_path / "c2")]
    assert main(missing) == 2
    assert not (tmp_path / "c2").exists()


def test_a_constant_run_extended_with_a_warmup_stable_decay_cool_down(tmp_path):
    """The zoo's runs train at a constant LR so they can be extended; the last stretch may decay to 0."""
    out, common = tmp_path / "clip", {"batch_size": "4", "checkpoint_every": "2", "lr": "1e-3"}
    run("clip", out, max_steps="4", lr_schedule="constant_with_warmup", **common)
    run("clip", out, max_steps="8", lr_schedule="warmup_stable_decay", decay_steps="4", resume=True, **common)
    lrs = [float(r["lr"]) for r in read_log(out / "log.csv")]
    # the log shows the LR of the next step: a 1-step warmup, constant, then the cosine decay from step 5 to 0
    assert lrs[:4] == [1e-3] * 4
    assert all(a > b for a, b in itertools.pairwise(lrs[3:])) and lrs[-1] == 0.0
    with pytest.raises(InputError, match=r"needs 0 < decay_steps <= max_steps - warmup_steps"):
        load_config(get_recipe("clip"), overrides={"lr_schedule": "warmup_stable_decay", "max_steps": "10"})


def test_bf16_on_a_cpu_without_bf16_units_is_kept_with_a_warning(monkeypatch, caplog):
    import mmsynth.train.trainer as trainer

    assert isinstance(trainer.cpu_has_bf16(), bool)  # this machine's answer, whatever it is
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="mmsynth.train.trainer"):
        assert trainer._mixed_precision("bf16") == "bf16"
    assert "emulated and slower than fp32" in caplog.text and "mixed_precision=no" in caplog.text
    caplog.clear()
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="mmsynth.train.trainer"):
        assert trainer._mixed_precision("bf16") == "bf16" and trainer._mixed_precision("auto") == "no"
    assert caplog.text == ""
