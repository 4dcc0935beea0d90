"""
End-to-end tests of snapshots: `keyledger snapshot` writes the state at the
head of the log; the daemon starts from the newest snapshot that is whole
and chains to the log, replaying only what came after; a damaged or foreign
snapshot is skipped (with a warning) and the whole log is replayed.

Run: KL_BUILD_DIR=build python3 tests/e2e/test_snapshot.py [name-substring...]
"""

import glob
import os
import shutil
import sys

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect  # noqa: E402


def _build(env):
    """Users, a service account with keys, revocations, usage: a state
    with a bit of everything."""
    c = env.client()
    u = expect(c.post("/v1/org/users", {"email": "m@example.com", "role": "manager"}),
               201).json
    sa = expect(c.post("/v1/service-accounts", {"name": "ci-bot"}), 201).json
    keys = [h.create_key(c, "k%d" % i)[0]["id"] for i in range(5)]
    sk = expect(c.post("/v1/service-accounts/%s/api-keys" % sa["id"],
                       {"name": "sa key", "rate_limit": {"requests_per_day": 100}}),
                201).json
    expect(c.post("/v1/api-keys/%s/revoke" % keys[0], {"comment": "old"}), 200)
    expect(c.delete("/v1/api-keys/%s" % keys[1]), 204)
    expect(c.post("/v1/keys/verify", {"key": sk["key"]}), 200)
    expect(c.patch("/v1/org/users/%s" % u["id"], {"role": "member"}), 200)
    return c


def _views(env):
    """Every GET whose answer the state decides, except what each walk
    itself changes: the walking key's last_used_at and the usage events
    its calls add to the history."""
    c = env.client()
    out = {}
    for path in ("/v1/org", "/v1/org/users", "/v1/service-accounts",
                 "/v1/api-keys?include_revoked=true&limit=500",
                 "/v1/audit-events?limit=500", "/v1/org/usage-limits"):
        body = expect(c.get(path), 200).json
        for k in body.get("api_keys", []):
            if k["id"] == env.info["key_id"]:
                k.pop("last_used_at", None)
        if "events" in body:
            body["events"] = [e for e in body["events"]
                              if e["type"] not in ("UsageRecorded", "AuthFailed")]
            body.pop("next_cursor")
        out[path] = body
    return out


def _snapshot(data):
    res = h.run_tool("snapshot", "--data", data)
    eq(res.rc, 0, "keyledger snapshot: " + res.describe())
    return res.json()


def test_start_from_a_snapshot_and_its_tail():
    env = h.Env(config={"usage_flush_ms": 50})
    _build(env)
    env.stop()
    snap = _snapshot(env.data)
    check(os.path.exists(os.path.join(env.data, snap["snapshot"])), "snapshot file")
    env.start()
    check("loaded the snapshot of seq %d" % snap["seq"] in env.daemon.stderr_text(),
          "the daemon started from the snapshot: " + env.daemon.stderr_text())
    c = env.client()
    h.create_key(c, "after the snapshot")
    before = _views(env)
    env.stop()
    env.start()
    check("loaded the snapshot of seq %d" % snap["seq"] in env.daemon.stderr_text(),
          "started from the snapshot again")
    eq(_views(env), before, "every view after a start from the snapshot and its tail")
    env.stop()
    # The same state from the whole log.
    os.remove(os.path.join(env.data, snap["snapshot"]))
    env.start()
    check("replayed" in env.daemon.stderr_text(), "a full replay without it")
    eq(_views(env), before, "the same state from the whole log")
    h.verify_ok(env.data)


def test_snapshot_refused_while_the_daemon_runs():
    env = h.Env()
    res = h.run_tool("snapshot", "--data", env.data)
    eq(res.rc, 1, "snapshot while the daemon holds the lock: " + res.describe())
    check("in use" in res.stderr, "the message names the lock: " + res.stderr)
    eq(glob.glob(os.path.join(env.data, "snapshot-*")), [], "no snapshot written")
    eq(h.run_tool("snapshot").rc, 2, "no --data is bad usage")


def test_damaged_snapshot_is_skipped():
    env = h.Env()
    _build(env)
    before = _views(env)
    env.stop()
    snap = _snapshot(env.data)
    path = os.path.join(env.data, snap["snapshot"])
    size = os.path.getsize(path)
    for where in (10, 80, size // 2, size - 1):
        saved = open(path, "rb").read()
        h.flip_byte(path, where)
        env.start()
        err = env.daemon.stderr_text()
        check("replayed" in err and "loaded the snapshot" not in err,
              "a damaged snapshot (byte %d) is not used: %s" % (where, err))
        check("snapshot" in err and "warn" in err, "and the log says why: " + err)
        eq(_views(env), before, "the state from the whole log (byte %d)" % where)
        env.stop()
        with open(path, "wb") as f:
            f.write(saved)
    env.start()
    check("loaded the snapshot" in env.daemon.stderr_text(), "the repaired one is used")


def test_damaged_newest_snapshot_falls_back_to_an_older_one():
    """The payload's checksum is checked beside the loading: a newest
    snapshot that loads but fails it is dropped for the one before it."""
    env = h.Env()
    _build(env)
    env.stop()
    older = _snapshot(env.data)
    env.start()
    h.create_key(env.client(), "after the first snapshot")
    env.stop()
    newer = _snapshot(env.data)
    check(newer["seq"] > older["seq"], "two snapshots: %r %r" % (older, newer))
    env.start()
    before = _views(env)
    env.stop()
    path = os.path.join(env.data, newer["snapshot"])
    h.flip_byte(path, os.path.getsize(path) - 3)    # inside the last entity
    env.start()
    err = env.daemon.stderr_text()
    check("loaded the snapshot of seq %d" % older["seq"] in err,
          "started from the older snapshot: " + err)
    check("checksum" in err and "warn" in err, "and the log says why: " + err)
    eq(_views(env), before, "the state is the same")


def test_foreign_snapshot_is_skipped():
    """A snapshot of another log with the same number of records (a copy
    from the wrong data dir) does not chain to this log: not used."""
    a = h.Env(start=False)
    b = h.Env(start=False, org="Other Org", email="o@example.net")
    a.start()
    h.create_key(a.client(), "a")
    before = _views(a)
    a.stop()
    b.start()
    h.create_key(b.client(), "b")
    b.stop()
    snap_a = _snapshot(a.data)
    snap_b = _snapshot(b.data)
    os.remove(os.path.join(a.data, snap_a["snapshot"]))
    if snap_b["seq"] <= snap_a["seq"]:
        shutil.copy(os.path.join(b.data, snap_b["snapshot"]), a.data)
    a.start()
    err = a.daemon.stderr_text()
    check("loaded the snapshot" not in err, "a foreign snapshot is not used: " + err)
    eq(_views(a), before, "the state from the log itself")


def test_verify_checks_snapshots():
    """An edited snapshot whose checksums were fixed up passes the start's
    checks but not `keyledger verify`, which rebuilds the state at the
    snapshot's seq and compares byte for byte, naming the file."""
    env = h.Env()
    c = env.client()
    h.create_key(c, "alpha-key")
    env.stop()
    snap = _snapshot(env.data)
    h.verify_ok(env.data)
    path = os.path.join(env.data, snap["snapshot"])
    d = bytearray(open(path, "rb").read())
    at = d.find(b"alpha-key")
    check(at > 72, "the key's name is in the payload")
    d[at] = ord("A")
    struct_put = lambda off, v: d.__setitem__(slice(off, off + 4), v.to_bytes(4, "little"))
    struct_put(64, h.crc32c(bytes(d[72:])))
    struct_put(68, h.crc32c(bytes(d[:68])))
    with open(path, "wb") as f:
        f.write(d)
    res = h.run_tool("verify", "--data", env.data)
    eq(res.rc, 1, "verify of an edited snapshot: " + res.describe())
    check(snap["snapshot"] in res.stderr, "the message names the snapshot: " + res.stderr)



def test_older_snapshot_format_is_named():
    """A snapshot in a format this build does not write (an older one's):
    the start replays the log instead, and `keyledger verify` says which
    file and what to do, not that it was edited."""
    env = h.Env()
    h.create_key(env.client(), "k")
    before = _views(env)
    env.stop()
    snap = _snapshot(env.data)
    path = os.path.join(env.data, snap["snapshot"])
    d = bytearray(open(path, "rb").read())
    eq(d[72 + 1:72 + 17], b"\xafkeyledger-state", "the payload starts with its magic")
    eq(d[72 + 17], 2, "format 2")
    d[72 + 17] = 1
    struct_put = lambda off, v: d.__setitem__(slice(off, off + 4), v.to_bytes(4, "little"))
    struct_put(64, h.crc32c(bytes(d[72:])))
    struct_put(68, h.crc32c(bytes(d[:68])))
    with open(path, "wb") as f:
        f.write(d)
    env.start()
    err = env.daemon.stderr_text()
    check("replayed" in err and "format" in err, "started from the log: " + err)
    eq(_views(env), before, "the same state")
    env.stop()
    res = h.run_tool("verify", "--data", env.data)
    eq(res.rc, 1, "verify: " + res.describe())
    check(snap["snapshot"] in res.stderr and "format 1" in res.stderr and
          "keyledger snapshot" in res.stderr, "names the file and the fix: " + res.stderr)

if __name__ == "__main__":
    h.main(globals())
