"""The token cache cannot lie: a cached file that does not match the hash saved with it is rebuilt;
with a read-only text folder the cache goes to one folder per user, which stays under its cap."""

import contextlib
import os
import subprocess

import pytest
from conftest import TINY, make_text, prepare, run_script

import custom_llm.cache as cache
from custom_llm.precision import cache_file
from custom_llm.corpus import find_documents
from custom_llm.tokenizer import encode
from custom_llm.tokens_cache import bpe_tokenizer_for


def write_text(folder, name="t.txt", seed=0, n=200):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(make_text(n, seed=seed), encoding="utf-8")
    return path


def cached(folder, suffix):
    return sorted(p for p in folder.iterdir() if p.name.endswith(suffix))


def corrupt_in_place(path):
    """Change some bytes, keep the size."""
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 4] = bytes(b ^ 0x01 for b in content[middle:middle + 4])
    path.write_bytes(bytes(content))


# ---------------------------------------------------------------------- integrity

def test_a_token_file_corrupted_at_the_same_size_is_rebuilt(tmp_path):
    path = write_text(tmp_path)
    text = path.read_text(encoding="utf-8")
    first = prepare(str(path))
    [tokens_file] = cached(tmp_path / ".token_cache", ".tokens")
    size = tokens_file.stat().st_size
    del first
    corrupt_in_place(tokens_file)
    assert tokens_file.stat().st_size == size
    second = prepare(str(path))
    assert not second.from_cache and "do not match their saved hash" in " ".join(second.notes)
    assert second.tokens.tolist() == encode(second.tokenizer, text)
    third = prepare(str(path))
    assert third.from_cache and third.tokens.tolist() == second.tokens.tolist()


@pytest.mark.parametrize("suffix", [".tokenizer.json", ".json"])
def test_a_corrupted_cached_tokenizer_or_token_count_is_not_used(tmp_path, suffix):
    path = write_text(tmp_path)
    text = path.read_text(encoding="utf-8")
    prepare(str(path))
    victims = [p for p in cached(tmp_path / ".token_cache", suffix) if p.name.endswith(".tokenizer.json") ==
               (suffix == ".tokenizer.json")]
    for victim in victims:
        content = victim.read_text(encoding="utf-8")
        # Same size, still valid JSON: one digit or letter changed inside the cached content.
        at = max(content.find('"n_tokens'), content.find('"vocab'))
        changed = content[:at] + content[at:].replace("1", "2", 1)
        assert changed != content and len(changed) == len(content)
        victim.write_text(changed, encoding="utf-8")
    again = prepare(str(path))
    assert not again.from_cache
    assert again.tokens.tolist() == encode(again.tokenizer, text)


def test_a_corrupted_cached_bpe_tokenizer_is_trained_again(tmp_path):
    path = write_text(tmp_path, n=400)
    tokenizer, from_cache = bpe_tokenizer_for(find_documents(str(path)), 400)
    assert not from_cache and bpe_tokenizer_for(find_documents(str(path)), 400)[1]
    [saved] = cached(tmp_path / ".token_cache", ".bpe400.tokenizer.json")
    corrupt_in_place(saved)
    again, from_cache = bpe_tokenizer_for(find_documents(str(path)), 400)
    assert not from_cache and again.to_str() == tokenizer.to_str()


# -------------------------------------------------------------- read-only folders

@contextlib.contextmanager
def read_only_folder(folder, monkeypatch, text_seed=0):
    """A folder holding a text that cannot be written to: for real where that is possible here (chmod
    for a user, a read-only tmpfs for root where mounting is allowed), else simulated for this process
    (real=False: root ignores permissions)."""
    path = write_text(folder, seed=text_seed)
    content = path.read_bytes()
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield path, True
        finally:
            os.chmod(folder, 0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if mounted:
        try:
            path.write_bytes(content)
            if subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True).returncode == 0:
                yield path, True
                return
        finally:
            subprocess.run(["umount", str(folder)], capture_output=True)
    writable = cache._writable
    monkeypatch.setattr(cache, "_writable", lambda where: not where.startswith(str(folder)) and writable(where))
    yield path, False


def test_a_read_only_text_folder_caches_in_the_user_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    mine = tmp_path / "user-cache" / "custom-llm-scripts" / "tokens"
    with read_only_folder(tmp_path / "texts", monkeypatch) as (path, _):
        text = path.read_text(encoding="utf-8")
        first = prepare(str(path))
        assert first.notes == [f"note: {path.parent} cannot be written, so the token cache is in {mine} "
                               "(at most 4 GB; the texts used longest ago are removed first)"]
        assert first.tokens.tolist() == encode(first.tokenizer, text)
        assert cached(mine, ".tokens") and not (path.parent / ".token_cache").exists()
        second = prepare(str(path))
        assert second.from_cache and second.tokens.tolist() == first.tokens.tolist()
    assert os.path.dirname(cache_file()) == str(tmp_path / "user-cache" / "custom-llm-scripts")  # one base folder


def test_training_on_a_read_only_text_says_where_the_cache_is(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    work = tmp_path / "work"
    work.mkdir()
    assert run_script("llm_model.py", *TINY, "-y", cwd=work).returncode == 0
    with read_only_folder(tmp_path / "texts", monkeypatch) as (path, real):
        if not real:
            pytest.skip("no read-only folder can be made here for another process")
        for attempt in range(2):
            result = run_script("train_llm.py", "--dataset_path", path, "--max_steps", 2, "--batch_size", 8, "-y",
                                cwd=work)
            assert result.returncode == 0, result.stderr
            assert "the token cache is in " + str(tmp_path / "user-cache") in result.stdout
        assert "(from the token cache)" in result.stdout


def test_the_user_cache_keeps_under_its_cap(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    mine = tmp_path / "user-cache" / "custom-llm-scripts" / "tokens"
    hashes = []
    for seed in range(4):
        with read_only_folder(tmp_path / f"texts{seed}", monkeypatch, text_seed=seed) as (path, _):
            hashes.append(prepare(str(path)).text_hash)
        if seed == 0:   # room for two texts' entries, not three
            entry = sum(p.stat().st_size for p in mine.iterdir())
            monkeypatch.setattr(cache, "CACHE_CAP_BYTES", int(2.5 * entry))
    assert sum(p.stat().st_size for p in mine.iterdir()) <= cache.CACHE_CAP_BYTES
    assert {p.name[:32] for p in mine.iterdir()} == set(hashes[2:])   # the two used last
