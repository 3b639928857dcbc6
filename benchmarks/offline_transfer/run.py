"""Offline transfer benchmark: the structure of the paper's Tables 1, 2 and 4d at toy scale.

A ViT-micro/7 pretrained on the real MNIST digits 0-4 (:func:`bitpet.demo.pretrained_backbone`,
cached) is frozen and transferred to several offline tasks (:mod:`bitpet.data.offline`) with

* Table 1: AdaptFormer and LoRA at h = 8 with 32-bit (float) adapters and 8/4/2/1-bit QAT;
* Table 2: a fixed bits x h = 32 budget: 1-bit h=32, 2-bit h=16, 4-bit h=8, 8-bit h=4,
  32-bit h=1;
* Table 4d: QAT vs post-training quantization (:mod:`bitpet.ptq`, k-means and the Gaussian
  codebook) of the float h = 8 adapters, at 1 and 2 bits;
* references: linear probe (head only) and full fine-tuning.

Every configuration is trained for several seeds at once: the trainable parameters of the seeds
are stacked and one jitted, ``jax.vmap``-ed step updates them all, so each configuration compiles
once per task. The step is the one of :func:`bitpet.train.make_train_step` (same
:func:`bitpet.train.loss_fn`, :func:`bitpet.optim.make_optimizer`, parameter partition, seeded
init, :class:`bitpet.data.pipeline.TrainIterator` batches and dropout keys), vmapped. Accuracy is
that of the stored form: quantized adapters are materialized (Eq. 9) as the task file stores them.
For seed 0 of every configuration the task file is written, read back and compared
bit-for-bit with the evaluated weights; its size is reported.

  python benchmarks/offline_transfer/run.py                       # full benchmark, ~30 min
  python benchmarks/offline_transfer/run.py --tasks=mnist_5to9 --seeds=0 --steps=50  # smoke

Writes ``results.json`` (every seed) and ``results.md`` (the tables) to ``--out`` (default: this
folder); a rerun with the same settings skips the configurations already in ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bitpet import checkpoints, demo, optim, partition, ptq, taskfile, train  # noqa: E402
from bitpet.data import offline  # noqa: E402
from bitpet.data.pipeline import TrainIterator  # noqa: E402
from bitpet.models import vit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TASKS = ("mnist_5to9", "sk_digits", "lfw_faces", "shapes_loc", "shapes_ori")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One trained configuration: adapter kind, bits, h; or "linear" / "full"."""

    method: str  # "adaptformer" | "lora" | "linear" | "full"
    bits: int = 32
    h: int = 0

    @property
    def name(self) -> str:
        """Key in results.json, e.g. "adaptformer-b1-h8"."""
        return (
            self.method
            if self.method in ("linear", "full")
            else (f"{self.method}-b{self.bits}-h{self.h}")
        )

    @property
    def trainable(self) -> str:
        """``config.trainable`` of this configuration."""
        return {"linear": "head", "full": "all"}.get(self.method, "adapters")

    @property
    def adapter(self) -> str:
        """``config.model.adapter``."""
        return "none" if self.method in ("linear", "full") else self.method


def all_specs() -> list[Spec]:
    """Every trained configuration of the benchmark (Tables 1 and 2 and the references)."""
    specs = [Spec("linear"), Spec("full")]
    for kind in ("adaptformer", "lora"):
        specs += [Spec(kind, b, 8) for b in (32, 8, 4, 2, 1)]  # Table 1
        specs += [Spec(kind, b, 32 // b if b < 32 else 1) for b in (1, 2, 8, 32)]  # Table 2
    return specs


def extra_specs() -> list[Spec]:
    """Supplementary configurations, run only when named in ``--configs``: float h = 32."""
    return [Spec(kind, 32, 32) for kind in ("adaptformer", "lora")]


def hparams(args) -> ml_collections.ConfigDict:
    """The fine-tuning recipe: the paper's, shortened (see README)."""
    c = ml_collections.ConfigDict()
    c.lr, c.weight_decay, c.warmup_lr, c.min_lr = args.lr, 1e-4, 1e-6, 1e-5
    c.epochs, c.warmup_epochs, c.lr_per_epoch = 100, 10, False  # warm-up = 10 % of the run
    c.batch_size, c.total_steps = 64, args.steps
    c.image_size = args.image_size
    return c


def model_for(spec: Spec, num_classes: int, args, scale: float, *, bits: int | None = None):
    """The ViT of a configuration (``bits`` overrides the adapter precision)."""
    return vit.from_config(
        dict(
            variant=args.variant,
            adapter=spec.adapter,
            h=max(spec.h, 1),
            bits=spec.bits if bits is None else bits,
            scale=scale,
            dropout=0.1,
            head_bits=32,
            drop_path=0.1,
        ),
        num_classes,
    )


def stack(trees: list) -> dict:
    """Stacks identically structured trees along a new leading (seed) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, n: int) -> list:
    """Inverse of :func:`stack`."""
    return [jax.tree.map(lambda x, i=i: np.asarray(x[i]), tree) for i in range(n)]


class Evaluator:
    """Test accuracy of stacked (per-seed) trainable params, with one compile per structure."""

    def __init__(self, task: str, args, split: str = "final"):
        batches = list(
            offline.eval_batches(task, split=split, batch_size=500, image_size=args.image_size)
        )
        self.batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
        self._fns: dict = {}

    def accuracy(self, model, trainable_stacked, frozen) -> np.ndarray:
        """Per-seed accuracy [S]; ``model`` must be a non-quantizing (bits 32) model."""
        key = (model.variant, model.adapter, model.num_classes, model.head_bits)
        if key not in self._fns:

            def per_seed(trainable, frozen, batch):
                params = partition.merge(trainable, frozen)
                logits = model.apply({"params": params}, batch["image"], train=False)
                return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["mask"])

            self._fns[key] = jax.jit(jax.vmap(per_seed, in_axes=(0, None, None)))
        fn = self._fns[key]
        correct = sum(np.asarray(fn(trainable_stacked, frozen, b)) for b in self.batches)
        total = sum(float(b["mask"].sum()) for b in self.batches)
        return correct / total


def train_seeds(
    spec: Spec,
    task: str,
    seeds: list[int],
    backbone: str,
    args,
    log,
    *,
    scale: float,
    split: str = "final",
) -> dict:
    """Trains ``spec`` on ``task`` for every seed at once; returns the per-seed trained trees."""
    hp = hparams(args)
    data = offline.load_train_set(task, split=split, image_size=args.image_size)
    n_cls = offline.num_classes(task)
    model = model_for(spec, n_cls, args, scale)
    rules = partition.rules_for(spec.trainable)
    shape = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
    init = jax.jit(lambda rng: model.init(rng, shape)["params"])
    trainables, frozen = [], None
    for seed in seeds:  # == bitpet.train.init_params: seeded init, then the backbone
        params = checkpoints.load_pretrained(backbone, init(jax.random.PRNGKey(seed)))
        t, frozen = partition.split(params, rules)
        trainables.append(t)
    steps_per_epoch = max(len(data["label"]) // hp.batch_size, 1)
    tx, schedule = optim.make_optimizer(hp, steps_per_epoch, hp.total_steps)

    step_fn = train.make_step_fn(model, tx, schedule)
    vstep = jax.jit(jax.vmap(step_fn, in_axes=(0, None, 0, 0)), donate_argnums=(0,))
    params0 = stack(trainables)
    state = {
        "params": params0,
        "opt_state": jax.vmap(tx.init)(params0),
        "step": jnp.zeros((len(seeds),), jnp.int32),
    }
    iters = [TrainIterator(data, batch_size=hp.batch_size, seed=s) for s in seeds]
    rngs = jnp.stack([jax.random.PRNGKey(s + 1) for s in seeds])
    start, losses, gnorms = time.time(), [], []
    for i in range(hp.total_steps):
        batch = [next(it) for it in iters]
        batch = {k: jnp.asarray(np.stack([b[k] for b in batch])) for k in batch[0]}
        state, metrics = vstep(state, frozen, batch, rngs)
        if i == 0:
            compiled = time.time()
        if i >= hp.total_steps - 10:
            losses.append(np.asarray(metrics["train_loss"]))
            gnorms.append(np.asarray(metrics["grad_norm"]))
    jax.block_until_ready(state)
    secs = time.time() - start
    log(
        f"    {spec.name:<20} s={scale:g} trained {hp.total_steps} steps x {len(seeds)} seeds "
        f"in {secs:.1f}s (compile+first step {compiled - start:.1f}s)"
    )
    return {
        "model": model,
        "trainables": unstack(state["params"], len(seeds)),
        "frozen": frozen,
        "final_loss": np.mean(losses, 0).tolist(),
        "final_grad_norm": np.mean(gnorms, 0).tolist(),
        "train_seconds": secs,
    }


def write_and_check(path: str, model, trainable, frozen, *, task, method, encoded=None) -> int:
    """Writes a task file, reads it back onto the backbone and checks the weights bit-for-bit.

    ``trainable`` holds the trained task tensors (or, with ``encoded``, the evaluated ones of a
    PTQ result). Returns the file size.
    """
    params = partition.merge(trainable, frozen)
    if encoded is None:
        nbytes = taskfile.write(path, model, params, task=task, method=method)
        _, evaluated = vit.materialize_params(model, params)
    else:
        nbytes = taskfile.write(path, model, params, task=task, method=method, encoded=encoded)
        evaluated = params
    _, loaded = taskfile.load_into(path, frozen)
    got, want = vit.param_names(loaded), vit.param_names(evaluated)
    for name in got:
        if checkpoints.TASK_PARAM_RE.fullmatch(name) and not np.array_equal(
            np.asarray(got[name]), np.asarray(want[name])
        ):
            raise AssertionError(f"{path}: {name} differs after the round trip")
    return nbytes


def select_scales(task: str, args, backbone: str, done: dict, save, log) -> dict[str, float]:
    """The adapter scale s of each adapter kind on ``task``, chosen on the tune split.

    As in the paper, s is the only per-task hyper-parameter. Here it is picked from
    ``args.scale_grid`` by the validation accuracy (train on 80 % of the train set, evaluate on
    the other 20 %; seed ``args.seeds[0]``) of the *float* h = 8 adapter, and then used for every
    bit-width and h of that kind. The test split is never looked at.
    """
    if args.scale:
        return {k: args.scale for k in ("adaptformer", "lora")}
    sel = done.setdefault("_scale_selection", {}).setdefault(task, {})
    evaluator = None
    for kind in ("adaptformer", "lora"):
        accs = sel.setdefault(kind, {})
        for scale in args.scale_grid:
            if f"{scale:g}" in accs:
                continue
            evaluator = evaluator or Evaluator(task, args, "tune")
            spec = Spec(kind, 32, 8)
            out = train_seeds(
                spec, task, args.seeds[:1], backbone, args, log, scale=scale, split="tune"
            )
            acc = evaluator.accuracy(
                model_for(spec, offline.num_classes(task), args, scale),
                stack(out["trainables"]),
                out["frozen"],
            )
            accs[f"{scale:g}"] = float(acc[0])
            log(f"    {spec.name:<20} s={scale:g} validation accuracy {100 * acc[0]:.1f}")
            save()
    best = {k: float(max(v, key=lambda s: (v[s], -float(s)))) for k, v in sel.items()}
    log(f"    selected scales: {best}")
    return best


def run_task(task: str, args, backbone: str, done: dict, save, log) -> None:
    """Every configuration of one task (skipping those in ``done``)."""
    seeds = args.seeds
    scales = select_scales(task, args, backbone, done, save, log)
    n_cls = offline.num_classes(task)
    evaluator = Evaluator(task, args, args.split)
    files = os.path.join(args.workdir, task)
    os.makedirs(files, exist_ok=True)
    res = done.setdefault(task, {})
    specs = all_specs() + [s for s in extra_specs() if s.name in args.configs]
    specs = [s for s in specs if not args.configs or s.name in args.configs]
    for spec in specs:
        ptq_keys = [
            f"ptq-{cb}-{spec.method}-b{b}-h8" for b in (1, 2) for cb in ("kmeans", "gaussian")
        ]
        needs_ptq = spec.bits == 32 and spec.h == 8 and not args.no_ptq
        if spec.name in res and (not needs_ptq or all(k in res for k in ptq_keys)):
            continue
        scale = scales.get(spec.adapter, 1.0)
        out = train_seeds(spec, task, seeds, backbone, args, log, scale=scale, split=args.split)
        model, frozen = out["model"], out["frozen"]
        eval_model = model_for(spec, n_cls, args, scale, bits=32)
        if spec.adapter != "none" and spec.bits <= 8:  # the stored (materialized) weights
            evaluated = [vit.materialize_params(model, t)[1] for t in out["trainables"]]
        else:
            evaluated = out["trainables"]
        acc = evaluator.accuracy(eval_model, stack(evaluated), frozen)
        size = None
        if spec.trainable != "all":  # a full fine-tune is a new backbone, not a task file
            path = os.path.join(files, f"{spec.name}.bitpet")
            size = write_and_check(
                path, model, out["trainables"][0], frozen, task=task, method=spec.name
            )
        rep = taskfile.size_report(model) if spec.trainable != "all" else None
        res[spec.name] = {
            "accuracy": acc.tolist(),
            "seeds": seeds,
            "scale": scale,
            "task_file_bytes": size,
            "adapter_bytes": rep.adapter_bytes if rep else None,
            "head_bytes": rep.head_bytes if rep else None,
            "final_train_loss": out["final_loss"],
            "final_grad_norm": out["final_grad_norm"],
            "train_seconds": out["train_seconds"],
        }
        log(f"    {spec.name:<20} {args.split} accuracy {fmt(acc)}  file {size} B")
        if needs_ptq:  # Table 4d: post-training quantization of these float adapters
            for bits in (1, 2):
                for cb in ("kmeans", "gaussian"):
                    results = [
                        ptq.ptq(model, partition.merge(t, frozen), bits, codebook=cb)
                        for t in out["trainables"]
                    ]
                    rules = partition.rules_for("adapters")
                    q_trainables = [partition.split(r.params, rules)[0] for r in results]
                    acc = evaluator.accuracy(eval_model, stack(q_trainables), frozen)
                    key = f"ptq-{cb}-{spec.method}-b{bits}-h8"
                    r0 = results[0]
                    size = write_and_check(
                        os.path.join(files, f"{key}.bitpet"),
                        r0.model,
                        q_trainables[0],
                        frozen,
                        task=task,
                        method=r0.method,
                        encoded=r0.encoded,
                    )
                    res[key] = {
                        "accuracy": acc.tolist(),
                        "seeds": seeds,
                        "task_file_bytes": size,
                        "adapter_bytes": taskfile.size_report(
                            taskfile.read(os.path.join(files, f"{key}.bitpet"))
                        ).adapter_bytes,
                        "sse": [float(sum(r.sse.values())) for r in results],
                    }
                    log(f"    {key:<20} {args.split} accuracy {fmt(acc)}  file {size} B")
        save()


def fmt(acc) -> str:
    """ "mean ± std" in percent over seeds."""
    a = 100 * np.asarray(acc, np.float64)
    return f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f}"


# ---------------------------------------------------------------------------------------
# Markdown.


def _cell(res: dict, key: str, tasks: list[str]) -> list[str]:
    out = []
    for t in tasks:
        r = res.get(t, {}).get(key)
        out.append(fmt(r["accuracy"]) if r else "–")
    return out


def _avg(res: dict, key: str, tasks: list[str]) -> str:
    """Mean over tasks, ± std over seeds of the per-seed task average."""
    rows = [res[t][key]["accuracy"] for t in tasks if key in res.get(t, {})]
    if len(rows) != len(tasks):
        return "–"
    return fmt(np.mean(np.asarray(rows), 0))


def _size(res: dict, key: str, tasks: list[str], field: str) -> str:
    vals = [res[t][key][field] for t in tasks if key in res.get(t, {})]
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    lo, hi = min(vals), max(vals)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def table(res: dict, rows: list[tuple[str, str]], tasks: list[str]) -> list[str]:
    """A markdown table: label, avg, per-task accuracies, adapter bytes, task-file bytes."""
    head = ["Method", "Avg acc (%)", *tasks, "adapter B", "task file B"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    _avg(res, key, tasks),
                    *_cell(res, key, tasks),
                    _size(res, key, tasks, "adapter_bytes"),
                    _size(res, key, tasks, "task_file_bytes"),
                ]
            )
            + " |"
        )
    return lines


NAMES = {"adaptformer": "AdaptFormer", "lora": "LoRA"}
NOTES_MARKER = "<!-- Hand-written notes below this line are kept when run.py rewrites the file. -->"


def tables(res: dict, tasks: list[str]) -> str:
    """Tables 1, 2 and 4d in markdown."""
    L = ["### Table 1 — bit-width at fixed h = 8 (QAT for 8/4/2/1 bits)\n"]
    rows = [("Linear probe (head only)", "linear"), ("Full fine-tuning", "full")]
    for k in ("adaptformer", "lora"):
        rows += [
            (f"{NAMES[k]} {b}-bit h=8" + (" (float)" if b == 32 else ""), f"{k}-b{b}-h8")
            for b in (32, 8, 4, 2, 1)
        ]
    L += table(res, rows, tasks)
    L.append("\n### Table 2 — fixed budget bits × h = 32\n")
    rows = []
    for k in ("adaptformer", "lora"):
        rows += [
            (
                f"{NAMES[k]} {b}-bit h={32 // b if b < 32 else 1}",
                f"{k}-b{b}-h{32 // b if b < 32 else 1}",
            )
            for b in (32, 8, 4, 2, 1)
        ]
    L += table(res, rows, tasks)
    L.append("\n### Table 4d — QAT vs post-training quantization (h = 8)\n")
    rows = []
    for k in ("adaptformer", "lora"):
        rows.append((f"{NAMES[k]} 32-bit (float, PTQ source)", f"{k}-b32-h8"))
        for b in (2, 1):
            rows += [
                (f"{NAMES[k]} {b}-bit QAT", f"{k}-b{b}-h8"),
                (f"{NAMES[k]} {b}-bit PTQ k-means", f"ptq-kmeans-{k}-b{b}-h8"),
                (f"{NAMES[k]} {b}-bit PTQ Gaussian codebook", f"ptq-gaussian-{k}-b{b}-h8"),
            ]
    L += table(res, rows, tasks)
    if any(f"{k}-b32-h32" in res.get(t, {}) for t in tasks for k in NAMES):
        L.append("\n### Supplement — float vs 1-bit at the same h = 32 (not in the paper)\n")
        rows = []
        for k in ("adaptformer", "lora"):
            rows += [
                (f"{NAMES[k]} 32-bit h=32 (float)", f"{k}-b32-h32"),
                (f"{NAMES[k]} 1-bit h=32", f"{k}-b1-h32"),
                (f"{NAMES[k]} 32-bit h=8 (float)", f"{k}-b32-h8"),
                (f"{NAMES[k]} 1-bit h=8", f"{k}-b1-h8"),
            ]
        L += table(res, rows, tasks)
    return "\n".join(L) + "\n"


def _mean(res: dict, key: str, tasks: list[str]) -> float | None:
    """Average accuracy (%) over tasks and seeds, or None if incomplete."""
    rows = [res[t][key]["accuracy"] for t in tasks if key in res.get(t, {})]
    return 100 * float(np.mean(rows)) if rows and len(rows) == len(tasks) else None


def _ratio(res: dict, tasks: list[str], big: str, small: str) -> float:
    """Adapter-bytes ratio of two configurations (first task that has both)."""
    for t in tasks:
        r = res.get(t, {})
        if big in r and small in r and r[small]["adapter_bytes"]:
            return r[big]["adapter_bytes"] / r[small]["adapter_bytes"]
    return float("nan")


def pattern_checks(res: dict, tasks: list[str]) -> list[str]:
    """The paper's qualitative claims, checked on these numbers (averages over tasks)."""
    m = lambda key: _mean(res, key, tasks)  # noqa: E731
    out = []

    def diff(a, b):
        return None if m(a) is None or m(b) is None else m(a) - m(b)

    def line(text, d, ok):
        if d is not None:
            out.append(f"- {text}: {d:+.1f} points → **{'yes' if ok(d) else 'no'}**")

    for k in ("adaptformer", "lora"):
        n = NAMES[k]
        line(
            f"{n}: 1-bit QAT h=8 within 1 point of float h=8 (paper: −0.3 / −0.0)",
            diff(f"{k}-b1-h8", f"{k}-b32-h8"),
            lambda d: d >= -1.0,
        )
        ratio = _ratio(res, tasks, f"{k}-b32-h8", f"{k}-b1-h32")
        line(
            f"{n}: 1-bit QAT h=32 within 1 point of (or above) float h=8, an adapter "
            f"{ratio:.1f}x smaller (paper: +0.3 / +0.3)",
            diff(f"{k}-b1-h32", f"{k}-b32-h8"),
            lambda d: d >= -1.0,
        )
        line(
            f"{n}: 1-bit QAT h=32 within 1 point of float h=32 (supplement)",
            diff(f"{k}-b1-h32", f"{k}-b32-h32"),
            lambda d: d >= -1.0,
        )
        line(
            f"{n}: 1-bit QAT far above 1-bit PTQ k-means, h=8 (paper: +9.1 / +9.0)",
            diff(f"{k}-b1-h8", f"ptq-kmeans-{k}-b1-h8"),
            lambda d: d >= 3.0,
        )
        line(
            f"{n}: 1-bit QAT above 1-bit PTQ with the Gaussian codebook, h=8",
            diff(f"{k}-b1-h8", f"ptq-gaussian-{k}-b1-h8"),
            lambda d: d >= 3.0,
        )
        line(
            f"{n}: float h=8 above linear probe (paper: +19.1 / +18.8)",
            diff(f"{k}-b32-h8", "linear"),
            lambda d: d > 0,
        )
        line(f"{n}: 1-bit h=32 above linear probe", diff(f"{k}-b1-h32", "linear"), lambda d: d > 0)
        line(
            f"{n}: 1-bit h=32 above full fine-tuning (paper: +8.1 / +7.8)",
            diff(f"{k}-b1-h32", "full"),
            lambda d: d > 0,
        )
        budget = [m(f"{k}-b{b}-h{32 // b if b < 32 else 1}") for b in (32, 8, 4, 2, 1)]
        if None not in budget:
            mono = all(b >= a - 0.5 for a, b in zip(budget, budget[1:], strict=False))
            best = (32, 8, 4, 2, 1)[int(np.argmax(budget))]
            out.append(
                f"- {n}: Table 2, accuracy rises as bits fall and h grows (32/h1 → 1/h32: "
                + ", ".join(f"{v:.1f}" for v in budget)
                + f"; best at {best} bits) → **{'yes' if mono and best == 1 else 'no'}**"
            )
    return out


def markdown(res: dict, meta: dict) -> str:
    """The generated part of results.md: how it was run, the tables, the pattern checks."""
    tasks = [t for t in meta["tasks"] if t in res]
    st, mc, bb = meta["settings"], meta["machine"], meta.get("backbone_info", {})
    pre_acc = 100 * bb.get("pretrain_test_accuracy", float("nan"))
    L = [
        "# Offline transfer benchmark — results",
        "",
        "Generated by `benchmarks/offline_transfer/run.py` (see README.md for the design). "
        "Accuracy: mean ± std over seeds "
        f"{st['seeds']} of the "
        + ("test" if st.get("split", "final") == "final" else "VALIDATION (tune split)")
        + " accuracy (%), in the stored (materialized) form; "
        '"Avg" is the mean over tasks (± std over seeds of the per-seed task mean). '
        '"adapter B": adapter payload bytes (codes + μ, σ; the paper\'s "Size"); '
        '"task file B": the whole bitpet task file (adapter + float32 head + header), '
        "written, read back and checked bit-for-bit for seed 0 (ranges: over tasks, whose "
        "heads differ in size).",
        "",
        *[
            f"- {'Command' if i == 0 else 'Then'}: `{r['command']}` — wall time "
            f"{r['wall_seconds'] / 60:.1f} min"
            + (" (including backbone pretraining)" if r.get("pretrained_backbone") else "")
            for i, r in enumerate(meta["runs"])
        ],
        f"- Machine: {mc['nproc']} CPU cores ({mc['cpu']}), backend {mc['backend']}; shared with "
        "other jobs while it ran",
        f"- Versions: bitpet {mc['bitpet']}, Python {mc['python']}, jax {mc['jax']}, flax "
        f"{mc['flax']}, optax {mc['optax']}",
        f"- Backbone: ViT-{st['variant']} at {st['image_size']} px, pretrained from scratch on "
        f"MNIST digits 0–4 (test accuracy {pre_acc:.1f} %), cached as `{st['backbone']}`",
        f"- Fine-tuning: {st['steps']} steps, batch 64, AdamW lr {st['lr']:g}, weight decay 1e-4, "
        "10 % linear warm-up then cosine, adapter dropout 0.1, drop-path 0.1, no augmentation",
        "",
    ]
    sel = res.get("_scale_selection", {})
    if sel:
        L += [
            "Adapter scale s per task (selected on the tune split by the float h = 8 adapter, "
            f"seed {st['seeds'][0]}, from {st['scale_grid']}; validation accuracy %):",
            "",
            "| task | "
            + " | ".join(f"AdaptFormer s={g:g}" for g in st["scale_grid"])
            + " | "
            + " | ".join(f"LoRA s={g:g}" for g in st["scale_grid"])
            + " | chosen (AF, LoRA) |",
            "|" + "---|" * (2 + 2 * len(st["scale_grid"])),
        ]
        for t in tasks:
            if t not in sel:
                continue
            cells = []
            for k in ("adaptformer", "lora"):
                cells += [
                    f"{100 * sel[t][k][f'{g:g}']:.1f}" if f"{g:g}" in sel[t].get(k, {}) else "–"
                    for g in st["scale_grid"]
                ]
            chosen = [res[t].get(f"{k}-b32-h8", {}).get("scale") for k in ("adaptformer", "lora")]
            L.append(
                f"| {t} | " + " | ".join(cells) + f" | {chosen[0]:g}, {chosen[1]:g} |"
                if None not in chosen
                else f"| {t} | " + " | ".join(cells) + " | – |"
            )
        L.append("")
    L += [tables(res, tasks), "### The paper's pattern, checked on the averages", ""]
    L += pattern_checks(res, tasks)
    return "\n".join(L) + "\n"


def write_results_md(path: str, body: str) -> None:
    """Writes the generated ``body``, keeping any hand-written notes after NOTES_MARKER."""
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER) + len(NOTES_MARKER) :]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(body + "\n" + NOTES_MARKER + (notes or "\n"))
    os.replace(tmp, path)


def machine() -> dict:
    """nproc, CPU model and versions."""
    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, **train.versions()}


def main(argv=None) -> int:
    """Runs the benchmark (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (batch 64)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--scale",
        type=float,
        default=0.0,
        help="fixed adapter scale s for every task; 0: select per task and adapter "
        "kind from --scale_grid on the tune split",
    )
    p.add_argument("--scale_grid", default="1,10,100")
    p.add_argument("--image_size", type=int, default=28)
    p.add_argument("--variant", default=demo.PRETRAIN_DEFAULTS["variant"])
    p.add_argument("--configs", default="", help="comma-separated subset, e.g. linear,lora-b1-h8")
    p.add_argument("--no_ptq", action="store_true")
    p.add_argument(
        "--split",
        default="final",
        choices=("final", "tune"),
        help="final: train set -> test set; tune: its first 80 %% -> the other 20 %% (for "
        "studies that must not see the test set)",
    )
    p.add_argument("--out", default=HERE)
    p.add_argument("--workdir", default="/tmp/bitpet-offline-transfer")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.configs = [c for c in args.configs.split(",") if c]
    args.scale_grid = [float(x) for x in args.scale_grid.split(",") if x]
    for t in args.tasks:
        offline.get_task(t)

    def log(msg):
        print(msg, flush=True)

    start = time.time()
    pre = demo.pretrain_settings(variant=args.variant, image_size=args.image_size)
    cached = os.path.exists(demo.backbone_path(pre))
    backbone = demo.pretrained_backbone(pre)
    settings = {
        k: getattr(args, k)
        for k in ("seeds", "steps", "lr", "scale", "image_size", "variant", "scale_grid")
    }
    if args.split != "final":
        settings["split"] = args.split
    settings["backbone"] = os.path.basename(backbone)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    done: dict = {}
    runs: list[dict] = []  # every invocation that added results: command and wall time
    if os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
        if old.get("settings") == settings:
            done, runs = old["results"], old.get("runs", [])
            log(f"Resuming: {sum(len(v) for v in done.values())} results in {json_path}")
    this_run = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "wall_seconds": 0.0,
        "pretrained_backbone": not cached,
    }
    runs.append(this_run)

    meta = {
        "settings": settings,
        "tasks": args.tasks,
        "machine": machine(),
        "backbone_info": demo.backbone_info(backbone),
        "runs": runs,
    }

    def save():
        this_run["wall_seconds"] = time.time() - start
        meta["wall_seconds"] = sum(r["wall_seconds"] for r in runs)
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**meta, "results": done}, f, indent=1)
        os.replace(tmp, json_path)

    for task in args.tasks:
        log(
            f"== {task} ({offline.get_task(task).description}, {offline.num_classes(task)} "
            f"classes) [{time.time() - start:.0f}s]"
        )
        run_task(task, args, backbone, done, save, log)
    save()
    body = markdown(done, meta)
    write_results_md(os.path.join(args.out, "results.md"), body)
    log(body)
    log(f"Total wall time {meta['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
