"""The shipped Shapes zoo (models/shapes-v1): fits the weight budget, loads with diffusers' own pipeline, draws
what it is asked. Skipped only while the folder does not exist (before the first `mmsynth zoo ship t2i`)."""

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "shapes-v1"
pytestmark = pytest.mark.skipif(not ZOO.exists(), reason="models/shapes-v1 is not shipped yet (mmsynth zoo ship t2i)")

SINGLE_OBJECTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a purple cross",
    "an orange circle",
    "a cyan square",
    "a pink triangle",
)


@pytest.fixture(scope="module")
def zoo():
    from mmsynth.models.bundle import Bundle

    return Bundle.from_pretrained(ZOO)


def test_all_shipped_weights_fit_the_budget_and_the_bundle_is_float16():
    from safetensors import safe_open

    # DEVELOPERS.md: all tracked weights at most 56 MiB (the whole tree 60 MiB: the device tool carries 64)
    total = sum(f.stat().st_size for f in (ROOT / "models").rglob("*.safetensors"))
    assert total <= 56 * 2**20, f"shipped weights take {total / 2**20:.1f} MiB (budget 56 MiB)"
    for f in ZOO.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            assert {str(st.get_slice(k).get_dtype()) for k in st.keys()} == {"F16"}, f  # noqa: SIM118


def test_model_card_gives_each_bar_with_the_command_that_measured_it():
    card = (ZOO / "README.md").read_text(encoding="utf-8")
    for needed in ("mmsynth bench run --suite t2i", "mmsynth bench components", "PSNR", "retrieval",
                   "single object", "binding", "count", "relation", "held-out", "cfg_sweep.png"):  # fmt: skip
        assert needed in card, needed
    assert (ZOO / "cfg_sweep.png").exists()
    for metrics in ZOO.glob("metrics_*.json"):  # the measured model is named as shipped, not by a temporary folder
        assert ".shipping" not in metrics.read_text(encoding="utf-8"), metrics.name


def test_diffusers_pipeline_and_our_sampler_draw_the_same_images_from_the_shipped_files(zoo):
    from diffusers import StableDiffusionPipeline

    from mmsynth.sample import GenerationRequest, sample
    from mmsynth.sample.schedulers import make_scheduler

    prompt, steps, cfg = "two red circles left of a blue square", 10, 5.0
    ours = sample(zoo, GenerationRequest(prompt=prompt, n=2, seed=3, steps=steps, cfg=cfg),
                  progress=False)  # fmt: skip
    # no torch_dtype: the fp16-stored files come out float32 in every component, as the model card says
    pipe = StableDiffusionPipeline.from_pretrained(ZOO, safety_checker=None, requires_safety_checker=False)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler)  # the request's default scheduler
    gens = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    theirs = pipe([prompt] * 2, num_inference_steps=steps, guidance_scale=cfg, generator=gens, output_type="np").images
    theirs = (np.clip(theirs, 0, 1) * 255).round().astype(np.uint8)
    assert np.abs(theirs.astype(int) - np.stack(ours.images).astype(int)).max() <= 2


def test_the_shipped_zoo_draws_the_prompted_colour_and_some_whole_objects(zoo):
    """shapes-v1 is below its bars (model card): colours follow the prompt and most single objects come out
    whole (0.980 pass in the bench at n=500); this guards what it reaches, against chance (1/8 per colour)."""
    from mmsynth.evaluate import judge_image
    from mmsynth.evaluate.detect import detect_objects
    from mmsynth.sample import GenerationRequest, sample

    req = GenerationRequest(prompt=list(SINGLE_OBJECTS), n=len(SINGLE_OBJECTS), seed=0, steps=25, cfg=5.0)
    images = sample(zoo, req, progress=False).images
    colours = [any(o.color == p.split()[1] for o in detect_objects(img)) for img, p in zip(images, SINGLE_OBJECTS)]
    passed = [judge_image(img, prompt=p).passed for img, p in zip(images, SINGLE_OBJECTS)]
    assert sum(colours) >= 7, dict(zip(SINGLE_OBJECTS, colours))
    assert sum(passed) >= 3, dict(zip(SINGLE_OBJECTS, passed))


# (component, category, n, metric, bound, gain): on n cases the figure must pass `bound` (a floor, or a ceiling for
# a metric where lower is better: the curve's LOWER_IS_BETTER, palette error) and beat the prompt alone by `gain` (a
# difference; for a lower-is-better metric a ratio). Depth is judged on more cases, by outlines: a flat image shows
# depth only where objects overlap.
SHIPPED_CONTROLS = [
    ("controlnet_canny", "canny", 6, "canny_f1", 0.45, 0.25),
    ("controlnet_segmentation", "segmentation", 6, "segmentation_miou", 0.6, 0.25),
    ("adapter_palette", "palette", 6, "palette_error", 15.0, 0.5),
    ("adapter_depth", "depth", 16, "depth_order_contour", 0.5, 0.15),
    ("adapter_sketch", "sketch", 6, "sketch_ssim", 0.65, 0.15),
]


@pytest.mark.parametrize(("component", "category", "n", "metric", "bound", "gain"), SHIPPED_CONTROLS)
def test_the_shipped_controls_control(zoo, component, category, n, metric, bound, gain):
    """Each shipped ControlNet and T2I-Adapter, on control-suite cases (test split) its card did not use (seed 7):
    its figure well past the prompt alone's on the same seeds (the cards, n=300, seed 5, are the measurement)."""
    from mmsynth.evaluate.bench import RunContext, SamplerSettings, generate_shard, get_suite, make_cases
    from mmsynth.evaluate.bench.cases import keep_categories
    from mmsynth.evaluate.ship.curve import LOWER_IS_BETTER

    assert component in zoo.extras
    suite = get_suite("control")
    cases = keep_categories(make_cases("control", n, seed=7), category)
    ctx = RunContext(bundle_obj=zoo, sampler=SamplerSettings(steps=20, cfg=3.0), progress=False)
    figures = {}
    for row in ("no_control", component):
        images = [img for _, img in generate_shard(ctx, suite.rows[row], cases)]
        figures[row] = suite.score(ctx, cases, images, []).metrics[metric].value
    if metric in LOWER_IS_BETTER:  # palette error: under the ceiling and at most `gain` of the prompt alone's
        assert figures[component] <= bound and figures[component] <= gain * figures["no_control"], figures
    else:
        assert figures[component] >= bound and figures[component] >= figures["no_control"] + gain, figures
