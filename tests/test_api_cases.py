"""Every adversarial case of tests/api_cases.py ends as intended: bad input a ValueError that
leaves the model as it was, valid input accepted and right."""

import pytest

from tests.api_cases import all_cases, error_message, op_cases, outcome

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[f"{case.area}: {case.name}" for case in CASES])
def test_the_case_ends_as_intended(case):
    assert outcome(case) == ("intended ValueError" if case.bad else "correct")


def test_every_backend_refuses_a_bad_op_input_with_the_same_message():
    messages = {}
    for case in op_cases():
        if case.bad and case.area.startswith("ops ("):
            messages.setdefault(case.name, {})[case.area] = error_message(case)
    assert len(next(iter(messages.values()))) >= 2  # reference and simulate at least
    for name, by_backend in messages.items():
        assert len(set(by_backend.values())) == 1, (name, by_backend)
