"""Admission control without a server: slots, tokens and memory estimates in flight."""

from __future__ import annotations

import pytest

from rome_engine.admission import MB, Admission, check_memory
from rome_engine.errors import ResourceExhausted


def test_memory_in_flight_is_a_budget_shared_by_all_kinds() -> None:
    adm = Admission(max_concurrent={"score": 0}, max_tokens_in_flight=0, max_memory_in_flight_mb=100)
    with adm.admit("score", tokens=1, memory=60 * MB):
        assert adm.memory_in_flight == 60 * MB
        too_much = adm.admit("trace", tokens=1, memory=50 * MB)
        with pytest.raises(ResourceExhausted, match="max_memory_in_flight_mb=100"), too_much:
            pass
        with adm.admit("generate", tokens=1, memory=40 * MB):  # exactly fits
            assert adm.memory_in_flight == 100 * MB
    assert adm.memory_in_flight == 0 and adm.tokens_in_flight == 0


def test_a_slot_is_released_when_the_work_fails() -> None:
    adm = Admission(max_concurrent={"trace": 1}, max_tokens_in_flight=10, max_memory_in_flight_mb=1)
    with pytest.raises(RuntimeError), adm.admit("trace", tokens=10, memory=MB):
        raise RuntimeError("the work failed")
    with adm.admit("trace", tokens=10, memory=MB):  # all three are free again
        with pytest.raises(ResourceExhausted, match="max_concurrent_traces=1"), adm.admit("trace", tokens=0):
            pass
        with pytest.raises(ResourceExhausted, match="max_tokens_in_flight=10"), adm.admit("score", tokens=1):
            pass


def test_one_call_over_its_own_limit() -> None:
    check_memory("score", 10 * MB, limit_mb=10)
    with pytest.raises(ResourceExhausted, match="needs about 11 MB, over the limit max_request_memory_mb=10"):
        check_memory("score", 11 * MB, limit_mb=10)
    check_memory("score", 10**15, limit_mb=0)  # 0: no limit


def test_admit_refuses_one_call_over_the_per_call_limit_before_counting_it() -> None:
    adm = Admission(max_concurrent={}, max_tokens_in_flight=0, max_memory_in_flight_mb=0, max_request_memory_mb=10)
    too_big = adm.admit("trace", tokens=1, memory=11 * MB)
    refused = pytest.raises(ResourceExhausted, match="trace needs about 11 MB, over the limit max_request_memory_mb=10")
    with refused, too_big:
        pass
    assert adm.running("trace") == 0 and adm.memory_in_flight == 0
