"""Pre-encoded VAE latents of Shapes scenes, so latent diffusion training neither renders nor encodes per step.

Why: on a CPU, rendering a batch and encoding it through the frozen VAE costs about a third of a t2i
step, and the VAE never changes while a UNet trains. Like diffusers' SDXL example (which precomputes
VAE encodings with `datasets.map`), the posterior is computed once. The cache keeps the posterior's
parameters (mean and log-variance, diffusers' `DiagonalGaussianDistribution.parameters`), so training
still draws a fresh latent each time it sees a scene, as on-the-fly encoding does.

A cache folder holds
    latent_cache.json          what it was made from: VAE fingerprint, split, seed, resolution, n, shard size
    shard_00000.jsonl          one line per scene: {"scene_index": i, "captions": [...]}
    shard_00000.safetensors    `latent_params` (S, 2C, h, w) float16; written last, so it marks the shard done
Each shard is written to a temporary name and renamed, so an interrupted build resumes at the first
missing shard, and a larger `n` extends an existing cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmsynth.data.torch_dataset import EpochOrder, ShapesDataset, collate
from mmsynth.errors import InputError
from mmsynth.io import check_writable, read_jsonl, write_json
from mmsynth.train.config import MAX_WORKERS

__all__ = ["CACHE_FILE", "LatentCacheExamples", "build_latent_cache", "is_latent_cache", "vae_fingerprint"]

CACHE_FILE = "latent_cache.json"
FORMAT = "mmsynth-latent-cache/1"


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """SHA-256 of the VAE's weights as float32: a cache is only valid for the exact VAE that made it."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def is_latent_cache(path: str | Path) -> bool:
    return (Path(path) / CACHE_FILE).is_file()


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def _read_info(folder: Path) -> dict[str, Any]:
    try:
        info = json.loads((folder / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{folder / CACHE_FILE} is not a readable latent cache description: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise InputError(f"{folder / CACHE_FILE} is not an mmsynth latent cache (expected format '{FORMAT}')")
    return info


@torch.no_grad()
def build_latent_cache(
    vae_source: str | Path,
    out: str | Path,
    n: int,
    split: str = "train",
    seed: int = 0,
    resolution: int | None = None,
    shard_size: int = 8192,
    batch_size: int = 64,
    num_workers: int = 1,
    mixed_precision: str = "no",
    progress: bool = True,
) -> Path:
    """Encode Shapes scenes 0..n-1 of `split` with the VAE in `vae_source` (a folder with vae/) into `out`.

    Resumable: shards already written are kept; the settings must match the existing cache's.
    `mixed_precision="bf16"` encodes under CPU bf16 autocast (~2.5x faster on CPUs with bf16 units,
    what the trainer's bf16 mode does per step anyway); "no" encodes in float32.
    """
    from mmsynth.models.bundle import load_component

    if n <= 0 or shard_size <= 0 or batch_size <= 0:
        raise InputError(f"n, shard size and batch size must be positive, got {n}, {shard_size}, {batch_size}")
    if not 0 <= num_workers <= MAX_WORKERS:
        raise InputError(f"--workers must be in [0, {MAX_WORKERS}], got {num_workers}")
    if mixed_precision not in ("no", "bf16"):
        raise InputError(f"mixed precision must be 'no' or 'bf16', got '{mixed_precision}'")
    bf16 = mixed_precision == "bf16"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; expected a cache folder")
    if not is_latent_cache(out) and out.is_dir() and any(out.iterdir()):
        raise InputError(f"'{out}' exists and is not a latent cache; use an empty or new folder")
    check_writable(out, "--out", out)
    vae = load_component(vae_source, "vae").eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = vae.config.sample_size
    resolution = int(resolution or (size if isinstance(size, int) else size[0]))
    if resolution % factor:
        raise InputError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    info = {
        "format": FORMAT,
        "vae": str(vae_source),
        "vae_sha256": vae_fingerprint(vae),
        "split": split,
        "seed": seed,
        "resolution": resolution,
        "latent_shape": [2 * vae.config.latent_channels, resolution // factor, resolution // factor],
        "shard_size": shard_size,
        "mixed_precision": mixed_precision,
        "n": n,
    }
    if is_latent_cache(out):
        old = _read_info(out)
        for key in ("vae_sha256", "split", "seed", "resolution", "shard_size", "mixed_precision"):
            if old.get(key) != info[key]:
                raise InputError(
                    f"'{out}' holds a latent cache with {key}={old.get(key)!r}, this build asks {key}={info[key]!r}; "
                    "use another --out folder"
                )
        info["n"] = max(n, int(old["n"]))  # extending keeps every scene already cached
    out.mkdir(parents=True, exist_ok=True)
    write_json(info, out / CACHE_FILE)

    examples = ShapesDataset(split, seed, resolution)
    shards = math.ceil(info["n"] / shard_size)
    todo = [k for k in range(shards) if not (out / f"{_shard_name(k)}.safetensors").is_file()]
    bar = tqdm(total=len(todo) * shard_size, desc="encode latents", unit="scene", disable=not progress)
    for k in todo:
        indices = range(k * shard_size, (k + 1) * shard_size)  # every shard is full, also past n
        batches = [list(indices[i : i + batch_size]) for i in range(0, shard_size, batch_size)]
        loader = DataLoader(examples, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
        params, lines = [], []
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                params.append(vae.encode(batch["pixel_values"]).latent_dist.parameters.to(torch.float16))
            lines += [{"scene_index": i, "captions": c} for i, c in zip(batch["index"], batch["captions"])]
            bar.update(len(batch["index"]))
        name = _shard_name(k)
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")
        tmp = out / f".{name}.safetensors.tmp"
        save_file({"latent_params": torch.cat(params).contiguous()}, str(tmp))
        tmp.replace(out / f"{name}.safetensors")
    bar.close()
    return out


class LatentCacheExamples(Dataset):
    """A latent cache read endlessly: epoch e visits its scenes in a permutation seeded by (seed, e).

    Example i gives `latent_params` (posterior mean and log-variance) and one of the scene's true
    captions, picked by i, so later epochs pair a scene with other captions.
    """

    def __init__(self, folder: str | Path, seed: int = 0, resolution: int | None = None, split: str | None = None):
        self.folder, self.seed = Path(folder), seed
        self.info = _read_info(self.folder)
        if split is not None and self.info["split"] != split:
            raise InputError(f"latent cache '{folder}' holds split '{self.info['split']}', the config asks '{split}'")
        if resolution is not None and int(self.info["resolution"]) != resolution:
            raise InputError(
                f"latent cache '{folder}' was encoded at {self.info['resolution']} px; the model expects {resolution}"
            )
        self.n, self.shard_size = int(self.info["n"]), int(self.info["shard_size"])
        missing = [
            k for k in range(math.ceil(self.n / self.shard_size))
            if not (self.folder / f"{_shard_name(k)}.safetensors").is_file()
        ]  # fmt: skip
        if missing:
            raise InputError(
                f"latent cache '{folder}' is incomplete ({len(missing)} shards missing, "
                f"first {_shard_name(missing[0])}); rerun `mmsynth data cache-latents` with the same arguments"
            )
        self.captions: list[list[str]] = []
        for k in range(math.ceil(self.n / self.shard_size)):
            self.captions += [row["captions"] for _, row, _ in read_jsonl(self.folder / f"{_shard_name(k)}.jsonl")]
        del self.captions[self.n :]
        self._handles: dict[int, Any] = {}  # opened lazily, so each DataLoader worker maps the files itself
        self._order = EpochOrder(self.n, seed)

    def __len__(self) -> int:
        return 2**62

    def check_vae(self, vae: torch.nn.Module, where: str) -> None:
        """Refuse to train against latents of another VAE than the one the recipe decodes with."""
        if vae_fingerprint(vae) != self.info["vae_sha256"]:
            raise InputError(
                f"latent cache '{self.folder}' was encoded with the VAE in '{self.info['vae']}', which differs from "
                f"{where}; rebuild the cache with that VAE or point {where} at the cache's"
            )

    def _params(self, j: int) -> torch.Tensor:
        shard, row = divmod(j, self.shard_size)
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / f"{_shard_name(shard)}.safetensors"), framework="pt")
        return self._handles[shard].get_slice("latent_params")[row : row + 1][0].float()

    def __getitem__(self, index: int) -> dict[str, Any]:
        j = self._order(index)
        caps = self.captions[j]
        pick = int(np.random.default_rng([self.seed, int(index), 0xCAB]).integers(len(caps)))
        return {"latent_params": self._params(j), "caption": caps[pick], "captions": caps, "index": int(index)}
