"""Loading pretrained ViT backbones from Google's npz checkpoints.

Supported layouts (all detected from the names):

* vit_jax / original ViT release (``ViT-B_16.npz`` from ImageNet-21k, AugReg npz files):
  ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3}``;
* big_vision: optional ``params/`` or ``opt/target/`` prefix, sub-modules numbered
  ``LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0``, and optionally
  scanned blocks stacked along a leading axis under ``Transformer/encoderblock/``.

``pre_logits`` and ``head`` are dropped: bitpet's head is task-specific. Position embeddings
are resampled (bilinear on the patch grid, class token kept) when the image size differs.
Nothing here downloads: a missing file fails at once with instructions.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import scipy.ndimage

from bitpet.models.vit import param_names, unflatten

DOWNLOAD_HINT = (
    "Download it first, e.g. `gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .` "
    "(the original ImageNet-21k ViT-B/16 used by the paper), then pass "
    "--config.init_file=/path/to/ViT-B_16.npz."
)

# Parameters that never come from a backbone checkpoint.
TASK_PARAM_RE = re.compile(r"head/.*|.*/adaptformer/.*|.*/lora_[qv]/.*")
POSEMB = "Transformer/posembed_input/pos_embedding"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists what differs."""


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Reads an npz checkpoint into {name: array}; fails fast with instructions if missing."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Backbone checkpoint {path!r} does not exist. {DOWNLOAD_HINT}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError ...
        raise CheckpointError(f"Cannot read {path!r} as an npz checkpoint: {e}") from e


def normalize_names(ckpt: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps vit_jax, AugReg and big_vision naming onto bitpet's (vit_jax) names.

    Drops ``pre_logits`` and ``head``; unstacks scanned encoder blocks.
    """
    out: dict[str, np.ndarray] = {}
    big_vision = any("MultiHeadDotProductAttention_0" in k for k in ckpt) or any(
        k.startswith(("params/", "opt/target/")) for k in ckpt
    )
    for name, value in ckpt.items():
        for prefix in ("opt/target/", "params/"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if name.startswith(("pre_logits/", "head/")):
            continue
        if big_vision:
            name = (
                name.replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
                .replace("/LayerNorm_1/", "/LayerNorm_2/")
                .replace("MlpBlock_0", "MlpBlock_3")
            )
            if name == "pos_embedding":
                name = POSEMB
        if name.startswith("Transformer/encoderblock/"):  # scanned: leading layer axis
            rest = name[len("Transformer/encoderblock/") :]
            for i in range(value.shape[0]):
                out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
            continue
        out[name] = value
    return out


def resample_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
    """Resamples a (1, 1 + g*g, d) position embedding to (1, num_tokens, d).

    The class-token embedding is kept; the g x g grid is resized bilinearly (scipy zoom,
    order 1) to the new square grid.
    """
    cls, grid = posemb[:, :1], posemb[0, 1:]
    old, new = int(round(np.sqrt(grid.shape[0]))), int(round(np.sqrt(num_tokens - 1)))
    if old * old != grid.shape[0] or new * new != num_tokens - 1:
        raise CheckpointError(
            f"Cannot resample position embedding of {posemb.shape[1]} tokens to {num_tokens}: "
            "only square patch grids plus one class token are supported."
        )
    grid = grid.reshape(old, old, -1)
    grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
    return np.concatenate([cls, grid.reshape(1, new * new, -1)], axis=1).astype(posemb.dtype)


def load_pretrained(path: str, init_params: dict) -> dict:
    """Loads backbone weights from ``path`` into a copy of ``init_params``.

    Adapters and the head keep their initial values; every other parameter of the model must
    come from the checkpoint with the same shape (the position embedding is resampled if only
    its token count differs).

    Args:
      path: npz file.
      init_params: the model's freshly initialised params (nested dict).

    Returns:
      Params with the same structure as ``init_params``.

    Raises:
      FileNotFoundError: missing file (with download instructions).
      CheckpointError: names or shapes that do not fit, all listed.
    """
    ckpt = normalize_names(read_npz(path))
    return unflatten(merge_backbone(param_names(init_params), ckpt, source=path))


def merge_backbone(model: dict[str, np.ndarray], ckpt: dict[str, np.ndarray], source: str):
    """Fills the backbone entries of the flat ``model`` dict from flat ``ckpt``; strict."""
    out, missing, mismatched = {}, [], []
    for name, value in model.items():
        if TASK_PARAM_RE.fullmatch(name):
            out[name] = value
            continue
        if name not in ckpt:
            missing.append(f"{name} {tuple(np.shape(value))}")
            continue
        loaded = ckpt[name]
        if name == POSEMB and loaded.shape != np.shape(value) and loaded.ndim == 3:
            if loaded.shape[-1] == np.shape(value)[-1]:
                loaded = resample_posemb(loaded, np.shape(value)[1])
        if loaded.shape != np.shape(value):
            mismatched.append(f"{name}: checkpoint {loaded.shape} vs model {np.shape(value)}")
            continue
        out[name] = np.asarray(loaded, np.float32)
    unexpected = sorted(set(ckpt) - set(model))
    if missing or mismatched or unexpected:
        parts = [f"Checkpoint {source!r} does not fit the model (wrong variant or file?)."]
        for title, items in (
            ("missing from the checkpoint", missing),
            ("shape mismatch", mismatched),
            ("unexpected in the checkpoint", unexpected),
        ):
            if items:
                shown = "\n    ".join(items[:20])
                more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
                parts.append(f"  {len(items)} {title}:\n    {shown}{more}")
        raise CheckpointError("\n".join(parts))
    return out


def backbone_fingerprint(params: dict) -> str:
    """A short sha256 over the names, shapes and bytes of every backbone (non-task) parameter.

    Task files record it so that adapters are not silently applied to another backbone.
    """
    h = hashlib.sha256()
    for name, value in sorted(param_names(params).items()):
        if TASK_PARAM_RE.fullmatch(name):
            continue
        arr = np.ascontiguousarray(np.asarray(value, np.float32))
        h.update(f"{name}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def save_npz(path: str, params: dict, *, include_task_params: bool = False) -> None:
    """Writes params as an npz with vit_jax names, atomically (temp file + rename)."""
    flat = {
        k: np.asarray(v, np.float32)
        for k, v in param_names(params).items()
        if include_task_params or not TASK_PARAM_RE.fullmatch(k)
    }
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)
