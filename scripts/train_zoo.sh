#!/usr/bin/env bash
# Train the Shapes zoo on this machine, in order: CLIP, VAE (then its edge-weighted second stage,
# configs/vae_edges.yaml), the text-to-image UNet, then the CLIP's
# vision side against its fixed text tower (configs/clip_vision.yaml, run folder runs/clip_vision).
# Each step resumes from its newest checkpoint, so rerunning this script continues where it stopped;
# a finished step leaves runs/STAGE/DONE and is skipped. Extra arguments go to every `mmsynth train`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Use the project virtual environment when there is one (a background shell does not inherit activation).
if [ -f .venv/bin/activate ] && ! command -v mmsynth >/dev/null; then . .venv/bin/activate; fi
for stage in clip vae vae_edges t2i clip_vision; do
    recipe=${stage%%_*}
    if [ -f "runs/$stage/DONE" ]; then
        echo "== $stage: done, skipping"
        continue
    fi
    echo "== training $stage"
    mmsynth train "$recipe" --config "configs/$stage.yaml" --resume "$@"
    touch "runs/$stage/DONE"
done
