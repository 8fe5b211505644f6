"""Writes two English texts of different sizes that ship with Python itself, for trying a text recipe on text it
was not tuned on:

    python scripts/package_texts.py OUT_DIR    ->  OUT_DIR/python-docs.txt (about 465 KB: the language
                                                   reference topics of `pydoc_data`) and OUT_DIR/docstrings.txt
                                                   (about 150 KB: the docstrings of some standard modules)

The exact sizes follow the Python version, so the figures measured on them name it.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = ("argparse collections email.message logging subprocess threading asyncio.tasks json decimal fractions "
           "textwrap unittest.case pathlib shutil tarfile zipfile http.client urllib.request datetime calendar "
           "statistics random string re typing dataclasses functools itertools").split()


def python_docs() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def docstrings(min_chars: int = 200) -> str:
    """The longer docstrings of `MODULES` and of what each defines (not what it imports), each once."""
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in [module] + [v for _, v in sorted(vars(module).items())]:
            if obj is not module and getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars:
                found.append(doc)
    return "\n\n".join(dict.fromkeys(found))


def main(out: str) -> None:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("python-docs.txt", python_docs()), ("docstrings.txt", docstrings())):
        (root / name).write_text(text, encoding="utf-8")
        print(f"{root / name}: {len(text.encode()):,} bytes (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/package_texts.py OUT_DIR")
    main(sys.argv[1])
