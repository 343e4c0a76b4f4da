"""A training text for people who have none yet, assembled offline from documentation that
every Python installation already carries (the standard library's own help pages)."""

import importlib
import pydoc

from custom_llm.atomic import atomic_path

# Well-documented standard-library modules, most prose-rich first.
MODULES = [
    "collections", "itertools", "functools", "pathlib", "os", "os.path", "re", "json", "csv",
    "argparse", "logging", "datetime", "calendar", "decimal", "fractions", "statistics", "random",
    "math", "string", "textwrap", "difflib", "heapq", "bisect", "array", "enum", "dataclasses",
    "typing", "contextlib", "abc", "copy", "pprint", "shutil", "tempfile", "glob", "fnmatch",
    "zipfile", "tarfile", "gzip", "sqlite3", "hashlib", "hmac", "secrets", "base64", "struct",
    "codecs", "unicodedata", "locale", "gettext", "io", "time", "threading", "queue", "sched",
    "subprocess", "socket", "selectors", "asyncio", "email", "html", "xml.etree.ElementTree",
    "urllib.parse", "http.client", "http.server", "unittest", "doctest", "pdb", "timeit", "trace",
    "inspect", "ast", "dis", "tokenize", "keyword", "operator", "weakref", "types", "numbers",
    "configparser", "tomllib", "shlex", "getpass", "platform", "errno", "signal", "mmap",
    "pickle", "shelve", "dbm", "zlib", "bz2", "lzma", "ipaddress", "uuid", "wave", "colorsys",
    "turtle", "cmd", "code", "pydoc", "zoneinfo", "graphlib", "contextvars", "warnings",
]


def build_default_text(path: str, target_chars: int = 2_000_000) -> int:
    """Write about target_chars characters of plain-text documentation to path; return the count."""
    pieces, total = [], 0
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            page = pydoc.render_doc(module, title="%s", renderer=pydoc.plaintext)
        except Exception:  # a module missing from this Python build is simply skipped
            continue
        pieces.append(page)
        total += len(page)
        if total >= target_chars:
            break
    text = "\n\n".join(pieces)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return len(text)
