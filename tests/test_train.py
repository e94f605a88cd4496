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

def _vision_side_clip(parts, **options: str):
    """A ClipRecipe built from the parts fixture's CLIP with its text tower fixed and `options` set, on the CPU."""
    from mmsynth.train.recipes.clip import ClipRecipe

    overrides = {**FAST, "options.init": str(parts), "options.freeze_text": "true",
                 **{f"options.{k}": v for k, v in options.items()}}  # fmt: skip
    recipe = ClipRecipe(*load_config(get_recipe("clip"), overrides=overrides))
    recipe.build()
    recipe.place(torch.device("cpu"), torch.float32)
    return recipe



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
    with pytest.raises(InputError, match="unknown recipe 'gan'; valid recipes: clip, inpaint, t2i, vae"):
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


def test_clip_caption_target_pulls_images_toward_their_captions_mean_text_embedding(tmp_path, parts):
    from mmsynth.models.zoo import projected

    config, options = load_config(get_recipe("clip"), overrides={**FAST, "out": str(tmp_path / "c"), "batch_size": "4",
                                  "options.init": str(parts), "options.freeze_text": "true",
                                  "options.caption_target_weight": "1"})  # fmt: skip
    recipe = get_recipe("clip")(config, options)
    recipe.build()
    recipe.device = torch.device("cpu")
    clip = recipe.models["clip"]
    caps = [["a red circle", "a picture of a red circle"], ["two blue squares"]]
    targets = recipe._caption_targets(caps)
    ids = recipe.tokenize([c for cs in caps for c in cs]).input_ids
    with torch.no_grad():
        e = torch.nn.functional.normalize(projected(clip.get_text_features(input_ids=ids)), dim=-1)
    expected = torch.nn.functional.normalize(torch.stack([e[0] + e[1], e[2]]), dim=-1)
    torch.testing.assert_close(targets, expected)
    result = run("clip", tmp_path / "r", max_steps="2", batch_size="8", **{
        "options.init": str(parts), "options.freeze_text": "true", "options.caption_target_weight": "1"})  # fmt: skip
    rows = read_log(result.out / "log.csv")
    assert all(-1 <= float(r["caption_target_cos"]) <= 1 for r in rows)
    with pytest.raises(InputError, match=r"caption_target_weight' .* needs 'options\.freeze_text: true'"):
        run("clip", tmp_path / "d", max_steps="1", batch_size="8", **{
            "options.init": str(parts), "options.caption_target_weight": "1"})  # fmt: skip


def test_clip_takes_its_text_tower_from_a_text_encoder_trained_with_the_unet(tmp_path):
    from mmsynth.models.bundle import load_component
    from mmsynth.models.zoo import tiny_bundle

    init, other = tmp_path / "init", tmp_path / "other"
    tiny_bundle(seed=1).save_pretrained(init)
    tiny_bundle(seed=2).save_pretrained(other)
    result = run("clip", tmp_path / "c", max_steps="1", batch_size="8", **{
        "options.zoo": "tiny", "options.init": str(init), "options.text_encoder": str(other),
        "options.freeze_text": "true"})  # fmt: skip
    encoder, clip = load_component(other, "text_encoder"), load_component(result.export, "clip")
    a, b = encoder.state_dict(), clip.text_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].half(), b[k].half()) for k in a)
    assert not torch.equal(clip.text_model.embeddings.token_embedding.weight,
                           load_component(init, "clip").text_model.embeddings.token_embedding.weight)  # fmt: skip
    with pytest.raises(InputError, match=r"options\.text_encoder' needs 'options\.init'"):
        run("clip", tmp_path / "d", max_steps="1", batch_size="8", **{"options.text_encoder": str(other)})


def test_clip_relation_negatives_contrast_each_image_with_its_flipped_caption():
    from mmsynth.train.recipes.clip import ClipRecipe

    config, options = load_config(get_recipe("clip"), overrides={**FAST, "options.relation_negatives": "true"})
    recipe = ClipRecipe(config, options)
    torch.manual_seed(0)
    recipe.build()
    recipe.place(torch.device("cpu"), torch.float32)
    batch = {"caption": ["a red circle left of a blue square", "two green stars"],
             "pixel_values": torch.randn(2, 3, recipe.resolution, recipe.resolution)}  # fmt: skip
    loss, logs = recipe.loss(batch, 0)
    clip = recipe.models["clip"]
    ids = recipe.tokenize(batch["caption"] + ["a red circle right of a blue square"]).input_ids
    out = clip(input_ids=ids, pixel_values=batch["pixel_values"])
    image_side = torch.nn.functional.cross_entropy(out.logits_per_image, torch.arange(2))  # 3 texts per image
    text_side = torch.nn.functional.cross_entropy(out.logits_per_text[:2], torch.arange(2))
    assert torch.allclose(loss, (image_side + text_side) / 2)
    expected = float(out.logits_per_image[0, 0] > out.logits_per_image[0, 2])
    assert logs["relation_acc_in_batch"] == expected
    twins = {"caption": ["a red circle left of a blue square", "a red circle right of a blue square"],
             "pixel_values": batch["pixel_values"]}  # a place pair: each flip is the other's caption
    _, logs = recipe.loss(twins, 0)
    assert "relation_acc_in_batch" not in logs  # faced as in-batch captions, not added again
    recipe.options.relation_negatives = False  # without them: exactly CLIPModel's own loss
    plain, logs = recipe.loss(batch, 0)
    ids = recipe.tokenize(batch["caption"]).input_ids
    own = clip(input_ids=ids, pixel_values=batch["pixel_values"], return_loss=True)
    assert torch.allclose(plain, own.loss) and "relation_acc_in_batch" not in logs


def test_relation_probe_targets_follow_the_relation_word():
    from mmsynth.models.tokenizer import build_shapes_tokenizer
    from mmsynth.train.relation_probe import CLASSES, IGNORE, token_relation_targets

    tok = build_shapes_tokenizer()
    texts = ["a red circle to the left of two blue squares", "three green stars", "hello world", ""]
    enc = tok(texts, padding="longest", return_offsets_mapping=True)
    targets = token_relation_targets(texts, enc.offset_mapping)
    words = [tok.convert_ids_to_tokens(ids) for ids in enc.input_ids]
    first = {w: int(t) for w, t in zip(words[0], targets[0]) if int(t) != IGNORE}
    assert first == {"a": 0, "red": 0, "circle": 0, "two": CLASSES.index("left of"), "blue": CLASSES.index("left of"),
                     "squares": CLASSES.index("left of")}  # the relation words themselves are not scored
    assert [int(t) for t in targets[1] if int(t) != IGNORE] == [0, 0, 0]
    assert bool((targets[2:] == IGNORE).all())  # outside the grammar, and a dropped caption: nothing scored


def test_clip_relation_probe_trains_the_text_tower_and_preserve_pulls_it_back(tmp_path):
    from mmsynth.models.bundle import load_component
    from mmsynth.train.recipes.clip import ClipRecipe

    init = tmp_path / "init"
    tiny_bundle(seed=1).save_pretrained(init)
    config, options = load_config(get_recipe("clip"), overrides={
        **FAST, "options.init": str(init), "options.relation_probe_weight": "1.0",
        "options.preserve_text_weight": "2.0"})  # fmt: skip
    recipe = ClipRecipe(config, options)
    recipe.build()
    recipe.place(torch.device("cpu"), torch.float32)
    assert recipe.trainable == ("clip", "relation_probe") and not recipe.models["text_reference"].training
    batch = {"caption": ["a red circle left of a blue square", "a pink cross above a green star"],
             "pixel_values": torch.randn(2, 3, recipe.resolution, recipe.resolution)}  # fmt: skip
    loss, logs = recipe.loss(batch, 0)
    assert logs["text_drift"] == 0.0 and 0.0 <= logs["relation_probe_acc"] <= 1.0  # starts at the reference
    recipe.options.relation_probe_weight = recipe.options.preserve_text_weight = 0.0
    plain, _ = recipe.loss(batch, 0)
    assert torch.allclose(loss - plain, torch.tensor(logs["relation_probe_loss"]), atol=1e-5)
    result = run("clip", tmp_path / "p", max_steps="3", batch_size="8", **{
        "options.init": str(init), "options.relation_probe_weight": "1.0", "options.preserve_text_weight": "1.0"})
    rows = read_log(tmp_path / "p" / "log.csv")
    assert float(rows[-1]["text_drift"]) > 0.0 and "relation_probe_loss" in rows[-1]
    assert set(load_component(result.export, "clip").state_dict()) == set(load_component(init, "clip").state_dict())
    for bad, what in [({"options.relation_probe_weight": "-1"}, ">= 0"),
                      ({"options.preserve_text_weight": "1"}, "needs 'options.init'"),
                      ({"options.init": str(init), "options.freeze_text": "true",
                        "options.relation_probe_weight": "1"}, "one or the other")]:  # fmt: skip
        with pytest.raises(InputError, match=what):
            run("clip", tmp_path / "bad", max_steps="1", batch_size="8", **bad)


def test_clip_hard_negatives_pair_each_scene_with_its_minimal_edit(tmp_path):
    from mmsynth.data.scene import Scene
    from mmsynth.train.data import HardNegativePairs, ShapesExamples

    pairs, plain = HardNegativePairs("train", seed=3), ShapesExamples("train", seed=3)
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
    with pytest.raises(InputError, match=r"batch_size must be a multiple of options.hard_negative_group \(2\), got 7"):
        run("clip", tmp_path / "hn3", max_steps="1", batch_size="7", **{"options.hard_negatives": "true"})
    with pytest.raises(InputError, match="needs data: shapes"):
        run("clip", tmp_path / "hn2", max_steps="1", batch_size="8", data=str(tmp_path),
            **{"options.hard_negatives": "true"})  # fmt: skip


def test_clip_hard_negative_groups_hold_a_scene_and_edits_naming_other_groups(tmp_path):
    from mmsynth.data.captions import caption_true_of, captions
    from mmsynth.data.scene import Scene, groups
    from mmsynth.train.data import HardNegativePairs, ShapesExamples

    pairs, fours = HardNegativePairs("train", seed=3), HardNegativePairs("train", seed=3, group=4, kinds=("shape",) * 2
                                                                         + ("colour", "count"))  # fmt: skip
    plain, edits = ShapesExamples("train", seed=3), 0
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
    with pytest.raises(InputError, match=r"batch_size must be a multiple of options.hard_negative_group \(4\), got 6"):
        run("clip", tmp_path / "g", max_steps="1", batch_size="6", **{"options.hard_negatives": "true",
                                                                        "options.hard_negative_group": "4"})
    with pytest.raises(InputError, match=r"'options.hard_negative_group' .* must be >= 2, got 1"):
        run("clip", tmp_path / "g1", max_steps="1", batch_size="8", **{"options.hard_negatives": "true",
                                                                         "options.hard_negative_group": "1"})
    result = run("clip", tmp_path / "g4", max_steps="2", batch_size="8", **{"options.hard_negatives": "true",
                                                                            "options.hard_negative_group": "4"})
    assert len(read_log(tmp_path / "g4" / "log.csv")) == 2 and (result.export / "clip").is_dir()


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


def test_t2i_fine_tunes_a_base_bundle_grown_deeper(tmp_path, parts):
    from mmsynth.models.grow import attention_depth

    (parts / "README.md").write_text("the base's card")
    out = tmp_path / "deep"
    result = run("t2i", out, max_steps="2", batch_size="4",
                 **{"options.base": str(parts), "options.attention_depth": "1,2,2"})  # fmt: skip
    assert (out / "base_card.md").read_text() == "the base's card"
    unet = Bundle.from_pretrained(result.export).unet
    assert attention_depth(unet) == (1, 2, 2)
    with pytest.raises(InputError, match="grown, not cut"):
        run("t2i", tmp_path / "cut", max_steps="2", batch_size="4",
            **{"options.base": str(result.export), "options.attention_depth": "1,1,1"})  # fmt: skip


def test_t2i_trains_the_text_encoder_at_its_own_lr_when_asked(tmp_path, parts):
    def moved(lr):
        extra = {} if lr is None else {"options.text_encoder_lr": lr}
        result = run("t2i", tmp_path / f"joint_{lr}", max_steps="2", batch_size="4",
                     **{"options.base": str(parts), "options.train_text_encoder": "true",
                        "options.save_dtype": "float32", **extra})  # fmt: skip
        exported = Bundle.from_pretrained(result.export)
        pairs = zip(exported.text_encoder.parameters(), base.text_encoder.parameters())
        diffs = [float((a - b).detach().abs().max()) for a, b in pairs]
        assert torch.equal(next(exported.vae.parameters()), next(base.vae.parameters()))  # the VAE stays frozen
        return max(diffs)

    base = Bundle.from_pretrained(parts)
    assert moved(None) > 1e-4  # the run's lr
    assert 0 < moved("1e-9") < 1e-7  # its own lr: AdamW moves a weight by about lr per step
    frozen = run("t2i", tmp_path / "frozen", max_steps="1", batch_size="4", **{"options.base": str(parts)})
    kept = Bundle.from_pretrained(frozen.export).text_encoder
    assert all(torch.equal(a, b.half().float()) for a, b in zip(kept.parameters(), base.text_encoder.parameters()))
    with pytest.raises(InputError, match=r"text_encoder_lr' must be > 0 and needs options\.train_text_encoder"):
        run("t2i", tmp_path / "bad", max_steps="1", batch_size="4",
            **{"options.base": str(parts), "options.text_encoder_lr": "1e-4"})  # fmt: skip


def test_t2i_can_start_the_text_encoder_from_random_weights(tmp_path, parts):
    common = {"options.clip": str(parts), "options.vae": str(parts), "options.train_text_encoder": "true",
              "options.save_dtype": "float32"}  # fmt: skip
    result = run("t2i", tmp_path / "scratch", max_steps="1", batch_size="4",
                 **{**common, "options.text_encoder_init": "random"})  # fmt: skip
    exported, source = Bundle.from_pretrained(result.export), Bundle.from_pretrained(parts)
    assert exported.text_encoder.config.hidden_size == source.text_encoder.config.hidden_size
    a, b = exported.text_encoder.get_input_embeddings().weight, source.text_encoder.get_input_embeddings().weight
    assert float((a - b).detach().abs().max()) > 1e-2  # re-initialised, not one AdamW step away from the source
    assert exported.clip is None  # its text tower would no longer be the text encoder
    with pytest.raises(InputError, match=r"text_encoder_init: random' needs options\.train_text_encoder"):
        run("t2i", tmp_path / "frozen", max_steps="1", batch_size="4",
            **{**common, "options.train_text_encoder": "false", "options.text_encoder_init": "random"})  # fmt: skip
    with pytest.raises(InputError, match="text_encoder_init' must be one of pretrained, random, got 'zeros'"):
        run("t2i", tmp_path / "bad", max_steps="1", batch_size="4", **{**common, "options.text_encoder_init": "zeros"})


def test_t2i_fine_tunes_a_base_unet_to_another_text_encoder(tmp_path, parts):
    from mmsynth.models.zoo import tiny_bundle

    other = tmp_path / "other_clip"
    tiny_bundle(seed=2).save_pretrained(other)
    result = run("t2i", tmp_path / "swapped", max_steps="1", batch_size="4",
                 **{"options.base": str(parts), "options.text_encoder": str(other)})  # fmt: skip
    exported, source = Bundle.from_pretrained(result.export), Bundle.from_pretrained(other)
    for a, b in [(exported.text_encoder, source.text_encoder), (exported.clip, source.clip)]:
        assert all(torch.equal(x, y.half().float()) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(InputError, match=r"options\.text_encoder' replaces the text side of 'options\.base'"):
        run("t2i", tmp_path / "bad", max_steps="1", batch_size="4", **{"options.text_encoder": str(other)})


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


def test_t2i_cubic_timesteps_favour_high_noise(parts):
    from mmsynth.train.recipes import t2i as t2i_module

    def recipe(sampling):
        config, options = load_config(get_recipe("t2i"), overrides={
            **FAST, "options.base": str(parts), "options.timestep_sampling": sampling})  # fmt: skip
        r = t2i_module.TextToImageRecipe(config, options)
        r.build()
        r.place(torch.device("cpu"), torch.float32)
        return r

    torch.manual_seed(0)
    uniform, cubic = (recipe(s).draw_timesteps(20000) for s in ("uniform", "cubic"))
    steps = 1000
    assert int(cubic.min()) >= 0 and int(cubic.max()) < steps and cubic.dtype == torch.long
    high = lambda t: float((t >= 800).float().mean())  # noqa: E731
    assert high(uniform) == pytest.approx(0.2, abs=0.02)
    assert high(cubic) == pytest.approx(0.2 ** (1 / 3), abs=0.02)  # P(1 - u^3 >= 0.8) = P(u <= 0.2^(1/3))
    with pytest.raises(InputError, match=r"options.timestep_sampling. must be one of uniform, cubic"):
        recipe("logit")


def test_t2i_zero_terminal_snr_trains_v_at_pure_noise_and_exports_a_trailing_schedule(tmp_path, parts):
    zero = {"options.base": str(parts), "options.prediction_type": "v_prediction", "options.zero_terminal_snr": "true",
            "options.snr_gamma": "none"}  # fmt: skip
    result = run("t2i", tmp_path / "zero", max_steps="2", batch_size="4", **zero)
    assert all(float(r["loss"]) == float(r["loss"]) for r in read_log(tmp_path / "zero" / "log.csv"))  # finite
    scheduler = Bundle.from_pretrained(result.export).scheduler
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # t = T is pure noise (the base's was 0.0047-like)
    scheduler.set_timesteps(4)
    assert int(scheduler.timesteps[0]) == 999  # sampling starts where training saw pure noise
    base = Bundle.from_pretrained(parts).scheduler
    assert float(base.alphas_cumprod[-1]) > 1e-4 and not base.config.get("rescale_betas_zero_snr", False)
    with pytest.raises(InputError, match=r"zero_terminal_snr' needs options\.prediction_type 'v_prediction'"):
        run("t2i", tmp_path / "eps", max_steps="1", batch_size="4", **{**zero, "options.prediction_type": "epsilon"})
    with pytest.raises(InputError, match=r"zero_terminal_snr' needs options\.snr_gamma none"):
        run("t2i", tmp_path / "minsnr", max_steps="1", batch_size="4", **{**zero, "options.snr_gamma": "5"})
    with pytest.raises(InputError, match=r"samples with zero terminal SNR; set options\.zero_terminal_snr true"):
        run("t2i", tmp_path / "plain", max_steps="1", batch_size="4", **{"options.base": str(result.export)})


def test_t2i_relation_contrast_scores_each_relation_caption_against_its_flip(tmp_path, parts, monkeypatch):
    from mmsynth.train.recipes import t2i as t2i_module

    config, options = load_config(get_recipe("t2i"), overrides={
        **FAST, "options.base": str(parts), "options.relation_contrast_weight": "1.0",
        "options.relation_contrast_margin": "0.1", "options.relation_contrast_min_t": "500"})  # fmt: skip
    recipe = t2i_module.TextToImageRecipe(config, options)
    torch.manual_seed(0)
    recipe.build()
    recipe.place(torch.device("cpu"), torch.float32)
    captions = ["a red circle left of a blue square", "two green stars", "a red circle above a blue square", ""]
    noisy, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([600, 900, 100, 700])  # the third is below min_t, the others have no relation
    unet = recipe.models["unet"]
    text = recipe.encode_text(captions)
    per_true = recipe.per_sample_error(unet(noisy, timesteps, encoder_hidden_states=text).sample, target)
    contrast, logs = recipe.relation_contrast(captions, noisy, timesteps, target, per_true, {"caption": captions})
    flip = recipe.encode_text(["a red circle right of a blue square"])
    per_flip = recipe.per_sample_error(unet(noisy[:1], timesteps[:1], encoder_hidden_states=flip).sample, target[:1])
    gap = ((per_flip - per_true[:1]) / per_true[:1]).detach()
    assert logs["relation_gap"] == pytest.approx(float(gap), rel=1e-4) and gap.abs() > 0  # only the first counts
    assert float(contrast.detach()) == pytest.approx(max(0.0, 0.1 - float(gap)), rel=1e-4)
    assert logs["relation_wins"] == float(gap > 0)
    monkeypatch.setattr(t2i_module, "flip_relations", lambda c: c)  # a "flip" that changes nothing: gap 0
    contrast, logs = recipe.relation_contrast(captions, noisy, timesteps, target, per_true, {"caption": captions})
    assert logs["relation_gap"] == pytest.approx(0.0, abs=1e-6) and float(contrast.detach()) == pytest.approx(0.1)
    run("t2i", tmp_path / "contrast", max_steps="2", batch_size="4", data="shapes",
        **{"options.base": str(parts), "options.relation_contrast_weight": "0.5",
           "options.relation_contrast_min_t": "0", "options.caption_dropout": "0"})  # fmt: skip
    rows = [r for r in read_log(tmp_path / "contrast" / "log.csv") if r["relation_contrast"]]
    assert rows  # Shapes scenes of two or more objects always state a relation
    for row in rows:
        assert float(row["loss"]) == pytest.approx(float(row["denoising"]) + 0.5 * float(row["relation_contrast"]),
                                                   rel=1e-4)  # fmt: skip
    with pytest.raises(InputError, match=r"relation_contrast_margin' must be >= 0"):
        run("t2i", tmp_path / "bad", max_steps="1", batch_size="4",
            **{"options.base": str(parts), "options.relation_contrast_margin": "-1"})  # fmt: skip


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
    from mmsynth.data.torch_dataset import make_example
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
        assert ex["caption"] in ex["captions"] == make_example("train", scene, 0, 32, ())["captions"]
        with torch.no_grad():
            want = vae.encode(make_example("train", scene, 0, 32, ())["pixel_values"][None]).latent_dist.parameters
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


def test_the_deepening_config_loads():
    from pathlib import Path

    path = Path(__file__).parents[1] / "configs" / "t2i_deep.yaml"
    _config, options = load_config(get_recipe("t2i"), path)
    assert options.attention_depth == (1, 2, 2) and options.base == "models/shapes-v1"
    # counts out of grow.MAX_DEPTH's range fail at config time, before any model loads
    for bad in ("0,2,2", "1,2,9"):
        with pytest.raises(InputError, match=r"options.attention_depth' takes counts 1\.\.8"):
            load_config(get_recipe("t2i"), path, overrides={"options.attention_depth": bad})


def test_patch_targets_give_each_patch_the_shares_of_the_shapes_and_colours_under_it():
    from mmsynth.data.scene import Background, Scene, ShapeObject
    from mmsynth.train.patch_labels import COLOUR_CLASSES, SHAPE_CLASSES, patch_targets

    square = ShapeObject("square", "blue", "large", 0.75, 0.5, 0.19)
    scene = Scene(objects=[ShapeObject("circle", "red", "small", 0.25, 0.5, 0.12), square],
                  background=Background("light", [(230, 230, 230)]))  # fmt: skip
    shapes, colours = patch_targets([scene, scene.to_dict()], resolution=32, patch=4)  # a dict reads the same
    assert shapes.shape == (2, 64, len(SHAPE_CLASSES)) and colours.shape == (2, 64, len(COLOUR_CLASSES))
    assert torch.equal(shapes[0], shapes[1]) and torch.allclose(shapes.sum(-1), torch.ones(2, 64))
    row, col = 4, 6  # the patch under the square's centre (x 0.75, y 0.5 of 8 x 8 patches), row-major
    assert shapes[0, row * 8 + col, SHAPE_CLASSES.index("square")] == 1.0
    assert colours[0, row * 8 + col, COLOUR_CLASSES.index("blue")] == 1.0
    assert shapes[0, 0, 0] == 1.0 and colours[0, 63, 0] == 1.0  # corners: background
    assert 0.0 < shapes[0, :, SHAPE_CLASSES.index("circle")].sum() < shapes[0, :, SHAPE_CLASSES.index("square")].sum()


def test_clip_shape_swap_negatives_add_false_one_word_captions_every_image_faces(tmp_path, parts):
    from mmsynth.data.captions import caption_true_of
    from mmsynth.data.scene import Scene
    recipe = _vision_side_clip(parts, hard_negatives="true", shape_swap_negatives="2")
    batch = recipe.collate([recipe.dataset()[i] for i in range(8)])
    captions, scenes = list(batch["caption"]), [Scene.from_dict(s) for s in batch["scene"]]
    swaps = recipe._shape_swaps(captions, batch["scene"], 3, set(captions))
    flat = [t for row in swaps for t in row]
    assert all(len(row) <= 2 for row in swaps) and len(flat) >= 8 and len(set(flat)) == len(flat)
    assert not set(flat) & set(captions) and not any(caption_true_of(t, s) for t in flat for s in scenes)
    assert swaps == recipe._shape_swaps(captions, batch["scene"], 3, set(captions))  # same step, same draw
    loss, logs = recipe.loss(batch, 3)
    assert 0.0 <= logs["swap_acc_in_batch"] <= 1.0
    recipe.options.shape_swap_negatives = 0
    plain, plain_logs = recipe.loss(batch, 3)
    assert "swap_acc_in_batch" not in plain_logs
    assert loss > plain  # more columns in each image's softmax; the text->image half is unchanged
    with pytest.raises(InputError, match="shape_swap_negatives' must be >= 0"):
        run("clip", tmp_path / "bad", max_steps="1", batch_size="8", **{"options.shape_swap_negatives": "-1"})
    with pytest.raises(InputError, match=r"shape_swap_negatives' checks .* needs data: shapes"):
        run("clip", tmp_path / "bad2", max_steps="1", batch_size="8", data=str(tmp_path),
            **{"options.shape_swap_negatives": "1"})  # fmt: skip


def test_clip_patch_labels_train_a_head_on_the_vision_patches_and_export_without_it(tmp_path, parts):
    from mmsynth.models.bundle import load_component
    recipe = _vision_side_clip(parts, patch_label_weight="0.5")
    assert recipe.trainable == ("clip", "patch_labels")
    examples = [recipe.dataset()[i] for i in range(4)]
    batch = recipe.collate(examples)
    loss, logs = recipe.loss(batch, 0)
    assert {"patch_shape_loss", "patch_colour_loss", "patch_shape_acc"} <= set(logs)
    loss.backward()
    assert recipe.models["patch_labels"].head.weight.grad.abs().sum() > 0
    assert recipe.models["clip"].vision_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    recipe.options.patch_label_weight = 0.0
    plain, _ = recipe.loss(batch, 0)
    expected = plain + 0.5 * (logs["patch_shape_loss"] + logs["patch_colour_loss"]) / 2
    assert torch.allclose(loss.detach(), expected.detach(), atol=1e-5)
    result = run("clip", tmp_path / "p", max_steps="2", batch_size="8", **{
        "options.init": str(parts), "options.freeze_text": "true", "options.patch_label_weight": "1"})  # fmt: skip
    assert "patch_shape_acc" in read_log(tmp_path / "p" / "log.csv")[-1]
    assert set(load_component(result.export, "clip").state_dict()) == set(load_component(parts, "clip").state_dict())
    with pytest.raises(InputError, match="patch_label_weight' must be >= 0"):
        run("clip", tmp_path / "bad", max_steps="1", batch_size="8", **{"options.patch_label_weight": "-1"})
    with pytest.raises(InputError, match=r"patch_label_weight' labels patches .* needs data: shapes"):
        run("clip", tmp_path / "bad2", max_steps="1", batch_size="8", data=str(tmp_path),
            **{"options.patch_label_weight": "1"})  # fmt: skip


def test_clip_consistent_positives_spread_each_target_over_every_scene_its_caption_is_true_of(tmp_path, parts):
    from mmsynth.data.scene import Scene
    recipe = _vision_side_clip(parts, consistent_positives="true")
    one = lambda color, shape, cx: {"color": color, "shape": shape, "size": "large", "cx": cx, "cy": 0.5,  # noqa: E731
                                    "radius": 0.2, "rotation": 0.0, "rgb": [200, 30, 30]}  # fmt: skip
    background = Scene.from_dict(recipe.collate([recipe.dataset()[0]])["scene"][0]).to_dict()["background"]
    scenes = [{"objects": [one("red", "circle", cx)], "background": background} for cx in (0.3, 0.7)]
    scenes.append({"objects": [one("blue", "star", 0.5)], "background": background})
    batch = {"caption": ["a red circle", "a large red circle", "a blue star"], "scene": scenes,
             "pixel_values": torch.randn(3, 3, recipe.resolution, recipe.resolution)}  # fmt: skip
    true_of = recipe._true_of(batch["caption"], scenes)
    assert true_of.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]  # both red circle captions fit both red circles
    loss, logs = recipe.loss(batch, 0)
    assert logs["false_negatives_in_batch"] == pytest.approx(2 / 3)
    out = recipe.models["clip"](input_ids=recipe.tokenize(batch["caption"]).input_ids,
                                pixel_values=batch["pixel_values"])  # fmt: skip
    spread = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    ce = torch.nn.functional.cross_entropy
    expected = (ce(out.logits_per_image, spread) + ce(out.logits_per_text, spread)) / 2
    assert torch.allclose(loss, expected)
    recipe.options.consistent_positives = False  # off: each caption's own scene only, CLIPModel's own loss
    plain, plain_logs = recipe.loss(batch, 0)
    assert "false_negatives_in_batch" not in plain_logs and not torch.allclose(plain, loss)
    own = recipe.models["clip"](input_ids=recipe.tokenize(batch["caption"]).input_ids,
                                pixel_values=batch["pixel_values"], return_loss=True)  # fmt: skip
    assert torch.allclose(plain, own.loss)
    with pytest.raises(InputError, match=r"consistent_positives' checks .* needs data: shapes"):
        run("clip", tmp_path / "bad", max_steps="1", batch_size="8", data=str(tmp_path),
            **{"options.consistent_positives": "true"})  # fmt: skip
    run("clip", tmp_path / "ok", max_steps="2", batch_size="8", **{"options.consistent_positives": "true"})


def test_mined_negatives_are_the_clips_confusions_and_extend_the_hard_negative_groups(tmp_path, parts):
    import numpy as np

    from mmsynth.data.captions import caption_true_of, captions
    from mmsynth.data.scene import Scene, sample_scene
    from mmsynth.models.bundle import load_component
    from mmsynth.train.data import HardNegativePairs, MinedNegatives
    from mmsynth.train.mining import load_table, mine_confusions, save_table

    clip, tokenizer = load_component(parts, "clip").float(), load_component(parts, "tokenizer")
    table = mine_confusions(clip, tokenizer, "train", 5, n_sources=24, group=2, per_source=2, block=2)
    sources, neighbours = table["sources"], table["neighbours"]
    assert list(sources) == list(range(0, 48, 2)) and neighbours.shape == (24, 2)
    scenes = {int(i): sample_scene("train", int(i), 5) for i in sources}
    for s, row in zip(sources, neighbours):
        assert set(row) <= set(scenes) and int(s) not in row
        for j in row:  # never a false negative, either way round
            assert not any(caption_true_of(c, scenes[int(j)]) for c in captions(scenes[int(s)], 4))
            assert not any(caption_true_of(c, scenes[int(s)]) for c in captions(scenes[int(j)], 4))
    for b in range(0, 24, 2):  # a batch (block) never holds a scene twice
        members = [int(x) for x in sources[b : b + 2]] + [int(x) for x in neighbours[b : b + 2].ravel()]
        assert len(set(members)) == len(members)
    path = save_table(table, tmp_path / "mined.npz")
    assert not list(tmp_path.glob("*.tmp*"))
    loaded = load_table(path)
    assert (loaded["split"], loaded["seed"], loaded["group"], loaded["block"]) == ("train", 5, 2, 2)
    data, pairs = MinedNegatives(loaded, resolution=32, extra=2), HardNegativePairs("train", 5, 32)
    assert torch.equal(data[4 * 3 + 1]["pixel_values"], pairs[int(sources[3]) + 1]["pixel_values"])  # the edit
    assert Scene.from_dict(data[4 * 3 + 3]["scene"]) == scenes[int(neighbours[3, 1])]
    with pytest.raises(InputError, match=r"extra members per group must be 1\.\.2, got 3"):
        MinedNegatives(loaded, extra=3)
    mined = {"options.init": str(parts), "options.freeze_text": "true", "options.hard_negatives": "true",
             "options.mined_negatives": str(path), "data_seed": "5"}  # fmt: skip
    run("clip", tmp_path / "m", max_steps="2", batch_size="8", **mined)
    assert len(read_log(tmp_path / "m" / "log.csv")) == 2
    with pytest.raises(InputError, match="was mined for seed 5, this run needs 6"):
        run("clip", tmp_path / "m2", max_steps="1", batch_size="8", **{**mined, "data_seed": "6"})
    with pytest.raises(InputError, match="was mined for block 2, this run needs 3"):
        run("clip", tmp_path / "m3", max_steps="1", batch_size="12", **mined)
    with pytest.raises(InputError, match=r"needs .options\.hard_negatives: true."):
        run("clip", tmp_path / "m4", max_steps="1", batch_size="8", **{**mined, "options.hard_negatives": "false"})
    with pytest.raises(InputError, match="no file at"):
        load_table(tmp_path / "absent.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(InputError, match="is not a mined table"):
        load_table(tmp_path / "other.npz")


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
