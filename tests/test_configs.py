"""Config parsing, presets for every method x task, the scale table, the sweep's table."""

from __future__ import annotations

import pytest

from bitpet import scales, sweep
from bitpet.data import vtab as vtab_data
from configs import common, vtab

EXAMPLES = [
    "bi_lora",
    "bi_adaptformer,task=dtd",
    "lora,task=cifar100,h=8,bits=32",
    "bi_lora,task=kitti,h=1,head_bits=1",
]


@pytest.mark.parametrize("arg", EXAMPLES)
def test_issue_examples_parse(arg):
    config = vtab.get_config(arg)
    assert config.method == arg.split(",")[0]


def test_parse_arg_types_and_errors():
    c = common.parse_arg("m1,a=3,b=0.5,c=true,d=x", method="m0", a=1, b=1.0, c=False, d="y")
    assert (c.method, c.a, c.b, c.c, c.d) == ("m1", 3, 0.5, True, "x")
    with pytest.raises(ValueError, match="valid keys: \\['a'"):
        common.parse_arg("zz=1", a=1)
    with pytest.raises(ValueError, match="a=.1.5."):
        common.parse_arg("a=1.5", a=1)
    with pytest.raises(ValueError, match="bare"):
        common.parse_arg("x,y", method="m")


@pytest.mark.parametrize("method", list(vtab.METHODS))
def test_every_method_and_task_resolves(method):
    from bitpet import train

    for task in vtab.TASKS:
        config = train.resolve(vtab.get_config(f"{method},task={task}"))
        assert config.model.scale > 0
        kind, bits, h, trainable = vtab.METHODS[method]
        assert (config.model.adapter, config.model.bits, config.trainable) == (
            kind,
            bits,
            trainable,
        )


def test_unknown_method_task_and_contradictions_fail_with_the_valid_list():
    with pytest.raises(ValueError, match="valid methods: .*bi_lora"):
        vtab.get_config("bi_lorra")
    with pytest.raises(ValueError, match="valid tasks: .*svhn"):
        vtab.get_config("bi_lora,task=svhm")
    with pytest.raises(ValueError, match="no adapters"):
        vtab.get_config("linear,h=8")
    with pytest.raises(ValueError, match="bi_lora"):
        vtab.get_config("lora,bits=1")


def test_task_lists_agree():
    assert tuple(vtab.TASKS) == tuple(vtab_data.TASKS) == tuple(scales.SCALES)


@pytest.mark.parametrize(
    "task,adapter,h,bihead,expected",
    [
        ("cifar100", "adaptformer", 32, False, 0.1),
        ("cifar100", "lora", 32, True, 0.01),
        ("caltech101", "lora", 1, False, 100),
        ("dtd", "lora", 1, True, 1),
        ("oxford_iiit_pet", "lora", 1, True, 0.1),
        ("dsprites_ori", "adaptformer", 32, True, 10),
        ("resisc45", "adaptformer", 1, False, 1),
        ("diabetic_retinopathy", "lora", 32, True, 0.1),
    ],
)
def test_released_scales(task, adapter, h, bihead, expected):
    assert scales.task_scale(task, adapter, h, bihead) == expected


def test_scale_resolves_at_run_time_so_task_override_works():
    from bitpet import train

    config = vtab.get_config("bi_adaptformer,task=cifar100")
    config.task = "svhn"
    assert train.resolve(config).model.scale == 10.0
    config.model.scale = 3.0
    assert train.resolve(config).model.scale == 3.0


def test_sweep_table_group_means():
    results = {}
    for i, task in enumerate(vtab.TASKS):
        results[task] = dict(final_accuracy=0.5 + 0.01 * i, method="bi_lora", bits=1, h=32,
                             head_bits=32, task_size_bytes=1024)  # fmt: skip
    accs = {t: 100 * r["final_accuracy"] for t, r in results.items()}
    means = sweep.group_means(accs)
    natural = [accs[t] for t in list(vtab.TASKS)[:7]]
    specialized = [accs[t] for t in list(vtab.TASKS)[7:11]]
    structured = [accs[t] for t in list(vtab.TASKS)[11:]]
    assert means["natural"] == pytest.approx(sum(natural) / 7)
    assert means["specialized"] == pytest.approx(sum(specialized) / 4)
    assert means["structured"] == pytest.approx(sum(structured) / 8)
    assert means["average"] == pytest.approx(
        (means["natural"] + means["specialized"] + means["structured"]) / 3
    )
    table = sweep.markdown_table(results)
    assert f"{means['average']:.1f}" in table and "1.0 KiB" in table
    assert table.count("\n|") >= 2
