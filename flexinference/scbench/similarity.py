"""Text similarity scores used by SCBench, written from their definitions: ROUGE-Lsum and sentence BLEU.

* ROUGE-Lsum (Lin, 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", section 3.2,
  summary-level LCS): both texts are split into sentences at newlines; for each reference sentence the
  *union* of its longest common subsequences with every candidate sentence counts as hits, each token
  counted at most as often as it occurs in both texts (the clipping of ROUGE 1.5.5 that Google's
  ``rouge-score`` also applies). Tokens: lower-cased ``[a-z0-9]+`` runs, no stemming (the setting of
  Hugging Face ``evaluate``'s ``rouge``, which SCBench calls). F1 of hits/|ref| and hits/|cand|.
* BLEU (Papineni et al., 2002) of one candidate against one reference, whitespace tokens, n = 1..4 with
  uniform weights, clipped n-gram precisions, brevity penalty, and Chen & Cherry's (2014, "A Systematic
  Comparison of Smoothing Techniques for Sentence-Level BLEU") smoothing 4 for zero precisions, as
  SCBench's RepoQA scorer computes it with NLTK's ``sentence_bleu(..., smoothing_function=method4)``
  (k = 5; precisions still zero are left out of the geometric mean, and no unigram match gives 0).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu4", "lcs_indices", "rouge_lsum", "rouge_tokens"]

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """ROUGE tokens: lower case, every run of non ``[a-z0-9]`` characters is a separator."""
    return [t for t in _NON_ALNUM.split(text.lower()) if t]


def lcs_indices(ref: Sequence[str], cand: Sequence[str]) -> list[int]:
    """Positions in ``ref`` of one longest common subsequence of ``ref`` and ``cand``.

    Ties are broken like ROUGE 1.5.5: walk back from the ends, take a match when the tokens agree, else
    step back in ``cand`` only when that keeps a strictly longer prefix LCS, otherwise step back in ``ref``.
    """
    n, m = len(ref), len(cand)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, r = table[i], table[i - 1], ref[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if r == cand[j - 1] else max(prev[j], row[j - 1])
    out: list[int] = []
    i, j = n, m
    while i > 0 and j > 0:
        if ref[i - 1] == cand[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def _sentences(text: str) -> list[list[str]]:
    return [toks for toks in (rouge_tokens(s) for s in text.split("\n") if s) if toks]


def rouge_lsum(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L F1 of ``prediction`` against ``reference`` (sentences split at newlines).

    Example: ``rouge_lsum("the cat sat", "the cat sat down")`` is ``2*1*0.75/1.75 = 0.857...``.
    """
    refs, cands = _sentences(reference), _sentences(prediction)
    n_ref = sum(map(len, refs))
    n_cand = sum(map(len, cands))
    if not n_ref or not n_cand:
        return 0.0
    left_ref = Counter(t for s in refs for t in s)
    left_cand = Counter(t for s in cands for t in s)
    hits = 0
    for sent in refs:
        union = sorted(set().union(*(lcs_indices(sent, c) for c in cands)))
        for idx in union:
            token = sent[idx]
            if left_ref[token] > 0 and left_cand[token] > 0:
                hits += 1
                left_ref[token] -= 1
                left_cand[token] -= 1
    if hits == 0:
        return 0.0
    recall, precision = hits / n_ref, hits / n_cand
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(candidate: str, reference: str, *, k: float = 5.0) -> float:
    """Sentence BLEU-4 of ``candidate`` against ``reference`` on whitespace tokens, Chen-Cherry
    smoothing 4.

    Example: identical texts of at least four tokens score 1.0; ``bleu4("a b c d", "a b c e")`` has
    precisions 3/4, 2/3, 1/2 and a smoothed 4-gram precision ``ln(4)/(2*5)/1``.
    """
    hyp, ref = candidate.split(), reference.split()
    if not hyp:
        return 0.0
    precisions: list[tuple[int, int]] = []
    for n in range(1, 5):
        counts, ref_counts = _ngrams(hyp, n), _ngrams(ref, n)
        matched = sum(min(c, ref_counts[g]) for g, c in counts.items())
        precisions.append((matched, max(1, sum(counts.values()))))
    if precisions[0][0] == 0:
        return 0.0
    values: list[float] = []
    smoothed = 1
    for matched, total in precisions:
        if matched == 0 and len(hyp) > 1:
            values.append(1.0 / (2**smoothed * k / math.log(len(hyp))) / total)
            smoothed += 1
        else:
            values.append(matched / total)
    log_mean = math.fsum(0.25 * math.log(p) for p in values if p > 0)
    c, r = len(hyp), len(ref)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(log_mean)
