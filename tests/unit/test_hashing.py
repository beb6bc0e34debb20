import dataclasses
import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from engine.hashing import (
    BLOCK_ID_VERSION,
    KVFingerprint,
    block_hashes,
    next_block_hash,
    root_hash,
)

FP = KVFingerprint("smollm2-135m", "ab" * 32, "bf16", 1, "fp8_e4m3", 16)


def spec_fingerprint(fp: KVFingerprint) -> bytes:
    # docs/block-id.md, written out independently of the implementation.
    fields = [
        f"baton-block-id-v{BLOCK_ID_VERSION}",
        fp.model_id,
        fp.weights_digest,
        fp.kv_dtype,
        str(fp.kv_layout_version),
        fp.prefill_quant,
        str(fp.block_size),
    ]
    raw = b"".join(struct.pack("<I", len(f.encode())) + f.encode() for f in fields)
    return hashlib.sha256(raw).digest()


def test_matches_the_written_spec():
    tokens = list(range(1000, 1040))  # two full blocks and a partial one
    root = hashlib.sha256(spec_fingerprint(FP) + b"tenant-a").digest()
    h0 = hashlib.sha256(root + struct.pack("<16I", *tokens[:16])).digest()
    h1 = hashlib.sha256(h0 + struct.pack("<16I", *tokens[16:32])).digest()
    assert FP.digest == spec_fingerprint(FP)
    assert block_hashes(FP, tokens, salt=b"tenant-a") == [h0, h1]


def test_documented_test_vector():
    # The vector printed in docs/block-id.md, so another engine can check itself.
    fp = KVFingerprint("example-model", "00" * 32, "bf16", 1, "none", 16)
    hashes = block_hashes(fp, list(range(32)))
    doc = (Path(__file__).parents[2] / "docs" / "block-id.md").read_text()
    assert fp.hex in doc
    assert hashes[0].hex() in doc and hashes[1].hex() in doc


def test_deterministic_across_processes():
    code = (
        "from engine.hashing import *;"
        "fp = KVFingerprint('m', 'ff'*32, 'bf16', 1, 'none', 16);"
        "print(block_hashes(fp, list(range(48)))[-1].hex())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2)
    }
    fp = KVFingerprint("m", "ff" * 32, "bf16", 1, "none", 16)
    assert outs == {block_hashes(fp, list(range(48)))[-1].hex() + "\n"}


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_id", "other"),
        ("weights_digest", "cd" * 32),
        ("kv_dtype", "fp8_e4m3"),
        ("kv_layout_version", 2),
        ("prefill_quant", "none"),
        ("block_size", 32),
    ],
)
def test_every_fingerprint_field_matters(field, value):
    assert dataclasses.replace(FP, **{field: value}).digest != FP.digest


def test_salt_separates_tenants_and_chains_separate_prefixes():
    tokens = list(range(64))
    a, b = block_hashes(FP, tokens, b"a"), block_hashes(FP, tokens, b"b")
    assert not set(a) & set(b)
    other = block_hashes(FP, [7, *tokens[1:]])
    assert all(x != y for x, y in zip(a, other, strict=True))
    assert block_hashes(FP, tokens[:15]) == []
    assert len(block_hashes(FP, tokens[:47])) == 2


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="u32"):
        next_block_hash(root_hash(FP), [2**32] + [0] * 15)
    with pytest.raises(ValueError, match="32 bytes"):
        next_block_hash(b"short", [0] * 16)
    with pytest.raises(ValueError, match="block_size"):
        KVFingerprint("m", "d", "bf16", 1, "none", 0)
