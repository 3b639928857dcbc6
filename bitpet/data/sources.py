"""Data sources the trainer can read: VTAB-1k through TFDS, or the offline bundled-image tasks.

A source is a module with the functions ``num_classes(task)``, ``load_train_set(task, ...)``,
``eval_batches(task, ...)`` and ``dataset_version(task, ...)`` of
:mod:`bitpet.data.pipeline`'s signatures. ``config.data_source`` picks one.
"""

from __future__ import annotations

import importlib
import types

SOURCES = {"vtab": "bitpet.data.pipeline", "offline": "bitpet.data.offline"}


def get_source(name: str) -> types.ModuleType:
    """The data-source module called ``name`` ("vtab" or "offline")."""
    if name not in SOURCES:
        raise ValueError(f"config.data_source={name!r}; valid sources: {sorted(SOURCES)}.")
    return importlib.import_module(SOURCES[name])
