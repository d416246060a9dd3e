"""The batch rule (fxgndi.core.streams.split_batch): inputs vs labels for models with one or
several inputs, and the error for a batch that is ambiguous."""

import pytest
import torch

from fxgndi.core.errors import DataError
from fxgndi.core.streams import (Inputs, call_model, example_input, input_arity, iter_batches,
                                 split_batch)


class Two(torch.nn.Module):
    def forward(self, a, b, scale=1.0):
        return (a.sum(1, keepdim=True) + b.sum(1, keepdim=True)) * scale


def test_flat_pair_is_the_inputs_of_a_two_input_model_not_x_and_y():
    a, b = torch.randn(4, 3), torch.randn(4, 2)
    x, y = split_batch((a, b), arity=input_arity(Two()))
    assert y is None and isinstance(x, Inputs)
    assert torch.equal(call_model(Two(), x), (a.sum(1) + b.sum(1))[:, None])
    x, y = split_batch([a, b], arity=1)  # a one-input model: the same pair is (x, y)
    assert x is a and y is b


def test_nested_inputs_with_labels_and_keyword_dict():
    a, b, y = torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    x, labels = split_batch(((a, b), y), arity=2)
    assert labels is y and [t.shape[1] for t in x.args] == [3, 2]
    x, labels = split_batch({"x": {"a": a, "b": b}, "y": y})
    assert labels is y and set(x.kwargs) == {"a", "b"}
    assert torch.equal(call_model(Two(), x), call_model(Two(), (a, b)))
    x, labels = split_batch(({"b": b, "a": a}, y))
    assert torch.equal(call_model(Two(), x), Two()(a, b))


def test_ambiguous_and_unreadable_batches_name_the_rule_and_the_fix():
    a, b, c = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4)
    with pytest.raises(DataError, match=r"ambiguous.*\(\(x1, \.\.\., x2\), labels\)"):
        split_batch((a, b, c), arity=2)
    with pytest.raises(DataError, match="dict batch with keys.*'x'"):
        split_batch({"input_ids": a, "labels": c})
    with pytest.raises(DataError, match="different batch sizes"):
        split_batch(((a, b[:2]), None))


def test_inputs_slice_move_and_example():
    a, b = torch.randn(4, 3), torch.randn(4, 2, dtype=torch.float64)
    x = Inputs((a, b))[1:3].to(dtype=torch.float32)
    assert x.shape[0] == 2 and torch.equal(x.args[0], a[1:3])
    assert x.args[1].dtype == torch.float32
    batches = list(iter_batches([((a, b), None)], arity=2))
    assert isinstance(batches[0][0], Inputs)
    example = example_input([((a, b), None)], arity=2)
    assert isinstance(example, tuple) and example[0].shape == (1, 3)
    given = example_input([], {"a": a, "b": b})
    assert isinstance(given, dict) and torch.equal(given["b"], b)


def test_arity_counts_required_positional_inputs():
    class Flag(torch.nn.Module):
        def forward(self, x, return_features=False):
            return x
    assert input_arity(Two()) == 2 and input_arity(Flag()) == 1
