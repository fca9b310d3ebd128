"""Score yes/no and multiple-choice questions from next-token logits, the way LLaVA-HR is
evaluated on MME / POPE-style benchmarks: no text is generated; the answer is the choice
whose first token the model rates highest right after "ASSISTANT:".

    python examples/yes_no_scoring.py --bundle BUNDLE --questions questions.jsonl [--out scored.jsonl]

questions.jsonl, one question per line (image paths relative to the file):
    {"image": "cat.jpg", "question": "Is there a cat? Answer yes or no.", "answer": "yes"}
    {"image": "cat.jpg", "question": "What colour is it? A. black B. white", "choices": ["A", "B"], "answer": "A"}
"choices" defaults to ["yes", "no"]; "answer" is optional (without it nothing is scored).
Prints accuracy, and for yes/no questions POPE's precision, recall, F1 and yes-ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mra.core.errors import cli_main
from mra.runtime import Pipeline
from mra.runtime.cli_options import add_pipeline_args, open_pipeline

YES_NO = ["yes", "no"]


def choice_tokens(pipe: Pipeline, choice: str) -> list[int]:
    """First token of each spelling of a choice ("yes", "Yes", "YES"): the model may start its
    answer with any of them, so a choice scores the best of its spellings."""
    return sorted({pipe.llm.tokenize(s)[0] for s in (choice, choice.lower(), choice.capitalize(), choice.upper())})


def score(pipe: Pipeline, image: Path, question: str, choices: list[str]) -> dict:
    logits = pipe.next_token_logits(image, question)
    logp = logits - np.logaddexp.reduce(logits)  # log-probabilities over the whole vocabulary
    best = [float(logp[choice_tokens(pipe, c)].max()) for c in choices]
    return {"prediction": choices[int(np.argmax(best))], "logprobs": dict(zip(choices, best))}


def summary(rows: list[dict]) -> dict:
    """Accuracy over the questions with an answer; POPE's numbers over the yes/no ones."""
    judged = [r for r in rows if "answer" in r]
    out = {"questions": len(rows), "judged": len(judged),
           "accuracy": sum(r["correct"] for r in judged) / len(judged) if judged else None}
    yn = [r for r in judged if r["choices"] == YES_NO]
    if yn:
        tp = sum(r["prediction"] == "yes" and r["answer"] == "yes" for r in yn)
        said_yes = sum(r["prediction"] == "yes" for r in yn)
        is_yes = sum(r["answer"] == "yes" for r in yn)
        precision, recall = tp / said_yes if said_yes else 0.0, tp / is_yes if is_yes else 0.0
        out["yes_no"] = {"precision": precision, "recall": recall, "yes_ratio": said_yes / len(yn),
                         "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p)  # --bundle and every Pipeline option, as mra-run has them
    p.add_argument("--questions", type=Path, required=True, help="JSONL of questions (see above)")
    p.add_argument("--out", type=Path, help="also write every question with its prediction to this JSONL")
    a = p.parse_args(argv)

    lines = a.questions.read_text(encoding="utf-8").splitlines()
    questions = [json.loads(ln) for ln in lines if ln.strip()]
    rows = []
    with open_pipeline(a) as pipe:
        for q in questions:
            choices = [str(c) for c in q.get("choices", YES_NO)]
            row = {**q, "choices": choices, **score(pipe, a.questions.parent / q["image"], q["question"], choices)}
            if "answer" in q:
                row["correct"] = row["prediction"].lower() == str(q["answer"]).lower()
            rows.append(row)
    if a.out:
        a.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(json.dumps(summary(rows), indent=1))
    return 0


if __name__ == "__main__":  # one line for a user error (no bundle, a missing folder), as mra-run
    sys.exit(cli_main("yes_no_scoring", main, None))
