"""The speed benchmark's code path on a tiny model, and bfloat16 compute vs float32.

No timing is asserted anywhere: only that the benchmark runs, reports, and that the structure
it measures (FLOPs of compiled programs, parameter trees) is what the speed claims rest on.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitpet.models import vit

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "speed", "bench.py")
# Relative L2 error of bf16-compute logits vs float32 on the tiny model (bf16 has an 8-bit
# mantissa, ~4e-3 relative rounding per op; observed errors are ~1e-2 at most).
BF16_REL_TOL = 3e-2
# LLVM optimisation off: compiles ~2x faster; HLO (hence FLOPs and memory) is unchanged.
# A subset of the methods keeps the test at ~10 compiles; the AdaptFormer paths (materialised
# evaluation form) are covered in test_merge.py.
METHODS = ("linear", "full", "lora", "bi_lora")
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _load_bench():
    spec = importlib.util.spec_from_file_location("bitpet_speed_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def tiny_results(bench):
    opts = bench.Options(
        variant="testing", image_size=16, batches=(2,), reps=2, infer_reps=1, warmup=1,
        compiler_options=FAST_COMPILE, methods=METHODS,
    )  # fmt: skip
    return opts, bench.run_benchmark(opts, log=lambda _: None)


def test_benchmark_runs_and_reports(bench, tiny_results):
    opts, results = tiny_results
    r = results["per_batch"][2]
    infer = ("backbone", "lora", "bi_lora", "bi_lora_unmerged")
    names = set(METHODS) | {f"infer:{n}" for n in infer}
    for clock in ("wall", "cpu"):
        assert set(r["times"][clock]) == names
        for name, v in r["times"][clock].items():
            assert len(v) == (opts.infer_reps if name.startswith("infer:") else opts.reps)
    assert all(m.get("peak", 0) > 0 for m in r["memory"].values())
    text = bench.report(
        results, "pytest", {"date": "d", "host": "h", "device": "x", "versions": "v"}
    )
    for needle in ("### Train step", "### Inference", "### Targets", "Quantizer FLOPs", "bi_lora"):
        assert needle in text


def test_flops_structure(bench, tiny_results):
    """Frozen weights get no gradients; merged LoRA costs exactly the plain backbone."""
    _, results = tiny_results
    fl = results["per_batch"][2]["flops"]
    assert fl["linear"] < fl["full"]
    assert fl["lora"] < fl["full"]  # (tiny model: the quantizer alone rivals its backbone)
    assert fl["infer:lora"] == fl["infer:backbone"] == fl["infer:bi_lora"]
    assert fl["infer:bi_lora_unmerged"] > fl["infer:bi_lora"]


def test_quantizer_flops_do_not_grow_with_batch(tiny_results):
    _, results = tiny_results
    for row in results["quant_flops"]:
        (q2, _, d2), (q4, _, d4) = row[2], row[4]
        assert q4 > q2 and d2 > 0
        # Equal up to XLA's fusion choices (exact on this model; within 1% on ViT-B/16), where
        # materialising the quantized weights per example would double the difference.
        assert d4 == pytest.approx(d2, rel=0.05)


def test_methods_must_include_full(bench):
    with pytest.raises(ValueError, match="must include 'full'"):
        bench.run_benchmark(bench.Options(variant="testing", methods=("lora",)))


def test_parse_args_platform_defaults(bench):
    opts, out = bench.parse_args(["--platform", "gpu", "--dtype", "bfloat16", "--remat"])
    assert opts.batches[0] >= 64 and opts.reps >= 5 and opts.remat and out is None
    opts, _ = bench.parse_args(
        ["--batch", "4,8", "--reps", "5", "--infer-reps", "9", "--methods", "full,lora"]
    )
    assert opts.batches == (4, 8) and opts.reps == 5 and opts.infer_reps == 9
    assert opts.platform == "cpu"
    assert opts.methods == ("full", "lora") and opts.dtype == "float32"


@pytest.mark.parametrize(
    "adapter",
    [
        vit.AdapterSpec(),
        vit.AdapterSpec(kind="lora", hidden=4, bits=1, scale=2.0),
        vit.AdapterSpec(kind="adaptformer", hidden=4, bits=2, scale=2.0),
    ],
    ids=["plain", "bi_lora", "bi_adaptformer"],
)
def test_bfloat16_compute_close_to_float32(adapter):
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3))
    f32 = vit.VisionTransformer(num_classes=10, variant="testing", adapter=adapter)
    params = f32.init(jax.random.PRNGKey(0), images)["params"]
    # Non-trivial adapters: perturb every leaf (the float up-projections start at zero).
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = jax.tree.unflatten(
        treedef,
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )
    bf16 = f32.clone(dtype=jnp.bfloat16)
    for train in (False, True):  # train=True runs the quantizer (QAT form); dropout is off
        kw = dict(train=train, rngs={"dropout": jax.random.PRNGKey(4)}) if train else {}
        a = f32.clone(adapter=_no_dropout(adapter)).apply({"params": params}, images, **kw)
        b = bf16.clone(adapter=_no_dropout(adapter)).apply({"params": params}, images, **kw)
        assert a.dtype == b.dtype == jnp.float32  # logits are float32 either way
        err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
        assert 0 < err < BF16_REL_TOL, err
    # Parameters (and so the quantizer's statistics) stay float32 in the bf16 model.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_bfloat16_quantizer_runs_in_float32():
    """In a bf16 model the quantizer (statistics, codebook lookup) sees float32 kernels."""
    model = vit.VisionTransformer(
        num_classes=3,
        variant="testing",
        adapter=vit.AdapterSpec(kind="lora", hidden=4, bits=1),
        dtype=jnp.bfloat16,
    )
    images = jnp.zeros((1, 16, 16, 3))
    params = model.init(jax.random.PRNGKey(0), images)["params"]
    rngs = {"dropout": jax.random.PRNGKey(1)}
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, images, train=True, rngs=rngs))(
        params
    )
    calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "custom_vjp_call"]
    assert len(calls) == 8  # 2 blocks x (lora_q, lora_v) x (down, up)
    for e in calls:
        assert all(v.aval.dtype == jnp.float32 for v in (*e.invars, *e.outvars)), e


def test_train_step_is_compiled_once(bench):
    """Repeated train steps hit the jit cache: no recompilation between steps."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bitpet import evaluate, optim, partition, train

    opts = bench.Options(variant="testing", image_size=16)
    config = bench.make_config("bi_lora", opts)
    model = vit.from_config(config.model, bench.NUM_CLASSES)
    params = bench.ParamStore(opts).init(model)
    trainable, frozen = partition.split(params, partition.rules_for(config.trainable))
    mesh = evaluate.data_mesh()
    repl = NamedSharding(mesh, P())
    tx, schedule = optim.make_optimizer(config, 15, 1500)
    state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}
    state, frozen = jax.device_put(state, repl), jax.device_put(frozen, repl)
    step = train.make_train_step(model, tx, schedule, repl, mesh)
    rng = jax.random.PRNGKey(0)
    for seed in range(3):
        batch = evaluate.shard_batch(bench.make_batch(2, 16, seed), mesh)
        state, metrics = step(state, frozen, batch, rng)
    assert np.isfinite(float(metrics["train_loss"]))
    assert step._cache_size() == 1


def _no_dropout(adapter):
    import dataclasses

    return dataclasses.replace(adapter, dropout=0.0)
