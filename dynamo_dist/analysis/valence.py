"""Word valence across the model-embedding space (paper appendix B.4, eq. 8, Table 3, Fig. 11).

For a token-input sentiment meta-model at theta: find the fixed points of
h -> F~(theta, x*, h) (x* = the <pad> embedding, see ``fixed_points``), take the one
with the most neutral readout G(h*) ~ 0, feed each word once from there and read out::

    Score(h*) = sum_{x in W+} G(F(x, h*)) - sum_{x in W-} G(F(x, h*)) - sum_{x in W0} |G(F(x, h*))|

with G(h) the sentiment readout ``logit[positive] - logit[negative]`` (for a 3-class
head the neutral class is ignored). Higher is a better word-level interpretation.
Words missing from the task's vocabulary (they would read as <unk>) are left out and
listed.

Shape legend: K embeddings, E embedding dim, W words, S state size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .fixed_points import FixedPointFinder, meta_dynamics, meta_visited_states, readout_at

# Table 3 of the paper.
POSITIVE_WORDS = ("good", "awesome", "terrific", "exciting", "fantastic", "amazing", "fine", "superior",
                  "outstanding", "superb", "magnificent", "marvelous", "exceptional", "tremendous")
NEGATIVE_WORDS = ("bad", "awful", "horrible", "terrible", "poor", "inferior", "unacceptable", "shoddy", "atrocious",
                  "crap", "rubbish", "garbage")
NEUTRAL_WORDS = ("it", "the", "is", "a", "if", "then", "are", "were", "can", "will", "has", "had", "been", "was",
                 "when", "who", "to", "what")


def valence_score(positive: Sequence[float], negative: Sequence[float], neutral: Sequence[float]) -> float:
    """Eq. 8 from the readouts G(F(x, h*)) of the positive, negative and neutral words."""
    return float(np.sum(positive) - np.sum(negative) - np.sum(np.abs(neutral)))


class WordValence:
    """Eq. 8 word-valence score of a token-input sentiment meta-model at several thetas.

    Parameters
    ----------
    positive_words, negative_words, neutral_words : word lists (default Table 3).
    finder : FixedPointFinder | None -- fixed-point search settings (default: FixedPointFinder()).
    num_probe : int -- probe sequences whose visited states seed the fixed-point search.
    random_state : int | None

    ``fit(meta, thetas_KE, word_ids, group, positive_class, negative_class, x, lengths)``:
    ``word_ids`` maps words to token ids (words absent from it are skipped),
    ``positive_class`` / ``negative_class`` index the head's outputs, ``x``/``lengths``
    are real token inputs.

    Attributes: words_ {category: [words used]}, missing_words_ [words not in the vocabulary],
    scores_ (K,), values_ (K,W) readouts per word (order: positive, negative, neutral words),
    neutral_readout_ (K,) |G(h*)| of the chosen fixed point, num_fixed_points_ (K,).
    """

    def __init__(self, positive_words: Sequence[str] = POSITIVE_WORDS, negative_words: Sequence[str] = NEGATIVE_WORDS,
                 neutral_words: Sequence[str] = NEUTRAL_WORDS, finder: FixedPointFinder | None = None,
                 num_probe: int = 64, random_state: int | None = None):
        self.positive_words = positive_words
        self.negative_words = negative_words
        self.neutral_words = neutral_words
        self.finder = finder
        self.num_probe = num_probe
        self.random_state = random_state

    def fit(self, meta, thetas_KE: np.ndarray, word_ids: Mapping[str, int], group: str, positive_class: int,
            negative_class: int, x: torch.Tensor, lengths: torch.Tensor) -> "WordValence":
        lists = {"positive": self.positive_words, "negative": self.negative_words, "neutral": self.neutral_words}
        self.words_ = {k: [w for w in v if w in word_ids] for k, v in lists.items()}
        self.missing_words_ = [w for v in lists.values() for w in v if w not in word_ids]
        if not self.words_["positive"] or not self.words_["negative"]:
            raise ValueError(f"word lists: no positive or negative word is in the vocabulary "
                             f"(missing: {self.missing_words_})")
        ordered = [w for k in ("positive", "negative", "neutral") for w in self.words_[k]]
        ids = torch.tensor([[word_ids[w]] for w in ordered], dtype=torch.long)
        thetas = np.atleast_2d(np.asarray(thetas_KE, dtype=np.float64))
        x, lengths = x[: self.num_probe], lengths[: self.num_probe]
        scores, values, neutral, counts = [], [], [], []
        for k, th in enumerate(thetas):
            theta = torch.tensor(th, dtype=torch.float32)
            head = readout_at(meta, group, theta)  # G~ at this theta (theta-dependent under a FiLM readout)
            sentiment = lambda h, head=head: head(h)[:, positive_class] - head(h)[:, negative_class]  # noqa: E731
            finder = _clone(self.finder, self.random_state)
            finder.fit(meta_dynamics(meta, theta, group=group), meta_visited_states(meta, theta, x, lengths))
            with torch.no_grad():
                fp = torch.from_numpy(finder.fixed_points_)
                if len(fp) == 0:  # every search ran off: fall back to the slowest state reached
                    fp = torch.from_numpy(finder.final_states_[[int(np.argmin(finder.final_speeds_))]])
                g_fp = sentiment(fp)
                h_star = fp[int(torch.argmin(g_fp.abs()))]
                u_WD = meta.encode(ids)[:, 0]
                h1 = meta.step(u_WD, theta[None].expand(len(ordered), -1), h_star[None].expand(len(ordered), -1))
                g = sentiment(h1).numpy().astype(np.float64)
            n_pos, n_neg = len(self.words_["positive"]), len(self.words_["negative"])
            scores.append(valence_score(g[:n_pos], g[n_pos:n_pos + n_neg], g[n_pos + n_neg:]))
            values.append(g)
            neutral.append(float(g_fp.abs().min()))
            counts.append(len(fp))
        self.word_order_ = ordered
        self.scores_ = np.array(scores)
        self.values_ = np.array(values)
        self.neutral_readout_ = np.array(neutral)
        self.num_fixed_points_ = np.array(counts)
        return self


def _clone(finder: FixedPointFinder | None, random_state) -> FixedPointFinder:
    if finder is None:
        return FixedPointFinder(random_state=random_state)
    params = {k: v for k, v in vars(finder).items() if not k.endswith("_")}
    return FixedPointFinder(**params)
