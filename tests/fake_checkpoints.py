"""Fake ViT checkpoints with the exact names and shapes of Google's npz files.

Nothing here is downloaded or committed: the arrays are random (seeded) and written to a temp
directory by the tests. The default is the original ImageNet-21k ``ViT-B_16.npz`` of the
paper (vit_jax names, a 768 -> 768 ``pre_logits`` layer and a 21,843-class ``head``).
:func:`to_big_vision` renames such a dict to big_vision's layout (``params/`` prefix,
``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``, top-level
``pos_embedding``, optionally scanned blocks stacked under ``Transformer/encoderblock/``).

Usable from any test: ``from tests.fake_checkpoints import fake_vit_checkpoint, write_npz``
(or ``from fake_checkpoints import ...`` when ``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import os

import numpy as np

from bitpet.models import vit

IN21K_CLASSES = 21843


def vit_jax_shapes(
    variant: str = "B/16",
    *,
    image_size: int = 224,
    num_classes: int = IN21K_CLASSES,
    pre_logits: bool = True,
) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a vit_jax checkpoint (e.g. ``ViT-B_16.npz`` from ImageNet-21k)."""
    v = vit.get_variant(variant)
    d, heads, mlp, p = v.hidden_size, v.num_heads, v.mlp_dim, v.patch_size
    hd = d // heads
    tokens = (image_size // p) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "cls": (1, 1, d),
        "embedding/kernel": (p, p, 3, d),
        "embedding/bias": (d,),
        "Transformer/posembed_input/pos_embedding": (1, tokens, d),
        "Transformer/encoder_norm/scale": (d,),
        "Transformer/encoder_norm/bias": (d,),
    }
    for i in range(v.num_layers):
        b = f"Transformer/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            shapes[f"{b}/{ln}/scale"] = (d,)
            shapes[f"{b}/{ln}/bias"] = (d,)
        att = f"{b}/MultiHeadDotProductAttention_1"
        for proj in ("query", "key", "value"):
            shapes[f"{att}/{proj}/kernel"] = (d, heads, hd)
            shapes[f"{att}/{proj}/bias"] = (heads, hd)
        shapes[f"{att}/out/kernel"] = (heads, hd, d)
        shapes[f"{att}/out/bias"] = (d,)
        shapes[f"{b}/MlpBlock_3/Dense_0/kernel"] = (d, mlp)
        shapes[f"{b}/MlpBlock_3/Dense_0/bias"] = (mlp,)
        shapes[f"{b}/MlpBlock_3/Dense_1/kernel"] = (mlp, d)
        shapes[f"{b}/MlpBlock_3/Dense_1/bias"] = (d,)
    if pre_logits:
        shapes["pre_logits/kernel"] = (d, d)
        shapes["pre_logits/bias"] = (d,)
    if num_classes:
        shapes["head/kernel"] = (d, num_classes)
        shapes["head/bias"] = (num_classes,)
    return shapes


def _fill(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    # Uniform noise with the std of a typical trained tensor (uniform draws are faster than
    # normal ones, which matters at ViT-B/16's 102M values).
    if name.endswith("/scale"):  # LayerNorm gains around 1
        std, offset = 0.1, 1.0
    elif name.endswith("/bias"):
        std, offset = 0.01, 0.0
    else:  # kernels, cls, position embedding
        std, offset = 0.02, 0.0
    a = rng.random(shape, dtype=np.float32)
    a -= 0.5
    a *= np.float32(2 * np.sqrt(3) * std)
    if offset:
        a += np.float32(offset)
    return a


def fake_vit_checkpoint(
    variant: str = "B/16",
    *,
    image_size: int = 224,
    num_classes: int = IN21K_CLASSES,
    pre_logits: bool = True,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A vit_jax-named checkpoint dict of random float32 arrays (every tensor distinct).

    Kernels, ``cls`` and the position embedding have std 0.02, biases 0.01, LayerNorm scales
    1 +- 0.1 (uniform noise), so a forward pass stays well-conditioned.

    The defaults reproduce the key names and shapes of the original ImageNet-21k
    ``ViT-B_16.npz``: 224 px (197 tokens), ``pre_logits`` 768 x 768 and a 21,843-class head.
    """
    rng = np.random.default_rng(seed)
    shapes = vit_jax_shapes(
        variant, image_size=image_size, num_classes=num_classes, pre_logits=pre_logits
    )
    return {name: _fill(rng, name, shape) for name, shape in shapes.items()}


_BIG_VISION_RENAMES = (
    ("/MultiHeadDotProductAttention_1/", "/MultiHeadDotProductAttention_0/"),
    ("/LayerNorm_2/", "/LayerNorm_1/"),
    ("/MlpBlock_3/", "/MlpBlock_0/"),
)


def to_big_vision(
    ckpt: dict[str, np.ndarray], *, scan: bool = False, prefix: str = "params/"
) -> dict[str, np.ndarray]:
    """Renames a vit_jax checkpoint dict to big_vision's layout (same arrays).

    With ``scan=True`` the per-block tensors are stacked along a new leading axis under
    ``Transformer/encoderblock/`` (big_vision's ``scan=True`` models).
    """
    out: dict[str, np.ndarray] = {}
    stacked: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, value in ckpt.items():
        for old, new in _BIG_VISION_RENAMES:
            name = name.replace(old, new)
        if name == "Transformer/posembed_input/pos_embedding":
            name = "pos_embedding"
        if scan and name.startswith("Transformer/encoderblock_"):
            block, rest = name[len("Transformer/encoderblock_") :].split("/", 1)
            stacked.setdefault(rest, []).append((int(block), value))
            continue
        out[prefix + name] = value
    for rest, items in stacked.items():
        items.sort(key=lambda t: t[0])
        assert [i for i, _ in items] == list(range(len(items)))
        out[f"{prefix}Transformer/encoderblock/{rest}"] = np.stack([v for _, v in items])
    return out


def write_npz(path: str | os.PathLike, ckpt: dict[str, np.ndarray]) -> str:
    """Writes ``ckpt`` as an uncompressed npz (like the released files); returns the path."""
    path = os.fspath(path)
    with open(path, "wb") as f:
        np.savez(f, **ckpt)
    return path
