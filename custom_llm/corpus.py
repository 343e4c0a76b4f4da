"""What --dataset_path names: one text file, or documents (a folder, several paths, globs).

The first step of the text's one-way trip to the batches, each step called once per run:
  1. corpus.py        find the documents: paths, globs, folders -> a Corpus of inspected files
  2. textfile.py      read them: checks, content hashes, chunked decoding (Corpus.parts, .texts)
  3. encoder.py       encode the chunks into token ids, in one pass
  4. tokens_cache.py  keep the token file (and a BPE tokenizer) made from the corpus, keyed by
                      its content and the tokenizer (cache.py: where, checked, kept small)
  5. data.py          the Dataset: training and validation tokens, random batches of windows
so train_llm.py does: corpus = find_documents(spec, encoding); tokenizer = bpe_tokenizer_for(corpus,
vocab_size) when it trains a BPE; dataset = prepare_dataset(corpus, tokenizer).

One file given by name is read as it always was: one text, the last 10% of its tokens held out.
Anything else is a set of documents: every .txt and .md file, and every .jsonl, .json and .parquet
(conversations, chat_layouts.py) file under a folder (recursively, hidden folders such as
.token_cache left out), each file or glob match as given, sorted by path within each. Symlinked
folders are followed, each real folder once (so a link loop ends), and each file is read once, by
its identity (device, inode), whatever paths lead to it. Only regular files are read: named pipes,
devices, sockets and links that lead nowhere are skipped with a note, unopened (a pipe would block
the reader forever), as are empty files and text files that are binary or not in the encoding (a
conversation file loses only its bad lines, when its conversations are read).
Documents are joined with <|endoftext|>. With at least MIN_HELD_OUT_DOCUMENTS of them, whole
documents, chosen by content hash, are held out for validation (about 10% of the text) and placed
last, so the token file is still two contiguous parts and no document is split between them.

The manifest (path, size and content hash of every file) is saved with the run
(dataset_manifest.json, the checkpoint); the corpus's key, naming everything cached from it, hashes
the same with paths relative to the corpus's folder, so a folder moved with its documents keeps it.
"""

import glob
import hashlib
import itertools
import json
import os
import shlex
import stat
from dataclasses import dataclass, field
from errno import ELOOP, ENOENT, ENOTDIR
from functools import cached_property

from custom_llm.chat_layouts import CONVERSATION_SUFFIXES, is_conversation_file
from custom_llm.errors import UserError, cannot_read
from custom_llm.textfile import END_OF_TEXT, check_text_file, codec, file_hash, inspect_text, not_a_regular_file, \
    read_chunks

DOCUMENT_SUFFIXES = (".txt", ".md") + CONVERSATION_SUFFIXES
SUFFIXES_TEXT = ", ".join(DOCUMENT_SUFFIXES[:-1]) + " or " + DOCUMENT_SUFFIXES[-1]   # for messages
MIN_HELD_OUT_DOCUMENTS = 10          # fewer documents: the last 10% of the tokens, as for one file
HELD_OUT_SHARE = 0.1                 # held-out documents: about this share of the text's bytes
GLOB_CHARACTERS = "*?["


@dataclass
class Document:
    path: str                   # as found from what was given
    size: int                   # bytes
    hash: str                   # textfile.file_hash of its content (None: not a regular file, never read)
    skipped: str = None         # why it is not read (not a regular file, binary, empty, not in the encoding)
    held_out: bool = False


@dataclass
class Corpus:
    spec: object                # what --dataset_path gave: a path, or a list of paths and globs
    encoding: str
    single: bool                # one file given by name: read as one text, the last 10% held out
    files: list                 # every Document found, skipped ones too, in the order found
    folder: str                 # the folder whose .token_cache/ holds what is cached from the text; the
                                # documents' paths in the key are relative to it
    documents: list = field(init=False)   # the readable files: training ones first, held-out ones last

    def __post_init__(self):
        readable = [d for d in self.files if not d.skipped]
        self.documents = [d for d in readable if not d.held_out] + [d for d in readable if d.held_out]

    @property
    def held_out(self) -> list:
        return [d for d in self.documents if d.held_out]

    @property
    def skipped(self) -> list:
        return [d for d in self.files if d.skipped]

    @cached_property
    def key(self) -> str:
        """32 hex digits naming the text in the cache: the file's content hash for one file, else
        the hash of the manifest with paths relative to the corpus's folder (the same from any
        working folder, and after the folder is moved or copied with its documents)."""
        if self.single:
            return self.files[0].hash
        entries = [[os.path.relpath(os.path.abspath(d.path), self.folder), d.size, d.hash] for d in self.files]
        record = json.dumps({"encoding": self.encoding, "files": entries}).encode()
        return hashlib.blake2b(record, digest_size=16).hexdigest()

    @property
    def separator_characters(self) -> int:
        return len(END_OF_TEXT) * max(0, len(self.documents) - 1)

    def parts(self):
        """The text, chunk by chunk, as one stream per contiguous part of the token file: the
        training documents, then the held-out ones (one stream when nothing is held out)."""
        if self.single:
            return [read_chunks(self.files[0].path, self.encoding)]
        held_out = self.held_out
        training = self.documents[:len(self.documents) - len(held_out)]
        if not held_out:
            return [self._joined(training, last=True)]
        return [self._joined(training, last=False), self._joined(held_out, last=True)]

    def texts(self):
        """Every document's text, chunk by chunk, without separators (for training a BPE)."""
        for document in self.documents:
            yield from read_chunks(document.path, self.encoding)

    def _joined(self, documents, last):
        """The documents' chunks with <|endoftext|> after each but the corpus's last one."""
        for i, document in enumerate(documents):
            yield from read_chunks(document.path, self.encoding)
            if not (last and i == len(documents) - 1):
                yield END_OF_TEXT

    def describe(self) -> str:
        """The start-up line's account of the files: '12 files (2 skipped), ' or '' for one file."""
        if self.single:
            return ""
        skipped = f" ({len(self.skipped)} skipped)" if self.skipped else ""
        n = len(self.documents)
        return f"{n:,} file{'s' if n > 1 else ''}{skipped}, "

    def validation_rule(self) -> str:
        if self.held_out:
            n = len(self.held_out)
            return f"{n} whole file{'s' if n > 1 else ''} held out"
        return "the last 10% held out"

    def notes(self) -> list:
        return [f"note: skipped {d.path}, which is {d.skipped}" for d in self.skipped]

    def manifest(self) -> dict:
        """What the run was trained on, saved with it (dataset_manifest.json, the checkpoint)."""
        files = []
        for d in self.files:
            entry = {"path": d.path, "size": d.size, "blake2b": d.hash}
            if d.skipped:
                entry["skipped"] = d.skipped
            elif d.held_out:
                entry["held_out"] = True
            files.append(entry)
        return {"dataset_path": self.spec, "encoding": self.encoding, "key": self.key,
                "validation": self.validation_rule(), "files": files}


def changed_files(before: dict, now: dict):
    """What differs between two manifests, by content, briefly ('notes/a.txt changed, notes/b.md
    added'): '' when they hold the same files with the same content in the same encoding (a folder
    moved with its documents, or a manifest keyed the older way); None when it cannot be said (no
    manifest before: a checkpoint older than manifests).

    Files are matched by the path they were found by: on --resume the dataset path is the
    checkpoint's, resolved from the run's folder, so wherever that folder now is a file that is
    still there is found by the same path."""
    if not before:
        return None
    old = {f["path"]: f["blake2b"] for f in before["files"]}
    new = {f["path"]: f["blake2b"] for f in now["files"]}
    changes = [f"{p} changed" for p in new if p in old and old[p] != new[p]] \
        + [f"{p} added" for p in new if p not in old] + [f"{p} removed" for p in old if p not in new]
    if len(changes) > 3:
        changes = changes[:3] + [f"{len(changes) - 3} more"]
    if not changes and before.get("encoding") != now["encoding"]:
        changes = [f"read as {now['encoding']}, not {before.get('encoding')}"]
    return ", ".join(changes)


# ------------------------------------------------------------------------ what was given

def parse_dataset_answer(text: str):
    """The answer to the dataset question (or the flag's words, joined by train_llm.py): paths and
    globs separated by spaces, quoted where a path has spaces. One path, or a list of several.
    Raises ValueError naming a path that does not exist or a glob that matches nothing."""
    text = text.strip()
    whole = os.path.expanduser(text)
    if os.path.exists(whole):  # a single path with spaces needs no quotes
        return whole
    try:
        words = [os.path.expanduser(word) for word in shlex.split(text)]
    except ValueError as err:
        raise ValueError(f"cannot read {text!r} as paths ({err})") from None
    if not words:
        raise ValueError("no path given")
    for word in words:
        if _not_there(word):
            raise ValueError(_not_there(word))
    return words[0] if len(words) == 1 else words


def spec_list(spec) -> list:
    return [spec] if isinstance(spec, str) else list(spec)


def spec_text(spec) -> str:
    """What was given, for messages: 'notes/' or 'notes/ extra.txt posts/*.md'."""
    return spec if isinstance(spec, str) else " ".join(spec)


def absolute_spec(spec):
    """The same paths and globs made absolute, for the config (convert_to_gguf.py reads them)."""
    return os.path.abspath(spec) if isinstance(spec, str) else [os.path.abspath(p) for p in spec]


def spec_exists(spec) -> bool:
    return not any(_not_there(path) for path in spec_list(spec))


def find_documents(spec, encoding: str = "utf-8") -> Corpus:
    """The corpus --dataset_path names: its files found (each once), hashed and checked, the
    held-out ones chosen."""
    paths = spec_list(spec)
    if len(paths) == 1 and not _is_glob(paths[0]) and not os.path.isdir(paths[0]):
        path = paths[0]
        check_text_file(path)
        document = Document(path, os.path.getsize(path), file_hash(path))
        return Corpus(spec, encoding, True, [document], os.path.dirname(os.path.abspath(path)))
    codec(encoding)   # an unknown encoding is one line, before any file is read
    files, seen = [], set()
    for path in paths:
        for name in _expand(path):
            status = _status(name)
            identity = (status.st_dev, status.st_ino)
            if identity not in seen:  # the same file by another path, link or glob: read once
                seen.add(identity)
                files.append(_inspect(name, status, encoding))
    readable = [d for d in files if not d.skipped]
    if not readable:
        named = ", ".join(f"{d.path} is {d.skipped}" for d in files[:3]) + (
            f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise UserError(f"nothing readable in {spec_text(spec)}: {named}; give text files in {encoding} "
                        "or pass --encoding")
    if len(readable) >= MIN_HELD_OUT_DOCUMENTS:
        _choose_held_out(readable)
    first = paths[0] if not _is_glob(paths[0]) else files[0].path
    folder = os.path.abspath(first if os.path.isdir(first) else os.path.dirname(first) or ".")
    return Corpus(spec, encoding, False, files, folder)


def _status(path: str) -> os.stat_result:
    """What path stands for (os.stat, through links); for a link that leads nowhere, the link."""
    try:
        return os.stat(path)
    except OSError as err:
        if err.errno in (ENOENT, ENOTDIR, ELOOP) and os.path.islink(path):   # to nothing, or round a loop
            return os.lstat(path)
        raise cannot_read(path, err) from None


def _inspect(path: str, status: os.stat_result, encoding: str) -> Document:
    """A found file as a Document: read once (textfile.inspect_text) when it is a regular file;
    a named pipe, device, socket or broken link is skipped unopened."""
    if stat.S_ISLNK(status.st_mode):
        return Document(path, 0, None, "a broken link (it leads to no file)")
    kind = not_a_regular_file(status.st_mode)
    if kind:
        return Document(path, 0, None, kind)
    if is_conversation_file(path):   # read record by record: a bad line is skipped, not the whole file
        return Document(path, status.st_size, file_hash(path), None if status.st_size else "empty")
    size, content_hash, skipped = inspect_text(path, encoding)
    return Document(path, size, content_hash, skipped or None)


def _is_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARACTERS) and not os.path.exists(path)


def _not_there(path: str) -> str:
    """Why a given path or glob names nothing, or ''."""
    if _is_glob(path):
        return "" if _glob(path) else f"{path} matches no file"
    return "" if os.path.exists(path) else f"{path} does not exist"


def _expand(path: str) -> list:
    """The files one given path stands for: itself, a folder's document files, a glob's matches."""
    if _is_glob(path):
        matches = sorted(_glob(path))
        if not matches:
            raise UserError(f"{path} matches no file: give text files, folders or globs with --dataset_path", 2)
        files = [name for match in matches for name in (_folder_files(match) if os.path.isdir(match) else [match])]
        if not files:
            raise UserError(f"{path} matches no {SUFFIXES_TEXT} file: check the pattern", 2)
        return files
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist: give text files, folders or globs with --dataset_path", 2)
    if not os.path.isdir(path):
        return [path]
    files = _folder_files(path)
    if not files:
        raise UserError(f"the folder {path} holds no {SUFFIXES_TEXT} files: put your text there or give "
                        "its path with --dataset_path", 2)
    return files


def _folder_files(folder: str) -> list:
    """The document files (DOCUMENT_SUFFIXES) under folder, recursively, hidden ones and hidden folders left out."""
    return sorted(os.path.join(where, name) for where, names in _walk(folder)
                  for name in names if name.lower().endswith(DOCUMENT_SUFFIXES))


def _glob(pattern: str) -> list:
    """What glob.glob(pattern, recursive=True) matches, but where `**` enters each real folder once
    (_walk): glob.glob follows a symlink loop until paths grow too long, finding the same files
    again at every turn (hours for a loop of two links)."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)
    at = parts.index("**")
    head, tail = os.sep.join(parts[:at]) or (os.sep if pattern.startswith(os.sep) else ""), parts[at + 1:]
    bases = glob.glob(head) if any(c in head for c in GLOB_CHARACTERS) else [head]
    found = []
    for base in bases:
        if not os.path.isdir(base or os.curdir):
            continue
        for where, names in _walk(base):
            if tail:   # what follows ** is matched in every folder, itself perhaps holding another **
                found += _glob(os.path.join(glob.escape(where), *tail))
            else:      # a trailing ** matches the folders and the files in them
                found += [where or os.curdir] + [os.path.join(where, name) for name in names]
    return found


def _walk(base: str):
    """(folder, names of what is not a folder in it) for base and every folder under it but hidden
    ones (.token_cache, .git), hidden names left out. Symlinked folders are followed, but each
    real folder is entered once, by its first path that goes through no link where there is one:
    a link loop ends, and a link to a folder already walked adds nothing. A base of '' is the
    working folder, and paths under it are given without './', as glob gives them."""
    seen, roots = set(), [base]
    while roots:
        root = roots.pop(0)
        for where, folders, names in os.walk(root or os.curdir):   # os.walk enters no symlinked folder
            try:
                status = os.stat(where)
            except OSError:
                folders[:] = []
                continue
            if (status.st_dev, status.st_ino) in seen:
                folders[:] = []
                continue
            seen.add((status.st_dev, status.st_ino))
            folders[:] = sorted(f for f in folders if not f.startswith("."))
            if not root:
                where = "" if where == os.curdir else where[len(os.curdir + os.sep):]
            roots += [os.path.join(where, f) for f in folders if os.path.islink(os.path.join(where or os.curdir, f))]
            yield where, [n for n in names if not n.startswith(".")]


def _choose_held_out(documents: list) -> None:
    """Mark whole documents as held out, about HELD_OUT_SHARE of the bytes: in content-hash order
    (deterministic, and not always the same folder), copies of one text together so that no
    validation text is also trained on, each taken where it brings the share nearer to the target
    (so it stays under twice the target: a large document stays in training)."""
    target = HELD_OUT_SHARE * sum(d.size for d in documents)
    held = 0
    by_hash = sorted(documents, key=lambda d: (d.hash, d.path))
    for _, copies in itertools.groupby(by_hash, key=lambda d: d.hash):
        copies = list(copies)
        size = sum(d.size for d in copies)
        if held + size / 2 <= target:
            for d in copies:
                d.held_out = True
            held += size
        if held >= target:
            break
