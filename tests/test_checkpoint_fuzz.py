"""Fuzzing the checkpoint reader: damaged, truncated, forged and foreign files.

One real checkpoint (params, an AMSGrad Adam state, Python scalars, nested containers) is mutated
deterministically into at least 100 files of each kind: bit flips in the header (the magic keys
included, one and two flips), bit flips in the data, truncations, and forged headers whose CRC-32
was recomputed (as anyone can): overlapping offsets, a leaf pointing at another tensor, a missing
CRC record, a scalar leaf of the wrong type, a dict with more or fewer keys than children, deep
nesting, huge headers. Every file goes through ``load``, ``load(like=)``, ``inspect`` and the CLI
(``python -m funcopt inspect [--json]`` as a function). The oracle: each either raises
``CheckpointError`` naming the file, or returns exactly what the undamaged file gives (bitwise),
never another exception, never other data.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import zlib
from collections import OrderedDict

import pytest
import torch

import funcopt
import funcopt.checkpoint as ck
from funcopt.__main__ import main as cli
from funcopt.checkpoint import CheckpointError

N = 100  # files per kind


def _tree():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g), "emb": torch.randn(7, 3, generator=g)}
    tx = funcopt.adam(1e-2, amsgrad=True)
    state = tx.init(params)
    grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    _, state = tx.update(grads, state, params)
    return {
        "params": params,
        "opt_state": state,
        "epoch": 3,
        "lr": 0.125,
        "name": "run-7",
        "flag": True,
        "none": None,
        "ints": [torch.arange(5, dtype=torch.int32), torch.tensor([1, -2], dtype=torch.int8)],
        "odict": OrderedDict([("z", torch.ones(2, dtype=torch.float64)), ("a", 1)]),
        "half": torch.randn(4, generator=g).half(),
    }


def _same(a, b) -> bool:
    """Bitwise equality of two pytrees, container types and key order included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _cli(path, *flags):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(["inspect", *flags, str(path)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    tree = _tree()
    f = d / "good.safetensors"
    ck.save(f, tree, metadata={"git": "abc"})
    expected = {
        "load": ck.load(f, mmap=False),
        "like": ck.load(f, like=tree, mmap=False),
        "inspect": ck.inspect(f),
        "cli": _cli(f),
        "cli_json": _cli(f, "--json"),
    }
    assert _same(expected["load"], tree) and _same(expected["like"], tree)
    return d, f.read_bytes(), tree, expected


class Oracle:
    """Runs one file through every entry point and counts the outcomes."""

    def __init__(self, base):
        self.dir, self.data, self.tree, self.expected = base
        self.path = self.dir / "mutant.safetensors"
        self.outcomes = {"error": 0, "same": 0}

    def check(self, data: bytes, what: str) -> None:
        self.path.write_bytes(data)
        p = str(self.path)
        for name, call in (("load", lambda: ck.load(p)), ("like", lambda: ck.load(p, like=self.tree)),
                           ("inspect", lambda: ck.inspect(p))):
            try:
                got = call()
            except CheckpointError as e:
                assert p in str(e), f"{what}: {name} error does not name the file: {e}"
                self.outcomes["error"] += 1
                continue
            except Exception as e:  # noqa: BLE001 - the point of the test
                raise AssertionError(f"{what}: {name} raised {type(e).__name__}: {e}") from e
            ok = (self._same_info(got) if name == "inspect" else _same(got, self.expected[name]))
            assert ok, f"{what}: {name} returned different data without an error"
            self.outcomes["same"] += 1
        for flags, key in (((), "cli"), (("--json",), "cli_json")):
            code, out, err = _cli(p, *flags)
            if code == 1:
                assert out == "" and err.startswith("error: ") and p in err, f"{what}: CLI {flags}: {err!r}"
            else:
                exp_code, exp_out, _ = self.expected[key]
                assert (code, out.replace(p, "X")) == (exp_code, exp_out.replace(str(self.dir / "good.safetensors"), "X")
                                                       .replace(str(len(self.data)), str(len(data)))), what

    def _same_info(self, info) -> bool:
        exp = self.expected["inspect"]
        return (info.funcopt, info.version, info.step, info.metadata, info.leaves) == (
            exp.funcopt, exp.version, exp.step, exp.metadata, exp.leaves)

    def expect_error(self, data: bytes, what: str) -> None:
        before = self.outcomes["same"]
        self.check(data, what)
        assert self.outcomes["same"] == before, f"{what}: a forged file was accepted"


def _split(data: bytes):
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__")
    return header, json.loads(meta["funcopt"]), data[8 + n:]


def _forge(entries: dict, doc, body: bytes, crc: bool = True, extra_meta: dict | None = None) -> bytes:
    """A file with these entries, funcopt document and data, its header CRC recomputed."""
    meta = {"funcopt": doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":")),
            "funcopt.crc32": "00000000", **(extra_meta or {})}
    raw = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
    if crc:
        raw = raw.replace(b'"funcopt.crc32":"00000000"', f'"funcopt.crc32":"{zlib.crc32(raw):08x}"'.encode())
    return len(raw).to_bytes(8, "little") + raw + body


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Damage: bit flips and truncations


def test_header_bit_flips_magic_keys_included(base):
    oracle = Oracle(base)
    data = oracle.data
    n = int.from_bytes(data[:8], "little")
    rng = random.Random(1)
    magic = [i for key in (b'"funcopt"', b'"funcopt.crc32"') for i in range(data.index(key) + 1, data.index(key) + len(key) - 1)]
    flips = [(p, b) for p in magic for b in range(8)]  # every single-bit near miss of both keys
    flips += [(rng.randrange(0, 8 + n), rng.randrange(8)) for _ in range(N)]
    for pos, bit in flips:
        oracle.expect_error(_flip(data, pos, bit), f"header flip at byte {pos} bit {bit}")
    # both magic keys damaged at once: still never read as plain safetensors
    k1, k2 = data.index(b'"funcopt"') + 1, data.index(b'"funcopt.crc32"') + 1
    for _ in range(N):
        mutant = _flip(_flip(data, k1 + rng.randrange(7), rng.randrange(8)), k2 + rng.randrange(13), rng.randrange(8))
        oracle.expect_error(mutant, "two flipped magic keys")
    assert len(flips) >= N and oracle.outcomes["same"] == 0


def test_data_bit_flips(base):
    oracle = Oracle(base)
    data = oracle.data
    start = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(2)
    for _ in range(N):
        pos = start + rng.randrange(len(data) - start)
        oracle.check(_flip(data, pos, rng.randrange(8)), f"data flip at {pos}")
    # load and load(like=) always fail (CRC-32); inspect reads no data and describes the file correctly
    assert oracle.outcomes["error"] >= 2 * N and oracle.outcomes["same"] == N


def test_truncations(base):
    oracle = Oracle(base)
    data = oracle.data
    rng = random.Random(3)
    lengths = sorted(set([0, 1, 7, 8, 9, len(data) - 1] + [rng.randrange(len(data)) for _ in range(2 * N)]))[: N + 6]
    for n in lengths:
        oracle.expect_error(data[:n], f"truncated to {n} bytes")
    oracle.expect_error(data + b"\0", "one trailing byte")
    assert len(lengths) >= N


# ---------------------------------------------------------------------------------------------
# Forged headers (CRC-32 recomputed)


def test_forged_overlapping_and_gapped_offsets(base):
    oracle = Oracle(base)
    entries, doc, body = _split(oracle.data)
    rng = random.Random(4)
    keys = [k for k, e in entries.items() if e["data_offsets"][1] > e["data_offsets"][0]]
    for i in range(N):
        forged = json.loads(json.dumps(entries))
        a, b = rng.sample(keys, 2)
        (a0, a1), (b0, b1) = forged[a]["data_offsets"], forged[b]["data_offsets"]
        mode = i % 4
        if mode == 0:  # a reads b's bytes (the mu['b'] <- nu['b']), a's own bytes left as a gap
            size = a1 - a0
            forged[a]["data_offsets"] = [b0, b0 + size] if b0 + size <= len(body) else [b0 - size, b0]
        elif mode == 1:  # a shifted by a few bytes into its neighbour
            d = rng.choice([-4, -1, 1, 2, 8])
            forged[a]["data_offsets"] = [max(0, a0 + d), max(0, a0 + d) + a1 - a0]
        elif mode == 2:  # a's bytes removed from the body, a aliased to b: a pure overlap, no gap
            size = a1 - a0
            body2 = body[:a0] + body[a1:]
            for e in forged.values():
                o = e["data_offsets"]
                if o[0] >= a1:
                    e["data_offsets"] = [o[0] - size, o[1] - size]
            nb0 = forged[b]["data_offsets"][0]
            if b1 - b0 == size:
                forged[a]["data_offsets"] = [nb0, nb0 + size]
                doc["tensors"][a]["crc32"], saved = doc["tensors"][b]["crc32"], doc["tensors"][a]["crc32"]
                oracle.expect_error(_forge(forged, doc, body2), f"{a} aliased to {b}")
                doc["tensors"][a]["crc32"] = saved
                continue
            forged[a]["data_offsets"] = [nb0, nb0 + size] if nb0 + size <= len(body2) else [0, size]
            oracle.expect_error(_forge(forged, doc, body2), f"{a} overlapping {b}")
            continue
        else:  # a gap: a's end moved, its shape kept
            forged[a]["data_offsets"] = [a0 + 1, a1 + 1]
        oracle.expect_error(_forge(forged, doc, body), f"{a}/{b} offsets, mode {mode}")
    # the same rules hold for plain safetensors files
    for _ in range(N // 4):
        forged = json.loads(json.dumps(entries))
        a, b = rng.sample(keys, 2)
        size = forged[a]["data_offsets"][1] - forged[a]["data_offsets"][0]
        b0 = forged[b]["data_offsets"][0]
        forged[a]["data_offsets"] = [b0, b0 + size]
        raw = json.dumps(forged).encode()
        oracle.expect_error(len(raw).to_bytes(8, "little") + raw + body, "plain file with overlap")


def _tensor_leaves(node, out):
    if node["t"] == "tensor":
        out.append(node)
    for c in node.get("c", []):
        _tensor_leaves(c, out)
    return out


def _scalar_leaves(node, out):
    if node["t"] in ("int", "float", "bool", "str"):
        out.append(node)
    for c in node.get("c", []):
        _scalar_leaves(c, out)
    return out


def _containers(node, out):
    if node["t"] in ("dict", "odict", "namedtuple"):
        out.append(node)
    for c in node.get("c", []):
        _containers(c, out)
    return out


def test_forged_tree_leaves_records_and_scalars(base):
    oracle = Oracle(base)
    entries, doc0, body = _split(oracle.data)
    rng = random.Random(5)
    count = 0
    bad_values = {"int": ["evil", 1.5, [1], {}, None, True, "3"], "float": [[1.0], {}, "x1", None, True, "1e999x"],
                  "bool": [1, "true", None, [True]], "str": [3, None, ["a"], {"a": 1}]}
    for i in range(N):
        # a leaf pointed at another tensor's key
        doc = json.loads(json.dumps(doc0))
        leaves = _tensor_leaves(doc["tree"], [])
        a, b = rng.sample(leaves, 2)
        a["key"] = b["key"]
        oracle.expect_error(_forge(entries, doc, body), "leaf pointing at another key")
        # a CRC record removed (and the data it guarded damaged), or the whole record removed
        doc = json.loads(json.dumps(doc0))
        key = rng.choice(sorted(doc["tensors"]))
        if i % 2:
            del doc["tensors"][key]["crc32"]
        else:
            del doc["tensors"][key]
        o0, o1 = entries[key]["data_offsets"]
        damaged = body if o1 == o0 else _flip(body, rng.randrange(o0, o1), rng.randrange(8))
        oracle.expect_error(_forge(entries, doc, damaged), f"missing CRC record of {key}")
        # a scalar leaf of the wrong type
        doc = json.loads(json.dumps(doc0))
        leaf = rng.choice(_scalar_leaves(doc["tree"], []))
        leaf["v"] = rng.choice(bad_values[leaf["t"]])
        oracle.expect_error(_forge(entries, doc, body), f"{leaf['t']} leaf holding {leaf['v']!r}")
        # a dict/namedtuple whose keys and children disagree
        doc = json.loads(json.dumps(doc0))
        node = rng.choice(_containers(doc["tree"], []))
        labels = node["k"] if "k" in node else node["f"]
        choice = i % 3
        if choice == 0 and labels:
            labels.pop(rng.randrange(len(labels)))
        elif choice == 1:
            labels.append(f"extra{i}")
        elif labels:
            labels.append(labels[0])
            node["c"].append({"t": "none"})
        else:
            labels.append("x")
        oracle.expect_error(_forge(entries, doc, body), "dict key count mismatch")
        count += 4
    # other inconsistencies: unknown node kinds, records disagreeing with entries, newer versions
    for i in range(N // 4):
        doc = json.loads(json.dumps(doc0))
        leaf = rng.choice(_tensor_leaves(doc["tree"], []))
        rec = doc["tensors"][leaf["key"]]
        variant = i % 5
        if variant == 0:
            leaf["t"] = rng.choice(["tensorx", "", None, 7])
        elif variant == 1:
            rec["shape"] = rec["shape"] + [1]
        elif variant == 2:
            rec["dtype"] = rng.choice(["int64", "float16", "nope", 3])
        elif variant == 3:
            rec["device"] = rng.choice([3, "warp:9", ["cpu"]])
        else:
            doc["version"] = rng.choice([2, 99, 0, "1", None])
        oracle.expect_error(_forge(entries, doc, body), f"inconsistent record variant {variant}")
    assert count >= 4 * N


def test_forged_deep_nesting(base):
    oracle = Oracle(base)
    entries, doc0, body = _split(oracle.data)
    rng = random.Random(6)
    for i in range(N):
        depth = rng.choice([129, 200, 900, 3000, 100_000]) if i % 2 else 129 + i
        doc = json.loads(json.dumps(doc0))
        node = {"t": "none"}
        if depth <= 3000:  # a deep but parseable tree: the depth limit refuses it
            for _ in range(depth):
                node = {"t": "list", "c": [node]}
            text = None
            if depth < 900:
                doc["tree"]["k"].append("deep")
                doc["tree"]["c"].append(node)
                text = json.dumps(doc, separators=(",", ":"))
        else:
            text = None
        if text is None:  # JSON itself nested too deeply for any recursive parser
            inner = json.dumps(doc, separators=(",", ":"))
            text = inner[:-1] + ',"deep":' + "[" * depth + "]" * depth + "}"
        oracle.expect_error(_forge(entries, text, body), f"nesting {depth}")
    # deep user metadata (printed by inspect and the CLI): refused too
    for depth in (129, 300, 800):
        doc = json.loads(json.dumps(doc0))
        doc["metadata"] = {"x": json.loads("[" * depth + "]" * depth)}
        oracle.expect_error(_forge(entries, doc, body), f"metadata nesting {depth}")
    # deep JSON in the outer header too
    for depth in (1000, 100_000):
        raw = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
        oracle.expect_error(len(raw).to_bytes(8, "little") + raw, f"outer nesting {depth}")


def test_forged_huge_headers(base):
    oracle = Oracle(base)
    entries, doc0, body = _split(oracle.data)
    rng = random.Random(7)
    patterns = [b"{},", b"[],", b"[[]],", b'{"":{}},', b"[0,[]],"]
    for i in range(N):
        pattern = patterns[i % len(patterns)]
        size = rng.randrange(8 << 10, 64 << 10)
        junk = (pattern * (size // len(pattern)))[:-1].decode()
        if i % 2:  # in the funcopt document (CRC recomputed)
            inner = json.dumps(doc0, separators=(",", ":"))
            text = inner[:-1] + ',"junk":[' + junk + "]}"
            oracle.expect_error(_forge(entries, text, body), f"huge document of {pattern!r}")
        else:  # in the outer header
            raw = ('{"junk":[' + junk + "]}").encode()
            oracle.expect_error(len(raw).to_bytes(8, "little") + raw, f"huge header of {pattern!r}")
    # a header length field beyond the file or beyond the 100 MB limit
    for n in (len(oracle.data), 100 * 1024 * 1024 + 1, 2**63):
        oracle.expect_error(n.to_bytes(8, "little") + oracle.data[8:], f"header length {n}")


def test_foreign_files(base):
    oracle = Oracle(base)
    rng = random.Random(8)
    samples = [b"", b"\x89PNG\r\n\x1a\n" + bytes(100), b"hello world\n" * 10, b'{"a": 1}', b"\x00" * 64,
               (2).to_bytes(8, "little") + b"{}" + b"\x01"]
    samples += [rng.randbytes(rng.randrange(1, 2000)) for _ in range(N)]
    samples += [(len(s)).to_bytes(8, "little") + s for s in (b'{"__metadata__":{"funcopt":"x"}}', b'{"x":1}',
                                                           b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}',
                                                           b'{"x":{"dtype":"F32","shape":[0,4611686018427387903,3],'
                                                           b'"data_offsets":[0,0]}}')]
    for s in samples:
        oracle.expect_error(s, f"foreign file {s[:16]!r}")
    # a plain safetensors file (no funcopt metadata) loads as a flat dict of its tensors
    from safetensors.torch import save_file
    plain = oracle.dir / "plain.safetensors"
    save_file({"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.int64)}, str(plain), metadata={"format": "pt"})
    out = ck.load(plain)
    assert _same(dict(sorted(out.items())), {"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.int64)})
    empty = oracle.dir / "empty.safetensors"
    empty.write_bytes((5).to_bytes(8, "little") + b"{}   ")  # a valid safetensors file without tensors
    assert ck.load(empty) == {} and ck.inspect(empty).leaves == []


def test_parsing_memory_is_a_small_multiple_of_the_file(base, tmp_path):
    import tracemalloc

    entries, doc0, body = _split(base[1])
    inner = json.dumps(doc0, separators=(",", ":"))
    files = {}
    for pattern in (b"{},", b"[], ", b'"ab",', b"1.5,", b'{"a":"b"},'):
        junk = (pattern * ((2 << 20) // len(pattern)))[:-1].decode()
        raw = ('{"junk":[' + junk + "]}").encode()
        files[f"outer {pattern!r}"] = len(raw).to_bytes(8, "little") + raw
        files[f"doc {pattern!r}"] = _forge(entries, inner[:-1] + ',"junk":[' + junk + "]}", body)
    f = tmp_path / "big.safetensors"
    peaks = {}
    for what, data in files.items():
        f.write_bytes(data)
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError):
                ck.inspect(f)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 24 * len(data), f"{what}: peak {peak / len(data):.1f}x the file size"
        peaks[what] = peak / len(data)
    print("parse peak / file size:", {k: round(v, 1) for k, v in peaks.items()})
