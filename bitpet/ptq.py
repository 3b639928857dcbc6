"""Post-training quantization (PTQ) of full-precision adapters: the paper's Table 4d baseline.

A model trained with 32-bit adapters is quantized after training, matrix by matrix, either

* ``codebook="kmeans"``: 1-D k-means (Lloyd's algorithm, squared error) on the matrix's own
  weights, 2**bits levels stored per matrix in the task file (codebook "kmeans"); or
* ``codebook="gaussian"``: the paper's Gaussian codebook (:func:`bitpet.quant.quantize_with_codes`),
  identical to what :func:`bitpet.models.vit.materialize_params` does for a QAT model.

k-means is run from two deterministic starts, the quantiles of the weights and the matrix's
Gaussian-codebook levels ``c_j * sigma + mu``, each until the assignment no longer changes; the
result with the lower squared error is kept, and the Gaussian quantizer itself is the fallback.
Lloyd's steps never increase the error, so the stored k-means quantizer is never worse (in
squared error) than the Gaussian codebook on the same matrix.

The result is in evaluation form (``materialized=True``) and is written with
``taskfile.write(path, result.model, result.params, ..., encoded=result.encoded)`` or
:func:`write`.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from bitpet import quant, taskfile
from bitpet.models import vit

ADAPTER_KERNEL_RE = re.compile(r"Transformer/encoderblock_\d+/.*(adaptformer|lora_[qv])/.*kernel")


def _assign(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest level (sorted levels; ties go to the lower one)."""
    bounds = 0.5 * (levels[1:] + levels[:-1])
    return np.searchsorted(bounds, x, side="left").astype(np.int32)


def lloyd(x: np.ndarray, levels: np.ndarray, *, max_iter: int = 1000) -> np.ndarray:
    """Lloyd's algorithm for 1-D k-means from ``levels``; returns the sorted final levels.

    Empty cells keep their level. Stops when the assignment no longer changes.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    levels = np.sort(np.asarray(levels, np.float64))
    idx = _assign(x, levels)
    for _ in range(max_iter):
        counts = np.bincount(idx, minlength=levels.size)
        sums = np.bincount(idx, weights=x, minlength=levels.size)
        levels = np.where(counts > 0, sums / np.maximum(counts, 1), levels)
        order = np.argsort(levels, kind="stable")
        levels = levels[order]
        new = _assign(x, levels)
        if np.array_equal(new, idx):
            break
        idx = new
    return levels


def _sse(w: np.ndarray, w_hat: np.ndarray) -> float:
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.sum(d * d))


def gaussian_quantize(w, bits: int, *, blocks: int = 1, std_mode: str = "population"):
    """Gaussian-codebook PTQ of one matrix.

    Returns:
      ``(w_hat, codes, mu, sigma)``: float32 evaluation-form weights (Eq. 9 on float32 stats),
      int32 codes and the float32 per-block stats.
    """
    _, idx, mu, sigma = quant.quantize_with_codes(
        jnp.asarray(w, jnp.float32), bits, blocks=blocks, std_mode=std_mode
    )
    idx, mu, sigma = np.asarray(idx), np.asarray(mu, np.float32), np.asarray(sigma, np.float32)
    return quant.dequantize(idx, mu, sigma, bits), idx, mu, sigma


def kmeans_quantize(w, bits: int, *, std_mode: str = "population", max_iter: int = 1000):
    """k-means PTQ of one matrix (see module docstring).

    Args:
      w: weights, any shape.
      bits: 1..8 (2**bits levels).
      std_mode: statistics of the Gaussian-codebook start and fallback.
      max_iter: Lloyd iterations per start.

    Returns:
      ``(w_hat, codes, levels)``: float32 weights ``levels[codes]``, int32 codes of ``w``'s
      shape and the 2**bits sorted float32 levels.
    """
    bits = quant.check_bits(bits)
    w = np.asarray(w, np.float32)
    x = w.reshape(-1).astype(np.float64)
    n = 2**bits
    g_hat, g_idx, mu, sigma = gaussian_quantize(w, bits, std_mode=std_mode)
    g_levels = np.asarray(quant.codebook(bits)[0], np.float32) * sigma[0] + mu[0]
    starts = [np.quantile(x, (np.arange(n) + 0.5) / n), g_levels.astype(np.float64)]
    best = (_sse(w, g_hat), g_idx.reshape(w.shape), g_levels)  # levels sorted: sigma >= 0
    for start in starts:
        levels = lloyd(x, start, max_iter=max_iter).astype(np.float32)
        levels = np.sort(levels)
        idx = _assign(w.reshape(-1), levels).reshape(w.shape)
        err = _sse(w, levels[idx])
        if err <= best[0]:
            best = (err, idx, levels)
    _, idx, levels = best
    return levels[idx].astype(np.float32), idx.astype(np.int32), levels.astype(np.float32)


@dataclasses.dataclass
class PTQResult:
    """Evaluation-form model and params, the encoded tensors and per-matrix squared errors."""

    model: vit.VisionTransformer
    params: dict
    encoded: dict[str, taskfile.Tensor]
    sse: dict[str, float]
    codebook: str

    @property
    def method(self) -> str:
        """Method label for the task file, e.g. "ptq-kmeans"."""
        return f"ptq-{self.codebook}"


def ptq(
    model: vit.VisionTransformer,
    params: dict,
    bits: int,
    *,
    codebook: str = "kmeans",
    blocks: int = 1,
    std_mode: str | None = None,
    max_iter: int = 1000,
) -> PTQResult:
    """Quantizes the full-precision adapters of a trained model after training.

    Args:
      model: the trained model; its adapters must be 32-bit.
      params: its params (backbone included or not; non-adapter tensors are kept).
      bits: 1..8.
      codebook: "kmeans" (per-matrix levels) or "gaussian" (the paper's codebook).
      blocks: blocks per matrix for the Gaussian codebook (k-means uses 1).
      std_mode: statistics mode; default the model's.
      max_iter: Lloyd iterations per start (k-means).

    Returns:
      :class:`PTQResult` whose model has the adapters at ``bits`` bits and
      ``materialized=True``; the head is encoded as the model stores it.
    """
    a = model.adapter
    if a.kind == "none":
        raise ValueError("PTQ quantizes adapters, and this model has none (adapter='none').")
    if a.bits != 32:
        raise ValueError(
            f"PTQ starts from full-precision adapters (bits=32); this model has bits={a.bits}. "
            "Quantization-aware trained adapters are written directly with taskfile.write."
        )
    if model.materialized:
        raise ValueError("Pass the trained model (materialized=False), not its evaluation form.")
    if codebook not in ("kmeans", "gaussian"):
        raise ValueError(f"codebook={codebook!r}; valid: 'kmeans', 'gaussian'.")
    bits = quant.check_bits(bits)
    std_mode = std_mode or a.std_mode
    blocks = 1 if codebook == "kmeans" else blocks
    target = model.clone(
        adapter=dataclasses.replace(a, bits=bits, blocks=blocks, std_mode=std_mode)
    )
    meta = taskfile.model_meta(target)
    specs = taskfile.expand({**meta, "tensors": taskfile.plan(meta, kmeans=codebook == "kmeans")})
    flat = vit.param_names(params)
    encoded, sse = {}, {}
    for spec in specs:
        if not ADAPTER_KERNEL_RE.fullmatch(spec.name):
            continue
        if spec.name not in flat:
            raise ValueError(f"params lack adapter kernel {spec.name!r} {spec.shape}.")
        w = np.asarray(flat[spec.name], np.float32)
        if w.shape != spec.shape:
            raise ValueError(f"{spec.name}: params {w.shape} vs model {spec.shape}.")
        if codebook == "kmeans":
            w_hat, idx, levels = kmeans_quantize(w, bits, std_mode=std_mode, max_iter=max_iter)
            encoded[spec.name] = taskfile.Tensor(spec, codes=idx, levels=levels)
        else:
            w_hat, idx, mu, sigma = gaussian_quantize(w, bits, blocks=blocks, std_mode=std_mode)
            encoded[spec.name] = taskfile.Tensor(spec, codes=idx, mu=mu, sigma=sigma)
        sse[spec.name] = _sse(w, w_hat)
    encoded = taskfile.encode(target, params, encoded=encoded)
    out = dict(flat)
    out.update({n: jnp.asarray(t.decode()) for n, t in encoded.items()})
    return PTQResult(target.clone(materialized=True), vit.unflatten(out), encoded, sse, codebook)


def write(path: str, result: PTQResult, *, task: str, fingerprint: str | None = None) -> int:
    """Writes a :class:`PTQResult` as a task file; returns the bytes written."""
    return taskfile.write(
        path,
        result.model,
        result.params,
        task=task,
        method=result.method,
        fingerprint=fingerprint,
        encoded=result.encoded,
    )
