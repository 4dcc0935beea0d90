"""
End-to-end tests of the usage reports (contract section 4 "Usage":
GET /v1/api-keys/{id}/usage and GET /v1/usage), with the choices of
docs/api-notes.md "Usage reports": what counts as a request, defaults,
whole buckets, the org report's `keys` rows, the CSV columns and headers.

The daemon runs with a short usage flush interval (`usage_flush_ms`) so the
counts reach the log quickly; the crash test kills it with kill -9 and
checks that a report loses at most what came after the last flush and never
counts a call twice.

Run: KL_BUILD_DIR=build python3 tests/e2e/test_usage.py [name-substring...]
"""

import csv
import io
import json
import os
import sys
import time

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, expect_error, fail  # noqa: E402

FLUSH_MS = 100
QUIET = {"usage_flush_ms": 3600000}  # no flush but the one at a clean stop
HOUR = 3600
DAY = 86400
KEY_USAGE = "/v1/api-keys/%s/usage"
ORG_USAGE = "/v1/usage"
REPORT_FIELDS = {"from", "to", "granularity", "totals", "buckets", "flows"}
TOTALS_FIELDS = {"requests", "successes", "failures", "success_rate"}
BUCKET_FIELDS = {"start", "requests", "successes", "failures"}
KEY_CSV_HEAD = ["start", "requests", "successes", "failures"]
ORG_CSV_HEAD = ["key_id", "start", "requests", "successes", "failures"]


def floor_to(t, step):
    return int(t // step * step)


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# --------------------------------------------------------------------------
# Helpers

def verify(port, secret, flow=None, cost=None, permission=None):
    """POST /v1/keys/verify without Authorization; returns the code."""
    body = {"key": secret}
    if flow is not None:
        body["flow"] = flow
    if cost is not None:
        body["cost"] = cost
    if permission is not None:
        body["permission"] = permission
    r = expect(h.Client(port, None).post("/v1/keys/verify", body), 200)
    return r.json["code"]


def wrong_secret(secret):
    """The key's id with another random part and a valid checksum: the
    daemon finds the key and refuses the secret."""
    m = h.check_secret(secret)
    other = "".join(h.BASE62[(h.BASE62.index(ch) + 1) % 62] for ch in m.group(4))
    return h.make_secret(m.group(3), other)


def check_totals(t, what):
    check(isinstance(t, dict) and set(t) == TOTALS_FIELDS,
          "%s must be exactly %s: %r" % (what, sorted(TOTALS_FIELDS), t))
    for f in ("requests", "successes", "failures"):
        check(is_count(t[f]), "%s.%s %r" % (what, f, t[f]))
    eq(t["requests"], t["successes"] + t["failures"],
       "%s.requests = successes + failures" % what)
    rate = t["success_rate"]
    check(isinstance(rate, (int, float)) and not isinstance(rate, bool),
          "%s.success_rate must be a JSON number: %r" % (what, rate))
    want = t["successes"] / t["requests"] if t["requests"] else 0.0
    check(abs(rate - want) < 1e-5, "%s.success_rate %r, expected %r" % (
        what, rate, want))


def check_report(body, granularity, key_id=None):
    """Shape and internal consistency of a JSON report; returns it."""
    want = set(REPORT_FIELDS) | ({"key_id"} if key_id else {"keys"})
    check(isinstance(body, dict) and set(body) == want,
          "report fields: expected %s, got %s" % (sorted(want), sorted(body)))
    if key_id:
        eq(body["key_id"], key_id, "key_id")
    eq(body["granularity"], granularity, "granularity")
    step = DAY if granularity == "day" else HOUR
    t_from = h.parse_time(body["from"], "from")
    t_to = h.parse_time(body["to"], "to")
    eq(t_from % step, 0, "from is on a %s boundary (%s)" % (granularity,
                                                             body["from"]))
    eq(t_to % step, 0, "to is on a %s boundary (%s)" % (granularity, body["to"]))
    check(t_to > t_from, "to after from")
    check_totals(body["totals"], "totals")
    buckets = body["buckets"]
    eq(len(buckets), int((t_to - t_from) // step), "number of buckets from %s "
       "to %s" % (body["from"], body["to"]))
    for i, b in enumerate(buckets):
        check(isinstance(b, dict) and set(b) == BUCKET_FIELDS,
              "bucket fields %r" % (b,))
        eq(h.parse_time(b["start"]), t_from + i * step, "bucket %d start" % i)
        eq(b["requests"], b["successes"] + b["failures"], "bucket requests")
    for f in ("requests", "successes", "failures"):
        eq(sum(b[f] for b in buckets), body["totals"][f],
           "sum of the buckets' %s vs totals" % f)
    check(isinstance(body["flows"], list), "flows is a list")
    for fl in body["flows"]:
        check(isinstance(fl, dict) and set(fl) == {"flow", "requests"},
              "flow row %r" % (fl,))
        check(isinstance(fl["flow"], str) and is_count(fl["requests"]) and
              fl["requests"] > 0, "flow row %r" % (fl,))
    eq(len({fl["flow"] for fl in body["flows"]}), len(body["flows"]),
       "each flow listed once")
    if not key_id:
        rows = body["keys"]
        check(isinstance(rows, list), "keys is a list")
        for row in rows:
            check(isinstance(row, dict) and set(row) == {"key_id", "totals"},
                  "keys row %r" % (row,))
            check(h.is_id(row["key_id"], "key"), "keys row key_id %r" % row)
            check_totals(row["totals"], "keys[%s].totals" % row["key_id"])
            check(row["totals"]["requests"] > 0, "a key without use in the "
                  "range is listed: %r" % (row,))
        ids = [row["key_id"] for row in rows]
        eq(len(set(ids)), len(ids), "each key listed once")
        for f in ("requests", "successes", "failures"):
            eq(sum(row["totals"][f] for row in rows), body["totals"][f],
               "sum of the keys' %s vs the org's totals" % f)
    return body


def report(client, key_id=None, granularity="day", **query):
    q = dict(query)
    if granularity is not None:
        q["granularity"] = granularity
    path = KEY_USAGE % key_id if key_id else ORG_USAGE
    r = expect(client.get(path, query=q), 200)
    return check_report(r.json, granularity or "day", key_id)


def report_csv(client, key_id=None, granularity="day", **query):
    """Fetches format=csv; checks the headers and the line ends; returns the
    rows parsed by Python's csv module (header first)."""
    q = dict(query, format="csv", granularity=granularity)
    path = KEY_USAGE % key_id if key_id else ORG_USAGE
    r = expect(client.get(path, query=q, validate=False), 200)
    h.check_request_id(r)
    ct = (r.header("Content-Type") or "").lower().replace(" ", "")
    eq(ct, "text/csv;charset=utf-8", "CSV Content-Type")
    name = key_id or h.me(client)["org_id"]
    eq(r.header("Content-Disposition"),
       'attachment; filename="usage-%s-%s.csv"' % (name, granularity),
       "CSV Content-Disposition")
    text = r.body.decode("utf-8")
    check(text.endswith("\r\n"), "CSV must end with CRLF")
    check("\n" not in text.replace("\r\n", ""), "CSV lines must end with CRLF, "
          "not a bare LF")
    return list(csv.reader(io.StringIO(text, newline="")))


def flows_of(body):
    return {fl["flow"]: fl["requests"] for fl in body["flows"]}


def key_rows(body):
    return {row["key_id"]: row["totals"] for row in body["keys"]}


def counts(t):
    return (t["requests"], t["successes"], t["failures"])


def csv_matches(rows, body, with_key):
    """CSV rows (after the header) equal the JSON buckets."""
    want = [[b["start"], str(b["requests"]), str(b["successes"]),
             str(b["failures"])] for b in body["buckets"]]
    if with_key:
        want = [[body["key_id"]] + w for w in want]
    eq(rows, want, "CSV rows vs the JSON report's buckets")


# --------------------------------------------------------------------------
# Counts, flows, buckets and CSV after a clean restart

def test_counts_flows_buckets_and_csv_after_restart():
    env = h.Env(config={"usage_flush_ms": FLUSH_MS})
    c = env.client()
    t_start = time.time()
    a, sec_a = h.create_key(c, "verified")
    b, sec_b = h.create_key(c, "checkout-only",
                            permissions={"access": "flows", "flows": ["checkout"]})
    m, sec_m = h.create_key(c, "management")
    d, sec_d = h.create_key(c, "deleted later")
    unused, _ = h.create_key(c, "never used")
    port = env.port

    # A: 3 plain, 2 x checkout at cost 2, 1 search, 1 at cost 5: 13 units
    # accepted; 2 wrong secrets naming search: 2 failures.
    for _ in range(3):
        eq(verify(port, sec_a), "VALID", "plain verification")
    for _ in range(2):
        eq(verify(port, sec_a, flow="checkout", cost=2), "VALID", "checkout")
    eq(verify(port, sec_a, flow="search"), "VALID", "search")
    eq(verify(port, sec_a, cost=5), "VALID", "cost 5")
    bad_a = wrong_secret(sec_a)
    for _ in range(2):
        eq(verify(port, bad_a, flow="search"), "NOT_FOUND", "wrong secret")
    # B (flows key): 2 checkout accepted; search and no flow are FORBIDDEN.
    for _ in range(2):
        eq(verify(port, sec_b, flow="checkout"), "VALID", "B checkout")
    eq(verify(port, sec_b, flow="search"), "FORBIDDEN", "B search")
    eq(verify(port, sec_b), "FORBIDDEN", "B without flow")
    # M: 4 management calls accepted, 1 with a wrong secret (401).
    cm = h.Client(port, sec_m)
    for _ in range(4):
        h.me(cm)
    expect_error(cm.get("/v1/api-keys", key=wrong_secret(sec_m)), 401,
                 "unauthenticated")
    # D: used, then deleted: gone from its own route, still in the org's.
    for _ in range(2):
        eq(verify(port, sec_d, flow="checkout"), "VALID", "D checkout")
    expect(c.delete("/v1/api-keys/%s" % d["id"]), 204)

    expected = {
        a["id"]: ((15, 13, 2), {"checkout": 4, "search": 3}),
        b["id"]: ((4, 2, 2), {"checkout": 2, "search": 1}),
        m["id"]: ((5, 4, 1), {}),
        d["id"]: ((2, 2, 0), {"checkout": 2}),
    }
    owner_calls = 6                 # 5 creations and 1 deletion so far
    env.restart(config=QUIET)       # a clean stop flushes; replay rebuilds
    c = env.client()
    t_end = time.time()

    for kid in (a["id"], b["id"], m["id"]):
        for gran in ("day", "hour"):
            body = report(c, kid, gran)
            eq(counts(body["totals"]), expected[kid][0],
               "%s totals (requests, successes, failures), %s" % (kid, gran))
            eq(flows_of(body), expected[kid][1], "%s flows" % kid)
    eq([fl["flow"] for fl in report(c, a["id"])["flows"]], ["checkout", "search"],
       "flows, most requests first")

    # A key without use: zeros, success_rate 0, zero-filled buckets.
    body = report(c, unused["id"])
    eq(counts(body["totals"]), (0, 0, 0), "unused key totals")
    eq(body["totals"]["success_rate"], 0, "success_rate without requests")
    eq(len(body["buckets"]), 7, "default day report: 7 buckets")
    eq(body["flows"], [], "unused key flows")

    # The deleted key: 404 on its route, still counted for the org.
    expect_error(c.get(KEY_USAGE % d["id"]), 404, "not_found")
    org = report(c, None, "day")
    rows = key_rows(org)
    for kid, (want, _) in expected.items():
        check(kid in rows, "org report lacks key %s: %r" % (kid, sorted(rows)))
        eq(counts(rows[kid]), want, "org row of %s" % kid)
    check(unused["id"] not in rows, "a key without use has no org row")
    owner = env.info["key_id"]
    eq(set(rows), set(expected) | {owner}, "keys with use in the org report")
    check(rows[owner]["successes"] >= owner_calls, "owner key row %r: at least "
          "%d calls were made with it" % (rows[owner], owner_calls))
    eq(flows_of(org), {"checkout": 8, "search": 4}, "org-wide flows")

    # Buckets: every call fell in the hours / days between t_start and t_end.
    for gran, step in (("hour", HOUR), ("day", DAY)):
        q = {"from": h.fmt_time(t_start - 2 * step - 1),
             "to": h.fmt_time(t_end + step / 2)}
        for kid in (a["id"], None):
            body = report(c, kid, gran, **q)
            eq(h.parse_time(body["from"]), floor_to(t_start - 2 * step - 1, step),
               "from widened to the start of its %s" % gran)
            check(h.parse_time(body["to"]) >= t_end + step / 2,
                  "to widened to the end of its %s" % gran)
            first, last = floor_to(t_start, step), floor_to(t_end, step)
            for bk in body["buckets"]:
                if bk["requests"]:
                    check(first <= h.parse_time(bk["start"]) <= last,
                          "use in bucket %s, outside the test's %ss" % (
                              bk["start"], gran))
            if kid:
                eq(counts(body["totals"]), expected[kid][0], "A totals, " + gran)

    # Defaults: the last 7 days / 24 hours, ending with the current one.
    before = time.time()
    day = report(c, a["id"], "day")
    hour = report(c, a["id"], "hour")
    after = time.time()
    eq(len(day["buckets"]), 7, "default day buckets")
    eq(len(hour["buckets"]), 24, "default hour buckets")
    check(h.parse_time(day["buckets"][-1]["start"]) in
          {floor_to(before, DAY), floor_to(after, DAY)}, "last day bucket is today")
    check(h.parse_time(hour["buckets"][-1]["start"]) in
          {floor_to(before, HOUR), floor_to(after, HOUR)},
          "last hour bucket is the current hour")
    body = report(c, a["id"], None)     # no granularity: day
    eq(len(body["buckets"]), 7, "granularity defaults to day")

    # CSV: per key and org, the same numbers as JSON.
    for gran in ("day", "hour"):
        for kid in (a["id"], b["id"], unused["id"]):
            rows_csv = report_csv(c, kid, gran)
            eq(rows_csv[0], KEY_CSV_HEAD, "per-key CSV header")
            csv_matches(rows_csv[1:], report(c, kid, gran), with_key=False)
        rows_csv = report_csv(c, None, gran)
        eq(rows_csv[0], ORG_CSV_HEAD, "org CSV header")
        org = report(c, None, gran)
        by_key = {}
        for row in rows_csv[1:]:
            eq(len(row), 5, "org CSV row width")
            by_key.setdefault(row[0], []).append(row)
        eq(sorted(by_key), sorted(key_rows(org)), "org CSV keys vs JSON keys rows")
        eq([r[0] for r in rows_csv[1:]], sorted(r[0] for r in rows_csv[1:]),
           "org CSV rows in key id order")
        for kid, krows in by_key.items():
            eq(len(krows), len(org["buckets"]), "org CSV rows of %s" % kid)
            eq([r[1] for r in krows], [bk["start"] for bk in org["buckets"]],
               "org CSV starts of %s" % kid)
            got = [sum(int(r[i]) for r in krows) for i in (2, 3, 4)]
            eq(tuple(got), counts(key_rows(org)[kid]), "org CSV sums of %s" % kid)
        for i, bk in enumerate(org["buckets"]):
            eq(sum(int(krows[i][2]) for krows in by_key.values()),
               bk["requests"], "org CSV requests in %s" % bk["start"])


# --------------------------------------------------------------------------
# Bad queries, scoping and access

def test_bad_query_values_are_400_with_field():
    env = h.Env(config={"usage_flush_ms": FLUSH_MS})
    c = env.client()
    kid = env.info["key_id"]
    now = time.time()
    cases = [
        ({"granularity": "minute"}, "granularity"),
        ({"granularity": ""}, "granularity"),
        ({"format": "xml"}, "format"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-02-30T00:00:00Z"}, "from"),
        ({"to": "2026-01-15 10:30:00"}, "to"),
        ({"to": "x" * 200}, "to"),
        ({"from": h.fmt_time(now), "to": h.fmt_time(now - HOUR)}, "from"),
        ({"from": h.fmt_time(now), "to": h.fmt_time(now)}, "from"),
        ({"from": h.fmt_time(now + DAY)}, "from"),        # after the default to
        ({"granularity": "hour", "from": h.fmt_time(now - 60 * DAY)}, "from"),
        ({"granularity": "day", "from": "2000-01-01T00:00:00Z"}, "from"),
        ({"format": "csv", "granularity": "hour",
          "from": h.fmt_time(now - 50 * DAY)}, "from"),
        ({"to": "9999-12-31T00:00:00.001Z"}, "to"),
    ]
    for path in (KEY_USAGE % kid, ORG_USAGE):
        for q, field in cases:
            r = c.get(path, query=q)
            expect_error(r, 400, "invalid_argument", field=field)
    # Bounds are inclusive: 1000 hour buckets pass; an offset works when its
    # '+' is sent encoded (a bare '+' in a query string is a space).
    start = floor_to(now, HOUR) - 999 * HOUR
    body = report(c, kid, "hour", **{"from": h.fmt_time(start)})
    eq(len(body["buckets"]), 1000, "1000 hour buckets")
    r = c.get(KEY_USAGE % kid + "?from=2026-01-15T10:30:00+01:00"
              "&to=2026-01-15T12:00:00Z&granularity=hour")
    expect_error(r, 400, "invalid_argument", field="from")
    r = expect(c.get(KEY_USAGE % kid + "?from=2026-01-15T10:30:00%2B01:00"
                     "&to=2026-01-15T12:00:00Z&granularity=hour"), 200)
    body = check_report(r.json, "hour", kid)
    eq((body["from"], body["to"]), ("2026-01-15T09:00:00.000Z",
                                    "2026-01-15T12:00:00.000Z"),
       "range of 09:30Z..12:00Z in whole hours")
    body = report(c, kid, "day", **{"to": "9999-12-31T00:00:00Z"})
    eq((body["from"], body["to"]), ("9999-12-24T00:00:00.000Z",
                                    "9999-12-31T00:00:00.000Z"), "the latest range")


def test_org_csv_row_bound():
    """The org CSV has one row per used key and bucket, at most 100 000."""
    env = h.Env(fsync="off", config={"usage_flush_ms": FLUSH_MS})
    c = env.client()
    nkeys = 100                         # and the owner key: 101 with use
    for i in range(nkeys):
        _, sec = h.create_key(c, "k%d" % i)
        eq(verify(env.port, sec), "VALID", "verification")
    h.wait_until(lambda: len(report(c)["keys"]) == nkeys + 1, 5,
                 what="every key's use in the report")
    hour = floor_to(time.time(), HOUR)
    q = {"format": "csv", "granularity": "hour", "to": h.fmt_time(hour + HOUR)}
    q["from"] = h.fmt_time(hour - 989 * HOUR)           # 990 buckets
    rows = report_csv(c, None, "hour", **{k: v for k, v in q.items()
                                          if k not in ("format", "granularity")})
    eq(len(rows), 1 + (nkeys + 1) * 990, "org CSV rows: header + keys x buckets")
    q["from"] = h.fmt_time(hour - 999 * HOUR)           # 1000 buckets
    expect_error(c.get(ORG_USAGE, query=q), 400, "invalid_argument", field="from")


def test_other_org_and_unknown_keys_are_404():
    env = h.Env(start=False, config={"usage_flush_ms": FLUSH_MS})
    other = h.org_create(env.data)
    env.start()
    c = env.client()
    oc = env.client(other["key"])
    for _ in range(3):
        h.me(oc)                    # the other org's key gets some use
    expect_error(c.get(KEY_USAGE % other["key_id"]), 404, "not_found")
    expect_error(oc.get(KEY_USAGE % env.info["key_id"]), 404, "not_found")
    expect_error(c.get(KEY_USAGE % h.random_id("key")), 404, "not_found")
    expect_error(c.get(KEY_USAGE % "key_nope"), 404, "not_found")
    expect_error(c.get(KEY_USAGE % env.info["user_id"]), 404, "not_found")
    h.me(c)
    h.wait_until(lambda: key_rows(report(oc)).get(other["key_id"], {}).get(
        "requests", 0) >= 4, 5, what="the other org's use in its report")
    mine = key_rows(report(c))
    theirs = key_rows(report(oc))
    eq(set(mine), {env.info["key_id"]}, "org report: only this org's keys")
    eq(set(theirs), {other["key_id"]}, "the other org's report: only its keys")
    eq([r[0] for r in report_csv(oc)[1:]],
       [other["key_id"]] * 7, "the other org's CSV: only its key")
    # Management read access: a flows key and a member's key are refused.
    fk, fsec = h.create_key(c, "flows", permissions={"access": "flows",
                                                     "flows": ["x"]})
    for path in (KEY_USAGE % fk["id"], ORG_USAGE):
        expect_error(c.get(path, key=fsec), 403, "permission_denied")
        expect_error(c.get(path, key=None), 401, "unauthenticated")
    ro, rosec = h.create_key(c, "ro", permissions={"access": "read_only"})
    expect(c.get(ORG_USAGE, key=rosec), 200)
    expect(c.get(KEY_USAGE % fk["id"], key=rosec), 200)


# --------------------------------------------------------------------------
# Crash: at most the last flush interval is lost, nothing counted twice

def test_kill9_loses_at_most_the_last_interval_and_never_counts_twice():
    env = h.Env(config={"usage_flush_ms": FLUSH_MS})
    c = env.client()
    k, sec = h.create_key(c, "crash")
    port = env.port
    n, m = 30, 30
    for _ in range(n):
        eq(verify(port, sec, flow="f"), "VALID", "verification before the flush")
    # More than one flush interval: until the report shows all n (a report
    # shows usage once its event is durable and applied).
    time.sleep(2 * FLUSH_MS / 1000.0)
    h.wait_until(lambda: report(c, k["id"], "hour")["totals"]["requests"] == n,
                 10, what="the first %d verifications in the report" % n)
    for _ in range(m):
        eq(verify(port, sec, flow="f"), "VALID", "verification after the flush")
    env.daemon.kill9()
    env.start()
    c = env.client()
    body = report(c, k["id"], "hour")
    got = body["totals"]["requests"]
    check(n <= got <= n + m, "after kill -9: %d requests recorded; expected "
          "between %d (flushed before) and %d (all made)" % (got, n, n + m))
    eq(body["totals"]["failures"], 0, "failures")
    eq(flows_of(body), {"f": got}, "flow counts match the totals")
    # Replaying the same log again counts nothing twice.
    env.restart()
    again = report(env.client(), k["id"], "hour")
    eq(again["totals"]["requests"], got, "requests after a second restart")
    env.stop()
    h.verify_ok(env.data)



# --------------------------------------------------------------------------
# Many keys: a flush goes out in bounded commands, and stays exact

FLUSH_CMD_MAX = 256     # events per flush command (daemon/usage.c CHUNK_EVENTS)
FLUSH_TYPES = {"UsageRecorded", "AuthFailed"}


def log_commands(data):
    """The log's commands, each the list of its records' seqs: a record's
    payload is [seq, prev hash, more, ...]; `more` (byte 44) is true on every
    record of a command but its last."""
    cmds, cur = [], []
    for seg in h.parse_log(data):
        for r in seg.records:
            p = r.payload
            eq((p[0], p[1], p[10], p[11]), (0x9a, 0xcf, 0xc4, 0x20),
               "record prefix at offset %d" % r.offset)
            check(p[44] in (0xc2, 0xc3), "more flag at offset %d" % r.offset)
            cur.append(int.from_bytes(p[2:10], "big"))
            if p[44] == 0xc2:
                cmds.append(cur)
                cur = []
    eq(cur, [], "records after the last command's end")
    return cmds


def test_many_keys_flush_in_bounded_commands_exactly():
    """Usage of more keys than one flush command holds goes out in several
    commands, on the timer and at a clean stop, each of at most
    FLUSH_CMD_MAX events and holding only usage events; every call is
    counted once, and a key's periods follow one another without overlap."""
    guard = {"verify_failures_per_minute": 100000}     # wrong secrets pass
    quiet = dict(QUIET, **guard)
    env = h.Env(fsync="off", config=dict(guard, usage_flush_ms=1000))
    c = env.client()
    nkeys = 2 * FLUSH_CMD_MAX + 100
    keys = [h.create_key(c, "k%d" % i) for i in range(nkeys)]
    want = {}                           # key id -> (successes, failures)

    def use(rounds):
        v = h.Client(env.port, None)    # one keep-alive connection
        for i, (k, sec) in enumerate(keys):
            for _ in range(rounds(i)):
                r = expect(v.post("/v1/keys/verify", {"key": sec, "flow": "f"}), 200)
                eq(r.json["code"], "VALID", "verification of key %d" % i)
            ok, bad = want.get(k["id"], (0, 0))
            ok += rounds(i)
            if i % 4 == 0:              # and an AuthFailed event for it
                r = expect(v.post("/v1/keys/verify", {"key": wrong_secret(sec)}), 200)
                eq(r.json["code"], "NOT_FOUND", "a wrong secret")
                bad += 1
            want[k["id"]] = (ok, bad)
        v.close()

    def matches():
        rows = key_rows(report(c, None, "hour"))
        return all(kid in rows and (rows[kid]["successes"], rows[kid]["failures"])
                   == w for kid, w in want.items())

    # The timer's flushes.
    use(lambda i: 1 + i % 3)
    h.wait_until(matches, 15, what="every key's use in the org report")
    head = max(max(cmd) for cmd in log_commands(env.data))
    # The flush at a clean stop: everything since, at once.
    env.restart(config=quiet)
    use(lambda i: 1)
    env.stop()
    env.start(config=quiet)
    c = env.client()
    check(matches(), "after a clean stop and a restart, every call counted "
          "once: %r" % {kid: (r["successes"], r["failures"]) for kid, r in
                        key_rows(report(c, None, "hour")).items()
                        if kid in want and want[kid] != (r["successes"],
                                                          r["failures"])})
    env.stop()

    res = h.run_tool("replay", "--data", env.data)
    eq(res.rc, 0, "replay exit status: " + res.describe())
    events = {e["seq"]: e for e in map(json.loads, res.stdout.splitlines())}
    stop_flush = 0
    for cmd in log_commands(env.data):
        types = {events[seq]["type"] for seq in cmd}
        if types & FLUSH_TYPES:
            check(types <= FLUSH_TYPES, "a flush command holds %s" % sorted(types))
            check(len(cmd) <= FLUSH_CMD_MAX, "a flush command of %d events, "
                  "more than %d" % (len(cmd), FLUSH_CMD_MAX))
            if cmd[0] > head:
                stop_flush += 1
    check(stop_flush >= 3, "the stop flush of %d keys' use went out in %d "
          "commands" % (nkeys, stop_flush))
    last_to = {}
    for seq in sorted(events):
        e = events[seq]
        if e["type"] != "UsageRecorded":
            continue
        kid, u = e["target"]["id"], e["data"]["usage"]
        frm, to = h.parse_time(u["from"]), h.parse_time(u["to"])
        check(frm <= to, "usage period %s..%s" % (u["from"], u["to"]))
        check(frm >= last_to.get(kid, frm), "key %s: a period from %s overlaps "
              "the one before" % (kid, u["from"]))
        last_to[kid] = to
    h.verify_ok(env.data)


if __name__ == "__main__":
    h.main(globals())
