"""Layout drawing: boxes and their phrases rendered for people to look at (GLIGEN-style inputs).

Layout methods consume boxes and phrases directly; this picture is how a user checks them. Each
phrase gets its own stable colour, so the same phrase has the same colour in every drawing.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

from mmsynth.annotate.registry import Param, register
from mmsynth.errors import InputError

BACKGROUNDS: tuple[str, ...] = ("black", "image")


def phrase_color(phrase: str) -> tuple[int, int, int]:
    """A bright RGB colour that depends only on the phrase text."""
    hue = zlib.crc32(phrase.encode("utf-8")) % 180  # OpenCV hue range
    hsv = np.array([[[hue, 220, 255]]], np.uint8)
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


@register(
    "layout",
    "layout drawing: boxes with their phrases, one colour per phrase, HxWx3 uint8",
    "map",
    (
        Param("boxes", "boxes", (), "normalised xyxy boxes"),
        Param("phrases", "phrases", (), "one phrase per box"),
        Param("thickness", "int", 1, "box line thickness in pixels", 1, 32),
        Param("text", "bool", True, "write the phrases"),
        Param("background", "str", "black", "draw on black or over the image", choices=BACKGROUNDS),
    ),
)
def layout(
    image: np.ndarray, boxes: list, phrases: list, thickness: int, text: bool, background: str
) -> np.ndarray:
    """Only the image's size is used unless background='image'."""
    if len(boxes) != len(phrases):
        raise InputError(
            f"annotator 'layout': parameters 'boxes' and 'phrases' must have the same length, "
            f"got {len(boxes)} boxes and {len(phrases)} phrases"
        )
    h, w = image.shape[:2]
    canvas = image.copy() if background == "image" else np.zeros((h, w, 3), np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.25, min(h, w) / 640)
    for (x0, y0, x1, y1), phrase in zip(boxes, phrases):
        color = phrase_color(phrase)
        p0 = (round(x0 * (w - 1)), round(y0 * (h - 1)))
        p1 = (round(x1 * (w - 1)), round(y1 * (h - 1)))
        cv2.rectangle(canvas, p0, p1, color, thickness)
        if text and phrase:
            (_, th), _ = cv2.getTextSize(phrase, font, scale, 1)
            org = (p0[0] + thickness + 1, min(h - 1, p0[1] + thickness + th + 1))
            cv2.putText(canvas, phrase, org, font, scale, color, 1, cv2.LINE_AA)
    return canvas
