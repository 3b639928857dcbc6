"""Where the original authors' released 1-bit checkpoints (MIT licence) are found.

They lie in ``shared/petl_vit_release`` beside the repository checkout (override with
``$BITPET_RELEASE_DIR``); they are data, not committed here.
"""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.environ.get("BITPET_RELEASE_DIR") or os.path.join(
    os.path.dirname(REPO), "shared", "petl_vit_release"
)
