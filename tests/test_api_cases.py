"""Every adversarial case of tests/api_cases.py ends as intended: bad input a ValueError that
leaves the model as it was, valid input accepted and right."""

import pytest

from tests.api_cases import all_cases, outcome

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[f"{case.area}: {case.name}" for case in CASES])
def test_the_case_ends_as_intended(case):
    assert outcome(case) == ("intended ValueError" if case.bad else "correct")
