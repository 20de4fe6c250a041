"""``experiments/fuzz_hints.py``'s body generator, without a server: at least 1,000 distinct
bodies, the same for the same seed, and the shared body reader answers each without raising
anything but its own errors (the benchmark itself runs against a live server)."""

from __future__ import annotations

import collections

from continuum_tiered.core.hints import HintError
from continuum_tiered.core.request_body import BodyError, bad_request_body, request_error
from continuum_tiered.lab import hint_fuzz


def test_the_generator_yields_over_1000_distinct_bodies_the_shared_reader_answers():
    fuzz = hint_fuzz
    bodies = list(fuzz.hostile_bodies(seed=3, count=1000))
    assert len({(b.path, b.body) for b in bodies}) == len(bodies) == 1000
    assert [b.body for b in fuzz.hostile_bodies(seed=3, count=1000)] == [b.body for b in bodies]
    assert {b.path for b in bodies} == {"/v1/completions", "/v1/chat/completions"}
    assert sum(len(b.body) >= 10 * 1024 * 1024 for b in bodies) == 3
    outcomes: collections.Counter[str] = collections.Counter()
    for item in bodies:
        error = request_error(item.body)  # must not raise
        assert error is None or isinstance(error, BodyError | HintError)
        if error is not None:
            assert bad_request_body(error)  # the 400 reply can be written
        outcomes[type(error).__name__] += 1
    # Every kind of answer is exercised: body errors, hint errors, and bodies passed on.
    assert min(outcomes["BodyError"], outcomes["HintError"], outcomes["NoneType"]) >= 50
