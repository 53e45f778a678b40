"""Write an SAE training corpus of WikiText-2 with ZsRE-style questions mixed in.

MicroEdit's SmolLM2 SAE, trained on WikiText-2 alone, reconstructs ZsRE questions worse
than encyclopaedic text (`benchmarks/results/microedit_tuning_zsre100.md`). This corpus tests whether an SAE
that has seen questions does better. Questions come from ``zsre_mend_train-1k.json``
records ``--skip`` onwards: the lifelong benchmark edits the 725 dev records and then the
first 275 train records, so the default skip keeps every edited or evaluated question
out. Each record gives three lines: its question with its answer, its rephrase with the
answer, and its NQ locality question (``nq question: ...``) with that answer, in the
form the evaluation feeds them. The lines are shuffled (``--copies`` shuffled passes)
and spread evenly between the WikiText-2 lines, so that every window of the corpus,
held-out ones included, holds both kinds of text.

    EASYEDIT_NMKE_DATA_DIR=../shared/data python benchmarks/question_corpus.py --out runs/corpora/wt2_zsre_questions
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import List, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from easyedit_nmke.evaluate.records import EditRecord, load_records  # noqa: E402


def question_lines(records: Sequence[EditRecord], copies: int, seed: int) -> List[str]:
    """Question + answer, rephrase + answer and locality question + answer of each record,
    ``copies`` times, each copy shuffled."""
    lines = []
    for record in records:
        for prompt, answer in ((record.prompt, record.ground_truth), (record.rephrase, record.ground_truth),
                               (record.locality_prompt, record.locality_answer)):
            if prompt and answer:
                lines.append(f"{prompt} {answer}")
    rng = random.Random(seed)
    out = []
    for _ in range(copies):
        batch = list(lines)
        rng.shuffle(batch)
        out.extend(batch)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = os.environ.get("EASYEDIT_NMKE_DATA_DIR")
    p.add_argument("--wikitext", type=Path, default=Path(data) / "wikitext-2" if data else None)
    p.add_argument("--zsre", type=Path, default=Path(data) / "zsre_mend_train-1k.json" if data else None)
    p.add_argument("--skip", type=int, default=275, help="train records the benchmark edits (left out)")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder; corpus.txt is written there")
    args = p.parse_args(argv)
    if args.wikitext is None or args.zsre is None:
        raise SystemExit("set EASYEDIT_NMKE_DATA_DIR (WikiText-2 and zsre_mend_train-1k.json) or pass --wikitext and --zsre")

    wiki = []
    for path in sorted(args.wikitext.glob("*.txt")):
        wiki.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    records = load_records([args.zsre], require_target=False)[args.skip :]
    questions = question_lines(records, args.copies, args.seed)
    if not wiki or not questions:
        raise SystemExit("no WikiText-2 lines or no questions found")
    # Spread the questions evenly: after every wiki line, the questions due by then.
    merged = []
    for i, line in enumerate(wiki):
        merged.append(line)
        start, end = len(questions) * i // len(wiki), len(questions) * (i + 1) // len(wiki)
        merged.extend(questions[start:end])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "corpus.txt").write_text("\n".join(merged) + "\n", encoding="utf-8")
    chars_q = sum(len(q) + 1 for q in questions)
    chars_w = sum(len(w) + 1 for w in wiki)
    print(json.dumps({
        "out": str(args.out / "corpus.txt"), "wikitext_lines": len(wiki), "question_lines": len(questions),
        "records": len(records), "question_char_share": round(chars_q / (chars_q + chars_w), 3),
    }))


if __name__ == "__main__":
    main()
