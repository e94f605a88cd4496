"""Captions from a scene by templates (always exactly true), and the parser that inverts them.

Grammar (lower case, punctuation ignored):
    caption  := [prefix] [N "objects"] body
    body     := group REL group ["and" list] | list ["with" group REL group]
    list     := group ("," group)* ["and" group]
    group    := COUNT [SIZE] COLOR SHAPE          e.g. "two large red circles", "a blue square"
    COUNT    := a | an | one | two | three | four
    REL      := left of | to the left of | right of | to the right of | above | over | below | under
A group names every object of that colour and shape in the scene; a relation holds between every
member of the first group and every member of the second (box centres, RELATION_MARGIN apart).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from mmsynth.data import vocab
from mmsynth.data.scene import Scene, group_relations, groups, relation_holds
from mmsynth.errors import InputError

PREFIXES = ("", "a picture of ", "an image of ", "a drawing of ", "a scene with ", "there is ")
REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_PLURAL_TO_SHAPE = {p: s for s, p in vocab.SHAPE_PLURALS.items()}


@dataclass
class Group:
    """`count` objects of one colour and shape; `size` is None when the caption does not say."""

    count: int
    color: str
    shape: str
    size: str | None = None


@dataclass
class ParsedCaption:
    """What a caption asks for: groups, relations between groups (by index), optional total."""

    groups: list[Group]
    relations: list[tuple[int, str, int]] = field(default_factory=list)
    total: int | None = None
    mentions: list[tuple[int, int, int]] = field(default_factory=list)  # (group, first char, end char) per phrase
    # per mention, the relation whose second argument it is ("a red circle left of a blue square": None for the
    # circle, "left of" for the square): what a reader going left to right knows of where the phrase's objects go
    mention_relations: list[str | None] = field(default_factory=list)

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def group_phrase(g: Group) -> str:
    """'two large red circles', 'an orange star'."""
    words = [w for w in (g.size, g.color) if w]
    noun = g.shape if g.count == 1 else vocab.SHAPE_PLURALS[g.shape]
    first = words[0] if words else noun
    count = _article(first) if g.count == 1 else vocab.NUMBER_WORDS[g.count]
    return " ".join([count, *words, noun])


def the_phrase(g: Group) -> str:
    """A back-reference to a named group: 'the red circle', 'the two red circles'."""
    noun = g.shape if g.count == 1 else vocab.SHAPE_PLURALS[g.shape]
    count = [] if g.count == 1 else [vocab.NUMBER_WORDS[g.count]]
    return " ".join(["the", *count, g.color, noun])


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene_groups(scene: Scene, rng: np.random.Generator | None = None) -> list[Group]:
    """Groups of the scene; with an rng, a size is stated (when shared by the group) half the time."""
    out = []
    for members in groups(scene):
        o = scene.objects[members[0]]
        sizes = {scene.objects[i].size for i in members}
        size = None
        if len(sizes) == 1 and (rng is None or rng.random() < 0.5):
            size = o.size
        out.append(Group(count=len(members), color=o.color, shape=o.shape, size=size if rng is not None else None))
    return out


def captions(scene: Scene, n: int = 4) -> list[str]:
    """`n` distinct-as-possible true captions; multi-object scenes always state a relation."""
    rng = np.random.default_rng([scene.seed, scene.index, len(scene.objects), 0xCA9])
    rels = group_relations(scene)
    out: list[str] = []
    for _ in range(n * 4):
        if len(out) >= n:
            break
        gs = scene_groups(scene, rng)
        phrases = [group_phrase(g) for g in gs]
        if len(gs) == 1:
            body = phrases[0]  # one colour-shape group: no two distinct things to relate
        else:
            a, rel, b = rels[int(rng.integers(len(rels)))]
            rel_text = str(rng.choice(REL_PHRASES[rel]))
            rest = [phrases[i] for i in range(len(gs)) if i not in (a, b)]
            if rng.random() < 0.6:
                body = f"{phrases[a]} {rel_text} {phrases[b]}"
                if rest:
                    body += ", and " + _join(rest)
            else:
                others = [phrases[i] for i in range(len(gs)) if i != b and i != a]
                order = [phrases[a], phrases[b], *others]
                body = _join(order) + f", with {the_phrase(gs[a])} {rel_text} {the_phrase(gs[b])}"
        prefix = str(rng.choice(PREFIXES))
        if len(scene.objects) > 1 and rng.random() < 0.15:
            body = f"{vocab.NUMBER_WORDS[len(scene.objects)]} objects: " + body
        if prefix == "there is " and not body.startswith(("a ", "an ")):
            prefix = "there are "
        text = prefix + body
        if text not in out:
            out.append(text)
    return out


# each relation phrase and the same-form phrase of the inverse relation ("to the left of" <-> "to the right of")
_FLIPPED_PHRASE = {
    p: REL_PHRASES[vocab.INVERSE_RELATION[r]][i] for r, ps in REL_PHRASES.items() for i, p in enumerate(ps)
}
_REL_PHRASE_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _FLIPPED_PHRASE), key=len, reverse=True)) + r")\b")


def flip_relations(caption: str) -> str | None:
    """The caption with every relation reversed ("left of" -> "right of", "over" -> "under"), or None when it
    states none. A caption true of a scene is false once flipped (its relation holds by a margin), so the
    flipped caption is a hard negative that only word order tells apart (NegCLIP's relation negatives)."""
    flipped = _REL_PHRASE_RE.sub(lambda m: _FLIPPED_PHRASE[m.group(1)], caption)
    return None if flipped == caption else flipped


# ---------------------------------------------------------------- parser

_REL_PATTERNS = sorted(((p, r) for r, ps in REL_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))
_PREFIX_WORDS = [p.split() for p in sorted({*PREFIXES, "there are ", "a photo of "}, key=len, reverse=True) if p]


def parse_caption(text: str) -> ParsedCaption:
    """Turn a caption of the template grammar back into the scene it asks for.

    Raises InputError naming the words it could not understand and what it expected.
    """
    found = list(re.finditer(r"[a-z]+", re.sub(r"[^a-z ]", " ", text.lower())))  # same length: spans index `text`
    words, spans = [m.group() for m in found], [m.span() for m in found]
    if not words:
        return ParsedCaption(groups=[])
    for p in _PREFIX_WORDS:
        if words[: len(p)] == p:
            words, spans = words[len(p) :], spans[len(p) :]
            break
    total = None
    if len(words) >= 2 and words[0] in _COUNT_WORDS and words[1] == "objects":
        total = _COUNT_WORDS[words[0]]
        words, spans = words[2:], spans[2:]
    gs: list[Group] = []
    rels: list[tuple[int, str, int]] = []
    mentions: list[tuple[int, int, int]] = []
    mention_relations: list[str | None] = []
    keys: dict[tuple[str, str], int] = {}
    pending_rel: tuple[int, str] | None = None
    last_group = -1
    i = 0

    def fail(msg: str) -> InputError:
        return InputError(f"caption '{text}': {msg}")

    while i < len(words):
        w = words[i]
        if w in ("and", "with"):
            i += 1
            continue
        phrase = next((p for p, _ in _REL_PATTERNS if words[i : i + len(p.split())] == p.split()), None)
        if phrase is not None:
            if not gs:
                raise fail(f"relation '{w}' before any object")
            pending_rel = (last_group, dict(_REL_PATTERNS)[phrase])
            i += len(phrase.split())
            continue
        first = i
        reference = w == "the"  # 'the red circle' refers back to a group named before
        if reference:
            i += 1
            w = words[i] if i < len(words) else "end of caption"
            count = _COUNT_WORDS[w] if w in _COUNT_WORDS and w not in ("a", "an") else None
            if count is not None:
                i += 1
        elif w in _COUNT_WORDS:
            count = _COUNT_WORDS[w]
            i += 1
        else:
            raise fail(f"unexpected word '{w}' (expected a count: a, an, one .. four, or 'the')")
        size = None
        if i < len(words) and words[i] in vocab.SIZES:
            size = words[i]
            i += 1
        if i >= len(words) or words[i] not in vocab.COLORS:
            got = words[i] if i < len(words) else "end of caption"
            raise fail(f"expected a colour ({', '.join(vocab.COLOR_NAMES)}), got '{got}'")
        color = words[i]
        i += 1
        noun = words[i] if i < len(words) else "end of caption"
        shape = noun if noun in vocab.SHAPES else _PLURAL_TO_SHAPE.get(noun)
        if shape is None:
            raise fail(f"expected a shape ({', '.join(vocab.SHAPES)}), got '{noun}'")
        singular = noun == shape
        if count is not None and singular != (count == 1):
            raise fail(f"'{w} ... {noun}': count and noun disagree")
        i += 1
        key = (color, shape)
        if reference and key not in keys:
            raise fail(f"'the {color} {noun}' refers to no object named before it")
        if key in keys:
            idx = keys[key]  # a group repeated in a relation clause
            if count is not None and gs[idx].count != count:
                raise fail(f"'{color} {shape}' appears with two different counts")
        else:
            assert count is not None
            idx = len(gs)
            keys[key] = idx
            gs.append(Group(count=count, color=color, shape=shape, size=size))
        last_group = idx
        mentions.append((idx, spans[first][0], spans[i - 1][1]))
        mention_relations.append(pending_rel[1] if pending_rel is not None else None)
        if pending_rel is not None:
            rels.append((pending_rel[0], pending_rel[1], idx))
            pending_rel = None
    if pending_rel is not None:
        raise fail("a relation without an object after it")
    if total is not None and total != sum(g.count for g in gs):
        raise fail(f"says {total} objects but names {sum(g.count for g in gs)}")
    return ParsedCaption(groups=gs, relations=sorted(set(rels)), total=total, mentions=mentions,
                         mention_relations=mention_relations)  # fmt: skip


def token_mentions(parsed: ParsedCaption, token_spans: list[tuple[int, int]]) -> list[int | None]:
    """Per token (the tokenizer's character spans), the index in `parsed.mentions` of the group phrase that
    covers it, or None (special and padding tokens, relation words)."""
    out: list[int | None] = []
    for start, end in token_spans:
        covering = (m for m, (_, first, stop) in enumerate(parsed.mentions) if first <= start < stop)
        out.append(next(covering, None) if end > start else None)
    return out


def expected_from_scene(scene: Scene) -> ParsedCaption:
    """The full expectation a scene implies (all groups, sizes, all group relations)."""
    gs = [
        Group(count=len(m), color=scene.objects[m[0]].color, shape=scene.objects[m[0]].shape,
              size=scene.objects[m[0]].size if len({scene.objects[i].size for i in m}) == 1 else None)
        for m in groups(scene)
    ]  # fmt: skip
    return ParsedCaption(groups=gs, relations=group_relations(scene))


def caption_true_of(caption: str | ParsedCaption, scene: Scene) -> bool:
    """Whether `scene` makes `caption` (text, or already parsed) true under the grammar's semantics above."""
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    members: list[list[int]] = []
    for g in parsed.groups:
        idx = [i for i, o in enumerate(scene.objects) if (o.color, o.shape) == (g.color, g.shape)]
        if len(idx) != g.count or (g.size and any(scene.objects[i].size != g.size for i in idx)):
            return False
        members.append(idx)
    if sum(len(m) for m in members) != len(scene.objects):
        return False  # the caption names every object of the scene
    for a, rel, b in parsed.relations:
        if not all(relation_holds(scene.objects[i], scene.objects[j], rel) for i in members[a] for j in members[b]):
            return False
    return True


_SHAPE_NOUNS = sorted({*vocab.SHAPES, *vocab.SHAPE_PLURALS.values()}, key=len, reverse=True)
_GROUP_NOUN_RE = re.compile(r"\b(" + "|".join(vocab.COLOR_NAMES) + r") (" + "|".join(_SHAPE_NOUNS) + r")\b")
_SINGULAR = {**{s: s for s in vocab.SHAPES}, **{p: s for s, p in vocab.SHAPE_PLURALS.items()}}


def shape_swapped(caption: str) -> list[str]:
    """The caption with one colour-shape group's shape changed, every mention of it ("a red circle ... the red
    circle" -> "a red square ... the red square", plurals kept), for each group and each shape that does not make
    it a colour-shape the caption already names: false of any scene the caption is true of, since a caption names
    every group, and differing from it in one word, as the zoo's CLIP retrieval misses do (text-side hard
    negatives)."""
    named = {(m.group(1), _SINGULAR[m.group(2)]) for m in _GROUP_NOUN_RE.finditer(caption)}
    out = []
    for colour, shape in sorted(named):
        mention = re.compile(rf"\b{colour} ({vocab.SHAPE_PLURALS[shape]}|{shape})\b")  # group 1: the noun as written
        for new in vocab.SHAPES:
            if (colour, new) not in named:
                noun = {shape: new, vocab.SHAPE_PLURALS[shape]: vocab.SHAPE_PLURALS[new]}
                out.append(mention.sub(lambda m, noun=noun, colour=colour: f"{colour} {noun[m.group(1)]}", caption))
    return out
