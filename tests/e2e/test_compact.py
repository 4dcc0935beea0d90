"""
End-to-end tests of `keyledger compact` (API.md section 1, docs/log-format.md
"Compaction"): the log rewritten into a snapshot plus a shorter log that
goes on from the old head, UsageRecorded events older than the retention
folded into one daily total per key and UTC day, every other event kept.

What is checked, and why:
  - the state is the same: every GET whose answer the state decides gives
    the same answer before and after (usage by the day included; by the
    hour too when nothing is folded), `keyledger verify` passes, the new log
    ends with a LogCompacted event naming the head an auditor pinned, and
    its first segment is numbered on from that head;
  - the daemon goes on from a compacted log (and from its snapshot), and a
    compacted log can be compacted again;
  - usage by flow survives folding: ties in the reports, a key with more
    flows in a day than one event holds, and which flows an organization
    names when it has more than it can name (1024);
  - refusals leave the data dir as it was: while the daemon holds the lock,
    on bad usage, on a damaged or tampered log (a compaction must never
    re-chain damaged history into a fresh, valid-looking chain);
  - a disk too full for the new log leaves the old one as it was;
  - a stale uncommitted compact.tmp is thrown away by the next writer;
  - a crash at each step that changes the disk (an LD_PRELOAD shim,
    fault_kill.c, kills the tool before its Nth such call) leaves the old
    state or the new one, never a mix: the state switches exactly at the
    commit rename, read-only tools say when a switch is half done, the next
    writer finishes it (even when it is itself killed at each of its steps),
    and compacting again afterwards works.

Views are taken with the daemon started with no usage flushes and ended by
kill -9: every call with a key counts as usage of that key and a clean stop
would write the walk's own usage to the log, so the next walk would see
more usage than the first. With kill -9 the walks leave the log as it was.

Run: KL_BUILD_DIR=build python3 tests/e2e/test_compact.py [name-substring...]
(the crash test finds the shim in $KL_FAULT_KILL_LIB, else in the build dir).
"""

import json
import os
import re
import subprocess
import sys
import time

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, fail  # noqa: E402

ZERO_ORG = "org_" + "0" * 26
HOUR = 3600
DAY = 86400
# Small segments so that the old log has several (each one a step of the
# compaction to delete); usage and alert checks fast while history is made.
FAST = {"usage_flush_ms": 50, "alert_check_ms": 50, "segment_bytes": 4096}
# Nothing but our own writes: no usage flush or alert check during a walk.
QUIET = {"usage_flush_ms": 3600000, "alert_check_ms": 3600000,
         "segment_bytes": 4096}
SUMMARY_FIELDS = {"events_before", "events_after", "usage_events_folded",
                  "daily_totals", "bytes_before", "bytes_after", "head_seq",
                  "head_hash", "snapshot", "seconds"}
SUMMARY_OPTIONAL = {"snapshot_bytes"}      # the snapshot file's size
COMPACTED_FIELDS = {"through_seq", "through_hash", "usage_folded_before",
                    "usage_events_folded", "daily_totals"}
HEX64 = re.compile(r"^[0-9a-f]{64}$")
COMMITTED = "committed but not finished"


# --------------------------------------------------------------------------
# Helpers

def compact(data, *args):
    """Runs `keyledger compact` and insists on success; returns the summary
    after checking its shape."""
    res = h.run_tool("compact", "--data", data, *args)
    eq(res.rc, 0, "keyledger compact exit status: " + res.describe())
    lines = res.stdout.split("\n")
    eq(len(lines), 2, "compact prints one line: " + res.describe())
    eq(lines[1], "", "compact output ends with a newline")
    out = res.json()
    check(isinstance(out, dict), "summary is an object: " + res.describe())
    check(SUMMARY_FIELDS <= set(out) <= SUMMARY_FIELDS | SUMMARY_OPTIONAL,
          "summary fields: %s" % sorted(out))
    for f in SUMMARY_FIELDS - {"head_hash", "snapshot", "seconds"}:
        check(isinstance(out[f], int) and not isinstance(out[f], bool) and out[f] >= 0,
              "summary %s: %r" % (f, out[f]))
    check(HEX64.match(out["head_hash"]) is not None, "head_hash %r" % out["head_hash"])
    eq(out["snapshot"], "snapshot-%020d.kls" % out["head_seq"], "snapshot file name")
    check(isinstance(out["seconds"], (int, float)) and out["seconds"] >= 0,
          "seconds %r" % (out["seconds"],))
    if "snapshot_bytes" in out:
        eq(out["snapshot_bytes"], os.path.getsize(os.path.join(data, out["snapshot"])),
           "snapshot_bytes")
    if out["usage_events_folded"] == 0:
        eq(out["events_after"], out["events_before"], "nothing to fold: the log "
           "is left as it is")
        eq(out["daily_totals"], 0, "nothing to fold: no daily totals")
    else:
        eq(out["events_after"], out["events_before"] - out["usage_events_folded"] +
           out["daily_totals"] + 1, "events_after = before - folded + daily totals "
           "+ the LogCompacted event")
    return out


def replay(data):
    """Every event of the log (`keyledger replay`), oldest first."""
    res = h.run_tool("replay", "--data", data)
    eq(res.rc, 0, "replay exit status: " + res.describe())
    try:
        return [json.loads(ln) for ln in res.stdout.split("\n") if ln]
    except ValueError as e:
        fail("replay output is not JSON lines (%s): %s" % (e, res.describe()))


def usage_events(data):
    return [e for e in replay(data) if e["type"] == "UsageRecorded"]


def wait_flushed(data, n_before):
    """Waits until more UsageRecorded events than n_before are in the log
    (the daemon flushes every usage_flush_ms); returns how many there are."""
    def more():
        n = len(usage_events(data))
        return n if n > n_before else 0
    return h.wait_until(more, 10, 0.05, "usage in the log")


def stripped_event(e, drop=("seq", "id", "hash")):
    """An event without what a rewrite renumbers."""
    return {k: v for k, v in e.items() if k not in drop}


def data_files(data):
    """Every file under the data dir (and its subdirs) with its bytes."""
    out = {}
    for dirpath, _, files in os.walk(data):
        for fn in files:
            p = os.path.join(dirpath, fn)
            with open(p, "rb") as f:
                out[os.path.relpath(p, data)] = f.read()
    return out


def leftovers(data):
    return sorted(n for n in ("compact.tmp", "compact.ready")
                  if os.path.exists(os.path.join(data, n)))


def day_start(t):
    return int(t // DAY * DAY)


class Ranges(object):
    """Fixed report ranges for one test, so that time passing between two
    walks does not move them: the last 7 UTC days through tomorrow, and the
    last 24 hours through the next hour."""

    def __init__(self):
        now = time.time()
        d = day_start(now)
        hr = int(now // HOUR * HOUR)
        self.day = {"granularity": "day", "from": h.fmt_time(d - 6 * DAY),
                    "to": h.fmt_time(d + DAY)}
        self.hour = {"granularity": "hour", "from": h.fmt_time(hr - 23 * HOUR),
                     "to": h.fmt_time(hr + HOUR)}


# --------------------------------------------------------------------------
# A history with a bit of everything, and usage that can be folded

def _verify(port, secret, flow=None, cost=None):
    body = {"key": secret}
    if flow is not None:
        body["flow"] = flow
    if cost is not None:
        body["cost"] = cost
    return expect(h.Client(port, None).post("/v1/keys/verify", body), 200).json


def build_history(env, other):
    """Two orgs; users, a service account, keys of every kind (flows, rate
    limits, test env, expiring soon), a rename, a regeneration, revocations,
    deletions (a service account's, a group of many records), computers and
    sessions, an acknowledged alert, an idempotent create, and usage over
    several flushes: verifications with flows, failed ones (wrong secret,
    forbidden flow, revoked key, unknown key). Returns what the views need
    (secrets, the idempotent request, the other org's key). Waits until all
    usage is logged."""
    c = env.client()
    c2 = h.Client(env.port, other["key"])
    port = env.port
    data = env.data
    mgr = expect(c.post("/v1/org/users", {"email": "m@example.com", "role": "manager",
                                          "name": "Mia"}), 201).json
    mem = expect(c.post("/v1/org/users", {"email": "x@example.com", "role": "member"}),
                 201).json
    sa = expect(c.post("/v1/service-accounts", {"name": "ingest"}), 201).json
    sa2 = expect(c.post("/v1/service-accounts", {"name": "ci-bot"}), 201).json
    kf = expect(c.post("/v1/service-accounts/%s/api-keys" % sa["id"], {
        "name": "flows key", "permissions": {"access": "flows",
                                             "flows": ["ingest", "export"]},
        "rate_limit": {"requests_per_day": 1000}}), 201).json
    ksa2 = expect(c.post("/v1/service-accounts/%s/api-keys" % sa2["id"],
                         {"name": "bot key"}), 201).json
    kmgr = expect(c.post("/v1/org/users/%s/api-keys" % mgr["id"],
                         {"name": "manager key"}), 201).json
    kmem = expect(c.post("/v1/org/users/%s/api-keys" % mem["id"],
                         {"name": "member key"}), 201).json
    # A day limit tighter than the minute one: the verifications' remaining
    # quota is then the day's, which folded usage decides (and no minute
    # boundary during a walk moves it).
    k1, s1 = h.create_key(c, "k1", description="first",
                          rate_limit={"requests_per_minute": 500,
                                      "requests_per_day": 100})
    h.create_key(c, "expiring", expires_in_days=3)
    _, stest = h.create_key(c, "test env", environment="test")
    krev, srev = h.create_key(c, "to revoke")
    kdel, sdel = h.create_key(c, "to delete")
    idem = {"Idempotency-Key": "compact-idem-1"}
    idem_body = '{"name": "idempotent"}'
    expect(c.post("/v1/api-keys", idem_body, headers=idem), 201)
    k2, _ = h.create_key(c2, "other org key")
    expect(c.patch("/v1/api-keys/%s" % k1["id"], {"name": "k1 renamed"}), 200)
    s1_new = expect(c.post("/v1/api-keys/%s/regenerate" % k1["id"],
                           {"grace_period_seconds": 3600}), 200).json["key"]
    expect(c.patch("/v1/org/users/%s" % mgr["id"], {"role": "member"}), 200)
    expect(c.put("/v1/org/usage-limits", {"requests_per_day": 100000}), 200)
    expect(c.post("/v1/computers", {"name": "box", "owner": sa2["id"]}), 201)
    box2 = expect(c.post("/v1/computers", {"name": "box2"}), 201).json
    expect(c.post("/v1/computers/%s/restart" % box2["id"]), 200)
    ses = expect(c.post("/v1/sessions", {"title": "chat", "computer_id": box2["id"]}),
                 201).json
    expect(c.post("/v1/sessions/%s/messages" % ses["id"],
                  {"role": "user", "content": "hello"}), 201)
    expect(c.post("/v1/sessions/%s/messages" % ses["id"],
                  {"role": "assistant", "content": "hi"}), 201)

    # Usage over several flushes. Round 1: the flows key by one flow.
    n = len(usage_events(data))
    eq(_verify(port, kf["key"], flow="ingest", cost=2)["code"], "VALID", "kf ingest")
    eq(_verify(port, s1)["code"], "VALID", "k1's old secret in its grace period")
    n = wait_flushed(data, n)
    # Round 2: another key by another flow (the org sees it second; no two
    # flows tie in requests in this history: test_flow_ties_keep_their_order
    # is about ties).
    eq(_verify(port, kmgr["key"], flow="billing")["code"], "VALID", "manager key")
    eq(_verify(port, stest, flow="ingest")["code"], "VALID", "test key")
    n = wait_flushed(data, n)
    # Round 3: more of both, refusals, the revoked and deleted keys.
    eq(_verify(port, kf["key"], flow="export")["code"], "VALID", "kf export")
    eq(_verify(port, kf["key"], flow="other")["code"], "FORBIDDEN", "kf other flow")
    eq(_verify(port, kf["key"])["code"], "FORBIDDEN", "kf without a flow")
    eq(_verify(port, kf["key"], flow="ingest", cost=0)["code"], "VALID", "cost 0")
    eq(_verify(port, s1_new, flow="billing", cost=3)["code"], "VALID", "k1 new")
    wrong = h.make_secret(h.check_secret(s1_new).group(3), "B" * 40)
    eq(_verify(port, wrong)["code"], "NOT_FOUND", "a wrong secret for k1")
    eq(_verify(port, sdel)["code"], "VALID", "the key to delete, used first")
    expect(c.post("/v1/api-keys/%s/revoke" % krev["id"], {"comment": "leaked"}), 200)
    eq(_verify(port, srev)["code"], "REVOKED", "revoked key")
    expect(c.delete("/v1/api-keys/%s" % kdel["id"]), 204)
    eq(_verify(port, h.make_secret("0" + h.random_id("key")[5:], "A" * 40))["code"],
       "NOT_FOUND", "a secret naming no key")
    eq(_verify(port, other["key"])["code"], "VALID", "the other org's owner key")
    n = wait_flushed(data, n)
    # Deleting a service account: one command, many records.
    expect(c.delete("/v1/service-accounts/%s" % sa2["id"]), 204)
    expect(c.patch("/v1/service-accounts/%s" % sa["id"], {"description": "pipes"}), 200)
    expect(c.delete("/v1/org/users/%s" % mem["id"]), 204)
    expect(c2.post("/v1/api-keys/%s/revoke" % k2["id"], {}), 200)
    # The key expiring within 7 days raises an alert; acknowledge it.
    alert = h.wait_until(lambda: [a for a in expect(c.get("/v1/alerts"), 200).json[
        "alerts"] if a["type"] == "expiring_soon"], 10, 0.05, "the expiring_soon alert")
    expect(c.post("/v1/alerts/%s/ack" % alert[0]["id"]), 200)
    wait_flushed(data, n)
    return {"secrets": {"kf": kf["key"], "k1 old": s1, "k1 new": s1_new,
                        "wrong": wrong, "rev": srev, "del": sdel, "kmgr": kmgr["key"],
                        "kmem": kmem["key"], "ksa2": ksa2["key"], "test": stest},
            "idem": (idem, idem_body), "other_key": other["key"]}


def prepared(config=FAST):
    """A data dir with the history above, ended by a clean stop (every
    count flushed) and a quiet restart; returns (env, info) with the daemon
    running quietly."""
    env = h.Env(start=False, config=config)
    other = h.org_create(env.data, org="Globex", email="hank@globex.example")
    env.start()
    info = build_history(env, other)
    env.daemon_kw["config"] = QUIET     # every later start is quiet
    env.restart()
    return env, info


# --------------------------------------------------------------------------
# Views: what the state decides

def _scrub_last_used(v, ids):
    """Drops last_used_at from every object whose id is one of ids (the
    keys walking the views: each call moves it)."""
    if isinstance(v, dict):
        if v.get("id") in ids:
            v.pop("last_used_at", None)
        for x in v.values():
            _scrub_last_used(x, ids)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _scrub_last_used(x, ids)
    return v


def _audit(c, path, usage=False):
    """Every event of the org on path (all pages), oldest first, minus what
    a rewrite renumbers (seq, id, hash); only the usage events if usage,
    else all but them."""
    out = []
    cursor = None
    for _ in range(1000):
        q = {"limit": "500"}
        if cursor is not None:
            q["cursor"] = cursor
        body = expect(c.get(path, query=q), 200).json
        out.extend(body["events"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    out.reverse()
    return [stripped_event(e) for e in out if (e["type"] == "UsageRecorded") == usage]


def _get(c, path, query=None, raw=False):
    r = c.get(path, query=query, validate=not raw)
    if raw:
        return (r.status, r.header("Content-Type"), r.header("Content-Disposition"),
                r.body.decode("utf-8"))
    return (r.status, r.json if r.body else None)


def org_views(c, walker_id, ranges, hour=False, usage_events=False):
    """One org's views through client c (whose key is walker_id); with
    usage_events, the usage events of the audit history too (which a
    compaction that folds changes)."""
    out = {}
    for path in ("/v1/me", "/v1/org", "/v1/org/users?limit=500",
                 "/v1/service-accounts?limit=500",
                 "/v1/api-keys?include_revoked=true&limit=500",
                 "/v1/api-keys?limit=500", "/v1/org/usage-limits",
                 "/v1/alerts", "/v1/alerts?status=open",
                 "/v1/alerts?status=acknowledged", "/v1/computers", "/v1/sessions"):
        out[path] = _get(c, path)
    keys = out["/v1/api-keys?include_revoked=true&limit=500"][1]["api_keys"]
    for u in out["/v1/org/users?limit=500"][1]["users"]:
        out["user " + u["id"]] = _get(c, "/v1/org/users/%s" % u["id"])
        out["user keys " + u["id"]] = _get(c, "/v1/org/users/%s/api-keys" % u["id"])
    for s in out["/v1/service-accounts?limit=500"][1]["service_accounts"]:
        out["sa " + s["id"]] = _get(c, "/v1/service-accounts/%s" % s["id"])
        out["sa keys " + s["id"]] = _get(c, "/v1/service-accounts/%s/api-keys" % s["id"])
    for m in out["/v1/computers"][1]["computers"]:
        out["computer " + m["id"]] = _get(c, "/v1/computers/%s" % m["id"])
    for s in out["/v1/sessions"][1]["sessions"]:
        out["session " + s["id"]] = _get(c, "/v1/sessions/%s" % s["id"])
        out["messages " + s["id"]] = _get(c, "/v1/sessions/%s/messages" % s["id"])
    grans = [ranges.day] + ([ranges.hour] if hour else [])
    for g in grans:
        tag = g["granularity"]
        out["usage " + tag] = _get(c, "/v1/usage", query=g)
        out["usage csv " + tag] = _get(c, "/v1/usage", query=dict(g, format="csv"),
                                       raw=True)
        for k in keys:
            p = "/v1/api-keys/%s/usage" % k["id"]
            out["key usage %s %s" % (tag, k["id"])] = _get(c, p, query=g)
            out["key usage csv %s %s" % (tag, k["id"])] = _get(
                c, p, query=dict(g, format="csv"), raw=True)
    for k in keys:
        out["key " + k["id"]] = _get(c, "/v1/api-keys/%s" % k["id"])
    out["audit"] = _audit(c, "/v1/audit-events")
    out["control history"] = _audit(c, "/v1/org/control-history")
    if usage_events:
        out["usage events"] = _audit(c, "/v1/audit-events", usage=True)
    return _scrub_last_used(out, {walker_id})


def walk(env, info, ranges, hour=False, usage_events=False):
    """The head, then both orgs' views, then what the secrets verify to and
    what the idempotent request replays (last: verifications move
    last_used_at). Returns (head, views). Always the same calls in the same
    order, and first on a freshly started daemon: each call counts towards
    the organization's usage of the day, which the verifications' remaining
    quota shows."""
    c = env.client()
    hd = expect(c.get("/v1/audit-events/head"), 200).json
    out = {"org 1": org_views(c, env.info["key_id"], ranges, hour, usage_events)}
    c2 = h.Client(env.port, info["other_key"])
    other_id = expect(c2.get("/v1/me"), 200).json["key_id"]
    out["org 2"] = org_views(c2, other_id, ranges, hour, usage_events)
    hdr, body = info["idem"]
    r = c.post("/v1/api-keys", body, headers=hdr)
    out["idempotent replay"] = (r.status, r.header("Idempotent-Replayed"),
                                r.json)
    for name, secret in sorted(info["secrets"].items()):
        for flow in (None, "ingest", "nope"):
            body = {"key": secret}
            if flow:
                body["flow"] = flow
            r = expect(h.Client(env.port, None).post("/v1/keys/verify", body), 200)
            out["verify %s %s" % (name, flow)] = r.json
    return hd, out


def head(env):
    return expect(env.client().get("/v1/audit-events/head"), 200).json


def diff(a, b, prefix=""):
    """Where two views differ (for a readable failure)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return "%s%s: only in %s" % (prefix, k, "new" if k in b else "old")
            d = diff(a[k], b[k], "%s%s / " % (prefix, k))
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return "%slengths %d vs %d: %s vs %s" % (prefix, len(a), len(b),
                                                     h._short(a, 600), h._short(b, 600))
        for i, (x, y) in enumerate(zip(a, b)):
            d = diff(x, y, "%s[%d] / " % (prefix, i))
            if d:
                return d
        return None
    if a != b:
        return "%s%s vs %s" % (prefix, h._short(a, 600), h._short(b, 600))
    return None


def same_views(got, want, what):
    d = diff(want, got)
    if d is not None:
        fail("%s: the views differ at %s" % (what, d))


def last_compacted(events):
    comp = [e for e in events if e["type"] == "LogCompacted"]
    check(comp, "no LogCompacted event in the log")
    return comp


def check_compacted_event(e, through_seq, through_hash, summary=None):
    """A LogCompacted event's shape and what it names."""
    eq(e["org_id"], ZERO_ORG, "LogCompacted org_id")
    eq(e["actor"]["type"], "system", "LogCompacted actor")
    check(isinstance(e["data"], dict), "LogCompacted data: %r" % (e["data"],))
    eq(set(e["data"]), COMPACTED_FIELDS, "LogCompacted data fields")
    eq(e["data"]["through_seq"], through_seq, "LogCompacted through_seq (the old head)")
    eq(e["data"]["through_hash"], through_hash,
       "LogCompacted through_hash (the old head's hash)")
    h.parse_time(e["data"]["usage_folded_before"], "usage_folded_before")
    if summary is not None:
        eq(e["data"]["usage_events_folded"], summary["usage_events_folded"],
           "LogCompacted usage_events_folded vs the summary")
        eq(e["data"]["daily_totals"], summary["daily_totals"],
           "LogCompacted daily_totals vs the summary")
        eq(e["seq"], summary["head_seq"], "LogCompacted is the new head")
        eq(e["hash"], summary["head_hash"], "LogCompacted's hash is the new head hash")


def usage_groups(usage):
    """Usage events by key and UTC day (of `from`), in order."""
    groups = {}
    for e in usage:
        u = e["data"]["usage"]
        groups.setdefault((e["target"]["id"], day_start(h.parse_time(u["from"]))),
                          []).append(e)
    return groups


def check_fold_counts(s, usage):
    """The summary's counts for folding all of `usage` (no key used more
    than 64 flows a day): every event folded into one total per key and
    day, or, where a key has only one event that day, that event kept as it
    is and not counted (docs/log-format.md, "What is kept"; either reading
    gives the same log)."""
    groups = usage_groups(usage).values()
    every = (len(usage), len(groups))
    multi = (sum(len(g) for g in groups if len(g) > 1),
             len([g for g in groups if len(g) > 1]))
    check((s["usage_events_folded"], s["daily_totals"]) in (every, multi),
          "folded events and daily totals %r: expected %r (all) or %r (a lone "
          "event kept)" % ((s["usage_events_folded"], s["daily_totals"]), every,
                           multi))


def expected_fold(events):
    """What compacting `events` (replayed) with every usage event folded
    gives, seq, id and hash aside: the other events as they were, and for
    each key and UTC day (of `from`) one UsageRecorded where the last of
    them was, with its time and actor, from the first `from` to the last
    `to`, counts summed, the latest last_used_at, flows summed in the order
    first seen."""
    groups = usage_groups([e for e in events if e["type"] == "UsageRecorded"])
    out = []
    for e in events:
        if e["type"] != "UsageRecorded":
            out.append(stripped_event(e))
            continue
        u = e["data"]["usage"]
        group = groups[(e["target"]["id"], day_start(h.parse_time(u["from"])))]
        if e is not group[-1]:
            continue
        usage = {"from": min(x["data"]["usage"]["from"] for x in group),
                 "to": max(x["data"]["usage"]["to"] for x in group),
                 "successes": sum(x["data"]["usage"]["successes"] for x in group),
                 "failures": sum(x["data"]["usage"]["failures"] for x in group)}
        used = [x["data"]["usage"]["last_used_at"] for x in group
                if "last_used_at" in x["data"]["usage"]]
        if used:
            usage["last_used_at"] = max(used)
        flows = {}
        for x in group:
            for f in x["data"].get("flows", []):
                t = flows.setdefault(f["flow"], {"flow": f["flow"], "successes": 0,
                                                 "failures": 0})
                t["successes"] += f["successes"]
                t["failures"] += f["failures"]
        total = stripped_event(e)
        total["data"] = {"usage": usage}
        if flows:
            total["data"]["flows"] = list(flows.values())
        out.append(total)
    return out


# --------------------------------------------------------------------------
# Same state

def test_same_state_after_folding_usage():
    """Retention 0 folds every usage event into daily totals (one per key
    and UTC day); everything the API shows is the same, usage by the day
    included; the new log is exactly the old one with the usage folded, it
    goes on from the pinned head and says so in its last event."""
    ranges = Ranges()
    env, info = prepared()
    pinned, old = walk(env, info, ranges)
    old_events = replay(env.data)
    env.daemon.kill9()
    eq(replay(env.data), old_events, "the walk wrote nothing to the log")
    eq((old_events[-1]["seq"], old_events[-1]["hash"]),
       (pinned["seq"], pinned["hash"]), "the pinned head is the log's last event")
    old_usage = [e for e in old_events if e["type"] == "UsageRecorded"]
    check(len(old_usage) >= 4, "want usage over several flushes: %d" % len(old_usage))
    old_segments = h.segment_names(env.data)
    check(len(old_segments) >= 3, "want several old segments: %s" % old_segments)

    t0 = time.time()
    s = compact(env.data, "--usage-retention-days", "0")
    t1 = time.time()
    eq(s["events_before"], pinned["seq"], "events_before (a log from seq 1)")
    check(s["usage_events_folded"] > 0, "nothing folded: %r" % s)
    check_fold_counts(s, old_usage)
    check(s["bytes_after"] < s["bytes_before"], "the log got smaller: %r" % s)
    eq(s["head_seq"], pinned["seq"] + s["events_after"], "head_seq = old head + "
       "events_after")
    # On disk: the new segment numbered on from the old head, the snapshot,
    # nothing old, no leftovers.
    names = h.segment_names(env.data)
    eq(names[0], "%020d.log" % (pinned["seq"] + 1), "first new segment file")
    for n in old_segments:
        check(n not in names, "old segment %s is still there" % n)
    eq(leftovers(env.data), [], "compaction leftovers")
    check(os.path.exists(os.path.join(env.data, s["snapshot"])), "the snapshot file")
    eq(sum(os.path.getsize(os.path.join(env.data, n)) for n in names), s["bytes_after"],
       "bytes_after is the size of the segments")
    segs = h.parse_log(env.data)
    eq(segs[0].first_seq, pinned["seq"] + 1, "first segment's first seq")
    eq(segs[0].chain_in.hex(), pinned["hash"], "the new log chains to the old head")

    v = h.verify_ok(env.data)
    eq((v["head_seq"], v["head_hash"], v["events"]),
       (s["head_seq"], s["head_hash"], s["events_after"]), "verify of the new log")
    new_events = replay(env.data)
    eq([e["seq"] for e in new_events],
       list(range(pinned["seq"] + 1, s["head_seq"] + 1)), "new seqs, gapless")
    eq(new_events[-1]["type"], "LogCompacted", "the last event")
    check_compacted_event(new_events[-1], pinned["seq"], pinned["hash"], s)
    cutoff = h.parse_time(new_events[-1]["data"]["usage_folded_before"])
    check(t0 - 1 <= cutoff <= t1 + 1, "usage_folded_before %s is now (retention 0)"
          % new_events[-1]["data"]["usage_folded_before"])
    eq(len([e for e in new_events if e["type"] == "LogCompacted"]), 1,
       "LogCompacted events")
    # Every other event kept, in order, with the same type, time, actor and
    # data; the usage folded to the same counts per key and day.
    eq([stripped_event(e) for e in new_events
        if e["type"] not in ("UsageRecorded", "LogCompacted")],
       [stripped_event(e) for e in old_events if e["type"] != "UsageRecorded"],
       "the events other than usage")
    new_usage = [e for e in new_events if e["type"] == "UsageRecorded"]
    eq(len(new_usage), len(old_usage) - s["usage_events_folded"] + s["daily_totals"],
       "usage events after")
    eq(len(new_usage), len(usage_groups(old_usage)), "one usage event per key and day")
    # The whole new history, as docs/log-format.md says it is made: each
    # key's usage of a UTC day summed into one event where its last one was.
    eq([stripped_event(e) for e in new_events[:-1]], expected_fold(old_events),
       "the new log's events (seq, id and hash aside)")

    env.start()
    check("loaded the snapshot of seq %d" % s["head_seq"] in env.daemon.stderr_text(),
          "the daemon starts from the compaction's snapshot: " +
          env.daemon.stderr_text())
    got_head, got = walk(env, info, ranges)
    eq(got_head, {"seq": s["head_seq"], "hash": s["head_hash"]},
       "/v1/audit-events/head after compaction")
    same_views(got, old, "after compaction")
    env.daemon.kill9()
    # The same from the whole new log, without the snapshot.
    os.remove(os.path.join(env.data, s["snapshot"]))
    env.start()
    check("loaded the snapshot" not in env.daemon.stderr_text(),
          "no snapshot left to load")
    same_views(walk(env, info, ranges)[1], old, "after compaction, from the log alone")
    env.daemon.kill9()
    h.verify_ok(env.data)


def test_default_retention_folds_nothing():
    """With the default retention (90 days) no usage is old enough: nothing
    is folded, every event is kept (usage ones too), and even the reports
    by the hour are the same."""
    ranges = Ranges()
    env, info = prepared()
    pinned, old = walk(env, info, ranges, hour=True)
    old_events = replay(env.data)
    env.daemon.kill9()
    segments = {n: open(os.path.join(env.data, n), "rb").read()
                for n in h.segment_names(env.data)}
    s = compact(env.data)
    eq(s["usage_events_folded"], 0, "usage events folded with 90 days' retention")
    eq(s["daily_totals"], 0, "daily totals")
    # Nothing to fold: the log is not rewritten (every seq, hash and audit
    # cursor stays good); only the snapshot of its head is written.
    eq((s["head_seq"], s["head_hash"]), (pinned["seq"], pinned["hash"]), "the head")
    eq({n: open(os.path.join(env.data, n), "rb").read()
        for n in h.segment_names(env.data)}, segments, "the segments, byte for byte")
    eq(replay(env.data), old_events, "every event, with its seq and hash")
    check(os.path.exists(os.path.join(env.data, s["snapshot"])), "the snapshot")
    env.start()
    check("loaded the snapshot of seq %d" % pinned["seq"] in env.daemon.stderr_text(),
          "the start uses it: " + env.daemon.stderr_text())
    same_views(walk(env, info, ranges, hour=True)[1], old,
               "after a compaction that folded nothing")
    env.daemon.kill9()
    h.verify_ok(env.data)


def _usage_of(data, key_ids):
    """Successes and failures logged for these keys, summed."""
    return sum(e["data"]["usage"]["successes"] + e["data"]["usage"]["failures"]
               for e in usage_events(data) if e["target"]["id"] in key_ids)


def _wait_usage(data, key_id, n):
    """Waits until n calls of the key are in the log."""
    h.wait_until(lambda: _usage_of(data, {key_id}) == n, 10, 0.05,
                 "%d calls of %s in the log" % (n, key_id))


def _reports(env, ranges, key_ids):
    c = env.client()
    out = {"org": expect(c.get("/v1/usage", query=ranges.day), 200).json}
    for k in key_ids:
        out[k] = expect(c.get("/v1/api-keys/%s/usage" % k, query=ranges.day), 200).json
    return out


def test_flow_ties_keep_their_order():
    """The organization's usage report lists flows most requests first,
    ties by name (docs/api-notes.md, "Usage reports"): not in the order the
    organization first saw them, which a compaction changes. Key A uses
    flow zeta, then key B flow alpha, then A again (no flow), each in its
    own flush. Folding writes each key's daily total where its last event
    of the day was, so B's total (alpha) comes before A's (zeta) in the new
    log: the report must be the same."""
    ranges = Ranges()
    env = h.Env(config=FAST)
    c = env.client()
    a, sa = h.create_key(c, "a")
    b, sb = h.create_key(c, "b")
    for key, secret, flow, logged in ((a, sa, "zeta", 1), (b, sb, "alpha", 1),
                                      (a, sa, None, 2)):
        eq(_verify(env.port, secret, flow=flow)["code"], "VALID", "verify")
        _wait_usage(env.data, key["id"], logged)
    env.daemon_kw["config"] = QUIET
    env.restart()
    before = _reports(env, ranges, [a["id"], b["id"]])
    eq(before["org"]["flows"], [{"flow": "alpha", "requests": 1},
                                {"flow": "zeta", "requests": 1}], "flows before")
    env.daemon.kill9()
    compact(env.data, "--usage-retention-days", "0")
    env.start()
    after = _reports(env, ranges, [a["id"], b["id"]])
    eq(after["org"]["flows"], before["org"]["flows"],
       "the org's flows (a tie) after folding")
    eq(after, before, "the usage reports after folding")


def test_daily_total_of_more_than_64_flows():
    """One event holds at most 64 flows; a key used by 72 flows in a day
    (8 new ones per flush) folds into more than one event, which together
    keep every flow's count: the reports are the same, the log verifies."""
    ranges = Ranges()
    env = h.Env(config=FAST)
    c = env.client()
    k, secret = h.create_key(c, "many flows")
    for r in range(9):
        # A key counts 8 flows apart per flush interval: each round is
        # logged before the next begins.
        for i in range(8):
            eq(_verify(env.port, secret, flow="f%02d" % (8 * r + i))["code"], "VALID",
               "verify")
        _wait_usage(env.data, k["id"], 8 * (r + 1))
    env.daemon_kw["config"] = QUIET
    env.restart()
    before = _reports(env, ranges, [k["id"]])
    eq(len(before[k["id"]]["flows"]), 72, "flows of the key before")
    env.daemon.kill9()
    compact(env.data, "--usage-retention-days", "0")
    totals = [e for e in usage_events(env.data) if e["target"]["id"] == k["id"]]
    eq(len(totals), 2, "the key's daily total: 64 flows, then 8 more")
    flows = [f for e in totals for f in e["data"].get("flows", [])]
    eq(sorted((f["flow"], f["successes"], f["failures"]) for f in flows),
       [("f%02d" % i, 1, 0) for i in range(72)], "every flow once, with its count")
    eq(sum(e["data"]["usage"]["successes"] for e in totals), 72, "successes")
    h.verify_ok(env.data)
    env.start()
    eq(_reports(env, ranges, [k["id"]]), before, "the usage reports after folding")


def test_org_flow_names_cap_survives_folding():
    """An organization names at most 1024 distinct flows; calls naming
    others count in the totals only (docs/api-notes.md): the first 1024
    the fold sees get names. Key A uses 8 flows first; then 128 keys use 8
    new flows each (1024 more: the last 8 are past the cap); then A is used
    again. Folding moves A's daily total after the others', so the fold of
    the new log sees A's flows after 1024 others: the same flows must stay
    named (A's report keeps its flows), or the compaction changed the
    state beyond the per-day buckets it documents."""
    ranges = Ranges()
    env = h.Env(config=FAST)
    c = env.client()
    a, sa = h.create_key(c, "a")
    others = [h.create_key(c, "k%03d" % i) for i in range(128)]
    other_ids = {k["id"] for k, _ in others}
    for i in range(8):
        eq(_verify(env.port, sa, flow="a%d" % i)["code"], "VALID", "verify")
    _wait_usage(env.data, a["id"], 8)
    for j, (_, secret) in enumerate(others):
        for i in range(8):
            eq(_verify(env.port, secret, flow="k%03d-%d" % (j, i))["code"], "VALID",
               "verify")
    h.wait_until(lambda: _usage_of(env.data, other_ids) == 1024, 20, 0.1,
                 "the other keys' 1024 verifications in the log")
    eq(_verify(env.port, sa)["code"], "VALID", "verify")
    _wait_usage(env.data, a["id"], 9)
    env.daemon_kw["config"] = QUIET
    env.restart()
    before = _reports(env, ranges, [a["id"]])
    eq([f["flow"] for f in before[a["id"]]["flows"]], ["a%d" % i for i in range(8)],
       "A's flows before (named: the first the org saw)")
    eq(len(before["org"]["flows"]), 1024, "flows named by the org")
    env.daemon.kill9()
    compact(env.data, "--usage-retention-days", "0")
    env.start()
    after = _reports(env, ranges, [a["id"]])
    eq([f["flow"] for f in after[a["id"]]["flows"]],
       [f["flow"] for f in before[a["id"]]["flows"]], "A's flows after folding")
    eq(after, before, "the usage reports after folding")


# --------------------------------------------------------------------------
# The daemon goes on

def test_daemon_goes_on_after_compaction():
    """After a compaction the daemon writes on from the new head; a
    restart keeps what it wrote; the log can be compacted again and again
    (each LogCompacted names the head before it, and the earlier one is kept
    as history)."""
    env, info = prepared()
    first = head(env)
    env.daemon.kill9()      # a clean stop would log the usage of that call
    s1 = compact(env.data, "--usage-retention-days", "0")
    env.start()
    c = env.client()
    k, secret = h.create_key(c, "after compaction")
    eq(_verify(env.port, secret)["code"], "VALID", "the new key verifies")
    moved = head(env)
    check(moved["seq"] > s1["head_seq"], "the head moved on: %r" % moved)
    env.restart()
    c = env.client()
    eq(expect(c.get("/v1/api-keys/%s" % k["id"]), 200).json["name"],
       "after compaction", "the key made after compaction, after a restart")
    eq(h.me(c, key=secret)["key_id"], k["id"], "its secret works")
    pinned = head(env)
    env.daemon.kill9()
    v = h.verify_ok(env.data)
    eq((v["head_seq"], v["head_hash"]), (pinned["seq"], pinned["hash"]),
       "verify's head is the daemon's")

    # A snapshot of the compacted log and its tail: the start uses it, and
    # verify checks it against the fold of the compacted log.
    res = h.run_tool("snapshot", "--data", env.data)
    eq(res.rc, 0, "keyledger snapshot after compaction: " + res.describe())
    eq(res.json()["seq"], pinned["seq"], "the snapshot's seq")
    h.verify_ok(env.data)
    env.start()
    check("loaded the snapshot of seq %d" % pinned["seq"] in env.daemon.stderr_text(),
          "the newest snapshot is used: " + env.daemon.stderr_text())
    env.daemon.kill9()

    s2 = compact(env.data, "--usage-retention-days", "0")
    eq(s2["events_before"], pinned["seq"] - s1["head_seq"] + s1["events_after"],
       "events_before of a log that starts after seq 1")
    eq(h.segment_names(env.data)[0], "%020d.log" % (pinned["seq"] + 1),
       "second compaction's first segment")
    eq(sorted(n for n in os.listdir(env.data) if n.startswith("snapshot-")),
       [s2["snapshot"]], "the snapshots left: the compaction's own")
    events = replay(env.data)
    comp = last_compacted(events)
    eq(len(comp), 2, "LogCompacted events after two compactions")
    check_compacted_event(comp[0], first["seq"], first["hash"])
    check_compacted_event(comp[1], pinned["seq"], pinned["hash"], s2)
    # At once again: one usage event per key and day already, nothing to
    # fold, so the log is left as it is.
    s3 = compact(env.data, "--usage-retention-days", "0")
    eq(s3["usage_events_folded"], 0, "usage folded again")
    eq((s3["head_seq"], s3["head_hash"]), (s2["head_seq"], s2["head_hash"]),
       "the head after compacting a compacted log again")
    eq(replay(env.data), events, "the events after compacting a compacted log again")
    h.verify_ok(env.data)
    env.start()
    c = env.client()
    eq(expect(c.get("/v1/api-keys/%s" % k["id"]), 200).json["name"],
       "after compaction", "the key after three compactions")
    h.create_key(c, "after three")
    env.stop()
    h.verify_ok(env.data)


# --------------------------------------------------------------------------
# Refusals

def test_refused_while_the_daemon_runs():
    """The daemon holds the lock: exit 1 naming it, and nothing on disk
    changes (no compact.tmp, the LOCK file untouched too)."""
    env, info = prepared()
    before = data_files(env.data)
    res = h.run_tool("compact", "--data", env.data, "--usage-retention-days", "0")
    eq(res.rc, 1, "compact while the daemon runs: " + res.describe())
    check("in use" in res.stderr, "the message names the lock: " + res.describe())
    eq(res.stdout, "", "no summary on a refusal")
    eq(leftovers(env.data), [], "leftovers of a refused compaction")
    after = data_files(env.data)
    eq(sorted(after), sorted(before), "files in the data dir")
    for n in before:
        check(after[n] == before[n], "%s changed" % n)
    env.stop()
    h.verify_ok(env.data)


def test_bad_usage_exits_2():
    env = h.Env(start=False)
    d = env.data
    before = data_files(d)
    cases = [
        ["compact"],
        ["compact", "--usage-retention-days", "0"],
        ["compact", "--data"],
        ["compact", "--data", d, "--usage-retention-days", "-1"],
        ["compact", "--data", d, "--usage-retention-days", "abc"],
        ["compact", "--data", d, "--usage-retention-days", "40000"],
        ["compact", "--data", d, "--usage-retention-days", "36501"],
        ["compact", "--data", d, "--usage-retention-days", ""],
        ["compact", "--data", d, "--usage-retention-days", "1.5"],
        ["compact", "--data", d, "--usage-retention-days"],
        ["compact", "--data", d, "--bogus"],
        ["compact", "--data", d, "stray"],
    ]
    for args in cases:
        res = h.run_tool(*args)
        eq(res.rc, 2, "exit status for bad usage: " + res.describe())
        check(res.stderr.strip(), "bad usage without a message: " + res.describe())
        eq(res.stdout, "", "bad usage printed on stdout: " + res.describe())
    eq(data_files(d), before, "the data dir after bad usage")
    # The ends of the range are fine.
    for days in ("0", "36500"):
        root, copy = h.copy_data(d)
        compact(copy, "--usage-retention-days", days)
        h.verify_ok(copy)
        h.remove_tree(root)
    # No log there: a user-facing failure, and no dir made.
    missing = os.path.join(env.root, "nope")
    res = h.run_tool("compact", "--data", missing)
    eq(res.rc, 1, "compact of a missing data dir: " + res.describe())
    check(res.stderr.strip(), "no message: " + res.describe())
    check(not os.path.exists(missing), "compact created the data dir")


def _refuses_damaged(data, what):
    before = data_files(data)
    res = h.run_tool("compact", "--data", data, "--usage-retention-days", "0")
    eq(res.rc, 1, "compact of %s: %s" % (what, res.describe()))
    check(res.stderr.strip(), "no message: " + res.describe())
    eq(res.stdout, "", "no summary for %s" % what)
    eq(leftovers(data), [], "leftovers after refusing %s" % what)
    after = data_files(data)
    # LOCK holds the pid of the last writer that opened the dir: compact
    # takes the lock before it reads the log.
    before.pop("LOCK", None)
    after.pop("LOCK", None)
    eq(sorted(after), sorted(before), "files after refusing %s" % what)
    for n in before:
        check(after[n] == before[n], "%s changed by refusing %s" % (n, what))
    return res


def test_damaged_log_refused_and_left_alone():
    """A flipped byte in an earlier record of a segment, and a record
    changed with its CRC made good (only the hash chain shows it): exit 1,
    every byte of the data dir as it was, no compact.tmp. Compacting the
    tampered log would hide the tampering in a fresh chain."""
    env, info = prepared()
    env.stop()
    segs = h.parse_log(env.data)
    check(len(segs) >= 2, "want several segments")

    root, data = h.copy_data(env.data)
    seg = segs[0]
    check(len(seg.records) >= 3, "want a few records in %s" % seg.name)
    rec = seg.records[len(seg.records) // 2]
    h.flip_byte(os.path.join(data, seg.name), rec.offset + 8 + rec.length // 2)
    res = _refuses_damaged(data, "a flipped byte")
    check(seg.name in res.stderr, "the message names segment %s: %s"
          % (seg.name, res.describe()))
    h.remove_tree(root)

    root, data = h.copy_data(env.data)
    seg = segs[-1] if len(segs[-1].records) >= 3 else segs[-2]
    path = os.path.join(data, seg.name)
    with open(path, "r+b") as f:
        raw = bytearray(f.read())
    rec = seg.records[len(seg.records) // 2]
    i = rec.offset + 8 + rec.length - 1           # the body's last byte
    raw[i] ^= 0x01
    payload = bytes(raw[rec.offset + 8:rec.end])
    raw[rec.offset + 4:rec.offset + 8] = h.crc32c(payload).to_bytes(4, "little")
    with open(path, "wb") as f:
        f.write(raw)
    res = h.run_tool("verify", "--data", data)
    eq(res.rc, 1, "verify sees the tampering: " + res.describe())
    _refuses_damaged(data, "a record changed with its CRC made good")
    h.remove_tree(root)


# --------------------------------------------------------------------------
# A stale compact.tmp

def test_full_disk_leaves_the_old_log():
    """A disk too full for the new log: exit 1 naming the problem, the old
    log byte for byte as it was and no compact.tmp left taking space; once
    there is room, the same compaction goes through."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise h.Skip("needs root to mount a small tmpfs (not root)")
    mnt = h.tempdir("kl-e2e-mnt-")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise h.Skip("mount -t tmpfs not permitted here: %s" % (
            p.stderr.decode("utf-8", "replace").strip() or "exit %d" % p.returncode))
    h.register_mount(mnt)
    data = os.path.join(mnt, "data")
    info = h.init(data)
    d = h.start_daemon(data, config={"usage_flush_ms": 50}, log_dir=h.tempdir())
    n = 0
    for _ in range(3):          # the owner key's usage over three flushes
        eq(_verify(d.port, info["key"])["code"], "VALID", "the owner key verifies")
        n = wait_flushed(data, n)
    d.stop()
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
    res = _refuses_damaged(data, "a log on a full disk")
    check("space" in res.stderr.lower(), "the message says the disk is full: "
          + res.describe())
    os.remove(filler)
    s = compact(data, "--usage-retention-days", "0")
    check(s["usage_events_folded"] >= 2, "the usage was folded: %r" % s)
    h.verify_ok(data)


def test_stale_uncommitted_compaction_is_removed():
    """A compact.tmp that never committed (a crash before the rename) is
    not the log: read-only tools ignore it, the daemon's start removes it
    and the state is as before."""
    ranges = Ranges()
    env, info = prepared()
    pinned, old = walk(env, info, ranges)
    env.daemon.kill9()
    tmp = os.path.join(env.data, "compact.tmp")
    os.mkdir(tmp)
    with open(os.path.join(tmp, "%020d.log" % (pinned["seq"] + 1)), "wb") as f:
        f.write(b"KLEDGERL" + b"\x00" * 56 + b"junk")
    with open(os.path.join(tmp, "MANIFEST"), "w") as f:
        f.write("keyledger-manifest 1\nfirst %020d.log\nlast %020d.log\n"
                % (pinned["seq"] + 1, pinned["seq"] + 1))
    v = h.verify_ok(env.data)
    eq(v["head_seq"], pinned["seq"], "verify reads the old log beside a compact.tmp")
    env.start()
    check(not os.path.exists(tmp), "the daemon's start removed compact.tmp")
    check("compact.tmp" in env.daemon.stderr_text(), "and said so: " +
          env.daemon.stderr_text())
    got_head, got = walk(env, info, ranges)
    eq(got_head, pinned, "the head")
    same_views(got, old, "after removing a stale compact.tmp")
    env.daemon.kill9()
    h.verify_ok(env.data)


# --------------------------------------------------------------------------
# A crash at each step

def _kill_lib():
    lib = os.environ.get("KL_FAULT_KILL_LIB") or os.path.join(
        h.build_dir(), "tests", "e2e", "libkl_fault_kill.so")
    if not os.path.exists(lib):
        raise h.Skip("the kill shim (KL_FAULT_KILL_LIB, libkl_fault_kill.so) "
                     "is not built")
    return lib


def _killed_at(lib, n, args, trace=None):
    """Runs `keyledger ARGS` with the shim killing it before its nth
    disk-changing call (0: never; trace: the file that lists the steps);
    returns (rc, stderr)."""
    env = dict(os.environ)
    asan = env.get("ASAN_OPTIONS", "")
    env.update({"LD_PRELOAD": lib, "KL_FAULT_KILL_AT": str(n),
                "ASAN_OPTIONS": (asan + ":" if asan else "") +
                                "verify_asan_link_order=0"})
    if trace:
        env["KL_FAULT_KILL_TRACE"] = trace
    try:
        p = subprocess.run([h.tool_path()] + list(args), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                           timeout=60)
    except subprocess.TimeoutExpired:
        fail("`keyledger %s` (killed at step %d) did not finish" % (" ".join(args), n))
    return p.returncode, p.stderr.decode("utf-8", "replace")


def _compact_killed_at(lib, data, n, trace=None):
    return _killed_at(lib, n, ["compact", "--data", data, "--usage-retention-days",
                               "0"], trace)


def _traced_steps(lib, data, args):
    """The disk-changing calls of a whole run of `keyledger ARGS` (which
    must succeed), one "N function [paths]" line each."""
    trace = os.path.join(os.path.dirname(data), "trace")
    rc, err = _killed_at(lib, 0, args, trace)
    eq(rc, 0, "`keyledger %s` with the shim counting only: %s" % (" ".join(args), err))
    with open(trace) as f:
        steps = [ln.rstrip("\n") for ln in f]
    os.remove(trace)
    eq([int(ln.split(" ", 1)[0]) for ln in steps], list(range(1, len(steps) + 1)),
       "trace step numbers")
    return steps


def _commit_step(steps, data):
    """The step that renames compact.tmp to compact.ready."""
    at = [i + 1 for i, ln in enumerate(steps)
          if ln.split(" ")[1:] == ["rename", os.path.join(data, "compact.tmp"),
                                   os.path.join(data, "compact.ready")]]
    eq(len(at), 1, "the commit rename in the trace: %s" % steps)
    return at[0]


def _crash_setup():
    """The crash tests' data dir: the history (several old segments) and
    an old snapshot, so that deleting old snapshots is a step too. Returns
    (env, info, ranges, old head, old views); the daemon is not running."""
    ranges = Ranges()
    env, info = prepared()
    old_head, old = walk(env, info, ranges, usage_events=True)
    env.daemon.kill9()
    res = h.run_tool("snapshot", "--data", env.data)
    eq(res.rc, 0, "keyledger snapshot: " + res.describe())
    check(len(h.segment_names(env.data)) >= 3, "want several old segments")
    return env, info, ranges, old_head, old


def _crash_views(data, info, ranges, key):
    """Starts a quiet daemon on data and walks it; returns (head, views,
    the daemon, still running)."""
    d = h.Daemon(data, config=QUIET)
    d.start()
    try:
        env = _EnvView(d, key)
        hd, v = walk(env, info, ranges, usage_events=True)
        return hd, v, d
    except BaseException:
        d.kill9()
        raise


class _EnvView(object):
    """Just enough of h.Env for walk() on a daemon of another data dir."""

    def __init__(self, daemon, key):
        self.daemon, self.key = daemon, key
        self.info = {"key_id": "key_" + h.check_secret(key).group(3)}

    @property
    def port(self):
        return self.daemon.port

    def client(self):
        return h.Client(self.daemon.port, self.key)


def _without_usage_events(v):
    return {name: ({k: x for k, x in part.items() if k != "usage events"}
                   if name.startswith("org ") else part)
            for name, part in v.items()}


def test_crash_at_each_step():
    """Kills `keyledger compact` before each call that changes the disk, in
    turn, on a fresh copy of one data dir. After each kill: a read-only
    verify passes or says the switch is half done; the daemon starts with
    the old state (killed at or before the commit rename) or the new one
    (after it), exactly, never a mix, and leaves no compact.tmp or
    compact.ready; verify passes; and compacting again from the killed
    copy works and ends in the new state."""
    lib = _kill_lib()
    env, info, ranges, old_head, old = _crash_setup()
    old_files = sorted(os.listdir(env.data))

    # The new state, and the steps of a whole run, traced.
    root, data = h.copy_data(env.data)
    steps = _traced_steps(lib, data, ["compact", "--data", data,
                                      "--usage-retention-days", "0"])
    commit = _commit_step(steps, data)
    new_head_seq = h.verify_ok(data)["head_seq"]
    new_head, new, d = _crash_views(data, info, ranges, env.key)
    d.kill9()
    eq(new_head["seq"], new_head_seq, "the daemon's head after a whole compaction")
    check(new_head["seq"] > old_head["seq"], "the compaction moved the head on")
    # The same state but for the usage events themselves (folded): so the
    # old and new views can be told apart, and a mix of the two logs (usage
    # counted twice, or lost) shows in the reports.
    d1 = diff(old, new)
    check(d1 is not None and "usage events" in d1, "old and new views differ in "
          "the usage events only, first: %s" % d1)
    same_views(_without_usage_events(new), _without_usage_events(old),
               "a whole compaction (usage events aside)")
    h.remove_tree(root)

    total = len(steps)
    # Every step is covered when there are few; with many (a big log writes
    # many batches) every step from the one before the commit on, where the
    # switch happens, and every k-th before it, where each step only adds
    # to compact.tmp: the test stays fast and still covers each kind.
    if total > 150:
        k = max(1, (commit - 1) // 100)
        todo = sorted(set(range(1, commit - 1, k)) | set(range(commit - 1, total + 2)))
    else:
        todo = list(range(1, total + 2))
    covered = refused = 0
    for n in todo:
        root, data = h.copy_data(env.data, tag="kl-e2e-crash-")
        rc, err = _compact_killed_at(lib, data, n)
        if n == total + 1:
            eq(rc, 0, "compact with the shim set past its last step (%d): %s"
               % (n, err))
            h.remove_tree(root)
            break
        eq(rc, -9, "compact killed at step %d (%s): %s" % (n, steps[n - 1], err))
        covered += 1
        switched = n > commit
        what = "killed at step %d of %d (%s; the commit is step %d)" % (
            n, total, steps[n - 1], commit)
        # (a) Readers without the lock: the old log before the commit, the
        # new one once the switch is done, and in between (compact.ready
        # there) a refusal that says so.
        half_done = os.path.exists(os.path.join(data, "compact.ready"))
        check(switched or not half_done, "%s: compact.ready before the commit"
              % what)
        res = h.run_tool("verify", "--data", data)
        if not half_done:
            eq(res.rc, 0, "%s: verify: %s" % (what, res.describe()))
            eq(res.json()["head_seq"], new_head["seq"] if switched else old_head["seq"],
               "%s: verify's head" % what)
        else:
            refused += 1
            for res in (res, h.run_tool("replay", "--data", data),
                        h.run_tool("state", "--data", data, "--at",
                                   h.fmt_time(time.time()))):
                eq(res.rc, 1, "%s: a reader of a half-done switch: %s"
                   % (what, res.describe()))
                check(COMMITTED in res.stderr, "%s: the message says the switch "
                      "is half done: %s" % (what, res.describe()))
                eq(res.stdout if res.args[0] != "verify" else "", "",
                   "%s: output of a refused %s" % (what, res.args[0]))
        # (b) The daemon finishes or throws away what the crash left.
        got_head, got, d = _crash_views(data, info, ranges, env.key)
        eq(leftovers(data), [], "%s: leftovers after the daemon's start" % what)
        files = sorted(os.listdir(data))
        if switched:
            eq(got_head["seq"], new_head["seq"], "%s: the head (new)" % what)
            same_views(got, new, "%s: the new state" % what)
            check(not set(files) & (set(old_files) - {"LOCK", "MANIFEST"}),
                  "%s: old files left: %s" % (what, files))
        else:
            eq(got_head, old_head, "%s: the head (old)" % what)
            same_views(got, old, "%s: the old state" % what)
            eq(files, old_files, "%s: the files of the old log" % what)
        d.stop()
        h.verify_ok(data)
        h.remove_tree(root)
        # (c) Compacting again after the crash works and ends in the new
        # state (after the commit there is nothing left to fold: the
        # finished switch is the log, left as it is).
        root, data = h.copy_data(env.data, tag="kl-e2e-crash-")
        rc, err = _compact_killed_at(lib, data, n)
        eq(rc, -9, "%s (again)" % what)
        s = compact(data, "--usage-retention-days", "0")
        comp = last_compacted(replay(data))
        eq(len(comp), 1, "%s, compacted again: LogCompacted events" % what)
        eq(comp[0]["data"]["through_seq"], old_head["seq"], "%s: the compaction's "
           "through_seq" % what)
        eq(s["usage_events_folded"] == 0, switched, "%s: folded again only if the "
           "first never committed" % what)
        eq(s["head_seq"], new_head["seq"], "%s: the head compacted again" % what)
        got_head, got, d = _crash_views(data, info, ranges, env.key)
        d.kill9()
        same_views(got, new, "%s, compacted again: the new state" % what)
        h.remove_tree(root)
    else:
        fail("compact was still being killed at step %d" % todo[-1])
    sys.stderr.write("  crash test: %d of %d steps covered (commit at step %d; "
                     "%d left a half-done switch)\n" % (covered, total, commit, refused))
    eq(covered, len(todo) - 1, "steps covered")
    check(refused > 0, "no step left a half-done switch for the readers to refuse")


def test_crash_while_finishing_a_switch():
    """A compaction killed just after its commit leaves compact.ready; the
    next writer finishes the switch, and may itself be killed at any of its
    steps: `keyledger snapshot` (a writer) is killed before each of its
    disk-changing calls in turn. After each kill the readers see the new
    log or refuse (never the old one, never a mix) and one more writer
    finishes the switch: the new head, no leftovers, no old files."""
    lib = _kill_lib()
    env, info, ranges, _, _ = _crash_setup()
    old_files = set(os.listdir(env.data)) - {"LOCK", "MANIFEST"}
    root, data = h.copy_data(env.data)
    steps = _traced_steps(lib, data, ["compact", "--data", data,
                                      "--usage-retention-days", "0"])
    commit = _commit_step(steps, data)
    new_head = h.verify_ok(data)
    h.remove_tree(root)
    # Killed right after the commit: nothing of the switch done yet.
    root, base = h.copy_data(env.data)
    rc, err = _compact_killed_at(lib, base, commit + 1)
    eq(rc, -9, "compact killed right after the commit: " + err)
    check(os.path.exists(os.path.join(base, "compact.ready")), "compact.ready")
    covered = 0
    base_hash = None
    for m in range(1, 200):
        root2, data = h.copy_data(base, tag="kl-e2e-finish-")
        rc, err = _killed_at(lib, m, ["snapshot", "--data", data])
        what = "the finishing writer killed at its step %d" % m
        if rc == 0:
            eq(leftovers(data), [], "%s: never killed, leftovers" % what)
            h.remove_tree(root2)
            break
        eq(rc, -9, "%s: %s" % (what, err))
        covered += 1
        res = h.run_tool("verify", "--data", data)
        if os.path.exists(os.path.join(data, "compact.ready")):
            eq(res.rc, 1, "%s: verify of a half-done switch: %s" % (what, res.describe()))
            check(COMMITTED in res.stderr, "%s: the message: %s" % (what, res.describe()))
        else:
            eq(res.rc, 0, "%s: verify: %s" % (what, res.describe()))
            eq(res.json()["head_seq"], new_head["head_seq"], "%s: verify's head" % what)
        res = h.run_tool("snapshot", "--data", data)
        eq(res.rc, 0, "%s: the next writer: %s" % (what, res.describe()))
        v = h.verify_ok(data)
        eq(v["head_seq"], new_head["head_seq"], "%s: the head once finished" % what)
        # The base's LogCompacted has its own time: the same hash every time.
        base_hash = base_hash or v["head_hash"]
        eq(v["head_hash"], base_hash, "%s: the head hash once finished" % what)
        eq(leftovers(data), [], "%s: leftovers once finished" % what)
        left = old_files & set(os.listdir(data))
        check(not left, "%s: old files once finished: %s" % (what, sorted(left)))
        h.remove_tree(root2)
    else:
        fail("keyledger snapshot was still being killed after 200 steps")
    check(covered >= 8, "the finish has a step per move and delete: only %d "
          "steps" % covered)
    sys.stderr.write("  finishing crash test: %d steps covered\n" % covered)
    # And the daemon's start, too, from the base as it was left.
    d = h.Daemon(base, config=QUIET)
    d.start()
    got_head, _ = walk(_EnvView(d, env.key), info, ranges)
    d.kill9()
    eq(got_head, {"seq": new_head["head_seq"], "hash": base_hash}, "the daemon's head")
    eq(leftovers(base), [], "leftovers after the daemon's start")


if __name__ == "__main__":
    h.main(globals())
