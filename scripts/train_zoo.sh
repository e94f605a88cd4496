#!/usr/bin/env bash
# Train the Shapes zoo on this machine, in order: CLIP, VAE (then its edge-weighted second stage,
# configs/vae_edges.yaml), the latent cache and the text-to-image UNet, then the CLIP's
# vision side against its fixed text tower in six stages, each from the one before (configs/clip_vision.yaml,
# clip_vision_deep.yaml, clip_vision_patch4.yaml, clip_vision_patch4_more.yaml, clip_vision_8l.yaml,
# clip_vision_8l_more.yaml; run folders runs/STAGE).
# Each step resumes from its newest checkpoint, so rerunning this script continues where it stopped;
# a finished step leaves runs/STAGE/DONE and is skipped. Extra arguments go to every `mmsynth train`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Use the project virtual environment when there is one (a background shell does not inherit activation).
if [ -f .venv/bin/activate ] && ! command -v mmsynth >/dev/null; then . .venv/bin/activate; fi
for stage in clip vae vae_edges t2i clip_vision clip_vision_deep clip_vision_patch4 clip_vision_patch4_more \
    clip_vision_8l clip_vision_8l_more; do
    recipe=${stage%%_*}
    if [ -f "runs/$stage/DONE" ]; then
        echo "== $stage: done, skipping"
        continue
    fi
    if [ "$stage" = t2i ]; then  # the UNet trains on pre-encoded latents (configs/t2i.yaml: data); resumable
        echo "== latent cache for t2i"
        mmsynth data cache-latents --vae models/shapes-v1 --n 131072 --out runs/latents_shapes_v1 \
            --mixed-precision bf16
    fi
    echo "== training $stage"
    mmsynth train "$recipe" --config "configs/$stage.yaml" --resume "$@"
    touch "runs/$stage/DONE"
done
