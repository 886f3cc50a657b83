"""``miles report PATH``: one HTML page (and its markdown twin) for any study or run.

Every study writes a JSON file with a ``kind`` field (``compare``, ``ablate``, ``sweep``,
``demo``; a run's ``result.json`` says ``run``), and the page is built by the renderer registered
for that kind (:func:`register_renderer`; the built-in ones are in
:mod:`miles.report.renderers`). ``PATH`` is such a JSON file or a folder: a folder is searched for
the study files at its top level, and when it holds none (a folder written before studies recorded
their kind), for ``compare.json``, ``results.json`` (demo) or ``result.json`` (run), by name.
A folder with several study files (e.g. a tau and a mu ablation) gets one page holding them all.

The HTML is self-contained (:mod:`miles.report.html`); the markdown twin links the same PNGs from
``report_files/`` next to it, for GitHub and for diffs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from miles.fileio import DamagedFileError, atomic_write_text, read_json, remove_stale_temp_files
from miles.registry import Registry
from miles.report.document import Document, Section, render_markdown
from miles.report.html import render_html

__all__ = [
    "FILES_DIR",
    "LEGACY_FILES",
    "REPORT_HTML",
    "REPORT_MD",
    "Renderer",
    "available_kinds",
    "build_report",
    "detect_kind",
    "find_studies",
    "register_renderer",
    "render_html",
]

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FILES_DIR = "report_files"
#: folders written before studies recorded their ``kind``: recognised by file name, in this order
LEGACY_FILES = (("compare.json", "compare"), ("results.json", "demo"), ("result.json", "run"))

#: ``renderer(payload, folder, files) -> Document``: ``payload`` is the study's JSON, ``folder``
#: the folder it lies in (run paths are relative to it), ``files`` where figures go
Renderer = Callable[[Mapping[str, Any], Path, Path], Document]
#: what to do about a damaged study file
REWRITE = "run the command that wrote it again (it resumes: finished runs are read, not trained)"
_RENDERERS: Registry[Renderer] = Registry("report kind")


def register_renderer(kind: str) -> Callable[[Renderer], Renderer]:
    """Decorator: render the study files whose ``kind`` is ``kind``."""
    return _RENDERERS.register(kind)


def available_kinds() -> list[str]:
    """The study kinds ``miles report`` can render."""
    _load_builtin()
    return _RENDERERS.names()


def _load_builtin() -> None:
    import miles.report.renderers  # noqa: F401  (registers the built-in renderers)


def _read(path: Path) -> Any:
    return read_json(path, what="a study file", advice=REWRITE)


def _render(kind: str, study: Path, files: Path) -> Document:
    """The page part of one study file; a file whose content is not what its kind holds is
    named (the renderers read what the study wrote, so a mismatch means a damaged file)."""
    try:
        return _RENDERERS.get(kind)(_read(study), study.parent, files)
    except DamagedFileError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise DamagedFileError(
            study, f"not a {kind} file miles can read ({type(exc).__name__}: {exc})", REWRITE
        ) from exc


def _kind_of(path: Path) -> str | None:
    """The registered ``kind`` a JSON file declares (``None``: not a study file)."""
    try:
        data = _read(path)
    except ValueError:
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) and kind in _RENDERERS else None


def find_studies(path: str | Path) -> list[tuple[Path, str]]:
    """The study files at ``path`` (a JSON file or a folder), each with its kind.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder with nothing to report.
        ValueError: a file whose kind no renderer knows.
    """
    _load_builtin()
    path = Path(path)
    if path.is_file():
        kind = _kind_of(path) or dict(LEGACY_FILES).get(path.name)
        if kind is None:
            raise ValueError(
                f"{path} is not a study file: its 'kind' is none of {available_kinds()}"
            )
        return [(path, kind)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a folder nor a file")
    found = [(p, k) for p in sorted(path.glob("*.json")) if (k := _kind_of(p)) is not None]
    if found:
        return found
    for name, kind in LEGACY_FILES:
        if (path / name).is_file():
            return [(path / name, kind)]
    raise FileNotFoundError(
        f"{path} holds no study file (a JSON file with a 'kind' of {available_kinds()}; e.g. "
        "compare.json, ablate_tau.json, sweep.json, results.json of a demo, result.json of a "
        "run): nothing to report. For a sweep, pass its study folder OUT/<study name>"
    )


def detect_kind(path: str | Path) -> str:
    """The kind of the (first) study at ``path``; see :func:`find_studies`."""
    return find_studies(path)[0][1]


def _merge(docs: list[Document], title: str) -> Document:
    """Several studies on one page: each one's title and intro open its own sections."""
    if len(docs) == 1:
        return docs[0]
    kinds = {d.kind for d in docs}
    merged = Document(kinds.pop() if len(kinds) == 1 else "mixed", title)
    for doc in docs:
        merged.sections.append(Section(doc.title, list(doc.intro)))
        for section in doc.sections:
            section.title = f"{doc.title}: {section.title}"
            merged.sections.append(section)
    return merged


def build_report(path: str | Path, out_dir: str | Path | None = None) -> Document:
    """Write ``report.html``, ``report.md`` and ``report_files/*.png`` for the studies at
    ``path`` (default output: ``<folder>/report``); return the document written.

    Plots are drawn once into ``report_files/``; the HTML embeds those same bytes.
    """
    studies = find_studies(path)
    folder = studies[0][0].parent
    out = Path(out_dir) if out_dir is not None else folder / "report"
    files = out / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    for old in files.glob("*.png"):  # a re-run must not leave figures the new page lacks
        old.unlink()
    docs = []
    for study, kind in studies:
        sub = files if len(studies) == 1 else files / study.stem
        sub.mkdir(parents=True, exist_ok=True)
        for old in sub.glob("*.png"):
            old.unlink()
        docs.append(_render(kind, study, sub))
    report = _merge(docs, f"miles report: {folder}")
    report.html_path = out / REPORT_HTML
    report.md_path = out / REPORT_MD
    atomic_write_text(report.html_path, render_html(report))
    atomic_write_text(report.md_path, render_markdown(report, out))
    return report
