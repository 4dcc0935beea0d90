"""
End-to-end tests of the auditors' tools: `keyledger replay` (the log's
events as JSON lines, the audit API's shape and bytes, oldest first) and
`keyledger state --at TIME` (the projection as it stood at TIME).

replay is checked against GET /v1/audit-events (every page, both orgs,
byte for byte through format=jsonl), while the daemon runs and writes, with
each filter, on bad arguments and on a damaged log. state is checked
against what the API answered at moments between changes: snapshots of
users, service accounts and keys (revoked included), each followed by the
wall time, compared field by field with `state --at` that time.

Run: KL_BUILD_DIR=build python3 tests/e2e/test_audit_tools.py [name-substring...]
"""

import json
import os
import shutil
import sys
import threading
import time

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, fail  # noqa: E402

AUDIT = "/v1/audit-events"
USERS = "/v1/org/users"
U = "/v1/org/users/%s"
SAS = "/v1/service-accounts"
SA = "/v1/service-accounts/%s"
KEYS = "/v1/api-keys"
K = "/v1/api-keys/%s"
LIMITS = "/v1/org/usage-limits"
VERIFY = "/v1/keys/verify"
ZERO_ORG = "org_" + "0" * 26
FAST = {"usage_flush_ms": 100}          # usage and refusals reach the log soon
QUIET = {"usage_flush_ms": 3600000}     # nothing but our own writes
GAP = 0.02                              # between a change and a snapshot


def unknown_org():
    """A well-formed org id no daemon issued (the first of the 26 characters
    carries 3 bits: 0-7)."""
    return "org_0" + h.random_id("org")[5:]


# --------------------------------------------------------------------------
# Helpers

def replay(data, *args, ok=True):
    """Runs `keyledger replay`; returns (raw lines, parsed events)."""
    res = h.run_tool("replay", "--data", data, *args)
    if not ok:
        return res
    eq(res.rc, 0, "replay exit status: " + res.describe())
    lines = res.stdout.split("\n")
    eq(lines[-1], "", "replay output ends with a newline")
    lines = lines[:-1]
    events = []
    for ln in lines:
        try:
            events.append(json.loads(ln))
        except ValueError as e:
            fail("replay line is not JSON (%s): %r" % (e, ln))
    return lines, events


def state(data, at, *args):
    res = h.run_tool("state", "--data", data, "--at", at, *args)
    eq(res.rc, 0, "state exit status: " + res.describe())
    out = res.json()
    check(isinstance(out, dict) and set(out) == {"at", "seq", "orgs"},
          "state must be {at, seq, orgs}: " + res.describe())
    return out


def api_lines(c):
    """Every event of the caller's org, oldest first, as the API's jsonl
    lines, following Next-Cursor (limit 500)."""
    out = []
    cursor = None
    for _ in range(1000):
        q = {"limit": "500", "format": "jsonl"}
        if cursor is not None:
            q["cursor"] = cursor
        r = expect(c.get(AUDIT, query=q, validate=False), 200)
        eq((r.header("Content-Type") or "").split(";")[0], "application/x-ndjson",
           "jsonl content type")
        body = r.body.decode("utf-8")
        check(body == "" or body.endswith("\n"), "jsonl body ends with a newline")
        out.extend(body.split("\n")[:-1])
        cursor = r.header("Next-Cursor")
        if cursor is None:
            out.reverse()
            return out
    fail("audit-event pagination did not end")


def api_events(c):
    """Every event of the caller's org, oldest first (format=json)."""
    out = []
    cursor = None
    for _ in range(1000):
        q = {"limit": "500"}
        if cursor is not None:
            q["cursor"] = cursor
        body = expect(c.get(AUDIT, query=q), 200).json
        out.extend(body["events"])
        cursor = body["next_cursor"]
        if cursor is None:
            out.reverse()
            return out
    fail("audit-event pagination did not end")


def list_pages(c, path, field, extra=None):
    out = []
    cursor = None
    for _ in range(1000):
        q = {"limit": "500"}
        if extra:
            q.update(extra)
        if cursor is not None:
            q["cursor"] = cursor
        body = expect(c.get(path, query=q), 200).json
        out.extend(body[field])
        cursor = body["next_cursor"]
        if cursor is None:
            return out
    fail("%s pagination did not end" % path)


def create_sa(c, name):
    return expect(c.post(SAS, {"name": name}), 201).json


def mint(c, path, name, **fields):
    body = {"name": name}
    body.update(fields)
    return expect(c.post(path + "/api-keys", body), 201).json


def busy_history(env, other):
    """A bit of everything in both orgs, including refusals that name no
    key (AuthFailed of no org) and usage; waits for those to be logged."""
    c1, c2 = env.client(), h.Client(env.port, other["key"])
    v = h.Client(env.port, None)
    u = expect(c1.post(USERS, {"email": "m@example.com", "role": "manager"}), 201).json
    sa = create_sa(c1, "ingest")
    ks = mint(c1, SA % sa["id"], "sa key",
              permissions={"access": "flows", "flows": ["ingest"]})
    ku = mint(c1, U % u["id"], "user key")
    k1, s1 = h.create_key(c1, "k1", description="first", rate_limit={
        "requests_per_minute": 100})
    k2, _ = h.create_key(c2, "other org key", environment="test")
    expect(c1.patch(K % k1["id"], {"name": "k1 renamed"}), 200)
    expect(c1.post(K % k1["id"] + "/regenerate", {"grace_period_seconds": 60}), 200)
    expect(c1.patch(U % u["id"], {"role": "member"}), 200)
    expect(c1.put(LIMITS, {"requests_per_day": 1000}), 200)
    expect(v.post(VERIFY, {"key": ks["key"], "flow": "ingest"}), 200)
    expect(v.post(VERIFY, {"key": ks["key"], "flow": "other"}), 200)
    expect(v.post(VERIFY, {"key": "kl_live_nonsense"}), 200)
    expect(v.post(VERIFY, {"key": h.make_secret("0" + h.random_id("key")[5:], "A" * 40)}),
           200)
    expect(c1.patch(SA % sa["id"], {"is_active": False}), 200)
    expect(c1.post(K % ku["id"] + "/revoke", {"comment": "rotated"}), 200)
    expect(c1.delete(K % ku["id"]), 204)
    expect(c1.delete(U % u["id"]), 204)
    expect(c1.delete(SA % sa["id"]), 204)
    expect(c2.post(K % k2["id"] + "/revoke", {}), 200)
    # Usage and refusals are written at the next flush.
    h.wait_until(lambda: any(e["type"] == "AuthFailed" and e["org_id"] == ZERO_ORG
                             for e in replay(env.data)[1]) and
                 any(e["type"] == "UsageRecorded" for e in replay(env.data)[1]),
                 10, 0.1, "usage and refusals in the log")
    # Every request counts as usage of its key, so with FAST flushes the
    # log would grow under the comparisons: go on without them.
    env.restart(config=QUIET)
    return env.client(), h.Client(env.port, other["key"])


def two_orgs(config=FAST):
    env = h.Env(start=False, config=config)
    other = h.org_create(env.data, org="Globex", email="hank@globex.example")
    env.start()
    return env, other


def check_gapless(events, first=1):
    eq([e["seq"] for e in events], list(range(first, first + len(events))),
       "replay seqs")


# --------------------------------------------------------------------------
# replay

def test_replay_matches_the_audit_api():
    env, other = two_orgs()
    c1, c2 = busy_history(env, other)
    lines, events = replay(env.data)
    check_gapless(events)
    by_org = {}
    for ln, e in zip(lines, events):
        by_org.setdefault(e["org_id"], []).append(ln)
    eq(set(by_org), {env.info["org_id"], other["org_id"], ZERO_ORG},
       "orgs in replay")
    for c, org in ((c1, env.info["org_id"]), (c2, other["org_id"])):
        eq(api_lines(c), by_org[org], "org %s: API jsonl lines (reversed) vs "
           "replay lines" % org)
        eq(api_events(c), [json.loads(x) for x in by_org[org]],
           "org %s: API events (reversed) vs replay" % org)
    # Refusals that named no key belong to no org: the zero id, no target.
    for ln in by_org[ZERO_ORG]:
        e = json.loads(ln)
        eq(e["type"], "AuthFailed", "type of an event of no org")
        check("target" not in e, "event of no org with a target: %s" % ln)
    # Compact, one object a line, the API's key order.
    eq(list(events[0]), ["seq", "id", "type", "category", "occurred_at", "org_id",
                         "actor", "target", "data", "hash"], "key order")
    for ln in lines:
        eq(ln, json.dumps(json.loads(ln), separators=(",", ":"),
                          ensure_ascii=False), "a replay line, compact")
    # The newest hash is the chain head that verify and the API report.
    head = expect(c1.get(AUDIT + "/head"), 200).json
    eq({"seq": events[-1]["seq"], "hash": events[-1]["hash"]}, head,
       "last replayed event vs /v1/audit-events/head")
    env.stop()
    v = h.verify_ok(env.data)
    lines2, events2 = replay(env.data)
    eq(lines2[:len(lines)], lines, "replay after stop starts with the same lines")
    eq((v["head_seq"], v["head_hash"]), (events2[-1]["seq"], events2[-1]["hash"]),
       "verify's head vs the last replayed event")


def test_replay_while_the_daemon_writes():
    env = h.Env(config=QUIET)
    c = env.client()
    stop = threading.Event()
    errors = []

    def writer():
        wc = h.Client(env.port, env.key)
        i = 0
        try:
            while not stop.is_set():
                k, _ = h.create_key(wc, "busy-%d" % i)
                expect(wc.post(K % k["id"] + "/revoke", {}), 200)
                i += 1
        except BaseException as e:      # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    runs = []
    try:
        deadline = time.time() + 2.0
        while time.time() < deadline and not errors:
            acked = expect(c.get(AUDIT + "/head"), 200).json["seq"]
            lines, events = replay(env.data)
            check(len(events) >= acked, "replay printed %d events but %d were "
                  "acknowledged before it started" % (len(events), acked))
            check_gapless(events)
            runs.append(lines)
    finally:
        stop.set()
        t.join(30)
    if errors:
        raise errors[0]
    check(len(runs) >= 3, "only %d replays ran" % len(runs))
    check(len(runs[-1]) > len(runs[0]), "the log did not grow during the test")
    final, _ = replay(env.data)
    for lines in runs:
        eq(final[:len(lines)], lines, "an earlier replay is a prefix of the last")
    env.stop()
    h.verify_ok(env.data)


def test_replay_filters():
    env, other = two_orgs()
    busy_history(env, other)
    env.stop()
    lines, events = replay(env.data)
    n = len(events)
    check(n >= 20, "history too short: %d events" % n)
    pairs = list(zip(lines, events))

    def want(pred):
        return [ln for ln, e in pairs if pred(e)]

    eq(replay(env.data, "--from", "5")[0], want(lambda e: e["seq"] >= 5), "--from 5")
    eq(replay(env.data, "--from", "0")[0], lines, "--from 0")
    eq(replay(env.data, "--from", str(n + 10))[0], [], "--from past the end")
    eq(replay(env.data, "--until", "7")[0], want(lambda e: e["seq"] < 7),
       "--until 7 (exclusive)")
    eq(replay(env.data, "--from", "4", "--until", "9")[0],
       want(lambda e: 4 <= e["seq"] < 9), "--from 4 --until 9")
    # Half-open ranges tile the log.
    mid = n // 2
    eq(replay(env.data, "--until", str(mid))[0] + replay(env.data, "--from", str(mid))[0],
       lines, "--until m then --from m")
    # A time: events that occurred before it (exclusive, like the API).
    t = events[mid]["occurred_at"]
    got = replay(env.data, "--until", t)[0]
    eq(got, want(lambda e: e["occurred_at"] < t), "--until %s" % t)
    check(got and len(got) < n, "--until %s should cut the log somewhere" % t)
    # The same instant written with an offset.
    t_epoch = h.parse_time(t)
    off = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_epoch + 3600)) + \
        ".%03d+01:00" % round((t_epoch % 1) * 1000)
    eq(replay(env.data, "--until", off)[0], got, "--until %s" % off)
    for typ in ("KeyRevoked", "AuthFailed", "UsageRecorded", "OrgCreated"):
        got = replay(env.data, "--type", typ)[0]
        check(got, "no %s events" % typ)
        eq(got, want(lambda e: e["type"] == typ), "--type %s" % typ)
    eq(replay(env.data, "--type", "SessionDeleted")[0], [], "a type never written")
    for org in (env.info["org_id"], other["org_id"]):
        eq(replay(env.data, "--org", org)[0], want(lambda e: e["org_id"] == org),
           "--org %s" % org)
    eq(replay(env.data, "--org", unknown_org())[0], [], "--org of no org")
    got = replay(env.data, "--org", env.info["org_id"], "--type", "KeyCreated",
                 "--from", "3", "--until", str(n - 2))[0]
    eq(got, want(lambda e: e["org_id"] == env.info["org_id"] and
                 e["type"] == "KeyCreated" and 3 <= e["seq"] < n - 2),
       "filters together")
    check(got, "filters together matched nothing")


def test_bad_arguments_exit_2():
    env = h.Env(start=False)
    d = env.data
    cases = [
        ["replay"],
        ["replay", "--data"],
        ["replay", "--data", d, "stray"],
        ["replay", "--data", d, "--bogus"],
        ["replay", "--data", d, "--from", "x"],
        ["replay", "--data", d, "--from", "-1"],
        ["replay", "--data", d, "--from", ""],
        ["replay", "--data", d, "--from", "99999999999999999999999"],
        ["replay", "--data", d, "--until", "yesterday"],
        ["replay", "--data", d, "--until", "2026-13-01T00:00:00Z"],
        ["replay", "--data", d, "--until", ""],
        ["replay", "--data", d, "--type", "KeyExploded"],
        ["replay", "--data", d, "--type", "keycreated"],
        ["replay", "--data", d, "--org", env.info["user_id"]],
        ["replay", "--data", d, "--org", "org_123"],
        ["state"],
        ["state", "--data", d],
        ["state", "--at", "2026-01-15T10:30:00Z"],
        ["state", "--data", d, "--at", "noon"],
        ["state", "--data", d, "--at", "2026-01-15"],
        ["state", "--data", d, "--at", "2026-01-15T10:30:00Z", "--org", "acme"],
        ["state", "--data", d, "--at", "2026-01-15T10:30:00Z", "stray"],
        ["state", "--data", d, "--at", "2026-01-15T10:30:00Z", "--from", "1"],
    ]
    for args in cases:
        res = h.run_tool(*args)
        eq(res.rc, 2, "exit status for bad usage: " + res.describe())
        check(res.stderr.strip(), "bad usage without a message: " + res.describe())
        eq(res.stdout, "", "bad usage printed on stdout: " + res.describe())
    res = h.run_tool("replay", "--data", d, "--type", "KeyExploded")
    check("KeyCreated" in res.stderr, "unknown type message should list the "
          "types: " + res.describe())
    # User-facing failures are 1: no log there, no such org.
    missing = os.path.join(env.root, "nope")
    for args in (["replay", "--data", missing],
                 ["state", "--data", missing, "--at", "2026-01-15T10:30:00Z"]):
        res = h.run_tool(*args)
        eq(res.rc, 1, "on a missing data dir: " + res.describe())
        check(res.stderr.strip(), "no message: " + res.describe())
    res = h.run_tool("state", "--data", d, "--at", h.fmt_time(time.time() + 5),
                     "--org", unknown_org())
    eq(res.rc, 1, "state of an unknown org: " + res.describe())
    check("no such organization" in res.stderr, res.describe())
    check(not os.path.exists(missing), "a tool created the data dir")


def test_damaged_log_exits_1_naming_segment_and_offset():
    env, other = two_orgs(config=QUIET)
    c1 = env.client()
    for i in range(5):
        h.create_key(c1, "k-%d" % i)
    env.stop()
    full, _ = replay(env.data)
    seg = h.parse_log(env.data)[-1]
    check(len(seg.records) >= 10, "want at least 10 records")

    # A flipped byte inside a record with good ones after it: damage.
    root, data = h.copy_data(env.data)
    rec = seg.records[4]
    h.flip_byte(os.path.join(data, seg.name), rec.offset + 8 + rec.length // 2, 0x01)
    for args in (["replay", "--data", data],
                 ["state", "--data", data, "--at", h.fmt_time(time.time())]):
        res = h.run_tool(*args)
        eq(res.rc, 1, "on a damaged log: " + res.describe())
        check(seg.name in res.stderr, "message should name segment %s: %s"
              % (seg.name, res.describe()))
        check(rec.offset in h.numbers_in(res.stderr.replace(seg.name, "")),
              "message should name offset %d: %s" % (rec.offset, res.describe()))
    h.remove_tree(root)

    # A record changed with its CRC made good: only the chain shows it, at
    # the next record, whose prev no longer matches. What came before is
    # printed; the exit status says the output is incomplete.
    root, data = h.copy_data(env.data)
    path = os.path.join(data, seg.name)
    with open(path, "r+b") as f:
        raw = bytearray(f.read())
        org_rec = seg.records[3]        # OrgCreated of Globex
        at = raw.find(b"Globex", org_rec.offset + 8, org_rec.end)
        check(at > 0, "Globex not found in record 4")
        raw[at] = ord("X")
        payload = bytes(raw[org_rec.offset + 8:org_rec.end])
        raw[org_rec.offset + 4:org_rec.offset + 8] = h.crc32c(payload).to_bytes(4, "little")
        f.seek(0)
        f.write(raw)
    res = replay(data, ok=False)
    eq(res.rc, 1, "replay of a broken chain: " + res.describe())
    nxt = seg.records[4]
    check(seg.name in res.stderr and nxt.offset in h.numbers_in(
        res.stderr.replace(seg.name, "")),
        "message should name %s offset %d: %s" % (seg.name, nxt.offset,
                                                  res.describe()))
    out = res.stdout.split("\n")[:-1]
    eq(out[:3], full[:3], "records before the change")
    eq(len(out), 4, "lines printed before the chain broke")
    eq(json.loads(out[3])["data"]["name"], "Xlobex", "the changed record as read")
    ver = h.run_tool("verify", "--data", data)
    eq(ver.rc, 1, "verify agrees the chain is broken: " + ver.describe())
    eq((ver.json()["segment"], ver.json()["offset"]), (seg.name, nxt.offset),
       "verify's place vs replay's")
    res = h.run_tool("state", "--data", data, "--at", h.fmt_time(time.time()))
    eq(res.rc, 1, "state of a broken chain: " + res.describe())
    h.remove_tree(root)

    # A torn tail (what a crash mid-write leaves, and the daemon cuts): the
    # whole records are printed and nothing else.
    root, data = h.copy_data(env.data)
    with open(os.path.join(data, seg.name), "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00")
    eq(replay(data)[0], full, "replay with a torn tail")
    h.remove_tree(root)


# --------------------------------------------------------------------------
# state --at

def snapshot(c):
    """What the API shows now, then the time (after the answers)."""
    snap = {
        "org": expect(c.get("/v1/org"), 200).json,
        "users": list_pages(c, USERS, "users"),
        "service_accounts": list_pages(c, SAS, "service_accounts"),
        "api_keys": list_pages(c, KEYS, "api_keys", {"include_revoked": "true"}),
    }
    snap["at"] = h.fmt_time(time.time())
    time.sleep(GAP)
    return snap


def no_last_used(objs):
    out = []
    for o in objs:
        o = dict(o)
        o.pop("last_used_at", None)
        out.append(o)
    return out


def compare(data, snap, org_id, deleted_keys, deleted_sas):
    """state --at snap's time vs what the API showed then."""
    st = state(data, snap["at"])
    eq(st["at"], snap["at"], "state's at")
    orgs = {o["org"]["id"]: o for o in st["orgs"]}
    check(org_id in orgs, "org %s missing from state at %s" % (org_id, snap["at"]))
    o = orgs[org_id]
    eq(set(o), {"org", "users", "service_accounts", "api_keys"}, "org entry fields")
    eq(o["org"], snap["org"], "org at %s" % snap["at"])
    eq(o["users"], snap["users"], "users at %s" % snap["at"])
    live_sas = [s for s in o["service_accounts"] if not s.get("deleted")]
    gone_sas = [s for s in o["service_accounts"] if s.get("deleted")]
    eq(live_sas, snap["service_accounts"], "service accounts at %s" % snap["at"])
    eq(sorted(s["id"] for s in gone_sas), sorted(deleted_sas),
       "deleted service accounts at %s" % snap["at"])
    for s in gone_sas:
        eq(s["deleted"], True, "deleted marker")
        eq(s["is_active"], False, "is_active of a deleted service account")
    live = [k for k in o["api_keys"] if not k.get("deleted")]
    gone = [k for k in o["api_keys"] if k.get("deleted")]
    eq(no_last_used(live), no_last_used(snap["api_keys"]),
       "keys at %s" % snap["at"])
    eq(sorted(k["id"] for k in gone), sorted(deleted_keys),
       "deleted keys at %s" % snap["at"])
    ids = [k["id"] for k in o["api_keys"]]
    eq(ids, sorted(ids), "keys in id order")
    for k in gone:
        eq(k["is_active"], False, "is_active of a deleted key")
    # The scoped view is the same org entry.
    eq(state(data, snap["at"], "--org", org_id)["orgs"], [o], "--org %s" % org_id)
    return st


def key_in(st, org_id, key_id):
    for o in st["orgs"]:
        if o["org"]["id"] == org_id:
            for k in o["api_keys"]:
                if k["id"] == key_id:
                    return k
    fail("key %s not in state at %s" % (key_id, st["at"]))


def test_state_at_matches_what_the_api_showed():
    env, other = two_orgs(config=QUIET)
    org = env.info["org_id"]
    c = env.client()
    snaps = [snapshot(c)]                                       # 0: as init left it
    u = expect(c.post(USERS, {"email": "m@example.com", "role": "manager"}), 201).json
    sa = create_sa(c, "ingest")
    sa2 = create_sa(c, "batch")
    ks = mint(c, SA % sa["id"], "sa key")
    ku = mint(c, U % u["id"], "user key")
    exp = time.time() + 3.0
    kx, _ = h.create_key(c, "short-lived", expires_at=h.fmt_time(exp))
    k1, _ = h.create_key(c, "k1")
    k2, _ = h.create_key(c, "k2")
    time.sleep(GAP)
    snaps.append(snapshot(c))                                   # 1: created
    expect(c.patch(K % k1["id"], {"name": "k1 renamed", "rate_limit": {
        "requests_per_minute": 60}}), 200)
    expect(c.post(K % k2["id"] + "/revoke", {"comment": "leaked"}), 200)
    expect(c.patch(U % u["id"], {"role": "member"}), 200)
    expect(c.put(LIMITS, {"requests_per_minute": 500}), 200)
    time.sleep(GAP)
    snaps.append(snapshot(c))                                   # 2: changed
    expect(c.patch(SA % sa["id"], {"is_active": False}), 200)
    expect(c.delete(U % u["id"]), 204)
    expect(c.delete(K % k1["id"]), 204)
    time.sleep(GAP)
    snaps.append(snapshot(c))                                   # 3: disabled
    check(h.parse_time(snaps[3]["at"]) < exp - 0.3,
          "the machine is too slow: snapshot 3 came too close to the expiry")
    time.sleep(max(0.0, exp + 0.3 - time.time()))
    snaps.append(snapshot(c))                                   # 4: expired
    expect(c.delete(SA % sa["id"]), 204)
    expect(c.delete(SA % sa2["id"]), 204)                       # while active
    time.sleep(GAP)
    snaps.append(snapshot(c))                                   # 5: sas deleted

    deleted_keys = [[], [], [], [k1["id"]], [k1["id"]], [k1["id"]]]
    deleted_sas = [[], [], [], [], [], [sa["id"], sa2["id"]]]
    _, events = replay(env.data)
    results = []
    for i, snap in enumerate(snaps):
        st = compare(env.data, snap, org, deleted_keys[i], deleted_sas[i])
        # Every event up to the last one at or before the time.
        eq(st["seq"], max(e["seq"] for e in events if e["occurred_at"] <= snap["at"]),
           "seq of state at snapshot %d" % i)
        results.append(st)

    # What changed, as the auditor sees it.
    s1, s2, s3, s4, s5 = results[1:]
    eq(key_in(s1, org, ks["id"])["is_active"], True, "sa key at 1")
    eq(key_in(s3, org, ks["id"])["is_active"], False, "sa key after deactivation")
    eq(key_in(s3, org, ks["id"])["status"], "active", "sa key status after deactivation")
    eq(key_in(s3, org, ku["id"])["is_active"], False, "user key after removal")
    eq(key_in(s1, org, k2["id"])["status"], "active", "k2 before revocation")
    eq(key_in(s2, org, k2["id"])["status"], "revoked", "k2 after revocation")
    eq(key_in(s2, org, k2["id"])["revoked_comment"], "leaked", "revoked_comment")
    eq(key_in(s3, org, k1["id"])["name"], "k1 renamed", "deleted key's last name")
    eq(key_in(s5, org, ks["id"])["status"], "revoked", "sa key after sa deletion")
    # A deleted account stopped when it was deleted, if not before.
    gone = {x["id"]: x for x in s5["orgs"][0]["service_accounts"]}
    eq(gone[sa2["id"]]["deactivated_at"], gone[sa2["id"]]["updated_at"],
       "deactivated_at of an account deleted while active")
    check(gone[sa["id"]]["deactivated_at"] < gone[sa["id"]]["updated_at"],
          "deactivated_at of an account deactivated, then deleted: %r"
          % gone[sa["id"]])
    # The key that expired between snapshots 3 and 4.
    for st, status, active in ((s1, "active", True), (s3, "active", True),
                               (s4, "expired", False), (s5, "expired", False)):
        k = key_in(st, org, kx["id"])
        eq((k["status"], k["is_active"]), (status, active),
           "short-lived key at %s (expires %s)" % (st["at"], k["expires_at"]))
    # Exactly at its expiry it is expired; a millisecond before, active.
    exp_at = kx["expires_at"]
    k = key_in(state(env.data, h.fmt_time(h.parse_time(exp_at) - 0.001)), org, kx["id"])
    eq((k["status"], k["is_active"]), ("active", True), "a ms before expires_at")
    k = key_in(state(env.data, exp_at), org, kx["id"])
    eq((k["status"], k["is_active"]), ("expired", False), "at expires_at")

    # Both orgs, in creation order; the other org unchanged by ours.
    eq([o["org"]["id"] for o in s5["orgs"]], [org, other["org_id"]], "orgs")
    c2 = h.Client(env.port, other["key"])
    eq(no_last_used(s5["orgs"][1]["api_keys"]), no_last_used(h.list_all(c2)),
       "the other org's keys")
    # Before the other org existed: not in the state, and --org says so.
    before = h.fmt_time(h.parse_time(s5["orgs"][1]["org"]["created_at"]) - 0.001)
    eq([o["org"]["id"] for o in state(env.data, before)["orgs"]], [org],
       "orgs before the second was created")
    res = h.run_tool("state", "--data", env.data, "--at", before, "--org",
                     other["org_id"])
    eq(res.rc, 1, "state --org before the org existed: " + res.describe())
    check("no such organization at that time" in res.stderr, res.describe())
    # Before anything: nothing.
    eq(state(env.data, "2000-01-01T00:00:00Z"),
       {"at": "2000-01-01T00:00:00.000Z", "seq": 0, "orgs": []}, "state in 2000")
    # And the same answers after the daemon stops (the lock changes nothing).
    env.stop()
    eq(state(env.data, snaps[2]["at"]), results[2], "state at 2 after stop")


def test_state_last_used_at_from_usage_recorded():
    env = h.Env(config=FAST)
    c = env.client()
    k, secret = h.create_key(c, "used")
    time.sleep(GAP)
    t0 = h.fmt_time(time.time())
    time.sleep(GAP)
    expect(h.Client(env.port, None).post(VERIFY, {"key": secret}), 200)
    h.wait_until(lambda: replay(env.data, "--type", "UsageRecorded")[1], 10, 0.1,
                 "usage in the log")
    env.stop()
    rec = replay(env.data, "--type", "UsageRecorded")[1][-1]
    after = state(env.data, rec["occurred_at"])
    check("last_used_at" not in key_in(state(env.data, t0), env.info["org_id"],
                                       k["id"]),
          "last_used_at before any use")
    got = key_in(after, env.info["org_id"], k["id"])
    eq(got.get("last_used_at"), rec["data"]["usage"].get("last_used_at"),
       "last_used_at once UsageRecorded is folded")


if __name__ == "__main__":
    h.main(globals())
