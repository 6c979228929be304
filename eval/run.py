#!/usr/bin/env python3
"""Recall and precision of moat-redact's detector on Faker-generated data.

Faker (from PyPI, pinned in requirements.txt) generates values in 13 locales; each is put in a
sentence (with a context word or without, around filler text of the locale), and the detector
(crates/moat-redact/examples/scan.rs) runs over every sentence. A value counts as found when a
finding of the right entity overlaps it; every other finding is a false positive. Number-heavy
benign text (versions, order numbers, timestamps, prices, hashes, UUIDs, ...) measures false
positives on their own.

Where Faker's values are not valid by the official rules (en_GB `ssn` gives `ZZ` prefixes and a
`T` suffix, which no NINO has) or Faker has no generator (German Steuer-ID, API keys, wallets),
values are generated here with Faker's seeded random source and the published algorithms.

    python3 eval/run.py [--per 150] [--write docs/EVALUATION.md]
"""

import argparse
import hashlib
import json
import os
import random
import string
import subprocess
import sys
import zlib
from collections import defaultdict

from faker import Faker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCALES = ["en_US", "en_GB", "fr_FR", "de_DE", "it_IT", "es_ES", "pl_PL", "pt_BR", "en_IN",
           "en_CA", "zh_CN", "ja_JP", "nl_NL"]

# ---- values Faker lacks or gets wrong, from the published algorithms ------------------------

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def base58check(payload: bytes) -> str:
    raw = payload + hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    n = int.from_bytes(raw, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


BECH = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def bech32_polymod(values):
    gen = [0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3]
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (top >> i) & 1 else 0
    return chk


def bech32_address(rng, hrp="bc") -> str:
    # Witness v0, 20-byte program, as 5-bit groups.
    program = [rng.randrange(256) for _ in range(20)]
    acc, bits, data = 0, 0, [0]
    for b in program:
        acc = (acc << 8) | b
        bits += 8
        while bits >= 5:
            bits -= 5
            data.append((acc >> bits) & 31)
    if bits:
        data.append((acc << (5 - bits)) & 31)
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    poly = bech32_polymod(expanded + data + [0] * 6) ^ 1
    checksum = [(poly >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(BECH[d] for d in data + checksum)


def wallet(f):
    rng = f.random
    kind = rng.randrange(3)
    if kind == 0:
        return base58check(bytes([rng.choice([0, 5])]) + bytes(rng.randrange(256) for _ in range(20)))
    if kind == 1:
        return bech32_address(rng)
    return "0x" + "".join(rng.choice("0123456789abcdefABCDEF") for _ in range(40))


def nino(f):
    rng = f.random
    first = "ABCEGHJKLMNOPRSTWXYZ"
    second = "ABCEGHJKLMNPRSTWXYZ"
    while True:
        prefix = rng.choice(first) + rng.choice(second)
        if prefix not in {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}:
            break
    d = "".join(rng.choice(string.digits) for _ in range(6))
    suffix = rng.choice("ABCD")
    return rng.choice([f"{prefix}{d}{suffix}", f"{prefix} {d[:2]} {d[2:4]} {d[4:]} {suffix}"])


def steuer_id(f):
    rng = f.random
    while True:
        d = [rng.randrange(1, 10)] + [rng.randrange(10) for _ in range(9)]
        counts = [d.count(x) for x in set(d)]
        if sorted(counts, reverse=True)[0] in (2, 3) and sum(1 for c in counts if c > 1) == 1:
            break
    product = 10
    for x in d:
        s = (x + product) % 10 or 10
        product = (s * 2) % 11
    return "".join(map(str, d)) + str((11 - product) % 10)


VERHOEFF_D = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
VERHOEFF_P = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4]]
for _ in range(6):
    VERHOEFF_P.append([VERHOEFF_P[1][x] for x in VERHOEFF_P[-1]])
VERHOEFF_INV = [0, 4, 3, 2, 1, 5, 6, 7, 8, 9]


def aadhaar(f):
    # Faker's aadhaar_id appends a Luhn digit and may start with 0 or 1; real numbers start with
    # 2-9 and end with a Verhoeff check digit.
    rng = f.random
    d = [rng.randrange(2, 10)] + [rng.randrange(10) for _ in range(10)]
    c = 0
    for i, x in enumerate(reversed(d)):
        c = VERHOEFF_D[c][VERHOEFF_P[(i + 1) % 8][x]]
    number = "".join(map(str, d)) + str(VERHOEFF_INV[c])
    return rng.choice([number, f"{number[:4]} {number[4:8]} {number[8:]}"])


def api_key(f):
    rng = f.random
    alnum = string.ascii_letters + string.digits
    pick = lambda n, alphabet=alnum: "".join(rng.choice(alphabet) for _ in range(n))
    return rng.choice([
        lambda: "sk-proj-" + pick(48),
        lambda: "sk-ant-api03-" + pick(93, alnum + "-_") + "AA",
        lambda: "AKIA" + pick(16, string.ascii_uppercase + string.digits),
        lambda: "ghp_" + pick(36),
        lambda: "xoxb-" + pick(11, string.digits) + "-" + pick(24),
        lambda: "sk_live_" + pick(24),
        lambda: "AIza" + pick(35, alnum + "-_"),
        lambda: "hf_" + pick(34),
        lambda: "glpat-" + pick(20, alnum + "-_"),
    ])()


def b64url(raw: bytes) -> str:
    import base64
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def jwt(f):
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": f.uuid4(), "name": f.name(), "iat": f.random.randrange(10**9, 2 * 10**9)}).encode())
    return f"{header}.{payload}.{b64url(bytes(f.random.randrange(256) for _ in range(32)))}"


def private_key(f):
    import base64
    body = base64.b64encode(bytes(f.random.randrange(256) for _ in range(180))).decode()
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    kind = f.random.choice(["RSA ", "EC ", "OPENSSH ", ""])
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{lines}\n-----END {kind}PRIVATE KEY-----"


def password(f):
    return f.password(length=f.random.randrange(10, 20), special_chars=False)


def secret(f):
    return "".join(f.random.choice(string.ascii_letters + string.digits) for _ in range(f.random.randrange(24, 48)))


def url_credentials(f):
    password = "".join(f.random.choice(string.ascii_letters + string.digits + "!$*") for _ in range(12))
    return f"{f.random.choice(['postgres', 'https', 'redis', 'mysql'])}://{f.user_name()}:{password}@{f.domain_name()}"


def date_of_birth(f):
    d = f.date_of_birth()
    return f.random.choice([d.strftime("%d/%m/%Y"), d.strftime("%Y-%m-%d"), d.strftime("%d.%m.%Y"),
                            d.strftime("%B %d, %Y"), d.strftime("%d %B %Y")])


# ---- entities: generator, templates with and without a context word -------------------------

ANY = None  # every locale

ENTITIES = {
    "email": (ANY, lambda f: f.email(), ["Email me at {v}.", "Contact: {v}"],
              ["Forward the invoice to {v} today.", "{v} asked for a refund."]),
    "phone": (ANY, lambda f: f.phone_number(), ["My phone number is {v}.", "Call me on {v} tomorrow.", "Tel: {v}"],
              ["Reach the front desk at {v} before noon."]),
    "credit_card": (ANY, lambda f: f.credit_card_number(), ["My card number is {v}.", "Visa {v} expires soon."],
                    ["Please charge {v} for the order."]),
    # Faker's en_IN and zh_CN IBANs are GB ones with 21 characters; GB's have 22.
    "iban": ([l for l in LOCALES if l not in ("en_IN", "zh_CN")], lambda f: f.iban(), ["IBAN: {v}", "Pay into account {v} please."],
             ["Transfer it to {v} by Friday."]),
    "ip": (ANY, lambda f: f.random.choice([f.ipv4(), f.ipv6()]), ["The server IP is {v}."],
           ["Requests from {v} were blocked."]),
    "mac": (ANY, lambda f: f.mac_address(), ["MAC address {v} is registered."],
            ["Device {v} joined the network."]),
    "crypto_wallet": (ANY, wallet, ["Send it to my wallet {v}."], ["Funds went to {v} yesterday."]),
    "date_of_birth": (ANY, date_of_birth, ["I was born on {v}.", "DOB: {v}", "Date of birth: {v}"], []),
    "api_key": (ANY, api_key, ["Here is the key: {v}"], ["Use {v} for the staging bot."]),
    "url_credentials": (ANY, url_credentials, ["Connect with {v} please."], ["{v}"]),
    "jwt": (ANY, jwt, ["Authorization token: {v}"], ["Use {v} for the test."]),
    "private_key": (ANY, private_key, ["Here is my key:\n{v}\nthanks."], ["{v}"]),
    # The keyword is the context: it is part of what makes these secrets.
    "password": (ANY, password, ["Server=db;User Id=app;Password={v};", "my password is {v}", "PASSWORD={v}"], []),
    "secret": (ANY, secret, ["export API_KEY={v}", "client_secret: \"{v}\"", "Authorization: Bearer {v}"], []),
    "ssn": (["en_US"], lambda f: f.ssn(), ["My SSN is {v}.", "Social security number {v}."],
            ["Applicant {v} was approved."]),
    "uk_nino": (["en_GB"], nino, ["My national insurance number is {v}.", "NINO: {v}"],
                ["Employee {v} starts Monday."]),
    "fr_nir": (["fr_FR"], lambda f: f.ssn(), ["Mon numéro de sécurité sociale est {v}.", "NIR : {v}"],
               ["Dossier {v} reçu."]),
    "it_fiscal_code": (["it_IT"], lambda f: f.ssn(), ["Il mio codice fiscale è {v}.", "CF: {v}"],
                       ["Pratica {v} approvata."]),
    "es_dni": (["es_ES"], lambda f: f.random.choice([f.nif(), f.nie()]), ["Mi DNI es {v}.", "NIE: {v}"],
               ["El cliente {v} pagó."]),
    "pl_pesel": (["pl_PL"], lambda f: f.pesel(), ["Mój numer PESEL to {v}.", "PESEL: {v}"], []),
    "br_cpf": (["pt_BR"], lambda f: f.cpf(), ["Meu CPF é {v}.", "CPF: {v}"], ["Cliente {v} aprovado."]),
    "in_aadhaar": (["en_IN"], aadhaar, ["My Aadhaar number is {v}.", "UID: {v}"], []),
    "ca_sin": (["en_CA"], lambda f: f.ssn(), ["My SIN is {v}.", "Social insurance number: {v}"], []),
    "cn_resident_id": (["zh_CN"], lambda f: f.ssn(), ["身份证号码：{v}", "My resident identity number is {v}."],
                       ["编号 {v} 已登记。"]),
    "de_tax_id": (["de_DE"], steuer_id, ["Meine Steuer-ID ist {v}.", "IdNr: {v}"], []),
}


def benign(f):
    """A sentence full of numbers and no personal data."""
    rng = f.random
    pieces = [
        f"Release {rng.randrange(10)}.{rng.randrange(30)}.{rng.randrange(100)} shipped",
        f"order #{rng.randrange(10**4, 10**12)}",
        f"at {f.date_time().isoformat()}Z",
        f"on {f.date_time().strftime('%Y-%m-%d %H:%M:%S')}",
        f"for {f.pricetag()}",
        f"commit {f.sha1()}",
        f"checksum {f.md5()}",
        f"request {f.uuid4()}",
        f"ISBN {f.isbn13()}",
        f"EAN {f.ean13()}",
        f"{rng.randrange(1, 100)}% of {rng.randrange(1000, 100000)} users",
        f"build {rng.randrange(1000, 99999)}",
        f"version {rng.randrange(1, 20)}.{rng.randrange(10)}.{rng.randrange(20000)}.{rng.randrange(1000)}",
        f"invoice INV-{rng.randrange(2000, 2030)}-{rng.randrange(1, 999999):06d}",
        f"port {rng.randrange(1, 65535)}",
        f"{rng.randrange(1, 4096)}x{rng.randrange(1, 4096)} pixels",
        f"lat {f.latitude()} lon {f.longitude()}",
        f"took {rng.randrange(1, 1000)}.{rng.randrange(100)} ms",
        f"ticket {rng.randrange(10**5, 10**10)}",
        f"between {rng.randrange(24):02d}:{rng.randrange(60):02d} and {rng.randrange(24):02d}:{rng.randrange(60):02d}",
    ]
    rng.shuffle(pieces)
    return ", ".join(pieces[:5]) + "."


NAMES = {
    "person": (ANY, lambda f: f.name(), ["My name is {v}.", "Dear {v}, thanks for the update.", "Signed, {v}"],
               ["{v} will join the call."]),
}


def build(per, entities):
    samples = []  # (text, [(entity, start, end)], kind)
    for entity, (locales, gen, with_context, without) in entities.items():
        for locale in locales or LOCALES:
            f = Faker(locale)
            f.seed_instance(zlib.crc32(f"{entity}/{locale}".encode()))
            for i in range(per):
                templates = with_context + without
                template = templates[i % len(templates)]
                kind = "context" if template in with_context else "neutral"
                value = gen(f)
                before, after = f.sentence(), f.sentence()
                head = before + " " + template[: template.index("{v}")]
                text = head + value + template[template.index("{v}") + 3:] + " " + after
                start = len(head.encode())
                samples.append((text, [(entity, start, start + len(value.encode()))], kind, locale))
    f = Faker("en_US")
    f.seed_instance(7)
    for _ in range(per * 20):
        samples.append((benign(f), [], "benign", "en_US"))
    return samples


def scan(texts, names=False, release=True):
    proc = subprocess.run(
        ["cargo", "run", "--quiet", "--locked"] + (["--release"] if release else [])
        + ["-p", "moat-redact", "--example", "scan"]
        + (["--", "--names"] if names else []),
        input="".join(json.dumps(t) + "\n" for t in texts), capture_output=True, text=True, cwd=ROOT,
    )
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--per", type=int, default=150, help="values per entity and locale")
    parser.add_argument("--write", help="write the report (markdown) here")
    parser.add_argument("--misses", type=int, default=0, help="print this many misses per entity")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 below 99%% recall or 99.5%% precision overall, or on any "
                             "finding in benign text (the test command runs this)")
    parser.add_argument("--debug", action="store_true", help="use the debug build")
    parser.add_argument("--names", action="store_true",
                        help="evaluate names (opt-in) instead, with every other entity on too")
    args = parser.parse_args()
    random.seed(1)
    samples = build(args.per, NAMES if args.names else ENTITIES)
    results = scan([s[0] for s in samples], names=args.names, release=not args.debug)

    tp, fn, fp = defaultdict(int), defaultdict(int), defaultdict(int)
    by_kind = defaultdict(lambda: [0, 0])  # (entity, kind) -> [found, total]
    locales = defaultdict(set)
    benign_fp, benign_n = defaultdict(int), 0
    misses = defaultdict(list)
    for (text, labels, kind, locale), found in zip(samples, results):
        benign_n += kind == "benign"
        matched = set()
        for entity, start, end in labels:
            locales[entity].add(locale)
            hit = next((i for i, x in enumerate(found)
                        if x["entity"] == entity and x["start"] < end and x["end"] > start), None)
            by_kind[(entity, kind)][1] += 1
            if hit is None:
                fn[entity] += 1
                misses[entity].append(text)
            else:
                tp[entity] += 1
                by_kind[(entity, kind)][0] += 1
                matched.add(hit)
        for i, x in enumerate(found):
            if i not in matched:
                fp[x["entity"]] += 1
                if kind == "benign":
                    benign_fp[x["entity"]] += 1
                if args.misses:
                    misses[f"FP {kind} " + x["entity"]].append(text.encode()[x["start"]:x["end"]].decode())

    rows = []
    total_tp = total_fn = total_fp = 0
    for entity in sorted(set(tp) | set(fn) | set(fp)):
        t, n, p = tp[entity], fn[entity], fp[entity]
        total_tp, total_fn, total_fp = total_tp + t, total_fn + n, total_fp + p
        recall = t / (t + n) if t + n else float("nan")
        precision = t / (t + p) if t + p else float("nan")
        ctx = by_kind.get((entity, "context"), [0, 0])
        neu = by_kind.get((entity, "neutral"), [0, 0])
        pct = lambda a: f"{100 * a[0] / a[1]:.1f}%" if a[1] else "–"
        rows.append(f"| {entity} | {len(locales[entity]) or '–'} | {t + n} | {100 * recall:.1f}% | "
                    f"{pct(ctx)} | {pct(neu)} | {100 * precision:.1f}% | {p} |")
    recall = total_tp / (total_tp + total_fn)
    precision = total_tp / (total_tp + total_fp)
    benign_total = sum(benign_fp.values())
    report = [
        "| entity | locales | values | recall | with context word | without | precision | false positives |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        f"| **all** | {len(LOCALES)} | {total_tp + total_fn} | **{100 * recall:.2f}%** | | | **{100 * precision:.2f}%** | {total_fp} |",
        "",
        f"Number-heavy benign sentences: {benign_n}, findings in them: {benign_total} "
        f"({1000 * benign_total / benign_n:.1f} per 1000 sentences)"
        + (": " + ", ".join(f"{e} {n}" for e, n in sorted(benign_fp.items())) if benign_fp else "") + ".",
    ]
    print("\n".join(report))
    if args.misses:
        for entity, texts in sorted(misses.items()):
            for t in texts[: args.misses]:
                print(f"  {entity}: {t}")
    if args.check and (recall < 0.99 or precision < 0.995 or benign_total > 0):
        sys.exit(f"below the bar: recall {recall:.4f}, precision {precision:.4f}, "
                 f"{benign_total} findings in benign text")
    if args.write:
        path = os.path.join(ROOT, args.write)
        with open(path) as fh:
            doc = fh.read()
        begin, end = ("<!-- names -->", "<!-- /names -->") if args.names else ("<!-- results -->", "<!-- /results -->")
        doc = doc[: doc.index(begin) + len(begin)] + "\n" + "\n".join(report) + "\n" + doc[doc.index(end):]
        with open(path, "w") as fh:
            fh.write(doc)


if __name__ == "__main__":
    main()
