"""Text -> layout planners: the Shapes planner makes every dataset caption true, the LLM planner's prompt and parser,
and the clear errors of both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsynth.data import vocab
from mmsynth.data.captions import caption_true_of, captions
from mmsynth.data.geometry import box_center
from mmsynth.data.scene import RELATION_MARGIN, sample_scene
from mmsynth.errors import InputError
from mmsynth.sample.layout import MAX_BOXES, Layout
from mmsynth.sample.planning import (
    LLM_FRAME,
    LLMPlanner,
    ShapesPlanner,
    format_llm_objects,
    get_planner,
    llm_examples,
    llm_prompt,
    parse_llm_layout,
    planned_scene,
)


def _centre(box: list[float]) -> tuple[float, float]:
    return box_center(tuple(box))


# ------------------------------------------------------------------------------------------ shapes planner


def test_shapes_planner_makes_every_dataset_caption_true():
    """Counts, colours, shapes, stated sizes and relations, over the captions of 200 test scenes."""
    planner = ShapesPlanner()
    texts = [c for i in range(200) for c in captions(sample_scene("test", i))]
    failed = [c for k, c in enumerate(texts) if not caption_true_of(c, planned_scene(planner.plan(c, seed=k)))]
    assert not failed, failed[:5]


def test_layout_boxes_are_the_objects_boxes_and_look_like_the_datasets():
    layout = ShapesPlanner().plan("two small red circles left of a large blue square", seed=4)
    assert layout.prompt == "two small red circles left of a large blue square"
    assert layout.phrases == ["red circle", "red circle", "blue square"]
    scene = planned_scene(layout)
    assert layout.boxes == [list(o.box()) for o in scene.objects]
    assert [o.size for o in scene.objects] == ["small", "small", "large"]
    assert layout.extra["planner"] == "shapes" and layout.extra["seed"] == 4
    lo, hi = vocab.SIZE_RADIUS["small"]
    for box in layout.boxes[:2]:  # a circle's box is its diameter
        assert 2 * lo - 1e-3 <= box[2] - box[0] <= 2 * hi + 1e-3
    square = (_centre(layout.boxes[2]))
    for box in layout.boxes[:2]:  # the relation holds on the layout's own boxes, by the dataset's margin
        assert square[0] - _centre(box)[0] > RELATION_MARGIN
    for o in scene.objects:  # inside the image with the dataset's margin
        assert o.radius + 0.02 <= min(o.cx, o.cy) and max(o.cx, o.cy) <= 1 - o.radius - 0.02


def test_planning_is_deterministic_per_prompt_and_seed_and_varies_with_the_seed():
    planner, prompt = ShapesPlanner(), "a red circle above a green star"
    assert planner.plan(prompt, seed=7).boxes == planner.plan(prompt, seed=7).boxes
    layouts = {tuple(map(tuple, planner.plan(prompt, seed=s).boxes)) for s in range(10)}
    assert len(layouts) == 10
    # sizes the caption leaves open are drawn, like the dataset's: both appear
    sizes = {planned_scene(planner.plan("a red circle", seed=s)).objects[0].size for s in range(20)}
    assert sizes == set(vocab.SIZES)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a red dog", "Shapes caption grammar (e.g. 'two red circles left of a blue square'"),
        ("a red dog", "expected a shape"),
        ("", "non-empty"),
        ("   ", "non-empty"),
        ("!!!", "found no objects"),
        ("a red circle left of the red circle", "left of itself"),
        ("four large red circles left of a large blue square", "could not place"),
        ("a red circle left of a blue square, with the blue square left of the red circle", "could not place"),
    ],
)
def test_shapes_planner_errors_are_clear(prompt, message):
    with pytest.raises(InputError) as info:
        ShapesPlanner().plan(prompt)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "3", True])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(InputError, match="seed"):
        ShapesPlanner().plan("a red circle", seed=seed)


def test_planned_scene_needs_the_shapes_planners_objects():
    with pytest.raises(InputError, match="only the shapes planner"):
        planned_scene(Layout.from_lists([[0, 0, 1, 1]], ["red circle"]))


def test_get_planner():
    assert isinstance(get_planner("shapes"), ShapesPlanner) and get_planner("shapes").name == "shapes"
    for spec, message in [("gpt", "planner 'gpt' is not one of: shapes"), ("llm:", "needs a model folder"),
                          ("llm:/nonexistent/model", "'/nonexistent/model' does not exist"), ("", "is not one of")]:
        with pytest.raises(InputError, match=message):
            get_planner(spec)


# ------------------------------------------------------------------------------------------ LLM planner


def test_the_in_context_examples_are_exact():
    """The Shapes examples shown to the LLM come from the shapes planner: their boxes satisfy their captions."""
    shapes = [e for e in llm_examples() if "plain background" in e[2]]
    assert len(shapes) >= 2
    for caption, objects, _ in shapes:
        layout = parse_llm_layout(f"Objects: {objects}", caption)
        parsed = ShapesPlanner().plan(caption, seed=0)
        assert layout.phrases == parsed.phrases
        assert np.allclose(layout.boxes, parsed.boxes, atol=1.5 / LLM_FRAME)  # the pixel frame rounds


def test_prompt_holds_instructions_examples_and_the_caption():
    text = llm_prompt("  a yellow cross below a cyan star ")
    assert text.endswith("Caption: a yellow cross below a cyan star\nObjects:")
    assert "512x512" in text and "[top-left x coordinate, top-left y coordinate, box width, box height]" in text
    for caption, objects, background in llm_examples():
        assert f"Caption: {caption}\nObjects: {objects}\nBackground prompt: {background}" in text
    assert format_llm_objects(Layout.from_lists([[0.25, 0.5, 0.5, 1.0]], ["red circle"])) == \
        "[('red circle', [128, 256, 128, 256])]"  # fmt: skip


def test_parse_good_output():
    text = ("[('red circle', [51, 100, 102, 128]), ('blue square', [300, 90, 150, 150])]\n"
            "Background prompt: a plain background\nNegative prompt:")  # fmt: skip
    layout = parse_llm_layout(text, "a red circle left of a blue square")
    assert layout.phrases == ["red circle", "blue square"]
    assert np.allclose(layout.boxes[0], [51 / 512, 100 / 512, 153 / 512, 228 / 512], atol=1e-4)
    assert layout.prompt == "a red circle left of a blue square"
    assert layout.extra["background"] == "a plain background" and layout.extra["raw"] == text


def test_parse_messy_output():
    text = ('Sure! Objects: [("a Red circle", [ -20, 10.5, 100,120 ]), (\'the blue square\',[400, 400, 300, 300]),'
            " ('ghost', [10, 10, 0, 50]), ('red circle', [600, 600, 10, 10]), ('green star' [1, 2, 3\n"
            "\nCaption: two red circles\nObjects: [('red circle', [1, 2, 3, 4])]")  # fmt: skip
    layout = parse_llm_layout(text)
    # articles dropped, boxes clipped to the image, degenerate and outside boxes dropped, the next example ignored
    assert layout.phrases == ["Red circle", "blue square"]
    assert layout.boxes[0] == [0.0, round(10.5 / 512, 4), round(80 / 512, 4), round(130.5 / 512, 4)]
    assert layout.boxes[1] == [round(400 / 512, 4), round(400 / 512, 4), 1.0, 1.0]
    # unquoted names, a colon, fractions of the image
    bare = parse_llm_layout("red circle: [0.1, 0.2, 0.3, 0.4]\nblue square: [0.5, 0.5, 0.25, 0.25]")
    assert bare.phrases == ["red circle", "blue square"] and bare.extra["frame"] == "fraction"
    assert np.allclose(bare.boxes, [[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.75, 0.75]])
    many = parse_llm_layout(", ".join(f"('dot', [{i}, {i}, 5, 5])" for i in range(40)))
    assert len(many.objects) == MAX_BOXES and many.extra["dropped"] == 40 - MAX_BOXES


@pytest.mark.parametrize("text", ["", "I cannot do that.", "Objects: []", "[('red circle', [10, 10, -5, 30])]",
                                  "('box', [1, 2, 3, 4])"])  # fmt: skip
def test_parse_nothing_valid_is_a_clear_error(text):
    with pytest.raises(InputError, match="the planner's output does not parse") as info:
        parse_llm_layout(text)
    assert "\n" not in str(info.value)


def test_parse_error_shortens_long_output():
    with pytest.raises(InputError) as info:
        parse_llm_layout("blah " * 500)
    assert len(str(info.value)) < 300 and "..." in str(info.value)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random 1-layer GPT-2 and a byte-level BPE tokenizer trained on the planner's prompt, saved offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([llm_prompt("a red circle left of a blue square")], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=2048, n_embd=32, n_layer=1, n_head=2, bos_token_id=eos,
                     eos_token_id=eos)  # fmt: skip
    path = tmp_path_factory.mktemp("llm") / "tiny-gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_llm_planner_runs_a_local_model_and_refuses_its_random_output(tiny_llm):
    planner = LLMPlanner(tiny_llm, max_new_tokens=24)
    assert planner.name == "llm"
    text = planner.prompt_for("a red circle left of a blue square")
    assert text == llm_prompt("a red circle left of a blue square")
    out = planner.generate("a red circle left of a blue square")
    assert out == planner.generate("a red circle left of a blue square")  # greedy: deterministic
    with pytest.raises(InputError, match="the planner's output does not parse: ") as info:
        planner.plan("a red circle left of a blue square")
    assert "\n" not in str(info.value)


def test_llm_planner_parses_what_the_model_says(tiny_llm, monkeypatch):
    planner = get_planner(f"llm:{tiny_llm}")
    assert isinstance(planner, LLMPlanner)
    monkeypatch.setattr(planner, "generate", lambda caption: " [('red circle', [0, 0, 256, 256])]\nBackground ...")
    layout = planner.plan("a red circle", seed=5)
    assert layout.phrases == ["red circle"] and layout.boxes == [[0.0, 0.0, 0.5, 0.5]]
    assert layout.prompt == "a red circle"


def test_llm_planner_errors(tiny_llm, tmp_path):
    with pytest.raises(InputError, match="does not exist; give a local transformers causal-LM folder"):
        LLMPlanner(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"'.*empty' is not a loadable causal language model") as info:
        LLMPlanner(tmp_path / "empty")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="reads at most 2048"):
        LLMPlanner(tiny_llm, max_new_tokens=2000).plan("a red circle")
    with pytest.raises(InputError, match="non-empty"):
        LLMPlanner(tiny_llm, max_new_tokens=4).plan(" ")


def test_planned_boxes_do_not_overlap_where_they_fit():
    """Layout methods and the judge read each box alone: the planner keeps boxes apart (the dataset's rule, which lets
    objects overlap a little, is only its fallback when disjoint boxes do not fit)."""
    from mmsynth.data.captions import captions
    from mmsynth.data.scene import sample_scene
    from mmsynth.sample.planning import ShapesPlanner

    planner = ShapesPlanner()
    for i in range(60):
        boxes = planner.plan(captions(sample_scene("test", i), 1)[0], i).boxes
        for k, a in enumerate(boxes):
            for b in boxes[k + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (i, a, b)
