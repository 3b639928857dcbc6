"""Trainable / frozen split of a parameter tree by regexes over "a/b/c" names.

Rules are ``(regex, value)`` pairs matched with ``re.fullmatch``; the first match wins and a
parameter that no rule covers is an error, so a renamed module can never silently change what
is trained.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bitpet.models.vit import param_names, unflatten

ADAPTER_RE = r".*/adaptformer/.*|.*/lora_[qv]/.*"
HEAD_RE = r"head/.*"

# config.trainable -> rules.
TRAINABLE_RULES = {
    "adapters": [(ADAPTER_RE, True), (HEAD_RE, True), (".*", False)],
    "head": [(HEAD_RE, True), (".*", False)],
    "all": [(".*", True)],
}


def match_rules(names: Sequence[str], rules: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Maps each name to the value of the first rule whose regex fully matches it.

    Raises:
      ValueError: listing the names that no rule matches.
    """
    compiled = [(re.compile(rx), v) for rx, v in rules]
    out, unmatched = {}, []
    for name in names:
        for rx, v in compiled:
            if rx.fullmatch(name):
                out[name] = v
                break
        else:
            unmatched.append(name)
    if unmatched:
        raise ValueError(f"No rule covers parameters {unmatched}; rules: {[r for r, _ in rules]}.")
    return out


def rules_for(trainable: str) -> list[tuple[str, bool]]:
    """The rules of a ``config.trainable`` value ("adapters", "head" or "all")."""
    if trainable not in TRAINABLE_RULES:
        raise ValueError(
            f"config.trainable={trainable!r}; valid values: {sorted(TRAINABLE_RULES)}."
        )
    return TRAINABLE_RULES[trainable]


def split(params: dict, rules: Sequence[tuple[str, bool]]) -> tuple[dict, dict]:
    """Splits a nested params tree into nested (trainable, frozen) trees."""
    flat = param_names(params)
    mask = match_rules(list(flat), rules)
    trainable = {k: v for k, v in flat.items() if mask[k]}
    frozen = {k: v for k, v in flat.items() if not mask[k]}
    if not trainable:
        raise ValueError("No parameter is trainable with these rules; check config.trainable.")
    return unflatten(trainable), unflatten(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    """Joins the nested trainable and frozen trees back into one params tree."""
    return unflatten({**param_names(frozen), **param_names(trainable)})


def count(tree: dict) -> int:
    """Number of scalars in a (nested) params tree."""
    return int(sum(int(getattr(v, "size", 0)) for v in param_names(tree).values()))
