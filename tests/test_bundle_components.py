"""Named bundle components: saved with their own library, listed in the manifest, loaded by name on first use,
ignored by diffusers' pipeline loader; and a bundle shipped before the manifest still loads."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from mmsynth.errors import InputError
from mmsynth.models.bundle import INPAINTING_UNET, Bundle, list_components, load_component, save_components
from mmsynth.models.components import MANIFEST, Components


def _controlnet(bundle):
    from diffusers import ControlNetModel

    torch.manual_seed(1)
    net = ControlNetModel.from_unet(bundle.unet)
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: make every weight tell
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return net.eval()


def _image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(2)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    return CLIPVisionModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def rich(bundle):
    """The tiny bundle with a ControlNet (diffusers) and an image encoder (transformers) beside its base."""
    return dataclasses.replace(bundle, extras={"controlnet_edges": _controlnet(bundle),
                                               "image_encoder_clip": _image_encoder()})  # fmt: skip


@pytest.fixture(scope="module")
def saved(rich, tmp_path_factory):
    path = tmp_path_factory.mktemp("components") / "rich"
    rich.save_pretrained(path)
    return path


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_components_of_two_libraries_save_in_their_folders_and_load_back_by_name_on_first_use(rich, saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest == {"format": 1, "components": {
        "controlnet_edges": {"library": "diffusers", "class": "ControlNetModel"},
        "image_encoder_clip": {"library": "transformers", "class": "CLIPVisionModelWithProjection"}}}  # fmt: skip
    assert (saved / "controlnet_edges" / "diffusion_pytorch_model.safetensors").is_file()
    assert (saved / "image_encoder_clip" / "model.safetensors").is_file()
    assert "controlnet_edges" not in json.loads((saved / "model_index.json").read_text())

    back = Bundle.from_pretrained(saved)
    assert isinstance(back.extras, Components) and set(back.extras) == {"controlnet_edges", "image_encoder_clip"}
    assert not back.extras.is_loaded("controlnet_edges")  # a plain run loads none of them
    assert set(back.modules()) == {"text_encoder", "vae", "unet", "clip"}
    for name, original in rich.extras.items():
        loaded = back.extras[name]
        assert type(loaded) is type(original) and not loaded.training
        assert next(loaded.parameters()).dtype == torch.float32
        assert _same_weights(original, loaded), name
    assert back.extras.is_loaded("controlnet_edges") and "controlnet_edges" in back.modules()
    assert back.extras["controlnet_edges"] is back.extras["controlnet_edges"]  # loaded once, then kept
    assert type(load_component(saved, "image_encoder_clip")).__name__ == "CLIPVisionModelWithProjection"


def test_components_asked_for_load_now_and_later_ones_follow_the_bundle_dtype(saved):
    eager = Bundle.from_pretrained(saved, components=["image_encoder_clip"])
    assert eager.extras.is_loaded("image_encoder_clip") and not eager.extras.is_loaded("controlnet_edges")
    eager.to(dtype=torch.float64)
    assert next(eager.extras["controlnet_edges"].parameters()).dtype == torch.float64
    with pytest.raises(InputError, match=r"no component 'controlnet_depth'; its components: controlnet_edges, "):
        Bundle.from_pretrained(saved, components=["controlnet_depth"])
    half = Bundle.from_pretrained(saved, torch_dtype=torch.float16)
    assert half.extras["controlnet_edges"].dtype == torch.float16


def test_components_save_in_float16_and_load_as_float32(rich, saved, tmp_path):
    from safetensors import safe_open

    Bundle.from_pretrained(saved).save_pretrained(tmp_path / "half", dtype=torch.float16)  # unread ones too
    for file in ("controlnet_edges/diffusion_pytorch_model.safetensors", "image_encoder_clip/model.safetensors"):
        with safe_open(tmp_path / "half" / file, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118 (not a dict)
    back = Bundle.from_pretrained(tmp_path / "half")
    for name, original in rich.extras.items():
        loaded = back.extras[name]
        assert next(loaded.parameters()).dtype == torch.float32
        assert _same_weights(_half(original), loaded)
    assert next(rich.extras["controlnet_edges"].parameters()).dtype == torch.float32  # memory models untouched


def _half(module: torch.nn.Module) -> torch.nn.Module:
    from mmsynth.models.bundle import _cast_copy

    return _cast_copy(module, torch.float16)


def test_diffusers_still_loads_and_runs_the_base_of_a_bundle_with_components(saved):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(saved, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert not hasattr(pipe, "controlnet_edges")
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]  # fmt: skip
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_a_bad_manifest_is_a_one_line_error_naming_the_bundle_and_the_component(saved, tmp_path):
    def broken(name: str, manifest: str | None = None, drop: str | None = None):
        path = tmp_path / name
        shutil.copytree(saved, path)
        if manifest is not None:
            (path / MANIFEST).write_text(manifest)
        if drop:
            shutil.rmtree(path / drop)
        return path

    good = json.loads((saved / MANIFEST).read_text())

    def with_entry(name: str, entry) -> str:
        return json.dumps({"format": 1, "components": {**good["components"], name: entry}})

    cases = [
        (broken("json", "{not json"), rf"'.*json': {MANIFEST} is not readable JSON"),
        (broken("shape", "[]"), rf"{MANIFEST} must be an object"),
        (broken("newer", json.dumps({**good, "format": 2})), r"has format 2; this mmsynth reads format 1 to 1"),
        (broken("library", with_entry("controlnet_edges", {"library": "timm", "class": "ControlNetModel"})),
         r"component 'controlnet_edges' names library 'timm'; valid: diffusers, transformers"),
        (broken("class", with_entry("controlnet_edges", {"library": "diffusers", "class": "ControlNetModle"})),
         r"component 'controlnet_edges' names class 'ControlNetModle', which diffusers does not have"),
        (broken("entry", with_entry("controlnet_edges", "ControlNetModel")),
         r"component 'controlnet_edges' in .* must be \{\"library\""),
        (broken("folder", drop="image_encoder_clip"),
         r"component 'image_encoder_clip' is listed in .* but its folder image_encoder_clip/ is missing"),
        (broken("reserved", with_entry("unet", {"library": "diffusers", "class": "UNet2DConditionModel"})),
         r"component name 'unet' is taken by the base model"),
        (broken("name", with_entry("../up", {"library": "diffusers", "class": "UNet2DConditionModel"})),
         r"component name '../up' is not valid"),
    ]
    for path, message in cases:
        with pytest.raises(InputError, match=message) as err:
            Bundle.from_pretrained(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    weights = broken("weights") / "controlnet_edges" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    lazy = Bundle.from_pretrained(weights.parent.parent)
    with pytest.raises(InputError, match=r"cannot load its component 'controlnet_edges' \(ControlNetModel"):
        lazy.extras["controlnet_edges"]
    with pytest.raises(InputError, match=r"has no component 'adapter'; valid: tokenizer, .*clip, or one it lists"):
        load_component(saved, "adapter")


def test_names_and_classes_that_cannot_load_back_are_refused_before_anything_is_written(bundle, tmp_path):
    encoder = _image_encoder()
    for name, component, message in [("unet", encoder, "taken by the base model"),
                                     ("ControlNet", encoder, "is not valid"),
                                     ("a/b", encoder, "is not valid"),
                                     ("mine", torch.nn.Linear(2, 2), "must be a model class exported by one of")]:
        with pytest.raises(InputError, match=message):
            dataclasses.replace(bundle, extras={name: component}).save_pretrained(tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_a_partial_bundle_holds_named_components_too(bundle, tmp_path):
    from diffusers import T2IAdapter

    adapter = T2IAdapter(in_channels=3, channels=[16, 32], num_res_blocks=1, downscale_factor=4).eval()
    out = save_components(tmp_path / "parts", dtype=torch.float16, vae=bundle.vae, adapter_sketch=adapter)
    assert json.loads((out / MANIFEST).read_text())["components"] == {
        "adapter_sketch": {"library": "diffusers", "class": "T2IAdapter"}}
    back = load_component(out, "adapter_sketch")
    assert isinstance(back, T2IAdapter) and back.dtype == torch.float32 and _same_weights(_half(adapter), back)
    save_components(out, adapter_sketch=adapter)  # a folder holding only components may be replaced
    assert _same_weights(adapter, load_component(out, "adapter_sketch"))
    assert not (out / "vae").exists()


def test_the_inpainting_unet_goes_through_the_manifest_and_an_unlisted_one_still_loads(bundle, tmp_path):
    from diffusers import UNet2DConditionModel

    from mmsynth.train.recipes.inpaint import inpainting_unet

    unet = inpainting_unet(bundle.unet).eval()
    dataclasses.replace(bundle, extras={INPAINTING_UNET: unet}).save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / MANIFEST).read_text())["components"] == {
        INPAINTING_UNET: {"library": "diffusers", "class": "UNet2DConditionModel"}}
    (tmp_path / "b" / MANIFEST).unlink()  # as in a bundle shipped before the manifest (models/shapes-v1)
    back = Bundle.from_pretrained(tmp_path / "b")
    assert list(back.extras) == [INPAINTING_UNET] and not back.extras.is_loaded(INPAINTING_UNET)
    assert isinstance(back.extras.get(INPAINTING_UNET), UNet2DConditionModel)
    assert _same_weights(unet, back.extras[INPAINTING_UNET])
    assert _same_weights(unet, load_component(tmp_path / "b", INPAINTING_UNET))
    bare = tmp_path / "bare"
    bundle.save_pretrained(bare)
    with pytest.raises(InputError, match=r"no component 'unet_inpainting': train it with `mmsynth train inpaint`"):
        load_component(bare, INPAINTING_UNET)


def test_a_component_folder_copied_into_a_bundle_is_listed_by_name(bundle, saved, tmp_path):
    """How a trained component is shipped into a bundle (`mmsynth zoo ship inpainting`): copy its folder, list it."""
    target = tmp_path / "b"
    shutil.copytree(saved, target)
    shutil.copytree(saved / "unet", target / INPAINTING_UNET)  # an unlisted one, as in models/shapes-v1
    (target / MANIFEST).unlink()
    with pytest.raises(InputError, match=r"folder adapter/ is missing"):
        list_components(target, {"adapter": {"library": "diffusers", "class": "T2IAdapter"}})
    list_components(target, {"image_encoder_clip": {"library": "transformers",
                                                    "class": "CLIPVisionModelWithProjection"}})  # fmt: skip
    listed = json.loads((target / MANIFEST).read_text())["components"]
    assert listed == {INPAINTING_UNET: {"library": "diffusers", "class": "UNet2DConditionModel"},  # listed now
                      "image_encoder_clip": {"library": "transformers", "class": "CLIPVisionModelWithProjection"}}
    assert set(Bundle.from_pretrained(target).extras) == set(listed)


def test_components_mapping_treats_none_as_absent_and_loads_on_read():
    calls = []
    c = Components({"a": torch.nn.Linear(1, 1), "b": None})
    c.add_lazy("later", lambda: calls.append(1) or torch.nn.Linear(2, 2))
    assert list(c) == ["a", "later"] and len(c) == 2 and "b" not in c and not calls
    assert c.get("b") is None and isinstance(c["later"], torch.nn.Linear) and calls == [1]
    c["later"]
    assert calls == [1]
    c["a"] = None
    del c["later"]
    assert len(c) == 0


def test_a_lora_fine_tune_saves_as_its_layers_and_lora_and_loads_back_fused(tmp_path):
    """A UNet with a new input layer and a LoRA on its attention: saved as the changed layer plus the low-rank
    matrices (a fraction of the UNet), loaded by name over its base with the LoRA fused, computing the same."""
    import json as _json

    from mmsynth.models import Bundle
    from mmsynth.models.bundle import add_components
    from mmsynth.models.zoo import tiny_bundle
    from mmsynth.train.denoising import add_lora

    b = tiny_bundle(0)
    root = b.save_pretrained(tmp_path / "m")
    tuned = type(b.unet).from_config(b.unet.config)
    tuned.load_state_dict(b.unet.state_dict())
    add_lora(tuned, 4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name or name.startswith("conv_in."):
                p.add_(0.1 * torch.randn_like(p))
    add_components(root, layered={"tuned_unet": (tuned, b.unet, "unet")})
    files = {f.name for f in (root / "tuned_unet").iterdir()}
    assert {"lora.safetensors", "lora_config.json", "layers.safetensors", "config.json"} <= files
    size = sum(f.stat().st_size for f in (root / "tuned_unet").iterdir())
    assert size < 0.2 * sum(f.stat().st_size for f in (root / "unet").iterdir())
    assert _json.loads((root / "mmsynth_components.json").read_text())["components"]["tuned_unet"]["base"] == "unet"
    loaded = Bundle.from_pretrained(root).extras["tuned_unet"]
    assert not any("lora" in n for n, _ in loaded.named_parameters())  # fused: a plain UNet again
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 10, context).sample, tuned(x, 10, context).sample, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(loaded(x, 10, context).sample, b.unet(x, 10, context).sample, atol=1e-4)
