"""Vision Transformer (flax linen) with the original checkpoint names and adapter hooks.

Parameter names follow Google's ViT npz files (``embedding``, ``cls``,
``Transformer/posembed_input/pos_embedding``, ``Transformer/encoderblock_{i}/LayerNorm_0``,
``.../MultiHeadDotProductAttention_1/{query,key,value,out}``, ``.../LayerNorm_2``,
``.../MlpBlock_3/Dense_{0,1}``, ``Transformer/encoder_norm``), so that checkpoints load by name.
Adapters add ``.../adaptformer/{down,up}/kernel`` (AdaptFormer, parallel to the MLP) or
``.../MultiHeadDotProductAttention_1/lora_{q,v}/{down,up}/kernel`` (LoRA on query and value),
and the task head is ``head/{kernel,bias}`` (float) or ``head/kernel`` (quantized, no bias).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bitpet import quant
from bitpet.models.adapters import AdapterDense, Bottleneck, check_adapter_bits, torch_linear_init


@dataclasses.dataclass(frozen=True)
class Variant:
    """Backbone shape."""

    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int


VARIANTS: dict[str, Variant] = {
    "Ti/16": Variant(16, 192, 12, 3, 768),
    "S/16": Variant(16, 384, 12, 6, 1536),
    "B/16": Variant(16, 768, 12, 12, 3072),
    "L/16": Variant(16, 1024, 24, 16, 4096),
    # Tiny models for tests and the offline demo.
    "testing": Variant(4, 32, 2, 2, 64),
    "tiny/16": Variant(16, 32, 2, 2, 64),  # smoke runs at the full 224 px
    "mini/4": Variant(4, 64, 4, 4, 128),
    "micro/7": Variant(7, 48, 3, 3, 96),  # 28 px -> 4x4 patches: offline demo and benchmark
}

ADAPTERS = ("none", "adaptformer", "lora")


def get_variant(name: str) -> Variant:
    """Looks up a backbone variant; unknown names raise ValueError listing the valid ones."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown ViT variant {name!r}; valid variants: {sorted(VARIANTS)}.")
    return VARIANTS[name]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example, rescaling the kept ones."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Where and how adapters are inserted (hashable, so it can live on a linen module)."""

    kind: str = "none"  # "none" | "adaptformer" | "lora"
    hidden: int = 8
    bits: int = 32
    scale: float = 1.0
    blocks: int = 1
    dropout: float = 0.1
    std_mode: str = "population"

    def bottleneck(
        self, name: str, out_features: int, activation: bool, materialized: bool, dtype
    ) -> Bottleneck:
        """The adapter branch called ``name``: AdaptFormer (ReLU) or one LoRA branch."""
        return Bottleneck(
            self.hidden, out_features, bits=self.bits, blocks=self.blocks,
            std_mode=self.std_mode, dropout=self.dropout, activation=activation,
            materialized=materialized, dtype=dtype, name=name,
        )  # fmt: skip

    def __post_init__(self):
        if self.kind not in ADAPTERS:
            raise ValueError(f"Unknown adapter {self.kind!r}; valid adapters: {list(ADAPTERS)}.")
        if self.kind != "none":
            check_adapter_bits(self.bits)
            if self.hidden < 1:
                raise ValueError(f"adapter hidden dim h={self.hidden} must be >= 1.")


class Attention(nn.Module):
    """Multi-head self-attention with vit_jax parameter shapes and optional LoRA on q and v."""

    num_heads: int
    adapter: AdapterSpec
    materialized: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        d = x.shape[-1]
        head_dim = d // self.num_heads
        proj = lambda name: nn.DenseGeneral(  # noqa: E731
            (self.num_heads, head_dim), dtype=self.dtype, name=name
        )
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
        if self.adapter.kind == "lora":
            a = self.adapter
            dq = a.bottleneck("lora_q", d, False, self.materialized, self.dtype)(x, train=train)
            dv = a.bottleneck("lora_v", d, False, self.materialized, self.dtype)(x, train=train)
            q = q + (a.scale * dq).reshape(q.shape).astype(q.dtype)
            v = v + (a.scale * dv).reshape(v.shape).astype(v.dtype)
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class MlpBlock(nn.Module):
    """Dense -> exact GELU -> Dense (no dropout: the backbone is frozen)."""

    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(d, dtype=self.dtype, name="Dense_1")(y)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block with AdaptFormer / LoRA hook points."""

    num_heads: int
    mlp_dim: int
    adapter: AdapterSpec
    drop_path: float = 0.0
    materialized: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
        y = Attention(
            self.num_heads,
            self.adapter,
            self.materialized,
            self.dtype,
            name="MultiHeadDotProductAttention_1",
        )(y, train=train)
        x = x + DropPath(self.drop_path, name="drop_path_attn")(y, train=train)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.dtype, name="MlpBlock_3")(y)
        out = x + DropPath(self.drop_path, name="drop_path_mlp")(y, train=train)
        if self.adapter.kind == "adaptformer":
            a = self.adapter
            # Parallel to the MLP, fed by the residual stream (not LN2's output), and bypassing
            # stochastic depth.
            z = a.bottleneck("adaptformer", x.shape[-1], True, self.materialized, self.dtype)
            z = z(x, train=train)
            out = out + (a.scale * z).astype(out.dtype)
        return out


class VisionTransformer(nn.Module):
    """ViT classifier; ``__call__(images, train=...)`` returns logits (float32).

    Attributes:
      num_classes: head outputs; 0 returns the pre-head features (CLS token after encoder_norm).
      variant: key of :data:`VARIANTS`.
      adapter: :class:`AdapterSpec`.
      head_bits: 32 for a float head with bias; 1..8 for a quantized head without bias.
      drop_path: stochastic depth rate, linearly increasing over blocks up to this value.
      materialized: adapters and head use their kernels as given (evaluation form).
      dtype: compute dtype of the backbone (float32 or bfloat16); parameters stay float32.
      remat: rematerialise each block's activations in the backward pass (saves memory).
    """

    num_classes: int
    variant: str = "B/16"
    adapter: AdapterSpec = AdapterSpec()
    head_bits: int = 32
    drop_path: float = 0.0
    materialized: bool = False
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False, features: bool = False):
        v = get_variant(self.variant)
        x = nn.Conv(
            v.hidden_size,
            (v.patch_size, v.patch_size),
            strides=(v.patch_size, v.patch_size),
            padding="VALID",
            dtype=self.dtype,
            name="embedding",
        )(images.astype(self.dtype))
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
        x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
        x = Encoder(
            v.num_layers,
            v.num_heads,
            v.mlp_dim,
            self.adapter,
            self.drop_path,
            self.materialized,
            self.dtype,
            self.remat,
            name="Transformer",
        )(x, train=train)
        feats = x[:, 0].astype(jnp.float32)
        if features or self.num_classes == 0:
            return feats
        d = feats.shape[-1]
        if self.head_bits == 32:
            return nn.Dense(
                self.num_classes,
                kernel_init=torch_linear_init(d),
                bias_init=torch_linear_init(d),
                name="head",
            )(feats)
        return AdapterDense(
            self.num_classes,
            bits=quant.check_bits(self.head_bits),
            std_mode=self.adapter.std_mode,
            materialized=self.materialized,
            name="head",
        )(feats)


class Encoder(nn.Module):
    """Position embedding, the encoder blocks and the final LayerNorm."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    adapter: AdapterSpec
    drop_path: float = 0.0
    materialized: bool = False
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = PosEmbed(name="posembed_input")(x)
        block_cls = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
        for i in range(self.num_layers):
            rate = self.drop_path * i / max(self.num_layers - 1, 1)
            x = block_cls(
                self.num_heads,
                self.mlp_dim,
                self.adapter,
                rate,
                self.materialized,
                self.dtype,
                name=f"encoderblock_{i}",
            )(x, train)
        return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)


class PosEmbed(nn.Module):
    """Learned position embedding added to the token sequence."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:], jnp.float32
        )
        return x + pos.astype(x.dtype)


def param_names(tree: Any) -> dict[str, Any]:
    """Flattens a nested param dict into {"a/b/c": leaf}."""
    return {"/".join(k): v for k, v in flatten(tree).items()}


def flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Flattens nested dicts into {(k1, k2, ...): leaf}."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, prefix + (k,)))
        return out
    return {prefix: tree}


def unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of :func:`param_names`: {"a/b": x} -> {"a": {"b": x}}."""
    out: dict = {}
    for name, v in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def quantized_kernels(model: VisionTransformer) -> dict[str, tuple[int, int]]:
    """Regexes of the kernels that ``model`` quantizes, mapped to (bits, blocks)."""
    rules = {}
    a = model.adapter
    if a.kind != "none" and a.bits <= 8:
        if a.kind == "adaptformer":
            rules[r"Transformer/encoderblock_\d+/adaptformer/(down|up)/kernel"] = (a.bits, a.blocks)
        else:
            rules[
                r"Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1/lora_[qv]/(down|up)/kernel"
            ] = (a.bits, a.blocks)
    if model.head_bits <= 8:
        rules[r"head/kernel"] = (model.head_bits, 1)
    return rules


def materialize_params(model: VisionTransformer, params: dict) -> tuple[VisionTransformer, dict]:
    """The evaluation form: quantized kernels replaced by their dequantized weights (Eq. 9).

    Weights are materialised once, through codes and float32 statistics exactly as a task file
    stores them, so a model rebuilt from a task file is bit-identical to this one.
    16-bit adapters are rounded to float16.

    Returns:
      ``(model with materialized=True, params)``.
    """
    import re

    rules = quantized_kernels(model)
    flat = param_names(params)
    out = {}
    matched = 0
    for name, value in flat.items():
        match = next(((b, k) for rx, (b, k) in rules.items() if re.fullmatch(rx, name)), None)
        if match is not None:
            matched += 1
            bits, blocks = match
            value = jnp.asarray(
                quant.materialize(value, bits, blocks=blocks, std_mode=model.adapter.std_mode)
            )
        elif model.adapter.bits == 16 and _is_adapter_kernel(name):
            value = jnp.asarray(np.asarray(value, np.float16).astype(np.float32))
        out[name] = value
    if rules and not matched:  # e.g. {"params": ...} passed: nothing would be quantized
        raise ValueError(
            f"No parameter matches the model's quantized kernels {sorted(rules)}; pass the "
            "model's 'params' collection (not the {'params': ...} variables dict)."
        )
    return model.clone(materialized=True), unflatten(out)


def _is_adapter_kernel(name: str) -> bool:
    return "/adaptformer/" in name or "/lora_q/" in name or "/lora_v/" in name


def from_config(model_cfg: Any, num_classes: int) -> VisionTransformer:
    """Builds a :class:`VisionTransformer` from a ``config.model`` ConfigDict (or mapping).

    Keys: variant, adapter ("none" | "adaptformer" | "lora"), h, bits, scale, blocks, dropout,
    std_mode, head_bits, drop_path, dtype ("float32" | "bfloat16"), remat.
    """
    get = model_cfg.get if hasattr(model_cfg, "get") else lambda k, d=None: getattr(model_cfg, k, d)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(get("dtype", "float32"))
    if dtype is None:
        raise ValueError(f"model.dtype={get('dtype')!r}; valid: ['float32', 'bfloat16'].")
    get_variant(get("variant", "B/16"))
    head_bits = int(get("head_bits", 32))
    if head_bits != 32:
        quant.check_bits(head_bits)
    return VisionTransformer(
        num_classes=num_classes,
        variant=get("variant", "B/16"),
        adapter=AdapterSpec(
            kind=get("adapter", "none"),
            hidden=int(get("h", 8)),
            bits=int(get("bits", 32)),
            scale=float(get("scale", 1.0)),
            blocks=int(get("blocks", 1)),
            dropout=float(get("dropout", 0.1)),
            std_mode=get("std_mode", "population"),
        ),
        head_bits=head_bits,
        drop_path=float(get("drop_path", 0.0)),
        dtype=dtype,
        remat=bool(get("remat", False)),
    )
