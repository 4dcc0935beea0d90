"""
End-to-end durability tests (contract section 5): kill -9 under concurrent
writes, clean restarts, torn tails, damage in earlier segments and in the
middle of the last one, the data-dir lock, and a full disk.

The on-disk layout these tests read and damage: segment files
NNNNNNNNNNNNNNNNNNNN.log with a 64-byte header, then records
`u32 length | u32 CRC-32C(payload) | payload` (see harness.parse_segment).
A record is located by the ids its payload mentions: msgpack stores strings
as raw UTF-8, so a key id appears verbatim in the record that created it.

Run: KL_BUILD_DIR=build python3 tests/e2e/test_durability.py [name-substring...]
Environment: KL_E2E_TORN_BUDGET (seconds, default 60) bounds the
every-offset torn-tail sweep on slow machines; offsets are tried coarse to
fine, so a cut-short sweep still covers the whole record evenly.
"""

import concurrent.futures
import os
import random
import re
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, expect_error, fail  # noqa: E402

KEY_PATH = "/v1/api-keys/%s"


# --------------------------------------------------------------------------
# (a) kill -9 while 32 clients write

def _crash_under_load(fsync, seconds, threads=32):
    env = h.Env(fsync=fsync)
    port = env.port
    acked = {}                   # key id -> (name, secret)
    lock = threading.Lock()
    stop = threading.Event()
    problems = []

    def worker(i):
        c = h.Client(port, env.key, timeout=10, validate=False)
        n = 0
        while not stop.is_set():
            name = "crash-%02d-%05d" % (i, n)
            n += 1
            try:
                r = c.post("/v1/api-keys", {"name": name})
            except Exception:
                return          # the daemon is gone
            if r.status == 201:
                try:
                    k = r.json
                    with lock:
                        acked[k["id"]] = (name, k["key"])
                except Exception as e:
                    problems.append("bad 201 body: %s" % e)
                    return
            elif r.status == 429:
                time.sleep(0.05)  # a limit is not a durability problem
            else:
                problems.append(r.describe())
                return

    ths = [threading.Thread(target=worker, args=(i,), daemon=True)
           for i in range(threads)]
    for t in ths:
        t.start()
    time.sleep(seconds)
    with lock:
        before_kill = len(acked)
    env.daemon.kill9()
    stop.set()
    for t in ths:
        t.join(15)
    check(not problems, "writes failed before the kill: %s" % problems[:3])
    check(before_kill >= threads, "only %d writes acknowledged in %.1fs with "
          "%d clients" % (before_kill, seconds, threads))

    env.start()
    c = env.client()
    listed = {x["id"]: x for x in h.list_all(c)}
    lost = sorted(set(acked) - set(listed))
    check(not lost, "%d of %d acknowledged keys lost after kill -9 (fsync=%s), "
          "e.g. %s" % (len(lost), len(acked), fsync, lost[:5]))
    for kid, (name, _) in acked.items():
        eq(listed[kid]["name"], name, "name of %s after recovery" % kid)
        h.check_key(listed[kid])
    for kid, (name, secret) in random.sample(sorted(acked.items()),
                                             min(20, len(acked))):
        expect(c.get(KEY_PATH % kid), 200)
        eq(h.me(c, key=secret)["key_id"], kid, "acknowledged secret after recovery")
    # The recovered log takes new writes.
    h.create_key(c, "after-crash")
    env.stop()
    v = h.verify_ok(env.data)
    check(v["events"] >= len(acked) + 2, "verify counts %d events for %d "
          "acknowledged keys" % (v["events"], len(acked)))
    eq(v["head_seq"], v["events"], "head_seq vs events (no compaction)")


def test_kill9_during_concurrent_writes_fsync_always():
    _crash_under_load("always", 1.5)


def test_kill9_during_concurrent_writes_fsync_batch():
    _crash_under_load("batch", 1.0)


def test_sigterm_during_writes_keeps_acknowledged():
    env = h.Env()
    acked = {}
    lock = threading.Lock()
    stop = threading.Event()

    def worker(i):
        c = h.Client(env.port, env.key, timeout=10, validate=False)
        n = 0
        while not stop.is_set():
            try:
                r = c.post("/v1/api-keys", {"name": "term-%d-%d" % (i, n)})
            except Exception:
                return
            n += 1
            if r.status == 201:
                with lock:
                    acked[r.json["id"]] = r.json["name"]
            elif r.status >= 500 or r.status == 400:
                return

    ths = [threading.Thread(target=worker, args=(i,), daemon=True)
           for i in range(8)]
    for t in ths:
        t.start()
    time.sleep(0.7)
    env.daemon.stop()            # SIGTERM: must finish in-flight and exit 0
    stop.set()
    for t in ths:
        t.join(15)
    check(acked, "nothing was acknowledged before SIGTERM")
    env.start()
    listed = {x["id"]: x["name"] for x in h.list_all(env.client())}
    lost = sorted(set(acked) - set(listed))
    check(not lost, "%d acknowledged keys lost across SIGTERM: %s" % (
        len(lost), lost[:5]))


# --------------------------------------------------------------------------
# (b) clean restart: the same bytes before and after

def _mask_last_used(body, key_id):
    """Mask the last_used_at of the one key object whose id is key_id (only
    that object: another key may have been used in the same millisecond)."""
    if key_id is None:
        return body
    at = body.find(b'"id":"' + key_id.encode() + b'"')
    if at < 0:
        return body
    nxt = body.find(b'{"id":"key_', at + 1)
    field = b'"last_used_at":"'
    f = body.find(field, at, nxt if nxt >= 0 else len(body))
    if f < 0:
        return body
    v = f + len(field)
    return body[:v] + b"*" + body[body.index(b'"', v):]


def _json_diff(before, after, where=""):
    """Field-level differences; list entries are matched by their id."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for f in sorted(set(before) | set(after)):
            if f not in after:
                out.append("%s.%s: %r -> (absent)" % (where, f, before[f]))
            elif f not in before:
                out.append("%s.%s: (absent) -> %r" % (where, f, after[f]))
            else:
                out += _json_diff(before[f], after[f], "%s.%s" % (where, f))
        return out
    if isinstance(before, list) and isinstance(after, list):
        def ids(xs):
            return [x.get("id") if isinstance(x, dict) else None for x in xs]
        if ids(before) != ids(after):
            return ["%s ids/order: %s -> %s" % (where, ids(before), ids(after))]
        out = []
        for i, (x, y) in enumerate(zip(before, after)):
            tag = x.get("id", i) if isinstance(x, dict) else i
            out += _json_diff(x, y, "%s[%s]" % (where, tag))
        return out
    return [] if before == after else ["%s: %r -> %r" % (where, before, after)]


def test_clean_restart_same_bytes():
    env = h.Env()
    c = env.client()
    a, sa = h.create_key(c, "alpha", description="first", environment="test",
                         expires_in_days=30,
                         rate_limit={"requests_per_minute": 60})
    b, sb = h.create_key(c, "beta", permissions={"access": "read_only"})
    f, sf = h.create_key(c, "gamma", permissions={"access": "flows",
                                                 "flows": ["flow_a", "flow_b"]})
    d, sd = h.create_key(c, "doomed")
    expect(c.post(KEY_PATH % b["id"] + "/revoke", {"comment": "left"}), 200)
    expect(c.delete(KEY_PATH % d["id"]), 204)
    expect(c.patch(KEY_PATH % f["id"], {"name": "gamma2", "description": "x"}), 200)
    r = expect(c.post(KEY_PATH % a["id"] + "/regenerate", {}), 200)
    sa = r.json["key"]
    h.me(c, key=sa)             # gives alpha a last_used_at
    for s in (sa, sb, sf, sd, env.key):
        hits = h.files_containing(env.data, s)
        check(not hits, "a secret was written to disk: %s" % hits)

    caller = env.info["key_id"]
    paths = ["/v1/api-keys?include_revoked=true&limit=500", "/v1/api-keys",
             "/v1/org", "/v1/me"] + [KEY_PATH % k for k in (a["id"], b["id"],
                                                           f["id"])]

    def masked(resp):
        # The caller's own last_used_at moves with every call we make: mask
        # the value this very response shows for it, nothing else.
        return _mask_last_used(resp.body, caller)

    def without_caller_use(body):
        if isinstance(body, dict) and "api_keys" in body:
            body = dict(body)
            body["api_keys"] = [
                {f: v for f, v in x.items()
                 if not (x.get("id") == caller and f == "last_used_at")}
                for x in body["api_keys"]]
        return body

    before = {p: expect(c.get(p), 200) for p in paths}
    env.restart()
    c = env.client()
    after = {p: expect(c.get(p), 200) for p in paths}
    for p in paths:
        b_raw, a_raw = masked(before[p]), masked(after[p])
        if b_raw == a_raw:
            continue
        diff = _json_diff(without_caller_use(before[p].json),
                          without_caller_use(after[p].json))
        if diff:
            fail("GET %s differs after a clean restart: %s" % (
                p, "; ".join(diff)))
        fail("GET %s: same JSON but different bytes after a clean restart: "
             "before %s, after %s" % (p, h._short(b_raw.decode(), 800),
                                      h._short(a_raw.decode(), 800)))
    expect_error(c.get(KEY_PATH % d["id"]), 404, "not_found")
    env.stop()
    h.verify_ok(env.data)


# --------------------------------------------------------------------------
# Segment format as the conventions describe it

def test_segments_roll_and_chain():
    env = h.Env(config={"segment_bytes": 4096})
    c = env.client()
    ids = []
    for i in range(40):
        k, _ = h.create_key(c, "roll-%03d" % i, description="r" * 200)
        ids.append(k["id"])
    env.stop()
    segs = h.parse_log(env.data)
    check(len(segs) >= 3, "40 keys with segment_bytes=4096 left %d segment(s): "
          "%s" % (len(segs), [s.name for s in segs]))
    eq(segs[0].first_seq, 1, "first segment's first seq")
    for prev, nxt in zip(segs, segs[1:]):
        eq(nxt.first_seq, prev.first_seq + len(prev.records),
           "first seq of %s (after %d records in %s)" % (
               nxt.name, len(prev.records), prev.name))
        check(prev.size <= 4096 + 2 * (8 + max(r.length for r in prev.records)),
              "%s is %d bytes, far over segment_bytes=4096" % (prev.name,
                                                             prev.size))
    total = sum(len(s.records) for s in segs)
    v = h.verify_ok(env.data)
    eq(v["events"], total, "verify events vs records on disk")
    eq(v["head_seq"], segs[-1].first_seq + len(segs[-1].records) - 1,
       "verify head_seq vs the last record's seq")
    env.start()
    listed = {x["id"] for x in h.list_all(env.client())}
    check(set(ids) <= listed, "keys missing after restart across %d segments"
          % len(segs))


# --------------------------------------------------------------------------
# (c) torn tail: every cut inside the last record starts cleanly

def _id_needles(kid):
    """The ways a record may hold an id: its 26-char text body (with or
    without the type prefix), or the 16-byte binary ULID it encodes."""
    body = kid.split("_", 1)[1]
    needles = [body.encode()]
    v = 0
    for ch in body:
        v = v * 32 + h.CROCKFORD.index(ch)
    if v < (1 << 128):
        needles.append(v.to_bytes(16, "big"))
    return needles


def _creation_index(records, key_ids):
    """Index of the first record that mentions each key id: its creation."""
    idx = {}
    for kid in key_ids:
        needles = _id_needles(kid)
        pos = next((i for i, r in enumerate(records)
                    if any(n in r.payload for n in needles)), None)
        check(pos is not None, "no record in the last segment mentions %s "
              "(as text or binary ULID)" % kid)
        idx[kid] = pos
    return idx


def _offsets_coarse_to_fine(start, end):
    out, seen = [], set()
    for o in (start, start + 1, start + 3, start + 4, start + 7, start + 8,
              start + 9, (start + end) // 2, end - 1):
        if start <= o < end and o not in seen:
            seen.add(o)
            out.append(o)
    step = 64
    while step >= 1:
        for o in range(start, end, step):
            if o not in seen:
                seen.add(o)
                out.append(o)
        step //= 2
    return out


def _start_after_damage(env, data, expected_ids, what):
    """Starts on damaged data: must come up with exactly expected_ids, take a
    write, stop cleanly and then verify."""
    d = h.Daemon(data)
    try:
        d.start()
    except h.DaemonStartError as e:
        fail("%s: the daemon must cut a torn tail and start: %s" % (what, e))
    c = h.Client(d.port, env.key)
    got = {x["id"] for x in h.list_all(c)}
    if got != expected_ids:
        fail("%s: keys after recovery: missing %s, unexpected %s" % (
            what, sorted(expected_ids - got), sorted(got - expected_ids)))
    r = c.post("/v1/api-keys", {"name": "after-cut"})
    if r.status != 201:
        fail("%s: write after recovery: %s" % (what, r.describe()))
    d.stop()
    segs = h.parse_log(data)
    check(segs, "no segments")
    h.verify_ok(data)


def _torn_setup(n=4):
    env = h.Env()
    c = env.client()
    ids = [h.create_key(c, "torn-%d" % i)[0]["id"] for i in range(n)]
    env.stop()
    segs = h.parse_log(env.data)
    check(len(segs) == 1, "a few keys with the default segment size should "
          "fit one segment, found %s" % [s.name for s in segs])
    last = segs[-1]
    idx = _creation_index(last.records, ids)
    check([idx[k] for k in ids] == sorted(idx[k] for k in ids),
          "creation records are not in creation order: %s" % idx)
    return env, ids, last, idx, env.info["key_id"]


def _expected_after_cut(ids, idx, init_id, cut_record):
    """Keys that survive when records from cut_record on are gone."""
    return {init_id} | {kid for kid in ids if idx[kid] < cut_record}


def test_torn_tail_every_offset_of_last_records():
    env, ids, last, idx, init_id = _torn_setup()
    recs = last.records
    kc_last = idx[ids[-1]]
    kc_prev = idx[ids[-2]]
    check(kc_prev < kc_last, "creation records out of order")

    jobs = []   # (cut offset, index of the record the cut falls in)
    for ri in range(kc_last, len(recs)):
        for off in _offsets_coarse_to_fine(recs[ri].offset, recs[ri].end):
            jobs.append((off, ri))
    # ...and a few cuts inside the record before the last creation.
    prev = recs[kc_prev]
    for off in sorted({prev.offset + 1, prev.offset + 4, prev.offset + 8,
                       (prev.offset + prev.end) // 2, prev.end - 1}):
        jobs.append((off, kc_prev))
    # The full sweep order interleaves records so a budget cut stays fair.
    jobs.sort(key=lambda j: (_offsets_rank(j, recs), j[0]))

    budget = float(os.environ.get("KL_E2E_TORN_BUDGET", "60"))
    deadline = time.time() + budget
    failures = []
    done = [0]
    lock = threading.Lock()

    def trial(job):
        if time.time() > deadline or len(failures) >= 3:
            return
        off, ri = job
        root, data = h.copy_data(env.data)
        try:
            os.truncate(os.path.join(data, last.name), off)
            exp = _expected_after_cut(ids, idx, init_id, ri)
            _start_after_damage(env, data, exp, "cut %s at byte %d (record %d "
                                "spans %d..%d)" % (last.name, off, ri,
                                                   recs[ri].offset, recs[ri].end))
        except Exception as e:
            with lock:
                failures.append(str(e))
        finally:
            h.remove_tree(root)
        with lock:
            done[0] += 1

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(trial, jobs))
    check(not failures, "%d torn-tail cut(s) failed; first: %s" % (
        len(failures), failures[0] if failures else ""))
    check(done[0] >= min(len(jobs), 20), "only %d cuts tried" % done[0])
    sys.stderr.write("  torn tail: %d of %d cuts tried%s\n" % (
        done[0], len(jobs), "" if done[0] == len(jobs) else
        " within %ss (KL_E2E_TORN_BUDGET)" % budget))


def _offsets_rank(job, recs):
    # Rank of an offset in the coarse-to-fine order of its record.
    off, ri = job
    start = recs[ri].offset
    rel = off - start
    if rel in (0, 1, 3, 4, 7, 8, 9) or off == recs[ri].end - 1:
        return 0
    for rank, step in enumerate((64, 32, 16, 8, 4, 2, 1), start=1):
        if rel % step == 0:
            return rank
    return 8


def test_torn_tail_bad_crc_and_garbage():
    env, ids, last, idx, init_id = _torn_setup()
    recs = last.records
    lr = recs[-1]
    all_ids = _expected_after_cut(ids, idx, init_id, len(recs))
    without_last = _expected_after_cut(ids, idx, init_id, len(recs) - 1)
    cases = [
        ("payload byte of the last record flipped",
         lambda p: h.flip_byte(p, lr.offset + 8 + lr.length // 2), without_last),
        ("CRC of the last record flipped",
         lambda p: h.flip_byte(p, lr.offset + 4), without_last),
        ("length of the last record runs past the end",
         lambda p: h.flip_byte(p, lr.offset + 3, 0x40), without_last),
        ("100 bytes of 0xff after the last record",
         lambda p: _append(p, b"\xff" * 100), all_ids),
        ("3 stray bytes after the last record",
         lambda p: _append(p, b"\x10\x00\x00"), all_ids),
        ("half a record header after the last record",
         lambda p: _append(p, b"\x20\x00\x00\x00\xaa\xbb"), all_ids),
    ]
    for what, damage, expected in cases:
        root, data = h.copy_data(env.data)
        damage(os.path.join(data, last.name))
        _start_after_damage(env, data, expected, what)
        h.remove_tree(root)


def _append(path, data):
    with open(path, "ab") as f:
        f.write(data)


# --------------------------------------------------------------------------
# (d) damage in an earlier segment, (e) damage mid last segment

def _numbers_besides(text, data, seg_name):
    # Numbers in a message, not counting those inside the path or file name.
    return h.numbers_in(text.replace(os.path.dirname(data), "")
                        .replace(seg_name, ""))


def _assert_refused(data, seg_name, offsets, what, cfg=None, check_offset=True):
    """The daemon must exit 1 naming the segment, an offset and `keyledger
    verify`; `keyledger verify` must exit 1 naming the segment and offset."""
    rc, err = h.daemon_must_refuse(data, timeout=10, config=cfg)
    eq(rc, 1, "%s: daemon exit status (stderr: %s)" % (what, h._short(err, 600)))
    check(seg_name in err, "%s: stderr should name the segment %s: %s" % (
        what, seg_name, h._short(err, 600)))
    if check_offset:
        check(_numbers_besides(err, data, seg_name) & set(offsets),
              "%s: stderr should name the byte offset (one of %s): %s" % (
                  what, sorted(offsets), h._short(err, 600)))
    check("keyledger verify" in err, "%s: stderr should point to `keyledger "
          "verify`: %s" % (what, h._short(err, 600)))
    res = h.run_tool("verify", "--data", data)
    eq(res.rc, 1, "%s: verify exit status (%s)" % (what, res.describe()))
    out = res.stdout + res.stderr
    check(seg_name in out, "%s: verify should name the segment %s: %s" % (
        what, seg_name, res.describe()))
    if check_offset:
        check(_numbers_besides(out, data, seg_name) & set(offsets),
              "%s: verify should name the byte offset (one of %s): %s" % (
                  what, sorted(offsets), res.describe()))


def _multi_segment_env():
    env = h.Env(config={"segment_bytes": 4096})
    c = env.client()
    for i in range(40):
        h.create_key(c, "dmg-%03d" % i, description="d" * 200)
    env.stop()
    segs = h.parse_log(env.data)
    check(len(segs) >= 3, "expected at least 3 segments with segment_bytes=4096,"
          " got %d" % len(segs))
    return env, segs


def test_damage_in_earlier_segment_refuses_start():
    env, segs = _multi_segment_env()
    cfg = {"segment_bytes": 4096}
    s0, s1 = segs[0], segs[1]
    mid = s1.records[len(s1.records) // 2]

    # 1. One payload byte flipped in the middle of the second segment.
    root, data = h.copy_data(env.data)
    pos = mid.offset + 8 + mid.length // 2
    h.flip_byte(os.path.join(data, s1.name), pos)
    _assert_refused(data, s1.name, {mid.offset, pos, mid.offset + 8},
                    "payload byte flipped in %s" % s1.name, cfg)

    # 2. The last record of the first segment cut short (a "torn tail" that
    #    is not at the tail of the log is damage).
    root, data = h.copy_data(env.data)
    lr = s0.records[-1]
    os.truncate(os.path.join(data, s0.name), lr.end - 5)
    _assert_refused(data, s0.name, {lr.offset, lr.end - 5, lr.offset + 8},
                    "%s cut 5 bytes short" % s0.name, cfg)

    # 3. The CRC of the first record of the first segment flipped.
    root, data = h.copy_data(env.data)
    fr = s0.records[0]
    h.flip_byte(os.path.join(data, s0.name), fr.offset + 4)
    _assert_refused(data, s0.name, {fr.offset, fr.offset + 4},
                    "record CRC flipped in %s" % s0.name, cfg)

    # 4. The magic of the second segment's header damaged.
    root, data = h.copy_data(env.data)
    h.flip_byte(os.path.join(data, s1.name), 0)
    _assert_refused(data, s1.name, {0}, "header magic damaged in %s" % s1.name,
                    cfg, check_offset=False)

    # 5. A middle segment missing altogether: the sequence has a gap.
    root, data = h.copy_data(env.data)
    os.remove(os.path.join(data, s1.name))
    rc, err = h.daemon_must_refuse(data, timeout=10, config=cfg)
    eq(rc, 1, "start with %s missing (stderr: %s)" % (s1.name, h._short(err, 400)))
    res = h.run_tool("verify", "--data", data)
    eq(res.rc, 1, "verify with %s missing: %s" % (s1.name, res.describe()))


def test_tampered_history_detected_by_verify():
    # A changed byte with a recomputed CRC passes framing; only the hash
    # chain can catch it ("any change to history is detected").
    env, segs = _multi_segment_env()
    s0 = segs[0]
    target = None
    for r in s0.records:
        i = r.payload.find(b"dmg-0")
        if i >= 0:
            target = (r, i)
            break
    check(target is not None, "no record in %s holds a key name" % s0.name)
    r, i = target
    root, data = h.copy_data(env.data)
    path = os.path.join(data, s0.name)
    payload = bytearray(r.payload)
    payload[i + 4] ^= 0x01       # "dmg-0.." -> "dmg-1.." : still valid msgpack
    with open(path, "r+b") as f:
        f.seek(r.offset + 4)
        f.write(h.crc32c(bytes(payload)).to_bytes(4, "little"))
        f.write(bytes(payload))
    res = h.run_tool("verify", "--data", data)
    eq(res.rc, 1, "verify after rewriting history with a valid CRC: "
       + res.describe())


def test_torn_command_group_is_cut_whole():
    """Deleting a service account is one command of many records (the
    account, each key revoked, each computer deleted). A log that ends
    anywhere inside that group, even on a record boundary, must come back
    with none of it: the account, its keys and its computer as they were."""
    env = h.Env()
    c = env.client()
    sa = c.post("/v1/service-accounts", {"name": "ci-runner"})
    expect(sa, 201)
    sa_id = sa.json["id"]
    keys = []
    for i in range(3):
        r = c.post("/v1/service-accounts/%s/api-keys" % sa_id, {"name": "k%d" % i})
        expect(r, 201)
        keys.append(r.json["id"])
    cmp = c.post("/v1/computers", {"name": "box", "owner": sa_id})
    expect(cmp, 201)
    expect(c.delete("/v1/service-accounts/%s" % sa_id), 204)
    env.stop()
    last = h.parse_log(env.data)[-1]
    # Ids are stored as binary; the type names are plain strings. Usage
    # records written at shutdown may follow the group.
    first = [i for i, r in enumerate(last.records)
             if b"ServiceAccountDeleted" in r.payload]
    eq(len(first), 1, "ServiceAccountDeleted records")
    group = last.records[first[0]:first[0] + 5]  # the account, 3 keys, the computer
    eq([b"KeyRevoked" in r.payload for r in group[1:4]], [True] * 3,
       "the keys revoked right after the account")
    check(b"ComputerDeleted" in group[4].payload, "the computer deleted last")
    cuts = {
        "inside the third record": group[2].offset + 8 + group[2].length // 2,
        "on the boundary after two records": group[2].offset,
        "just before the last byte": group[-1].end - 1,
        "right after the first record": group[1].offset,
    }
    for what, cut in sorted(cuts.items()):
        root, data = h.copy_data(env.data)
        with open(os.path.join(data, last.name), "r+b") as f:
            f.truncate(cut)
        d = h.Daemon(data)
        try:
            d.start()
        except h.DaemonStartError as e:
            fail("%s: the daemon must cut the unfinished group and start: %s"
                 % (what, e))
        try:
            c2 = h.Client(d.port, env.key)
            r = c2.get("/v1/service-accounts/%s" % sa_id)
            if r.status != 200:
                fail("%s: the service account must be back: %s" % (what, r.describe()))
            for kid in keys:
                k = c2.get(KEY_PATH % kid)
                expect(k, 200)
                eq(k.json["status"], "active", "%s: key %s status" % (what, kid))
            eq(c2.get("/v1/computers/%s" % cmp.json["id"]).json["status"], "running",
               "%s: computer status" % what)
            check(str(group[0].offset) in d.stderr_text(),
                  "%s: the cut is reported with its offset: %s" % (what, d.stderr_text()))
            # The same delete works again and is whole.
            expect(c2.delete("/v1/service-accounts/%s" % sa_id), 204)
        finally:
            d.stop()
        h.verify_ok(data)


def test_damage_mid_last_segment_refuses_start():
    env, ids, last, idx, init_id = _torn_setup(n=6)
    recs = last.records
    target = recs[idx[ids[2]]]
    check(idx[ids[2]] < len(recs) - 2, "need valid records after the target")
    name = last.name

    root, data = h.copy_data(env.data)
    pos = target.offset + 8 + target.length // 2
    h.flip_byte(os.path.join(data, name), pos)
    _assert_refused(data, name, {target.offset, pos, target.offset + 8},
                    "payload byte flipped mid %s" % name)

    root, data = h.copy_data(env.data)
    h.flip_byte(os.path.join(data, name), target.offset + 5)
    _assert_refused(data, name, {target.offset, target.offset + 5,
                                 target.offset + 4},
                    "record CRC flipped mid %s" % name)


# --------------------------------------------------------------------------
# (f) the lock

def test_second_daemon_refused():
    env = h.Env()
    c = env.client()
    rc, err = h.daemon_must_refuse(env.data, timeout=10)
    eq(rc, 1, "second daemon's exit status (stderr: %s)" % h._short(err, 400))
    low = err.lower()
    check(any(w in low for w in ("lock", "in use", "already")),
          "second daemon's message should say the data dir is locked/in use: %r"
          % err)
    eq(h.me(c)["key_id"], env.info["key_id"], "first daemon still serves")
    h.create_key(c, "still-writable")
    env.stop()
    h.verify_ok(env.data)


def test_init_on_existing_data_dir_refused():
    env = h.Env(start=False)
    v1 = h.verify_ok(env.data)
    res = h.run_tool("init", "--data", env.data, "--org", "Again",
                     "--owner-email", "again@example.com", "--json")
    eq(res.rc, 1, "init on an existing log: " + res.describe())
    check(res.stderr.strip(), "init refused without a message")
    check("kl_live_" not in res.stdout, "a refused init printed a key")
    eq(h.verify_ok(env.data), v1, "verify after a refused init")
    env.start()
    c = env.client()
    eq(expect(c.get("/v1/org"), 200).json["name"], "Acme Corp", "org name")
    res = h.run_tool("init", "--data", env.data, "--org", "Again",
                     "--owner-email", "again@example.com", "--json")
    eq(res.rc, 1, "init while the daemon runs: " + res.describe())
    eq(h.me(c)["key_id"], env.info["key_id"], "daemon still serves")


# --------------------------------------------------------------------------
# (g) a full disk

def test_full_disk_503_then_recovers():
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise h.Skip("needs root to mount a 2 MiB tmpfs (not root)")
    mnt = h.tempdir("kl-e2e-mnt-")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise h.Skip("mount -t tmpfs not permitted here: %s" % (
            p.stderr.decode("utf-8", "replace").strip() or "exit %d" %
            p.returncode))
    h.register_mount(mnt)
    data = os.path.join(mnt, "data")
    info = h.init(data)
    logs = h.tempdir()          # daemon stderr and config off the small disk
    cfg = {"segment_bytes": 262144}
    d = h.start_daemon(data, fsync="always", config=cfg, log_dir=logs)
    c = h.Client(d.port, info["key"])
    acked = {}
    for i in range(5):
        k, _ = h.create_key(c, "pre-%d" % i)
        acked[k["id"]] = k["name"]

    filler = os.path.join(mnt, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(fd)

    # The segment's last page may still hold a few records; then 503.
    failed_names = []
    got_503 = False
    for i in range(300):
        name = "full-%03d" % i
        r = c.post("/v1/api-keys", {"name": name})
        if r.status == 201:
            acked[r.json["id"]] = name
            continue
        expect_error(r, 503, "unavailable")
        failed_names.append(name)
        got_503 = True
        break
    check(got_503, "300 writes succeeded on a full disk")
    for i in range(3):
        name = "still-full-%d" % i
        expect_error(c.post("/v1/api-keys", {"name": name}), 503, "unavailable")
        failed_names.append(name)
    some = next(iter(acked))
    # Larger than any creation record, so it cannot fit the room a failed
    # creation left in the segment's last page.
    expect_error(c.patch(KEY_PATH % some, {"name": "x", "description": "d" * 1000}),
                 503, "unavailable")
    # Reads keep working and show nothing half-applied.
    eq(h.me(c)["key_id"], info["key_id"], "/v1/me on a full disk")
    listed = {x["id"]: x["name"] for x in h.list_all(c)}
    eq(set(listed) - {info["key_id"]}, set(acked), "keys listed on a full disk")
    eq(listed[some], acked[some], "a PATCH that got 503 changed nothing")

    os.remove(filler)
    t0 = time.time()
    k = None
    while time.time() - t0 < 5.0:
        r = c.post("/v1/api-keys", {"name": "after-space"})
        if r.status == 201:
            k = r.json
            break
        expect_error(r, 503, "unavailable")
        time.sleep(0.2)
    check(k is not None, "writes did not resume within 5 s of freeing space")
    acked[k["id"]] = "after-space"
    for i in range(3):
        k2, _ = h.create_key(c, "post-%d" % i)
        acked[k2["id"]] = k2["name"]

    d.stop()
    d = h.start_daemon(data, fsync="always", config=cfg, log_dir=logs)
    c = h.Client(d.port, info["key"])
    listed = {x["id"]: x["name"] for x in h.list_all(c)}
    lost = set(acked) - set(listed)
    check(not lost, "acknowledged keys lost across the full disk: %s" % sorted(lost))
    for kid, name in acked.items():
        eq(listed[kid], name, "name of %s" % kid)
    ghosts = set(failed_names) & set(listed.values())
    check(not ghosts, "writes answered 503 were applied: %s" % sorted(ghosts))
    d.stop()
    h.verify_ok(data)


# --------------------------------------------------------------------------
# A failed fsync: read-only until restart (API.md section 5)

def test_failed_fsync_read_only_until_restart():
    lib = os.environ.get("KL_FAULT_LIB")
    if not lib or not os.path.exists(lib):
        raise h.Skip("KL_FAULT_LIB (the fsync fault shim) is not built")
    flag = os.path.join(h.tempdir(), "fail-fsync")
    asan = os.environ.get("ASAN_OPTIONS", "")
    fault_env = {"LD_PRELOAD": lib, "KL_FAULT_FSYNC_FILE": flag,
                 "ASAN_OPTIONS": (asan + ":" if asan else "") +
                                 "verify_asan_link_order=0"}
    env = h.Env(fsync="always", env=fault_env)
    c = env.client()
    before, _ = h.create_key(c, "before the failure")

    open(flag, "w").close()
    expect_error(c.post("/v1/api-keys", {"name": "during"}), 503, "unavailable")
    r = c.get("/readyz")
    check(r.status == 503, "/readyz is %d after a failed fsync" % r.status)
    check("fsync" in r.body.decode("utf-8", "replace"),
          "/readyz does not say why: %r" % r.body[:200])
    # Reads go on.
    listed = expect(c.get("/v1/api-keys"), 200).json["api_keys"]
    names = [k["name"] for k in listed]
    check("before the failure" in names and "during" not in names,
          "list after the failed fsync: %s" % names)
    expect(c.get("/v1/me"), 200)

    # The disk is fine again, but a retried fsync proves nothing: still 503.
    os.remove(flag)
    expect_error(c.post("/v1/api-keys", {"name": "after"}), 503, "unavailable")
    check(c.get("/readyz").status == 503, "/readyz turned 200 without a restart")

    env.restart(env={})
    c = env.client()
    check(c.get("/readyz").status == 200, "/readyz not 200 after restart")
    expect(c.get(KEY_PATH % before["id"]), 200)
    names = [k["name"] for k in expect(c.get("/v1/api-keys"), 200).json["api_keys"]]
    check("during" not in names and "after" not in names,
          "a write answered 503 appeared after restart: %s" % names)
    h.create_key(c, "after restart")
    env.stop()
    h.verify_ok(env.data)


def test_fsync_batch_syncs_a_quiet_tail():
    """--fsync batch: a write made within 10 ms of the last sync is written
    without one, and synced when the daemon goes quiet, with no later write
    to carry it. Seen through the fsync fault shim: that quiet sync is the
    one that fails, so /readyz turns 503 with no write after it. (A slow
    machine may sync the second write itself; then the test tries again.)"""
    lib = os.environ.get("KL_FAULT_LIB")
    if not lib or not os.path.exists(lib):
        raise h.Skip("KL_FAULT_LIB (the fsync fault shim) is not built")
    asan = os.environ.get("ASAN_OPTIONS", "")
    for attempt in range(5):
        flag = os.path.join(h.tempdir(), "fail-fsync")
        fault_env = {"LD_PRELOAD": lib, "KL_FAULT_FSYNC_FILE": flag,
                     "ASAN_OPTIONS": (asan + ":" if asan else "") +
                                     "verify_asan_link_order=0"}
        # No usage flush: its write would sync (and fail) on its own.
        env = h.Env(fsync="batch", env=fault_env,
                    config={"usage_flush_ms": 3600000})
        c = env.client()
        h.create_key(c, "synced")        # the first write after the start syncs
        h.create_key(c, "quiet tail")    # within 10 ms of it: not yet
        open(flag, "w").close()
        deadline = time.time() + 2
        status = 200
        while status == 200 and time.time() < deadline:
            time.sleep(0.02)
            status = c.get("/readyz").status
        if status == 503:
            env.restart(env={})
            names = [k["name"] for k in h.list_all(env.client())]
            check("synced" in names, "the synced write after restart: %s" % names)
            env.stop()
            return
        env.stop()
    check(False, "in 5 tries /readyz never saw the quiet tail's sync fail")


if __name__ == "__main__":
    h.main(globals())

