"""Numerical parity of bitpet's Flax ViT-B/16 with timm's PyTorch ViT-B/16 on one npz checkpoint.

Both models load the same Google ViT npz (vit_jax naming, as ``ViT-B_16.npz`` from ImageNet-21k):
bitpet through ``bitpet.checkpoints.load_pretrained``, timm through ``model.load_pretrained`` (its
``_load_weights``). The same images go through both, and the pre-head features (class token after
the final LayerNorm) are compared in float32.

Without ``--npz`` a checkpoint with exactly the key names and shapes of the original
``ViT-B_16.npz`` is written with random weights of a trained-like scale (fixed seed).

torch and timm are NOT bitpet dependencies: run this in a scratch venv (see README.md).

    python benchmarks/parity/timm_parity.py [--npz ViT-B_16.npz] [--batch 4] [--sensitivity]

Exits 0 when the relative error ||a - b|| / ||b|| is at most ``--tol`` (default 1e-4).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import types

import numpy as np

HIDDEN, LAYERS, HEADS, MLP, PATCH, TOKENS, IN21K_CLASSES = 768, 12, 12, 3072, 16, 197, 21843


def vit_b16_shapes(num_classes: int = IN21K_CLASSES) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the original ImageNet-21k ``ViT-B_16.npz`` (vit_jax naming)."""
    hd = HIDDEN // HEADS
    s = {
        "embedding/kernel": (PATCH, PATCH, 3, HIDDEN),
        "embedding/bias": (HIDDEN,),
        "cls": (1, 1, HIDDEN),
        "Transformer/posembed_input/pos_embedding": (1, TOKENS, HIDDEN),
        "Transformer/encoder_norm/scale": (HIDDEN,),
        "Transformer/encoder_norm/bias": (HIDDEN,),
        "pre_logits/kernel": (HIDDEN, HIDDEN),
        "pre_logits/bias": (HIDDEN,),
        "head/kernel": (HIDDEN, num_classes),
        "head/bias": (num_classes,),
    }
    for i in range(LAYERS):
        b = f"Transformer/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            s[f"{b}/{ln}/scale"] = (HIDDEN,)
            s[f"{b}/{ln}/bias"] = (HIDDEN,)
        for n in ("query", "key", "value"):
            s[f"{b}/MultiHeadDotProductAttention_1/{n}/kernel"] = (HIDDEN, HEADS, hd)
            s[f"{b}/MultiHeadDotProductAttention_1/{n}/bias"] = (HEADS, hd)
        s[f"{b}/MultiHeadDotProductAttention_1/out/kernel"] = (HEADS, hd, HIDDEN)
        s[f"{b}/MultiHeadDotProductAttention_1/out/bias"] = (HIDDEN,)
        s[f"{b}/MlpBlock_3/Dense_0/kernel"] = (HIDDEN, MLP)
        s[f"{b}/MlpBlock_3/Dense_0/bias"] = (MLP,)
        s[f"{b}/MlpBlock_3/Dense_1/kernel"] = (MLP, HIDDEN)
        s[f"{b}/MlpBlock_3/Dense_1/bias"] = (HIDDEN,)
    return s


def write_random_npz(path: str, seed: int) -> None:
    """Random weights of a trained-like scale.

    Kernels are LeCun-normal (std 1/sqrt(fan_in)), so attention logits have a spread of about 1
    and the softmax is far from uniform (with std 0.02 it would be nearly uniform, hiding errors
    in the attention scale). Biases, cls and position embeddings ~ N(0, 0.02^2); LayerNorm
    scales 1 + N(0, 0.1^2), biases N(0, 0.05^2).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in vit_b16_shapes().items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "kernel":
            if "/out/" in name:
                fan_in = shape[0] * shape[1]  # (heads, head_dim, hidden)
            elif name.startswith("embedding/"):
                fan_in = shape[0] * shape[1] * shape[2]
            else:
                fan_in = shape[0]
            w = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif leaf == "scale":
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "LayerNorm" in name or "encoder_norm" in name:
            w = 0.05 * rng.standard_normal(shape)
        else:  # biases, cls, pos_embedding
            w = 0.02 * rng.standard_normal(shape)
        out[name] = w.astype(np.float32)
    np.savez(path, **out)


def import_timm():
    """Imports timm; works around a torchvision whose C ops do not load.

    timm imports torchvision at module level, but ViT uses nothing from it. PyPI's torchvision
    wheels for Linux are CUDA builds; next to a CPU-only torch their ``_C`` extension does not
    load and ``import torchvision`` raises RuntimeError ("operator torchvision::nms does not
    exist"). Skipping torchvision's fake-kernel registrations lets the pure-Python parts import.
    """
    import torch  # noqa: F401

    note = None
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # RuntimeError from torchvision._meta_registrations
        note = f"torchvision C ops unavailable ({e}); imported without them"
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType(
            "torchvision._meta_registrations"
        )
        import torchvision  # noqa: F401
    import timm

    return timm, note


def bitpet_features(npz: str, images_nhwc: np.ndarray) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    from bitpet.checkpoints import load_pretrained
    from bitpet.models.vit import from_config

    model = from_config({"variant": "B/16"}, num_classes=0)
    init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3), jnp.float32))["params"]
    params = load_pretrained(npz, init)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(
        params, jnp.asarray(images_nhwc)
    )
    return np.asarray(out, np.float64)


def timm_model(timm, npz: str, name: str):
    import torch

    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="token")
    if hasattr(model, "load_pretrained"):
        model.load_pretrained(npz)
    else:
        timm.models.vision_transformer._load_weights(model, npz)
    model.eval()
    # Every weight must come from the npz: compare a few tensors directly.
    w = np.load(npz)
    torch.testing.assert_close(
        model.pos_embed.detach(),
        torch.from_numpy(w["Transformer/posembed_input/pos_embedding"]),
    )
    torch.testing.assert_close(
        model.blocks[-1].mlp.fc2.weight.detach(),
        torch.from_numpy(w[f"Transformer/encoderblock_{LAYERS - 1}/MlpBlock_3/Dense_1/kernel"].T),
    )
    return model


def timm_features(model, images_nhwc: np.ndarray) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    return feats.double().numpy()


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """a: bitpet, b: timm (reference)."""
    diff = np.abs(a - b)
    rel = {t: float((diff[np.abs(b) > t] / np.abs(b[np.abs(b) > t])).max()) for t in (1e-3, 0.1)}
    return {
        "max_abs": float(diff.max()),
        "rel_norm": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "max_rel_elem": rel[1e-3],
        "max_rel_elem_01": rel[0.1],
        "max_abs_ref": float(np.abs(b).max()),
    }


def fmt(d: dict[str, float]) -> str:
    return (
        f"max|a-b| {d['max_abs']:.3e}   ||a-b||/||b|| {d['rel_norm']:.3e}   "
        f"max elementwise rel {d['max_rel_elem']:.3e} (|b|>1e-3), "
        f"{d['max_rel_elem_01']:.3e} (|b|>0.1)   (max|b| {d['max_abs_ref']:.3f})"
    )


def sensitivity(timm_mod, a: np.ndarray, images: np.ndarray) -> None:
    """Perturbs the timm reference in the usual ways and shows the check would catch each."""
    import copy

    import torch

    def gelu_tanh(m):
        for b in m.blocks:
            b.mlp.act = torch.nn.GELU(approximate="tanh")

    def ln_eps_1e5(m):
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.eps = 1e-5

    def attn_scale(m):  # 1/sqrt(hidden) instead of 1/sqrt(head_dim)
        for b in m.blocks:
            b.attn.fused_attn = False
            b.attn.scale = HIDDEN**-0.5

    def no_cls_posemb(m):
        with torch.no_grad():
            m.pos_embed[:, 0] = 0

    print("\nsensitivity (bitpet vs a deliberately altered timm):")
    for name, fn in [
        ("GELU tanh approximation", gelu_tanh),
        ("LayerNorm eps 1e-5", ln_eps_1e5),
        ("attention scale 1/sqrt(768)", attn_scale),
        ("cls position embedding zeroed", no_cls_posemb),
    ]:
        m = copy.deepcopy(timm_mod)
        fn(m)
        print(f"  {name:32s} {fmt(compare(a, timm_features(m, images)))}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npz", help="a real ViT-B/16 npz (vit_jax naming); default: random weights")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="bound on ||a-b||/||b||")
    p.add_argument("--timm-model", default="vit_base_patch16_224.orig_in21k")
    p.add_argument("--keep-npz", help="write the random npz here and keep it")
    p.add_argument("--sensitivity", action="store_true", help="also show perturbed references")
    args = p.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    import flax
    import jax

    timm, tv_note = import_timm()
    import torch

    print(f"date {datetime.date.today().isoformat()}")
    print(
        f"torch {torch.__version__}  timm {timm.__version__}  jax {jax.__version__}  "
        f"flax {flax.__version__}  numpy {np.__version__}  jax backend {jax.default_backend()}"
    )
    if tv_note:
        print(f"note: {tv_note}")

    tmp = None
    if args.npz:
        npz = args.npz
        print(f"checkpoint {npz}")
    else:
        if args.keep_npz:
            npz = args.keep_npz
        else:
            tmp = tempfile.TemporaryDirectory()
            npz = os.path.join(tmp.name, "ViT-B_16-random.npz")
        write_random_npz(npz, args.seed)
        print(f"checkpoint: random weights with ViT-B_16.npz names/shapes, seed {args.seed}")

    rng = np.random.default_rng(args.seed + 1)
    images = rng.random((args.batch, 224, 224, 3), dtype=np.float32)  # [0, 1), NHWC

    a = bitpet_features(npz, images)
    model = timm_model(timm, npz, args.timm_model)
    b = timm_features(model, images)
    assert a.shape == b.shape == (args.batch, HIDDEN), (a.shape, b.shape)
    res = compare(a, b)
    print(f"features {a.shape} (class token after encoder_norm), float32, batch {args.batch}")
    print(f"bitpet vs timm ({args.timm_model}): {fmt(res)}")
    ok = res["rel_norm"] <= args.tol
    print(f"{'PASS' if ok else 'FAIL'}: ||a-b||/||b|| {'<=' if ok else '>'} {args.tol:g}")
    if args.sensitivity:
        sensitivity(model, a, images)
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
