"""`mmsynth zoo ship t2i|clip|inpainting`: the card's bookkeeping (a UNet fine-tuned from a shipped bundle is carded
with the steps and wall time of the weights it started from), the refusals, and shipments into tiny bundles."""

import re

import pytest

from mmsynth.cli.main import main
from mmsynth.evaluate.ship import clip as clip_ship
from mmsynth.evaluate.ship import common, inpainting, t2i

CARD = """# earlier
| model | steps | batch | examples seen | precision | data | wall time (logged) | last logged |
|---|---|---|---|---|---|---|---|
| t2i | 13200 | 64 | 844800 | bf16 | runs/latents | 7.38 h | loss 0.01711 |
"""


def test_a_fine_tuning_run_names_its_base_and_the_base_card_gives_its_steps(tmp_path):
    ship = common
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
    assert "base" not in common.training_record(run, "t2i")


def test_the_card_the_run_kept_when_it_began_wins_over_the_reshipped_base(tmp_path):
    ship = common
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

    ship = common
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
    card = t2i.model_card(tmp_path / "zoo", [rec], {}, {"results": {"t2i": {}}}, None,
                           {"t2i": "t2i cmd", "components": "components cmd"})  # fmt: skip
    assert "| t2i | 19200 |" in card and "grown first to (1, 2, 2) transformer layers" in card
    assert "--bundle " + str(runs / "t2i_deep") + "/final" in card


def test_a_clip_shipped_with_the_bundle_must_keep_its_text_encoder(tmp_path, capsys):
    import torch

    from mmsynth.errors import InputError
    from mmsynth.models.bundle import save_components
    from mmsynth.models.zoo import tiny_bundle

    ship = common
    bundle = tiny_bundle(seed=0)
    bundle.save_pretrained(tmp_path / "zoo")
    with torch.no_grad():  # a vision-side run (options.freeze_text) moves only the vision tower
        bundle.clip.vision_model.post_layernorm.bias.add_(1.0)
    save_components(tmp_path / "vision", clip=bundle.clip)
    ship.check_same_text_tower(tmp_path / "zoo", tmp_path / "vision")
    with torch.no_grad():
        bundle.clip.text_model.final_layer_norm.bias.add_(1.0)
    save_components(tmp_path / "text_moved", clip=bundle.clip)
    with pytest.raises(InputError, match="is not the bundle's text encoder"):
        ship.check_same_text_tower(tmp_path / "zoo", tmp_path / "text_moved")
    # a bundle whose text encoder trained with the UNet still carries the old CLIP: refused before any bench
    bundle.save_pretrained(tmp_path / "joint")  # its CLIP's text tower moved, its text encoder did not
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["zoo", "ship", "t2i", "--bundle", str(tmp_path / "joint"), "--out", str(tmp_path / "shipped"),
                 "--runs", str(tmp_path), "--no-parts", "--reports", str(tmp_path / "reports")]) == 2
    assert "options.text_encoder=BUNDLE" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out, no reports, no temporary folder


def test_shipping_the_inpainting_unet_updates_the_bundle_card(tmp_path):
    ship = inpainting
    bundle = tmp_path / "b"
    (bundle / "unet_inpainting").mkdir(parents=True)
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2**19, dtype=torch.float16)}, str(bundle / "unet_inpainting" / "w.safetensors"))
    (bundle / "README.md").write_text("# zoo\n\nintro\n\nWeights: 17.9 MiB of safetensors (F16).\n\n## Quality\n\nx\n")
    ship.update_bundle_card(bundle)
    ship.update_bundle_card(bundle)  # idempotent
    text = (bundle / "README.md").read_text()
    assert "Weights: 1.0 MiB of safetensors (F16)." in text
    assert text.count("unet_inpainting/README.md") == 1 and text.index("unet_inpainting/") < text.index("## Quality")
    old = text.replace("(`mmsynth zoo ship inpainting`)", "(scripts/ship_inpainting.py)")  # a note an older tool wrote
    (bundle / "README.md").write_text(old)
    ship.update_bundle_card(bundle)
    assert (bundle / "README.md").read_text() == text  # replaced, not added beside
    rows = ship.ROWS.split(",")  # a bench report as `mmsynth bench run --json` writes it (results.py)
    report = {"results": {"edit": {r: {"inpaint_inside_acc": 0.5, "inpaint_outside_psnr": 100.0} for r in rows}},
              "intervals": {"edit": {r: {"inpaint_inside_acc": [0.4, 0.6]} for r in rows}},
              "rows": {"edit": {r: {"n_cases": 200} for r in rows}}}  # fmt: skip
    card = ship.card({"folder": "runs/inpaint", "step": 1500, "batch_size": 32, "config": "recipe: inpaint"},
                     report, "mmsynth bench run ...", "models/shapes-v1")
    assert "| inpaint_unet | 200 | 0.500 [0.400, 0.600] | 100.000 | n/a |" in card and "recipe: inpaint" in card


def _leftovers(folder) -> list:
    """Temporary folders a shipment would have left beside its bundle."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def _ship(part: str, *args: str) -> int:
    return main(["zoo", "ship", part, *args])


def test_shipping_a_vision_side_clip_run_replaces_clip_and_the_card_components_only(tmp_path, capsys):
    import json

    import torch

    from mmsynth.models.bundle import load_component, save_components
    from mmsynth.models.zoo import tiny_bundle

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
    args = ["--run", str(run), "--out", str(out), "--n", "4", "--reports", str(tmp_path / "reports"), "--no-parts"]
    assert _ship("clip", *args, "--val-seed", "7", "--command", "mmsynth train clip --config c.yaml") == 0
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
    assert not _leftovers(tmp_path)
    # shipped again: its reports exist, so refused before any work without --overwrite
    capsys.readouterr()
    before = (out / "README.md").read_text()
    assert _ship("clip", *args) == 2 and "components.json' already exists" in capsys.readouterr().err
    # and with it: not better than itself, so refused and nothing changes
    assert _ship("clip", *args, "--overwrite") == 2 and "does not beat the shipped" in capsys.readouterr().err
    assert (out / "README.md").read_text() == before and not _leftovers(tmp_path)
    with torch.no_grad():  # a run that moved the text tower would silently change every UNet figure
        bundle.clip.text_model.final_layer_norm.bias.add_(1.0)
    save_components(run / "final", clip=bundle.clip)
    assert _ship("clip", *args, "--allow-worse", "--overwrite") == 2
    assert "is not the bundle's text encoder" in capsys.readouterr().err


def test_a_clip_stage_ships_only_if_it_beats_the_shipped_one_and_reaches_the_floor():
    ship = clip_ship
    assert ship.refusal(0.896, 0.895) is None and ship.refusal(0.5, None) is None
    assert "does not beat the shipped 0.895" in ship.refusal(0.895, 0.895)
    assert ship.refusal(0.895, 0.896, allow_worse=True) is None
    assert "below --at-least 0.900" in ship.refusal(0.896, 0.895, at_least=0.90)
    assert "below --at-least" in ship.refusal(0.896, 0.895, at_least=0.90, allow_worse=True)  # a floor stays
    assert ship.refusal(0.901, 0.895, at_least=0.90) is None
    assert "adds 2,048 bytes" in ship.weight_refusal(2048, None) and ship.weight_refusal(0, None) is None
    assert ship.weight_refusal(2048, 0.90) is None and ship.weight_refusal(2048, None, allow_worse=True) is None


def test_a_heavier_clip_stage_is_refused_unmeasured_unless_it_names_what_it_must_earn(tmp_path, capsys):
    import torch

    from mmsynth.models.bundle import save_components
    from mmsynth.models.grow import deepen_vision_tower
    from mmsynth.models.zoo import tiny_bundle

    bundle, out = tiny_bundle(seed=4), tmp_path / "zoo"
    bundle.save_pretrained(out, dtype=torch.float16)  # as the zoo ships, so one more layer weighs more
    run = tmp_path / "runs" / "clip_deeper"
    layers = bundle.clip.config.vision_config.num_hidden_layers
    save_components(run / "final", dtype=torch.float16, clip=deepen_vision_tower(bundle.clip, layers + 1, where="test"))
    before = sorted(p.name for p in out.rglob("*"))
    assert _ship("clip", "--run", str(run), "--out", str(out), "--n", "4", "--reports", str(tmp_path / "reports"),
                 "--no-parts") == 2
    assert re.search(r"adds .* bytes of weights .* pass --at-least", capsys.readouterr().err)
    assert sorted(p.name for p in out.rglob("*")) == before and not _leftovers(tmp_path)
    assert not (tmp_path / "reports" / "components.json").exists()  # refused before it was measured


def test_shipping_a_clip_stage_refreshes_the_parts_table_the_card_quotes():
    ship = clip_ship
    card = "## Training\n\nx, as follows:\n\n\n| part |\n| old row |\n\nnote\n\n\nReproduce: `bash`\n\n### configs\n"
    new = ship.rewrite_parts_table(card, ["", "| part |", "| old row |", "| new row |", "", "note", ""])
    assert "| old row |\n| new row |\n\nnote\n\n\nReproduce: `bash`\n\n### configs\n" in new
    assert new.startswith("## Training\n\nx, as follows:\n\n\n| part |")  # as the t2i shipment writes it
    assert ship.rewrite_parts_table("## Training\n\nno quote\n", ["| row |"]) == "## Training\n\nno quote\n"


def test_a_clip_stage_card_quotes_the_val_figure_before_it_where_the_shipped_metrics_have_it():
    ship = clip_ship
    record = {"folder": "runs/c", "config": "batch_size: 8\n", "step": 10}
    before = {"top1_consistent": {"value": 0.878, "ci95": [0.856, 0.897]}}
    val = {"top1_consistent": {"value": 0.86, "ci95": [0.837, 0.88]}, "seed": 7}
    assert "before it: 0.878 (95% CI 0.856..0.897), 0.860 on val." in ship.clip_record(record, {}, before, "c", val)
    assert "before it: 0.878 (95% CI 0.856..0.897)." in ship.clip_record(record, {}, before, "c")


def test_shipping_a_t2i_bundle_measures_it_cards_it_and_keeps_the_inpainting_unet(tmp_path, capsys):
    import json
    import shutil

    import torch

    from mmsynth.models.zoo import tiny_bundle

    runs = tmp_path / "runs"
    tiny_bundle(seed=1).save_pretrained(runs / "t2i" / "final", dtype=torch.float16)
    (runs / "t2i" / "config.yaml").write_text("recipe: t2i\nbatch_size: 4\nmixed_precision: 'no'\n")
    (runs / "t2i" / "log.csv").write_text("step,sec_per_step,loss\n10,3.6,0.5\n")
    (runs / "t2i" / "summary.json").write_text('{"step": 10}')
    out, reports = tmp_path / "zoo", tmp_path / "reports"
    parts = tmp_path / "parts.md"
    parts.write_text("# parts\n\n## How they were trained\n\n| part | steps |\n| clip | 7 |\n\n## Other\n\nx\n")
    args = ["--bundle", str(runs / "t2i" / "final"), "--out", str(out), "--runs", str(runs), "--parts", str(parts),
            "--reports", str(reports), "--n", "1", "--sweep-n", "1", "--components-n", "2"]
    assert _ship("t2i", *args, "--cfg", "1") == 0
    card = (out / "README.md").read_text()
    assert f"`mmsynth bench run --suite t2i --n 1 --seed 1 --model {out} --rows ground_truth,vae_ceiling,t2i`" in card
    assert "--sweep cfg=1`" in card and (out / "cfg_sweep.png").is_file() and "| clip | 7 |" in card
    assert "| t2i | 10 | 4 | 40 |" in card and "0.01 h" in card  # 10 steps of 3.6 s, from the run's log
    assert f"mmsynth zoo ship t2i --bundle {runs / 't2i'}/final" in card
    for name in ("t2i", "cfg_sweep", "components"):
        metrics = (out / f"metrics_{name}.json").read_text()
        assert ".tmp-" not in metrics  # the staging folder measured is named as shipped
    assert json.loads((out / "metrics_components.json").read_text())["model"] == str(out)
    assert (reports / "t2i.json").is_file() and not _leftovers(tmp_path)
    # reshipped: --out exists, so refused before any work unless --overwrite; a shipped inpainting UNet stays
    shutil.copytree(out / "unet", out / "unet_inpainting")
    capsys.readouterr()
    assert _ship("t2i", *args) == 2 and f"--out '{out}' already exists" in capsys.readouterr().err
    assert _ship("t2i", *args, "--overwrite", "--no-sweep") == 0
    card = (out / "README.md").read_text()
    assert (out / "unet_inpainting" / "config.json").is_file() and "`mmsynth zoo ship inpainting`" in card
    assert "## Classifier-free guidance scale" not in card and not _leftovers(tmp_path)


def test_an_inpainting_shipment_refuses_a_plain_unet_and_an_existing_one_without_overwrite(tmp_path, capsys):
    import shutil

    from mmsynth.models.zoo import tiny_bundle

    out, run = tmp_path / "zoo", tmp_path / "runs" / "inpaint"
    tiny_bundle(seed=0).save_pretrained(out)
    shutil.copytree(out / "unet", run / "final" / "unet")
    assert _ship("inpainting", "--run", str(run), "--out", str(out)) == 2
    assert "is not an inpainting UNet (in_channels != 9)" in capsys.readouterr().err
    shutil.copytree(out / "unet", out / "unet_inpainting")
    assert _ship("inpainting", "--run", str(tmp_path / "nothing"), "--out", str(out)) == 2
    assert "train with `mmsynth train inpaint`" in capsys.readouterr().err
    config = run / "final" / "unet" / "config.json"
    config.write_text(config.read_text().replace('"in_channels": 4', '"in_channels": 9'))
    assert _ship("inpainting", "--run", str(run), "--out", str(out)) == 2
    assert "already has unet_inpainting/ (pass --overwrite" in capsys.readouterr().err
    assert not _leftovers(tmp_path)


def test_zoo_ship_explains_itself_and_refuses_options_of_two_minds(capsys):
    assert main(["zoo", "ship", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(part in text for part in ("t2i", "clip", "inpainting", "--reports"))
    assert main(["zoo", "ship"]) == 2  # no part: the usage
    assert _ship("t2i", "--cfg", "1,3", "--no-sweep") == 2 and "--no-sweep, not both" in capsys.readouterr().err
    assert _ship("t2i", "--parts", "x.md", "--no-parts") == 2 and "--no-parts, not both" in capsys.readouterr().err
    assert _ship("t2i", "--cfg", "1,,3") == 2 and "--cfg" in capsys.readouterr().err


def test_shipping_an_inpainting_unet_benches_it_cards_it_and_points_the_bundle_card_at_it(tmp_path, capsys):
    from mmsynth.models.zoo import tiny_bundle
    from mmsynth.train.recipes.inpaint import inpainting_unet

    bundle, out, run = tiny_bundle(seed=0), tmp_path / "zoo", tmp_path / "runs" / "inpaint"
    bundle.save_pretrained(out)
    (out / "README.md").write_text("# zoo\n\nWeights: 9.9 MiB of safetensors (F16).\n\n## Quality\n\nq\n")
    inpainting_unet(bundle.unet).save_pretrained(run / "final" / "unet")
    (run / "config.yaml").write_text("recipe: inpaint\nbatch_size: 2\n")
    args = ["--run", str(run), "--out", str(out), "--n", "1", "--reports", str(tmp_path / "reports")]
    assert _ship("inpainting", *args) == 0
    card = (out / "unet_inpainting" / "README.md").read_text()
    assert f"`mmsynth bench run --suite edit --categories inpaint --n 1 --seed 3 --model {out} --rows " in card
    assert "| inpaint_unet | 1 | " in card and "recipe: inpaint" in card
    assert "`mmsynth zoo ship inpainting`" in (out / "README.md").read_text()
    assert (out / "unet_inpainting" / "config.json").is_file() and not _leftovers(tmp_path)
