"""Rationale verification and answer matching (kale_ray.core.parse)."""
from __future__ import annotations

import pytest

from kale_ray.core.parse import clean_generation, final_statement, is_correct, match_choice, verify_rationale

CHOICES = ["plant", "fungus", "bacterium", "organism"]
PATH = ["alga", "plant", "organism"]  # question entity, intermediate, answer


# --------------------------------------------------------------------------- #
# verify_rationale
# --------------------------------------------------------------------------- #
def test_accepts_grounded_rationale_naming_gold():
    r = "Alga is a plant. A plant is an organism. So the answer is organism."
    assert verify_rationale(r, ["organism"], CHOICES, PATH) == (True, "")


def test_accepts_with_alternative_answer_and_think_block():
    r = "<think>hmm, fungus?</think>Alga is a plant, and plants are organisms, so: the answer is Organism!"
    assert verify_rationale(r, ["living thing", "organism"], CHOICES, PATH) == (True, "")


def test_answer_not_mentioned():
    r = "Alga is a plant. Plants grow in water."
    assert verify_rationale(r, ["organism"], CHOICES, PATH) == (False, "answer_not_mentioned")


def test_answer_must_be_a_whole_word():
    # "organisms" contains "organism" but only as a prefix of another word... normalisation keeps
    # plurals distinct, so "microorganismal" must not count as naming "organism"
    r = "Alga is a plant and microorganismal life is everywhere."
    assert verify_rationale(r, ["organism"], CHOICES, PATH) == (False, "answer_not_mentioned")


def test_contradicts_gold_when_conclusion_names_a_wrong_choice():
    # gold appears earlier, but the conclusion names a wrong choice
    r = "Alga is a plant, and a plant is an organism. So the answer is fungus."
    assert verify_rationale(r, ["organism"], CHOICES, PATH) == (False, "contradicts_gold")


def test_contradiction_in_last_sentence_without_answer_is():
    r = "Alga is a plant and every plant is an organism. Therefore it is a bacterium."
    assert verify_rationale(r, ["organism"], CHOICES, PATH) == (False, "contradicts_gold")


def test_conclusion_naming_gold_and_a_wrong_choice_is_not_a_contradiction():
    r = "Alga is a plant. So the answer is organism, not fungus."
    assert verify_rationale(r, ["organism"], CHOICES, PATH) == (True, "")


def test_wrong_choice_earlier_is_fine():
    r = "Alga is not a fungus. Alga is a plant, which is an organism. So the answer is organism."
    assert verify_rationale(r, ["organism"], CHOICES, PATH) == (True, "")


def test_open_question_has_no_contradiction_check():
    r = "Alga is a plant, an organism. So the answer is fungus."
    assert verify_rationale(r, ["organism"], (), PATH) == (True, "")


def test_not_grounded():
    r = "It is an organism. So the answer is organism."
    assert verify_rationale(r, ["organism"], CHOICES, ["alga", "plant"]) == (False, "not_grounded")
    # grounding can be switched off, and a path with no entities cannot be checked
    assert verify_rationale(r, ["organism"], CHOICES, ["alga", "plant"], require_grounding=False) == (True, "")
    assert verify_rationale(r, ["organism"], CHOICES, ()) == (True, "")


@pytest.mark.parametrize("gen", ["", "   ", None, "<think>organism because alga is a plant</think>", "..", "ok"])
def test_empty_generation(gen):
    assert verify_rationale(gen, ["organism"], CHOICES, PATH) == (False, "empty_generation")


def test_clean_generation():
    assert clean_generation("<THINK>x\ny</think>  answer ") == "answer"
    assert clean_generation(None) == ""


def test_final_statement():
    assert final_statement("A is B. So the answer is C.") == "C"
    assert final_statement("The answer is X. Wait, the answer is: Y") == "Y"
    assert final_statement("A is B. B is C!") == "B is C!"
    assert final_statement("") == ""


# --------------------------------------------------------------------------- #
# match_choice
# --------------------------------------------------------------------------- #
MC = ["cell", "cell function", "plant", "Fungus"]


@pytest.mark.parametrize(
    "gen,expected",
    [
        ("plant", "plant"),  # exact
        ("  PLANT. ", "plant"),  # exact after normalisation
        ("fungus", "Fungus"),  # returns the choice's own text
        ("the cell function", "cell function"),  # exact after dropping the article
        ("cell function, because cells work", "cell function"),  # prefix: the longest choice it starts with
        ("Plant, since alga is one", "plant"),  # prefix
        ("I think it is a plant", "plant"),  # contained (single)
        ("It must be the cell function here", "cell function"),  # contained: longest wins over 'cell'
        ("either plant or fungus", None),  # ambiguous: names several
        ("It is a cell or a fungus", None),  # ambiguous
        ("animal", None),  # names none
        ("", None),
        ("<think>plant</think>", None),
        ("planter", None),  # whole words only
    ],
)
def test_match_choice(gen, expected):
    assert match_choice(gen, MC) == expected


# --------------------------------------------------------------------------- #
# is_correct
# --------------------------------------------------------------------------- #
def test_is_correct_multiple_choice():
    assert is_correct("plant", ["plant"], MC) == (True, "plant")
    assert is_correct("The answer is fungus", ["fungus"], MC) == (True, "Fungus")
    assert is_correct("cell", ["cell function"], MC) == (False, "cell")
    assert is_correct("maybe plant or fungus", ["plant"], MC) == (False, None)  # names several
    assert is_correct("planter", ["plant"], MC) == (False, None)
    assert is_correct("no idea", ["plant"], MC) == (False, None)
    # any accepted answer counts
    assert is_correct("cell function", ["cell", "cell function"], MC) == (True, "cell function")


def test_is_correct_open():
    assert is_correct("Paris", ["paris"]) == (True, "paris")
    assert is_correct("The answer is Paris.", ["Paris"]) == (True, "paris")
    assert is_correct("Paris\nbecause it is the capital", ["Paris"])[0] is True  # first line
    assert is_correct("Lyon", ["Paris", "City of Light"]) == (False, "lyon")
    assert is_correct("the City-of-Light", ["Paris", "City of Light"])[0] is True
    assert is_correct("Paris is nice but the answer is Lyon", ["Paris"]) == (False, "lyon")
    ok, pred = is_correct("", ["Paris"])
    assert ok is False and pred is None


def test_bare_answer_is_not_grounded_and_coverage_is_enforced():
    """Naming only the answer explains nothing; with min_path_coverage=0.5 a rationale must
    name at least half of the path's non-answer entities (here 2 of 3: alga, plant, organism)."""
    from kale_ray.core.parse import verify_rationale

    path = ["alga", "plant", "organism", "entity"]
    assert verify_rationale("The answer is entity.", ["entity"], (), path) == (False, "not_grounded")
    one = "Alga is a kind of thing, so the answer is entity."
    assert verify_rationale(one, ["entity"], (), path, min_path_coverage=0.5) == (False, "not_grounded")
    assert verify_rationale(one, ["entity"], (), path, min_path_coverage=0.0) == (True, "")
    two = "Alga is a plant, and so the answer is entity."
    assert verify_rationale(two, ["entity"], (), path, min_path_coverage=0.5) == (True, "")
