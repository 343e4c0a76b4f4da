"""What --dataset_path names: one text file, or documents (a folder, several paths, globs).

One file given by name is read as it always was: one text, the last 10% of its tokens held out.
Anything else is a set of documents: every .txt and .md file under a folder (recursively, hidden
folders such as .token_cache left out), each file or glob match as given, sorted by path within
each, duplicates once. Files that are binary, empty or not in the encoding are skipped with a note.
Documents are joined with <|endoftext|>. With at least MIN_HELD_OUT_DOCUMENTS of them, whole
documents, chosen by content hash, are held out for validation (about 10% of the text) and placed
last, so the token file is still two contiguous parts and no document is split between them.

The manifest (path, size and content hash of every file) is the key of everything cached from the
documents, and is saved with the run (dataset_manifest.json, the checkpoint).
"""

import codecs
import glob
import hashlib
import itertools
import json
import os
import shlex
from dataclasses import dataclass, field

from custom_llm.errors import UserError, cannot_read
from custom_llm.textfile import CHUNK_BYTES, END_OF_TEXT, check_text_file, codec, file_hash, looks_binary, read_chunks

DOCUMENT_SUFFIXES = (".txt", ".md")
MIN_HELD_OUT_DOCUMENTS = 10          # fewer documents: the last 10% of the tokens, as for one file
HELD_OUT_SHARE = 0.1                 # held-out documents: about this share of the text's bytes
GLOB_CHARACTERS = "*?["


@dataclass
class Document:
    path: str                   # as found from what was given
    size: int                   # bytes
    hash: str                   # textfile.file_hash of its content
    skipped: str = None         # why it is not read (binary, empty, not in the encoding), else None
    held_out: bool = False


@dataclass
class Corpus:
    spec: object                # what --dataset_path gave: a path, or a list of paths and globs
    encoding: str
    single: bool                # one file given by name: read as one text, the last 10% held out
    files: list                 # every Document found, skipped ones too, in the order found
    folder: str                 # the folder whose .token_cache/ holds what is cached from the text
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

    @property
    def key(self) -> str:
        """32 hex digits naming the text in the cache: the file's content hash for one file, else
        the hash of the manifest (absolute paths, so the key is the same from any folder)."""
        if self.single:
            return self.files[0].hash
        entries = [[os.path.abspath(d.path), d.size, d.hash] for d in self.files]
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
        return f"{len(self.documents):,} files{skipped}, "

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


def changed_files(before: dict, now: dict) -> str:
    """What differs between two manifests, briefly ('notes/a.txt changed, notes/b.md added'),
    or '' when that cannot be said (no manifest before: a checkpoint older than manifests)."""
    if not before:
        return ""
    old = {f["path"]: f["blake2b"] for f in before["files"]}
    new = {f["path"]: f["blake2b"] for f in now["files"]}
    changes = [f"{p} changed" for p in new if p in old and old[p] != new[p]] \
        + [f"{p} added" for p in new if p not in old] + [f"{p} removed" for p in old if p not in new]
    if len(changes) > 3:
        changes = changes[:3] + [f"{len(changes) - 3} more"]
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
    """The corpus --dataset_path names: its files found, hashed and checked, the held-out ones chosen."""
    paths = spec_list(spec)
    if len(paths) == 1 and not _is_glob(paths[0]) and not os.path.isdir(paths[0]):
        path = paths[0]
        check_text_file(path)
        document = Document(path, os.path.getsize(path), file_hash(path))
        return Corpus(spec, encoding, True, [document], os.path.dirname(os.path.abspath(path)))
    found, seen = [], set()
    for path in paths:
        for name in _expand(path):
            absolute = os.path.abspath(name)   # not realpath: a system call per file, and slow
            if absolute not in seen:
                seen.add(absolute)
                found.append(name)
    codec_name = codec(encoding).name
    files = [_inspect(path, encoding, codec_name) for path in found]
    readable = [d for d in files if not d.skipped]
    if not readable:
        named = ", ".join(f"{d.path} is {d.skipped}" for d in files[:3]) + (
            f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise UserError(f"nothing readable in {spec_text(spec)}: {named}; give text files in {encoding} "
                        "or pass --encoding")
    if len(readable) >= MIN_HELD_OUT_DOCUMENTS:
        _choose_held_out(readable)
    first = paths[0] if not _is_glob(paths[0]) else found[0]
    folder = os.path.abspath(first if os.path.isdir(first) else os.path.dirname(first) or ".")
    return Corpus(spec, encoding, False, files, folder)


def _is_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARACTERS) and not os.path.exists(path)


def _not_there(path: str) -> str:
    """Why a given path or glob names nothing, or ''."""
    if _is_glob(path):
        return "" if glob.glob(path, recursive=True) else f"{path} matches no file"
    return "" if os.path.exists(path) else f"{path} does not exist"


def _expand(path: str) -> list:
    """The files one given path stands for: itself, a folder's .txt and .md files, a glob's matches."""
    if _not_there(path):
        raise UserError(f"{_not_there(path)}: give text files, folders or globs with --dataset_path", 2)
    if _is_glob(path):
        matches = sorted(glob.glob(path, recursive=True))
        files = [name for match in matches for name in (_folder_files(match) if os.path.isdir(match) else [match])]
        if not files:
            raise UserError(f"{path} matches no .txt or .md file: check the pattern", 2)
        return files
    if not os.path.isdir(path):
        return [path]
    files = _folder_files(path)
    if not files:
        raise UserError(f"the folder {path} holds no .txt or .md files: put your text there or give "
                        "its path with --dataset_path", 2)
    return files


def _folder_files(folder: str) -> list:
    files = []
    for root, folders, names in os.walk(folder):
        folders[:] = [f for f in folders if not f.startswith(".")]   # .token_cache, .git
        files += [os.path.join(root, n) for n in names
                  if n.lower().endswith(DOCUMENT_SUFFIXES) and not n.startswith(".")]
    return sorted(files)


def _inspect(path: str, encoding: str, codec_name: str) -> Document:
    """One file's size and content hash, and whether it is text in the encoding: one read."""
    digest = hashlib.blake2b(digest_size=16)
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    size, skipped = 0, None
    try:
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                if size == 0 and looks_binary(block, codec_name):
                    skipped = "a binary file (it has NUL bytes)"
                digest.update(block)
                if not skipped:
                    try:
                        decoder.decode(block)
                    except UnicodeDecodeError as err:
                        skipped = f"not valid {encoding} (bad byte at byte offset {size + err.start})"
                size += len(block)
        if not skipped:
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        skipped = f"not valid {encoding} (it ends inside a character)"
    except OSError as err:
        raise cannot_read(path, err) from None
    return Document(path, size, digest.hexdigest(), skipped or (None if size else "empty"))


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
