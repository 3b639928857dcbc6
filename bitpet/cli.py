"""Command line: ``python -m bitpet {inspect,import-original,export,ptq,evaluate} ...``.

Examples::

  python -m bitpet inspect task.bitpet
  python -m bitpet import-original models_bin/adaptformer/cifar-bit1-dim32.bin --out cifar.bitpet
  python -m bitpet export --workdir /tmp/dtd --out dtd.bitpet
  python -m bitpet ptq --workdir /tmp/dtd_fp32 --bits 1 --codebook kmeans --out dtd_ptq.bitpet
  python -m bitpet evaluate dtd.bitpet --config configs/vtab.py:bi_lora,task=dtd \\
      --config.init_file=ViT-B_16.npz

``evaluate`` takes the backbone from ``--config``'s ``init_file`` (any ``--config.key=value``
overrides apply) or from a trained ``--workdir``; the model structure always comes from the
file. Errors (bad or corrupt files, fingerprint mismatches, configs that do not fit) are printed
as one message and exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from typing import Any

from bitpet import taskfile


def _print(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def describe(tf: taskfile.TaskFile, *, per_matrix: bool = True) -> str:
    """Human-readable metadata and size table of a task file."""
    m = tf.meta
    head = "float32 kernel + bias" if m["head_bits"] == 32 else f"{m['head_bits']}-bit kernel"
    codebooks = sorted({r.spec.codebook for n, r in tf.records.items() if not n.startswith("head")})
    lines = [
        f"file:        {tf.path}",
        f"format:      bitpet task file v{taskfile.FORMAT_VERSION} (written by bitpet "
        f"{m.get('bitpet', '?')})",
        f"method:      {m.get('method')}",
        f"task:        {m.get('task')} ({m['num_classes']} classes)",
        f"backbone:    ViT-{m['variant']} (d={m['d']}, {m['layers']} blocks), fingerprint "
        f"{m.get('fingerprint') or 'none recorded'}",
        f"adapter:     {m['adapter']} h={m['h']} bits={m['bits']} blocks={m['blocks']} "
        f"scale={m['scale']:g} std_mode={m['std_mode']} codebook={','.join(codebooks) or '-'}",
        f"head:        {head}",
    ]
    for k, v in sorted((m.get("extra") or {}).items()):
        lines.append(f"{k + ':':<12} {v}")
    lines += ["", taskfile.size_report(tf).format(per_matrix=per_matrix)]
    return "\n".join(lines)


def _cmd_inspect(args) -> int:
    tf = taskfile.read(args.file)
    if args.json:
        meta = {k: v for k, v in tf.meta.items() if k != "tensors"}
        _print(json.dumps(dict(meta=meta, sizes=taskfile.size_report(tf).as_dict()), indent=1))
    else:
        _print(describe(tf, per_matrix=not args.no_rows))
    return 0


def _cmd_import(args) -> int:
    from bitpet import original

    fingerprint = args.fingerprint
    if args.backbone:
        fingerprint = original.backbone_fingerprint_of(args.backbone, args.image_size)
    spec, tensors, _ = original.import_original(
        args.bin, args.yaml, out=args.out, fingerprint=fingerprint
    )
    _print(f"imported {args.bin} ({spec.method}, task {spec.task}) -> {args.out}")
    _print(describe(taskfile.read(args.out), per_matrix=False))
    return 0


def _restore(workdir: str):
    try:
        from bitpet.train import restore_trained
    except ImportError as e:
        raise RuntimeError(f"bitpet.train.restore_trained is not available: {e}") from e
    return restore_trained(workdir)


def _cmd_export(args) -> int:
    config, model, params = _restore(args.workdir)
    task = args.task or config.get("task")
    method = args.method or config.get("method")
    if not task or not method:
        raise ValueError("The workdir's config has no task/method; pass --task and --method.")
    n = taskfile.write(args.out, model, params, task=task, method=method)
    _print(f"wrote {args.out}: {n} bytes")
    _print(describe(taskfile.read(args.out), per_matrix=False))
    return 0


def _cmd_ptq(args) -> int:
    from bitpet import ptq

    config, model, params = _restore(args.workdir)
    result = ptq.ptq(model, params, args.bits, codebook=args.codebook, blocks=args.blocks)
    n = ptq.write(args.out, result, task=args.task or config.get("task"))
    _print(f"wrote {args.out}: {n} bytes ({result.method}, {args.bits} bit)")
    _print(describe(taskfile.read(args.out), per_matrix=False))
    return 0


def load_config(spec: str):
    """Loads ``path/to/config.py[:arg]`` by calling its ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist.")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location("_bitpet_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _convert(old: Any, text: str) -> Any:
    if isinstance(old, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    return text


def apply_overrides(config, overrides: list[str]):
    """Applies ``--config.a.b=value`` strings (typed like the existing value)."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unrecognised argument {item!r} (expected --config.key=value).")
        key, value = item[len("--config.") :].split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"--config.{key}: no such config key.")
        with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
            node[leaf] = _convert(node[leaf], value)
    return config


def _load_backbone(config, tf: taskfile.TaskFile):
    import jax
    import jax.numpy as jnp

    from bitpet import checkpoints

    init_file = config.get("init_file")
    if not init_file:
        raise ValueError(
            "evaluate needs the backbone the adapters were trained on: pass "
            "--config.init_file=/path/to/ViT-B_16.npz, or --workdir of the training run."
        )
    size = int(config.get("image_size", 224))
    model = tf.model()
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    return checkpoints.load_pretrained(init_file, shapes)


def _cmd_evaluate(args, overrides: list[str]) -> int:
    try:
        from bitpet.evaluate import evaluate_split
    except ImportError as e:
        raise RuntimeError(f"bitpet.evaluate.evaluate_split is not available: {e}") from e
    tf = taskfile.read(args.file)
    if args.workdir:
        config, _, backbone = _restore(args.workdir)
        if args.config:
            config = load_config(args.config)
    elif args.config:
        config, backbone = load_config(args.config), None
    else:
        raise ValueError("evaluate needs --config (with init_file) or --workdir.")
    config = apply_overrides(config, overrides)
    if config.get("task") and config.task != tf.meta["task"]:
        raise ValueError(
            f"{args.file} holds adapters for task {tf.meta['task']!r}, the config is for "
            f"{config.task!r}; pass task={tf.meta['task']} in --config."
        )
    if backbone is None:
        backbone = _load_backbone(config, tf)
    model_cfg = config.get("model") or {}
    model, params = taskfile.load_into(
        tf,
        backbone,
        {"dtype": model_cfg.get("dtype", "float32"), "remat": model_cfg.get("remat", False)},
        allow_fingerprint_mismatch=args.allow_fingerprint_mismatch,
    )
    if "model" in config:
        with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
            config.model.update(tf.model_config())
    metrics = evaluate_split(model, params, config)
    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(metrics).items()}
    _print(json.dumps(dict(file=args.file, task=tf.meta["task"], **metrics), default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m bitpet``."""
    p = argparse.ArgumentParser(
        prog="python -m bitpet",
        description="bitpet task files: inspect, import the original release, export, PTQ, "
        "evaluate.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="metadata and per-matrix sizes of a task file")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--no-rows", action="store_true", help="omit the per-matrix table")

    s = sub.add_parser("import-original", help="convert a released PETL-ViT .bin")
    s.add_argument("bin")
    s.add_argument("--yaml", default=None, help="its yaml (default: found in the release tree)")
    s.add_argument("--out", required=True)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--fingerprint", default=None, help="backbone fingerprint to record")
    g.add_argument("--backbone", default=None, help="ViT-B_16.npz to fingerprint")
    s.add_argument("--image-size", type=int, default=224)

    s = sub.add_parser("export", help="write the task file of a trained workdir")
    s.add_argument("--workdir", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--task", default=None)
    s.add_argument("--method", default=None)

    s = sub.add_parser("ptq", help="post-training quantization of a trained FP32 workdir")
    s.add_argument("--workdir", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--bits", type=int, required=True)
    s.add_argument("--codebook", choices=("kmeans", "gaussian"), default="kmeans")
    s.add_argument("--blocks", type=int, default=1)
    s.add_argument("--task", default=None)

    s = sub.add_parser("evaluate", help="evaluate a task file on its task's evaluation split")
    s.add_argument("file")
    s.add_argument("--config", default=None, help="configs/vtab.py:ARG (and --config.k=v)")
    s.add_argument("--workdir", default=None, help="take config and backbone from a run")
    s.add_argument("--allow-fingerprint-mismatch", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (errors print one message to stderr, status 1)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "evaluate":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "import-original":
            return _cmd_import(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "ptq":
            return _cmd_ptq(args)
        return _cmd_evaluate(args, rest)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
