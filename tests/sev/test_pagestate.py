import numpy as np
import pytest

from sevconsole.sev.pagestate import PageState, PageStateError, counts, decode_states, encode_states


def test_round_trip_and_counts() -> None:
    rng = np.random.default_rng(1)
    states = rng.integers(0, len(PageState), size=10_000, dtype=np.uint8)
    back = decode_states(encode_states(states), states.size)
    assert np.array_equal(back, states)
    assert sum(counts(back).values()) == 10_000
    assert counts(back)[PageState.SHARED_DIRTY] == int((states == 5).sum())


def test_sixteen_million_pages_in_runs_stay_small() -> None:
    states = np.zeros(16 * 1024 * 1024, dtype=np.uint8)
    states[: 6_000_000] = PageState.PRIVATE_SENT
    states[8_000_000:8_010_000] = PageState.SHARED_UNSENT
    assert len(encode_states(states)) < 100_000


@pytest.mark.parametrize("data,count", [("!!!", 3), (encode_states(np.zeros(4, np.uint8)), 5),
                                         (encode_states(np.full(4, 9, np.uint8)), 4)])
def test_bad_answers_raise_the_typed_error(data: str, count: int) -> None:
    with pytest.raises(PageStateError):
        decode_states(data, count)
