"""peftlab.cache: tensors computed once per fingerprint, stored atomically, damaged files named."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from peftlab import PeftlabError
from peftlab.cache import cached_tensors, file_digest, fingerprint_digest, state_digest, stored_fingerprint
from peftlab.fileio import unfinished_writes

FINGERPRINT = {"model": "abc", "data": ["a.tsv", "b.tsv"], "settings": {"temperature": 2.0}}


class Counted:
    """A compute function that counts its calls and returns a different tensor each time."""

    def __init__(self):
        self.calls = 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"values": torch.full((3, 2), float(self.calls)), "index": torch.arange(3)}


def test_computed_once_then_read_back_bitwise(tmp_path):
    path, compute = tmp_path / "cache" / "entry.safetensors", Counted()
    first = cached_tensors(path, FINGERPRINT, compute)
    again = cached_tensors(path, dict(reversed(FINGERPRINT.items())), compute)  # key order does not matter
    assert compute.calls == 1
    assert set(again) == {"values", "index"} and torch.equal(again["values"], first["values"])
    assert again["index"].dtype == torch.int64 and torch.equal(again["index"], torch.arange(3))
    assert stored_fingerprint(path) == FINGERPRINT


def test_a_changed_input_recomputes_and_replaces_the_entry(tmp_path):
    path, compute = tmp_path / "entry.safetensors", Counted()
    cached_tensors(path, FINGERPRINT, compute)
    changed = FINGERPRINT | {"settings": {"temperature": 1.0}}
    assert cached_tensors(path, changed, compute)["values"][0, 0] == 2 and compute.calls == 2
    assert stored_fingerprint(path) == changed  # one entry per path: the old one is gone
    assert cached_tensors(path, FINGERPRINT, compute)["values"][0, 0] == 3 and compute.calls == 3
    assert sorted(item.name for item in tmp_path.iterdir()) == ["entry.safetensors"]


@pytest.mark.parametrize("keep_bytes", [0, 6, 40, -4])
def test_a_damaged_file_is_an_error_naming_it_and_the_fix(tmp_path, keep_bytes):
    path, compute = tmp_path / "entry.safetensors", Counted()
    cached_tensors(path, FINGERPRINT, compute)
    damaged = path.read_bytes()[:keep_bytes]  # truncated: empty, inside the length, inside the header, the data
    path.write_bytes(damaged)
    with pytest.raises(PeftlabError, match=rf"cannot read the cache {path}.*Fix: delete {path}"):
        cached_tensors(path, FINGERPRINT, compute)
    assert compute.calls == 1 and path.read_bytes() == damaged  # neither recomputed nor overwritten


def test_a_fingerprint_that_does_not_match_its_checksum_is_damage(tmp_path):
    path = tmp_path / "entry.safetensors"
    cached_tensors(path, FINGERPRINT, Counted())
    data = path.read_bytes().replace(b"temperature", b"temperaturE")  # one flipped byte in the stored fingerprint
    path.write_bytes(data)
    with pytest.raises(PeftlabError, match=r"entry\.safetensors is damaged: its fingerprint does not match"):
        cached_tensors(path, FINGERPRINT, Counted())


def test_a_safetensors_file_without_a_fingerprint_is_stale(tmp_path):
    path, compute = tmp_path / "entry.safetensors", Counted()
    save_file({"values": torch.zeros(1)}, path)  # e.g. a cache written by an older peftlab
    assert stored_fingerprint(path) is None
    assert cached_tensors(path, FINGERPRINT, compute)["values"].shape == (3, 2) and compute.calls == 1
    assert stored_fingerprint(path) == FINGERPRINT


def test_a_failed_computation_or_write_leaves_no_file_and_keeps_the_old_entry(tmp_path):
    path, compute = tmp_path / "entry.safetensors", Counted()

    def failing() -> dict[str, torch.Tensor]:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        cached_tensors(path, FINGERPRINT, failing)
    assert list(tmp_path.iterdir()) == []
    cached_tensors(path, FINGERPRINT, compute)
    before = path.read_bytes()
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors that share memory: fails inside the write
        cached_tensors(path, {"other": 1}, lambda: {"a": shared, "b": shared})
    assert path.read_bytes() == before and unfinished_writes(path) == []
    assert cached_tensors(path, FINGERPRINT, compute)["values"][0, 0] == 1 and compute.calls == 1


def test_fingerprint_digest_is_the_sha256_of_canonical_json():
    expected = hashlib.sha256(b'{"a":[1,2],"b":"x"}').hexdigest()
    assert fingerprint_digest({"b": "x", "a": (1, 2)}) == expected


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_bytes(b"x" * (3 << 20))  # several read blocks
    assert file_digest(path) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()


def test_state_digest_changes_with_any_weight_and_not_otherwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    digest = state_digest(model)
    copy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    copy.load_state_dict(model.state_dict())
    assert state_digest(copy) == digest and len(digest) == 64
    with torch.no_grad():
        copy[1].bias[2] = torch.nextafter(copy[1].bias[2], torch.tensor(1.0))  # one ulp in one value
    assert state_digest(copy) != digest
    assert state_digest(model.to(torch.bfloat16)) not in (digest, state_digest(copy))  # bfloat16 bytes hash too
