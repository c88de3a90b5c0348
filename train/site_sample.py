"""A site's sample of knees, read from a folder of ``<grade>/<image>``, a CSV of ``file,grade``, or a
folder of plain images (no labels). Bad input is reported, never a crash: every problem becomes a
warning naming the files (`Sample.warnings`), and only a sample with nothing to check is an error.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "Sample", "SampleError", "read_sample"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
GRADES = 5


class SampleError(ValueError):
    """Nothing in the given data can be checked (a clear message, no report written)."""


@dataclass
class Sample:
    """The files to check, their grades (None when unlabelled) and what was wrong with the input."""

    source: str
    files: list[Path]
    grades: list[int] | None
    warnings: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.grades is not None

    def grade_counts(self) -> list[int] | None:
        if self.grades is None:
            return None
        c = Counter(self.grades)
        return [c.get(g, 0) for g in range(GRADES)]


def _names(paths: list, limit: int = 8) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _from_csv(path: Path) -> Sample:
    warnings: list[str] = []
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise SampleError(f"cannot read the CSV {path}: {exc}") from exc
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "grade"]:
        rows = rows[1:]
    files, grades, missing, bad, short = [], [], [], [], []
    for n, row in enumerate(rows, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            short.append(f"line {n}")
            continue
        name, grade = row[0].strip(), row[1].strip()
        f = Path(name) if Path(name).is_absolute() else path.parent / name
        if not f.is_file():
            missing.append(name)
            continue
        if grade not in {str(g) for g in range(GRADES)}:
            bad.append(f"{name} ({grade!r})")
            continue
        files.append(f)
        grades.append(int(grade))
    if short:
        warnings.append(f"{len(short)} CSV lines without a file and a grade, skipped: {_names(short)}")
    if missing:
        warnings.append(f"{len(missing)} files named in the CSV do not exist, skipped: {_names(missing)}")
    if bad:
        warnings.append(f"{len(bad)} grades outside 0-4, skipped: {_names(bad)}")
    return Sample(str(path), files, grades, warnings)


def _from_folder(folder: Path) -> Sample:
    warnings: list[str] = []
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    grade_dirs = [d for d in subdirs if d.name in {str(g) for g in range(GRADES)}]
    loose = _images(folder)
    if not grade_dirs:
        others = [d.name for d in subdirs]
        if not loose:
            raise SampleError(
                f"{folder} has no grade folders (0..4) and no images ({', '.join(IMAGE_SUFFIXES)}): give a folder of "
                "<grade>/<image>, a CSV of file,grade, or a folder of images"
                + (f"; its folders {others[:8]} are not grades" if others else "")
            )
        if others:
            warnings.append(f"folders that are not grades 0-4, not read: {_names(others)}")
        return Sample(str(folder), loose, None, warnings)
    others = [d.name for d in subdirs if d not in grade_dirs]
    if others:
        warnings.append(f"folders that are not grades 0-4, not read: {_names(others)}")
    if loose:
        warnings.append(f"{len(loose)} images outside the grade folders, not read: {_names([p.name for p in loose])}")
    files, grades = [], []
    for d in grade_dirs:
        found = _images(d)
        skipped = sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES)
        if skipped:
            warnings.append(f"files in {d.name}/ that are not images, not read: {_names(skipped)}")
        files += found
        grades += [int(d.name)] * len(found)
    empty = [str(g) for g in range(GRADES) if str(g) not in {d.name for d in grade_dirs} or not grades.count(g)]
    if empty:
        warnings.append(f"no knees of grade {', '.join(empty)}: nothing can be said about those grades")
    return Sample(str(folder), files, grades, warnings)


def read_sample(data: str | Path) -> Sample:
    """The sample at ``data`` (a folder or a ``.csv``); raises `SampleError` when there is nothing to check."""
    path = Path(data)
    if not path.exists():
        raise SampleError(f"{path} does not exist: give a folder of <grade>/<image>, a CSV of file,grade, or images")
    sample = _from_csv(path) if path.is_file() else _from_folder(path)
    if not sample.files:
        raise SampleError(f"no readable knees in {path}: " + ("; ".join(sample.warnings) or "it is empty"))
    return sample
