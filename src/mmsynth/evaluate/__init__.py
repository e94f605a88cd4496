"""Layer 6, evaluate: the analytic judge (detect objects, GenEval-like rules) and controllability metrics."""

from mmsynth.evaluate.control_metrics import (
    controllability,
    depth_order_accuracy,
    depth_rmse,
    edge_f1,
    miou,
    palette_error,
    ssim,
)
from mmsynth.evaluate.detect import Detection, detect_objects
from mmsynth.evaluate.judge import JudgeReport, degrade, judge_folder, judge_image, validate
from mmsynth.evaluate.scoring import (
    Expectation,
    ExpectedObject,
    ImageScore,
    Metric,
    aggregate,
    box_iou,
    expectation_from_prompt,
    expectation_from_scene,
    score_image,
)

__all__ = [
    "Detection",
    "Expectation",
    "ExpectedObject",
    "ImageScore",
    "JudgeReport",
    "Metric",
    "aggregate",
    "box_iou",
    "controllability",
    "degrade",
    "depth_order_accuracy",
    "depth_rmse",
    "detect_objects",
    "edge_f1",
    "expectation_from_prompt",
    "expectation_from_scene",
    "judge_folder",
    "judge_image",
    "miou",
    "palette_error",
    "score_image",
    "ssim",
    "validate",
]
