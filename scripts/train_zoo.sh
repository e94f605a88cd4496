#!/usr/bin/env bash
# Train the Shapes zoo on this machine, in order: CLIP, VAE, then the text-to-image UNet.
# Each step resumes from its newest checkpoint, so rerunning this script continues where it stopped;
# a finished step leaves runs/RECIPE/DONE and is skipped. Extra arguments go to every `mmsynth train`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Use the project virtual environment when there is one (a background shell does not inherit activation).
if [ -f .venv/bin/activate ] && ! command -v mmsynth >/dev/null; then . .venv/bin/activate; fi
for recipe in clip vae t2i; do
    if [ -f "runs/$recipe/DONE" ]; then
        echo "== $recipe: done, skipping"
        continue
    fi
    echo "== training $recipe"
    mmsynth train "$recipe" --config "configs/$recipe.yaml" --resume "$@"
    touch "runs/$recipe/DONE"
done
