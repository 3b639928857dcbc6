"""Train and evaluate a low-precision adapter on a VTAB-1k task.

  python main.py --config=configs/vtab.py:bi_lora,task=dtd --workdir=/tmp/bitpet/dtd \
      --config.init_file=ViT-B_16.npz

Any config value can be overridden with --config.key=value (see configs/vtab.py).
"""

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vtab.py:bi_lora.")
flags.DEFINE_string("workdir", None, "Directory for logs, checkpoints and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only; keep accelerators for JAX
    logging.set_verbosity(logging.INFO)
    entry_point = FLAGS.config.get("entry_point", "")  # e.g. "bitpet.demo:main" (configs/demo.py)
    if entry_point:
        module, _, name = entry_point.partition(":")
        getattr(importlib.import_module(module), name)(FLAGS.config, FLAGS.workdir)
    else:
        config = FLAGS.config
        # Fail fast on an unprepared dataset, before the heavier training imports.
        from bitpet.data import sources

        sources.get_source(config.get("data_source", "vtab")).dataset_version(
            config.task, data_dir=config.get("data_dir") or None, mock_data=config.get("mock_data")
        )
        from bitpet import train

        train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
