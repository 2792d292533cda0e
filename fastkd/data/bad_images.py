"""Image files that do not decode: how a file is read, how a failure is described, reported and
replaced.

``bad_images="skip"`` leaves the files found bad before the run out of their split and replaces a
file found bad while reading by the next readable sample of the split; ``"error"`` raises
``BadImageError`` naming every bad file found before the run (or, while reading, the file met).
"""

import logging

from PIL import Image

MODES = ("skip", "error")
# What PIL raises for a file that is not a readable image. Seen here (Pillow 13): OSError for
# truncated or corrupt bodies ("Truncated File Read", "broken data stream when reading image
# file", "image file is truncated", "cannot load this image"), UnidentifiedImageError (an OSError)
# for empty files and unknown or broken headers, DecompressionBombError for a header claiming more
# than 2 * Image.MAX_IMAGE_PIXELS. Plugins raise SyntaxError, ValueError or EOFError for malformed
# structures.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# The package's logger (not this module's): one name for the trainer to configure.
logger = logging.getLogger("fastkd.data")


class BadImageError(ValueError):
    """A file that is not a readable image, with ``bad_images="error"``."""


def check_mode(bad_images):
    if bad_images not in MODES:
        raise ValueError(f"bad_images must be one of {MODES}, got {bad_images!r}")


def read_rgb(path):
    """The image at ``path`` fully decoded, as RGB: what the torchvision loader reads and what the
    verification checks, so both agree on which files are bad."""
    with Image.open(path) as image:
        return image.convert("RGB")


def describe(error):
    return f"{type(error).__name__}: {error}"


def decode_failure(path):
    """None when ``path`` decodes, else why not."""
    try:
        read_rgb(path)
    except DECODE_ERRORS as error:
        return describe(error)
    return None


def bad_file_error(path, error):
    """``BadImageError`` for the one file ``path`` met while reading, with ``bad_images="error"``
    (``error``: what its reader raised)."""
    return BadImageError(f"{path}: {describe(error)} (bad_images='error'; fastkd-verify-data "
                         "lists every bad file)")


def bad_files_error(bad):
    """``BadImageError`` listing every file of ``bad`` ({path: reason}), sorted by path."""
    lines = "".join(f"\n  {path}: {bad[path]}" for path in sorted(bad))
    return BadImageError(f"{len(bad)} bad image file(s) (bad_images='error'; 'skip' leaves them "
                         f"out):{lines}")


def record_bad(known, found, log):
    """Add to ``known`` the files of ``found`` it lacks (both {path: reason}); with ``log``, one
    warning for each. Returns the new ones."""
    new = {path: reason for path, reason in found.items() if path not in known}
    if log:
        for path, reason in new.items():
            logger.warning("skipping bad image %s: %s", path, reason)
    known.update(new)
    return new


def wrap_from(index, size):
    """``index`` and the indices after it, wrapping round: the candidates, in order, for the
    sample that replaces a bad one."""
    return ((index + step) % size for step in range(size))
