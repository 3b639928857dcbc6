"""Import of the original PETL-ViT release (``binary_adapter`` .bin files) into task files.

The released files (``models_bin/<method>/<task>-bit1-dim<h>.bin``, methods ``adaptformer``,
``adaptformer-bihead``, ``lora``, ``lora-bihead``) are raw bytes without a header. For each
quantized matrix in module order (per block: AdaptFormer down, up; LoRA q down, q up, v down,
v up; then, for "bihead" files, the head) they hold the packed 1-bit code indices (index 0 =
the most negative level, LSB-first, row-major over the PyTorch weight of shape (out, in)),
then mu and sigma as little-endian float32. Non-bihead files end with the float32 head
weight (C x 768, row-major) and bias. The yaml beside each file (``configs/<method>/...``)
gives method, dim (h), bit, scale and num_class. Backbone: ViT-B/16 (ImageNet-21k), d = 768,
12 blocks.

Decoded tensors are transposed to flax's (in, out) layout and keep their codes and stats, so
the imported task file rebuilds exactly the released weights; :func:`encode_original` writes
the original bytes back.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import yaml

from bitpet import quant, taskfile
from bitpet.models import vit

VARIANT = "B/16"
# Release folder -> (bitpet adapter kind, head bits).
RELEASE_METHODS = {
    "adaptformer": ("adaptformer", 32),
    "adaptformer-bihead": ("adaptformer", 1),
    "lora": ("lora", 32),
    "lora-bihead": ("lora", 1),
}
# Release task names that differ from bitpet's (bitpet.data.vtab).
TASK_NAMES = {"cifar": "cifar100"}
STD_MODE = "unbiased"  # the released code standardises with torch's unbiased std


class OriginalFormatError(taskfile.TaskFileError):
    """A released file that does not match its yaml or the documented layout."""


@dataclasses.dataclass(frozen=True)
class ReleaseSpec:
    """What the yaml beside a released file says, mapped to bitpet names."""

    method: str  # release folder name, e.g. "adaptformer-bihead"
    task: str  # bitpet task name, e.g. "cifar100"
    release_task: str  # name in the release, e.g. "cifar"
    bits: int
    h: int
    scale: float
    num_classes: int
    backbone: str = "vit_base_patch16_224_in21k"

    @property
    def adapter(self) -> str:
        """bitpet adapter kind."""
        return RELEASE_METHODS[self.method][0]

    @property
    def head_bits(self) -> int:
        """32 (float head) or 1 (binary head)."""
        return RELEASE_METHODS[self.method][1]

    @property
    def bitpet_method(self) -> str:
        """bitpet's method name (configs/vtab.py), e.g. "bi_lora"."""
        return f"bi_{self.adapter}"


def read_yaml(path: str) -> ReleaseSpec:
    """Reads a release yaml (method, dataset, dim, bit, scale, num_class)."""
    with open(path) as f:
        y = yaml.safe_load(f)
    try:
        method, task = str(y["method"]), str(y["dataset"])
        spec = ReleaseSpec(
            method=method,
            task=TASK_NAMES.get(task, task),
            release_task=task,
            bits=int(y["bit"]),
            h=int(y["dim"]),
            scale=float(y["scale"]),
            num_classes=int(y["num_class"]),
            backbone=str(y.get("backbone", "vit_base_patch16_224_in21k")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise OriginalFormatError(f"{path}: not a release yaml ({e!r}).") from None
    if spec.method not in RELEASE_METHODS:
        raise OriginalFormatError(
            f"{path}: method {spec.method!r}; known release methods: {list(RELEASE_METHODS)}."
        )
    if spec.backbone != "vit_base_patch16_224_in21k":
        raise OriginalFormatError(f"{path}: backbone {spec.backbone!r} is not ViT-B/16 in21k.")
    quant.check_bits(spec.bits)
    return spec


def find_yaml(bin_path: str) -> str:
    """The yaml of ``<root>/models_bin/<method>/<name>.bin``.

    Looks for ``<root>/configs/<method>/<name>.yaml`` (the release layout), then beside the file.
    """
    bin_path = os.path.abspath(bin_path)
    method_dir, name = os.path.split(bin_path)
    models_dir, method = os.path.split(method_dir)
    root = os.path.dirname(models_dir)
    candidates = [
        os.path.join(root, "configs", method, os.path.splitext(name)[0] + ".yaml"),
        os.path.splitext(bin_path)[0] + ".yaml",
    ]
    for c in candidates:
        if os.path.exists(c):
            return c
    raise FileNotFoundError(
        f"No yaml found for {bin_path} (looked for {candidates}); pass --yaml PATH."
    )


def model_for(spec: ReleaseSpec) -> vit.VisionTransformer:
    """The bitpet model (ViT-B/16) a released file belongs to."""
    return vit.VisionTransformer(
        num_classes=spec.num_classes,
        variant=VARIANT,
        adapter=vit.AdapterSpec(
            kind=spec.adapter, hidden=spec.h, bits=spec.bits, scale=spec.scale, std_mode=STD_MODE
        ),
        head_bits=spec.head_bits,
    )


def _specs(spec: ReleaseSpec) -> list[taskfile.TensorSpec]:
    meta = taskfile.model_meta(model_for(spec))
    return taskfile.expand({**meta, "tensors": taskfile.plan(meta)})


def expected_size(spec: ReleaseSpec) -> int:
    """Bytes of a released file: matrices * (numel * b / 8 + 8) (+ the float head)."""
    return sum(s.nbytes for s in _specs(spec))


def decode_original(data: bytes, spec: ReleaseSpec) -> dict[str, taskfile.Tensor]:
    """Parses a released file into task-file tensors (flax layout), in payload order.

    Raises:
      OriginalFormatError: the byte count does not match the yaml's method, dim and classes.
    """
    specs = _specs(spec)
    need = sum(s.nbytes for s in specs)
    if len(data) != need:
        raise OriginalFormatError(
            f"{len(data)} bytes, but a {spec.method} file with h={spec.h}, {spec.bits} bit and "
            f"{spec.num_classes} classes holds {need}: check that the yaml belongs to this file."
        )
    out, off = {}, 0
    for s in specs:
        torch_shape = s.shape[::-1]
        if s.codebook == "float":
            vals = np.frombuffer(data, "<f4", count=s.numel, offset=off).reshape(torch_shape)
            out[s.name] = taskfile.Tensor(s, values=np.ascontiguousarray(vals.T, np.float32))
        else:
            raw = np.frombuffer(data, np.uint8, count=s.code_bytes, offset=off)
            codes = quant.unpack(raw, s.bits, s.numel).reshape(torch_shape)
            mu, sigma = np.frombuffer(data, "<f4", count=2, offset=off + s.code_bytes)
            out[s.name] = taskfile.Tensor(
                s,
                codes=np.ascontiguousarray(codes.T),
                mu=np.array([mu], np.float32),
                sigma=np.array([sigma], np.float32),
            )
        off += s.nbytes
    return out


def encode_original(tensors: dict[str, taskfile.Tensor], spec: ReleaseSpec) -> bytes:
    """Writes tensors back in the release layout (PyTorch (out, in) order, no header)."""
    parts = []
    for s in _specs(spec):
        t = tensors[s.name]
        if t.spec != s:
            raise OriginalFormatError(f"{s.name}: tensor {t.spec} does not fit {s}.")
        if s.codebook == "float":
            parts.append(np.ascontiguousarray(np.asarray(t.values, "<f4").T).tobytes())
        else:
            parts.append(quant.pack(np.asarray(t.codes).T, s.bits).tobytes())
            parts.append(np.array([t.mu[0], t.sigma[0]], "<f4").tobytes())
    return b"".join(parts)


def distinct_values(tensors: dict[str, taskfile.Tensor]) -> dict[str, int]:
    """Number of distinct decoded values of every quantized matrix."""
    return {
        n: int(np.unique(t.decode()).size) for n, t in tensors.items() if t.spec.codebook != "float"
    }


def import_original(
    bin_path: str,
    yaml_path: str | None = None,
    *,
    out: str | None = None,
    fingerprint: str | None = None,
) -> tuple[ReleaseSpec, dict[str, taskfile.Tensor], bytes]:
    """Imports a released file as a bitpet task file.

    Args:
      bin_path: ``.../models_bin/<method>/<task>-bit1-dim<h>.bin``.
      yaml_path: its yaml; default: found beside it (:func:`find_yaml`).
      out: if given, the task file is written there (atomically).
      fingerprint: backbone fingerprint to record (e.g. :func:`backbone_fingerprint_of`);
        default none (the backbone cannot be verified on load).

    Returns:
      ``(spec, tensors, task_file_bytes)``.

    Raises:
      OriginalFormatError: size mismatch, or a 1-bit matrix that does not decode to exactly
        two distinct values.
    """
    spec = read_yaml(yaml_path or find_yaml(bin_path))
    with open(bin_path, "rb") as f:
        raw = f.read()
    tensors = decode_original(raw, spec)
    if spec.bits == 1:
        bad = {n: k for n, k in distinct_values(tensors).items() if k != 2}
        if bad:
            raise OriginalFormatError(
                f"{bin_path}: 1-bit matrices must decode to exactly 2 distinct values: {bad}"
            )
    meta = taskfile.model_meta(model_for(spec))
    meta.update(
        method=spec.bitpet_method,
        task=spec.task,
        fingerprint=fingerprint,
        bitpet=taskfile.__version__,
        tensors=taskfile.plan(meta),
        extra=dict(source=f"PETL-ViT/{spec.method}/{os.path.basename(bin_path)}"),
    )
    data = taskfile.serialize(meta, tensors)
    if out:
        taskfile.atomic_write(out, data)
    return spec, tensors, data


def backbone_fingerprint_of(npz_path: str, image_size: int = 224, variant: str = VARIANT) -> str:
    """Fingerprint of the backbone loaded from ``npz_path`` at ``image_size`` px.

    The same value a training run records (:func:`bitpet.checkpoints.backbone_fingerprint` of
    the params that :func:`bitpet.checkpoints.load_pretrained` returns).
    """
    import jax
    import jax.numpy as jnp

    from bitpet import checkpoints

    model = vit.VisionTransformer(num_classes=1, variant=variant)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    return checkpoints.backbone_fingerprint(checkpoints.load_pretrained(npz_path, shapes))


def summary(spec: ReleaseSpec) -> dict[str, Any]:
    """JSON-friendly description of a release spec."""
    return dataclasses.asdict(spec) | dict(adapter=spec.adapter, head_bits=spec.head_bits)
