#!/usr/bin/env python3
"""Writes AdmissionReviews close to the webhook's 3 MiB body limit into a
fuzzing corpus, so that `make fuzz` mutates inputs of that size from the
start (libFuzzer grows its inputs a few bytes at a time from the seeds).

Usage: large_seeds.py SEED CORPUS_DIR [LIMIT_BYTES]
"""

import copy
import json
import sys


def fill(review, limit, grow):
    """Calls grow(review, n) with the largest n whose JSON stays under limit."""
    low, high = 1, 1
    while len(json.dumps(grow(copy.deepcopy(review), high))) < limit:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if len(json.dumps(grow(copy.deepcopy(review), middle))) < limit:
            low = middle
        else:
            high = middle
    return grow(copy.deepcopy(review), low)


def containers(review, n):
    pod = review["request"]["object"]
    first = pod["spec"]["containers"][0]
    pod["spec"]["containers"] = [
        dict(copy.deepcopy(first), name=f"{first['name']}-{i}") for i in range(n)
    ]
    return review


def annotation(review, n):
    meta = review["request"]["object"].setdefault("metadata", {})
    meta.setdefault("annotations", {})["example.com/blob"] = "x" * n
    return review


def labels(review, n):
    meta = review["request"]["object"].setdefault("metadata", {})
    meta.setdefault("labels", {}).update({f"example.com/l{i}": "v" for i in range(n)})
    return review


def main():
    seed, corpus = sys.argv[1], sys.argv[2]
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 3 * 1024 * 1024
    with open(seed) as f:
        review = json.load(f)
    for name, grow in [("containers", containers), ("annotation", annotation), ("labels", labels)]:
        body = json.dumps(fill(review, limit - 1024, grow))
        with open(f"{corpus}/large-{name}.json", "w") as f:
            f.write(body)
        print(f"==> seed large-{name}.json: {len(body)} bytes")


if __name__ == "__main__":
    main()
