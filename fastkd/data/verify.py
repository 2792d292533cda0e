"""Decode every image of a dataset once before a run, in parallel, and remember the results.

DALI cannot skip a file inside its pipeline: a file with a valid header and a broken body stops it
mid-epoch (``nvImageCodec failure``) without naming the file. So before a DALI loader is built,
each file is decoded once, with PIL as the torchvision loader reads it (``read_rgb``), by a pool of
worker processes. PIL is the stricter of the two decoders: a JPEG whose scan data is garbage fails
in PIL, while DALI's libjpeg-turbo decodes it to noise after "Corrupt JPEG data" warnings.

Results are cached in ``ROOT/.fastkd-verified.json`` or, where ROOT is not writable, in
``$XDG_CACHE_HOME/fastkd/verified/<name>-<hash of ROOT's absolute path>.json``, as
``{"format": 1, "root": ROOT, "files": {path relative to ROOT: [size, mtime_ns, reason or null]}}``:
a file is decoded again only when its size or mtime changes. The cache is replaced atomically
(``fastkd.files.atomic_write``), so it is read without a lock; whoever has files to decode holds
an exclusive lock on ``<cache>.lock``, so ranks that start together decode once (the others
wait, then find every result cached).

Command line: ``fastkd-verify-data DIR [-j N]`` (``main``).
"""

import argparse
import fcntl
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm import tqdm

from ..files import atomic_write, user_cache_dir
from .bad_images import decode_failure
from .folders import scan_image_folder

CACHE_NAME = ".fastkd-verified.json"
CACHE_FORMAT = 1
# Files per task sent to a worker: tens of milliseconds of decoding, against a fraction of a
# millisecond of inter-process traffic.
CHUNK = 32
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Verification:
    bad: dict  # {path: reason} of the files that do not decode
    checked: int  # files asked about
    decoded: int  # of which decoded by this call; the others' results came from the cache
    seconds: float
    cache: str  # the cache file

    @property
    def cached(self):
        return self.checked - self.decoded


def cache_file(root):
    """Where the results for ``root`` live: in it when it is writable, else in the user cache."""
    root = os.path.abspath(root)
    if os.access(root, os.W_OK):
        return os.path.join(root, CACHE_NAME)
    directory = os.path.join(user_cache_dir(), "verified")
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha256(root.encode()).hexdigest()[:16]
    return os.path.join(directory, f"{os.path.basename(root)}-{digest}.json")


@contextmanager
def _locked(cache):
    """Hold an exclusive lock on ``cache + ".lock"`` (waiting for it): one verifier at a time."""
    with open(cache + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _read_cache(cache):
    """{relative path: [size, mtime_ns, reason]}; empty when missing, unreadable or another
    format (the files are then decoded again)."""
    try:
        with open(cache) as handle:
            content = json.load(handle)
    except (OSError, ValueError):
        return {}
    return content["files"] if content.get("format") == CACHE_FORMAT else {}


def _write_cache(cache, root, files):
    with atomic_write(cache) as handle:
        os.fchmod(handle.fileno(), 0o644)  # readable by whoever reads the dataset, any umask
        json.dump({"format": CACHE_FORMAT, "root": root, "files": files}, handle,
                  separators=(",", ":"))


def _decode_all(paths, workers):
    """Why each of ``paths`` does not decode (None where it does), in order; progress on
    stderr."""
    def progress(reasons):
        return list(tqdm(reasons, total=len(paths), desc="verifying images", unit="file"))

    if workers < 1:
        return progress(map(decode_failure, paths))
    # Small lists still go to every worker: at least about four tasks each.
    chunksize = max(1, min(CHUNK, len(paths) // (4 * workers)))
    with ProcessPoolExecutor(workers) as pool:
        return progress(pool.map(decode_failure, paths, chunksize=chunksize))


def _keys(root, paths):
    """{path: (name relative to ``root``, [size, mtime_ns])}."""
    prefix = os.path.join(root, "")  # slicing: os.path.relpath costs ~7 us a file (ImageNet: 9 s)
    keys = {}
    for path in paths:
        full, info = os.path.abspath(path), os.stat(path)
        name = full[len(prefix):] if full.startswith(prefix) else os.path.relpath(full, root)
        keys[path] = name, [info.st_size, info.st_mtime_ns]
    return keys


def _lookup(cache, keys):
    """The cache's entries and the paths of ``keys`` it has no result for at their key."""
    files = _read_cache(cache)
    stale = [path for path, (name, key) in keys.items() if files.get(name, [None, None])[:2] != key]
    return files, stale


def verify_images(root, paths, workers=4):
    """Decode each of ``paths`` (files under the dataset root ``root``) that the cache has no
    result for at its current size and mtime, with ``workers`` processes (0: in this one).
    Returns a ``Verification``; its ``bad`` covers all of ``paths``, cached or decoded now."""
    started = time.perf_counter()
    root = os.path.abspath(root)
    cache = cache_file(root)
    keys = _keys(root, paths)
    files, stale = _lookup(cache, keys)  # no lock to read: the cache is replaced atomically
    if stale:
        with _locked(cache):
            files, stale = _lookup(cache, keys)  # the lock's last holder may have done them
            if stale:
                reasons = _decode_all(stale, workers)
                for path, reason in zip(stale, reasons):
                    name, key = keys[path]
                    files[name] = [*key, reason]
                _write_cache(cache, root, files)
    bad = {path: files[name][2] for path, (name, _) in keys.items() if files[name][2] is not None}
    return Verification(bad, len(paths), len(stale), time.perf_counter() - started, cache)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fastkd-verify-data",
        description="Decode every image of a dataset once, as fastkd's loaders read them, and "
                    "list the files that do not decode with the reason. Results are cached (in "
                    f"DIR/{CACHE_NAME}, or the user cache when DIR is read-only): a later run "
                    "decodes only new or changed files. Exit status: 0 when every file is "
                    "readable, 1 when some are bad, 2 for usage errors.")
    parser.add_argument("dir", metavar="DIR",
                        help="a dataset root with train/ and val/ class folders, or one "
                             "class-folder tree (DIR/<class>/<image>)")
    parser.add_argument("-j", "--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="decoding processes (default: one per CPU; 0: in this process)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    started = time.perf_counter()
    splits = [os.path.join(args.dir, split) for split in SPLITS
              if os.path.isdir(os.path.join(args.dir, split))]
    try:
        folders = [scan_image_folder(root) for root in splits or [args.dir]]
    except (OSError, ValueError) as error:
        parser.error(str(error))
    verification = verify_images(
        args.dir, [path for folder in folders for path, _ in folder.samples], args.workers)
    bad = {path: reason for folder in folders
           for path, reason in folder.without(verification.bad).bad.items()}
    for path in sorted(bad):
        print(f"{path}: {bad[path]}")
    checked = sum(len(folder.samples) + len(folder.bad) for folder in folders)
    seconds = time.perf_counter() - started
    print(f"{checked} files checked, {len(bad)} bad, {checked / seconds:.0f} files/s, "
          f"{verification.cached} cached ({verification.cache})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
