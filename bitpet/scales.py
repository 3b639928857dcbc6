"""Per-task adapter scales s released with the original 1-bit adapters (VTAB-1k).

Only s was searched per task, from {0.01, 0.1, 1, 10, 100}.
"""

from __future__ import annotations

# Released scales s, columns: AF, AF h1, AF bihead, AF bihead h1, LoRA, LoRA h1, LoRA bihead,
# LoRA bihead h1.
SCALES = {
    "cifar100": (0.1, 1, 0.1, 1, 0.1, 1, 0.01, 1),
    "caltech101": (10, 10, 10, 10, 10, 100, 10, 100),
    "dtd": (0.01, 1, 0.1, 1, 0.01, 1, 1, 1),
    "oxford_flowers102": (1, 1, 1, 10, 1, 100, 1, 100),
    "oxford_iiit_pet": (0.01, 1, 0.01, 1, 0.1, 1, 0.01, 0.1),
    "svhn": (10, 100, 10, 100, 10, 100, 10, 100),
    "sun397": (0.1, 1, 0.1, 10, 0.1, 1, 0.01, 1),
    "patch_camelyon": (1, 10, 1, 10, 10, 10, 10, 10),
    "eurosat": (1, 10, 1, 10, 10, 100, 1, 100),
    "resisc45": (10, 1, 10, 1, 10, 1, 10, 1),
    "diabetic_retinopathy": (1, 100, 1, 10, 10, 1, 0.1, 100),
    "clevr_count": (1, 10, 1, 10, 1, 10, 1, 10),
    "clevr_dist": (0.1, 10, 0.1, 10, 0.1, 10, 0.1, 1),
    "dmlab": (1, 10, 1, 100, 10, 100, 10, 100),
    "kitti": (1, 10, 1, 100, 10, 100, 10, 100),
    "dsprites_loc": (1, 10, 1, 10, 1, 100, 1, 100),
    "dsprites_ori": (0.1, 10, 10, 10, 0.1, 100, 10, 100),
    "smallnorb_azi": (1, 10, 10, 100, 10, 100, 10, 100),
    "smallnorb_ele": (1, 10, 1, 100, 1, 100, 1, 100),
}


def task_scale(task: str, adapter: str, h: int, quantized_head: bool) -> float:
    """The released per-task scale s for an adapter kind, hidden dim and head type."""
    if task not in SCALES:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {list(SCALES)}.")
    column = (4 if adapter == "lora" else 0) + (2 if quantized_head else 0) + (1 if h == 1 else 0)
    return float(SCALES[task][column])


def resolve_scale(model_cfg, task: str) -> float:
    """``model_cfg.scale`` if set (non-zero), else the released value for ``task``."""
    if model_cfg.scale:
        return float(model_cfg.scale)
    if model_cfg.adapter == "none":
        return 1.0
    return task_scale(task, model_cfg.adapter, model_cfg.h, model_cfg.head_bits != 32)
