"""scripts/ship_zoo.py's bookkeeping: a UNet fine-tuned from a shipped bundle (`options.base`) is carded with the
steps and wall time of the weights it started from, read from that bundle's card."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """scripts/NAME.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ship_zoo():
    return _script("ship_zoo")


CARD = """# earlier
| model | steps | batch | examples seen | precision | data | wall time (logged) | last logged |
|---|---|---|---|---|---|---|---|
| t2i | 13200 | 64 | 844800 | bf16 | runs/latents | 7.38 h | loss 0.01711 |
"""


def test_a_fine_tuning_run_names_its_base_and_the_base_card_gives_its_steps(tmp_path):
    ship = _ship_zoo()
    run = tmp_path / "runs" / "t2i"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: t2i\nbatch_size: 64\noptions:\n  base: models/old\n")
    (run / "log.csv").write_text("step,sec_per_step,loss\n100,2.0,0.02\n300,1.0,0.018\n")
    rec = ship.training_record(run, "t2i")
    assert rec["base"] == "models/old"
    assert abs(rec["logged_wall_h"] - (100 * 2.0 + 200 * 1.0) / 3600) < 1e-9
    (tmp_path / "card.md").write_text(CARD)
    assert ship.earlier_training(tmp_path / "card.md", "t2i") == {"step": 13200, "logged_wall_h": 7.38}
    assert ship.earlier_training(tmp_path / "card.md", "vae") is None
    assert ship.earlier_training(tmp_path / "missing.md", "t2i") is None


def test_a_run_from_scratch_has_no_base(tmp_path):
    run = tmp_path / "t2i"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: t2i\noptions:\n  zoo: shapes-v1\n")
    assert "base" not in _ship_zoo().training_record(run, "t2i")


def test_the_card_the_run_kept_when_it_began_wins_over_the_reshipped_base(tmp_path):
    ship = _ship_zoo()
    run, base = tmp_path / "runs" / "t2i", tmp_path / "models" / "old"
    run.mkdir(parents=True)
    base.mkdir(parents=True)
    (base / "README.md").write_text(CARD.replace("13200", "16200"))  # reshipped: already counts the run
    rec = {"recipe": "t2i", "folder": str(run), "base": str(base)}
    assert ship.base_card(rec) == base / "README.md"
    (run / "base_card.md").write_text(CARD)
    assert ship.earlier_training(ship.base_card(rec), "t2i")["step"] == 13200


def test_the_t2i_recipe_keeps_the_base_card_of_a_fresh_run_and_not_of_a_resumed_one(tmp_path):
    from mmsynth.train.config import TrainConfig
    from mmsynth.train.recipes.t2i import BASE_CARD, TextToImageOptions, TextToImageRecipe

    base, out = tmp_path / "base", tmp_path / "run"
    base.mkdir()
    (base / "README.md").write_text("first card")
    recipe = TextToImageRecipe(TrainConfig(recipe="t2i", out=str(out)), TextToImageOptions(base=str(base)))
    recipe.started(0)
    assert (out / BASE_CARD).read_text() == "first card"
    (base / "README.md").write_text("reshipped card")
    recipe.started(120)  # a resumed run keeps the card it began with
    assert (out / BASE_CARD).read_text() == "first card"
    recipe.started(0)  # a fresh run in the same folder takes the card anew
    assert (out / BASE_CARD).read_text() == "reshipped card"
    (out / BASE_CARD).unlink()
    recipe.started(120)  # resumed from before the card was kept: the base's current one is the best there is
    assert (out / BASE_CARD).read_text() == "reshipped card"


def test_the_t2i_run_is_the_one_the_bundle_came_from_and_a_grown_unet_is_carded(tmp_path):
    from mmsynth.models.grow import deepen_attention
    from mmsynth.models.zoo import tiny_bundle

    ship = _ship_zoo()
    runs = tmp_path / "runs"
    for name in ("t2i", "t2i_deep", "vae"):
        (runs / name).mkdir(parents=True)
    (runs / "t2i_deep" / "config.yaml").write_text(
        "recipe: t2i\nbatch_size: 64\noptions:\n  base: models/old\n  attention_depth: [1, 2, 2]\n"
    )
    folders = ship.run_folders(runs, runs / "t2i_deep" / "final")
    assert folders == {"t2i": runs / "t2i_deep", "vae": runs / "vae"}
    assert ship.run_folders(runs, tmp_path / "elsewhere" / "final")["t2i"] == runs / "t2i"
    rec = ship.training_record(folders["t2i"], "t2i")
    assert rec["attention_depth"] == [1, 2, 2]

    bundle = tiny_bundle(seed=0)
    bundle.unet = deepen_attention(bundle.unet, (1, 2, 2))
    bundle.save_pretrained(tmp_path / "zoo")
    dtypes, counts = ship.tensor_summary(tmp_path / "zoo")
    assert dtypes == {"F32"}  # save_pretrained keeps float32 unless asked
    (line,) = ship.architecture(tmp_path / "zoo", counts)
    assert f"unet {sum(p.numel() for p in bundle.unet.parameters()) / 1e6:.2f}M" in line
    assert "transformer layers per level [1, 2, 2]" in line and "channels 16/32/32" in line
    rec.update(step=300, earlier={"step": 18900, "logged_wall_h": 9.91})
    card = ship.model_card(tmp_path / "zoo", [rec], {}, {"results": {"t2i": {}}}, None,
                           {"t2i": "t2i cmd", "components": "components cmd"})  # fmt: skip
    assert "| t2i | 19200 |" in card and "grown first to (1, 2, 2) transformer layers" in card
    assert "--bundle " + str(runs / "t2i_deep") + "/final" in card


def test_a_clip_shipped_with_the_bundle_must_keep_its_text_encoder(tmp_path):
    import pytest
    import torch

    from mmsynth.models.bundle import save_components
    from mmsynth.models.zoo import tiny_bundle

    ship = _ship_zoo()
    bundle = tiny_bundle(seed=0)
    bundle.save_pretrained(tmp_path / "zoo")
    with torch.no_grad():  # a vision-side run (options.freeze_text) moves only the vision tower
        bundle.clip.vision_model.post_layernorm.bias.add_(1.0)
    save_components(tmp_path / "vision", clip=bundle.clip)
    ship._check_same_text_tower(tmp_path / "zoo", tmp_path / "vision")
    with torch.no_grad():
        bundle.clip.text_model.final_layer_norm.bias.add_(1.0)
    save_components(tmp_path / "text_moved", clip=bundle.clip)
    with pytest.raises(SystemExit, match="is not the bundle's text encoder"):
        ship._check_same_text_tower(tmp_path / "zoo", tmp_path / "text_moved")
    # a bundle whose text encoder trained with the UNet still carries the old CLIP: refused before any bench
    bundle.save_pretrained(tmp_path / "joint")  # its CLIP's text tower moved, its text encoder did not
    with pytest.raises(SystemExit, match=r"options\.text_encoder=BUNDLE"):
        ship.main(["--bundle", str(tmp_path / "joint"), "--out", str(tmp_path / "shipped"),
                   "--reports", str(tmp_path / "reports")])  # fmt: skip
    assert not (tmp_path / "shipped").exists() and not (tmp_path / ".shipped.shipping").exists()


def test_shipping_the_inpainting_unet_updates_the_bundle_card(tmp_path):
    ship = _script("ship_inpainting")
    bundle = tmp_path / "b"
    (bundle / "unet_inpainting").mkdir(parents=True)
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2**19, dtype=torch.float16)}, str(bundle / "unet_inpainting" / "w.safetensors"))
    (bundle / "README.md").write_text("# zoo\n\nintro\n\nWeights: 17.9 MiB of safetensors (F16).\n\n## Quality\n\nx\n")
    ship._update_bundle_card(bundle)
    ship._update_bundle_card(bundle)  # idempotent
    text = (bundle / "README.md").read_text()
    assert "Weights: 1.0 MiB of safetensors (F16)." in text
    assert text.count("unet_inpainting/README.md") == 1 and text.index("unet_inpainting/") < text.index("## Quality")
    report = {"results": {"edit": {r: {"inpaint_inside_acc": {"value": 0.5, "ci95": [0.4, 0.6]}} for r in
                                   ship.ROWS.split(",")}},
              "rows": {"edit": {r: {"n_cases": 200} for r in ship.ROWS.split(",")}}}  # fmt: skip
    card = ship.card({"folder": "runs/inpaint", "step": 1500, "batch_size": 32, "config": "recipe: inpaint"},
                     report, "mmsynth bench run ...", "models/shapes-v1")
    assert "| inpaint_unet | 200 | 0.500 [0.400, 0.600] | n/a | n/a |" in card and "recipe: inpaint" in card


def _ship_clip():
    return _script("ship_clip")


def test_shipping_a_vision_side_clip_run_replaces_clip_and_the_card_components_only(tmp_path):
    import json

    import torch

    from mmsynth.models.bundle import load_component, save_components
    from mmsynth.models.zoo import tiny_bundle

    ship = _ship_clip()
    bundle, out = tiny_bundle(seed=4), tmp_path / "zoo"
    bundle.save_pretrained(out)
    card = "# zoo\n\nWeights: 9.9 MiB of safetensors (F16).\n\n## Quality\n\nq\n\n## Components\n\nold\n\n"
    card += "## Training\n\nt\n"
    (out / "README.md").write_text(card)
    worse = {"clip": {"top1_consistent": {"value": -1.0, "n": 4, "ci95": [0.0, 0.0]}}}
    (out / "metrics_components.json").write_text(json.dumps(worse))
    run = tmp_path / "runs" / "clip_vision_deep"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: clip\nbatch_size: 8\nlr: 0.0001\noptions:\n  freeze_text: true\n"
                                     "  hard_negative_edits: [shape, colour]\n")  # the second is the default
    (run / "log.csv").write_text("step,sec_per_step,loss,t2i_top1_in_batch\n10,1.0,0.5,0.75\n")
    with torch.no_grad():  # a vision-side run moves only the vision tower
        bundle.clip.vision_model.post_layernorm.bias.add_(1.0)
    save_components(run / "final", clip=bundle.clip)
    args = ["--run", str(run), "--out", str(out), "--n", "4", "--reports", str(tmp_path / "reports")]
    assert ship.main([*args, "--val-seed", "7", "--command", "mmsynth train clip --config c.yaml"]) == 0
    shipped = load_component(out, "clip")
    moved = bundle.clip.vision_model.post_layernorm.bias.half().float()
    assert torch.allclose(shipped.vision_model.post_layernorm.bias, moved)
    assert shipped.text_model.final_layer_norm.bias.dtype == torch.float32  # loaded back as float32 from float16 files
    text = (out / "README.md").read_text()
    assert "old" not in text and "## Quality\n\nq\n" in text and "## Training\n\nt\n" in text
    assert f"`mmsynth bench components --model {out} --n 4`" in text and "text-side ceiling" in text
    assert "10 steps of 8" in text and "before it: -1.000" in text and "Weights: 9.9 MiB" not in text
    assert '(`mmsynth train clip --config c.yaml`; options set: {"freeze_text": true}; lr 0.0001)' in text
    assert f"On val (`mmsynth bench components --model {out} --n 4 --split val --seed 7`): " in text
    shipped_metrics = json.loads((out / "metrics_components.json").read_text())
    assert shipped_metrics["model"] == str(out) and shipped_metrics["clip_val"]["seed"] == 7
    assert shipped_metrics["clip_val"]["split"] == "val" and shipped_metrics["clip"]["split"] == "test"
    assert not (tmp_path / ".zoo.shipping").exists()
    # shipped again: not better than itself, so refused and nothing changes
    before = (out / "README.md").read_text()
    with pytest.raises(SystemExit, match="does not beat the shipped"):
        ship.main(args)
    assert (out / "README.md").read_text() == before and not (tmp_path / ".zoo.shipping").exists()
    with torch.no_grad():  # a run that moved the text tower would silently change every UNet figure
        bundle.clip.text_model.final_layer_norm.bias.add_(1.0)
    save_components(run / "final", clip=bundle.clip)
    with pytest.raises(SystemExit, match="is not the bundle's text encoder"):
        ship.main([*args, "--allow-worse"])


def test_a_clip_stage_ships_only_if_it_beats_the_shipped_one_and_reaches_the_floor():
    ship = _ship_clip()
    assert ship.refusal(0.896, 0.895) is None and ship.refusal(0.5, None) is None
    assert "does not beat the shipped 0.895" in ship.refusal(0.895, 0.895)
    assert ship.refusal(0.895, 0.896, allow_worse=True) is None
    assert "below --at-least 0.900" in ship.refusal(0.896, 0.895, at_least=0.90)
    assert "below --at-least" in ship.refusal(0.896, 0.895, at_least=0.90, allow_worse=True)  # a floor stays
    assert ship.refusal(0.901, 0.895, at_least=0.90) is None
    assert "adds 2,048 bytes" in ship.weight_refusal(2048, None) and ship.weight_refusal(0, None) is None
    assert ship.weight_refusal(2048, 0.90) is None and ship.weight_refusal(2048, None, allow_worse=True) is None


def test_a_heavier_clip_stage_is_refused_unmeasured_unless_it_names_what_it_must_earn(tmp_path):
    import torch

    from mmsynth.models.bundle import save_components
    from mmsynth.models.grow import deepen_vision_tower
    from mmsynth.models.zoo import tiny_bundle

    ship = _ship_clip()
    bundle, out = tiny_bundle(seed=4), tmp_path / "zoo"
    bundle.save_pretrained(out, dtype=torch.float16)  # as the zoo ships, so one more layer weighs more
    run = tmp_path / "runs" / "clip_deeper"
    layers = bundle.clip.config.vision_config.num_hidden_layers
    save_components(run / "final", dtype=torch.float16, clip=deepen_vision_tower(bundle.clip, layers + 1, where="test"))
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(SystemExit, match=r"adds .* bytes of weights .* pass --at-least"):
        ship.main(["--run", str(run), "--out", str(out), "--n", "4", "--reports", str(tmp_path / "reports")])
    assert sorted(p.name for p in out.rglob("*")) == before and not (tmp_path / ".zoo.shipping").exists()
    assert not (tmp_path / "reports" / "components.json").exists()  # refused before it was measured


def test_shipping_a_clip_stage_refreshes_the_parts_table_the_card_quotes():
    ship = _ship_clip()
    card = "## Training\n\nx, as follows:\n\n\n| part |\n| old row |\n\nnote\n\n\nReproduce: `bash`\n\n### configs\n"
    new = ship.rewrite_parts_table(card, ["", "| part |", "| old row |", "| new row |", "", "note", ""])
    assert "| old row |\n| new row |\n\nnote\n\n\nReproduce: `bash`\n\n### configs\n" in new
    assert new.startswith("## Training\n\nx, as follows:\n\n\n| part |")  # as ship_zoo writes it
    assert ship.rewrite_parts_table("## Training\n\nno quote\n", ["| row |"]) == "## Training\n\nno quote\n"


def test_a_clip_stage_card_quotes_the_val_figure_before_it_where_the_shipped_metrics_have_it():
    ship = _ship_clip()
    record = {"folder": "runs/c", "config": "batch_size: 8\n", "step": 10}
    before = {"top1_consistent": {"value": 0.878, "ci95": [0.856, 0.897]}}
    val = {"top1_consistent": {"value": 0.86, "ci95": [0.837, 0.88]}, "seed": 7}
    assert "before it: 0.878 (95% CI 0.856..0.897), 0.860 on val." in ship.clip_record(record, {}, before, "c", val)
    assert "before it: 0.878 (95% CI 0.856..0.897)." in ship.clip_record(record, {}, before, "c")


def test_a_clip_soup_averages_the_vision_towers_and_keeps_the_text_tower(tmp_path):
    import json

    import torch

    from mmsynth.errors import InputError
    from mmsynth.models.bundle import load_component, save_components
    from mmsynth.models.zoo import tiny_bundle

    soup = _script("soup_clip")
    bundle = tiny_bundle(seed=4)
    runs = []
    for k, shift in enumerate([1.0, 3.0]):  # two vision-side stages from one start
        clip = tiny_bundle(seed=4).clip
        with torch.no_grad():
            clip.vision_model.post_layernorm.bias.add_(shift)
        runs.append(str(save_components(tmp_path / f"run{k}", clip=clip, text_encoder=bundle.text_encoder,
                                        tokenizer=bundle.tokenizer)))  # fmt: skip
    out = tmp_path / "soup"
    assert soup.main(["--runs", *runs, "--out", str(out)]) == 0
    mixed = load_component(out, "clip")
    start = bundle.clip.vision_model.post_layernorm.bias
    assert torch.allclose(mixed.vision_model.post_layernorm.bias, start + 2.0, atol=1e-3)  # fp32 mean of 1 and 3
    assert torch.equal(mixed.text_model.final_layer_norm.bias, bundle.clip.text_model.final_layer_norm.bias)
    assert json.loads((out / "soup.json").read_text()) == {"method": "uniform", "kept": runs}
    assert load_component(out, "tokenizer") is not None and load_component(out, "text_encoder") is not None
    # greedy: the first ingredient is the better one alone; the second is kept only if the mean scores higher
    assert soup.main(["--runs", *runs, "--out", str(tmp_path / "greedy"), "--greedy", "--n", "4"]) == 0
    record = json.loads((tmp_path / "greedy" / "soup.json").read_text())
    assert set(record["alone"]) == set(runs) and record["split"] == "val" and len(record["steps"]) == 1
    assert record["steps"][0]["kept"] == (record["steps"][0]["score"] > max(record["alone"].values()))
    assert len(record["kept"]) == 1 + record["steps"][0]["kept"]
    # a stage that moved the text tower (the UNet's text encoder) is refused
    moved = tiny_bundle(seed=4).clip
    with torch.no_grad():
        moved.text_model.final_layer_norm.bias.add_(1.0)
    save_components(tmp_path / "moved", clip=moved)
    with pytest.raises(InputError, match="text tower differs"):
        soup.main(["--runs", runs[0], str(tmp_path / "moved"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_mine_clip_negatives_writes_a_table_the_clip_recipe_reads_and_refuses_bad_numbers(tmp_path):
    from mmsynth.errors import InputError
    from mmsynth.models.zoo import tiny_bundle
    from mmsynth.train.mining import load_table

    mine = _script("mine_clip_negatives")
    model = tmp_path / "tiny"
    tiny_bundle(seed=2).save_pretrained(model)
    out = tmp_path / "t.npz"
    assert mine.main(["--model", str(model), "--seed", "3", "--sources", "16", "--batch-size", "8", "--out",
                      str(out)]) == 0  # fmt: skip
    table = load_table(out)
    assert table["neighbours"].shape == (16, 2) and (table["seed"], table["block"]) == (3, 2)
    with pytest.raises(InputError, match=r"--batch-size must be a multiple of --group \+ --per-source \(4\), got 10"):
        mine.main(["--model", str(model), "--seed", "3", "--batch-size", "10", "--out", str(tmp_path / "b.npz")])
    with pytest.raises(InputError, match="--sources must be >= 1, got 0"):
        mine.main(["--model", str(model), "--seed", "3", "--sources", "0", "--out", str(tmp_path / "b.npz")])
    assert not (tmp_path / "b.npz").exists()
