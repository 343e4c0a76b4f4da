"""Where cached work is kept, and how a cache is kept honest and small.

Token files and tokenizers made from a text are cached in .token_cache/ beside the text (for a
folder of documents, inside it). Where
that folder cannot be written (a read-only dataset folder) they go to one folder per user,
<user cache>/tokens, where the user cache is $XDG_CACHE_HOME/custom-llm-scripts (by default
~/.cache/custom-llm-scripts; precision.py keeps its probe there too).

Every cached file is checked against the content hash saved when it was written; a file that
does not match is not used, and is rebuilt. A cache folder holds at most CACHE_CAP_BYTES: after a
new entry is written, the entries of the texts used longest ago are removed until it fits (the
text in use is always kept, however large).
"""

import hashlib
import json
import os
import re
import tempfile

from custom_llm.atomic import atomic_path
from custom_llm.errors import UserError

CACHE_CAP_BYTES = 4 * 2 ** 30
READ_BYTES = 1 << 20
# Cached files are named after the content hash of their text (textfile.file_hash, 32 hex digits;
# for several documents, the hash of their manifest, corpus.Corpus.key).
TEXT_KEY = re.compile(r"([0-9a-f]{32})[-.]")


def user_cache_folder() -> str:
    """This user's cache folder for the project: $XDG_CACHE_HOME/custom-llm-scripts."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "custom-llm-scripts")


def token_cache_folder(text_folder: str):
    """(folder for the cached tokens and tokenizers of a text in text_folder (a folder of
    documents: inside it), a note saying where it is when that is not there, else None)."""
    beside = os.path.join(text_folder, ".token_cache")
    if _writable(beside):
        return beside, None
    mine = os.path.join(user_cache_folder(), "tokens")
    if _writable(mine):
        return mine, (f"note: {text_folder} cannot be written, so the token cache is in {mine} "
                      f"(at most {CACHE_CAP_BYTES / 2 ** 30:g} GB; the texts used longest ago are removed first)")
    raise UserError(f"cannot cache the tokens of the text in {text_folder}: neither {beside} nor {mine} "
                    "can be written; set XDG_CACHE_HOME to a writable folder")


def digest(path: str) -> str:
    """The content hash a cached file is checked against."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            hasher.update(block)
    return hasher.hexdigest()


def save_checked(path: str, content: str) -> None:
    """Cache a text with its content hash. Failing to write it is not an error: a cache saves
    time, nothing more."""
    record = json.dumps({"sha256": hashlib.sha256(content.encode()).hexdigest(), "content": content})
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(record)
    except (OSError, UserError):
        pass


def load_checked(path: str):
    """The text save_checked cached at path, or None when it is missing or does not match its hash."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        content = record["content"]
        if hashlib.sha256(content.encode()).hexdigest() == record["sha256"]:
            touch(path)
            return content
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def touch(*paths) -> None:
    """Mark cached files as just used (the cap removes the texts used longest ago first)."""
    for path in paths:
        try:
            os.utime(path)
        except OSError:
            pass


def trim(folder: str, keep: str, cap: int = None) -> None:
    """Remove the cached files of the texts used longest ago until folder holds at most cap
    bytes (CACHE_CAP_BYTES); the files of the text whose hash is keep stay."""
    cap = CACHE_CAP_BYTES if cap is None else cap
    entries = {}   # text hash -> ([paths], bytes, last use)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = TEXT_KEY.match(name)
        path = os.path.join(folder, name)
        if not match or not os.path.isfile(path):
            continue   # temporaries of writes in progress start with a dot
        stat = os.stat(path)
        paths, size, used = entries.get(match.group(1), ([], 0, 0.0))
        entries[match.group(1)] = (paths + [path], size + stat.st_size, max(used, stat.st_mtime))
    total = sum(size for _, size, _ in entries.values())
    for key, (paths, size, _) in sorted(entries.items(), key=lambda item: item[1][2]):
        if total <= cap:
            break
        if key == keep:
            continue
        for path in paths:
            try:
                os.remove(path)
            except OSError:
                pass
        total -= size


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.remove(probe)
        return True
    except OSError:
        return False
