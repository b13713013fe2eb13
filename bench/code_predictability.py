"""What a window's history tells about the next item, measured with counts alone (no model).

    python bench/code_predictability.py --data DIR [--window 0]

The generative models of bench/cpu_models.py rank about 2.5x better than popularity on CDs
window 0, while a transition count (the items that followed the user's last items) ranks 5.5x
better. This asks where that knowledge sits, from the window's training targets, scored on its
test targets:
- the cross-entropy (nats) of the test target's first code (the one that decides which beams
  survive) under: the first codes' frequency (unigram); the first code of the user's last item
  (bigram, mixed with the unigram by `a` pseudo-counts); and a recency-weighted bag of the first
  codes of the whole 20-item history (weights 1/age);
- how many test targets follow their user's last item somewhere in the training targets (the
  exact item pair), and whether the target repeats a history item.
A model that scores as the bag does on the first code has learned what first codes carry; what
remains is exact item co-occurrence. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import Counter, defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def first_code_cross_entropies(train: list, test: list, first: dict, pseudo: float) -> dict:
    unigram = Counter(first[s["target"]] for s in train)
    total, kinds = sum(unigram.values()), len(unigram) + 1

    def p_unigram(code):
        return (unigram[code] + 0.5) / (total + 0.5 * kinds)

    after = defaultdict(Counter)  # first code of the last history item -> first code of the target
    for s in train:
        if s["history"]:
            after[first[s["history"][-1]]][first[s["target"]]] += 1

    def p_after(previous, code):
        seen = after[first[previous]]
        return (seen[code] + pseudo * p_unigram(code)) / (sum(seen.values()) + pseudo)

    def p_bag(history, code):
        history = history[-20:]
        weights = [1 / (age + 1) for age in range(len(history))]
        return sum(w * p_after(item, code) for w, item in zip(weights, reversed(history))) / sum(weights)

    def mean_nats(p):
        return round(sum(-math.log(p(s)) for s in test) / len(test), 3)

    target = lambda s: first[s["target"]]
    return {
        "unigram": mean_nats(lambda s: p_unigram(target(s))),
        "last_item_bigram": mean_nats(
            lambda s: p_after(s["history"][-1], target(s)) if s["history"] else p_unigram(target(s))
        ),
        "history_bag": mean_nats(lambda s: p_bag(s["history"], target(s)) if s["history"] else p_unigram(target(s))),
    }


def main() -> None:
    from data_tools.help_format import HelpFormatter
    from data_tools.index.codes import load_item_index
    from data_tools.reader import window_split

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--data", required=True, help="a converted dataset folder with an item index")
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--pseudo", type=float, default=20.0, help="pseudo-counts of the unigram in the bigram")
    a = ap.parse_args()
    index = load_item_index(a.data)
    first = {int(k): v[0] for k, v in index["items"].items()}
    train = list(window_split(a.data, a.window, "train"))
    test = list(window_split(a.data, a.window, "test"))
    pairs = {(s["history"][-1], s["target"]) for s in train if s["history"]}
    print(
        json.dumps(
            {
                "bench": "code_predictability",
                "window": a.window,
                "train_targets": len(train),
                "test_targets": len(test),
                "first_code_nats": first_code_cross_entropies(train, test, first, a.pseudo),
                "uniform_nats": round(math.log(index["codes_per_level"]), 3),
                "test_pair_seen_in_train": sum((s["history"][-1], s["target"]) in pairs for s in test if s["history"]),
                "test_target_in_history": sum(s["target"] in s["history"] for s in test),
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
