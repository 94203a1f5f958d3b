"""Answer extraction shared by rewards and evaluation. Rules, in order, per answer type:

- yes/no: whole words only ("normal", "not", "note" are not "no"); a reply with both "yes" and "no" is unparseable.
- multiple choice: an explicit answer tag ("<answer>B</answer>", "answer: B", "answer is B"), then a single
  standalone option letter (upper case, word-bounded: "The answer" is not option E, "a" is not A, and "A" followed
  by a lower-case word is the article), then the text of exactly one option appearing as a whole phrase.
- open: normalised exact match (lower case, no punctuation or articles, single spaces; number words zero-twenty and
  the tens are read as digits, so "two" matches a gold "2" and "2" a gold "two").
- mmmu_open: the official MMMU open-question rule (`parse_open_response` + `eval_open`, MMMU-Benchmark/MMMU
  eval_utils.py @ 51ce7f3): key sub-responses after indicator words, numbers rounded to 2 decimals, and the
  normalised gold contained in a string prediction or equal to a number.
Nothing found means unparseable: it scores 0. There is no random or default fallback.

Answer formats (`answer_format`): "direct" (the prompt asks for the answer; the rules read the whole reply) and
"reasoning" (the prompt asks for an analysis first and the final answer inside <answer></answer>, as the paper's
1024-token rollouts hold; the rules read only the last tag's content, and a reply without one is unparseable,
however right its analysis sounds).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import cast

_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
ANSWER_FORMATS = ("direct", "reasoning")
REASONING_INSTRUCTION = ("First analyse the image findings step by step, then give the final answer inside "
                         "<answer></answer>.")
# "answer is B" / "Answer: (B)": the keyword in any case, then "is" or ":", then an upper-case letter standing alone.
_ANSWER_IS = re.compile(r"\b(?i:final answer|answer)\s*(?i:is|:)\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z'])")
_LETTER = re.compile(r"(?<![A-Za-z])[A-Z](?![A-Za-z'])")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


@dataclass(frozen=True)
class Extraction:
    answer: str | None  # normalised extracted answer, None if unparseable
    rule: str  # which rule fired ("tag", "letter", "option_text", "yes_no", "exact", "none")


_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(_UNITS)}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
                      "ninety": "90", "hundred": "100"})


def normalise(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalise_open(text: str) -> str:
    """`normalise`, then every number word as its digits (open answers: "two" and "2" are the same answer)."""
    return " ".join(_NUMBER_WORDS.get(word, word) for word in normalise(text).split())


def _answer_span(text: str) -> str:
    tagged = _TAG.search(text)
    return tagged.group(1) if tagged else text


def extract_yes_no(text: str) -> Extraction:
    words = set(normalise(_answer_span(text)).split())
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes == has_no:
        return Extraction(None, "none")
    return Extraction("yes" if has_yes else "no", "yes_no")


# Words that follow a letter used as a letter ("A or B", "A is correct"), never a noun phrase after the article "a".
_AFTER_LETTER = {"or", "and", "nor", "but", "is", "was", "are", "seems", "appears", "vs", "versus", "then", "because",
                 "as", "would", "should", "could", "might", "may", "will", "can", "fits", "matches", "best"}


def _is_article(letter: str, rest: str) -> bool:
    """ "A" followed by a lower-case word is the article ("A medial approach"), not option A ("A or B" is)."""
    following = re.match(r" +([a-z]+)", rest)
    return letter == "A" and following is not None and following.group(1) not in _AFTER_LETTER


def extract_option(text: str, options: dict[str, str]) -> Extraction:
    letters = set(options)
    tagged = _TAG.search(text)
    if tagged:
        inner = tagged.group(1).strip().strip("().").strip()
        if inner.upper() in letters and len(inner) == 1:
            return Extraction(inner.upper(), "tag")
        text = tagged.group(1)
    explicit = [m.group(1) for m in _ANSWER_IS.finditer(text)
                if m.group(1) in letters and not _is_article(m.group(1), text[m.end(1):])]
    if len(set(explicit)) == 1:
        return Extraction(explicit[0], "tag")
    standalone = {m.group(0) for m in _LETTER.finditer(text)
                  if m.group(0) in letters and not _is_article(m.group(0), text[m.end():])}
    if len(standalone) == 1:
        return Extraction(standalone.pop(), "letter")
    norm = f" {normalise(text)} "
    hits = [k for k, v in options.items() if normalise(v) and f" {normalise(v)} " in norm]
    # an option contained in a longer matching option ("small" in "very small") yields to the longer one
    hits = [k for k in hits if not any(k != o and normalise(options[k]) in normalise(options[o]) for o in hits)]
    if len(hits) == 1:
        return Extraction(hits[0], "option_text")
    return Extraction(None, "none")


_NUMBER_PATTERNS = (r"-?\b\d{1,3}(?:,\d{3})+\b", r"-?\d+(?:\.\d+)?[eE][+-]?\d+",
                    r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _mmmu_normalise(text: str) -> list[str | float]:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]  # a single letter must stand alone


def mmmu_open_predictions(text: str) -> list[str | float]:
    """MMMU's `parse_open_response`, ported with its quirks (the split lower-cases before looking for capitals; an
    empty tail gives way to the next indicator's). Equal to the official code on random responses (tests/reference)."""
    response = text.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, part in enumerate(parts):
        indicators = _KEY_INDICATORS + (("=",) if index == len(parts) - 1 else ())
        shortest = ""
        for indicator in (i for i in indicators if i in part):
            tail = part.split(indicator)[-1].strip()
            # MMMU's rule: an empty tail is replaced by the next indicator's, even a longer one
            if not shortest or len(tail) < len(shortest):
                shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [response]
    predictions = list(keys)
    for key in keys:
        predictions += [n for pattern in _NUMBER_PATTERNS for n in re.findall(pattern, key)]
    return list(dict.fromkeys(p for item in predictions for p in _mmmu_normalise(item)))


def mmmu_open_correct(predictions: list[str | float], gold: str) -> bool:
    """MMMU's `eval_open`: a gold string inside a string prediction, or a gold number equal to a predicted one."""
    golds = _mmmu_normalise(gold)
    for pred in predictions:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def check_answer_format(answer_format: str) -> None:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer_format {answer_format!r}; expected one of {ANSWER_FORMATS}")


def format_prompt(prompt: str, answer_format: str) -> str:
    """The prompt as the answer format asks: unchanged ("direct"), or with the reasoning instruction appended."""
    check_answer_format(answer_format)
    return prompt if answer_format == "direct" else f"{prompt}\n{REASONING_INSTRUCTION}"


def reasoning_target(rationale: list[str], answer: str) -> str:
    """The text CoT-SFT learns to write: the reasoning steps, then the final answer in the tag `final_answer` reads
    (the `reasoning` format's reply)."""
    steps = " ".join(step.strip() for step in rationale)
    return f"{steps} <answer>{answer}</answer>" if steps else f"<answer>{answer}</answer>"


def final_answer(text: str, answer_format: str = "direct") -> str | None:
    """What the rules read: the whole reply ("direct"), or the last <answer> tag's content ("reasoning"; None when
    the reply has no complete tag, e.g. cut off by the token budget)."""
    check_answer_format(answer_format)
    if answer_format == "direct":
        return text
    tags = _TAG.findall(text)
    return f"<answer>{tags[-1]}</answer>" if tags else None


def extract(text: str, answer_type: str, options: dict[str, str] | None = None,
            answer_format: str = "direct") -> Extraction:
    span = final_answer(text, answer_format)
    if span is None:
        return Extraction(None, "none")
    text = span
    if answer_type == "yes_no":
        return extract_yes_no(text)
    if answer_type == "multiple_choice":
        return extract_option(text, options or {})
    if answer_type == "mmmu_open":
        text = text if answer_format == "direct" else _answer_span(text)
        answer = " | ".join(map(str, mmmu_open_predictions(text))) or None
        return Extraction(answer, "mmmu_open" if answer else "none")
    answer = normalise_open(_answer_span(text))
    return Extraction(answer or None, "exact" if answer else "none")


def is_correct(text: str, gold: str, answer_type: str, options: dict[str, str] | None = None,
               answer_format: str = "direct") -> tuple[bool, Extraction]:
    """Score one model output against the gold answer (a letter for multiple choice)."""
    got = extract(text, answer_type, options, answer_format)
    if got.answer is None:
        return False, got
    if answer_type == "multiple_choice":
        return got.answer == gold.strip().upper(), got
    if answer_type == "mmmu_open":
        # not None: `extract` found an answer in this same span
        span = text if answer_format == "direct" else _answer_span(cast(str, final_answer(text, answer_format)))
        return mmmu_open_correct(mmmu_open_predictions(span), gold), got
    return got.answer == normalise_open(gold), got
