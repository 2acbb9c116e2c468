"""Input files: sha256 of their bytes, cached by (resolved path, size, mtime), hashed in parallel."""
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import jobs.inputs as inputs
from jobs.inputs import InputError, digest_inputs, find_input, input_digest


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hash_calls(monkeypatch):
    """The files actually read (not served from the cache), in call order."""
    calls = []
    real = inputs._sha256

    def counting(file):
        calls.append(file.path)
        return real(file)

    monkeypatch.setattr(inputs, "_sha256", counting)
    return calls


def test_digest_is_sha256_of_the_bytes(tmp_path):
    data = os.urandom(3 * inputs._CHUNK + 12345)  # several chunks and a partial one
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "empty.bin").write_bytes(b"")
    assert input_digest(str(tmp_path / "big.bin")) == _sha(data)
    assert input_digest(tmp_path / "empty.bin") == _sha(b"")


def test_chunk_boundaries_do_not_change_the_digest(tmp_path, monkeypatch):
    data = bytes(range(256)) * 5
    for n, chunk in enumerate((1, 7, 256, 1280, 1281)):
        monkeypatch.setattr(inputs, "_CHUNK", chunk)
        (tmp_path / f"{n}.bin").write_bytes(data)  # a new file each time, so no cache hit
        assert input_digest(str(tmp_path / f"{n}.bin")) == _sha(data)


def test_same_content_under_two_paths_has_one_digest(tmp_path):
    data = b"the same picture\n" * 100
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(data)
    assert input_digest(str(tmp_path / "a.png")) == input_digest(str(tmp_path / "sub" / "b.png")) == _sha(data)


def test_rewritten_file_is_hashed_again(tmp_path, hash_calls):
    path = tmp_path / "a.png"
    path.write_bytes(b"first version")
    first = input_digest(str(path))
    assert input_digest(str(path)) == first and len(hash_calls) == 1  # the second call is cached
    path.write_bytes(b"second, longer version")
    assert input_digest(str(path)) == _sha(b"second, longer version") != first
    # Same length, new content: the mtime tells it apart. Set explicitly, because a rewrite
    # within one kernel clock tick can keep the old mtime.
    mtime = path.stat().st_mtime_ns
    path.write_bytes(b"second, longer VERSION")
    os.utime(path, ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))
    assert input_digest(str(path)) == _sha(b"second, longer VERSION")
    assert len(hash_calls) == 3


def test_cache_is_keyed_by_size_and_mtime(tmp_path, hash_calls):
    # The documented trade-off: a same-size rewrite that restores the mtime is not noticed.
    path = tmp_path / "a.png"
    path.write_bytes(b"aaaa")
    first = input_digest(str(path))
    st = path.stat()
    path.write_bytes(b"bbbb")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert input_digest(str(path)) == first
    assert len(hash_calls) == 1


def test_symlink_relative_path_and_file_uri_share_one_cache_entry(tmp_path, hash_calls, monkeypatch):
    data = b"linked"
    (tmp_path / "real.png").write_bytes(data)
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    monkeypatch.chdir(tmp_path)
    names = [str(tmp_path / "real.png"), str(tmp_path / "link.png"), "real.png", "./link.png", f"file://{tmp_path}/real.png"]
    assert {input_digest(name) for name in names} == {_sha(data)}
    assert hash_calls == [str(tmp_path / "real.png")]


def test_file_uri_digest(tmp_path):
    (tmp_path / "a b.png").write_bytes(b"uri bytes")
    assert input_digest(f"file://{tmp_path}/a%20b.png") == _sha(b"uri bytes")
    assert find_input(f"file://{tmp_path}/a%20b.png").path == str(tmp_path / "a b.png")
    # A URI is percent-encoded; a raw space is refused in one line, not guessed at.
    with pytest.raises(InputError, match="cannot open input") as info:
        input_digest(f"file://{tmp_path}/a b.png")
    _one_line_naming(info.value, f"file://{tmp_path}/a b.png")


def test_file_changed_while_being_read_is_read_again(tmp_path, monkeypatch):
    path = tmp_path / "growing.png"
    path.write_bytes(b"start")
    real = inputs._sha256
    reads = []

    def append_after_first_read(file):
        digest = real(file)
        reads.append(digest)
        if len(reads) == 1:
            with open(path, "ab") as f:
                f.write(b" and more")
        return digest

    monkeypatch.setattr(inputs, "_sha256", append_after_first_read)
    assert input_digest(str(path)) == _sha(b"start and more")
    assert reads == [_sha(b"start"), _sha(b"start and more")]


def test_file_that_keeps_changing_is_an_input_error(tmp_path, monkeypatch):
    path = tmp_path / "busy.png"
    path.write_bytes(b"x")
    real = inputs._sha256

    def append_after_each_read(file):
        digest = real(file)
        with open(path, "ab") as f:
            f.write(b"x")
        return digest

    monkeypatch.setattr(inputs, "_sha256", append_after_each_read)
    with pytest.raises(InputError, match="changed while being read"):
        input_digest(str(path))


def _one_line_naming(error, name):
    assert isinstance(error, InputError)
    assert "\n" not in str(error) and name in str(error)
    return str(error)


def test_unreadable_inputs_raise_one_line_naming_the_file(tmp_path):
    for name, reason in (
        (str(tmp_path / "nope.png"), "no such file"),
        (f"file://{tmp_path}/nope.png", "no such file"),
        (str(tmp_path), "not a file (a directory)"),
    ):
        with pytest.raises(InputError) as info:
            input_digest(name)
        assert _one_line_naming(info.value, name).endswith(reason)
    for bad in ("", None, 7):
        with pytest.raises(InputError, match="non-empty path or URI"):
            input_digest(bad)


def test_parallel_digests_equal_sequential_and_each_file_is_read_once(tmp_path, hash_calls):
    paths = []
    for i in range(50):
        path = tmp_path / f"img{i:02d}.png"
        path.write_bytes(os.urandom(1000 + 997 * i))
        paths.append(str(path))
    missing = str(tmp_path / "missing.png")
    files = dict.fromkeys(paths + [missing] + paths[::-1] + [missing], "image")  # every file named twice
    got = digest_inputs(files, max_workers=8)
    assert list(got) == paths + [missing]  # distinct uris, first-seen order
    assert sorted(hash_calls) == sorted(paths)  # each read once
    for path in paths:
        assert got[path] == _sha(Path(path).read_bytes()) == input_digest(path)
    assert _one_line_naming(got[missing], missing).endswith("no such file")


def test_digest_inputs_runs_files_in_parallel_threads(tmp_path, monkeypatch):
    # Four reads that each wait for all four to have started: a sequential loop would time out.
    barrier = threading.Barrier(4, timeout=20)
    real = inputs._sha256

    def meet(file):
        barrier.wait()
        return real(file)

    monkeypatch.setattr(inputs, "_sha256", meet)
    uris = []
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(b"%d" % i)
        uris.append(str(tmp_path / f"{i}.png"))
    assert digest_inputs(dict.fromkeys(uris, "image"), max_workers=4) == {uri: _sha(Path(uri).read_bytes()) for uri in uris}


def test_digest_inputs_bad_values_and_arguments(tmp_path):
    got = digest_inputs({None: "image", "": "video"})
    assert set(got) == {None, ""} and all(isinstance(v, InputError) for v in got.values())
    assert digest_inputs({}) == {}
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_workers"):
            digest_inputs({str(tmp_path): "image"}, max_workers=bad)
    with pytest.raises(ValueError, match="unknown input file kinds 'images' \\(known: image, video, lora\\)"):
        digest_inputs({str(tmp_path): "images"})
    with pytest.raises(TypeError, match="files must map each uri to its kind"):
        digest_inputs([str(tmp_path)])


def test_check_gets_each_files_kind_and_its_input_error_is_the_files_value(tmp_path):
    # The driver's header check: each file is checked as the kind its column says, in the hashing thread,
    # and a file that fails it is that file's value (InputError), the others unaffected.
    for name in ("a.png", "b.png", "clip.mp4", "bad.mp4"):
        (tmp_path / name).write_bytes(name.encode())
    files = {str(tmp_path / n): kind for n, kind in
             (("a.png", "image"), ("clip.mp4", "video"), ("b.png", "image"), ("bad.mp4", "video"))}
    seen = []
    lock = threading.Lock()

    def check(uri, kind):
        with lock:
            seen.append((uri, kind))
        if uri.endswith("bad.mp4"):
            raise InputError(f"{uri}: not a video")

    got = digest_inputs(files, max_workers=3, check=check)
    assert sorted(seen) == sorted(files.items())  # every file checked once, as its kind
    assert list(got) == list(files)
    for uri in files:
        if uri.endswith("bad.mp4"):
            assert _one_line_naming(got[uri], uri).endswith("not a video")
        else:
            assert got[uri] == _sha(Path(uri).read_bytes())
    # A file that cannot be read is not checked at all.
    seen.clear()
    missing = str(tmp_path / "missing.mp4")
    assert isinstance(digest_inputs({missing: "video"}, check=check)[missing], InputError) and seen == []


def test_inputs_module_imports_neither_torch_nor_ray():
    code = (
        "import sys, jobs.inputs\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert out.stdout.strip() == ""
