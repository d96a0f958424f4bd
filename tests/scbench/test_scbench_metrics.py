import math
import random

import pytest

from flexinference.scbench.data import Turn
from flexinference.scbench.metrics import (
    aggregate,
    all_references_fraction,
    char_f1,
    choice_accuracy,
    containment,
    first_int_match,
    first_number_match,
    repoqa_pass,
    score_turn,
    substring_match,
)
from flexinference.scbench.similarity import bleu4, lcs_indices, rouge_lsum, rouge_tokens
from flexinference.scbench.tasks import SYNTHETIC_TASKS, TASK_NAMES, TASKS, get_task


def test_task_table():
    assert len(TASK_NAMES) == 12 and set(SYNTHETIC_TASKS) == {
        "scbench_kv",
        "scbench_prefix_suffix",
        "scbench_vt",
        "scbench_mf",
        "scbench_summary_with_needles",
    }
    budgets = {name: t.max_new_tokens for name, t in TASKS.items()}
    assert budgets["scbench_kv"] == 150 and budgets["scbench_vt"] == 30 and budgets["scbench_repoqa"] == 1024
    assert budgets["scbench_qa_eng"] == 40 and budgets["scbench_many_shot"] == 10 and budgets["scbench_mf"] == 5
    assert budgets["scbench_summary"] == 200
    mixed = get_task("scbench_summary_with_needles")
    assert mixed.max_new_tokens_for(Turn("q", "1", task="scbench_passkey")) == 15
    assert mixed.max_new_tokens_for(Turn("q", "s", task="scbench_summary")) == 800
    with pytest.raises(ValueError, match="unknown task"):
        get_task("kv")
    with pytest.raises(ValueError, match="max_new_tokens"):
        type(mixed)("scbench_x", "c", "m", 0)


def test_string_metrics_hand_values():
    assert substring_match("The value is abc-123.", "abc-123") == 1.0
    assert substring_match("The value is ABC-123.", "abc-123") == 0.0  # case-sensitive
    assert all_references_fraction("vars: ABCDE and fghij", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert containment("the answer is paris", ["Paris"]) == 1.0
    assert containment("the answer is paris", ["London", "Rome"]) == 0.0
    # 5 predicted characters, 2 gold, 2 shared: P = 2/5, R = 1, F1 = 0.8 / 1.4
    assert char_f1("北京是首都", "北京") == pytest.approx(2 * 0.4 / 1.4)
    assert char_f1("北京。", ["上海", "北 京"]) == 1.0  # punctuation and spaces removed, best label


def test_choice_accuracy():
    opts = ("red", "green", "blue", "black")
    assert choice_accuracy("B. green", "B") == 1.0
    assert choice_accuracy("C", "green", opts) == 0.0
    assert choice_accuracy("C", "blue", opts) == 1.0  # option text as the answer
    assert choice_accuracy("blue", "C", opts) == 1.0  # the option text itself
    assert choice_accuracy("I believe the answer is: D", "D") == 1.0
    assert choice_accuracy("I believe the answer is D", "A") == 0.0
    assert choice_accuracy("I pick D today", "D") == 1.0  # first standalone letter
    assert choice_accuracy("   ", "A") == 0.0 and choice_accuracy("no idea", "A") == 0.0


def test_number_metrics():
    assert first_number_match("It is 42.0, not 7", 42) == 1.0
    assert first_number_match("It is 42.0, not 7", 7) == 0.0
    assert first_number_match("3.5 exactly", 3.5) == 1.0 and first_number_match("none", 3) == 0.0
    assert first_number_match("[17]", ["17"]) == 1.0
    assert first_int_match("key: 123456.", "123456") == 1.0
    assert first_int_match("12 then 123456", "123456") == 0.0


def test_rouge_lsum_hand_values():
    assert rouge_tokens("The Cat's hat, 2x!") == ["the", "cat", "s", "hat", "2x"]
    # LCS 3 of 3 candidate and 4 reference tokens: P = 1, R = 3/4
    assert rouge_lsum("the cat sat", "the cat sat down") == pytest.approx(2 * 0.75 / 1.75)
    # union LCS: ref "a b c" meets "a c d" on {a, c} and "b e" on {b}; ref "d e" meets them on {d}, {e}
    assert rouge_lsum("a c d\nb e", "a b c\nd e") == 1.0
    # both candidate lines match the same reference token: counted once (clipping), P = R = 1/2
    assert rouge_lsum("a\na", "a a") == 0.5
    assert lcs_indices(["a", "a"], ["a"]) == [1]  # ties resolved from the end, as ROUGE 1.5.5
    assert rouge_lsum("", "a b") == 0.0 and rouge_lsum("x y", "a b") == 0.0


def test_bleu_hand_values():
    assert bleu4("def f ( x ) : return x", "def f ( x ) : return x") == pytest.approx(1.0)
    # p1..p3 = 3/4, 2/3, 1/2; no 4-gram match -> Chen-Cherry 4: 1 / (2 * 5 / ln 4)
    expected = math.exp(0.25 * sum(map(math.log, (3 / 4, 2 / 3, 1 / 2, math.log(4) / 10))))
    assert bleu4("a b c d", "a b c e") == pytest.approx(expected)
    # short candidate: p1 = p2 = 1, p3 and p4 smoothed with 2 and 4 in the divisor, brevity e^(1 - 4/2)
    expected = math.exp(-1) * math.exp(0.25 * (math.log(math.log(2) / 10) + math.log(math.log(2) / 20)))
    assert bleu4("a b", "a b c d") == pytest.approx(expected)
    assert bleu4("x y z", "a b c") == 0.0 and bleu4("", "a") == 0.0


def test_repoqa_pass():
    needles = {"f": "def f ( x ) :\n    return x + 1", "g": "def g ( y ) :\n    return y * 2"}
    assert repoqa_pass("Here:\n```python\ndef f ( x ) :\n    return x + 1\n```\ndone", "f", needles) == 1.0
    assert repoqa_pass("```\ndef g ( y ) :\n    return y * 2\n```", "f", needles) == 0.0  # best match is g
    assert repoqa_pass("def f ( x ) : pass", "f", needles) == 0.0  # most similar to f, but BLEU < 0.8
    with pytest.raises(ValueError, match="not among the needles"):
        repoqa_pass("x", "h", needles)


def test_score_turn_dispatch_and_aggregate():
    assert score_turn("scbench_kv", "value: 1234-ab", Turn("k?", "1234-ab")) == 1.0
    assert score_turn("scbench_vt", "AAAAA", Turn("v?", ["AAAAA", "BBBBB"])) == 0.5
    assert score_turn("scbench_mf", "99", Turn("m?", 99)) == 1.0
    assert score_turn("scbench_choice_eng", "A", Turn("c?", "A", options=("1", "2", "3", "4"))) == 1.0
    assert score_turn("scbench_summary", "the cat sat", Turn("s?", "the cat sat down")) == pytest.approx(6 / 7)
    assert score_turn("scbench_repoqa", "```\ndef f ( ) : pass\n```", Turn("f?", "def f ( ) : pass", name="f")) == 1.0
    passkey = Turn("p?", "765", task="scbench_passkey")
    assert score_turn("scbench_summary_with_needles", "765.", passkey) == 1.0
    score, subs = aggregate(
        "scbench_summary_with_needles", [("scbench_summary", 0.5), ("scbench_passkey", 1.0), ("scbench_passkey", 0.0)]
    )
    assert subs == {"scbench_summary": 0.5, "scbench_passkey": 0.5} and score == 0.5
    assert aggregate("scbench_kv", [(None, 1.0), (None, 0.0), (None, 0.0)]) == (pytest.approx(1 / 3), {})
    with pytest.raises(ValueError, match="no scored turns"):
        aggregate("scbench_kv", [])


def test_against_reference_packages_when_installed():
    """Cross-check with NLTK's sentence BLEU and Google's rouge-score (skipped when they are absent)."""
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeLsum"])
    smooth = bleu.SmoothingFunction().method4
    rng = random.Random(0)
    words = "a b c d the cat sat on mat def return x y".split()

    def text():
        return "\n".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(0, 10))) for _ in range(rng.randint(1, 3))
        )

    for _ in range(300):
        cand, ref = text(), text()
        assert bleu4(cand, ref) == pytest.approx(
            bleu.sentence_bleu([ref.split()], cand.split(), smoothing_function=smooth)
        )
        assert rouge_lsum(cand, ref) == pytest.approx(scorer.score(ref, cand)["rougeLsum"].fmeasure)
