"""Writing generated result tables into a hand-written markdown document (e.g. RESULTS.md) between markers."""

from __future__ import annotations

from pathlib import Path


def replace_marked_block(path: str | Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- name -->`` and ``<!-- /name -->`` in ``path`` with ``text``.

    The markers stay, so the document can be regenerated any number of times; everything else is left as it is.
    """
    path = Path(path)
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (create it with the lines {start!r} and {end!r})")
    document = path.read_text(encoding="utf-8")
    i, j = document.find(start), document.find(end)
    if i < 0 or j < i or document.count(start) != 1 or document.count(end) != 1:
        raise ValueError(f"{path}: needs exactly one {start!r} line followed by one {end!r} line around the table")
    path.write_text(document[: i + len(start)] + "\n" + text.strip() + "\n" + document[j:], encoding="utf-8")
