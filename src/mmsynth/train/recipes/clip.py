"""Contrastive CLIP on Shapes image/caption pairs (the zoo's text encoder and image features).

The text tower becomes the diffusion model's text encoder; the vision tower later serves exemplar
conditions, CLIP score and a Frechet feature extractor. Loss: CLIPModel's own symmetric InfoNCE.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mmsynth.data.captions import caption_true_of, flip_relations, parse_caption, shape_swapped
from mmsynth.data.scene import EDIT_KINDS, Scene
from mmsynth.errors import InputError
from mmsynth.models.bundle import load_component, save_components
from mmsynth.models.grow import deepen_vision_tower, refine_vision_patches
from mmsynth.models.tokenizer import build_shapes_tokenizer
from mmsynth.models.zoo import ZOO_SPECS, build_clip, projected, text_encoder_from_clip, unit_means
from mmsynth.train.data import HardNegativePairs, MinedNegatives
from mmsynth.train.mining import load_table
from mmsynth.train.patch_labels import PatchLabelHead, patch_label_loss
from mmsynth.train.recipe import Recipe
from mmsynth.train.relation_probe import RelationProbe, relation_probe_loss, token_relation_targets


def _as_scenes(scenes: list[Any]) -> list[Scene]:
    """A batch's scenes (the collate step may have left them as dicts)."""
    return [s if isinstance(s, Scene) else Scene.from_dict(s) for s in scenes]


@dataclass
class ClipOptions:
    zoo: str = "shapes-v1"  # size of a fresh model (mmsynth.models.zoo.ZOO_SPECS)
    init: str | None = None  # continue from a folder with clip/ + tokenizer/ (e.g. an earlier run's final/)
    # Keep the text tower (and its projection) fixed and train only the vision side and the temperature: the
    # text tower is the diffusion UNet's text encoder, so this improves retrieval without invalidating a
    # UNet already trained on it (LiT, Zhai et al. 2022, with the roles swapped).
    freeze_text: bool = False
    # Pair every scene of a batch with a minimal edit of itself (one object's shape or colour changed): the
    # retrieval errors left are near misses of exactly that kind, which random in-batch negatives rarely are
    # (hard negatives as in NegCLIP, Yuksekgonul et al. 2023, here on the image side). Needs data: shapes.
    hard_negatives: bool = False
    # What a hard negative's edit may change: "shape", "colour", "place" (the two objects of a two-object scene
    # swap places, so only their relation tells the pair apart: the word order contrastive CLIP otherwise
    # ignores).
    hard_negative_edits: tuple[str, ...] = ("shape", "colour")
    # How many scenes of a batch share one source: the source and hard_negative_group - 1 edits of it (each
    # naming other groups), so each caption faces that many images one edit away from its own, the near misses
    # text->image retrieval gets wrong. A kind listed twice in hard_negative_edits is drawn twice as often.
    hard_negative_group: int = 2
    # Add each caption with its relation reversed ("left of" -> "right of") as one more text every image is
    # contrasted with (NegCLIP's text-side negatives, Yuksekgonul et al. 2023). In-batch captions almost never
    # differ only in word order, so plain CLIP learns none: the shipped text tower maps "left" and "right" to
    # nearly the same hidden state (`python scripts/text_tower_probe.py`), which the UNet then cannot use.
    relation_negatives: bool = False
    # A folder whose text_encoder/ replaces the CLIP's text tower before training: a text encoder trained with
    # the UNet (t2i's options.train_text_encoder) gets a vision side that matches it (with freeze_text), so the
    # bundle's CLIP keeps the UNet's text encoder as its text tower.
    text_encoder: str | None = None
    # Weight of a probe loss that makes the text tower's last hidden states at every group phrase say which
    # relation precedes that phrase (train/relation_probe.py): what contrastive training leaves out and the UNet
    # needs at those tokens. 0: off. The probe logs relation_probe_acc (chance 0.25 on the related tokens).
    relation_probe_weight: float = 0.0
    # Weight of the mean squared distance between the text tower's last hidden states and those of the tower it
    # started from (options.init's): a UNet trained on the old tower keeps working on the new one while the
    # probe adds the relation, so fine-tuning it to the new tower takes fewer steps. 0: off.
    preserve_text_weight: float = 0.0
    # Grow init's vision tower to this many encoder layers (models/grow.py: the new layers start as identities);
    # 0 keeps it. With freeze_text this is LiT with the roles swapped and more image capacity: the zoo's retrieval
    # errors are multi-object scenes with one shape confused, and image vectors fitted to the shipped text tower's
    # captions retrieve 0.968 of the test queries against the second stage's vision side's 0.821 (`mmsynth bench
    # components`, its text-side ceiling). 6 layers, 4,000 steps, configs/clip_vision_deep.yaml: 0.835 (shipped).
    vision_layers: int = 0
    # Cut images into patches of this size (a divisor of init's patch size; models/grow.py starts the finer
    # tower where init's would stand on an image upsampled to match, so nothing trained is lost); 0 keeps it.
    # The third stage's 8-pixel patches hold most of a small shape, and its misses are shapes confused; 4-pixel
    # patches with count edits added (configs/clip_vision_patch4.yaml) took retrieval from 0.835 to 0.868, at 2.2
    # against 0.8 s/step; the two changes were not tried apart.
    vision_patch: int = 0
    # Weight of a term pulling each image embedding toward the mean text embedding of all its scene's true
    # captions (1 - cosine), beside the contrastive loss; needs freeze_text, since the target is the fixed text
    # tower's. Contrastive training only asks an image to be nearer its own caption than the batch's others, and
    # near misses (one shape changed in a four-object scene) are rare in a batch; this target says where the text
    # tower puts the scene (retrieval against such means: 0.934 on the shipped tower's test queries). On the zoo,
    # 600 steps with it did not raise retrieval (configs/clip_vision_deep.yaml). Logs caption_target_cos. 0: off.
    caption_target_weight: float = 0.0
    # Weight of a dense probe loss on the vision side (train/patch_labels.py): a linear head reads each patch
    # token entering the last encoder layer and must give the exact shares of that patch covered by each shape
    # and each colour. The misses left are one object's shape confused beside another, which the contrastive
    # loss rarely tests and Shapes labels pixel by pixel. Needs data: shapes (the scenes). Logs
    # patch_shape_acc and patch_colour_acc (patches one object covers at least half of). 0: off.
    patch_label_weight: float = 0.0
    # Add, per caption, this many of its shape swaps (one colour-shape group's shape changed, every mention:
    # data.captions.shape_swapped) as more texts every image is contrasted with: text-side hard negatives of
    # exactly the zoo's retrieval misses (a scene with one shape different), each image facing captions that
    # differ from its own in one word, which image-side edits give one per scene and a batch almost never.
    # Swaps true of any scene of the batch, or equal to one of its captions, are left out. Cheap: the texts
    # need no render. Logs swap_acc_in_batch (an image preferring its caption to all its swaps). 0: off.
    shape_swap_negatives: int = 0
    # Count every scene of the batch a caption is true of as its match (data.captions.caption_true_of, the rule
    # the retrieval bar scores by), with the softmax targets spread evenly over them in both directions, instead
    # of its own scene only. In a batch of 128 Shapes pairs, 5-15% of the captions ("a blue star", "three green
    # crosses") are true of another scene too, which plain CLIP then trains as a negative: the image is pushed
    # away from a caption that describes it. Needs data: shapes (the scenes). Logs false_negatives_in_batch (the
    # share of captions true of another scene of the batch).
    consistent_positives: bool = False
    # A table of mined hard negatives (scripts/mine_clip_negatives.py: for each hard-negative group's source, the
    # training scenes the current CLIP scores highest against its captions without any being true of them), and
    # how many of each source's neighbours join its group. A batch then holds the CLIP's own current confusions,
    # which one-word synthetic edits and random scenes give only by chance.
    # Needs hard_negatives (the groups it extends) and the table's split, seed, group and batch layout.
    mined_negatives: str | None = None
    mined_per_group: int = 2

    def validate(self) -> None:
        for key in ("relation_probe_weight", "preserve_text_weight", "caption_target_weight", "patch_label_weight",
                    "shape_swap_negatives"):
            if getattr(self, key) < 0:
                raise InputError(f"config key 'options.{key}' must be >= 0 (0 turns it off), got {getattr(self, key)}")
        if self.freeze_text and (self.relation_probe_weight or self.preserve_text_weight):
            raise InputError("config keys 'options.relation_probe_weight' and 'options.preserve_text_weight' train "
                             "the text tower, which 'options.freeze_text' keeps fixed: use one or the other")
        if self.caption_target_weight and not self.freeze_text:
            raise InputError("config key 'options.caption_target_weight' pulls images toward the fixed text tower's "
                             "embeddings of their captions, so it needs 'options.freeze_text: true'")  # fmt: skip
        if self.preserve_text_weight and not self.init:
            raise InputError("config key 'options.preserve_text_weight' needs 'options.init' (the tower to stay near)")
        if not self.hard_negative_edits or set(self.hard_negative_edits) - set(EDIT_KINDS):
            raise InputError(f"config key 'options.hard_negative_edits' takes some of {', '.join(EDIT_KINDS)}, "
                             f"got {list(self.hard_negative_edits)}")  # fmt: skip
        if self.hard_negative_group < 2:
            raise InputError(f"config key 'options.hard_negative_group' counts a scene and its edits, so it must be "
                             f">= 2, got {self.hard_negative_group}")  # fmt: skip
        if self.mined_negatives and not self.hard_negatives:
            raise InputError("config key 'options.mined_negatives' extends the hard-negative groups, so it needs "
                             "'options.hard_negatives: true'")  # fmt: skip
        if self.mined_per_group < 1:
            raise InputError(f"config key 'options.mined_per_group' must be >= 1, got {self.mined_per_group}")
        if self.zoo not in ZOO_SPECS:
            raise InputError(f"config key 'options.zoo' must be one of {', '.join(ZOO_SPECS)}, got '{self.zoo}'")
        if self.freeze_text and not self.init:
            raise InputError("config key 'options.freeze_text' needs 'options.init' (a trained text tower to keep)")
        if self.vision_layers and not self.init:
            raise InputError("config key 'options.vision_layers' grows the vision tower of 'options.init'; a fresh "
                             "model takes its size from 'options.zoo'")  # fmt: skip
        if self.vision_patch and not self.init:
            raise InputError("config key 'options.vision_patch' refines the vision tower of 'options.init'; a fresh "
                             "model takes its size from 'options.zoo'")  # fmt: skip
        if self.vision_patch < 0:
            raise InputError(f"config key 'options.vision_patch' must be >= 0 (0 keeps the patches), "
                             f"got {self.vision_patch}")  # fmt: skip
        if self.vision_layers < 0:
            raise InputError(f"config key 'options.vision_layers' must be >= 0 (0 keeps the tower), "
                             f"got {self.vision_layers}")  # fmt: skip
        if self.text_encoder and not self.init:
            raise InputError("config key 'options.text_encoder' needs 'options.init' (the CLIP whose text tower it "
                             "replaces)")  # fmt: skip


class ClipRecipe(Recipe):
    name = "clip"
    Options = ClipOptions
    description = "contrastive CLIP (text + vision towers) on Shapes image/caption pairs"
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 128,
        "lr": 5e-4,
        "weight_decay": 0.1,
        "adam_beta2": 0.98,
        "warmup_steps": 200,
    }

    def build(self) -> None:
        o = self.options
        if o.init:
            self.tokenizer = load_component(o.init, "tokenizer")
            clip = load_component(o.init, "clip")
            if o.text_encoder:
                encoder = load_component(o.text_encoder, "text_encoder")
                try:  # transformers 5 flattened CLIPTextModel (no `.text_model`); older versions nest it
                    clip.text_model.load_state_dict(getattr(encoder, "text_model", encoder).state_dict())
                except RuntimeError as exc:
                    raise InputError(f"options.text_encoder ('{o.text_encoder}') is not shaped like the text tower "
                                     f"of options.init ('{o.init}'): {str(exc).splitlines()[0]}") from None
            if o.vision_layers:
                clip = deepen_vision_tower(clip, o.vision_layers, where="config key 'options.vision_layers'")
            if o.vision_patch:
                clip = refine_vision_patches(clip, o.vision_patch, where="config key 'options.vision_patch'")
        else:
            spec = ZOO_SPECS[o.zoo]
            self.tokenizer = build_shapes_tokenizer(spec.max_length)
            clip = build_clip(spec, self.tokenizer)
        self.models = {"clip": clip}
        self.trainable = ("clip",)
        if o.relation_probe_weight:
            self.models["relation_probe"] = RelationProbe(clip.config.text_config.hidden_size)
            self.trainable += ("relation_probe",)
        if o.patch_label_weight:
            self.models["patch_labels"] = PatchLabelHead(clip.config.vision_config.hidden_size)
            self.trainable += ("patch_labels",)
        if o.preserve_text_weight:  # frozen by the base class's place(): not in `trainable`
            self.models["text_reference"] = copy.deepcopy(clip.text_model)

    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        super().place(device, weight_dtype)
        if self.options.freeze_text:
            clip = self.models["clip"]
            for part in (clip.text_model, clip.text_projection):
                part.requires_grad_(False)
            clip.text_model.eval()

    def dataset(self) -> Dataset:
        c = self.config
        for key, why in (("patch_label_weight", "labels patches from the Shapes scenes"),
                         ("hard_negatives", "edits Shapes scenes"),
                         ("shape_swap_negatives", "checks swapped captions against the scenes"),
                         ("consistent_positives", "checks every caption against every scene")):  # fmt: skip
            if getattr(self.options, key) and c.data != "shapes":
                raise InputError(f"config key 'options.{key}' {why}, so it needs data: shapes, got data: {c.data}")
        if not self.options.hard_negatives:
            return super().dataset()
        group = self.options.hard_negative_group
        if c.batch_size % group:
            raise InputError(f"config key 'options.hard_negatives' puts a scene and its {group - 1} edit(s) in one "
                             f"batch, so batch_size must be a multiple of options.hard_negative_group ({group}), "
                             f"got {c.batch_size}")  # fmt: skip
        if self.options.mined_negatives:
            return self._mined_dataset()
        return HardNegativePairs(c.data_split, c.data_seed, self.resolution, kinds=self.options.hard_negative_edits,
                                 group=group)  # fmt: skip

    def _mined_dataset(self) -> Dataset:
        """Hard-negative groups extended by a mined table that must fit this run's data and batches."""
        c, o = self.config, self.options
        table = load_table(o.mined_negatives)
        size = o.hard_negative_group + o.mined_per_group
        want = {"split": c.data_split, "seed": c.data_seed, "group": o.hard_negative_group,
                "block": c.batch_size // size}  # fmt: skip
        if c.batch_size % size:
            raise InputError(f"config key 'options.mined_negatives' makes groups of {size} (hard_negative_group + "
                             f"mined_per_group), so batch_size must be a multiple of {size}, got {c.batch_size}")
        for key, value in want.items():
            if table[key] != value:
                raise InputError(f"config key 'options.mined_negatives': {o.mined_negatives} was mined for {key} "
                                 f"{table[key]}, this run needs {value} (mine it again with that)")  # fmt: skip
        return MinedNegatives(table, self.resolution, kinds=o.hard_negative_edits, extra=o.mined_per_group)

    @property
    def resolution(self) -> int:
        clip = self.models["clip"]
        return int(getattr(clip, "module", clip).config.vision_config.image_size)

    def tokenize(self, texts: list[str], **extra: Any) -> Any:
        """Pad to the longest caption of the batch: under CLIP's causal mask the pooled end-of-text
        output never sees later padding, so this equals max-length padding at a fraction of the cost."""
        return self.tokenizer(texts, padding="longest", max_length=self.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt", **extra)  # fmt: skip

    def loss(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """CLIP's symmetric InfoNCE; with relation negatives or shape swaps, each image also faces those texts."""
        captions = list(batch["caption"])
        # a flipped caption that is already a caption of the batch (a "place" pair's twin) is faced as that one:
        # added again, it would be a negative column identical to its own image's positive
        in_batch = set(captions)
        flipped = [f if (f := flip_relations(c)) not in in_batch else None for c in captions] \
            if self.options.relation_negatives else []  # fmt: skip
        negatives = [f for f in flipped if f is not None]
        o = self.options
        swaps = self._shape_swaps(captions, batch["scene"], step, in_batch) if o.shape_swap_negatives else []
        swap_start = len(negatives)
        negatives += [t for row in swaps for t in row]
        tokens = self.tokenize(captions + negatives, return_offsets_mapping=bool(o.relation_probe_weight))
        input_ids = tokens.input_ids.to(self.device)
        out = self.models["clip"](input_ids=input_ids, pixel_values=batch["pixel_values"],
                                  output_hidden_states=bool(o.patch_label_weight))
        n = len(captions)
        target = torch.arange(n, device=out.logits_per_image.device)
        logs = {"logit_scale": float(self._unwrapped().logit_scale.detach().exp())}
        # image -> every text (its caption among the batch's and the flipped ones); text -> the batch's images
        image_target: torch.Tensor = target
        text_target: torch.Tensor = target
        if o.consistent_positives:
            true_of = self._true_of(captions, batch["scene"]).to(target.device)  # [caption, scene]
            logs["false_negatives_in_batch"] = float((true_of.sum(1) > 1).float().mean())
            text_target = true_of / true_of.sum(1, keepdim=True)
            image_target = F.pad(true_of.T / true_of.T.sum(1, keepdim=True), (0, len(negatives)))
        loss = (F.cross_entropy(out.logits_per_image, image_target)
                + F.cross_entropy(out.logits_per_text[:n], text_target)) / 2  # fmt: skip
        hidden = out.text_model_output.last_hidden_state
        if o.relation_probe_weight:
            targets = token_relation_targets(captions + negatives, tokens.offset_mapping)
            probe_loss, probe_logs = relation_probe_loss(self.models["relation_probe"], hidden, targets)
            loss = loss + o.relation_probe_weight * probe_loss
            logs.update(probe_logs)
        if o.preserve_text_weight:
            with torch.no_grad():
                reference = self.models["text_reference"](input_ids=input_ids).last_hidden_state
            drift = F.mse_loss(hidden.float(), reference.float())
            loss = loss + o.preserve_text_weight * drift
            logs["text_drift"] = float(drift.detach())
        if o.patch_label_weight:
            vision = self._unwrapped().config.vision_config
            tokens = out.vision_model_output.hidden_states[-2][:, 1:]  # what enters the last layer; class token off
            patch_loss, patch_logs = patch_label_loss(self.models["patch_labels"], tokens, batch["scene"],
                                                      vision.image_size, vision.patch_size)  # fmt: skip
            loss = loss + o.patch_label_weight * patch_loss
            logs.update(patch_logs)
        if o.caption_target_weight:
            cos = (F.normalize(out.image_embeds.float(), dim=-1) * self._caption_targets(batch["captions"])).sum(-1)
            loss = loss + o.caption_target_weight * (1 - cos).mean()
            logs["caption_target_cos"] = float(cos.detach().mean())
        with torch.no_grad():
            # in-batch retrieval accuracy; identical captions in a batch count as matches
            pred = out.logits_per_text[:n].argmax(dim=1)
            same = [captions[int(j)] == captions[i] for i, j in enumerate(pred)]
            logs["t2i_top1_in_batch"] = sum(same) / len(same)
            if swap_start:  # (relation negatives) how often an image prefers its caption to the same caption flipped
                has = torch.tensor([f is not None for f in flipped], device=target.device)
                own = out.logits_per_image[target, target][has]
                logs["relation_acc_in_batch"] = float((own > out.logits_per_image[has, n:].diagonal()).float().mean())
            if swaps:  # how often an image prefers its caption to every swap of it
                col, wins = n + swap_start, []
                for i, row in enumerate(swaps):
                    if row:
                        scores = out.logits_per_image[i]
                        wins.append(bool(scores[i] > scores[col : col + len(row)].max()))
                    col += len(row)
                if wins:
                    logs["swap_acc_in_batch"] = sum(wins) / len(wins)
        return loss, logs

    def _shape_swaps(self, captions: list[str], scenes: list[Any], step: int, taken: set[str]) -> list[list[str]]:
        """Per caption, up to options.shape_swap_negatives of its shape swaps (drawn by seed, step and row, so a
        resumed run draws the same), none equal to a caption of the batch or another's swap, none true of a scene
        of the batch (a hard-negative pair's twin can be exactly a swap)."""
        batch_scenes = _as_scenes(scenes)
        seen, out = set(taken), []
        for i, caption in enumerate(captions):
            candidates = shape_swapped(caption)
            rng = np.random.default_rng([self.config.seed, step, i, 0x5A9])
            row = []
            for j in rng.permutation(len(candidates)):
                text = candidates[int(j)]
                if text in seen:
                    continue
                parsed = parse_caption(text)
                if any(caption_true_of(parsed, scene) for scene in batch_scenes):
                    continue
                seen.add(text)
                row.append(text)
                if len(row) == self.options.shape_swap_negatives:
                    break
            out.append(row)
        return out

    @staticmethod
    def _true_of(captions: list[str], scenes: list[Any]) -> torch.Tensor:
        """[caption, scene] float mask: 1 where the scene makes the caption true (always on the diagonal, each
        caption being its own scene's)."""
        batch_scenes = _as_scenes(scenes)
        mask = torch.tensor([[caption_true_of(parsed, scene) for scene in batch_scenes]
                             for parsed in map(parse_caption, captions)], dtype=torch.float32)  # fmt: skip
        return mask.fill_diagonal_(1.0)

    @torch.no_grad()
    def _caption_targets(self, captions_per_image: list[list[str]]) -> torch.Tensor:
        """Per image, the unit mean of the fixed text tower's unit embeddings of all its true captions."""
        flat = [c for caps in captions_per_image for c in caps]
        ids = self.tokenize(flat).input_ids.to(self.device)
        feats = F.normalize(projected(self._unwrapped().get_text_features(input_ids=ids)).float(), dim=-1)
        return unit_means(feats, [len(c) for c in captions_per_image])

    def _unwrapped(self) -> torch.nn.Module:
        clip = self.models["clip"]
        return getattr(clip, "module", clip)

    def export(self, out: Path) -> Path:
        clip = self._unwrapped()
        return save_components(out, tokenizer=self.tokenizer, text_encoder=text_encoder_from_clip(clip), clip=clip)
