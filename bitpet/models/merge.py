"""Inference-time merging of trained adapters into the backbone.

:func:`merge_for_inference` turns a trained model into its cheapest evaluation form:

1. Task weights are materialised once (Eq. 9, :func:`bitpet.models.vit.materialize_params`):
   quantized kernels become their dequantized float32 weights ``c[j] * sigma + mu``.
2. LoRA / Bi-LoRA is linear in the attention input, so ``q = x W_q + b_q + s (x D_q) U_q`` equals
   ``x (W_q + s D_q U_q) + b_q``. The update ``s * D @ U`` (shape ``(d, d)``) is reshaped to the
   query/value kernel layout ``(d, heads, head_dim)`` and added to it; the LoRA parameters are
   dropped and the model's adapter kind becomes ``"none"``: exactly the plain ViT's parameter
   tree and compute cost.
3. AdaptFormer has a ReLU between its matrices and cannot be folded; it stays as a materialised
   float adapter (two small matmuls per block, no quantizer at inference).

The fold runs in float64 on the host and is rounded to float32 once, so the merged model
differs from the unmerged evaluation form only by float32 rounding of the matmuls.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from bitpet.models import vit

_LORA_RE = re.compile(
    r"(?P<prefix>Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1)"
    r"/lora_(?P<proj>[qv])/(?P<mat>down|up)/kernel"
)
_TARGET = {"q": "query", "v": "value"}


def fold_lora(params: dict, scale: float) -> dict:
    """Folds every LoRA branch of a materialised params tree into its query / value kernel.

    Args:
      params: nested params of a LoRA model in evaluation form (adapter kernels hold the
        weights to compute with; see :func:`bitpet.models.vit.materialize_params`).
      scale: the adapter scale ``s``.

    Returns:
      A new nested params tree without any ``lora_q`` / ``lora_v`` entries, whose query and value
      kernels are ``W + s * down @ up`` (reshaped to ``(d, heads, head_dim)``), float32.

    Raises:
      ValueError: a LoRA branch misses its down or up kernel, or shapes do not fit.
    """
    flat = vit.param_names(params)
    branches: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    out = {}
    for name, value in flat.items():
        m = _LORA_RE.fullmatch(name)
        if m is None:
            out[name] = value
        else:
            branches.setdefault((m["prefix"], m["proj"]), {})[m["mat"]] = value
    for (prefix, proj), mats in sorted(branches.items()):
        if set(mats) != {"down", "up"}:
            raise ValueError(f"{prefix}/lora_{proj} lacks its down or up kernel: {sorted(mats)}.")
        target = f"{prefix}/{_TARGET[proj]}/kernel"
        kernel = np.asarray(out[target], np.float64)
        delta = scale * (np.asarray(mats["down"], np.float64) @ np.asarray(mats["up"], np.float64))
        if delta.size != kernel.size or delta.shape[0] != kernel.shape[0]:
            raise ValueError(
                f"LoRA update of shape {delta.shape} does not fit {target} of shape {kernel.shape}."
            )
        out[target] = (kernel + delta.reshape(kernel.shape)).astype(np.float32)
    return vit.unflatten(out)


def merge_for_inference(
    model: vit.VisionTransformer, params: dict
) -> tuple[vit.VisionTransformer, dict]:
    """The cheapest evaluation form of a trained model.

    Args:
      model: a :class:`~bitpet.models.vit.VisionTransformer` (training or evaluation form).
      params: its nested params (``{"params": ...}`` contents, not the variables dict).

    Returns:
      ``(model, params)``: for LoRA / Bi-LoRA a model with adapter kind ``"none"`` and the
      LoRA update folded into the query / value kernels (the plain ViT's parameter tree);
      for AdaptFormer / Bi-AdaptFormer and adapter-free models the materialised evaluation form
      (:func:`~bitpet.models.vit.materialize_params`). A quantized head is materialised too.
      Weights are materialised only if ``model.materialized`` is False (materialising twice
      would re-quantize already dequantized weights).
    """
    if not model.materialized:
        model, params = vit.materialize_params(model, params)
    if model.adapter.kind != "lora":
        return model, params
    merged = fold_lora(params, model.adapter.scale)
    plain = dataclasses.replace(vit.AdapterSpec(), std_mode=model.adapter.std_mode)
    return model.clone(adapter=plain, materialized=True), merged
