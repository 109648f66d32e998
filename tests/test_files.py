"""Files: loads the process owns, a corpus of malformed files, and writes that survive signals.

Every malformed file must raise a documented exception (ValueError or
OSError) whose message names the file; none may run a payload.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import rdl_functional as rf
from rdl_functional._files import _temp_prefix, atomic_write

ROOT = Path(__file__).resolve().parent.parent


def _params():
    return rf.seed_model().init(0)


def _same(a, b):
    return rf.tree_difference(a, b, leaves=True) is None and all(
        torch.equal(x, y) for x, y in zip(rf.tree_leaves(a), rf.tree_leaves(b), strict=True))


def test_loaded_params_do_not_change_when_the_file_does(tmp_path):
    path = tmp_path / "p.safetensors"
    rf.save(_params(), path)
    loaded = rf.load(path)
    other = rf.tree_map(lambda t: t + 1, _params())
    rf.save(other, tmp_path / "other.safetensors")
    path.write_bytes((tmp_path / "other.safetensors").read_bytes())  # overwritten in place
    assert _same(loaded, _params())
    with open(path, "r+b") as f:  # then truncated
        f.truncate(10)
    assert _same(loaded, _params())
    loaded["0"]["weight"].add_(1)  # the tensors are the process's own, and writable
    assert _same(rf.load(tmp_path / "other.safetensors")["0"], other["0"])


# ---------------------------------------------------------------------------
# The malformed-file corpus


def _header_length(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _with_header(header: dict | str, body: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    return struct.pack("<Q", len(text)) + text.encode() + body


class _Payload:
    """Unpickling this would create the marker file: the test asserts it never appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _corpus(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.safetensors"
    rf.save(_params(), good)
    data = good.read_bytes()
    end = _header_length(data)
    cases: dict[str, bytes] = {}
    # Truncations: every byte of the length prefix and of the header, then a few into the tensors.
    for cut in [*range(0, end + 1), end + 1, end + 100, len(data) - 1]:
        cases[f"truncated_at_{cut}"] = data[:cut]
    # One byte flipped at each place in the header (that still leaves it a valid file is allowed
    # only if it loads to a tree: checked below).
    for at in range(0, end, max(1, end // 150)):
        flipped = bytearray(data)
        flipped[at] ^= 0xFF
        cases[f"flipped_{at}"] = bytes(flipped)
    body = torch.zeros(4).numpy().tobytes()
    cases.update({
        "absurd_length": struct.pack("<Q", 2**63) + data[8:],
        "length_past_the_end": struct.pack("<Q", len(data)) + data[8:],
        "offsets_past_the_end": _with_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**12]}},
                                             body),
        "offsets_reversed": _with_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, body),
        "shape_too_large": _with_header({"w": {"dtype": "F32", "shape": [2**40, 2**40],
                                               "data_offsets": [0, 16]}}, body),
        "unknown_dtype": _with_header({"w": {"dtype": "X99", "shape": [4], "data_offsets": [0, 16]}}, body),
        "header_not_json": _with_header("{not json", body),
        "header_a_list": _with_header("[1, 2]", body),
        "header_deep": _with_header("[" * 100_000 + "]" * 100_000),
        "record_deep": _with_header({"__metadata__": {"rdl_functional.tree": "{\"a\": " * 5000 + "null" + "}" * 5000},
                                     "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, body),
        "record_not_a_tree": _with_header({"__metadata__": {"rdl_functional.tree": "[1, 2]"},
                                           "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, body),
        "record_names_a_missing_tensor": _with_header({"__metadata__": {"rdl_functional.tree": '{"v": null}'},
                                                      "w": {"dtype": "F32", "shape": [4],
                                                            "data_offsets": [0, 16]}}, body),
        "metadata_not_strings": _with_header({"__metadata__": {"a": 1}}),
        "empty": b"",
        "text": b"weights: 1, 2, 3\n",
        "pickle_payload": pickle.dumps(_Payload(str(tmp_path / "PWNED"))),
        "torch_save_payload": b"",  # filled below: torch.save's zip of pickles
    })
    paths = {}
    for name, content in cases.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        paths[name].write_bytes(content)
    torch.save({"w": _Payload(str(tmp_path / "PWNED"))}, paths["torch_save_payload"])
    (tmp_path / "a_folder.safetensors").mkdir()
    paths["a_folder"] = tmp_path / "a_folder.safetensors"
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "a_fifo.safetensors")
        paths["a_fifo"] = tmp_path / "a_fifo.safetensors"
    paths["missing"] = tmp_path / "missing.safetensors"
    return paths


def test_every_malformed_file_is_refused_with_a_message_naming_it(tmp_path):
    corpus = _corpus(tmp_path)
    assert len(corpus) > 900
    refused = 0
    for name, path in corpus.items():
        try:
            tree = rf.load(path)
        except (ValueError, OSError) as error:
            assert str(path) in str(error), (name, str(error))
            assert "Traceback" not in str(error)
            refused += 1
        else:  # a flipped byte inside a key or number can leave a valid file: it must load as a tree
            assert name.startswith("flipped_"), name
            assert all(isinstance(leaf, torch.Tensor) for leaf in rf.tree_leaves(tree))
    assert refused > 900
    assert not (tmp_path / "PWNED").exists()  # no payload ever ran


# ---------------------------------------------------------------------------
# Writes


def test_a_write_keeps_the_mode_writes_through_a_symlink_and_cleans_a_killed_writes_leftover(tmp_path):
    path = tmp_path / "p.safetensors"
    rf.save(_params(), path)
    os.chmod(path, 0o600)
    leftover = tmp_path / f"{_temp_prefix(path)}dead.tmp"  # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"partial")
    rf.save(_params(), path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert not leftover.exists()
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    rf.save(rf.tree_map(lambda t: t * 2, _params()), link)
    assert link.is_symlink() and torch.equal(rf.load(path)["0"]["weight"], 2 * _params()["0"]["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "p.safetensors"]


def test_the_longest_name_works_and_a_longer_one_fails_before_writing(tmp_path):
    longest = tmp_path / ("n" * (255 - len(".safetensors")) + ".safetensors")
    rf.save(_params(), longest)
    assert _same(rf.load(longest), _params())
    with pytest.raises(OSError, match=r"save: .* the name is 256 bytes long; this file system allows 255"):
        rf.save(_params(), tmp_path / ("n" * 256))
    with pytest.raises(FileNotFoundError, match=r"save: .*: the folder .*nowhere' does not exist"):
        rf.save(_params(), tmp_path / "nowhere" / "p.safetensors")
    with pytest.raises(IsADirectoryError, match=r"save: .* is a folder; expected a file path"):
        rf.save(_params(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [longest.name]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_a_write_removes_the_temporary_file_and_keeps_the_old_one(tmp_path, signum):
    path = tmp_path / "p.txt"
    path.write_text("old")
    script = textwrap.dedent(f"""
        import os, signal
        from rdl_functional._files import atomic_write
        # As in a terminal: a background job may inherit SIGINT ignored, and an ignored signal leaves a write alone.
        signal.signal({int(signum)}, signal.default_int_handler if {int(signum)} == signal.SIGINT else signal.SIG_DFL)
        def write(tmp):
            open(tmp, "w").write("half")
            os.kill(os.getpid(), {int(signum)})
            open(tmp, "a").write(" and more")
        try:
            atomic_write({str(path)!r}, write)
        except KeyboardInterrupt:
            raise SystemExit(130)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, capture_output=True)
    assert done.returncode in (-signum, 130), done.stderr
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_a_failed_write_leaves_nothing(tmp_path):
    def write(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "x.json", write)
    assert list(tmp_path.iterdir()) == []


def test_deep_trees_are_walked_without_recursion_and_refused_by_save_with_a_message(tmp_path):
    deep = leaf = {}
    for _ in range(5000):
        leaf["k"] = {}
        leaf = leaf["k"]
    leaf["w"] = torch.zeros(1)
    flat = rf.tree_flatten(deep)
    assert list(flat) == [".".join(["k"] * 5000 + ["w"])]
    assert rf.tree_difference(deep, rf.tree_unflatten(flat)) is None
    assert len(rf.tree_leaves(rf.tree_map(lambda t: t + 1, deep))) == 1
    with pytest.raises(ValueError, match=r"save: the tree nests deeper than 256 levels"):
        rf.save(deep, tmp_path / "deep.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_two_writers_on_one_path_both_finish_and_neither_removes_the_others_temporary_file(tmp_path):
    # Two runs on one checkpoint path: each write's cleanup of killed writes' leftovers removed the other's
    # temporary file in flight, and that writer died with a FileNotFoundError.
    path = tmp_path / "run.ckpt"
    inside, release, errors = threading.Event(), threading.Event(), []

    def slow(tmp):  # the first writer, held inside its write until the second has written
        Path(tmp).write_text("first")
        inside.set()
        assert release.wait(timeout=60)

    def first():
        try:
            atomic_write(path, slow)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(timeout=60)
        rf.save(_params(), path)  # the second writer, its cleanup run while the first's file is in flight
        assert _same(rf.load(path), _params())
    finally:
        release.set()
        thread.join(timeout=60)
    assert errors == [] and path.read_text() == "first"  # both finished; the last rename wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_a_failed_write_raises_an_oserror_naming_the_file_and_keeps_the_old_one(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()

    def delete_the_folder(tmp):
        Path(tmp).write_text("half")
        for entry in folder.iterdir():
            entry.unlink()
        folder.rmdir()

    with pytest.raises(FileNotFoundError, match=r"save: cannot write '.*gone/p.txt': No such file or directory; "
                                                 r"nothing was written"):
        atomic_write(folder / "p.txt", delete_the_folder, who="save")
    # A file-size limit (EFBIG; SIGXFSZ ignored, as a shell's ulimit -f may leave it): the old file is kept.
    path = tmp_path / "p.safetensors"
    script = textwrap.dedent(f"""
        import resource, signal, torch, rdl_functional as rf
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        rf.save({{"w": torch.ones(4)}}, {str(path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            rf.save({{"w": torch.zeros(10_000)}}, {str(path)!r})
        except OSError as error:
            print(type(error).__name__, error.errno, error)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"OSError 27 save: cannot write {str(path)!r}: File too large; the file there is "
                                   "left as it was")
    assert torch.equal(rf.load(path)["w"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


def test_a_symlink_loop_is_refused_before_any_work_not_replaced_by_a_file(tmp_path):
    loop = tmp_path / "run.ckpt"
    loop.symlink_to(loop.name)  # ln -s run.ckpt run.ckpt
    with pytest.raises(OSError, match=r"save: '.*run.ckpt' is a symlink loop \(a link that leads back to itself\)"):
        rf.save(_params(), loop)
    epochs = []
    x, labels = rf.disc_dataset(40, 0)
    with pytest.raises(OSError, match=r"fit: checkpoint: '.*run.ckpt' is a symlink loop"):
        rf.fit(rf.seed_model(), rf.mse_loss, _params(), x, rf.one_hot(labels, 2), epochs=2, batch_size=20, lr=0.1,
               generator=0, checkpoint=loop, callback=lambda epoch, p, h: epochs.append(epoch))
    assert epochs == [] and loop.is_symlink() and os.readlink(loop) == loop.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]
