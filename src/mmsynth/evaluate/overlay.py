"""Judge overlays: an image with the judge's detections drawn on it, so a verdict can be seen, not read."""

from __future__ import annotations

import cv2
import numpy as np

from mmsynth.evaluate.scoring import ImageScore
from mmsynth.viz import label, upscale

OK_COLOR = (20, 170, 20)
BAD_COLOR = (220, 20, 20)


def draw_verdict(image: np.ndarray, score: ImageScore, zoom: int = 3, title: str | None = None) -> np.ndarray:
    """Upscale `image`, box every detection (green: matches an expected object, red: not) with its label,
    and title it PASS/FAIL (or `title`)."""
    big = upscale(image, zoom).copy()
    matched = {j for j, hit in zip(score.pairs, score.hits) if j is not None and hit}
    for k, det in enumerate(score.detections):
        color = OK_COLOR if k in matched else BAD_COLOR
        x0, y0, x1, y1 = (int(round(v * zoom)) for v in det.box)
        cv2.rectangle(big, (x0, y0), (x1, y1), color, 1, cv2.LINE_AA)
        cv2.putText(big, f"{det.size[0]} {det.phrase}", (max(x0, 1), max(y0 - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.3, color, 1, cv2.LINE_AA)  # fmt: skip
    verdict = "PASS" if score.passed else "FAIL"
    return label(big, title if title is not None else verdict, height=14)
