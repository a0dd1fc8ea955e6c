"""Every problem of a dataset in one pass: collected while it loads, reported together, then fatal or dropped.

A labelling tool's export with a few hundred bad records should cost one run to diagnose, not a few
hundred. The loaders add each problem here (its kind, where it is, how to fix it) and go on; at the end
:meth:`DataProblems.finish` prints a summary (count per kind, the first examples with file and record)
and either stops (``strict``, the default) or lets the loader drop what was wrong and records the counts.

The image check (:func:`verify_images`) opens every image once before training, in threads, each rank of
a torchrun job its share (:mod:`backbones.engine.parallel`): a file that cannot be opened, or whose size
(after the EXIF orientation, which the decoder applies) differs from the annotation's width/height, is a
problem like any other, found before the first step instead of being skipped with a warning in every epoch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from backbones.engine.config import Choice
from backbones.engine.errors import DatasetError  # noqa: F401  (raised here; importers take it from here too)
from backbones.engine.parallel import default_threads, map_over_ranks

logger = logging.getLogger(__name__)

EXAMPLES_SHOWN = 5
class VerifyImages(Choice):
    """``data.verify_images``: how every image is checked once at load (detection and localization alike)."""
    header = "header"  # size and EXIF orientation (fast)
    decode = "decode"  # every pixel (finds truncated files)
    none = "none"


VERIFY_MODES = tuple(mode.value for mode in VerifyImages)
# EXIF orientations 5-8 rotate by 90 degrees: the decoded image is the stored one transposed.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def read_token_lines(path: str, valid, expected: str) -> tuple[list[list[str]], str]:
    """The non-blank lines of a small list file (a blacklist), split into tokens: those ``valid(tokens)``
    accepts, and what is wrong with the others, ``"N line(s) are not <expected> (line 3: '...'; ...)"``, or
    "" when there is nothing wrong; the caller names the file and the fix."""
    rows, bad = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            tokens = line.split()
            if tokens and valid(tokens):
                rows.append(tokens)
            elif tokens:
                bad.append(f"line {line_no}: {line.strip()!r}")
    problem = (f"{len(bad)} line(s) are not {expected} ({'; '.join(bad[:EXAMPLES_SHOWN])}"
               f"{' ...' if len(bad) > EXAMPLES_SHOWN else ''})") if bad else ""
    return rows, problem


@dataclass
class _Kind:
    fix: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


class DataProblems:
    """Problems of one dataset (``source``: its annotation file or sets), grouped by kind."""

    def __init__(self, source: str):
        self.source = source
        self.kinds: dict[str, _Kind] = {}

    def add(self, kind: str, where: str, fix: str) -> None:
        entry = self.kinds.setdefault(kind, _Kind(fix))
        entry.count += 1
        if len(entry.examples) < EXAMPLES_SHOWN:
            entry.examples.append(where)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def counts(self) -> dict[str, int]:
        return {kind: entry.count for kind, entry in self.kinds.items()}

    def report(self) -> str:
        total = sum(self.counts().values())
        lines = [f"{self.source}: {total} problem{'s' * (total != 1)} in {len(self.kinds)} kind"
                 f"{'s' * (len(self.kinds) != 1)}:"]
        for kind, entry in self.kinds.items():
            more = f" (first {len(entry.examples)} shown)" if entry.count > len(entry.examples) else ""
            lines.append(f"  {entry.count} x {kind}{more}:")
            lines += [f"      {example}" for example in entry.examples]
            lines.append(f"    fix: {entry.fix}")
        return "\n".join(lines)

    def finish(self, strict: bool, strict_key: str = "data.strict_train / data.strict_val") -> None:
        """Raise with the whole report (``strict``), or log it: the caller drops the offending records."""
        if not self:
            return
        if strict:
            raise DatasetError(f"{self.report()}\nNothing was trained. Fix the records above, or set {strict_key}="
                               "false to drop them (and their images where the image itself is bad) and go on; "
                               "the counts then go to summary.json.")
        logger.warning("%s\ndropped (strict=false); the counts are in the dataset's stats and summary.json",
                       self.report())


def image_size(path: str, decode: bool = False) -> tuple[int, int]:
    """(height, width) of ``path`` as the image reader returns it (EXIF orientation applied). ``decode``
    decodes every pixel (finds truncated files); otherwise only the header is read. Raises OSError or
    ValueError when the file is not a readable image."""
    if decode:
        from backbones.engine.imageio import CorruptImageError, read_image_rgb
        try:
            return read_image_rgb(path).shape[:2]
        except CorruptImageError as exc:
            raise ValueError(str(exc)) from exc
    from PIL import Image
    with Image.open(path) as im:
        width, height = im.size
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


def verify_images(items: list[tuple[str, int, int, str]], problems: DataProblems, mode: str = "header",
                  threads: int | None = None, progress: bool = True) -> set[str]:
    """Open every ``(path, height, width, where)``; unreadable files and size mismatches become problems.
    Returns the paths that failed. ``mode``: ``header`` (fast: size and orientation), ``decode`` (every
    pixel, finds truncated files), ``none``. Under torchrun each rank opens its share of the files and
    every rank gets every result (a collective: :func:`backbones.engine.parallel.map_over_ranks`)."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify_images: mode must be one of {VERIFY_MODES}, got {mode!r}")
    if mode == "none" or not items:
        return set()
    unreadable = ("unreadable image", "replace the file, or remove its record")
    mismatch = ("image size differs from the annotation", "correct width/height in the annotations (for an "
                "EXIF-rotated photo: the rotated size) or replace the image")

    def check(item) -> tuple[tuple[str, str], str] | None:
        """None, or ((kind, fix), what was found)."""
        path, height, width, _ = item
        try:
            found = image_size(path, decode=mode == "decode")
        except Exception as exc:  # noqa: BLE001 - any failure to open is the same problem for the user
            return unreadable, f"cannot be read ({type(exc).__name__}: {exc})"
        if tuple(found) != (height, width):
            return mismatch, f"decodes as {found[1]}x{found[0]} (EXIF orientation applied), annotated {width}x{height}"
        return None

    desc = f"checking images ({mode})" if progress and len(items) >= 2000 else None
    bad = set()
    for (path, _, _, where), outcome in zip(items, map_over_ranks(check, items, threads or default_threads(), desc)):
        if outcome is not None:
            (kind, fix), found = outcome
            bad.add(path)
            problems.add(kind, f"{path} ({where}): {found}", fix)
    return bad
