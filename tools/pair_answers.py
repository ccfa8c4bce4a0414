"""Two finished boundary_vqa.py runs compared on the same test questions, from their answers.txt files.

    python -m tools.pair_answers out/bvqa_region/answers.txt out/bvqa_ssa0/answers.txt

For each yes/no kind (closed, region): each run's accuracy, and A minus B with the 95% paired bootstrap interval over
questions (data.bootstrap_diff, the interval boundary_vqa.py prints for its own twins). For runs that were not trained
together (an ablation flag, another seed of the VQA stage) on the same test split; with different test questions it
stops, naming the first line where they part.
"""
import re
import sys
from pathlib import Path

import numpy as np

from boundary_vqa import same_answer
from data import InputError, bootstrap_diff, run

HEAD = re.compile(r"^\S+ \[(\w+), outline: [^\]]*\] .+$")  # "<scan> [<kind>, outline: <region>] <question>"
ANSWER = re.compile(r"^  answer: (.*)  reference: (.*)$")


def read_answers(path) -> list:
    """answers.txt -> [(question line, kind, 1.0 if answered right else 0.0)], right as boundary_vqa.correct counts
    it (boundary_vqa.same_answer)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing; expected a finished boundary_vqa.py run's answers.txt")
    lines, out = path.read_text().splitlines(), []
    for n in range(0, len(lines) - 1, 2):
        head, ans = HEAD.match(lines[n]), ANSWER.match(lines[n + 1])
        if not head or not ans:
            raise InputError(f"{path}:{n + 1}: not a question line followed by its answer line")
        out.append((lines[n], head.group(1), float(same_answer(ans.group(1), ans.group(2)))))
    if len(lines) % 2 or not out:
        raise InputError(f"{path}: {len(lines)} lines; expected question and answer lines in pairs")
    return out


def compare(a: list, b: list, names=("A", "B")) -> dict:
    """{kind: dict(a, b, diff, lo, hi, n)} over the yes/no kinds both runs were asked."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x[0] != y[0]:
            raise InputError(f"{names[0]} and {names[1]} part at question {k + 1}: {x[0]!r} vs {y[0]!r}; pair runs on "
                             "the same test split (--seed, --n_test, --data)")
    if len(a) != len(b):
        raise InputError(f"{names[0]} has {len(a)} questions, {names[1]} {len(b)}: not the same test split")
    res = {}
    for kind in ("closed", "region"):
        x = np.array([c for _, k, c in a if k == kind])
        y = np.array([c for _, k, c in b if k == kind])
        if len(x):
            lo, hi = bootstrap_diff(x, y)
            res[kind] = dict(a=float(x.mean()), b=float(y.mean()), diff=float(x.mean() - y.mean()), lo=lo, hi=hi,
                             n=len(x))
    return res


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        raise InputError("usage: python -m tools.pair_answers A/answers.txt B/answers.txt")
    res = compare(read_answers(argv[0]), read_answers(argv[1]), argv)
    for kind, r in res.items():
        print(f"{kind}: {100 * r['a']:.1f} - {100 * r['b']:.1f} = {100 * r['diff']:+.1f} points, 95% paired bootstrap "
              f"interval [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] over {r['n']} questions")
    return res


if __name__ == "__main__":
    run(main)
