"""Build a large SafeKey-format file from the sample, for measuring what `data validate` costs on a big dataset.

Each output row is a sample row with varied text: the question gets a variant number and a few words drawn at
random, and the answer (after the trace, so U and K keep their offsets) gets a sentence of random words. The result
is deterministic for a given seed.

    python bench/make_large_data.py /tmp/large.jsonl --rows 45379
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "safekey_sample.jsonl"
WORDS = (
    "safety policy request answer kitchen chemistry garden router network lesson history recipe bicycle battery "
    "window paint museum library engine weather travel budget garden lamp ladder fabric printer camera"
).split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=45379)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sample = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(args.out, "w", encoding="utf-8") as handle:
        for index in range(args.rows):
            row = dict(sample[index % len(sample)])
            row["question"] = f"{row['question']} ({rng.choice(WORDS)} {index})"
            row["response"] += " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))).capitalize() + "."
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
