"""Task files: the packed per-task artifact (adapters + head) of a frozen-backbone model.

Layout (all integers little-endian; see docs/taskfile.md)::

  b"BITPET\\0"   7 bytes magic
  version        uint8 (FORMAT_VERSION)
  header_len     uint32
  header         header_len bytes of compact UTF-8 JSON
  payload        the tensors of header["tensors"], in order, back to back
  crc32          uint32, zlib.crc32 of every byte before it

Tensors are stored in flax layout, kernels ``(in, out)``, row-major. A quantized tensor is its
packed code indices (:func:`bitpet.quant.pack`, ``bits`` per code, LSB-first) followed by
``mu, sigma`` float32 per block ("gaussian" codebook, Eq. 9) or by the ``2**bits`` float32
levels of its own codebook ("kmeans", post-training quantization). Float tensors are float16
(16-bit adapters) or float32. A model rebuilt from a file (:func:`load_into`) is bit-identical
to :func:`bitpet.models.vit.materialize_params` of the model that wrote it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import struct
import tempfile
import zlib
from typing import Any

import numpy as np
from absl import logging

from bitpet import __version__, quant
from bitpet.checkpoints import TASK_PARAM_RE, backbone_fingerprint
from bitpet.models import vit
from bitpet.models.adapters import FLOAT_BITS

MAGIC = b"BITPET\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<7sBI")  # magic, version, header length
_CRC = struct.Struct("<I")
OVERHEAD = _PREFIX.size + _CRC.size  # framing bytes besides the JSON header
CODEBOOKS = ("gaussian", "kmeans", "float")
_REQUIRED = ("variant", "d", "layers", "num_classes", "adapter", "h", "bits", "scale", "blocks")
_REQUIRED += ("std_mode", "head_bits", "tensors")
BLOCK = "Transformer/encoderblock_{i}/"
_ADAPTER_TEMPLATES = {
    "none": (),
    "adaptformer": ("adaptformer/down", "adaptformer/up"),
    "lora": tuple(
        f"MultiHeadDotProductAttention_1/lora_{p}/{m}" for p in "qv" for m in ("down", "up")
    ),
}


class TaskFileError(ValueError):
    """A task file that cannot be written, read or applied; the message says how to fix it."""


class FingerprintMismatchError(TaskFileError):
    """The task file was trained on another backbone than the one it is loaded onto."""


def kib(nbytes: int) -> float:
    """Bytes to KiB (1 KiB = 1024 bytes, the paper's "KB")."""
    return nbytes / 1024.0


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: name, shape, bits (1..8 quantized, 16/32 float), blocks, codebook."""

    name: str
    shape: tuple[int, ...]
    bits: int
    blocks: int = 1
    codebook: str = "gaussian"

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def code_bytes(self) -> int:
        """Bytes of codes (quantized) or raw values (float)."""
        if self.codebook == "float":
            return self.numel * self.bits // 8
        return quant.packed_size(self.numel, self.bits)

    @property
    def stats_bytes(self) -> int:
        """Bytes of mu/sigma per block (gaussian) or of the levels (kmeans)."""
        return {"float": 0, "gaussian": 8 * self.blocks, "kmeans": 4 * 2**self.bits}[self.codebook]

    @property
    def nbytes(self) -> int:
        """Payload bytes of this tensor."""
        return self.code_bytes + self.stats_bytes

    def check(self) -> TensorSpec:
        """Validates the spec; raises TaskFileError naming the problem."""
        where = f"tensor {self.name!r}"
        if self.codebook not in CODEBOOKS:
            raise TaskFileError(f"{where}: codebook {self.codebook!r} not in {list(CODEBOOKS)}.")
        if not self.shape or any(not isinstance(s, int) or s < 1 for s in self.shape):
            raise TaskFileError(f"{where}: invalid shape {self.shape!r}.")
        float_ok = self.codebook == "float" and self.bits in FLOAT_BITS
        if not float_ok and not (self.codebook != "float" and self.bits in quant.SUPPORTED_BITS):
            raise TaskFileError(
                f"{where}: bits={self.bits!r} with codebook {self.codebook!r}; allowed: "
                f"1..8 for a quantized tensor, 16 or 32 for a float one."
            )
        if not isinstance(self.blocks, int) or self.blocks < 1 or self.numel % self.blocks:
            raise TaskFileError(
                f"{where}: blocks={self.blocks!r} must be a positive divisor of {self.numel}."
            )
        if self.codebook != "gaussian" and self.blocks != 1:
            raise TaskFileError(f"{where}: blocks must be 1 for codebook {self.codebook!r}.")
        return self


@dataclasses.dataclass
class Tensor:
    """A stored tensor with its data: codes + stats (quantized) or values (float)."""

    spec: TensorSpec
    codes: np.ndarray | None = None  # int32, spec.shape
    mu: np.ndarray | None = None  # float32 [blocks]        (gaussian)
    sigma: np.ndarray | None = None  # float32 [blocks]     (gaussian)
    levels: np.ndarray | None = None  # float32 [2**bits]   (kmeans)
    values: np.ndarray | None = None  # float16/float32, spec.shape (float)

    def decode(self) -> np.ndarray:
        """The float32 weights (Eq. 9 for the gaussian codebook)."""
        s = self.spec
        if s.codebook == "float":
            return np.asarray(self.values).astype(np.float32).reshape(s.shape)
        if s.codebook == "kmeans":
            return np.asarray(self.levels, np.float32)[self.codes].reshape(s.shape)
        return quant.dequantize(self.codes, self.mu, self.sigma, s.bits).reshape(s.shape)

    def to_bytes(self) -> bytes:
        """Serialises codes then stats (or the raw values)."""
        s = self.spec
        if s.codebook == "float":
            dt = "<f2" if s.bits == 16 else "<f4"
            return np.ascontiguousarray(self.values, dtype=dt).reshape(s.shape).tobytes()
        out = [quant.pack(np.asarray(self.codes).reshape(s.shape), s.bits).tobytes()]
        if s.codebook == "kmeans":
            out.append(np.asarray(self.levels, "<f4").reshape(2**s.bits).tobytes())
        else:
            stats = np.stack([np.asarray(self.mu, "<f4"), np.asarray(self.sigma, "<f4")], 1)
            out.append(stats.reshape(2 * s.blocks).tobytes())
        return b"".join(out)

    @classmethod
    def from_bytes(cls, spec: TensorSpec, data: bytes) -> Tensor:
        """Parses exactly ``spec.nbytes`` bytes."""
        if len(data) != spec.nbytes:
            raise TaskFileError(f"tensor {spec.name!r}: {len(data)} bytes, {spec.nbytes} needed.")
        if spec.codebook == "float":
            dt = "<f2" if spec.bits == 16 else "<f4"
            return cls(spec, values=np.frombuffer(data, dt).reshape(spec.shape).copy())
        codes = quant.unpack(
            np.frombuffer(data[: spec.code_bytes], np.uint8), spec.bits, spec.numel
        )
        stats = np.frombuffer(data[spec.code_bytes :], "<f4").astype(np.float32)
        codes = codes.reshape(spec.shape)
        if spec.codebook == "kmeans":
            return cls(spec, codes=codes, levels=stats)
        return cls(spec, codes=codes, mu=stats[0::2].copy(), sigma=stats[1::2].copy())


# ----------------------------------------------------------------------------------------
# Layout of a model's task tensors.


def model_meta(model: vit.VisionTransformer) -> dict[str, Any]:
    """The structural metadata of ``model`` that a task file records."""
    v = vit.get_variant(model.variant)
    a = model.adapter
    return dict(
        variant=model.variant,
        d=v.hidden_size,
        layers=v.num_layers,
        num_classes=int(model.num_classes),
        adapter=a.kind,
        h=int(a.hidden),
        bits=int(a.bits),
        scale=float(a.scale),
        blocks=int(a.blocks),
        std_mode=a.std_mode,
        head_bits=int(model.head_bits),
    )


def plan(meta: dict[str, Any], *, kmeans: bool = False) -> list[list]:
    """The header's tensor list for ``meta``: ``[name, shape, bits, blocks, codebook]`` rows.

    ``kmeans=True``: quantized adapters carry their own k-means levels (post-training
    quantization) instead of mu/sigma. Names containing ``{i}`` are per encoder block and are
    stored block-major (for each block all of them, in list order); they come first, followed
    by the head.
    """
    d, h, bits = meta["d"], meta["h"], meta["bits"]
    if meta["adapter"] not in _ADAPTER_TEMPLATES:
        raise TaskFileError(f"adapter {meta['adapter']!r} not in {list(_ADAPTER_TEMPLATES)}.")
    rows = []
    for t in _ADAPTER_TEMPLATES[meta["adapter"]]:
        shape = [d, h] if t.endswith("down") else [h, d]
        if bits in FLOAT_BITS:
            rows.append([f"{BLOCK}{t}/kernel", shape, bits, 1, "float"])
        elif kmeans:
            rows.append([f"{BLOCK}{t}/kernel", shape, bits, 1, "kmeans"])
        else:
            rows.append([f"{BLOCK}{t}/kernel", shape, bits, meta["blocks"], "gaussian"])
    c = meta["num_classes"]
    if meta["head_bits"] == 32:
        rows += [["head/kernel", [d, c], 32, 1, "float"], ["head/bias", [c], 32, 1, "float"]]
    else:
        rows.append(["head/kernel", [d, c], meta["head_bits"], 1, "gaussian"])
    return rows


def expand(meta: dict[str, Any]) -> list[TensorSpec]:
    """The concrete, validated tensor specs of a header, in payload order."""
    try:
        rows = [(str(n), tuple(s), b, k, str(c)) for n, s, b, k, c in meta["tensors"]]
        layers = int(meta["layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise TaskFileError(f"malformed tensor list in the header: {e!r}") from None
    per_block = [r for r in rows if "{i}" in r[0]]
    if rows[: len(per_block)] != per_block:
        raise TaskFileError("header tensor list: per-block ({i}) tensors must come first.")
    specs = [
        TensorSpec(n.format(i=i), s, b, k, c) for i in range(layers) for n, s, b, k, c in per_block
    ]
    specs += [TensorSpec(*r) for r in rows[len(per_block) :]]
    return [s.check() for s in specs]


# ----------------------------------------------------------------------------------------
# Encoding.


def encode(
    model: vit.VisionTransformer,
    params: dict,
    *,
    encoded: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Encodes the task tensors of ``params`` (trained, not materialized) as ``model`` stores them.

    Quantized kernels go through :func:`bitpet.quant.quantize_with_codes` (codes and float32
    stats, exactly as :func:`bitpet.models.vit.materialize_params`); 16-bit adapters are
    rounded to float16; 32-bit tensors are kept as float32. Tensors given in ``encoded``
    (e.g. k-means codes from :mod:`bitpet.ptq`) are taken as they are.

    Returns:
      ``{name: Tensor}`` in payload order.
    """
    encoded = dict(encoded or {})
    flat = vit.param_names(params)
    meta = model_meta(model)
    kmeans = any(t.spec.codebook == "kmeans" for t in encoded.values())
    out = {}
    for spec in expand({**meta, "tensors": plan(meta, kmeans=kmeans)}):
        if spec.name in encoded:
            if encoded[spec.name].spec != spec:
                raise TaskFileError(
                    f"{spec.name}: encoded tensor {encoded.pop(spec.name).spec} does not fit "
                    f"the model's layout {spec}."
                )
            out[spec.name] = encoded.pop(spec.name)
            continue
        if spec.name not in flat:
            raise TaskFileError(
                f"params lack {spec.name!r} (shape {spec.shape}) that a {meta['adapter']} "
                f"h={meta['h']} model with head_bits={meta['head_bits']} stores."
            )
        w = np.asarray(flat[spec.name], np.float32)
        if w.shape != spec.shape:
            raise TaskFileError(f"{spec.name}: params have shape {w.shape}, model {spec.shape}.")
        if spec.codebook == "float":
            out[spec.name] = Tensor(spec, values=w.astype(np.float16 if spec.bits == 16 else "f4"))
            continue
        if model.materialized:
            raise TaskFileError(
                f"{spec.name}: the model is in evaluation form (materialized=True), whose "
                "kernels no longer hold the trained weights; write the trained model and params "
                "(or pass encoded= tensors, e.g. from bitpet.ptq)."
            )
        _, idx, mu, sigma = quant.quantize_with_codes(
            w, spec.bits, blocks=spec.blocks, std_mode=model.adapter.std_mode
        )
        out[spec.name] = Tensor(
            spec,
            codes=np.asarray(idx, np.int32),
            mu=np.asarray(mu, np.float32),
            sigma=np.asarray(sigma, np.float32),
        )
    if encoded:
        raise TaskFileError(f"encoded tensors the model does not store: {sorted(encoded)}")
    return out


def _has_backbone(params: dict) -> bool:
    return any(not TASK_PARAM_RE.fullmatch(n) for n in vit.param_names(params))


def build_header(meta: dict[str, Any]) -> bytes:
    """Compact JSON header bytes (sorted keys, no spaces)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def serialize(meta: dict[str, Any], tensors: dict[str, Tensor]) -> bytes:
    """The complete file bytes for a header ``meta`` (with "tensors") and matching tensors."""
    specs = expand(meta)
    if [s.name for s in specs] != list(tensors):
        missing = sorted({s.name for s in specs} - set(tensors))
        extra = sorted(set(tensors) - {s.name for s in specs})
        if missing or extra:
            raise TaskFileError(
                f"tensors do not match the header: missing {missing}, extra {extra}"
            )
    parts = []
    for spec in specs:
        t = tensors[spec.name]
        if t.spec != spec:
            raise TaskFileError(f"{spec.name}: tensor spec {t.spec} differs from header {spec}.")
        parts.append(t.to_bytes())
    header = build_header(meta)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def atomic_write(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temp file in the same directory and os.replace."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(
        prefix=os.path.basename(path) + ".", dir=os.path.dirname(path) or "."
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write(
    path: str,
    model: vit.VisionTransformer,
    params: dict,
    *,
    task: str,
    method: str,
    fingerprint: str | None = None,
    encoded: dict[str, Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> int:
    """Writes the task file of a trained model atomically.

    Args:
      path: output file.
      model: the trained model (``materialized=False``), or any model when ``encoded`` is given.
      params: the model's params (``variables["params"]``); only adapters and head are stored.
        When they include the backbone, its fingerprint is computed from them.
      task: task name, e.g. "cifar100".
      method: method name, e.g. "bi_lora".
      fingerprint: :func:`bitpet.checkpoints.backbone_fingerprint` of the backbone; default:
        computed from ``params`` (stored as null, with a warning, if they hold no backbone).
      encoded: pre-encoded tensors (e.g. k-means codes from :mod:`bitpet.ptq`) replacing the
        default encoding of the same names.
      extra: additional JSON-serialisable metadata (stored under "extra").

    Returns:
      The number of bytes written.
    """
    meta = model_meta(model)
    tensors = encode(model, params, encoded=encoded)
    rows = plan(meta, kmeans=any(t.spec.codebook == "kmeans" for t in tensors.values()))
    if fingerprint is None:
        if _has_backbone(params):
            fingerprint = backbone_fingerprint(params)
        else:
            logging.warning("%s: params hold no backbone; the file records no fingerprint.", path)
    meta.update(
        method=str(method),
        task=str(task),
        fingerprint=fingerprint,
        bitpet=__version__,
        tensors=rows,
    )
    if extra:
        meta["extra"] = extra
    data = serialize(meta, tensors)
    atomic_write(path, data)
    return len(data)


# ----------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass
class TaskFile:
    """A parsed task file: header metadata, stored tensors and their decoded float32 weights."""

    meta: dict[str, Any]
    records: dict[str, Tensor]
    tensors: dict[str, np.ndarray]
    nbytes: int
    header_nbytes: int
    path: str | None = None

    def __getattr__(self, key: str) -> Any:  # task, method, num_classes, fingerprint, ...
        meta = self.__dict__.get("meta", {})
        if key in meta:
            return meta[key]
        raise AttributeError(key)

    def model_config(self) -> dict[str, Any]:
        """The ``config.model`` keys (see :func:`bitpet.models.vit.from_config`) of the file."""
        m = self.meta
        keys = ("variant", "adapter", "h", "bits", "scale", "blocks", "std_mode", "head_bits")
        return {k: m[k] for k in keys}

    def model(self, *, dtype: str = "float32") -> vit.VisionTransformer:
        """The evaluation-form model (``materialized=True``) the file's tensors fit."""
        cfg = dict(self.model_config(), dtype=dtype)
        return vit.from_config(cfg, self.meta["num_classes"]).clone(materialized=True)


def _fail(path, msg: str):
    raise TaskFileError(f"{path}: {msg}")


def parse(data: bytes, path: str = "<bytes>") -> TaskFile:
    """Parses and validates the bytes of a task file (see :func:`read`)."""
    if data[: len(MAGIC)] != MAGIC and not (len(data) < len(MAGIC) and MAGIC.startswith(data)):
        _fail(
            path,
            f"not a bitpet task file (magic {data[:7]!r}, expected {MAGIC!r}). A raw .bin "
            "of the original PETL-ViT release is imported with "
            "`python -m bitpet import-original BIN --out FILE`.",
        )
    if len(data) < _PREFIX.size:
        _fail(path, f"truncated: {len(data)} bytes is shorter than the file prefix.")
    _, version, hlen = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        _fail(
            path,
            f"task-file format version {version}; this bitpet ({__version__}) reads version "
            f"{FORMAT_VERSION}. Use the bitpet release that wrote it, or re-export the file.",
        )
    if len(data) < _PREFIX.size + hlen + _CRC.size:
        _fail(
            path,
            f"truncated or corrupt: {len(data)} bytes cannot hold a {hlen}-byte header. "
            "Re-export or re-download the file.",
        )
    try:
        meta = json.loads(data[_PREFIX.size : _PREFIX.size + hlen].decode("utf-8"))
        specs = expand(meta)
    except (UnicodeDecodeError, json.JSONDecodeError, TaskFileError) as e:
        crc_ok = _CRC.unpack_from(data, len(data) - 4)[0] == zlib.crc32(data[:-4])
        why = "invalid header" if crc_ok else "corrupt or truncated (checksum mismatch)"
        _fail(path, f"{why}: {e}. Re-export or re-download the file.")
    expected = _PREFIX.size + hlen + sum(s.nbytes for s in specs) + _CRC.size
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        _fail(
            path,
            f"{kind}: {len(data)} bytes, the header describes {expected}. "
            "Re-export or re-download the file.",
        )
    if _CRC.unpack_from(data, len(data) - 4)[0] != zlib.crc32(data[:-4]):
        _fail(path, "corrupt: CRC32 checksum mismatch. Re-export or re-download the file.")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        _fail(path, f"header lacks {missing}. Re-export the file.")
    try:
        v = vit.get_variant(meta["variant"])
        if (meta["d"], meta["layers"]) != (v.hidden_size, v.num_layers):
            raise TaskFileError(
                f"d={meta['d']}, layers={meta['layers']} do not match variant "
                f"{meta['variant']} ({v.hidden_size}, {v.num_layers})"
            )
        kmeans = any(s.codebook == "kmeans" for s in specs)
        planned = expand({**meta, "tensors": plan(meta, kmeans=kmeans)})
    except (TaskFileError, TypeError, ValueError) as e:
        _fail(path, f"invalid header metadata: {e}")
    if planned != specs:
        diff = next((a, b) for a, b in itertools.zip_longest(planned, specs) if a != b)
        _fail(
            path,
            f"header tensor list disagrees with its metadata ({meta['adapter']} h={meta['h']} "
            f"bits={meta['bits']} head_bits={meta['head_bits']}): expected {diff[0]}, "
            f"found {diff[1]}. The file is inconsistent; re-export it.",
        )
    records, tensors, off = {}, {}, _PREFIX.size + hlen
    for spec in specs:
        rec = Tensor.from_bytes(spec, data[off : off + spec.nbytes])
        off += spec.nbytes
        w = rec.decode()
        if not np.all(np.isfinite(w)):
            _fail(path, f"tensor {spec.name!r} decodes to non-finite values.")
        records[spec.name], tensors[spec.name] = rec, w
    return TaskFile(meta, records, tensors, len(data), hlen + OVERHEAD, path)


def read(path: str) -> TaskFile:
    """Reads and validates a task file.

    Raises:
      TaskFileError: wrong magic or version, truncated or corrupt (CRC32) file, or an invalid
        header (e.g. bits out of range). No weights are returned from a bad file.
    """
    with open(path, "rb") as f:
        return parse(f.read(), os.fspath(path))


# ----------------------------------------------------------------------------------------
# Loading onto a backbone.

_STRUCTURAL = ("variant", "adapter", "h", "bits", "blocks", "head_bits", "std_mode")


def _cfg_get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def load_into(
    taskfile: TaskFile | str,
    backbone_params: dict,
    model_cfg: Any = None,
    *,
    allow_fingerprint_mismatch: bool = False,
) -> tuple[vit.VisionTransformer, dict]:
    """Applies a task file to a backbone: the evaluation-form model and its params.

    Quantized weights are rebuilt once by Eq. 9 (:func:`bitpet.quant.dequantize`); the result
    is bit-identical to :func:`bitpet.models.vit.materialize_params` of the writing model.

    Args:
      taskfile: a :class:`TaskFile` or a path.
      backbone_params: params (nested or flat "a/b" names, or a ``{"params": ...}`` variables
        dict) holding the backbone; task tensors in it are ignored.
      model_cfg: optional ``config.model``; its dtype/remat are used, and structural keys
        (variant, adapter, h, bits, blocks, head_bits, std_mode) must agree with the file.
      allow_fingerprint_mismatch: load even if the backbone's fingerprint differs.

    Returns:
      ``(model with materialized=True, params)``.

    Raises:
      FingerprintMismatchError: another backbone (unless allowed).
      TaskFileError: config or shapes that do not fit.
    """
    import jax
    import jax.numpy as jnp

    tf = read(taskfile) if isinstance(taskfile, str | os.PathLike) else taskfile
    where = tf.path or "task file"
    diffs = []
    for key in _STRUCTURAL:
        want = _cfg_get(model_cfg, key)
        if want is not None and want != tf.meta[key]:
            diffs.append(f"{key}: config {want!r} vs file {tf.meta[key]!r}")
    scale = _cfg_get(model_cfg, "scale")
    if scale and float(scale) != float(tf.meta["scale"]):
        diffs.append(f"scale: config {scale!r} vs file {tf.meta['scale']!r}")
    if diffs:
        raise TaskFileError(
            f"{where} does not fit the model config ({'; '.join(diffs)}). Build the model from "
            "the file (model_cfg=None) or fix the config."
        )
    model = tf.model(dtype=_cfg_get(model_cfg, "dtype", "float32"))
    if _cfg_get(model_cfg, "remat"):
        model = model.clone(remat=True)

    flat_in = vit.param_names(backbone_params)
    if flat_in and all(n.startswith("params/") for n in flat_in):  # a variables dict
        flat_in = {n[len("params/") :]: v for n, v in flat_in.items()}
    backbone = {n: v for n, v in flat_in.items() if not TASK_PARAM_RE.fullmatch(n)}
    want_fp = tf.meta.get("fingerprint")
    if want_fp is None:
        logging.warning("%s records no backbone fingerprint; it cannot be verified.", where)
    else:
        got = backbone_fingerprint(backbone)
        if got != want_fp:
            msg = (
                f"{where} was trained on backbone {want_fp}, but the given backbone is {got}. "
                "Load the backbone it was trained with (same checkpoint, variant and image "
                "size), or pass allow_fingerprint_mismatch=True / --allow-fingerprint-mismatch."
            )
            if not allow_fingerprint_mismatch:
                raise FingerprintMismatchError(msg)
            logging.warning("%s (overridden)", msg)

    v = vit.get_variant(model.variant)
    pos = backbone.get("Transformer/posembed_input/pos_embedding")
    grid = int(round(math.sqrt(np.shape(pos)[1] - 1))) if pos is not None else 14
    images = jax.ShapeDtypeStruct((1, grid * v.patch_size, grid * v.patch_size, 3), jnp.float32)
    shapes = vit.param_names(jax.eval_shape(model.init, jax.random.key(0), images)["params"])
    problems = []
    for name, sds in shapes.items():
        src = tf.tensors if TASK_PARAM_RE.fullmatch(name) else backbone
        where_from = "task file" if src is tf.tensors else "backbone"
        if name not in src:
            problems.append(f"missing from the {where_from}: {name} {tuple(sds.shape)}")
        elif tuple(np.shape(src[name])) != tuple(sds.shape):
            problems.append(
                f"{name}: {where_from} {tuple(np.shape(src[name]))} vs model {tuple(sds.shape)}"
            )
    problems += [f"unexpected in the task file: {n}" for n in tf.tensors if n not in shapes]
    if problems:
        shown = "\n  ".join(problems[:20])
        raise TaskFileError(
            f"{where} ({model.variant}, {tf.meta['adapter']} h={tf.meta['h']}, "
            f"{tf.meta['num_classes']} classes) does not fit the backbone:\n  {shown}\n"
            "Use the backbone variant the file was written for."
        )
    flat = dict(backbone)
    flat.update({n: jnp.asarray(w) for n, w in tf.tensors.items()})
    return model, vit.unflatten(flat)


# ----------------------------------------------------------------------------------------
# Size accounting.


@dataclasses.dataclass
class SizeReport:
    """Byte counts of a task file (KiB = 1024 bytes)."""

    rows: list[dict[str, Any]]
    adapter_bytes: int
    head_bytes: int
    header_bytes: int  # JSON header + magic, version, length and CRC32

    @property
    def total_bytes(self) -> int:
        """Whole file size."""
        return self.adapter_bytes + self.head_bytes + self.header_bytes

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (bytes and KiB)."""
        out = {"rows": self.rows}
        for k in ("adapter", "head", "header", "total"):
            b = getattr(self, f"{k}_bytes")
            out[f"{k}_bytes"], out[f"{k}_kib"] = b, round(kib(b), 4)
        return out

    def format(self, *, per_matrix: bool = True) -> str:
        """A human-readable table."""
        lines = []
        if per_matrix:
            lines.append(f"{'tensor':<66} {'shape':>11} {'bits':>4} {'blk':>3} {'bytes':>9}")
            for r in self.rows:
                shape = "x".join(map(str, r["shape"]))
                lines.append(
                    f"{r['name']:<66} {shape:>11} {r['bits']:>4} {r['blocks']:>3} {r['bytes']:>9}"
                )
        for k in ("adapter", "head", "header", "total"):
            b = getattr(self, f"{k}_bytes")
            label = "adapter payload" if k == "adapter" else k
            lines.append(f"{label:<16} {b:>10} B {kib(b):>10.1f} KiB")
        return "\n".join(lines)


def size_report(source: TaskFile | str | dict | vit.VisionTransformer) -> SizeReport:
    """Per-tensor and total sizes of a task file, a path, a header dict or a model.

    For a model (or a header without "tensors") the layout is planned and the header is sized
    with empty task and method names and a 16-hex-digit fingerprint.
    """
    if isinstance(source, str | os.PathLike):
        source = read(source)
    if isinstance(source, TaskFile):
        meta = source.meta
    elif isinstance(source, vit.VisionTransformer):
        meta = dict(model_meta(source), method="", task="", fingerprint="0" * 16)
        meta.update(bitpet=__version__, tensors=plan(meta))
    else:
        meta = dict(source)
        meta.setdefault("tensors", plan(meta))
    rows, adapter, head = [], 0, 0
    for s in expand(meta):
        rows.append(
            dict(
                name=s.name,
                shape=list(s.shape),
                bits=s.bits,
                blocks=s.blocks,
                codebook=s.codebook,
                code_bytes=s.code_bytes,
                stats_bytes=s.stats_bytes,
                bytes=s.nbytes,
            )
        )
        if re.match(r"head/", s.name):
            head += s.nbytes
        else:
            adapter += s.nbytes
    return SizeReport(rows, adapter, head, len(build_header(meta)) + OVERHEAD)
