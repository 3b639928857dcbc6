"""Run one method on all 19 VTAB-1k tasks and tabulate the results like the paper's Table 3.

  python -m bitpet.sweep --config=configs/vtab.py:bi_lora --workdir=/tmp/sweep \
      --config.init_file=ViT-B_16.npz [--tasks=dtd,svhn]

Each task runs in ``WORKDIR/<task>`` (a finished task is skipped, an interrupted one resumes),
then ``WORKDIR/results.md`` gets per-task accuracy, the Natural / Specialized / Structured
means and their average (the paper's "Avg. Acc." is the mean of the three group means).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from bitpet.data import vtab

FLAGS = flags.FLAGS


def group_means(accuracies: dict[str, float]) -> dict[str, float]:
    """Mean accuracy of each VTAB group present, and "average" = mean of the group means."""
    out = {}
    for group in ("natural", "specialized", "structured"):
        accs = [
            accuracies[t] for t, s in vtab.TASKS.items() if s.group == group and t in accuracies
        ]
        if accs:
            out[group] = sum(accs) / len(accs)
    if out:
        out["average"] = sum(out.values()) / len(out)
    return out


def markdown_table(results: dict[str, dict]) -> str:
    """A Table-3-style markdown table from {task: results.json contents} (accuracies in %)."""
    tasks = [t for t in vtab.TASKS if t in results]
    accs = {t: 100 * results[t]["final_accuracy"] for t in tasks}
    means = group_means(accs)
    first = results[tasks[0]]
    sizes = [results[t].get("task_size_bytes") for t in tasks]
    head = ["Method", "Avg", "Natural", "Specialized", "Structured", *tasks]
    groups = ("average", "natural", "specialized", "structured")
    row = [
        f"{first['method']} (bits={first['bits']}, h={first['h']}, head_bits={first['head_bits']})",
        *(f"{means[g]:.1f}" if g in means else "-" for g in groups),
        *(f"{accs[t]:.1f}" for t in tasks),
    ]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| " + " | ".join(row) + " |",
    ]
    if all(s is not None for s in sizes):
        lines.append(f"\nMean task-file size: {sum(sizes) / len(sizes) / 1024:.1f} KiB.")
    lines.append(
        "\nAccuracies are the final-step test accuracy (%). The original code's protocol "
        "(best of the periodic test evaluations) is in each task's results.json."
    )
    return "\n".join(lines) + "\n"


def collect(workdir: str) -> dict[str, dict]:
    """Reads ``WORKDIR/<task>/results.json`` for every task that has one."""
    out = {}
    for task in vtab.TASKS:
        path = os.path.join(workdir, task, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                out[task] = json.load(f)
    return out


def main(argv):
    del argv
    from bitpet import train

    tasks = FLAGS.tasks.split(",") if FLAGS.tasks else list(vtab.TASKS)
    for task in tasks:
        vtab.get_task(task)
    for task in tasks:
        task_dir = os.path.join(FLAGS.workdir, task)
        if os.path.exists(os.path.join(task_dir, "results.json")):
            logging.info("%s: already finished, skipping.", task)
            continue
        config = FLAGS.config.copy_and_resolve_references()
        config.task = task
        train.train_and_evaluate(config, task_dir)
    table = markdown_table(collect(FLAGS.workdir))
    with open(os.path.join(FLAGS.workdir, "results.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "e.g. configs/vtab.py:bi_lora")
    flags.DEFINE_string("workdir", None, "Root directory; one subdirectory per task.")
    flags.DEFINE_string("tasks", "", "Comma-separated subset of tasks (default: all 19).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
