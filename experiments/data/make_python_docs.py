"""Regenerate ``python-docs.jsonl``: signatures and docstring summaries from Python's standard library.

Real English text with learnable structure that any machine with Python has; the generated file is
committed so every machine trains on the same bytes (docstrings drift between Python versions).
Run: ``python experiments/data/make_python_docs.py``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

MODULES = [
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "math",
    "mimetypes",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "secrets",
    "shlex",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
    "zlib",
]


def summary(doc: str, limit: int = 320) -> str:
    para = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()
    return para if len(para) <= limit else para[:limit].rsplit(" ", 1)[0] + " ..."


def records() -> list[dict[str, str]]:
    out, seen = [], set()
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            members = [(name, obj)]
            if inspect.isclass(obj):
                members += [
                    (f"{name}.{m}", f) for m, f in sorted(vars(obj).items()) if not m.startswith("_") and callable(f)
                ]
            for qual, fn in members:
                doc = inspect.getdoc(fn)
                key = f"{mod_name}.{qual}"
                if not doc or key in seen or len(doc) < 20:
                    continue
                seen.add(key)
                try:
                    sig = str(inspect.signature(fn))
                except (TypeError, ValueError):
                    sig = "(...)"
                out.append({"module": mod_name, "text": f"{key}{sig}\n    {summary(doc)}"})
    return out


if __name__ == "__main__":
    target = Path(__file__).with_name("python-docs.jsonl")
    rows = records()
    tmp = target.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(target)
    print(f"{len(rows)} records -> {target}")
