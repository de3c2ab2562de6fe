"""options.validate: every bad option is refused with a message that names it."""

from __future__ import annotations

import pytest

from doredis.driver.options import RunOptions, validate
from doredis.protocol import DEFAULT_QUEUE


def _fn(x):
    return x


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("chunk_size", 0),
        ("chunk_size", -1),
        ("chunk_size", 1.5),
        ("chunk_size", True),
        ("chunk_size", "10"),
        ("errors", "bogus"),
        ("errors", None),
        ("timeout", -1),
        ("timeout", 0),
        ("timeout", True),
        ("timeout", "5"),
        ("retries", -1),
        ("retries", 1.0),
        ("retries", True),
        ("seed", -1),
        ("seed", 1.5),
        ("seed", False),
        ("reduce", 42),
        ("progress", "yes"),
        ("queue", ""),
        ("queue", "has space"),
    ],
)
def test_bad_option_names_itself(option, value):
    with pytest.raises((ValueError, TypeError)) as info:
        validate(_fn, **{option: value})
    assert option in str(info.value)


@pytest.mark.parametrize("fn", [None, 3, "square", [1]])
def test_non_callable_fn(fn):
    with pytest.raises(TypeError, match="fn must be callable"):
        validate(fn)


def test_defaults_and_good_values_pass():
    assert validate(_fn) == RunOptions()
    opts = validate(
        _fn,
        chunk_size=5,
        reduce=max,
        errors="skip",
        retries=2,
        timeout=0.5,
        seed=0,
        ordered=False,
        progress=False,
        queue="q",
    )
    assert (opts.chunk_size, opts.errors, opts.retries, opts.timeout, opts.seed) == (5, "skip", 2, 0.5, 0)
    assert opts.queue == "q" and opts.reduce is max and not opts.ordered
    assert validate(_fn, timeout=3).timeout == 3
    assert RunOptions().queue == DEFAULT_QUEUE


def test_spec_carries_the_run_options():
    opts = validate(_fn, reduce=max, seed=3, timeout=2.0, retries=1, errors="raise")
    spec = opts.spec(_fn)
    assert (spec.fn, spec.reduce, spec.seed, spec.timeout, spec.retries) == (_fn, max, 3, 2.0, 1)
    assert spec.stop_on_error
    assert not validate(_fn, errors="return").spec(_fn).stop_on_error
