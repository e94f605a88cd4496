"""A word-level tokenizer for the closed Shapes vocabulary, saved as a transformers fast tokenizer.

The Shapes world has a few dozen words, so a word-level model is exact and tiny (a BPE tokenizer
would only add merges to learn). It is built with `tokenizers` and wrapped in transformers'
`PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained` and diffusers' pipelines load it like
CLIP's. Special tokens follow CLIP: `<|startoftext|>`, `<|endoftext|>` (also the padding token),
plus `<unk>` for words outside the vocabulary. `<|endoftext|>` gets the largest id, so the CLIP text
model pools at the true end of text whichever pooling rule its transformers version uses.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from mmsynth.data import vocab
from mmsynth.data.captions import PREFIXES, REL_PHRASES

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = EOS_TOKEN
# The longest template caption is 39 tokens with BOS/EOS (measured over 12,000 captions); margin for user prompts.
MAX_LENGTH = 48

# Grammar words the caption templates and the parser use besides the vocabulary tables.
_GRAMMAR_WORDS = ("a", "an", "the", "and", "with", "objects", "of", "to", "there", "is", "are", "photo", ",", ":", ".")
_WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")


def shapes_words() -> list[str]:
    """Every word a Shapes caption can contain, in a stable order (the vocabulary of the tokenizer)."""
    words: list[str] = []

    def add(text: str) -> None:
        for w in _WORD_PATTERN.findall(text.lower()):
            if w not in words:
                words.append(w)

    for group in (
        vocab.SHAPES,
        tuple(vocab.SHAPE_PLURALS.values()),
        vocab.COLOR_NAMES,
        vocab.SIZES,
        tuple(vocab.NUMBER_WORDS.values()),
        vocab.RELATIONS,
        tuple(p for ps in REL_PHRASES.values() for p in ps),
        PREFIXES,
        _GRAMMAR_WORDS,
    ):
        for text in group:
            add(text)
    return words


def build_shapes_tokenizer(max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    """Build the Shapes tokenizer: lower-cased words and punctuation, BOS + words + EOS, padded with EOS."""
    words = shapes_words()
    tokens = [UNK_TOKEN, *words, BOS_TOKEN, EOS_TOKEN]
    ids = {t: i for i, t in enumerate(tokens)}
    core = Tokenizer(WordLevel(vocab=ids, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, ids[BOS_TOKEN]), (EOS_TOKEN, ids[EOS_TOKEN])],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
        padding_side="right",
    )
    return tok


def tokenize_padded(tokenizer: Any, texts: str | list[str], **extra: Any) -> Any:
    """Texts padded (and truncated) to the tokenizer's max length, as diffusers' pipelines tokenise prompts:
    every place that feeds a text encoder or reads token positions must see the same tokens."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, **extra)


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """bos/eos/pad ids to copy into a CLIPTextConfig (its defaults, 49406/49407, are CLIP's BPE ids)."""
    return {
        "bos_token_id": int(tokenizer.bos_token_id),
        "eos_token_id": int(tokenizer.eos_token_id),
        "pad_token_id": int(tokenizer.pad_token_id),
    }


def unknown_words(tokenizer: PreTrainedTokenizerFast, text: str) -> list[str]:
    """Words of `text` that the tokenizer maps to its unknown token (in order, without repeats)."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []  # a BPE tokenizer (real CLIP) has no unknown words
    backend = tokenizer.backend_tokenizer
    normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
    found: list[str] = []
    for word, _span in backend.pre_tokenizer.pre_tokenize_str(normalized):
        if tokenizer.convert_tokens_to_ids(word) == unk and word not in found:
            found.append(word)
    return found


def warn_unknown_words(tokenizer: PreTrainedTokenizerFast, text: str) -> list[str]:
    """Log a warning naming the words the model cannot read (they become <unk>); return them.

    The Shapes zoo only knows its closed vocabulary: a prompt with other words still runs, but the
    user must learn that those words were ignored rather than get silently wrong images.
    """
    words = unknown_words(tokenizer, text)
    if words:
        logger.warning(
            "mmsynth: unknown word%s %s in prompt %r: the model does not know %s and reads %s as <unk>",
            "s" if len(words) > 1 else "",
            ", ".join(repr(w) for w in words),
            text,
            "them" if len(words) > 1 else "it",
            "them" if len(words) > 1 else "it",
        )
    return words


def warn_if_truncated(tokenizer: Any, text: str) -> str:
    """Log a warning when `text` is longer than the tokenizer's limit; return the part the model will not read.

    Every text encoder here truncates to `model_max_length` (as diffusers' pipelines do): a long prompt still runs,
    but the user must learn which words were dropped rather than wonder why they were ignored.
    """
    limit = tokenizer.model_max_length
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets
        enc, offsets = tokenizer(text), None
    ids = enc["input_ids"]
    if len(ids) <= limit:
        return ""
    # truncation keeps limit - 1 tokens and the end-of-text token: the token at limit - 1 is the first one cut
    cut = text[offsets[limit - 1][0] :] if offsets is not None else ""
    logger.warning(
        "mmsynth: the prompt is %d tokens, more than the model's limit of %d; the model reads it only up to the "
        "limit%s",
        len(ids), limit, f" and does not see: {cut!r}" if cut else "",
    )  # fmt: skip
    return cut or text
