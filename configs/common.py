"""Parsing of the ``:arg`` part of ``--config=configs/vtab.py:ARG``.

``ARG`` is a comma-separated list: an optional leading bare token (the method) followed by
``key=value`` pairs, e.g. ``bi_lora,task=dtd,h=1``. Values are converted to the type of the
default for that key; keys without a default are an error that lists the valid keys.
"""

from __future__ import annotations

from typing import Any

import ml_collections

_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ValueError(f"{key}={text!r}: expected a boolean (true/false).")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``"method,key=value,..."`` into a ConfigDict typed by ``defaults``.

    Args:
      arg: the string after ``:`` in ``--config=file.py:arg`` (may be None or empty).
      **defaults: every accepted key with its default value; the leading bare token, if any,
        sets the key ``method`` (which must then be among the defaults).

    Returns:
      ConfigDict with every key of ``defaults``.

    Raises:
      ValueError: an unknown key, a second bare token, or a value of the wrong type.
    """
    out = dict(defaults)
    for i, token in enumerate(t.strip() for t in (arg or "").split(",")):
        if not token:
            continue
        if "=" not in token:
            if i != 0 or "method" not in defaults:
                raise ValueError(
                    f"Config argument {token!r}: only the first item may be a bare method name; "
                    "write the others as key=value."
                )
            out["method"] = token
            continue
        key, value = (s.strip() for s in token.split("=", 1))
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; valid keys: {sorted(defaults)}.")
        try:
            out[key] = _convert(key, value, defaults[key])
        except ValueError as e:
            raise ValueError(f"Config argument {key}={value!r}: {e}") from None
    return ml_collections.ConfigDict(out)
