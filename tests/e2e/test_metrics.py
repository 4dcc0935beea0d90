"""
End-to-end tests of GET /metrics (contract section 4 "Operations";
docs/api-notes.md "Metrics"): the Prometheus text format 0.0.4, checked by a
strict parser written here (and by `promtool check metrics` when promtool is
installed: Debian's `prometheus` package has it), then the numbers against
what the test did: requests by route pattern, method and status, verify
outcomes by code, log appends, batches and fsyncs (--fsync always and off),
events, the replay time, and the projection's sizes against the API's
lists; and, during a long startup replay (a log made by bench's kl_genlog),
that the state families are empty rather than read from the replay thread.

Counters are compared as differences between two scrapes, so requests made
before the first one (the harness's /readyz polls) do not matter; the first
scrape is itself one GET /metrics 200 that the second one shows.

Run: KL_BUILD_DIR=build python3 tests/e2e/test_metrics.py [name-substring...]
"""

import math
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, expect_error, fail  # noqa: E402

METRICS = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CODES = ("VALID", "NOT_FOUND", "EXPIRED", "REVOKED", "DISABLED", "FORBIDDEN",
         "RATE_LIMITED", "USAGE_EXCEEDED")
KINDS = ("orgs", "users", "service_accounts", "keys", "computers", "sessions",
         "idempotency")
QUIET = {"usage_flush_ms": 3600000}     # no usage writes while a test runs
# Families API.md names, with the type each must have.
EXPECTED = {
    "keyledger_up": "gauge",
    "keyledger_ready": "gauge",
    "process_start_time_seconds": "gauge",
    "keyledger_http_requests_total": "counter",
    "keyledger_http_request_duration_seconds": "histogram",
    "keyledger_verify_total": "counter",
    "keyledger_log_appends_total": "counter",
    "keyledger_log_batches_total": "counter",
    "keyledger_log_batch_records": "histogram",
    "keyledger_log_fsync_duration_seconds": "histogram",
    "keyledger_log_write_errors_total": "counter",
    "keyledger_events_total": "counter",
    "keyledger_replay_seconds": "gauge",
    "keyledger_projection_entities": "gauge",
}


# --------------------------------------------------------------------------
# A strict parser of the text exposition format 0.0.4

class FormatError(Exception):
    pass


METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Go's ParseFloat as Prometheus writes values: decimal or exponent, or the
# special values.
FLOAT_RE = re.compile(r"^(?:[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|"
                      r"[+-]?Inf|NaN)$")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def _float(text, where):
    if not FLOAT_RE.match(text):
        raise FormatError("%s: %r is not a float" % (where, text))
    return float(text)


def _unescape(s, allowed, where):
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            if i + 1 >= len(s) or s[i + 1] not in allowed:
                raise FormatError("%s: bad escape in %r" % (where, s))
            out.append({"\\": "\\", "n": "\n", '"': '"'}[s[i + 1]])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _parse_labels(s, i, where):
    """s[i] is just after '{'; returns (labels, index after '}')."""
    labels = {}
    if s.startswith("}", i):
        return labels, i + 1
    while True:
        m = LABEL_NAME_RE.match(s, i)
        if m is None:
            raise FormatError("%s: bad label name at %r" % (where, s[i:i + 20]))
        name = m.group(0)
        if name.startswith("__"):
            raise FormatError("%s: label %r is reserved" % (where, name))
        if name in labels:
            raise FormatError("%s: label %r twice" % (where, name))
        i = m.end()
        if not s.startswith('="', i):
            raise FormatError("%s: expected =\" after label %r" % (where, name))
        i += 2
        j, raw = i, []
        while True:
            if j >= len(s):
                raise FormatError("%s: unterminated label value" % where)
            if s[j] == "\\":
                raw.append(s[j:j + 2])
                j += 2
                continue
            if s[j] == '"':
                break
            if s[j] == "\n":
                raise FormatError("%s: raw newline in a label value" % where)
            raw.append(s[j])
            j += 1
        labels[name] = _unescape("".join(raw), '\\"n', where)
        i = j + 1
        if s.startswith("}", i):
            return labels, i + 1
        if not s.startswith(",", i):
            raise FormatError("%s: expected , or } after a label" % where)
        i += 1


class Family(object):
    def __init__(self, name):
        self.name, self.type, self.help = name, None, None
        self.samples = []           # (sample name, labels dict, value)


def family_of(sample, families):
    """The family a sample name belongs to: itself, or the histogram or
    summary it is a _bucket/_sum/_count of."""
    if sample in families:
        return families[sample]
    for suffix in ("_bucket", "_sum", "_count"):
        if sample.endswith(suffix):
            f = families.get(sample[:-len(suffix)])
            if f is not None and f.type in ("histogram", "summary"):
                return f
    return None


def parse_metrics(text):
    """Returns {family name: Family}; raises FormatError on anything that
    is not strictly the format (plus this project's rules: HELP and TYPE for
    every family, counters named *_total, no comments, no blank lines, no
    timestamps)."""
    if not text.endswith("\n"):
        raise FormatError("the text does not end with a newline")
    families = {}
    order = []                      # families in the order they appeared
    series = set()
    current = None                  # the family whose lines are running
    for n, line in enumerate(text[:-1].split("\n"), 1):
        where = "line %d" % n
        if line == "":
            raise FormatError("%s: empty line" % where)
        if line.startswith("#"):
            m = re.match(r"^# (HELP|TYPE) ([^ ]+) (.*)$", line)
            if m is None:
                raise FormatError("%s: a comment that is not HELP or TYPE: %r"
                                  % (where, line))
            kind, name, rest = m.groups()
            if not METRIC_NAME_RE.fullmatch(name):
                raise FormatError("%s: bad metric name %r" % (where, name))
            f = families.get(name)
            if f is None:
                f = families[name] = Family(name)
                order.append(name)
            elif current is not f:
                raise FormatError("%s: %s lines of %s are not together"
                                  % (where, kind, name))
            if f.samples:
                raise FormatError("%s: %s of %s after its samples"
                                  % (where, kind, name))
            if kind == "HELP":
                if f.help is not None:
                    raise FormatError("%s: second HELP for %s" % (where, name))
                f.help = _unescape(rest, "\\n", where)
                if not f.help.strip():
                    raise FormatError("%s: empty HELP for %s" % (where, name))
            else:
                if f.type is not None:
                    raise FormatError("%s: second TYPE for %s" % (where, name))
                if rest not in TYPES:
                    raise FormatError("%s: unknown type %r" % (where, rest))
                f.type = rest
            current = f
            continue
        m = METRIC_NAME_RE.match(line)
        if m is None:
            raise FormatError("%s: not a sample: %r" % (where, line))
        name, i = m.group(0), m.end()
        labels = {}
        if line.startswith("{", i):
            labels, i = _parse_labels(line, i + 1, where)
        if not line.startswith(" ", i):
            raise FormatError("%s: expected one space before the value" % where)
        parts = line[i + 1:].split(" ")
        if len(parts) != 1:
            raise FormatError("%s: extra fields after the value (timestamps "
                              "are not used): %r" % (where, line))
        value = _float(parts[0], where)
        f = family_of(name, families)
        if f is None or f.type is None or f.help is None:
            raise FormatError("%s: sample %s before its family's HELP and "
                              "TYPE" % (where, name))
        if f is not current:
            raise FormatError("%s: samples of %s are not together" % (where,
                                                                      f.name))
        key = (name, tuple(sorted(labels.items())))
        if key in series:
            raise FormatError("%s: duplicate series %s%s" % (where, name,
                                                             labels))
        series.add(key)
        f.samples.append((name, labels, value))
    for name in order:
        f = families[name]
        if f.type is None or f.help is None:
            raise FormatError("family %s lacks %s" % (
                name, "TYPE" if f.type is None else "HELP"))
        _check_family(f)
    return families


def _check_family(f):
    where = "family %s" % f.name
    if f.type == "counter":
        if not f.name.endswith("_total"):
            raise FormatError("%s: a counter's name must end in _total" % where)
        for _, labels, v in f.samples:
            if not (v >= 0):
                raise FormatError("%s%s: counter value %r" % (f.name, labels, v))
    elif f.type == "gauge":
        pass
    elif f.type == "histogram":
        if f.name.endswith("_total"):
            raise FormatError("%s: a histogram named *_total" % where)
        _check_histogram(f)
    else:
        raise FormatError("%s: type %s is not one this daemon uses" % (where,
                                                                       f.type))
    for s, labels, _ in f.samples:
        if f.type != "histogram" and s != f.name:
            raise FormatError("%s: sample %s" % (where, s))


def _check_histogram(f):
    groups = {}                     # labels without le -> parts
    for s, labels, v in f.samples:
        suffix = s[len(f.name):]
        if suffix not in ("_bucket", "_sum", "_count"):
            raise FormatError("histogram %s: sample %s" % (f.name, s))
        rest = dict(labels)
        le = rest.pop("le", None)
        if (suffix == "_bucket") != (le is not None):
            raise FormatError("histogram %s: le on %s%s" % (f.name, s, labels))
        g = groups.setdefault(tuple(sorted(rest.items())),
                              {"buckets": [], "sum": None, "count": None})
        if suffix == "_bucket":
            g["buckets"].append((_float(le, "le"), le, v))
        elif suffix == "_sum":
            g["sum"] = v
        else:
            g["count"] = v
    for key, g in groups.items():
        where = "histogram %s%s" % (f.name, dict(key))
        b = g["buckets"]
        if not b:
            raise FormatError("%s: no buckets" % where)
        if b[-1][1] != "+Inf":
            raise FormatError("%s: the last bucket is le=%r, not +Inf"
                              % (where, b[-1][1]))
        for (le0, _, c0), (le1, t1, c1) in zip(b, b[1:]):
            if not le1 > le0:
                raise FormatError("%s: le=%s does not increase" % (where, t1))
            if c1 < c0:
                raise FormatError("%s: bucket le=%s below the one before "
                                  "(not cumulative)" % (where, t1))
        for _, t, c in b:
            if c < 0 or c != math.floor(c):
                raise FormatError("%s: bucket le=%s count %r" % (where, t, c))
        if g["count"] is None or g["sum"] is None:
            raise FormatError("%s: no _%s" % (
                where, "count" if g["count"] is None else "sum"))
        if g["count"] != b[-1][2]:
            raise FormatError("%s: _count %r != +Inf bucket %r" % (
                where, g["count"], b[-1][2]))
        if g["sum"] < 0:
            raise FormatError("%s: negative _sum" % where)


# --------------------------------------------------------------------------
# Scraping

class Scrape(object):
    def __init__(self, text):
        self.text = text
        try:
            self.families = parse_metrics(text)
        except FormatError as e:
            fail("GET /metrics is not valid text format 0.0.4: %s\n%s" % (
                e, h._short(text, 3000)))

    def samples(self, name):
        """(labels, value) of every sample with this exact sample name."""
        out = []
        for f in self.families.values():
            for s, labels, v in f.samples:
                if s == name:
                    out.append((labels, v))
        return out

    def get(self, name, default=0.0, **labels):
        """One series' value (default when absent: a counter not yet moved)."""
        for lb, v in self.samples(name):
            if lb == labels:
                return v
        return default

    def by(self, name, *keys):
        """{tuple of those label values: value} over a sample name."""
        return {tuple(lb.get(k) for k in keys): v
                for lb, v in self.samples(name)}


def scrape(port):
    """GET /metrics without credentials, with its content type checked."""
    r = expect(h.Client(port, None).get(METRICS), 200)
    eq(r.header("Content-Type"), CONTENT_TYPE, "Content-Type of /metrics")
    try:
        text = r.body.decode("utf-8")
    except UnicodeDecodeError as e:
        fail("/metrics is not UTF-8: %s" % e)
    return Scrape(text)


def diff(before, after, name, *keys):
    """Non-zero changes of a labelled counter between two scrapes."""
    a, b = before.by(name, *keys), after.by(name, *keys)
    out = {}
    for k in set(a) | set(b):
        d = b.get(k, 0.0) - a.get(k, 0.0)
        check(d >= 0, "%s%s went down: %s -> %s" % (name, k, a.get(k),
                                                    b.get(k)))
        if d:
            out[k] = int(d)
    return out


def promtool_check(text):
    """`promtool check metrics` on the text, when promtool is installed."""
    tool = shutil.which("promtool")
    if tool is None:
        return False
    p = subprocess.run([tool, "check", "metrics"], input=text.encode("utf-8"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=30)
    out = (p.stdout + p.stderr).decode("utf-8", "replace").strip()
    check(p.returncode == 0 and out == "",
          "promtool check metrics: exit %s: %s" % (p.returncode, out))
    return True


# --------------------------------------------------------------------------
# The parser itself: it must refuse what the format does not allow

GOOD = """# HELP a_total A counter.
# TYPE a_total counter
a_total{x="1"} 3
a_total{x="2\\"\\\\\\n"} 0
# HELP h A histogram.
# TYPE h histogram
h_bucket{le="0.5"} 1
h_bucket{le="1"} 2
h_bucket{le="+Inf"} 2
h_sum 0.75
h_count 2
# HELP g A gauge.
# TYPE g gauge
g 1.5e3
"""

BAD = {
    "no final newline": GOOD[:-1],
    "blank line": GOOD.replace("# HELP g", "\n# HELP g"),
    "other comment": GOOD.replace("# HELP g", "# a comment\n# HELP g"),
    "sample before TYPE": "# HELP g x\ng 1\n# TYPE g gauge\n",
    "no HELP": "# TYPE g gauge\ng 1\n",
    "no TYPE": "# HELP g x\ng 1\n",
    "two TYPEs": "# HELP g x\n# TYPE g gauge\n# TYPE g gauge\ng 1\n",
    "counter without _total": "# HELP c x\n# TYPE c counter\nc 1\n",
    "negative counter": "# HELP c_total x\n# TYPE c_total counter\nc_total -1\n",
    "duplicate series": GOOD.replace('a_total{x="1"} 3',
                                     'a_total{x="1"} 3\na_total{x="1"} 4'),
    "families interleaved": GOOD.replace("g 1.5e3\n", "g 1.5e3\na_total 1\n"),
    "bad metric name": GOOD.replace("g 1.5e3", "1g 1.5e3"),
    "bad label name": GOOD.replace('{x="1"}', '{1x="1"}'),
    "reserved label name": GOOD.replace('{x="1"}', '{__x="1"}'),
    "label twice": GOOD.replace('{x="1"}', '{x="1",x="2"}'),
    "bad escape": GOOD.replace('{x="1"}', '{x="\\t"}'),
    "trailing comma": GOOD.replace('{x="1"}', '{x="1",}'),
    "unquoted value": GOOD.replace('{x="1"}', "{x=1}"),
    "bad value": GOOD.replace("g 1.5e3", "g one"),
    "timestamp": GOOD.replace("g 1.5e3", "g 1.5e3 1700000000000"),
    "two spaces": GOOD.replace("g 1.5e3", "g  1.5e3"),
    "no +Inf bucket": GOOD.replace('h_bucket{le="+Inf"} 2\n', ""),
    "le not increasing": GOOD.replace('le="1"', 'le="0.25"'),
    "not cumulative": GOOD.replace('h_bucket{le="1"} 2', 'h_bucket{le="1"} 0'),
    "count != +Inf": GOOD.replace("h_count 2", "h_count 3"),
    "no _sum": GOOD.replace("h_sum 0.75\n", ""),
    "no _count": GOOD.replace("h_count 2\n", ""),
    "le outside a bucket": GOOD.replace("h_sum 0.75", 'h_sum{le="1"} 0.75'),
    "unknown type": GOOD.replace("TYPE g gauge", "TYPE g gaug"),
}


def test_parser_refuses_what_the_format_does_not_allow():
    fams = parse_metrics(GOOD)
    eq(sorted(fams), ["a_total", "g", "h"], "families of the good text")
    eq(fams["a_total"].samples[1][1], {"x": '2"\\\n'}, "unescaped label value")
    for what, text in sorted(BAD.items()):
        check(text != GOOD, "bad case %r changed nothing" % what)
        try:
            parse_metrics(text)
        except FormatError:
            continue
        fail("the parser accepted a text with %s:\n%s" % (what, text))


# --------------------------------------------------------------------------
# The daemon's text

def test_format_families_and_no_authentication():
    env = h.Env(config=QUIET)
    c = env.client()
    # Something in every family: a write, a verification, an unmatched path.
    h.create_key(c, "m1")
    expect(c.post("/v1/keys/verify", {"key": env.key}, key=None), 200)
    expect_error(c.get("/no/such/route"), 404, "not_found")
    first = scrape(env.port)
    s = scrape(env.port)            # with /metrics itself counted
    for name, typ in EXPECTED.items():
        check(name in s.families, "family %s missing; have %s" % (
            name, sorted(s.families)))
        eq(s.families[name].type, typ, "TYPE of %s" % name)
    eq(s.get("keyledger_up"), 1.0, "keyledger_up")
    eq(s.get("keyledger_ready"), 1.0, "keyledger_ready once /readyz is 200")
    start = s.get("process_start_time_seconds")
    h.near(start, time.time(), 120, "process_start_time_seconds")
    eq(s.by("keyledger_verify_total", "code").keys(),
       {(code,) for code in CODES}, "verify_total has every code")
    eq(s.by("keyledger_projection_entities", "kind").keys(),
       {(k,) for k in KINDS}, "projection_entities kinds")
    # Bounded labels: route patterns, never a raw path.
    routes = {lb["route"] for lb, _ in s.samples("keyledger_http_requests_total")}
    check("/v1/api-keys" in routes and "/metrics" in routes and
          "unmatched" in routes and "/no/such/route" not in routes,
          "route labels %s" % sorted(routes))
    for lb, _ in s.samples("keyledger_http_requests_total"):
        eq(set(lb), {"route", "method", "status"}, "request counter labels")
    for lb, _ in s.samples("keyledger_http_request_duration_seconds_count"):
        eq(set(lb), {"route", "method"}, "latency histogram labels")
    # The text names no organization, user, key or secret.
    for secret in (env.key, env.info["org_id"], env.info["user_id"],
                   env.info["key_id"], env.key[:12]):
        check(secret not in s.text, "/metrics shows %r" % secret)
    for prefix in ("org_", "usr_", "key_", "req_", "kl_live_"):
        check(prefix not in s.text, "/metrics shows something like an id "
              "(%r)" % prefix)
    # No authentication, and a bad credential changes nothing.
    r = expect(h.Client(env.port, "kl_live_not_a_key").get(METRICS), 200)
    eq(r.header("Content-Type"), CONTENT_TYPE, "Content-Type with a bad key")
    # Counters never go down between scrapes.
    for name in ("keyledger_http_requests_total",):
        diff(first, s, name, "route", "method", "status")
    if not promtool_check(s.text):
        sys.stderr.write("  (promtool not installed: only the test's own "
                         "parser checked the text)\n")


def test_requests_counted_by_route_pattern_method_and_status():
    env = h.Env(config=QUIET)
    c = env.client()
    anon = h.Client(env.port, None)
    before = scrape(env.port)
    for _ in range(3):
        expect(c.get("/v1/me"), 200)
    for _ in range(2):
        expect_error(anon.get("/v1/me"), 401, "unauthenticated")
    k, _ = h.create_key(c, "counted")
    expect(c.get("/v1/api-keys/%s" % k["id"]), 200)
    missing = h.random_id("key")
    expect_error(c.get("/v1/api-keys/%s" % missing), 404, "not_found")
    expect(c.patch("/v1/api-keys/%s" % k["id"], {"name": "renamed"}), 200)
    expect_error(c.get("/no/such/route"), 404, "not_found")
    expect_error(c.delete("/v1/me"), 405, "method_not_allowed")
    expect_error(c.request("OPTIONS", "/v1/me"), 405, "method_not_allowed")
    after = scrape(env.port)
    got = diff(before, after, "keyledger_http_requests_total", "route",
               "method", "status")
    want = {
        ("/v1/me", "GET", "200"): 3,
        ("/v1/me", "GET", "401"): 2,
        ("/v1/api-keys", "POST", "201"): 1,
        ("/v1/api-keys/{id}", "GET", "200"): 1,
        ("/v1/api-keys/{id}", "GET", "404"): 1,
        ("/v1/api-keys/{id}", "PATCH", "200"): 1,
        ("unmatched", "GET", "404"): 1,
        ("unmatched", "DELETE", "405"): 1,
        ("unmatched", "OPTIONS", "405"): 1,
        ("/metrics", "GET", "200"): 1,      # the first scrape
    }
    eq(got, want, "requests counted between two scrapes")
    check(missing not in after.text and k["id"] not in after.text,
          "a raw path's id reached the labels")
    # The latency histograms count the same requests, by route and method.
    lat = diff(before, after, "keyledger_http_request_duration_seconds_count",
               "route", "method")
    want_lat = {}
    for (route, method, _), n in want.items():
        want_lat[(route, method)] = want_lat.get((route, method), 0) + n
    eq(lat, want_lat, "latency histogram counts between two scrapes")
    sums = diff(before, after, "keyledger_http_request_duration_seconds_sum",
                "route", "method")
    for rm in want_lat:
        d = after.get("keyledger_http_request_duration_seconds_sum",
                      route=rm[0], method=rm[1]) - \
            before.get("keyledger_http_request_duration_seconds_sum",
                       route=rm[0], method=rm[1])
        check(0 <= d < 10 * want_lat[rm], "latency sum of %s moved by %r s"
              % (rm, d))
    check(set(sums) <= set(want_lat), "latency sums moved for %s" % sorted(
        set(sums) - set(want_lat)))
    # A server-level error (a request line that is not HTTP) is unmatched.
    conn = h.RawConn(env.port)
    try:
        conn.send(b"NOT HTTP AT ALL\r\n\r\n")
        r = conn.read_response()
        eq(r.status, 400, "status of garbage")
    finally:
        conn.close()
    later = scrape(env.port)
    got = diff(after, later, "keyledger_http_requests_total", "route",
               "method", "status")
    eq(got, {("unmatched", "other", "400"): 1, ("/metrics", "GET", "200"): 1},
       "a malformed request between two scrapes")


def test_verify_outcomes_counted_by_code():
    env = h.Env(config=QUIET)
    c = env.client()
    rk, revoked = h.create_key(c, "to-revoke")
    expect(c.post("/v1/api-keys/%s/revoke" % rk["id"], {}), 200)
    _, ro = h.create_key(c, "ro", permissions={"access": "read_only"})
    before = scrape(env.port)
    anon = h.Client(env.port, None)

    def verify(body, status=200):
        r = anon.post("/v1/keys/verify", body)
        if status != 200:
            return expect_error(r, status, "invalid_argument")
        return expect(r, 200).json["code"]

    eq(verify({"key": env.key}), "VALID", "owner key")
    eq(verify({"key": env.key, "permission": "write"}), "VALID", "owner key")
    eq(verify({"key": ro, "permission": "read"}), "VALID", "read_only, read")
    eq(verify({"key": ro, "permission": "write"}), "FORBIDDEN",
       "read_only, write")
    eq(verify({"key": revoked}), "REVOKED", "revoked key")
    fake = h.make_secret(h.random_id("key")[4:], "A" * 32)
    eq(verify({"key": fake}), "NOT_FOUND", "unknown key")
    eq(verify({"key": "garbage"}), "NOT_FOUND", "garbage")
    verify({}, status=400)          # not an outcome: no code counted
    after = scrape(env.port)
    got = diff(before, after, "keyledger_verify_total", "code")
    eq(got, {("VALID",): 3, ("FORBIDDEN",): 1, ("REVOKED",): 1,
             ("NOT_FOUND",): 2}, "verify outcomes between two scrapes")
    req = diff(before, after, "keyledger_http_requests_total", "route",
               "method", "status")
    eq(req.get(("/v1/keys/verify", "POST", "200")), 7, "verify 200s")
    eq(req.get(("/v1/keys/verify", "POST", "400")), 1, "verify 400s")


# --------------------------------------------------------------------------
# The log

def records_end(path):
    """Where a segment's records end: its size, or where the room a
    running daemon writes ahead of its records begins (docs/log-format.md:
    a zero length)."""
    with open(path, "rb") as f:
        b = f.read()
    off = 64
    while off + 8 <= len(b):
        n = struct.unpack_from("<I", b, off)[0]
        if n == 0:
            break
        off += 8 + n
    return off


def log_bytes(data):
    return sum(records_end(os.path.join(data, n)) for n in h.segment_names(data))


def write_some(c, n):
    for i in range(n):
        h.create_key(c, "w%d" % i)


def check_log_moves(env, fsync_moves):
    c = env.client()
    size0 = log_bytes(env.data)
    before = scrape(env.port)
    write_some(c, 3)
    expect(c.post("/v1/service-accounts", {"name": "bot"}), 201)
    after = scrape(env.port)
    size1 = log_bytes(env.data)

    def d(name):
        return after.get(name) - before.get(name)

    appends = d("keyledger_log_appends_total")
    batches = d("keyledger_log_batches_total")
    events = d("keyledger_events_total")
    check(appends >= 4, "appends moved by %r after 4 writes" % appends)
    eq(appends, events, "records appended vs events applied (every event "
       "goes through the log)")
    check(1 <= batches <= appends, "batches moved by %r for %r records" % (
        batches, appends))
    eq(d("keyledger_log_batch_records_count"), batches,
       "batch_records histogram count vs batches")
    eq(d("keyledger_log_batch_records_sum"), appends,
       "batch_records histogram sum vs appends")
    eq(d("keyledger_log_append_bytes_total"), size1 - size0,
       "append bytes vs the growth of the segment files")
    eq(d("keyledger_log_write_errors_total"), 0, "write errors")
    fsyncs = d("keyledger_log_fsync_duration_seconds_count")
    if fsync_moves:
        eq(fsyncs, batches, "fsyncs with --fsync always (one per batch)")
        check(d("keyledger_log_fsync_duration_seconds_sum") > 0,
              "fsync time did not move")
    else:
        eq(fsyncs, 0, "fsyncs with --fsync off")
    r = expect(env.client().get("/readyz"), 200)
    eq(after.get("keyledger_events_total"), r.json["seq"],
       "events_total vs /readyz seq")
    return after


def test_log_appends_batches_and_fsync_always():
    env = h.Env(fsync="always", config=QUIET)
    check_log_moves(env, True)


def test_log_fsync_off_does_not_sync():
    env = h.Env(fsync="off", config=QUIET)
    check_log_moves(env, False)


def test_concurrent_writes_share_batches():
    env = h.Env(fsync="always", config=QUIET)
    before = scrape(env.port)
    errors = []

    def writer(i):
        try:
            write_some(env.client(), 5)
        except Exception as e:      # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not errors, "writers failed: %s" % errors[:1])
    after = scrape(env.port)
    appends = after.get("keyledger_log_appends_total") - \
        before.get("keyledger_log_appends_total")
    batches = after.get("keyledger_log_batches_total") - \
        before.get("keyledger_log_batches_total")
    eq(appends, 40, "records for 40 new keys")
    check(batches <= appends, "batches %r > records %r" % (batches, appends))
    # The histogram's buckets agree with the counters.
    buckets = after.by("keyledger_log_batch_records_bucket", "le")
    eq(buckets[("+Inf",)], after.get("keyledger_log_batches_total"),
       "+Inf bucket vs batches_total")


def test_failed_fsync_counts_a_write_error():
    lib = os.environ.get("KL_FAULT_LIB")
    if not lib or not os.path.exists(lib):
        raise h.Skip("KL_FAULT_LIB (the fsync fault shim) is not built")
    flag = os.path.join(h.tempdir(), "fail-fsync")
    asan = os.environ.get("ASAN_OPTIONS", "")
    fault_env = {"LD_PRELOAD": lib, "KL_FAULT_FSYNC_FILE": flag,
                 "ASAN_OPTIONS": (asan + ":" if asan else "") +
                                 "verify_asan_link_order=0"}
    env = h.Env(fsync="always", config=QUIET, env=fault_env)
    c = env.client()
    before = scrape(env.port)
    open(flag, "w").close()
    expect_error(c.post("/v1/api-keys", {"name": "during"}), 503, "unavailable")
    os.remove(flag)
    # Refused before it reaches the log: no second error.
    expect_error(c.post("/v1/api-keys", {"name": "after"}), 503, "unavailable")
    after = scrape(env.port)
    for name, moved in (("keyledger_log_write_errors_total", 1),
                        ("keyledger_log_appends_total", 0),
                        ("keyledger_log_batches_total", 0),
                        ("keyledger_log_fsync_duration_seconds_count", 0)):
        eq(after.get(name) - before.get(name), moved, "%s after a failed "
           "fsync" % name)
    got = diff(before, after, "keyledger_http_requests_total", "route",
               "method", "status")
    eq(got.get(("/v1/api-keys", "POST", "503")), 2, "503s counted")


# --------------------------------------------------------------------------
# State: the projection's sizes and the replay

def list_len(c, path, field):
    out, cursor = 0, None
    while True:
        q = {"limit": "500"}
        if cursor is not None:
            q["cursor"] = cursor
        body = expect(c.get(path, query=q), 200).json
        out += len(body[field])
        cursor = body["next_cursor"]
        if cursor is None:
            return out


def api_counts(c, orgs=1, idem=0):
    return {
        "orgs": orgs,
        "users": list_len(c, "/v1/org/users", "users"),
        "service_accounts": list_len(c, "/v1/service-accounts",
                                     "service_accounts"),
        "keys": len(h.list_all(c)),
        "computers": list_len(c, "/v1/computers", "computers"),
        "sessions": list_len(c, "/v1/sessions", "sessions"),
        "idempotency": idem,
    }


def gauges(s):
    return {k: int(v) for (k,), v in
            s.by("keyledger_projection_entities", "kind").items()}


def test_projection_gauges_match_the_api_and_survive_a_restart():
    env = h.Env(config=QUIET)
    c = env.client()
    eq(gauges(scrape(env.port)), api_counts(c), "a fresh org")
    for email in ("a@example.com", "b@example.com"):
        expect(c.post("/v1/org/users", {"email": email, "role": "member"}), 201)
    expect(c.post("/v1/service-accounts", {"name": "ci"}), 201)
    write_some(c, 2)
    hdr = {"Idempotency-Key": "metrics-0001"}
    first = expect(c.post("/v1/api-keys", {"name": "idem"}, headers=hdr), 201)
    again = expect(c.post("/v1/api-keys", {"name": "idem"}, headers=hdr), 201)
    eq(again.json["id"], first.json["id"], "an Idempotency-Key replay")
    expect(c.post("/v1/computers", {"name": "box"}), 201)
    expect(c.post("/v1/sessions", {}), 201)
    s = scrape(env.port)
    want = api_counts(c, idem=1)
    eq(gauges(s), want, "projection gauges vs the API's lists")
    check(want["users"] == 3 and want["keys"] == 4 and want["computers"] == 1,
          "the test made what it meant to: %r" % want)
    # A deleted key stays in the projection (its id and history do).
    expect(c.delete("/v1/api-keys/%s" % first.json["id"]), 204)
    eq(gauges(scrape(env.port))["keys"], want["keys"],
       "keys gauge after a delete (tombstones count)")
    events = s.get("keyledger_events_total")
    check(events >= 8, "events_total %r" % events)

    env.restart()
    s2 = scrape(env.port)
    g = gauges(s2)
    eq(g, want, "projection gauges rebuilt by the replay")
    check(s2.get("keyledger_events_total") > events,
          "events_total after a restart: %r (before the delete %r)" % (
              s2.get("keyledger_events_total"), events))
    eq(s2.get("keyledger_log_appends_total"), 0,
       "appends are counted per process")
    replay = s2.get("keyledger_replay_seconds", default=None)
    check(replay is not None and 0 < replay < 60,
          "keyledger_replay_seconds after a restart: %r" % replay)
    eq(s2.get("keyledger_ready"), 1.0, "ready after the replay")


REPLAY_KEYS = 150000


def test_during_the_replay_state_families_are_empty():
    """While the replay thread owns the projection, /metrics answers from
    the loop thread without reading it: ready 0, the state families with
    HELP and TYPE but no samples. Then the replayed numbers."""
    genlog = os.path.join(h.build_dir(), "kl_genlog")
    check(os.access(genlog, os.X_OK), "%s not built (bench/genlog.c)" % genlog)
    data = os.path.join(h.tempdir(), "data")
    p = subprocess.run([genlog, "--no-limits", data, str(REPLAY_KEYS)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=120)
    check(p.returncode == 0, "kl_genlog: %s" % p.stderr.decode()[-500:])
    d = h.Daemon(data).start(wait_ready=False)
    s = scrape(d.port)
    if s.get("keyledger_ready") == 1.0:
        raise h.Skip("the replay of %d keys was over before the first "
                     "scrape" % REPLAY_KEYS)
    eq(s.get("keyledger_ready", default=None), 0.0, "keyledger_ready")
    for name in ("keyledger_events_total", "keyledger_replay_seconds",
                 "keyledger_projection_entities"):
        check(name in s.families, "family %s missing while replaying" % name)
        eq(s.families[name].samples, [], "%s samples while replaying" % name)
    eq(s.get("keyledger_up"), 1.0, "keyledger_up while replaying")
    d.wait_ready(60)
    s = scrape(d.port)
    eq(s.get("keyledger_ready"), 1.0, "keyledger_ready after the replay")
    eq(s.get("keyledger_events_total"), REPLAY_KEYS + 2,
       "events_total: the org, its owner and the keys")
    g = gauges(s)
    eq((g["orgs"], g["users"], g["keys"]), (1, 1, REPLAY_KEYS),
       "projection sizes after the replay")
    check(0 < s.get("keyledger_replay_seconds") < 60,
          "keyledger_replay_seconds %r" % s.get("keyledger_replay_seconds"))
    eq(s.get("keyledger_log_appends_total"), 0, "nothing appended")


if __name__ == "__main__":
    h.main(globals())
