"""Reading judge answers (issue 20): fixed answers as real judges write them, good and bad."""

import math
import pickle

import pytest

from step1x_batch.errors import JUDGE_OUT_OF_RANGE, JUDGE_UNPARSABLE, redact
from step1x_batch.judge.answers import (
    CUT_MARKER,
    AnswerError,
    Verdict,
    bounded,
    overall,
    parse_preference,
    parse_scores,
)


def _error(text, expected=2, **kw) -> AnswerError:
    with pytest.raises(AnswerError) as info:
        parse_scores(text, expected, **kw)
    return info.value


# --- scores: what parses -------------------------------------------------------------------------


def test_a_plain_answer_gives_its_scores_in_order_and_its_reasoning():
    v = parse_scores('{"score": [7, 3], "reasoning": "the cat is red, the dog vanished"}', 2)
    assert v == Verdict(scores=(7.0, 3.0), reasoning="the cat is red, the dog vanished")
    assert all(isinstance(s, float) for s in v.scores)


def test_vieScore_spacing_and_newlines_parse():
    v = parse_scores('{\n"score" : [8, 9],\n"reasoning" : "ok"\n}', 2)
    assert v.scores == (8.0, 9.0)


def test_a_json_fence_is_read():
    text = 'Here is my evaluation:\n```json\n{"score": [6.5, 10], "reasoning": "fine"}\n```\nThanks.'
    assert parse_scores(text, 2).scores == (6.5, 10.0)


def test_a_bare_fence_is_read():
    assert parse_scores('```\n{"score": [1, 2], "reasoning": ""}\n```', 2).scores == (1.0, 2.0)


def test_prose_before_and_after_and_an_echoed_format_example_are_skipped():
    text = (
        'I must answer {"score" : [...], "reasoning" : "..."}. Looking at both images, '
        'the edit worked. {"score": [9, 4], "reasoning": "over-edited {background}"} Hope this helps!'
    )
    v = parse_scores(text, 2)
    assert v.scores == (9.0, 4.0)
    assert v.reasoning == "over-edited {background}"


def test_numbers_as_strings_are_numbers():
    assert parse_scores('{"score": ["7", " 8.5 "], "reasoning": "x"}', 2).scores == (7.0, 8.5)


def test_missing_reasoning_is_empty_and_a_non_string_reasoning_is_kept_as_json():
    assert parse_scores('{"score": [1, 1]}', 2).reasoning == ""
    assert parse_scores('{"score": [1, 1], "reasoning": ["a", "b"]}', 2).reasoning == '["a", "b"]'


def test_one_expected_score_may_be_a_bare_number():
    assert parse_scores('{"score": 4, "reasoning": "x"}', 1).scores == (4.0,)


def test_scale_ends_are_in_range():
    assert parse_scores('{"score": [0, 10]}', 2).scores == (0.0, 10.0)
    assert parse_scores('{"score": [1, 5]}', 2, low=1, high=5).scores == (1.0, 5.0)


# --- scores: what does not -----------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, "", "   \n\t"])
def test_empty_answers_are_unparsable(text):
    err = _error(text)
    assert err.code == JUDGE_UNPARSABLE and "empty" in err.message and err.raw == ""


def test_a_truncated_answer_is_unparsable_and_says_so():
    err = _error('{"score": [7, 8], "reasoning": "the edit replaced the sky but the horizon')
    assert err.code == JUDGE_UNPARSABLE
    assert "cut off" in err.message
    assert err.raw.startswith('{"score": [7, 8]')


@pytest.mark.parametrize(
    "text",
    [
        "The edit is good, I would give it 8 and 9.",
        "{score: [7, 8], reasoning: 'x'}",
        '{"score": [7, 8], "reasoning": "x",}',
        '{"scores": [7, 8], "reasoning": "x"}',
        "[7, 8]",
    ],
)
def test_malformed_answers_are_unparsable(text):
    assert _error(text).code == JUDGE_UNPARSABLE


@pytest.mark.parametrize("scores", ["[7]", "[7, 8, 9]", "[]", "7"])
def test_a_wrong_count_is_unparsable(scores):
    err = _error(f'{{"score": {scores}, "reasoning": "x"}}')
    assert err.code == JUDGE_UNPARSABLE and "where 2 were asked for" in err.message


@pytest.mark.parametrize("scores", ['["seven", 8]', "[null, 8]", "[true, 8]", "[[7], 8]", '["7/10", 8]', "[NaN, 8]", "[Infinity, 8]"])
def test_non_numeric_scores_are_unparsable(scores):
    err = _error(f'{{"score": {scores}, "reasoning": "x"}}')
    assert err.code == JUDGE_UNPARSABLE and "not all numbers" in err.message


@pytest.mark.parametrize("scores, bad", [("[-1, 5]", "-1"), ("[5, 11]", "11"), ("[10.5, 5]", "10.5"), ('["12", 3]', "12")])
def test_numbers_off_the_scale_are_out_of_range(scores, bad):
    err = _error(f'{{"score": {scores}, "reasoning": "x"}}')
    assert err.code == JUDGE_OUT_OF_RANGE
    assert f"gave {bad}," in err.message and "0-10" in err.message


def test_the_scale_is_the_callers():
    assert _error('{"score": [0, 3]}', low=1, high=5).code == JUDGE_OUT_OF_RANGE
    assert _error('{"score": [6, 3]}', low=1, high=5).code == JUDGE_OUT_OF_RANGE


# --- pairwise ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "winner, score", [("A", 1.0), ("B", 0.0), ("tie", 0.5), ("TIE", 0.5), (" b ", 0.0), ("a", 1.0)]
)
def test_pairwise_winners(winner, score):
    v = parse_preference(f'Comparing them:\n```json\n{{"winner": "{winner}", "reasoning": "sharper"}}\n```')
    assert v == Verdict(scores=(score,), reasoning="sharper")


@pytest.mark.parametrize("answer", ['{"winner": "C"}', '{"winner": "both"}', '{"winner": 1}', '{"winner": null}', '{"winner": ""}'])
def test_an_invalid_winner_is_unparsable(answer):
    with pytest.raises(AnswerError) as info:
        parse_preference(answer)
    assert info.value.code == JUDGE_UNPARSABLE and "not A, B or tie" in info.value.message


@pytest.mark.parametrize("answer", [None, "", "A is better.", '{"winner": "A", "reasoning": "cut', '{"score": [1, 2]}'])
def test_a_pairwise_answer_without_a_winner_object_is_unparsable(answer):
    with pytest.raises(AnswerError) as info:
        parse_preference(answer)
    assert info.value.code == JUDGE_UNPARSABLE


# --- bounded raw text ----------------------------------------------------------------------------


TOKEN = "Bearer abcdefghijklmnop0123456789"


def test_bounded_masks_a_bearer_token_and_an_api_key():
    out = bounded(f"request failed with Authorization: {TOKEN} and key sk-{'x' * 24}")
    assert "abcdefghijklmnop0123456789" not in out and "x" * 24 not in out
    assert out.startswith("request failed with Authorization: ") and "***" in out


def test_bounded_cuts_long_text_to_the_limit_with_a_marker():
    out = bounded("y" * 5000, limit=100)
    assert len(out) == 100 and out.endswith(CUT_MARKER) and out.startswith("y" * 50)
    assert bounded("short", limit=100) == "short"
    assert len(bounded("z" * 3000)) == 2000


def test_bounded_redacts_before_cutting_so_no_piece_of_a_token_survives():
    keep = 100 - len(CUT_MARKER)
    text = "x" * (keep - len("Bearer abcdefg") - 1) + " " + TOKEN
    cut_first = redact(text[:keep])  # the wrong order: 7 characters of the token are too few to be masked
    assert "abcdefg" in cut_first
    out = bounded(text, limit=100)
    assert "abcdefg" not in out and out.endswith("Bearer ***")  # masked whole, then short enough to keep


def test_bounded_of_nothing_is_empty():
    assert bounded(None) == "" and bounded("") == ""


def test_an_answer_error_keeps_the_raw_answer_redacted_and_bounded():
    text = f'{TOKEN} ' + "{" + '"score": [1, 99]' + "}" + " padding" * 1000
    err = _error(text)
    assert err.code == JUDGE_OUT_OF_RANGE
    assert "abcdefghijklmnop" not in err.raw and len(err.raw) == 2000 and err.raw.endswith(CUT_MARKER)
    again = pickle.loads(pickle.dumps(err))
    assert (again.code, again.message, again.raw) == (err.code, err.message, err.raw)
    assert str(err).startswith("judge_out_of_range: ")


def test_the_reasoning_kept_is_redacted_too():
    v = parse_scores('{"score": [1, 2], "reasoning": "saw ' + TOKEN + '"}', 2)
    assert "abcdefghijklmnop" not in v.reasoning


def test_answer_error_codes_are_the_two_final_ones():
    with pytest.raises(ValueError):
        AnswerError("judge_failed", "timeout", "")


# --- overall -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sc, pq", [((7, 3), (9, 8)), ((10, 10), (10, 10)), ((0, 9), (8, 8)), ((6.5, 7.5), (2, 9))])
def test_overall_is_the_minimums_and_their_geometric_mean(sc, pq):
    s, p, o = overall(Verdict(tuple(map(float, sc)), ""), Verdict(tuple(map(float, pq)), ""))
    assert (s, p) == (min(sc), min(pq))
    assert o == pytest.approx(math.sqrt(min(sc) * min(pq)), abs=0, rel=1e-15)


def test_overall_from_parsed_answers():
    sc = parse_scores('{"score": [8, 2], "reasoning": ""}', 2)
    pq = parse_scores('{"score": [9, 8], "reasoning": ""}', 2)
    assert overall(sc, pq) == (2.0, 8.0, 4.0)


def test_overall_needs_scores():
    with pytest.raises(ValueError):
        overall(Verdict((), ""), Verdict((1.0,), ""))
