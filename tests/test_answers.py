"""Answer extraction rules (shared by rewards and evaluation), with property-based tests."""

from __future__ import annotations

import string

import pytest
from conftest import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st

from medsynapse.answers import (
    Extraction,
    extract,
    extract_option,
    extract_yes_no,
    is_correct,
    mmmu_open_correct,
    mmmu_open_predictions,
    normalise,
)

OPTIONS = {"A": "upper left", "B": "upper right", "C": "lower left", "D": "lower right"}


def test_yes_no_uses_whole_words():
    assert extract_yes_no("yes").answer == "yes"
    assert extract_yes_no("No.").answer == "no"
    assert extract_yes_no("The scan is normal").answer is None  # "normal" is not "no"
    assert extract_yes_no("not sure, note this").answer is None
    assert extract_yes_no("yes and no").answer is None
    assert extract_yes_no("<answer>no</answer> although yes elsewhere").answer == "no"


def test_option_extraction_rules():
    assert extract_option("B", OPTIONS).answer == "B"
    assert extract_option("The answer is C.", OPTIONS).answer == "C"
    assert extract_option("<answer>(D)</answer>", OPTIONS).answer == "D"
    assert extract_option("upper right", OPTIONS).answer == "B"
    assert extract_option("The answer", {**OPTIONS, "E": "none"}).answer is None  # "The answer" is not E
    assert extract_option("a lesion", OPTIONS).answer is None  # lower-case article is not option A
    assert extract_option("A or B", OPTIONS).answer is None  # ambiguous: no guess
    assert extract_option("", OPTIONS).answer is None


def test_open_answers_are_normalised_exact_matches():
    assert is_correct("Two.", "two", "open")[0]
    assert not is_correct("two lesions", "two", "open")[0]
    assert not is_correct("", "two", "open")[0]


@pytest.mark.parametrize(("said", "gold"), [("2", "two"), ("two", "2"), ("Two.", "2"),
                                            ("<answer>12</answer>", "twelve"), ("twenty", "20"), ("zero", "0"),
                                            ("ninety", "90")])
def test_open_number_words_and_digits_are_the_same_answer(said, gold):
    assert is_correct(said, gold, "open")[0]


@pytest.mark.parametrize(("said", "gold"), [("3", "two"), ("two", "12"), ("twenty one", "20"), ("2 lesions", "two")])
def test_open_numbers_still_have_to_match(said, gold):
    assert not is_correct(said, gold, "open")[0]


word = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8)


@given(st.lists(word, max_size=6), st.sampled_from(["yes", "no"]), st.lists(word, max_size=6))
def test_yes_no_found_in_any_surrounding_text_without_the_other_word(before, answer, after):
    other = "no" if answer == "yes" else "yes"
    words = [w for w in before + [answer] + after if w != other]
    assert extract_yes_no(" ".join(words)).answer == answer


@given(word)
def test_words_that_merely_contain_no_are_never_no(w):
    text = f"{w}no{w}"  # e.g. "normal"-like tokens
    assert extract_yes_no(text).answer is None


@given(st.sampled_from(list(OPTIONS)), st.sampled_from(["{}", "{}.", "({})", "Answer: {}", "answer is {}", " {} "]))
def test_a_single_letter_in_common_formats_is_found(letter, fmt):
    assert extract_option(fmt.format(letter), OPTIONS).answer == letter


@given(st.text(max_size=40))
def test_extraction_never_invents_an_answer(text):
    got = extract(text, "multiple_choice", OPTIONS)
    if got.answer is not None:
        assert got.answer in OPTIONS
    assert normalise(normalise(text)) == normalise(text)


# --- traps seen in public evaluation code (benchmarks.md §12) ------------------------------------------------------
FIVE = {"A": "Lateral", "B": "Inferior", "C": "Medial", "D": "Superior", "E": "Oblique"}
ECHO = "Answer Choices: (A) Lateral (B) Inferior (C) Medial (D) Superior (E) Oblique"
capitalised = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8).map(lambda w: w.capitalize())


@given(st.lists(st.one_of(word, capitalised), min_size=1, max_size=8))
def test_capitalised_prose_is_never_an_option_letter(words):
    """The reference code maps "The..." and "Yes" to E; a letter must stand alone."""
    text = " ".join(w for w in words if len(w) > 1) or "Yes"
    assert extract_option(text, FIVE).rule != "letter"
    if not any(normalise(v) in normalise(text).split() for v in FIVE.values()):
        assert extract_option(text, FIVE).answer is None


@given(st.lists(word, max_size=5), st.sampled_from(list(FIVE)), st.sampled_from([
    "The answer is {}.", "Therefore, among A through E, the answer is {}.", "Answer: ({})", "<answer>{}</answer>"]))
def test_an_echoed_option_list_does_not_hide_the_committed_answer(prefix, letter, fmt):
    """MedXpertQA questions already list the options; a model that echoes them still gives one answer."""
    text = " ".join(prefix) + f"\n{ECHO}\n" + fmt.format(letter)
    assert extract_option(text, FIVE).answer == letter


@given(st.lists(word, max_size=5))
def test_an_echoed_option_list_alone_is_unparseable(prefix):
    assert extract_option(" ".join(prefix) + f" {ECHO}", FIVE).answer is None


TRAPS = ["normal", "not", "note", "nodule", "none", "know", "yesterday", "eyes"]


@given(st.sampled_from(TRAPS), st.lists(word, max_size=4))
def test_yes_no_substrings_inside_words_never_count(trap, rest):
    words = [w for w in rest if w not in ("yes", "no")]
    assert extract_yes_no(" ".join([trap, *words])).answer is None
    assert not is_correct(f"{trap} finding", "no", "yes_no")[0]


def test_articles_and_prose_are_not_option_letters():
    assert extract_option("A medial approach is best.", FIVE).answer == "C"  # by option text, not as letter A
    assert extract_option("The answer is a medial approach.", FIVE).answer == "C"
    assert extract_option("To answer a question like this, C.", FIVE).answer == "C"
    assert extract_option("The answer is A medial approach", FIVE).answer == "C"
    assert extract_option("Answer: A", FIVE).answer == "A" and extract_option("A.", FIVE).answer == "A"
    assert extract_option("A", FIVE).answer == "A" and extract_option("(A) Lateral", FIVE).answer == "A"
    assert extract_option("A is correct", FIVE).answer == "A" and extract_option("A or B", FIVE).answer is None


def test_mmmu_open_rule_matches_numbers_and_contained_strings():
    cases = [("The patient should take 2 tablets per day.", "2", True), ("3", "2", False), ("2.0", "2", True),
             ("The total dose is 1,000 mg", "1000", True), ("Neutrophils.", "neutrophils", True),
             ("so the cells are neutrophils", "Neutrophils", True), ("eosinophils", "neutrophils", False),
             ("The answer is 2.004", "2", True), ("", "2", False)]  # 2.004 rounds to 2.0, as in MMMU
    for text, gold, expected in cases:
        assert is_correct(text, gold, "mmmu_open")[0] is expected, (text, gold)
    assert extract("", "mmmu_open").answer is None


# --- the MMMU open rule against MMMU's own scorer (tests/reference, verbatim) ---------------------------------------
_FRAGMENTS = st.one_of(
    st.integers(-5000, 5000).map(str), st.floats(-1e4, 1e4, allow_nan=False).map(lambda x: f"{x:.3f}"),
    st.sampled_from(["1,234", "12,345.6", "3e5", "2.5E-3", ".75", "-0.5", "1/2", "100%"]),
    st.sampled_from(["the answer is ", "so ", "thus ", "therefore ", "final answer: ", "result ", "could be ",
                     "x = ", "= ", "is ", "Answer ", "The result is"]),
    st.sampled_from([". ", ".\n", "\n", ", ", "! ", "? ", "; ", ":", "'", " "]),
    st.sampled_from(["A", "b", "mg", "Aspirin", "left lung", "It", "We", "Therefore", "pneumonia", "mL/min"]),
)
_GOLDS = st.one_of(st.integers(-100, 5000).map(str), st.sampled_from(
    ["2", "2.5", "0.75", "1234", "1,234", "12345.6", "300000", "a", "B", "aspirin", "left lung", "mg", "-0.5", "3"]))


@settings(max_examples=examples(1500), deadline=None, database=None)
@given(st.lists(_FRAGMENTS, min_size=0, max_size=12).map("".join), _GOLDS)
@example("", "0")
@example("the answer is . ", "2")
@example("It is 3.\nSo the result is ?", "3")
@example("x = 2", "2")
@example("Thus: ,", "a")
@example("The answer is 1,234.", "1234")
@pytest.mark.slow
def test_mmmu_open_rule_equals_the_official_scorer(response, gold):
    from reference.mmmu_eval_utils import eval_open, parse_open_response

    official = parse_open_response(response)
    ours = mmmu_open_predictions(response)
    assert sorted(map(repr, ours)) == sorted(map(repr, official))
    assert mmmu_open_correct(ours, gold) == eval_open(gold, official)


@pytest.mark.parametrize("trivial", [":", ",", ".", "!", "?", ";", "'"])
def test_mmmu_a_punctuation_tail_is_not_an_answer(trivial):
    from reference.mmmu_eval_utils import parse_open_response

    response = f"so {trivial}\nthe result is {trivial}"
    assert sorted(map(repr, mmmu_open_predictions(response))) == sorted(map(repr, parse_open_response(response)))


def test_rules_are_named_and_a_tag_must_hold_an_option():
    options = {"A": "left", "B": "right", "C": "both", "D": "neither"}
    assert extract_option("<answer>B</answer>", options) == Extraction("B", "tag")
    assert extract_option("The answer is C", options) == Extraction("C", "tag")
    assert extract_option("<answer>Z</answer>", options).answer is None  # one character, but not an option
    assert extract("", "mmmu_open") == Extraction(None, "none")
    assert extract("the answer is 2", "mmmu_open").rule == "mmmu_open"


def test_reasoning_format_reads_only_the_last_final_answer_tag():
    from medsynapse.answers import REASONING_INSTRUCTION, format_prompt

    long = ("The left lower lobe shows an opacity; a small effusion is possible, so the answer could be no. "
            "On balance the finding is real.\n<answer>yes</answer>")
    assert is_correct(long, "yes", "yes_no", answer_format="reasoning")[0]
    assert is_correct(long, "yes", "yes_no")[0]  # direct reads the tag too
    no_tag = "Findings: an opacity. So yes, there is a lesion."
    assert extract(no_tag, "yes_no", answer_format="reasoning").answer is None  # missing final answer: unparseable
    assert extract(no_tag, "yes_no").answer == "yes"  # while direct reads the reply
    cut = "Option B fits the pattern best, then <answer>B"  # cut off by the token budget inside the tag
    options = {"A": "Pneumonia", "B": "Effusion"}
    assert extract(cut, "multiple_choice", options, "reasoning").answer is None
    two = "<answer>A</answer> ... on reflection <answer>B</answer>"
    assert extract(two, "multiple_choice", options, "reasoning") == extract("<answer>B</answer>", "multiple_choice",
                                                                             options)
    assert is_correct("the count is <answer>two</answer>", "2", "open", answer_format="reasoning")[0]
    assert is_correct("Step 1 gives 3.5.\n<answer>4</answer>", "4", "mmmu_open", answer_format="reasoning")[0]
    assert not is_correct("Step 1 gives 4.\n<answer>3.5</answer>", "4", "mmmu_open", answer_format="reasoning")[0]
    assert format_prompt("Is there a lesion?", "reasoning") == f"Is there a lesion?\n{REASONING_INSTRUCTION}"
    assert format_prompt("Is there a lesion?", "direct") == "Is there a lesion?"
    with pytest.raises(ValueError, match="answer_format"):
        format_prompt("q", "chain")
