"""Training and inference speed of every bitpet method (paper §5, "training / inference time").

For linear probing, full fine-tuning, AdaptFormer, Bi-AdaptFormer, LoRA and Bi-LoRA (h = 8 for
the float adapters, h = 32 for the 1-bit ones, as the paper's Table 4c) it measures:

* the train step (forward, backward, AdamW update) built by :func:`bitpet.train.make_train_step`,
  which differentiates the trainable partition only;
* inference in evaluation form: the plain backbone (= linear / full fine-tuning), AdaptFormer and
  Bi-AdaptFormer materialised once (Eq. 9), LoRA and Bi-LoRA merged into the query / value
  kernels (:func:`bitpet.models.merge.merge_for_inference`), and Bi-LoRA unmerged for reference;
* images/s from the median of ``--reps`` timed runs after ``--warmup`` untimed rounds, with
  every program run once per round in a fresh seeded random order (round-robin), so that load
  from other processes affects all methods alike; each run records wall-clock time and the
  process's CPU time (load-robust on a shared machine); ratios are ratios of medians; merged
  LoRA programs equal the backbone's program, so their measured ratios show the noise floor;
* from the compiled programs: FLOPs (``cost_analysis()``) and memory (``memory_analysis()``:
  argument + output + temp bytes minus aliased (donated) bytes, which would otherwise be counted
  twice; on GPU also the device's cumulative ``peak_bytes_in_use``);
* two structural checks on FLOPs: adapter steps cost clearly less than full fine-tuning (no
  weight gradients of the frozen backbone), and the quantizer's extra FLOPs
  (bits=1 minus bits=32 at the same h) are the same at batch B and 2B, i.e. quantized weights
  are materialised once per step, not per example or token.

Usage::

  python benchmarks/speed/bench.py --out benchmarks/speed/results_cpu.md        # CPU, batch 4
  python benchmarks/speed/bench.py --platform gpu --out results_gpu.md         # batch 64, 128
  python benchmarks/speed/bench.py --dtype bfloat16 --remat ...

The tiny configuration used by the tests: ``--variant testing --image-size 16 --batch 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __name__ == "__main__":  # Runs from a checkout without installing bitpet.
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

# (config method, h, bits) of each measured train method; h/bits None = the method's default.
TRAIN_METHODS = ("linear", "full", "adaptformer", "bi_adaptformer", "lora", "bi_lora")
ADAPTER_METHODS = ("adaptformer", "bi_adaptformer", "lora", "bi_lora")
# Inference programs: name -> (train method whose params it uses, merged?).
INFER_PROGRAMS = {
    "backbone": ("full", True),
    "adaptformer": ("adaptformer", True),
    "bi_adaptformer": ("bi_adaptformer", True),
    "lora": ("lora", True),
    "bi_lora": ("bi_lora", True),
    "bi_lora_unmerged": ("bi_lora", False),
}
INFER_HOW = {
    "backbone": "none (plain ViT; = linear, full)",
    "adaptformer": "materialised float adapter",
    "bi_adaptformer": "materialised (dequantized once)",
    "lora": "merged into q, v",
    "bi_lora": "merged into q, v",
    "bi_lora_unmerged": "materialised, not merged",
}
PAIRS = (("bi_adaptformer", "adaptformer"), ("bi_lora", "lora"))
NUM_CLASSES = 100
PLATFORM_DEFAULTS = {  # batch sizes, timed repetitions, warm-up rounds
    "cpu": ((4,), 12, 1),
    "gpu": ((64, 128), 20, 3),
    "tpu": ((64, 128), 20, 3),
}
# Targets checked on the results (ratios of median times).
TARGETS = {
    "qat_overhead": 1.03,  # bi_* train step / its float adapter's
    "adapter_vs_full": 0.80,  # adapter train step / full fine-tuning's
    "bi_lora_infer": 1.01,  # merged Bi-LoRA inference / plain backbone
    "bi_adaptformer_infer": 1.02,  # Bi-AdaptFormer inference / plain backbone
}
# The paper's RTX 3090 numbers (ViT-B/16, batch 64, ms/batch).
PAPER_TRAIN_MS = {
    "adaptformer": 252.3,
    "bi_adaptformer": 265.0,
    "lora": 275.7,
    "bi_lora": 293.2,
    "full": 342.0,
}
PAPER_INFER_MS = {
    "adaptformer": 115.3,
    "bi_adaptformer": 115.5,
    "lora": 110.8,
    "bi_lora": 110.8,
    "backbone": 110.8,
}


@dataclasses.dataclass
class Options:
    """What to benchmark (see ``--help`` for each field)."""

    platform: str = "cpu"
    variant: str = "B/16"
    image_size: int = 224
    batches: tuple[int, ...] = (4,)
    reps: int = 12
    warmup: int = 1
    # Timed rounds of the (cheaper) inference programs; 0: 3 * reps.
    infer_reps: int = 0
    dtype: str = "float32"
    remat: bool = False
    flops_check: bool = True
    seed: int = 0
    # XLA compile options for every program, e.g. {"xla_backend_optimization_level": 0} to
    # compile faster in tests (FLOPs and memory unchanged, timings not representative).
    compiler_options: dict | None = None
    # Train methods to measure (a subset of TRAIN_METHODS that contains "full", the reference).
    methods: tuple[str, ...] = TRAIN_METHODS


def make_config(method: str, opts: Options, *, h: int = 0, bits: int = 0):
    """The VTAB config of ``method`` at the benchmark's model settings (scale fixed to 1)."""
    from configs import vtab

    arg = f"{method},variant={opts.variant}"
    if h:
        arg += f",h={h}"
    if bits:
        arg += f",bits={bits}"
    config = vtab.get_config(arg)
    config.image_size = opts.image_size
    config.model.scale = 1.0
    config.model.dtype = opts.dtype
    config.model.remat = opts.remat
    return config


def make_batch(batch_size: int, image_size: int, seed: int) -> dict:
    """A random batch of images in [0, 1] and integer labels (host arrays)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((batch_size, image_size, image_size, 3), dtype=np.float32),
        "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
    }


class ParamStore:
    """Initialises models, sharing one set of backbone arrays between all methods."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.backbone: dict[str, Any] | None = None

    def init(self, model) -> dict:
        """Random params of ``model`` whose backbone leaves are the shared backbone arrays."""
        import jax
        import jax.numpy as jnp

        from bitpet.models import vit

        shape = (1, self.opts.image_size, self.opts.image_size, 3)
        # Eager, not jitted: op-by-op executables are cached across methods, which is faster
        # than compiling one init program per method.
        params = model.init(jax.random.PRNGKey(self.opts.seed), jnp.zeros(shape, jnp.float32))
        params = params["params"]
        flat = vit.param_names(params)
        if self.backbone is None:
            self.backbone = {k: v for k, v in flat.items() if not _is_adapter(k)}
        for k in flat:
            if k in self.backbone and flat[k].shape == self.backbone[k].shape:
                flat[k] = self.backbone[k]
        return vit.unflatten(flat)


def _is_adapter(name: str) -> bool:
    return (
        "/adaptformer/" in name
        or "/lora_q/" in name
        or "/lora_v/" in name
        or name.startswith("head/")
    )


@dataclasses.dataclass
class Program:
    """A compiled program and a zero-argument callable that runs it once."""

    name: str
    kind: str  # "train" | "infer"
    run: Callable[[], Any]
    compiled: Any
    compile_s: float
    info: dict


def train_program(
    method: str, opts: Options, store: ParamStore | None, batch_size: int, *, abstract=False, **kw
):
    """Compiles the train step of ``method`` and returns a :class:`Program` (state carried)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bitpet import evaluate, optim, partition, train
    from bitpet.models import vit

    config = make_config(method, opts, **kw)
    model = vit.from_config(config.model, NUM_CLASSES)
    mesh = evaluate.data_mesh()
    repl = NamedSharding(mesh, P())
    tx, schedule = optim.make_optimizer(config, 15, 1500)
    rng = jax.random.PRNGKey(opts.seed + 1)
    host_batch = make_batch(batch_size, opts.image_size, opts.seed)
    if abstract:  # shapes only: enough to compile (for FLOPs), nothing allocated
        shape = (1, opts.image_size, opts.image_size, 3)
        params = jax.eval_shape(
            lambda r: model.init(r, jnp.zeros(shape, jnp.float32))["params"], rng
        )
        trainable, frozen = partition.split(params, partition.rules_for(config.trainable))
        state = jax.eval_shape(
            lambda t: {"params": t, "opt_state": tx.init(t), "step": jnp.zeros((), jnp.int32)},
            trainable,
        )
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host_batch)
    else:
        params = store.init(model)
        trainable, frozen = partition.split(params, partition.rules_for(config.trainable))
        trainable = jax.tree.map(jnp.copy, trainable)  # donated each step: never share it
        state = jax.device_put(
            {
                "params": trainable,
                "opt_state": tx.init(trainable),
                "step": jnp.zeros((), jnp.int32),
            },
            repl,
        )
        frozen = jax.device_put(frozen, repl)
        batch = evaluate.shard_batch(host_batch, mesh)
    step = train.make_train_step(model, tx, schedule, repl, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, rng).compile(opts.compiler_options)
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, batch, rng)
        return holder["state"], metrics

    info = {
        "h": model.adapter.hidden if model.adapter.kind != "none" else None,
        "bits": model.adapter.bits if model.adapter.kind != "none" else None,
        "trainable": partition.count(trainable),
        "params": params,
        "model": model,
    }
    return Program(method, "train", run, compiled, compile_s, info)


def infer_program(name: str, model, params, opts: Options, batch_size: int, merged: bool):
    """Compiles evaluation-form inference (merged or materialised) as a :class:`Program`."""
    import jax

    from bitpet.models import merge, vit

    if merged:
        model, params = merge.merge_for_inference(model, params)
    else:
        model, params = vit.materialize_params(model, params)
    params = jax.device_put(params)
    images = jax.device_put(make_batch(batch_size, opts.image_size, opts.seed)["image"])
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    t0 = time.perf_counter()
    lowered = fn.lower(params, images)
    compiled = lowered.compile(opts.compiler_options)
    compile_s = time.perf_counter() - t0
    # Programs with equal StableHLO (no debug info) are the same computation.
    program_hash = hashlib.sha256(lowered.as_text(debug_info=False).encode()).hexdigest()[:12]
    info = {"adapter": model.adapter.kind, "hlo": program_hash}
    return Program(name, "infer", lambda: compiled(params, images), compiled, compile_s, info)


def flops(compiled) -> float:
    """FLOPs of a compiled program according to XLA's cost analysis (0 if unavailable)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def memory(compiled) -> dict[str, int]:
    """Byte counts of ``compiled.memory_analysis()`` and their peak estimate.

    ``peak`` = argument + output + temp - alias (donated inputs reused as outputs are counted
    once).
    """
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp", "alias")
    }
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def interleaved_timings(
    programs: Sequence[Program], reps: int, warmup: int, seed: int = 0
) -> tuple[dict[str, dict[str, list[float]]], list[float]]:
    """Runs every program once per round, in a new random order each round.

    The order is shuffled (seeded) rather than rotated, so that no program always follows the
    same predecessor (a large train step leaves caches and the allocator in a different state
    than a small inference program).

    Each timed run records the wall-clock time and the process's CPU time (user + system, all
    threads: ``time.process_time``). On a machine shared with other jobs the CPU time is the
    load-robust measure of the work done; the wall-clock time is what a user waits.

    Returns:
      ``({"wall": {name: [s per round]}, "cpu": {name: [s per round]}}, [1-min load average at
      each timed round])``.
    """
    import jax

    for _ in range(warmup):
        for p in programs:
            jax.block_until_ready(p.run())
    times: dict[str, dict[str, list[float]]] = {
        "wall": {p.name: [] for p in programs},
        "cpu": {p.name: [] for p in programs},
    }
    loads = []
    shuffle = random.Random(seed)
    for _ in range(reps):
        loads.append(os.getloadavg()[0])
        for p in shuffle.sample(list(programs), len(programs)):
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(p.run())
            times["wall"][p.name].append(time.perf_counter() - t0)
            times["cpu"][p.name].append(time.process_time() - c0)
    return times, loads


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """``median(times[a]) / median(times[b])``."""
    return statistics.median(times[a]) / statistics.median(times[b])


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much a program's time varied across rounds."""
    return (max(values) - min(values)) / statistics.median(values)


def quantizer_flops_check(opts: Options, batch: int, known: dict | None = None) -> list[dict]:
    """FLOPs of bits=1 minus bits=32 train steps at the same h = 32, at batch B and 2B.

    Equal differences mean the quantizer's cost does not grow with the batch: quantized weights
    are computed once per step. Programs are compiled from shapes only (nothing allocated).

    Args:
      opts: benchmark options.
      batch: B.
      known: optional ``{(method, batch): flops}`` of programs already compiled (h = 32).

    Returns:
      One row per quantized method: ``{"method", "h", B: (fq, ff, fq - ff), 2B: (...)}``.
    """
    known = known or {}

    def get(method, b):
        if (method, b) not in known:
            prog = train_program(method, opts, None, b, abstract=True, h=32)
            known[(method, b)] = flops(prog.compiled)
        return known[(method, b)]

    rows = []
    for method, float_method in PAIRS:
        if method not in opts.methods:
            continue
        row = {"method": method, "h": 32}
        for b in (batch, 2 * batch):
            fq, ff = get(method, b), get(float_method, b)
            row[b] = (fq, ff, fq - ff)
        rows.append(row)
    return rows


def run_benchmark(opts: Options, log: Callable[[str], None] = print) -> dict:
    """Compiles, times and analyses every program; returns a results dict (see :func:`report`)."""
    import jax

    unknown = sorted(set(opts.methods) - set(TRAIN_METHODS))
    if unknown or "full" not in opts.methods:
        raise ValueError(
            f"methods={opts.methods}: must include 'full' and be among {list(TRAIN_METHODS)}."
        )
    results: dict[str, Any] = {"opts": dataclasses.asdict(opts), "per_batch": {}}
    results["load_before"] = os.getloadavg()
    store = ParamStore(opts)
    start = time.perf_counter()
    for batch in opts.batches:
        programs = []
        for method in (m for m in TRAIN_METHODS if m in opts.methods):
            p = train_program(method, opts, store, batch)
            log(f"[batch {batch}] compiled train {method} in {p.compile_s:.1f}s")
            programs.append(p)
        by_name = {p.name: p for p in programs}
        for name, (src, merged) in INFER_PROGRAMS.items():
            if src not in by_name:
                continue
            info = by_name[src].info
            p = infer_program(f"infer:{name}", info["model"], info["params"], opts, batch, merged)
            log(f"[batch {batch}] compiled inference {name} in {p.compile_s:.1f}s")
            programs.append(p)
        peaks = {}
        if jax.default_backend() == "gpu":  # cumulative process peak after each first run
            for p in programs:
                jax.block_until_ready(p.run())
                stats = jax.local_devices()[0].memory_stats() or {}
                peaks[p.name] = stats.get("peak_bytes_in_use")
        # Two phases, each interleaved round-robin: train steps, then inference programs (which
        # are cheap, so they get more rounds; a large train step between two inference runs
        # would disturb the caches they see).
        times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
        phases = {}
        infer_reps = opts.infer_reps or 3 * opts.reps
        for phase, reps in (("train", opts.reps), ("infer", infer_reps)):
            group = [p for p in programs if p.kind == phase]
            load0 = os.getloadavg()
            t, loads = interleaved_timings(group, reps, opts.warmup, opts.seed)
            load1 = os.getloadavg()
            for clock in times:
                times[clock].update(t[clock])
            phases[phase] = {"reps": reps, "loads": loads, "before": load0, "after": load1}
            msg = f"load {load0[0]:.2f} -> {load1[0]:.2f}"
            log(f"[batch {batch}] timed {phase}: {reps} rounds; {msg}")
        results["per_batch"][batch] = {
            "times": times,
            "phases": phases,
            "flops": {p.name: flops(p.compiled) for p in programs},
            "memory": {p.name: memory(p.compiled) for p in programs},
            "device_peak": peaks,
            "compile_s": {p.name: p.compile_s for p in programs},
            "info": {
                p.name: {k: v for k, v in p.info.items() if k in ("h", "bits", "trainable", "hlo")}
                for p in programs
            },
        }
        del programs, by_name
    if opts.flops_check:
        b0 = opts.batches[0]
        known = {
            (m, b0): results["per_batch"][b0]["flops"][m]
            for m, _ in PAIRS
            if m in opts.methods and results["per_batch"][b0]["info"][m]["h"] == 32
        }
        results["quant_flops"] = quantizer_flops_check(opts, b0, known)
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - start
    return results


def machine() -> dict[str, str]:
    """Machine and library description for the report."""
    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.local_devices()[0]
    kind = getattr(dev, "device_kind", dev)
    nproc = len(os.sched_getaffinity(0))
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.machine()}, nproc {nproc}, {cpu}",
        "device": f"{jax.default_backend()}: {kind} x {jax.device_count()}",
        "versions": f"python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib "
        f"{jaxlib.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
        f"numpy {np.__version__}",
    }


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _f32_resolution(x: float) -> float:
    """Spacing of float32 numbers near ``x`` (XLA accumulates cost-analysis FLOPs in float32)."""
    import math

    return 2.0 ** (math.floor(math.log2(x)) - 23) if x > 0 else 0.0


def _same_program(info: dict, ref: str, name: str) -> str:
    """ "yes" if program ``name`` has the same StableHLO as ``ref``."""
    return "yes" if info[name].get("hlo") == info[ref].get("hlo") else "no"


def _status(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def report(results: dict, command: str, mach: dict[str, str] | None = None) -> str:
    """Renders :func:`run_benchmark`'s results as markdown."""
    opts = results["opts"]
    mach = mach or machine()
    lines = [
        f"# bitpet speed: ViT-{opts['variant']} at {opts['image_size']} px, {opts['dtype']}"
        + (", remat" if opts["remat"] else ""),
        "",
        f"- Date: {mach['date']}",
        f"- Machine: {mach['host']}; {mach['device']}",
        f"- Versions: {mach['versions']}",
        f"- Command: `{command}`",
        "- Timing: train steps, then inference programs, each group timed in rounds after "
        f"{opts['warmup']} warm-up round(s); each round runs every program of the group once, "
        "in a fresh seeded random order, `block_until_ready` on the outputs; reported times are "
        "medians over the rounds. Every run records wall-clock time (images/s) and "
        "the process's CPU time (user + system over all threads). Ratios are ratios of medians. "
        "Spread = (max - min) / median of the wall times across rounds.",
        "- Memory: from `compiled.memory_analysis()` of each program: argument + output + temp "
        "bytes minus aliased (donated) bytes. On CPU this is XLA's buffer assignment, not a "
        "measured peak.",
        f"- Load average (1 min) before / after the whole run: {results['load_before'][0]:.2f}"
        f" / {results['load_after'][0]:.2f}; total wall time {results['wall_s']:.0f} s.",
        "",
    ]
    for batch, r in results["per_batch"].items():
        wall, cpu, fl, mem, info = (r["times"]["wall"], r["times"]["cpu"], r["flops"],
                                    r["memory"], r["info"])  # fmt: skip
        med = {k: statistics.median(v) for k, v in wall.items()}
        methods = [m for m in TRAIN_METHODS if m in wall]
        adapters = [m for m in ADAPTER_METHODS if m in wall]
        pairs = [(a, b) for a, b in PAIRS if a in wall and b in wall]
        infers = [n for n in INFER_PROGRAMS if f"infer:{n}" in wall]
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        lines += [f"## Batch {batch}", ""]
        for phase, ph in r["phases"].items():
            lines.append(
                f"- {phase}: {ph['reps']} timed rounds; load average (1 min) "
                f"{ph['before'][0]:.2f} before, {ph['after'][0]:.2f} after, per round "
                f"{min(ph['loads']):.2f} to {max(ph['loads']):.2f}."
            )
        lines += [
            "",
            "### Train step (forward + backward + AdamW update)",
            "",
            "| method | h | bits | trainable params | ms/step | images/s | spread | vs full "
            "(wall) | CPU s/step | vs full (CPU) | paper vs full | GFLOPs/step | FLOPs vs full "
            "| memory MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in methods:
            paper = PAPER_TRAIN_MS.get(m)
            paper_s = f"{paper / PAPER_TRAIN_MS['full']:.3f}" if paper else "-"
            i = info[m]
            lines.append(
                f"| {m} | {i['h'] or '-'} | {i['bits'] or '-'} | {i['trainable']:,} | "
                f"{1e3 * med[m]:,.1f} | {batch / med[m]:.2f} | {spread(wall[m]):.0%} | "
                f"{ratio(wall, m, 'full'):.3f} | {cmed[m]:.3f} | {ratio(cpu, m, 'full'):.3f} | "
                f"{paper_s} | {fl[m] / 1e9:,.1f} | {fl[m] / fl['full']:.3f} | "
                f"{_mib(mem[m].get('peak'))} |"
            )
        lines += [
            "",
            "QAT overhead in the train step (1-bit h = 32 over the float adapter h = 8):",
            "",
        ]
        for a, b in pairs:
            paper = PAPER_TRAIN_MS[a] / PAPER_TRAIN_MS[b]
            lines.append(
                f"- {a} / {b}: wall {ratio(wall, a, b):.3f}, CPU {ratio(cpu, a, b):.3f}, "
                f"FLOPs {fl[a] / fl[b]:.3f}; paper {paper:.3f}"
            )
        lines += [
            "",
            "### Inference (evaluation form)",
            "",
            "| program | adapter at inference | same program as backbone | ms/batch | images/s | "
            "spread | vs backbone (wall) | CPU s/batch | vs backbone (CPU) | paper vs backbone | "
            "GFLOPs | FLOPs vs backbone | memory MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        ref = "infer:backbone"
        same = functools.partial(_same_program, info, ref)
        twins = [f"infer:{n}" for n in infers if n != "backbone" and same(f"infer:{n}") == "yes"]
        for name in infers:
            k = f"infer:{name}"
            paper = PAPER_INFER_MS.get(name)
            paper_s = f"{paper / PAPER_INFER_MS['backbone']:.3f}" if paper else "-"
            lines.append(
                f"| {name} | {INFER_HOW[name]} | {same(k)} | {1e3 * med[k]:,.1f} | "
                f"{batch / med[k]:.2f} | "
                f"{spread(wall[k]):.0%} | {ratio(wall, k, ref):.3f} | {cmed[k]:.3f} | "
                f"{ratio(cpu, k, ref):.3f} | {paper_s} | {fl[k] / 1e9:,.1f} | "
                f"{fl[k] / fl[ref]:.4f} | {_mib(mem[k].get('peak'))} |"
            )
        if twins:
            lines += [
                "",
                "Noise floor: " + ", ".join(twins) + " compile to the same program as the "
                "backbone (equal StableHLO), so their ratios to it, wall "
                + ", ".join(f"{ratio(wall, k, ref):.3f}" for k in twins)
                + ", CPU "
                + ", ".join(f"{ratio(cpu, k, ref):.3f}" for k in twins)
                + ", are measurement noise.",
            ]
        if r["device_peak"]:
            peaks = ", ".join(f"{k} {_mib(v)}" for k, v in r["device_peak"].items())
            lines += ["", "Device `peak_bytes_in_use` (cumulative over the process) after each "
                      f"program's first run, MiB: {peaks}"]  # fmt: skip
        lines += ["", "### Targets (wall-clock and CPU-time ratios of medians)", ""]
        checks = [
            (f"QAT overhead {a} / {b} train step <= {TARGETS['qat_overhead']:.2f}", a, b,
             TARGETS["qat_overhead"]) for a, b in pairs
        ] + [
            (f"{m} train step / full <= {TARGETS['adapter_vs_full']:.2f}", m, "full",
             TARGETS["adapter_vs_full"]) for m in adapters
        ] + [
            (f"merged Bi-LoRA inference / backbone <= {TARGETS['bi_lora_infer']:.2f}",
             "infer:bi_lora", ref, TARGETS["bi_lora_infer"]),
            (f"Bi-AdaptFormer inference / backbone <= {TARGETS['bi_adaptformer_infer']:.2f}",
             "infer:bi_adaptformer", ref, TARGETS["bi_adaptformer_infer"]),
        ]  # fmt: skip
        for text, a, b, limit in checks:
            if a not in wall:
                continue
            tw, tc = ratio(wall, a, b), ratio(cpu, a, b)
            lines.append(
                f"- {text}: wall {tw:.3f} {_status(tw <= limit)}, CPU {tc:.3f} "
                f"{_status(tc <= limit)}, FLOPs {fl[a] / fl[b]:.4f}"
            )
        lines += [
            "- No weight gradients of the frozen backbone: adapter steps take "
            + ", ".join(f"{m} {fl[m] / fl['full']:.3f}" for m in adapters + ["linear"] if m in fl)
            + " of full fine-tuning's FLOPs.",
            "",
            "Raw wall times (s, per round): "
            + "; ".join(f"{k} " + " ".join(f"{x:.3f}" for x in v) for k, v in wall.items()),
            "",
            "Raw CPU times (s, per round): "
            + "; ".join(f"{k} " + " ".join(f"{x:.3f}" for x in v) for k, v in cpu.items()),
            "",
        ]
    if results.get("quant_flops"):
        b0 = results["opts"]["batches"][0]
        lines += [
            "## Quantizer FLOPs do not grow with the batch",
            "",
            "Train-step FLOPs of the 1-bit adapter minus the float adapter at the same h = 32 "
            "(the difference is the quantizer: statistics, codebook lookup, Eq. 8 backward). "
            "Materialising the quantized weights per example would double the difference at "
            "twice the batch. XLA's cost analysis sums FLOPs in float32, so each total is "
            "rounded to a multiple of 2^(floor(log2(total)) - 23) (the resolution column).",
            "",
            f"| method | batch {b0}: bits=1 / bits=32 / difference | batch {2 * b0}: bits=1 / "
            "bits=32 / difference | difference grows by | resolution at batch "
            f"{2 * b0} |",
            "|---|---|---|---|---|",
        ]
        for row in results["quant_flops"]:
            a, b = row[b0], row[2 * b0]
            lines.append(
                f"| {row['method']} | {a[0]:,.0f} / {a[1]:,.0f} / {a[2]:,.0f} | "
                f"{b[0]:,.0f} / {b[1]:,.0f} / {b[2]:,.0f} | {b[2] / a[2] - 1:+.2%} | "
                f"{_f32_resolution(b[0]):,.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, str | None]:
    """Command line -> (:class:`Options`, output path or None)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--platform", choices=sorted(PLATFORM_DEFAULTS), default="cpu")
    ap.add_argument("--variant", default="B/16")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", default="", help="comma-separated batch sizes (default: platform's)")
    ap.add_argument("--reps", type=int, default=0, help="timed rounds (default: platform's)")
    ap.add_argument("--warmup", type=int, default=-1, help="warm-up rounds (default: platform's)")
    ap.add_argument("--infer-reps", type=int, default=0, help="inference rounds (default 3x reps)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--remat", action="store_true", help="rematerialise block activations")
    ap.add_argument("--no-flops-check", action="store_true", help="skip the B vs 2B compiles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--methods", default=",".join(TRAIN_METHODS), help="train methods (must include full)"
    )
    ap.add_argument("--out", default=None, help="write the markdown report here")
    a = ap.parse_args(argv)
    batches, reps, warmup = PLATFORM_DEFAULTS[a.platform]
    opts = Options(
        platform=a.platform,
        variant=a.variant,
        image_size=a.image_size,
        batches=tuple(int(b) for b in a.batch.split(",")) if a.batch else batches,
        reps=a.reps or reps,
        warmup=warmup if a.warmup < 0 else a.warmup,
        infer_reps=a.infer_reps,
        dtype=a.dtype,
        remat=a.remat,
        flops_check=not a.no_flops_check,
        seed=a.seed,
        methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
    )
    return opts, a.out


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the benchmark from the command line and prints (and optionally writes) the report."""
    opts, out = parse_args(argv)
    import jax

    jax.config.update("jax_platforms", opts.platform)
    results = run_benchmark(opts)
    command = "python " + " ".join(
        [os.path.relpath(__file__)] + list(sys.argv[1:] if argv is None else argv)
    )
    text = report(results, command)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
