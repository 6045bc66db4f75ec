"""MkDocs hook: the result plots, served to the site without copying them into docs/.

Every ``benchmarks/results/*.png`` and ``experiments/results/*.png`` of the repository becomes
``results/NAME.png`` on the site, so a page shows a plot as ``![...](results/NAME.png)`` whichever
of the two folders holds it (plots of the experiments are moving from the first to the second; a
name found in both is taken from ``experiments/results``). ``mkdocs serve`` also watches both folders.
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

FOLDERS = ("benchmarks/results", "experiments/results")  # a later folder wins a name found in both
SITE_FOLDER = "results"


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _plots(root: Path) -> dict:
    plots = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).glob("*.png")):
            plots[path.name] = path
    return plots


def on_files(files, config):
    for name, path in _plots(_root(config)).items():
        src_uri = f"{SITE_FOLDER}/{name}"
        if files.get_file_from_path(src_uri) is None:  # a file of docs/ itself would win
            files.append(File.generated(config, src_uri, abs_src_path=str(path)))
    return files


def on_serve(server, config, builder):
    for folder in FOLDERS:
        path = _root(config) / folder
        if path.is_dir():
            server.watch(str(path))
    return server
