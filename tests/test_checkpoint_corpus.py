"""A corpus of corrupted checkpoints: one flipped bit in every tensor entry, and in the length, header and record.

A real checkpoint of an Adam run of a batch-norm model, written inside an
epoch (so params, moments, step count, running statistics, the epoch's
shuffle and the generator's state are all in it), is copied and one bit of
the copy flipped, a fresh copy for each flip. Every copy must be refused by
``read_checkpoint`` with a ValueError that names it (a flip was accepted,
and the run resumed into another, before checkpoints carried a digest);
and for a sample, by ``fit``'s resume too.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

import rdl_functional as rf


def _run(model, params, x, target, path, **kwargs):
    return rf.fit(model, rf.mse_loss, params, x, target, epochs=2, batch_size=16, optimizer=rf.adam(0.01),
                  generator=3, checkpoint=path, checkpoint_every=3, **kwargs)


def _checkpoint(tmp_path):
    x, labels = rf.disc_dataset(64, 0)
    model = rf.compose(rf.linear(2, 6), rf.batch_norm(6), rf.relu, rf.linear(6, 2))
    params = model.init(0)
    path = tmp_path / "good.ckpt"

    def stop(epoch, params, history):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # 4 steps an epoch: the last checkpoint is at step 3, inside epoch 1
        _run(model, params, x, rf.one_hot(labels, 2), path, callback=stop)
    good = rf.read_checkpoint(path)
    assert (good.epochs_done, good.position, good.steps) == (0, 48, 3) and good.order is not None
    assert good.model_state is not None and good.opt_state is not None
    return path, lambda copy: _run(model, params, x, rf.one_hot(labels, 2), copy)


def _entries(data: bytes) -> tuple[int, dict[str, tuple[int, int]]]:
    """The header's length and each tensor's byte range in the file."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    start = 8 + length
    return length, {name: (start + entry["data_offsets"][0], start + entry["data_offsets"][1])
                    for name, entry in header.items() if name != "__metadata__"}


def test_every_flipped_bit_in_a_checkpoint_is_refused_naming_the_file(tmp_path):
    path, resume = _checkpoint(tmp_path)
    data = path.read_bytes()
    length, entries = _entries(data)
    rng = random.Random(16)
    flips: dict[str, list[int]] = {"length": [bit for bit in range(64)]}  # every bit of the header's length
    # Every tensor entry: the first and the last bit, and one at random.
    kinds = {name.split(".")[0] for name in entries}
    assert kinds == {"params", "opt_state", "model_state", "generator", "order"}, kinds
    assert any(name.endswith("count") for name in entries) and any("running_var" in name for name in entries)
    for name, (begin, end) in entries.items():
        flips[name] = [8 * begin, 8 * end - 1, rng.randrange(8 * begin, 8 * end)]
    # The header (the safetensors entries, the tree, the record, the digest and the padding): one bit of every
    # byte, the bit moving along, so every part and every bit position is hit.
    flips["header"] = [8 * at + at % 8 for at in range(8, 8 + length)]
    record_at = data.index(b'"rdl_functional.checkpoint"')
    flips["record"] = [8 * at + bit for at in range(record_at, record_at + 400, 3) for bit in range(8)]
    copy = tmp_path / "corrupted.ckpt"
    copy.write_bytes(data)
    fd = os.open(copy, os.O_WRONLY)  # each flip is made in place and undone after: a fresh copy each time, without
    refused, by_reason, resumed = 0, {"digest": 0, "unreadable": 0, "other": 0}, 0
    total = sum(len(bits) for bits in flips.values())
    for where, bits in flips.items():
        for bit in bits:
            at = bit // 8
            os.pwrite(fd, bytes([data[at] ^ 1 << (bit % 8)]), at)  # rewriting the whole file (3 ms each, here)
            with pytest.raises(ValueError) as caught:
                rf.read_checkpoint(copy)
            message = str(caught.value)
            assert repr(str(copy)) in message and "\n" not in message, (where, bit, message)
            refused += 1
            key = ("digest" if "do not match the digest" in message else
                   "unreadable" if "not a readable safetensors file" in message else "other")
            by_reason[key] += 1
            if refused % 199 == 0:  # a sample goes through fit's resume too, which must refuse it the same way
                with pytest.raises(ValueError, match=repr(str(copy)).replace(".", r"\.")):
                    resume(copy)
                resumed += 1
            os.pwrite(fd, data[at:at + 1], at)
    os.close(fd)
    assert len(entries) == 25 and length > 3000
    assert total > 4000 and refused == total  # 100% of the corrupted copies refused
    assert resumed >= 20
    assert by_reason["digest"] >= 3 * len(entries)  # each tensor flip is caught by the digest
    assert copy.read_bytes() == data  # every flip was undone: the copy reads as the original
    assert torch.equal(rf.read_checkpoint(copy).order, rf.read_checkpoint(path).order)
    print(f"corpus: {total} corrupted copies ({len(entries)} tensor entries, a {length}-byte header), {refused} "
          f"refused ({by_reason}), {resumed} through fit's resume")
