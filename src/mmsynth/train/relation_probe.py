"""A training probe that makes a text tower keep the relation word (why: the UNet cannot place what it is not told).

Contrastive CLIP never needs word order, so the zoo's text tower maps "a red circle left of a blue square" and
"... right of ..." to nearly the same hidden states (`python scripts/text_tower_probe.py`: 0.997 per token), and
the UNet that cross-attends to them draws both alike. Here a linear head reads every token of a group phrase from
the tower's last hidden states and must say which relation, if any, that phrase is the second argument of
("a blue square" after "left of": class "left of"; "a red circle" before it: none). Under CLIP's causal mask a
phrase sees only the words before it, so this is exactly what it can know; and it is what the UNet needs at
those tokens: where to put that phrase's objects. The head only trains the tower and is not exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmsynth.data.captions import REL_PHRASES, parse_caption, token_mentions
from mmsynth.errors import InputError

CLASSES: tuple[str | None, ...] = (None, *REL_PHRASES)  # none, "left of", "right of", "above", "below"
IGNORE = -100  # tokens outside every group phrase (and captions outside the Shapes grammar) are not scored


def token_relation_targets(captions: list[str], offsets: torch.Tensor | list[list[tuple[int, int]]]) -> torch.Tensor:
    """(B, T) class index per token (`CLASSES`), IGNORE where no group phrase covers it.

    `offsets` are the tokenizer's (start, end) character spans per token, as `return_offsets_mapping` gives.
    """
    spans = offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets
    out = torch.full((len(captions), len(spans[0]) if spans else 0), IGNORE, dtype=torch.long)
    for b, (caption, token_spans) in enumerate(zip(captions, spans)):
        if not caption:
            continue
        try:
            parsed = parse_caption(caption)
        except InputError:
            continue
        for t, mention in enumerate(token_mentions(parsed, token_spans)):
            if mention is not None:
                out[b, t] = CLASSES.index(parsed.mention_relations[mention])
    return out


class RelationProbe(torch.nn.Module):
    """Linear head: a token's last hidden state -> logits over `CLASSES`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, len(CLASSES))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def relation_probe_loss(
    probe: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the probe over the scored tokens, and its accuracy on tokens after a relation word
    (the minority the tower used to blur; the "none" tokens are easy)."""
    targets = targets.to(hidden.device)
    logits = probe(hidden.float())
    scored = targets != IGNORE
    if not bool(scored.any()):
        return logits.sum() * 0.0, {}
    loss = F.cross_entropy(logits[scored], targets[scored])
    logs = {"relation_probe_loss": float(loss.detach())}
    related = targets > 0
    if bool(related.any()):
        logs["relation_probe_acc"] = float((logits[related].argmax(-1) == targets[related]).float().mean())
    return loss, logs
