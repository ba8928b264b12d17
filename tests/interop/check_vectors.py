#!/usr/bin/env python3
"""Checks docs/protocol.md section 9 with an independent Noise implementation.

It reads the test vectors from the document itself (not from the Rust code), rebuilds every frame
with the `noiseprotocol` package following only the document's rules, and compares bytes. Exit 0 and
one line 'N passed, 0 failed' when all match.

    pip install noiseprotocol && python3 tests/interop/check_vectors.py
"""
import re
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives import serialization
from noise.connection import Keypair, NoiseConnection

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = "Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"relay-gateway/e2e/1"


def vectors():
    doc = (ROOT / "docs" / "protocol.md").read_text()
    section = doc.split("## 9. Test vectors", 1)[1].split("## 10.", 1)[0]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    return {k.strip(): bytes.fromhex(v.strip()) for k, v in (l.split("=") for l in block.strip().splitlines())}


def public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def main() -> int:
    v = vectors()
    results = []

    def check(name, got):
        ok = got == v[name]
        results.append(ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
        if not ok:
            print(f"     want {v[name].hex()}\n     got  {got.hex()}")

    check("device_static_public", public(v["device_static_private"]))
    check("core_static_public", public(v["core_static_private"]))

    dev = NoiseConnection.from_name(PROTOCOL.encode())
    dev.set_as_initiator()
    dev.set_prologue(PROLOGUE)
    dev.set_keypair_from_private_bytes(Keypair.STATIC, v["device_static_private"])
    dev.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, v["core_static_public"])
    dev.set_keypair_from_private_bytes(Keypair.EPHEMERAL, v["device_ephemeral_private"])
    dev.start_handshake()

    core = NoiseConnection.from_name(PROTOCOL.encode())
    core.set_as_responder()
    core.set_prologue(PROLOGUE)
    core.set_keypair_from_private_bytes(Keypair.STATIC, v["core_static_private"])
    core.set_keypair_from_private_bytes(Keypair.EPHEMERAL, v["core_ephemeral_private"])
    core.start_handshake()

    # 3.1 HandshakeInit: version | type | sender | Noise message 1 carrying the 4.1 payload.
    init_payload = bytes([1]) + struct.pack(">Q", 1700000000000)
    msg1 = dev.write_message(init_payload)
    check("handshake_init", bytes([1, 1]) + struct.pack(">I", 7) + msg1)
    assert core.read_message(msg1) == init_payload

    # 3.2 HandshakeResponse: version | type | receiver | sender | Noise message 2 with 4.2 payload.
    resp_payload = bytes([1]) + struct.pack(">I", 3600)
    msg2 = core.write_message(resp_payload)
    check("handshake_response", bytes([1, 2]) + struct.pack(">II", 7, 0x01000001) + msg2)
    assert dev.read_message(msg2) == resp_payload

    # 3.3 Transport: version | type | receiver | counter | ciphertext; 4.3 Reading and Ack.
    reading = bytes([1]) + struct.pack(">Q", 1) + b"kwh=000123.4"
    check("transport_reading_seq1", bytes([1, 3]) + struct.pack(">IQ", 0x01000001, 0) + dev.encrypt(reading))
    ack = bytes([2, 1]) + struct.pack(">Q", 1)
    check("transport_ack_seq1", bytes([1, 3]) + struct.pack(">IQ", 7, 0) + core.encrypt(ack))

    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
