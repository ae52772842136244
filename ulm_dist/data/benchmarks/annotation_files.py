"""Reading the publishers' annotation files: whitespace-separated text, one record a line.

Every error names the file and the 1-based line, says what the line should hold and what it
holds, so that a corrupt or mis-chosen download is found at once. MATLAB `.mat` files (AFLW's
and Human3.6M's keypoints) are read with SciPy, imported only when a benchmark needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ulm_dist.extras import require


class AnnotationError(ValueError):
    """An annotation file that is not in its publisher's format."""


@dataclass(frozen=True)
class AnnotationLine:
    path: Path
    number: int  # 1-based, as an editor shows it
    fields: list[str]

    def error(self, expected: str) -> AnnotationError:
        found = " ".join(self.fields) or "an empty line"
        return AnnotationError(
            f"{self.path}, line {self.number}: expected {expected}, found {found!r}; the file "
            "is not as its publisher distributes it (a truncated or edited copy?)"
        )

    def numbers(self, start: int, stop: int, expected: str) -> list[float]:
        try:
            return [float(value) for value in self.fields[start:stop]]
        except ValueError:
            raise self.error(expected) from None

    def integer(self, index: int, expected: str) -> int:
        try:
            return int(self.fields[index])
        except (ValueError, IndexError):
            raise self.error(expected) from None


def require_file(path: Path, what: str) -> Path:
    """`path`, or a FileNotFoundError saying which file of the distribution is missing."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; expected {what} there (see README, 'Reproducing the "
            "papers', for the layout SRC must have)"
        )
    return path


def read_annotation_lines(
    path: Path,
    what: str,
    *,
    columns: int | None,
    expected: str,
    skip_lines: int = 0,
    split_columns: int | None = None,
) -> list[AnnotationLine]:
    """The non-empty lines of a whitespace-separated text file after `skip_lines` header
    lines, split into fields; each must have `columns` fields (None: any number). With
    `split_columns`, a line splits into at most that many fields, the last keeping its spaces
    (CUB's part names, "left eye"). A blank line at the end is fine; one in the middle is an
    error, like a line with the wrong number of fields."""
    require_file(path, what)
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, text in enumerate(lines[skip_lines:], start=skip_lines + 1):
        fields = text.split(None, split_columns - 1) if split_columns else text.split()
        record = AnnotationLine(path, number, fields)
        if not fields or (columns is not None and len(fields) != columns):
            raise record.error(expected)
        records.append(record)
    return records


def load_mat(path: Path, what: str) -> dict[str, Any]:
    """The variables of a MATLAB (v5/v7) file, as `scipy.io.loadmat` gives them."""
    require_file(path, what)
    scipy_io = require("scipy.io", "datasets", f"reading {path}")
    try:
        return scipy_io.loadmat(str(path))
    except Exception as error:  # scipy raises several kinds for a file that is not a .mat
        raise AnnotationError(f"{path}: cannot read it as a MATLAB file ({error})") from error
