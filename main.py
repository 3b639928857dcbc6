"""Train and evaluate a low-precision adapter on a VTAB-1k task.

  python main.py --config=configs/vtab.py:bi_lora,task=dtd --workdir=/tmp/bitpet/dtd \
      --config.init_file=ViT-B_16.npz

Any config value can be overridden with --config.key=value (see configs/vtab.py).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from bitpet import train

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
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
