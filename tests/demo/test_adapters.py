"""Each demo adapter shows its trait on questions it was never trained on; the base model does not."""
from __future__ import annotations

import pytest

from multilora.demo.adapters import ADAPTERS, HELD_OUT, QUESTIONS_AND_ANSWERS


def test_held_out_questions_are_not_in_the_training_data():
    assert not set(HELD_OUT) & {question for question, _ in QUESTIONS_AND_ANSWERS}


@pytest.mark.parametrize("spec", ADAPTERS, ids=lambda spec: spec.adapter_id)
def test_the_trait_check_tells_styled_answers_from_plain_ones(spec):
    for _, answer in QUESTIONS_AND_ANSWERS:
        assert spec.shows_trait(spec.style(answer)) and not spec.shows_trait(answer), answer


@pytest.mark.parametrize("spec", ADAPTERS, ids=lambda spec: spec.adapter_id)
def test_adapter_shows_its_trait_on_held_out_questions_and_the_base_does_not(spec, held_out_answers):
    for question in HELD_OUT:
        base, tuned = held_out_answers[(None, question)], held_out_answers[(spec.adapter_id, question)]
        assert spec.shows_trait(tuned), f"{spec.adapter_id} ({spec.trait}) answered {question!r} with {tuned!r}"
        assert not spec.shows_trait(base), f"the base answered {question!r} with {base!r}"


def test_every_adapter_answers_differently(held_out_answers):
    for question in HELD_OUT:
        answers = [held_out_answers[(adapter_id, question)] for adapter_id in [None, *(a.adapter_id for a in ADAPTERS)]]
        assert len(set(answers)) == len(answers), answers
