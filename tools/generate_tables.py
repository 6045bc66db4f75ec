"""Regenerates every results table in the README and the docs from the committed results.

A generated block in a Markdown file is two marker lines:

    <!-- table: benchmarks/results/clip_loss_cpu.json#clip_loss -->
    <!-- end table -->

The results file (the benchmark harness's schema) names the script that produced it; that
script's `tables(results)` renders its tables by name, and the block receives the named table
and a line of provenance. No measured number in the docs is typed by hand.

    python tools/generate_tables.py           # rewrite every block
    python tools/generate_tables.py --check   # exit 1 if a block differs from what the results give
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import re
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "benchmarks"))
import harness  # noqa: E402

BLOCK = re.compile(r"(<!-- table: (?P<path>[^#\s]+)#(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def documents() -> list[Path]:
    return [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").rglob("*.md"))]


def _producer(script: str):
    """The producing script as a module (its folder on sys.path, as when it runs)."""
    path = REPOSITORY / script
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"_producer_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    if not callable(getattr(module, "tables", None)):
        raise SystemExit(f"{script} has no tables(results) function")
    return module


class Tables:
    """Rendered tables by (results path, name), each file loaded and rendered once."""

    def __init__(self):
        self.rendered: dict[str, dict[str, str]] = {}

    def __call__(self, path: str, name: str, where: str) -> str:
        if path not in self.rendered:
            if not (REPOSITORY / path).is_file():
                raise SystemExit(f"{where}: no results file {path}")
            results = harness.load_results(REPOSITORY / path)
            tables = _producer(results["benchmark"]).tables(results)
            caption = f"*Measured on {harness.describe(results['provenance'])}; results: `{path}`.*"
            # A table gets its provenance below it; a generated sentence carries its own.
            self.rendered[path] = {key: f"{text.strip()}\n\n{caption}\n" if "\n|" in text else f"{text.strip()}\n"
                                   for key, text in tables.items()}
        if name not in self.rendered[path]:
            raise SystemExit(f"{where}: {path} has no table {name!r} (it has {sorted(self.rendered[path])})")
        return self.rendered[path][name]


def regenerate(text: str, where: str, tables: Tables) -> str:
    def fill(match: re.Match) -> str:
        body = "\n" + tables(match["path"], match["name"], where) + "\n"
        return match.group(1) + body + match.group(5)

    return BLOCK.sub(fill, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any block is stale")
    args = parser.parse_args(argv)
    tables, stale = Tables(), []
    for document in documents():
        text = document.read_text()
        where = document.relative_to(REPOSITORY).as_posix()
        new = regenerate(text, where, tables)
        if new == text:
            continue
        stale.append(where)
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), where,
                                                       f"{where} (generated)", n=1))
        else:
            document.write_text(new)
    if args.check and stale:
        print(f"\nstale generated tables in {', '.join(stale)}: run python tools/generate_tables.py")
        return 1
    print(f"{'checked' if args.check else 'regenerated'} {sum(len(t) for t in tables.rendered.values())} tables "
          f"from {len(tables.rendered)} results files" + ("" if args.check else f"; rewrote {len(stale)} files"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
