"""Operating-system hazards around checkpoint files: a full disk, FIFOs and devices, stale
temporary files, two writers on one CheckpointManager directory, memory-mapped loads."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import funcopt.checkpoint as ck
from funcopt.__main__ import main as cli
from funcopt.checkpoint import CheckpointError, CheckpointManager


def _tree(n: int, value: float = 1.0):
    return {"x": torch.full((n,), value), "count": torch.tensor(3)}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); skipped with the reason otherwise."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_raises_checkpoint_error_and_keeps_the_previous_checkpoint(small_tmpfs):
    f = small_tmpfs / "c.safetensors"
    ck.save(f, _tree(1000, 1.0))  # 4 KB
    before = f.read_bytes()
    with pytest.raises(CheckpointError, match=f"cannot write the checkpoint {f}: .*disk is full.*intact"):
        ck.save(f, _tree(400_000, 2.0))  # 1.6 MB: does not fit
    assert f.read_bytes() == before and os.listdir(small_tmpfs) == ["c.safetensors"]
    assert torch.equal(ck.load(f)["x"], torch.ones(1000))
    # the same through a CheckpointManager: the newest checkpoint stays loadable, nothing is pruned
    mgr = CheckpointManager(small_tmpfs / "run", max_to_keep=1)
    mgr.save(1, _tree(1000, 1.0))
    with pytest.raises(CheckpointError, match="disk is full"):
        mgr.save(2, _tree(400_000, 2.0))
    assert mgr.all_steps() == [1] and torch.equal(mgr.restore()["x"], torch.ones(1000))
    assert sorted(os.listdir(small_tmpfs / "run")) == [".ckpt.lock", "ckpt_0000000001.safetensors"]


def test_other_os_errors_name_the_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "x").write_text("x")  # the rename onto a non-empty directory fails
    with pytest.raises(CheckpointError, match=f"cannot write the checkpoint {target}: .*intact"):
        ck.save(target, _tree(4))
    assert sorted(os.listdir(tmp_path)) == ["taken"] and os.listdir(target) == ["x"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    code = (
        "import sys, funcopt.checkpoint as ck\n"
        "from funcopt.__main__ import main\n"
        f"p = {str(fifo)!r}\n"
        "for call in (lambda: ck.load(p), lambda: ck.load(p, like={'x': 1}), lambda: ck.inspect(p)):\n"
        "    try:\n"
        "        call()\n"
        "    except ck.CheckpointError as e:\n"
        "        assert 'FIFO' in str(e) and p in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "assert main(['inspect', p]) == 1\n"
        "print('ok')\n"
    )
    # a hang would block open(); run in a child with a timeout so the test cannot hang
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    if os.path.exists("/dev/zero"):
        with pytest.raises(CheckpointError, match="is a device"):
            ck.load("/dev/zero")
    assert cli(["inspect", str(tmp_path)]) == 1  # a directory


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_by_the_next_save_and_live_ones_kept(tmp_path):
    from funcopt.checkpoint._files import _HOST

    dead, live = _dead_pid(), os.getppid()
    names = {
        f".a.safetensors.funcopt-tmp-{dead}-{_HOST}-0123abcd": False,  # killed writer on this host: removed
        f".b.safetensors.tmp-{dead}-89abcdef": False,  # a 0.1.0 temporary of a dead process: removed
        f".c.safetensors.funcopt-tmp-{live}-{_HOST}-0123abcd": True,  # a live writer's: kept
        f".d.safetensors.funcopt-tmp-{dead}-00000000-0123abcd": True,  # another host's, recent: kept
        ".e.safetensors.tmp-notours": True,  # not funcopt's pattern: kept
        "notes.txt": True,
    }
    old = f".f.safetensors.funcopt-tmp-{live}-00000000-0123abcd"  # untouched for 2 hours: removed
    for name in [*names, old]:
        (tmp_path / name).write_bytes(b"partial")
    past = time.time() - 7200
    os.utime(tmp_path / old, (past, past))
    ck.save(tmp_path / "new.safetensors", _tree(4))
    kept = set(os.listdir(tmp_path))
    assert kept == {n for n, keep in names.items() if keep} | {"new.safetensors"}
    # a CheckpointManager cleans its directory when created
    (tmp_path / names_dead(dead)).write_bytes(b"partial")
    CheckpointManager(tmp_path)
    assert names_dead(dead) not in os.listdir(tmp_path)


def names_dead(pid: int) -> str:
    from funcopt.checkpoint._files import _HOST

    return f".ckpt_0000000005.safetensors.funcopt-tmp-{pid}-{_HOST}-deadbeef"


_WRITER = """
import sys, time, torch
import funcopt.checkpoint as ck
mgr = ck.CheckpointManager(sys.argv[1], max_to_keep=2)
mgr.save(100, {"x": torch.ones(3)})
print("saved", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_and_readers_keep_working(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved"
        mine = CheckpointManager(tmp_path, max_to_keep=2)
        assert mine.latest_step() == 100 and torch.equal(mine.restore()["x"], torch.ones(3))  # reading works
        with pytest.raises(CheckpointError, match=rf"another writer, process {proc.pid} on host .*holds .*\.ckpt\.lock"):
            mine.save(101, {"x": torch.zeros(3)})
        assert mine.all_steps() == [100]
        other = CheckpointManager(tmp_path, prefix="other")  # another prefix is another lock
        other.save(1, {"x": torch.zeros(3)})
    finally:
        proc.kill()
        proc.wait()
    # the writer died: its lock is stale and the next writer takes it over
    mine.save(101, {"x": torch.zeros(3)})
    assert mine.all_steps() == [100, 101]
    with open(tmp_path / ".ckpt.lock") as f:
        assert f.read().split()[0] == str(os.getpid())
    # two managers in one process (a run restarted in the same interpreter): the newer one takes
    # the lock over, and the older one may no longer save
    second = CheckpointManager(tmp_path, max_to_keep=2)
    second.save(102, {"x": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="newer CheckpointManager .* took over"):
        mine.save(103, {"x": torch.zeros(3)})
    assert second.all_steps() == [101, 102]
    # another process is still refused while the newer manager holds the lock
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, torch, funcopt.checkpoint as ck\n"
        "try:\n    ck.CheckpointManager(sys.argv[1]).save(7, {'x': torch.ones(1)})\n"
        "except ck.CheckpointError as e:\n    print('refused' if 'another writer' in str(e) else e)\n"), str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "refused", probe.stderr[-2000:]
    second.close()
    third = CheckpointManager(tmp_path, max_to_keep=2)
    third.save(104, {"x": torch.zeros(3)})
    assert third.all_steps() == [102, 104]


def test_mapped_loads_are_private_copies(tmp_path):
    f = tmp_path / "m.safetensors"
    tree = {"a": torch.arange(6.0), "b": torch.ones(3, dtype=torch.int8), "c": torch.tensor(2.0, dtype=torch.float64)}
    ck.save(f, tree)
    before = f.read_bytes()
    mapped, copied = ck.load(f), ck.load(f, mmap=False)
    for k in tree:
        assert torch.equal(mapped[k], tree[k]) and torch.equal(copied[k], tree[k])
    mapped["a"].add_(1)  # copy-on-write: the file never changes
    assert f.read_bytes() == before and torch.equal(ck.load(f)["a"], torch.arange(6.0))
    # saving over the file while mapped tensors live is safe (a new file is renamed into place)
    ck.save(f, {"a": torch.zeros(6), "b": torch.zeros(3, dtype=torch.int8), "c": torch.tensor(0.0, dtype=torch.float64)})
    assert torch.equal(mapped["a"], torch.arange(6.0) + 1) and torch.equal(mapped["b"], torch.ones(3, dtype=torch.int8))


def test_saved_tensors_are_aligned_for_mapping(tmp_path):
    import json

    f = tmp_path / "al.safetensors"
    tree = {"i8": torch.ones(3, dtype=torch.int8), "f16": torch.ones(3, dtype=torch.float16),
            "f64": torch.ones(3, dtype=torch.float64), "c128": torch.ones(1, dtype=torch.complex128), "f32": torch.ones(1)}
    ck.save(f, tree)
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert (8 + n) % 8 == 0
    for key, entry in header.items():
        if key != "__metadata__":
            size = {"I8": 1, "F16": 2, "F64": 8, "F32": 4}[entry["dtype"]]
            assert (8 + n + entry["data_offsets"][0]) % size == 0, key
    out = ck.load(f)
    for k in tree:
        assert torch.equal(out[k], tree[k])


def test_save_refuses_trees_deeper_than_the_reader_accepts(tmp_path):
    from funcopt.checkpoint._validate import MAX_DEPTH

    ok = None
    for _ in range(MAX_DEPTH):
        ok = [ok]
    ck.save(tmp_path / "ok.safetensors", ok)
    assert ck.load(tmp_path / "ok.safetensors") == ok
    with pytest.raises(CheckpointError, match=f"nested deeper than {MAX_DEPTH} levels"):
        ck.save(tmp_path / "deep.safetensors", [ok])
    assert not (tmp_path / "deep.safetensors").exists()
    with pytest.raises(CheckpointError, match=f"metadata is nested deeper than {MAX_DEPTH} levels"):
        ck.save(tmp_path / "deep.safetensors", {"a": 1}, metadata={"m": [ok]})
    assert not (tmp_path / "deep.safetensors").exists()


def test_threaded_crc_equals_zlib_and_big_tensors_round_trip(tmp_path):
    import zlib

    from funcopt.checkpoint._crc import CHUNK, crc32, crc32_async, crc32_combine

    rng = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=rng).numpy().tobytes()
    for cut in (0, 1, 7, 500, 999, 1000):
        assert crc32_combine(zlib.crc32(a[:cut]), zlib.crc32(a[cut:]), len(a) - cut) == zlib.crc32(a)
    big = torch.randn(2 * CHUNK // 4 + 13, generator=rng)  # three chunks, the last one short
    view = memoryview(big.numpy()).cast("B")
    assert crc32(view) == crc32_async(view)() == zlib.crc32(view)
    for start in (1, 3, 4097):  # unaligned starts and odd lengths, as slices of a mapped file are
        assert crc32(view[start:-start]) == zlib.crc32(view[start:-start])
    f = tmp_path / "big.safetensors"
    ck.save(f, {"big": big, "small": torch.ones(3)})
    for mmap in (True, False):
        out = ck.load(f, mmap=mmap)
        assert torch.equal(out["big"], big) and torch.equal(out["small"], torch.ones(3))
    data = bytearray(f.read_bytes())
    data[-100] ^= 4  # inside the last chunk of "big" (the data is sorted by element size, "small" is last too)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        ck.load(f)


def test_plain_safetensors_with_misaligned_tensors_load_exactly(tmp_path):
    import json

    a, b = torch.tensor([1, -2, 3], dtype=torch.int8), torch.tensor([0.5, -1.25], dtype=torch.float32)
    header = {"a": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    f = tmp_path / "plain.safetensors"
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + a.numpy().tobytes() + b.numpy().tobytes())
    from safetensors.torch import load_file

    reference = load_file(str(f))  # the safetensors library agrees with the layout
    for mmap in (True, False):
        out = ck.load(f, mmap=mmap)
        assert list(out) == ["a", "b"]
        assert torch.equal(out["a"], a) and torch.equal(out["b"], b) and torch.equal(out["b"], reference["b"])


def test_files_are_the_same_with_the_zlib_fallback(tmp_path, monkeypatch):
    # funcopt computes CRC-32 with ISA-L where isal is installed and with zlib elsewhere: the same
    # bytes on disk either way, and each reads the other's files (corruption still detected)
    import zlib

    from funcopt.checkpoint import _crc

    default_kernel = _crc.crc32_kernel
    tree = {"w": torch.randn(3 * _crc.SHARED_CHUNK // 4 + 5), "b": torch.arange(7.0), "step": 3}
    ck.save(tmp_path / "default.safetensors", tree)
    monkeypatch.setattr(_crc, "crc32_kernel", zlib.crc32)
    ck.save(tmp_path / "zlib.safetensors", tree)
    assert (tmp_path / "default.safetensors").read_bytes() == (tmp_path / "zlib.safetensors").read_bytes()
    assert torch.equal(ck.load(tmp_path / "default.safetensors")["w"], tree["w"])
    raw = bytearray((tmp_path / "zlib.safetensors").read_bytes())
    raw[-100] ^= 1
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    for kernel in (zlib.crc32, default_kernel):
        monkeypatch.setattr(_crc, "crc32_kernel", kernel)
        with pytest.raises(CheckpointError, match="fails its checksum"):
            ck.load(tmp_path / "bad.safetensors")


def test_one_pass_check_names_the_damaged_leaf(tmp_path, monkeypatch):
    # load checks all mapped tensors in one pass of shared chunks before building the tree; a
    # damaged tensor must still be reported at its own path, other sub-trees stay loadable,
    # and a meta-device load reads (and checks) nothing
    import json

    from funcopt.checkpoint import _crc

    monkeypatch.setattr(_crc, "SHARED_CHUNK", 4096)  # many chunks per tensor, tails included
    g = torch.Generator().manual_seed(0)
    tree = {"a": torch.randn(5000, generator=g), "b": {"c": torch.randn(3001, generator=g)},
            "d": torch.randn(7, generator=g)}
    f = tmp_path / "t.safetensors"
    ck.save(f, tree)
    data = bytearray(f.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + header_len])["['b']['c']"]["data_offsets"]
    data[8 + header_len + end - 3] ^= 0x40  # in the last, short chunk of b.c
    f.write_bytes(bytes(data))
    for kwargs in ({}, {"like": tree}, {"mmap": False}):
        with pytest.raises(CheckpointError, match=r"leaf at \['b'\]\['c'\] fails its checksum"):
            ck.load(f, **kwargs)
    assert torch.equal(ck.load(f, paths="a"), tree["a"])
    a, d = ck.load(f, paths=["a", "d"], like=[tree["a"], tree["d"]])
    assert torch.equal(a, tree["a"]) and torch.equal(d, tree["d"])
    assert ck.load(f, device="meta")["b"]["c"].is_meta


def test_a_busy_pool_does_not_hold_up_a_load():
    # the CRC pool may be busy with a save's checksums; a load's chunks then run on the caller
    # alone, and it returns without waiting for the queued helpers
    import threading
    import zlib

    from funcopt.checkpoint import _crc

    pool = _crc._pool()
    if pool is None:
        pytest.skip("one CPU: no pool")
    gate = threading.Event()
    blockers = [pool.submit(gate.wait, 30) for _ in range(_crc._workers())]
    try:
        data = memoryview(torch.randint(0, 256, (3 * _crc.SHARED_CHUNK + 5,), dtype=torch.uint8).numpy())
        result = []
        worker = threading.Thread(target=lambda: result.append(_crc.crc32_many([data[:100], data[100:]])))
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "crc32_many waited for helpers that never started"
        assert result[0] == [zlib.crc32(data[:100]), zlib.crc32(data[100:])]
    finally:
        gate.set()
        for b in blockers:
            b.result()


def test_an_interrupt_or_an_error_ends_the_checksum_pass_at_once(monkeypatch):
    # Ctrl-C in the caller's own chunk stops the pass (no thread takes another chunk) instead of
    # waiting for every remaining chunk; a worker's error is re-raised to the caller
    import threading
    import zlib

    from funcopt.checkpoint import _crc

    class Interrupt(BaseException):
        pass

    main, calls = threading.get_ident(), []

    def slow(view):
        calls.append(1)
        time.sleep(0.02)
        if threading.get_ident() == main and len(calls) > 4:
            raise Interrupt
        return zlib.crc32(view)

    monkeypatch.setattr(_crc, "SHARED_CHUNK", 1024)
    monkeypatch.setattr(_crc, "crc32_kernel", slow)
    data = memoryview(bytes(300 * 1024))
    start = time.perf_counter()
    with pytest.raises(Interrupt):
        _crc.crc32_many([data])
    assert time.perf_counter() - start < 2.0  # 300 chunks of 20 ms would take 3 s or more
    time.sleep(0.1)
    assert len(calls) < 40

    def broken(view):
        raise ValueError("disk went away")

    monkeypatch.setattr(_crc, "crc32_kernel", broken)
    with pytest.raises(ValueError, match="disk went away"):
        _crc.crc32_many([data])
