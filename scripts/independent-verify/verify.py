#!/usr/bin/env python3
"""Independent verifier of a cardvault audit trail export.

Written from the byte layouts documented in README.md ("Audit trail",
"Verifying independently") only, not from the Rust sources, so that it can
disagree with `vault-audit verify` if either is wrong.

    verify.py --key FILE [--key FILE ...] --export FILE

A key file holds lines `cardvault-audit-ed25519:<64 hex>` (blank lines and
lines starting with `#` are skipped). Exit status, as `vault-audit verify`:
0 every entry is covered by a checkpoint that verified; 3 the chain verifies
but the last entries come after the last checkpoint; 1 verification failed
(including entries and no checkpoint at all); 2 usage or input error.
"""

import argparse
import hashlib
import json
import re
import struct
import sys
from datetime import datetime, timezone

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

KEY_PREFIX = "cardvault-audit-ed25519:"
EVENT_FIELDS = ["time", "principal", "source", "action", "tenant", "token",
                "outcome", "error_code", "request_id", "reason", "detail"]
ENTRY_FIELDS = ["type", "seq", "event", "leaf_hash", "chain_hash"]
CHECKPOINT_FIELDS = ["type", "tree_size", "root", "chain_head", "time", "key_id"]
ANCHOR_FIELDS = ["type", "tree_size", "chain_head", "frontier"]
TIME_RE = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?Z")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Failed(Exception):
    """The trail does not verify (exit 1)."""


def sha256(*parts):
    return hashlib.sha256(b"".join(parts)).digest()


# --- Values as the export spells them --------------------------------------

def hex32(value, what):
    if not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
        raise Failed(f"{what} is not 64 lowercase hex digits")
    return bytes.fromhex(value)


def uint64(value, what):
    if type(value) is not int or not 0 <= value < 2**64:
        raise Failed(f"{what} is not an unsigned 64-bit integer")
    return value


def time_ns(value, what):
    """RFC 3339 in UTC, up to 9 fractional digits -> ns since the epoch."""
    m = TIME_RE.fullmatch(value) if isinstance(value, str) else None
    if not m:
        raise Failed(f"{what} is not an RFC 3339 UTC time")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    try:
        seconds = (datetime(y, mo, d, h, mi, s, tzinfo=timezone.utc) - EPOCH)
    except ValueError:
        raise Failed(f"{what} is not a valid date and time") from None
    fraction = int((m.group(7) or "").ljust(9, "0"))
    return (seconds.days * 86400 + seconds.seconds) * 10**9 + fraction


def public_key(line, what):
    if not (line.startswith(KEY_PREFIX) and re.fullmatch(r"[0-9a-f]{64}", line[len(KEY_PREFIX):])):
        raise Failed(f"{what} is not `{KEY_PREFIX}<64 hex>`")
    raw = bytes.fromhex(line[len(KEY_PREFIX):])
    return sha256(raw)[:8].hex(), raw


def utf8(text, what):
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise Failed(f"{what} is not valid Unicode") from None


def fields(record, names, what):
    if list(record) != names:
        raise Failed(f"{what}: fields {list(record)}, expected {names}")


# --- The trail's hashes -----------------------------------------------------

def put(value):
    """One field of the canonical event: 0x00 absent, else 0x01 || u32 len || bytes."""
    if value is None:
        return b"\x00"
    return b"\x01" + struct.pack(">I", len(value)) + value


def leaf_hash(seq, event, what):
    fields(event, EVENT_FIELDS, f"{what}, event")
    out = [b"cardvault/audit-event/v1",
           put(time_ns(event["time"], f"{what}, time").to_bytes(16, "big", signed=True))]
    for name in EVENT_FIELDS[1:]:
        value = event[name]
        required = name in ("action", "outcome")
        if not (isinstance(value, str) or (value is None and not required)):
            raise Failed(f"{what}: event field {name} is not a string")
        out.append(put(None if value is None else utf8(value, f"{what}, {name}")))
    return sha256(b"\x00", b"cardvault/audit-leaf/v1", struct.pack(">Q", seq), *out)


def chain_hash(previous, leaf):
    return sha256(b"cardvault/audit-chain/v1", previous, leaf)


class Tree:
    """RFC 6962 Merkle tree, kept as the roots of its perfect subtrees."""

    def __init__(self, size=0, nodes=()):
        # One node per set bit of size, largest subtree first.
        sizes = [1 << b for b in range(63, -1, -1) if size >> b & 1]
        if len(sizes) != len(nodes):
            raise Failed(f"the anchor's frontier does not fit its tree size {size}")
        self.stack = list(zip(sizes, nodes))

    def push(self, leaf):
        self.stack.append((1, leaf))
        while len(self.stack) > 1 and self.stack[-1][0] == self.stack[-2][0]:
            (n, left), (_, right) = self.stack[-2:]
            self.stack[-2:] = [(2 * n, sha256(b"\x01", left, right))]

    def root(self):
        if not self.stack:
            return sha256()
        root = self.stack[-1][1]
        for _, node in reversed(self.stack[:-1]):
            root = sha256(b"\x01", node, root)
        return root


# --- Checkpoints and keys ---------------------------------------------------

def signed_bytes(c):
    key_id = utf8(c["key_id"], "key_id")
    body = (struct.pack(">Q", c["tree_size"]) + c["root"] + c["chain_head"]
            + c["time"].to_bytes(16, "big", signed=True)
            + struct.pack(">I", len(key_id)) + key_id)
    if c["next_key"] is None:
        return b"cardvault/audit-checkpoint/v1" + body
    return b"cardvault/audit-checkpoint/v2" + body + c["next_key"][1]


def parse_checkpoint(record, what):
    names = CHECKPOINT_FIELDS + (["next_key"] if "next_key" in record else []) + ["signature"]
    fields(record, names, what)
    if not isinstance(record["key_id"], str):
        raise Failed(f"{what}: key_id is not a string")
    sig = record["signature"]
    if not (isinstance(sig, str) and re.fullmatch(r"[0-9a-f]{128}", sig)):
        raise Failed(f"{what}: signature is not 128 lowercase hex digits")
    next_key = record.get("next_key")
    return {
        "tree_size": uint64(record["tree_size"], f"{what}: tree_size"),
        "root": hex32(record["root"], f"{what}: root"),
        "chain_head": hex32(record["chain_head"], f"{what}: chain_head"),
        "time": time_ns(record["time"], f"{what}: time"),
        "key_id": record["key_id"],
        "next_key": None if next_key is None else public_key(next_key, f"{what}: next_key"),
        "signature": bytes.fromhex(sig),
    }


class Keys:
    """Trusted keys: the auditor's, then those announced along the trail."""

    def __init__(self, given):
        self.keys = dict(given)   # key id -> 32-byte public key
        self.retired = {}         # key id -> tree size of its announcement
        self.successor = {}       # key id -> the key id it announced
        self.handovers = []

    def check(self, c):
        size, key_id = c["tree_size"], c["key_id"]
        if key_id not in self.keys:
            raise Failed(f"the checkpoint for {size} entries is signed by key {key_id}, "
                         "which was neither given nor announced by a trusted key")
        if key_id in self.retired and size > self.retired[key_id]:
            raise Failed(f"the checkpoint for {size} entries is signed by key {key_id}, "
                         f"which handed over at {self.retired[key_id]} entries")
        if c["next_key"] is not None and self.successor.get(key_id, c["next_key"][0]) != c["next_key"][0]:
            raise Failed(f"the checkpoint for {size} entries announces a second successor of key "
                         f"{key_id}, which handed over at {self.retired[key_id]} entries")
        try:
            Ed25519PublicKey.from_public_bytes(self.keys[key_id]).verify(c["signature"], signed_bytes(c))
        except (InvalidSignature, ValueError):
            raise Failed(f"the checkpoint for {size} entries has an invalid signature") from None

    def accept(self, c):
        """After signature, root and chain head all verified."""
        if c["next_key"] is None or c["next_key"][0] == c["key_id"]:
            return
        new_id, raw = c["next_key"]
        self.keys.setdefault(new_id, raw)
        self.retired.setdefault(c["key_id"], c["tree_size"])
        self.successor.setdefault(c["key_id"], new_id)
        self.handovers.append(f"signing key {c['key_id']} handed over to {new_id} "
                              f"at {c['tree_size']} entries")


def read_keys(paths):
    given = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines = [l.strip() for l in f if l.strip() and not l.strip().startswith("#")]
        if not lines:
            raise ValueError(f"{path}: no key line")
        for line in lines:
            try:
                key_id, raw = public_key(line, f"{path}: key line")
            except Failed as e:
                raise ValueError(str(e)) from None
            given[key_id] = raw
    return given


# --- The pass over the export -----------------------------------------------

def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise Failed("a field appears twice")
    return dict(pairs)


def verify(lines, keys):
    """Returns (entries, checkpoints verified, last seq, anchored, root)."""
    size, head, tree, anchored = 0, bytes(32), Tree(), 0
    pending = {}   # tree size -> checkpoints not yet checked
    entries = verified = 0

    def check_due():
        nonlocal verified, anchored
        due = pending.pop(size, [])
        root = tree.root()
        while due:
            # Checkpoints of keys already trusted first: one may announce another's key.
            c = next((c for c in due if c["key_id"] in keys.keys), due[0])
            due.remove(c)
            keys.check(c)
            if c["root"] != root or c["chain_head"] != head:
                raise Failed(f"the signed checkpoint for {size} entries does not match their "
                             f"Merkle root or chain head: entries after {anchored} were rewritten")
            keys.accept(c)
            verified += 1
            anchored = size

    for number, line in enumerate(lines, 1):
        what = f"line {number}"
        try:
            record = json.loads(line, object_pairs_hook=no_duplicates)
        except ValueError:
            raise Failed(f"{what} is not JSON") from None
        if not isinstance(record, dict) or next(iter(record), None) != "type":
            raise Failed(f"{what} does not start with a type field")
        kind = record["type"]
        if kind == "anchor":
            if number != 1:
                raise Failed(f"{what}: an anchor is valid only as the first line")
            fields(record, ANCHOR_FIELDS, what)
            size = anchored = uint64(record["tree_size"], f"{what}: tree_size")
            head = hex32(record["chain_head"], f"{what}: chain_head")
            if not isinstance(record["frontier"], list):
                raise Failed(f"{what}: frontier is not a list")
            tree = Tree(size, [hex32(n, f"{what}: frontier") for n in record["frontier"]])
        elif kind == "checkpoint":
            c = parse_checkpoint(record, what)
            if c["tree_size"] < size:
                raise Failed(f"{what}: the checkpoint for {c['tree_size']} entries comes after entry {size}")
            queue = pending.setdefault(c["tree_size"], [])
            if c not in queue:
                queue.append(c)
        elif kind == "entry":
            fields(record, ENTRY_FIELDS, what)
            check_due()
            seq = uint64(record["seq"], f"{what}: seq")
            if seq != size + 1:
                raise Failed(f"{what}: entry {seq} where entry {size + 1} was expected "
                             "(an entry was removed, inserted or moved)")
            if not isinstance(record["event"], dict):
                raise Failed(f"{what}: event is not an object")
            leaf = leaf_hash(seq, record["event"], f"entry {seq}")
            if leaf != hex32(record["leaf_hash"], f"{what}: leaf_hash"):
                raise Failed(f"entry {seq} was changed: it does not hash to its leaf hash")
            chained = chain_hash(head, leaf)
            if chained != hex32(record["chain_hash"], f"{what}: chain_hash"):
                raise Failed(f"entry {seq}: its chain hash does not follow from entry {seq - 1}")
            size, head = seq, chained
            tree.push(leaf)
            entries += 1
        else:
            raise Failed(f"{what}: unknown record type {kind!r}")
    check_due()
    if pending:
        beyond = max(pending)
        raise Failed(f"a checkpoint covers {beyond} entries but the trail ends at entry {size}: "
                     "it was truncated (or the checkpoint is forged)")
    return entries, verified, size, anchored, tree.root()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", "--public-key", action="append", required=True, metavar="PUBKEY_FILE")
    parser.add_argument("--export", required=True, metavar="FILE")
    args = parser.parse_args()
    try:
        keys = Keys(read_keys(args.key))
        with open(args.export, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        print(f"verify.py: error: {e}", file=sys.stderr)
        return 2
    try:
        if data and not data.endswith(b"\n"):
            raise Failed("the last line does not end in a newline: the file was cut")
        try:
            lines = data.decode("utf-8").split("\n")[:-1]
        except UnicodeDecodeError:
            raise Failed("the export is not UTF-8") from None
        entries, verified, last, anchored, root = verify(lines, keys)
    except Failed as e:
        print(f"verification FAILED: {e}")
        return 1
    print(f"verified {entries} entries and {verified} checkpoints "
          f"(root {root.hex()}, last seq {last}, anchored at {anchored})")
    for h in keys.handovers:
        print(h)
    if entries == 0:
        return 0
    if verified == 0:
        print(f"verification FAILED: {entries} entries and no signed checkpoint")
        return 1
    if anchored < last:
        print(f"not covered: {last - anchored} entries ({anchored + 1} to {last}) "
              "come after the last signed checkpoint")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
