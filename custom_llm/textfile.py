"""Reading a training text: checks, one read that hashes a document and says whether it is text,
chunked decoding of a file of any size, and content hashes (the key of everything cached from a
text, tokens_cache.py).

Only regular files are read: a named pipe would block the reader forever, and a device may never
end, so what a path stands for is checked (os.stat) before anything is opened."""

import codecs
import hashlib
import os
import stat

from custom_llm.errors import UserError, cannot_read

CHUNK_BYTES = 1 << 20              # bytes read at a time: small chunks stay in the CPU cache (measured fastest)


def check_text_file(path: str) -> None:
    """One text file given by name (a folder is a set of documents, corpus.py) must be a readable,
    non-empty regular file."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist: give the path of a text file with --dataset_path", 2)
    kind = not_a_regular_file(os.stat(path).st_mode)
    if kind:
        raise UserError(f"{path} is {kind}: give the path of a text file with --dataset_path", 2)
    if not os.access(path, os.R_OK):
        raise UserError(f"{path} is not readable (permission denied): check its permissions")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty: training needs some text")


def codec(encoding: str):
    try:
        return codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"unknown --encoding {encoding!r}", 2) from None


def not_a_regular_file(mode: int) -> str:
    """Why a file of this st_mode is not read ('not a regular file (a named pipe)'), or ''."""
    if stat.S_ISREG(mode):
        return ""
    kind = "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) \
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"
    return f"not a regular file ({kind})"


def looks_binary(first_block: bytes, codec_name: str) -> bool:
    """NUL bytes near the start: a binary file (text has none, but in UTF-16 and UTF-32)."""
    return not codec_name.startswith(("utf-16", "utf-32")) and b"\x00" in first_block[:8192]


def read_chunks(path: str, encoding: str = "utf-8"):
    """Yield the text chunk by chunk. Chunks end after a newline where there is one, so a
    multi-character token such as <|endoftext|> is never cut in two."""
    codec_name = codec(encoding).name
    utf8 = codec_name == "utf-8"
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    carry, offset = b"", 0  # offset: where the next decoded piece starts in the file
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(CHUNK_BYTES)
                if offset == 0 and looks_binary(raw, codec_name):
                    raise UserError(f"{path} looks like a binary file (it has NUL bytes), not text")
                if not utf8:  # any other encoding: its incremental decoder finds the boundaries
                    text = _decode(decoder, raw, not raw, path, encoding, offset)
                    offset += len(raw)
                    if text:
                        yield text
                    if not raw:
                        return
                    continue
                # UTF-8: a newline byte is never part of a longer character, so cut after a
                # newline and decode whole pieces; the rest waits for the next read.
                data = carry + raw
                cut = _safe_cut(data) if raw else len(data)
                if cut == 0 and len(data) < 16 * CHUNK_BYTES:
                    carry = data  # no safe cut yet: read on
                    continue
                if cut == 0:  # one enormous line without spaces
                    cut = _cut_between_characters(data)
                if cut:
                    yield _decode(decoder, data[:cut], True, path, encoding, offset)
                offset += cut
                carry = data[cut:]
                if not raw:
                    return
    except OSError as err:
        raise cannot_read(path, err) from None


SPACE_BYTES = b" \t\n\r\x0b\x0c"


def _safe_cut(data: bytes) -> int:
    """A cut point where no tokenizer's pre-tokenization (GPT-2's, which splits off whitespace
    runs and joins one space to the word after it) can join anything across: just after a lone
    newline between two non-space bytes, or else just before a lone space. 0 when there is none."""
    for separator, after in ((b"\n", 1), (b" ", 0)):
        position = len(data)
        while (position := data.rfind(separator, 0, position)) > 0:
            if position + 1 < len(data) and data[position - 1] not in SPACE_BYTES \
                    and data[position + 1] not in SPACE_BYTES:
                return position + after
    return 0


# The special token that ends a text (tokenizer.py) and joins documents (corpus.py): a cut must not split it.
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_BYTES = END_OF_TEXT.encode()


def _cut_between_characters(data: bytes) -> int:
    """The last cut point in data that splits neither a UTF-8 character nor <|endoftext|>: for a
    line with no newline or space for 16 chunks, where no better cut exists."""
    cut = len(data) - 1
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    for length in range(len(END_OF_TEXT_BYTES) - 1, 0, -1):
        if data.endswith(END_OF_TEXT_BYTES[:length], 0, cut):
            return cut - length
    return cut


def _decode(decoder, data, final, path, encoding, offset):
    try:
        return decoder.decode(data, final=final)
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not valid {encoding}: bad byte at byte offset {offset + err.start}; "
                        "convert it to UTF-8 or pass --encoding (e.g. latin-1)") from None


def inspect_text(path: str, encoding: str):
    """(size in bytes, content hash, why it is not text or '') of a regular file, in one read:
    binary (NUL bytes), not in the encoding, or empty."""
    codec_name = codec(encoding).name
    digest = hashlib.blake2b(digest_size=16)
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    size, skipped = 0, ""
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
    return size, digest.hexdigest(), skipped or ("" if size else "empty")


def file_hash(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                digest.update(block)
    except OSError as err:
        raise cannot_read(path, err) from None
    return digest.hexdigest()
