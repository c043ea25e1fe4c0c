"""GraphRunner refuses malformed construction and step arguments with an InputError naming the
argument (they used to crash with IndexError / StopIteration / AttributeError or be accepted)."""

from __future__ import annotations

import pytest
import torch

import tilegraph

DEVICE = "cpu" if tilegraph.SIMULATOR else "cuda"
SETTINGS = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, max_batch_size=4,
                              max_num_pages=8, max_num_tokens=16, num_ctas=2)  # fmt: skip


@pytest.fixture(scope="module")
def dec():
    return tilegraph.BatchDecode(SETTINGS, device=DEVICE)


def forward(inputs):
    return inputs["q"]


def example():
    return {"q": torch.zeros(1, 2, 16, dtype=torch.float16, device=DEVICE)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention=[]), "attention must be .* non-empty"),
        (dict(attention=()), "attention must be .* non-empty"),
        (dict(attention="decode"), r"attention\[0\] is a str"),
        (dict(attention=[None]), r"attention\[0\] is a NoneType"),
        (dict(buckets=[0, 2]), "buckets must be positive integers"),
        (dict(buckets=[-1]), "buckets must be positive integers"),
        (dict(buckets=[1.5]), "buckets must be positive integers"),
        (dict(buckets=[True]), "buckets must be positive integers"),
        (dict(buckets=[]), "buckets must hold at least one"),
        (dict(buckets="12"), "buckets must be a sequence"),
        (dict(buckets=[2, 5]), r"buckets: 5 exceeds attention\[0\]'s Settings.max_batch_size=4"),
        (dict(example_inputs={}), "example_inputs must be a non-empty dict"),
        (dict(example_inputs=[torch.zeros(1)]), "example_inputs must be a non-empty dict"),
        (dict(example_inputs={"q": 3}), r"example_inputs\['q'\] must be a tensor"),
        (dict(example_inputs={"q": torch.zeros(())}), r"example_inputs\['q'\] must be a tensor .* got a 0-D"),
        (dict(forward=None), "forward must be callable"),
        (dict(settings={"num_qo_heads": 2}), "settings must be a tilegraph.Settings"),
    ],
)
def test_construction_errors_name_the_argument(dec, kwargs, match):
    args = dict(forward=forward, example_inputs=example(), attention=dec)
    args.update(kwargs)
    with pytest.raises(tilegraph.InputError, match=match):
        tilegraph.GraphRunner(**args)


def test_prefill_buckets_are_bounded_by_max_num_tokens():
    pre = tilegraph.BatchPrefill(SETTINGS, causal=True, device=DEVICE)
    tilegraph.GraphRunner(forward, example(), attention=pre, buckets=[8, 16])
    with pytest.raises(tilegraph.InputError, match="max_num_tokens=16"):
        tilegraph.GraphRunner(forward, example(), attention=pre, buckets=[8, 17])


@pytest.mark.parametrize(
    "inputs, plan, match",
    [
        ([torch.zeros(1, 2, 16)], None, "inputs must be a dict"),
        ({"q": 1.0}, None, r"inputs\['q'\] must be a torch.Tensor"),
        ({"x": torch.zeros(1, 2, 16)}, None, "inputs has keys"),
        (None, 7, "plan must be callable"),
    ],
)
def test_step_errors_name_the_argument(dec, inputs, plan, match):
    runner = tilegraph.GraphRunner(forward, example(), attention=dec, buckets=[2])
    inputs = example() if inputs is None else inputs
    with pytest.raises(tilegraph.InputError, match=match):
        runner.step(inputs, plan if plan is not None else (lambda n: None))
