"""
End-to-end tests of key verification, rate limits and quotas (contract
sections 2, 3, 4 "API keys", "Verification" and "Organization and users"
usage-limits): POST /v1/keys/verify and every code it answers, the answer's
shape, the per-address guard against guessing, the key's and the org's
windows (per minute, per day, per month) seen from verify and from the
management API (429 with Retry-After, RateLimit, RateLimit-Policy), quotas
rebuilt from the log after a restart, and last_used_at.

Every test starts its own daemon on a fresh data dir (a second organization,
when one is needed, is made with `keyledger org-create` before the daemon
starts). The client checks X-Request-Id and the error shape on every
response (see harness.validate_response). Per-minute windows are fixed to
the wall clock's minutes, so tests that count one wait for a fresh minute
when fewer than a few seconds of the current one are left.

Run: KL_BUILD_DIR=build python3 tests/e2e/test_verify.py [name-substring...]
"""

import calendar
import datetime
import os
import random
import re
import sys
import threading
import time

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, expect_error, fail  # noqa: E402

VERIFY = "/v1/keys/verify"
KEY_PATH = "/v1/api-keys/%s"
USERS = "/v1/org/users"
U = "/v1/org/users/%s"
SAS = "/v1/service-accounts"
SA = "/v1/service-accounts/%s"
LIMITS = "/v1/org/usage-limits"

CODES = ("VALID", "NOT_FOUND", "EXPIRED", "REVOKED", "DISABLED", "FORBIDDEN",
         "RATE_LIMITED", "USAGE_EXCEEDED")
ANSWER_REQUIRED = {"valid", "code", "key_id", "org_id", "owner", "permissions"}
NOT_FOUND = {"valid": False, "code": "NOT_FOUND"}
POLICY_RE = re.compile(r'^"([a-z-]+)";q=(\d+);w=(\d+)$')
RATELIMIT_RE = re.compile(r'^"([a-z-]+)";r=(\d+);t=(\d+)$')
DAY_S = 86400


# --------------------------------------------------------------------------
# Helpers

def rand_base62(n):
    return "".join(random.choice(h.BASE62) for _ in range(n))


def starts_with(prefix):
    return lambda f: isinstance(f, str) and f.startswith(prefix)


def fresh_minute(need):
    """Per-minute windows and the failure guard count in wall-clock minutes:
    when fewer than `need` seconds of this minute are left, wait for the
    next one so a sequence of calls falls in one minute."""
    left = 60.0 - (time.time() % 60.0)
    if left < need:
        time.sleep(left + 0.05)


def next_utc_midnight(now):
    return (int(now) // DAY_S + 1) * DAY_S


def next_utc_month(now):
    d = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    y, m = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return calendar.timegm((y, m, 1, 0, 0, 0))


def check_answer(ans, what="verify answer"):
    """The shape of a 200 answer, whatever its code."""
    check(isinstance(ans, dict), "%s is not an object: %r" % (what, ans))
    check(ans.get("code") in CODES, "%s: code %r" % (what, ans.get("code")))
    check(isinstance(ans.get("valid"), bool), "%s: valid %r" % (what, ans))
    eq(ans["valid"], ans["code"] == "VALID", "%s: valid vs code %s" % (
        what, ans["code"]))
    if ans["code"] == "NOT_FOUND":
        eq(ans, NOT_FOUND, "%s: NOT_FOUND says nothing about any key" % what)
        return ans
    missing = ANSWER_REQUIRED - set(ans)
    check(not missing, "%s (%s) lacks %s: %r" % (what, ans["code"],
                                                 sorted(missing), ans))
    extra = set(ans) - ANSWER_REQUIRED - {"ratelimit"}
    check(not extra, "%s has fields the contract does not list %s: %r" % (
        what, sorted(extra), ans))
    check(h.is_id(ans["key_id"], "key"), "%s: key_id %r" % (what, ans["key_id"]))
    check(h.is_id(ans["org_id"], "org"), "%s: org_id %r" % (what, ans["org_id"]))
    o = ans["owner"]
    check(isinstance(o, dict) and set(o) == {"type", "id"} and
          o["type"] in ("user", "service_account") and
          h.is_id(o["id"], "usr" if o["type"] == "user" else "sa"),
          "%s: owner %r" % (what, o))
    p = ans["permissions"]
    check(isinstance(p, dict) and p.get("access") in ("full", "read_only",
                                                      "flows"),
          "%s: permissions %r" % (what, p))
    if p["access"] == "flows":
        check(set(p) == {"access", "flows"} and isinstance(p["flows"], list)
              and p["flows"], "%s: flows permissions %r" % (what, p))
    else:
        eq(set(p), {"access"}, "%s: permissions fields" % what)
    if "ratelimit" in ans:
        rl = ans["ratelimit"]
        check(isinstance(rl, dict) and set(rl) == {"limit", "remaining",
                                                   "reset_at"},
              "%s: ratelimit must be {limit, remaining, reset_at}: %r" % (
                  what, rl))
        for f in ("limit", "remaining"):
            check(isinstance(rl[f], int) and not isinstance(rl[f], bool),
                  "%s: ratelimit.%s %r" % (what, f, rl[f]))
        check(1 <= rl["limit"] and 0 <= rl["remaining"] <= rl["limit"],
              "%s: ratelimit %r" % (what, rl))
        h.parse_time(rl["reset_at"], "%s: ratelimit.reset_at" % what)
    return ans


def verify_raw(c, body, **kw):
    """POST /v1/keys/verify with no Authorization header."""
    return c.post(VERIFY, body, key=None, **kw)


def vfy(c, secret, want, obj=None, rl=h.ANY, **fields):
    """Verifies secret (with flow/permission/cost from fields) and insists
    on HTTP 200 with code `want`. obj: the key object the answer must
    describe. rl: ANY, None (no ratelimit) or (limit, remaining)."""
    body = {"key": secret}
    body.update(fields)
    r = verify_raw(c, body)
    what = "verify %s" % (", ".join("%s=%r" % kv for kv in sorted(fields.items()))
                          or "(key only)")
    expect(r, 200)
    ans = check_answer(r.json, what)
    check(ans["code"] == want, "%s: expected code %s: %s" % (what, want,
                                                             r.describe()))
    if obj is not None and want != "NOT_FOUND":
        eq((ans["key_id"], ans["org_id"], ans["owner"], ans["permissions"]),
           (obj["id"], obj["org_id"], obj["owner"], obj["permissions"]),
           "%s: key_id, org_id, owner, permissions" % what)
    if want == "NOT_FOUND":
        return ans
    if rl is None:
        check("ratelimit" not in ans, "%s: ratelimit without any limit: %r" % (
            what, ans))
    elif rl is not h.ANY:
        check("ratelimit" in ans, "%s: no ratelimit although a limit is set: "
              "%r" % (what, ans))
        eq((ans["ratelimit"]["limit"], ans["ratelimit"]["remaining"]), rl,
           "%s: ratelimit (limit, remaining)" % what)
    return ans


def check_429(resp, window, limit, reset_at=None, tol=2):
    """A management call refused by a window: 429 rate_limited with
    Retry-After, RateLimit-Policy and RateLimit naming `window`."""
    expect_error(resp, 429, "rate_limited")
    pol = resp.header("RateLimit-Policy")
    rlh = resp.header("RateLimit")
    ra = resp.header("Retry-After")
    check(pol is not None and rlh is not None,
          "429 without RateLimit-Policy / RateLimit: %s %r" % (
              resp.describe(), resp.headers))
    m = POLICY_RE.match(pol.strip())
    check(m is not None, "RateLimit-Policy %r is not '\"<window>\";q=<limit>;"
          "w=<seconds>'" % pol)
    eq(m.group(1), window, "RateLimit-Policy window")
    eq(int(m.group(2)), limit, "RateLimit-Policy q")
    w = int(m.group(3))
    if window in ("minute", "org-minute"):
        eq(w, 60, "RateLimit-Policy w for %s" % window)
    elif window in ("day", "org-day"):
        eq(w, DAY_S, "RateLimit-Policy w for %s" % window)
    else:
        check(28 * DAY_S <= w <= 31 * DAY_S, "RateLimit-Policy w %d for %s" % (
            w, window))
    m2 = RATELIMIT_RE.match(rlh.strip())
    check(m2 is not None, "RateLimit %r is not '\"<window>\";r=<remaining>;"
          "t=<seconds>'" % rlh)
    eq(m2.group(1), window, "RateLimit window")
    eq(int(m2.group(2)), 0, "RateLimit r (remaining) when refused")
    t = int(m2.group(3))
    check(ra is not None and ra.strip().isdigit(),
          "Retry-After %r is not a number of seconds" % ra)
    ra = int(ra)
    check(ra >= 1, "Retry-After %d" % ra)
    check(abs(ra - t) <= 1, "Retry-After %d vs RateLimit t=%d" % (ra, t))
    if reset_at is None:
        check(1 <= t <= 60 and ra <= 60, "t=%d / Retry-After %d for a minute "
              "window" % (t, ra))
    else:
        expected = reset_at - time.time()
        check(abs(t - expected) <= tol and abs(ra - expected) <= tol,
              "RateLimit t=%d / Retry-After %d, expected about %.0f s (until "
              "%s)" % (t, ra, expected, h.fmt_time(reset_at)))
    return resp


def invite(c, email, role="member"):
    r = expect(c.post(USERS, {"email": email, "role": role}), 201)
    return r.json


def mint(c, path, name="k", **fields):
    body = {"name": name}
    body.update(fields)
    r = expect(c.post(path + "/api-keys", body), 201)
    k = h.check_key(r.json, with_secret=True)
    return k, k["key"]


def create_sa(c, name):
    return expect(c.post(SAS, {"name": name}), 201).json


def owner_obj(env):
    """The key object of the key `keyledger init` made."""
    return h.check_key(expect(env.client().get(KEY_PATH % env.info["key_id"]),
                              200).json)


def two_org_env(**kw):
    env = h.Env(start=False, **kw)
    other = h.org_create(env.data, org="Other Org", email="o2@example.net")
    env.start()
    return env, other


# --------------------------------------------------------------------------
# The answer

def test_valid_answer_shape():
    env, other = two_org_env()
    c = env.client()
    v = h.Client(env.port, None)
    ko = owner_obj(env)
    r = verify_raw(v, {"key": env.key})
    expect(r, 200)
    ct = (r.header("Content-Type") or "").split(";")[0].strip().lower()
    eq(ct, "application/json", "verify answer Content-Type")
    ans = vfy(v, env.key, "VALID", ko, rl=None)
    eq(ans["owner"], {"type": "user", "id": env.info["user_id"]}, "owner")
    eq(ans["permissions"], {"access": "full"}, "permissions of the init key")
    for perm in ("read", "write", "execute"):
        vfy(v, env.key, "VALID", ko, rl=None, permission=perm)
    vfy(v, env.key, "VALID", ko, rl=None, flow="any_flow")
    vfy(v, env.key, "VALID", ko, rl=None, cost=0)
    vfy(v, env.key, "VALID", ko, rl=None, cost=1000)
    vfy(v, env.key, "VALID", ko, rl=None, flow="f", permission="write", cost=3)

    # A test-environment key, a service account's flows key, another org.
    kt, st = h.create_key(c, "test env", environment="test")
    vfy(v, st, "VALID", kt, rl=None)
    sa = create_sa(c, "billing-worker")
    kf, sf = mint(c, SA % sa["id"], "flows",
                  permissions={"access": "flows", "flows": ["flow_abc", "flow_def"]})
    ans = vfy(v, sf, "VALID", kf, rl=None, flow="flow_abc")
    eq(ans["owner"], {"type": "service_account", "id": sa["id"]}, "SA owner")
    eq(ans["permissions"], {"access": "flows", "flows": ["flow_abc", "flow_def"]},
       "flows permissions in the answer")
    ans = vfy(v, other["key"], "VALID", rl=None)
    eq((ans["key_id"], ans["org_id"], ans["owner"]),
       (other["key_id"], other["org_id"], {"type": "user", "id": other["user_id"]}),
       "the other org's key")
    # A bearer on the request changes nothing: the key in the body is judged.
    r = v.post(VERIFY, {"key": st}, key=env.key)
    eq(check_answer(expect(r, 200).json)["key_id"], kt["id"],
       "verify with an Authorization header")


def test_not_found_variants():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    k, secret = h.create_key(c, "real")
    body = k["id"][len("key_"):]
    m = h.check_secret(secret, key_id=k["id"])
    rnd = m.group(4)
    gone, gone_secret = h.create_key(c, "to delete")
    vfy(v, gone_secret, "VALID", gone)
    expect(c.delete(KEY_PATH % gone["id"]), 204)

    last = secret[-1]
    mid = len(secret) - 12
    cases = [
        ("unknown key", h.make_secret(h.random_id("key")[4:], rand_base62(40))),
        ("garbage", "garbage"),
        ("prefix only", "kl_live_"),
        ("all zeros", "kl_live_" + "0" * 70),
        ("truncated", secret[:-1]),
        ("one char more", secret + "A"),
        ("last char changed (bad checksum)",
         secret[:-1] + ("B" if last == "A" else "A")),
        ("random part changed (bad checksum)",
         secret[:mid] + ("x" if secret[mid] != "x" else "y") + secret[mid + 1:]),
        ("wrong secret for an existing key id",
         h.make_secret(body, rand_base62(len(rnd)))),
        ("same body, other environment", h.make_secret(body, rnd, env="test")),
        ("same body, other product prefix", h.make_secret(body, rnd, prefix="zz")),
        ("upper-cased", secret.upper()),
        ("deleted key", gone_secret),
        ("a key id, not a secret", k["id"]),
    ]
    for what, s in cases:
        r = verify_raw(v, {"key": s})
        expect(r, 200)
        check(r.json == NOT_FOUND, "%s: expected exactly %r: %s" % (
            what, NOT_FOUND, r.describe()))
        for leak in (k["id"], gone["id"], env.info["org_id"], env.info["user_id"]):
            check(leak.encode() not in r.body, "%s: the answer names %s: %s" % (
                what, leak, r.describe()))
        r = verify_raw(v, {"key": s, "flow": "f", "permission": "read", "cost": 2})
        check(expect(r, 200).json == NOT_FOUND, "%s with flow/permission/cost: "
              "%s" % (what, r.describe()))
    # None of that disturbed the real key.
    vfy(v, secret, "VALID", k, rl=None)


def test_revocation_and_deletion_seen_by_the_next_verify():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    k, secret = h.create_key(c, "rev", permissions={"access": "read_only"})
    vfy(v, secret, "VALID", k, rl=None)
    expect(c.post(KEY_PATH % k["id"] + "/revoke", {"comment": "leaked"}), 200)
    ans = vfy(v, secret, "REVOKED", k, permission="read")
    eq(ans["valid"], False, "valid of a revoked key")
    vfy(v, secret, "REVOKED", k)
    expect(c.delete(KEY_PATH % k["id"]), 204)
    vfy(v, secret, "NOT_FOUND")

    # Deleting a key that was never revoked: NOT_FOUND at once.
    k2, s2 = h.create_key(c, "del")
    vfy(v, s2, "VALID", k2)
    expect(c.delete(KEY_PATH % k2["id"]), 204)
    vfy(v, s2, "NOT_FOUND")

    # Regenerating: the old secret stops at once without a grace period,
    # keeps working within one.
    k3, old = h.create_key(c, "rot")
    new = h.check_key(expect(c.post(KEY_PATH % k3["id"] + "/regenerate", {}),
                             200).json, with_secret=True)["key"]
    vfy(v, old, "NOT_FOUND")
    vfy(v, new, "VALID", k3)
    newer = h.check_key(expect(c.post(KEY_PATH % k3["id"] + "/regenerate",
                                      {"grace_period_seconds": 60}), 200).json,
                        with_secret=True)["key"]
    vfy(v, new, "VALID", k3)
    vfy(v, newer, "VALID", k3)
    # Revoking also ends the grace period's old secret.
    expect(c.post(KEY_PATH % k3["id"] + "/revoke", {}), 200)
    vfy(v, newer, "REVOKED", k3)
    ans = check_answer(expect(verify_raw(v, {"key": new}), 200).json)
    check(ans["code"] in ("REVOKED", "NOT_FOUND"), "the grace-period secret of "
          "a revoked key: %r" % ans)


def test_expired():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    exp = time.time() + 1.5
    k, secret = h.create_key(c, "short-lived", expires_at=h.fmt_time(exp))
    if time.time() < exp - 0.3:
        vfy(v, secret, "VALID", k, rl=None)
    time.sleep(max(0.0, exp + 0.3 - time.time()))
    ans = vfy(v, secret, "EXPIRED", k)
    eq(ans["valid"], False, "valid of an expired key")
    vfy(v, secret, "EXPIRED", k, permission="read", cost=0)
    g = h.check_key(expect(c.get(KEY_PATH % k["id"]), 200).json)
    eq(g["status"], "expired", "GET status after expiry")
    # Revoked after it expired: either code is a fair answer, never VALID.
    expect(c.post(KEY_PATH % k["id"] + "/revoke", {}), 200)
    ans = check_answer(expect(verify_raw(v, {"key": secret}), 200).json)
    check(ans["code"] in ("EXPIRED", "REVOKED"), "expired then revoked: %r" % ans)


def test_disabled_when_the_owner_user_is_removed():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    u = invite(c, "member@example.com", "member")
    k, secret = mint(c, U % u["id"], "member key")
    eq(k["owner"], {"type": "user", "id": u["id"]}, "minted key owner")
    vfy(v, secret, "VALID", k, rl=None)
    expect(c.delete(U % u["id"]), 204)
    ans = vfy(v, secret, "DISABLED", k)
    eq(ans["owner"], {"type": "user", "id": u["id"]}, "owner of the DISABLED key")
    vfy(v, secret, "DISABLED", k, permission="read")
    # The owner's own key is untouched.
    vfy(v, env.key, "VALID")


def test_disabled_when_the_service_account_is_deactivated():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    sa = create_sa(c, "ingest")
    k, secret = mint(c, SA % sa["id"], "ingest key",
                     permissions={"access": "flows", "flows": ["ingest"]})
    vfy(v, secret, "VALID", k, rl=None, flow="ingest")
    expect(c.patch(SA % sa["id"], {"is_active": False}), 200)
    ans = vfy(v, secret, "DISABLED", k, flow="ingest")
    eq(ans["owner"], {"type": "service_account", "id": sa["id"]}, "owner")
    expect(c.patch(SA % sa["id"], {"is_active": True}), 200)
    vfy(v, secret, "VALID", k, rl=None, flow="ingest")
    expect(c.patch(SA % sa["id"], {"is_active": False}), 200)
    vfy(v, secret, "DISABLED", k, flow="ingest")
    expect(c.patch(SA % sa["id"], {"is_active": True}), 200)
    vfy(v, secret, "VALID", k, flow="ingest")
    # Deleting the account revokes its keys.
    expect(c.delete(SA % sa["id"]), 204)
    vfy(v, secret, "REVOKED", k, flow="ingest")


def test_forbidden_flows_and_permissions():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    kf, sf = h.create_key(c, "flows", permissions={
        "access": "flows", "flows": ["flow_a", "flow_b"]})
    ans = vfy(v, sf, "FORBIDDEN", kf)
    eq(ans["valid"], False, "valid of FORBIDDEN")
    eq(ans["permissions"], {"access": "flows", "flows": ["flow_a", "flow_b"]},
       "permissions in a FORBIDDEN answer")
    vfy(v, sf, "FORBIDDEN", kf, flow="flow_c")
    vfy(v, sf, "FORBIDDEN", kf, flow="FLOW_A")
    vfy(v, sf, "FORBIDDEN", kf, flow="flow_a ")
    vfy(v, sf, "FORBIDDEN", kf, permission="read")
    vfy(v, sf, "VALID", kf, rl=None, flow="flow_a")
    vfy(v, sf, "VALID", kf, rl=None, flow="flow_b")

    kr, sr = h.create_key(c, "ro", permissions={"access": "read_only"})
    vfy(v, sr, "FORBIDDEN", kr, permission="write")
    vfy(v, sr, "FORBIDDEN", kr, permission="execute")
    vfy(v, sr, "VALID", kr, rl=None, permission="read")
    vfy(v, sr, "VALID", kr, rl=None)
    vfy(v, sr, "VALID", kr, rl=None, flow="whatever", permission="read")

    kfull, sfull = h.create_key(c, "full")
    for perm in ("read", "write", "execute"):
        vfy(v, sfull, "VALID", kfull, rl=None, permission=perm)


def test_bad_requests():
    env = h.Env()
    v = h.Client(env.port, None)
    ok = env.key
    cases = [
        ({}, "key"),
        ({"flow": "f"}, "key"),
        ({"key": None}, "key"),
        ({"key": 5}, "key"),
        ({"key": ["x"]}, "key"),
        ({"key": {"k": ok}}, "key"),
        ({"key": ok, "flow": 5}, "flow"),
        ({"key": ok, "flow": ["a"]}, "flow"),
        ({"key": ok, "permission": "admin"}, "permission"),
        ({"key": ok, "permission": "READ"}, "permission"),
        ({"key": ok, "permission": "full"}, "permission"),
        ({"key": ok, "permission": ""}, "permission"),
        ({"key": ok, "permission": 1}, "permission"),
        ({"key": ok, "permission": ["read"]}, "permission"),
        ({"key": ok, "cost": -1}, "cost"),
        ({"key": ok, "cost": 1001}, "cost"),
        ({"key": ok, "cost": 10 ** 12}, "cost"),
        ({"key": ok, "cost": "1"}, "cost"),
        ({"key": ok, "cost": 1.5}, "cost"),
        ({"key": ok, "cost": True}, "cost"),
        ({"key": ok, "keyy": "x"}, "keyy"),
        ({"key": ok, "api_key": ok}, "api_key"),
        ({"key": ok, "permissions": "read"}, "permissions"),
    ]
    for body, field in cases:
        expect_error(verify_raw(v, body), 400, "invalid_argument", field)
    for root in ('[]', '["key"]', '"%s"' % ok, '5', 'null'):
        expect_error(verify_raw(v, root), 400, ("invalid_argument",
                                                "malformed_json"))
    for raw in ('{"key":', "{'key': 'x'}", '{"key":"x"} trailing',
                '{"key":"x",}', 'not json'):
        expect_error(verify_raw(v, raw), 400, "malformed_json")
    expect_error(verify_raw(v, '{"key":"a","key":"b"}'), 400,
                 ("malformed_json", "invalid_argument"))
    body = '{"key":"%s"}' % ok
    for ct in (None, "text/plain", "application/x-www-form-urlencoded"):
        expect_error(verify_raw(v, body, content_type=ct), 415,
                     "unsupported_media_type")
    # With a charset parameter it is still JSON.
    r = verify_raw(v, body, content_type="application/json; charset=utf-8")
    eq(check_answer(expect(r, 200).json)["code"], "VALID", "with charset")
    # No body at all: 400 naming key, or 415 for the missing content type.
    r = v.post(VERIFY, None, key=None, content_type=None)
    check(r.status in (400, 415), "empty body: " + r.describe())
    if r.status == 400:
        expect_error(r, 400, "invalid_argument", "key")
    # Only POST.
    for method in ("GET", "PUT", "DELETE"):
        r = v.request(method, VERIFY, key=None)
        expect_error(r, 405, "method_not_allowed")
        check("POST" in (r.header("Allow") or "").upper(),
              "Allow should list POST: %r" % r.header("Allow"))
    vfy(v, ok, "VALID")


def test_body_forms_read_the_same():
    """Plain bodies take a fast path past the JSON parser; escapes, unicode,
    odd numbers and whitespace take the general one. Both must read a body
    the same way: a secret spelled with escapes is the same secret, and
    every number form JSON allows or forbids gets the same answer."""
    env = h.Env()
    v = h.Client(env.port, None)
    c = env.client()
    k, secret = h.create_key(c, "flows", permissions={"access": "flows",
                                                     "flows": ["ingest"]})
    plain = [
        '{"key":"%s","flow":"ingest"}' % secret,
        '{ "key" : "%s" , "flow" : "ingest" }' % secret,
        '\n\t{\r\n"flow":"ingest",\t"key":"%s"}\n ' % secret,
        '{"key":"%s","flow":"ingest","permission":"execute","cost":0}' % secret,
        '{"cost":1000,"key":"%s","flow":"ingest"}' % secret,
    ]
    escaped = secret.replace("_", "\\u005f", 1)
    general = [
        '{"key":"%s","flow":"ingest"}' % escaped,
        '{"key":"%s","flow":"\\u0069ngest"}' % secret,
        '{"key":"%s","flow":"ingest","cost":1E2}' % secret,
    ]
    for body in plain + general[:2]:
        eq(check_answer(expect(verify_raw(v, body), 200).json)["code"], "VALID",
           "answer to %r" % body)
    # 1E2 is a real number to JSON, not an integer.
    expect_error(verify_raw(v, general[2]), 400, "invalid_argument", "cost")
    for body, code, field in (
            ('{"key":"%s","cost":01}' % secret, "malformed_json", None),
            ('{"key":"%s","cost":1.0}' % secret, "invalid_argument", "cost"),
            ('{"key":"%s","cost":-0}' % secret, None, None),
            ('{"key":"%s","cost":1001}' % secret, "invalid_argument", "cost"),
            ('{"key":"%s","cost":1234567890}' % secret, "invalid_argument", "cost"),
            ('{"key":"%s","cost":99999999999999999999999}' % secret, None, None),
            ('{"key":"%s","flow":""}' % secret, "invalid_argument", "flow"),
            ('{"key":"","flow":"ingest"}', "invalid_argument", "key"),
            ('{"key":"%s","flow":"a\\u0001"}' % secret, "invalid_argument", "flow"),
            ('{"key":"%s","flow":"a\u0001"}' % secret, "malformed_json", None),
            ('{"key":"%s","key":"%s"}' % (secret, secret), "malformed_json", None),
            ('{"key":"%s"}}' % secret, "malformed_json", None),
            ('{"key":"%s"},' % secret, "malformed_json", None),
            ('{"key":"%s" "flow":"x"}' % secret, "malformed_json", None),
            ('{"key":"%s","unknown":1}' % secret, "invalid_argument", "unknown")):
        r = verify_raw(v, body)
        if code is None:            # JSON that the parser may read either way
            check(r.status in (200, 400), "%r: %s" % (body, r.describe()))
        else:
            expect_error(r, 400, code, h.ANY if field is None else field)
    # The fast path counts usage by flow like the general one.
    env.restart(config={"usage_flush_ms": 50})
    v = h.Client(env.port, None)

    def ingest():
        u = expect(env.client().get("/v1/api-keys/%s/usage?granularity=day" % k["id"]),
                   200).json
        return sum(f["requests"] for f in u.get("flows", []) if f["flow"] == "ingest")
    before = ingest()
    for body in plain[:2] + general[:1]:
        expect(verify_raw(v, body), 200)
    h.wait_until(lambda: ingest() == before + 3, 10, 0.05,
                 "3 more requests by flow ingest")


# --------------------------------------------------------------------------
# The guard against guessing

def test_failed_verifications_throttle_the_address():
    env = h.Env(config={"verify_failures_per_minute": 5})
    c = env.client()
    v = h.Client(env.port, None)
    exp = time.time() + 1.5
    ke, se = h.create_key(c, "expiring", expires_at=h.fmt_time(exp))
    kr, sr = h.create_key(c, "revoked")
    expect(c.post(KEY_PATH % kr["id"] + "/revoke", {}), 200)
    sa = create_sa(c, "sleepy")
    kd, sd = mint(c, SA % sa["id"], "disabled")
    expect(c.patch(SA % sa["id"], {"is_active": False}), 200)
    kf, sf = h.create_key(c, "flows", permissions={"access": "flows",
                                                   "flows": ["f1"]})
    kmin, smin = h.create_key(c, "minute", rate_limit={"requests_per_minute": 1})
    kday, sday = h.create_key(c, "day", rate_limit={"requests_per_day": 1})
    ko = owner_obj(env)
    time.sleep(max(0.0, exp + 0.2 - time.time()))
    fresh_minute(6)

    # What does not count: RATE_LIMITED, USAGE_EXCEEDED, bad requests.
    vfy(v, smin, "VALID", kmin)
    vfy(v, sday, "VALID", kday)
    for _ in range(6):
        vfy(v, smin, "RATE_LIMITED", kmin)
        vfy(v, sday, "USAGE_EXCEEDED", kday)
    for _ in range(2):
        expect_error(verify_raw(v, {}), 400, "invalid_argument", "key")
        expect_error(verify_raw(v, {"key": sf, "cost": -1}), 400,
                     "invalid_argument", "cost")
        expect_error(verify_raw(v, {"key": sf, "nope": 1}), 400,
                     "invalid_argument", "nope")
        expect_error(verify_raw(v, '{"key":'), 400, "malformed_json")
        expect_error(verify_raw(v, '{"key":"x"}', content_type="text/plain"),
                     415, "unsupported_media_type")
    vfy(v, env.key, "VALID", ko)

    # What counts: four failures of four kinds, the key still answers...
    vfy(v, h.make_secret(h.random_id("key")[4:], rand_base62(40)), "NOT_FOUND")
    vfy(v, env.key, "VALID", ko)
    vfy(v, se, "EXPIRED", ke)
    vfy(v, sr, "REVOKED", kr)
    vfy(v, sd, "DISABLED", kd)
    vfy(v, env.key, "VALID", ko)
    # ... and the fifth (FORBIDDEN) uses the allowance up.
    vfy(v, sf, "FORBIDDEN", kf)
    for what, body in (("a valid key", {"key": env.key}),
                       ("an unknown key", {"key": "garbage"}),
                       ("a flows key with its flow", {"key": sf, "flow": "f1"})):
        r = verify_raw(v, body)
        expect_error(r, 429, "rate_limited")
        ra = r.header("Retry-After")
        check(ra is not None and ra.strip().isdigit() and
              1 <= int(ra) <= 60, "%s: Retry-After %r should be 1..60 seconds "
              "(the rest of the minute)" % (what, ra))
    # The guard is on verification: the management API still answers.
    expect(c.get("/v1/me"), 200)


# --------------------------------------------------------------------------
# A key's own windows

def test_key_minute_window():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    k, secret = h.create_key(c, "per minute",
                             rate_limit={"requests_per_minute": 3})
    fresh_minute(6)
    t0 = time.time()
    ans = vfy(v, secret, "VALID", k, rl=(3, 2))
    reset = h.parse_time(ans["ratelimit"]["reset_at"])
    check(t0 - 0.01 < reset <= t0 + 61, "reset_at %s of a minute window, now %s"
          % (ans["ratelimit"]["reset_at"], h.fmt_time(t0)))
    # A management call with the key counts one.
    eq(h.me(c, key=secret)["key_id"], k["id"], "/v1/me with the limited key")
    vfy(v, secret, "VALID", k, rl=(3, 0))
    ans = vfy(v, secret, "RATE_LIMITED", k, rl=(3, 0))
    eq(ans["valid"], False, "valid of RATE_LIMITED")
    vfy(v, secret, "RATE_LIMITED", k, rl=(3, 0), cost=1)
    before = h.key_snapshot(c)
    check_429(c.post("/v1/api-keys", {"name": "x"}, key=secret), "minute", 3)
    check_429(c.get("/v1/me", key=secret), "minute", 3)
    h.assert_unchanged(c, before, "a refused management call")
    # Other keys of the org are not touched.
    vfy(v, env.key, "VALID", rl=None)

    # cost takes that many units; a refused one takes none.
    k2, s2 = h.create_key(c, "costly", rate_limit={"requests_per_minute": 10})
    vfy(v, s2, "VALID", k2, rl=(10, 6), cost=4)
    vfy(v, s2, "VALID", k2, rl=(10, 6), cost=0)
    vfy(v, s2, "RATE_LIMITED", k2, rl=(10, 6), cost=7)
    vfy(v, s2, "VALID", k2, rl=(10, 0), cost=6)
    vfy(v, s2, "RATE_LIMITED", k2, rl=(10, 0), cost=1)


def test_key_day_quota():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    k, secret = h.create_key(c, "per day", rate_limit={"requests_per_day": 10})
    now = time.time()
    ans = vfy(v, secret, "VALID", k, rl=(10, 3), cost=7)
    eq(h.parse_time(ans["ratelimit"]["reset_at"]), float(next_utc_midnight(now)),
       "reset_at of a day window (next UTC midnight)")
    ans = vfy(v, secret, "USAGE_EXCEEDED", k, rl=(10, 3), cost=4)
    eq(ans["valid"], False, "valid of USAGE_EXCEEDED")
    vfy(v, secret, "VALID", k, rl=(10, 3), cost=0)
    vfy(v, secret, "VALID", k, rl=(10, 0), cost=3)
    vfy(v, secret, "USAGE_EXCEEDED", k, rl=(10, 0))
    vfy(v, secret, "USAGE_EXCEEDED", k, rl=(10, 0), cost=1000)
    check_429(c.get("/v1/me", key=secret), "day", 10,
              reset_at=next_utc_midnight(time.time()))
    vfy(v, env.key, "VALID", rl=None)

    # Management calls count against the day too.
    k2, s2 = h.create_key(c, "mgmt", rate_limit={"requests_per_day": 3})
    expect(c.get("/v1/me", key=s2), 200)
    expect(c.get("/v1/org", key=s2), 200)
    vfy(v, s2, "VALID", k2, rl=(3, 0))
    vfy(v, s2, "USAGE_EXCEEDED", k2, rl=(3, 0))
    check_429(c.get("/v1/me", key=s2), "day", 3,
              reset_at=next_utc_midnight(time.time()))


def test_only_valid_verifications_take_from_the_quota():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    k, secret = h.create_key(c, "ro quota", permissions={"access": "read_only"},
                             rate_limit={"requests_per_day": 3})
    for _ in range(4):
        vfy(v, secret, "FORBIDDEN", k, permission="write")
    wrong = h.make_secret(k["id"][4:], rand_base62(40))
    for _ in range(3):
        vfy(v, wrong, "NOT_FOUND")
    vfy(v, secret, "VALID", k, rl=(3, 2), permission="read")
    vfy(v, secret, "USAGE_EXCEEDED", k, rl=(3, 2), cost=3)
    vfy(v, secret, "VALID", k, rl=(3, 1))
    vfy(v, secret, "FORBIDDEN", k, permission="execute")
    vfy(v, secret, "VALID", k, rl=(3, 0))
    vfy(v, secret, "USAGE_EXCEEDED", k, rl=(3, 0))


def test_tightest_window_is_reported():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    fresh_minute(5)
    ka, sa = h.create_key(c, "a", rate_limit={"requests_per_minute": 100,
                                              "requests_per_day": 5})
    kb, sb = h.create_key(c, "b", rate_limit={"requests_per_minute": 2,
                                              "requests_per_day": 100})
    ans = vfy(v, sa, "VALID", ka, rl=(5, 4))
    eq(h.parse_time(ans["ratelimit"]["reset_at"]),
       float(next_utc_midnight(time.time())), "reset_at of the day window")
    ans = vfy(v, sb, "VALID", kb, rl=(2, 1))
    check(h.parse_time(ans["ratelimit"]["reset_at"]) <= time.time() + 61,
          "reset_at of the minute window: %r" % ans["ratelimit"])
    vfy(v, sb, "VALID", kb, rl=(2, 0))
    vfy(v, sb, "RATE_LIMITED", kb, rl=(2, 0))
    vfy(v, sa, "VALID", ka, rl=(5, 3), cost=1)


def test_concurrent_verifications_never_exceed_the_limit():
    env = h.Env()
    c = env.client()
    fresh_minute(8)
    k, secret = h.create_key(c, "hot", rate_limit={"requests_per_minute": 20})
    answers = []
    errors = []
    lock = threading.Lock()

    def worker():
        cl = h.Client(env.port, None)
        try:
            for _ in range(5):
                r = verify_raw(cl, {"key": secret})
                expect(r, 200)
                a = check_answer(r.json)
                with lock:
                    answers.append(a)
        except BaseException as e:  # reported below
            with lock:
                errors.append(e)
        finally:
            cl.close()
    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    eq(len(answers), 30, "answers")
    codes = sorted(a["code"] for a in answers)
    eq(codes.count("VALID"), 20, "VALID answers under a limit of 20")
    eq(codes.count("RATE_LIMITED"), 10, "RATE_LIMITED answers")
    eq(sorted(a["ratelimit"]["remaining"] for a in answers
              if a["code"] == "VALID"), list(range(20)),
       "remaining over the VALID answers")


# --------------------------------------------------------------------------
# Many refusals in a minute are answers, not a reason to stop (the
# address guard allows 100 failures a minute by default)

def answers_all(env, body, n, want, what):
    v = h.Client(env.port, None)
    for i in range(n):
        try:
            r = verify_raw(v, body)
        except OSError as e:
            fail("%s: verification %d of %d got no answer (%s); daemon alive: "
                 "%s" % (what, i + 1, n, e, env.daemon.alive()))
        expect(r, 200)
        eq(check_answer(r.json)["code"], want, "%s: verification %d" % (what,
                                                                       i + 1))
    expect(h.Client(env.port, None).get("/healthz"), 200)
    vfy(v, env.key, "VALID")


def test_thirty_failures_for_one_key():
    env = h.Env()
    c = env.client()
    k, secret = h.create_key(c, "revoked")
    expect(c.post(KEY_PATH % k["id"] + "/revoke", {}), 200)
    fresh_minute(5)
    answers_all(env, {"key": secret}, 30, "REVOKED", "a revoked key 30 times")


def test_thirty_refusals_for_one_key():
    env = h.Env()
    c = env.client()
    fresh_minute(5)
    k, secret = h.create_key(c, "one a minute",
                             rate_limit={"requests_per_minute": 1})
    vfy(h.Client(env.port, None), secret, "VALID", k, rl=(1, 0))
    answers_all(env, {"key": secret}, 30, "RATE_LIMITED",
                "a rate-limited key 30 times")


def test_thirty_failures_from_one_address():
    env = h.Env()
    c = env.client()
    k, secret = h.create_key(c, "revoked")
    expect(c.post(KEY_PATH % k["id"] + "/revoke", {}), 200)
    fresh_minute(5)
    answers_all(env, {"key": "garbage"}, 19, "NOT_FOUND", "unknown keys")
    answers_all(env, {"key": secret}, 11, "REVOKED",
                "then a revoked key (failures 20 to 30 of the address)")


# --------------------------------------------------------------------------
# The org's windows

def test_org_minute_limit():
    env, other = two_org_env()
    c = env.client()
    v = h.Client(env.port, None)
    k1, s1 = h.create_key(c, "one")
    k2, s2 = h.create_key(c, "two")
    fresh_minute(6)
    expect(c.put(LIMITS, {"requests_per_minute": 4}), 200)
    # The PUT itself was made before the limit existed: whether it is in
    # the new window is not pinned down.
    ans = vfy(v, s1, "VALID", k1)
    check("ratelimit" in ans and ans["ratelimit"]["limit"] == 4 and
          ans["ratelimit"]["remaining"] in (2, 3),
          "first verify under an org limit of 4/minute: %r" % ans)
    left = ans["ratelimit"]["remaining"]
    keys = [(k2, s2), (k1, s1)]
    i = 0
    while left > 0:
        kk, ss = keys[i % 2]
        left -= 1
        vfy(v, ss, "VALID", kk, rl=(4, left))
        i += 1
    ans = vfy(v, s2, "RATE_LIMITED", k2, rl=(4, 0))
    vfy(v, s1, "RATE_LIMITED", k1, rl=(4, 0))
    # The owner's management calls count against the same window.
    check_429(c.get("/v1/me"), "org-minute", 4)
    check_429(c.post("/v1/api-keys", {"name": "x"}), "org-minute", 4)
    # Another organization is not affected.
    ans = vfy(v, other["key"], "VALID", rl=None)
    eq(ans["org_id"], other["org_id"], "the other org's key")


def test_org_day_quota():
    env, other = two_org_env()
    c = env.client()
    v = h.Client(env.port, None)
    k1, s1 = h.create_key(c, "one")                          # call 1
    expect(c.put(LIMITS, {"requests_per_day": 7}), 200)      # call 2
    ans = vfy(v, s1, "VALID", k1, rl=(7, 4))
    eq(h.parse_time(ans["ratelimit"]["reset_at"]),
       float(next_utc_midnight(time.time())), "reset_at of the org day")
    eq(expect(c.get(LIMITS), 200).json, {"requests_per_day": 7},
       "limits")                                             # call 3
    vfy(v, s1, "VALID", k1, rl=(7, 2))
    vfy(v, s1, "USAGE_EXCEEDED", k1, rl=(7, 2), cost=3)
    vfy(v, s1, "VALID", k1, rl=(7, 0), cost=2)
    vfy(v, s1, "USAGE_EXCEEDED", k1, rl=(7, 0))
    vfy(v, env.key, "USAGE_EXCEEDED", rl=(7, 0))
    check_429(c.get("/v1/me"), "org-day", 7,
              reset_at=next_utc_midnight(time.time()))
    ans = vfy(v, other["key"], "VALID", rl=None)
    eq(ans["org_id"], other["org_id"], "the other org's key")


def test_org_month_quota():
    env, other = two_org_env()
    c = env.client()
    v = h.Client(env.port, None)
    k1, s1 = h.create_key(c, "one")                          # call 1
    expect(c.put(LIMITS, {"requests_per_day": 1000,
                          "requests_per_month": 6}), 200)    # call 2
    ans = vfy(v, s1, "VALID", k1, rl=(6, 3))
    eq(h.parse_time(ans["ratelimit"]["reset_at"]),
       float(next_utc_month(time.time())), "reset_at of the org month")
    vfy(v, s1, "VALID", k1, rl=(6, 0), cost=3)
    vfy(v, s1, "USAGE_EXCEEDED", k1, rl=(6, 0))
    check_429(c.get("/v1/org"), "org-month", 6,
              reset_at=next_utc_month(time.time()))
    vfy(v, other["key"], "VALID", rl=None)


def test_key_and_org_limits_together():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    k, s = h.create_key(c, "own", rate_limit={"requests_per_day": 3})    # 1
    kn, sn = h.create_key(c, "none")                                     # 2
    expect(c.put(LIMITS, {"requests_per_day": 1000}), 200)               # 3
    vfy(v, s, "VALID", k, rl=(3, 2))
    vfy(v, sn, "VALID", kn, rl=(1000, 995))
    vfy(v, s, "VALID", k, rl=(3, 1))
    vfy(v, sn, "VALID", kn, rl=(1000, 993))
    vfy(v, s, "VALID", k, rl=(3, 0))
    # The key's own quota refuses; the org's units are not taken.
    vfy(v, s, "USAGE_EXCEEDED", k, rl=(3, 0))
    vfy(v, sn, "VALID", kn, rl=(1000, 991))


# --------------------------------------------------------------------------
# Quotas come back from the log

def test_quota_survives_restart():
    env = h.Env(config={"usage_flush_ms": 100})
    c = env.client()
    v = h.Client(env.port, None)
    k, secret = h.create_key(c, "daily", rate_limit={"requests_per_day": 5})
    for left in (4, 3, 2):
        vfy(v, secret, "VALID", k, rl=(5, left))
    time.sleep(0.5)
    env.restart()
    v = h.Client(env.port, None)
    vfy(v, secret, "VALID", k, rl=(5, 1))
    vfy(v, secret, "VALID", k, rl=(5, 0))
    vfy(v, secret, "USAGE_EXCEEDED", k, rl=(5, 0))
    env.restart()
    v = h.Client(env.port, None)
    vfy(v, secret, "USAGE_EXCEEDED", k, rl=(5, 0))


def test_quota_survives_kill9_after_a_flush():
    env = h.Env(config={"usage_flush_ms": 100})
    c = env.client()
    v = h.Client(env.port, None)
    k, secret = h.create_key(c, "daily", rate_limit={"requests_per_day": 4},
                             permissions={"access": "flows", "flows": ["f"]})
    vfy(v, secret, "VALID", k, rl=(4, 3), flow="f")
    vfy(v, secret, "VALID", k, rl=(4, 1), flow="f", cost=2)
    time.sleep(0.5)
    env.daemon.kill9()
    env.start()
    v = h.Client(env.port, None)
    vfy(v, secret, "VALID", k, rl=(4, 0), flow="f")
    vfy(v, secret, "USAGE_EXCEEDED", k, rl=(4, 0), flow="f")


def test_org_quota_survives_restart():
    env = h.Env(config={"usage_flush_ms": 100})
    c = env.client()
    v = h.Client(env.port, None)
    k, secret = h.create_key(c, "k")                                     # 1
    expect(c.put(LIMITS, {"requests_per_month": 20}), 200)               # 2
    vfy(v, secret, "VALID", k, rl=(20, 17))
    vfy(v, secret, "VALID", k, rl=(20, 13), cost=4)
    time.sleep(0.5)
    env.restart()
    v = h.Client(env.port, None)
    vfy(v, secret, "VALID", k, rl=(20, 12))


# --------------------------------------------------------------------------
# Answers of known keys carry their window

def test_ratelimit_in_every_known_key_answer():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    k, secret = h.create_key(c, "limited", rate_limit={"requests_per_day": 50},
                             permissions={"access": "flows", "flows": ["f1"]})
    vfy(v, secret, "VALID", k, rl=(50, 49), flow="f1")
    vfy(v, secret, "FORBIDDEN", k, rl=(50, 49))
    expect(c.post(KEY_PATH % k["id"] + "/revoke", {}), 200)
    vfy(v, secret, "REVOKED", k, rl=(50, 49), flow="f1")


# --------------------------------------------------------------------------
# last_used_at

def test_last_used_at_set_by_valid_verification():
    env = h.Env()
    c = env.client()
    v = h.Client(env.port, None)
    k, secret = h.create_key(c, "ro", permissions={"access": "read_only"})
    p = KEY_PATH % k["id"]
    g = h.check_key(expect(c.get(p), 200).json)
    check("last_used_at" not in g, "last_used_at before any use: %r" % g)
    # Failures do not set it.
    vfy(v, secret, "FORBIDDEN", k, permission="write")
    vfy(v, h.make_secret(k["id"][4:], rand_base62(40)), "NOT_FOUND")
    g = h.check_key(expect(c.get(p), 200).json)
    check("last_used_at" not in g, "last_used_at after failed verifications "
          "only: %r" % g)

    t0 = time.time()
    vfy(v, secret, "VALID", k, permission="read")
    t1 = time.time()
    g = h.check_key(expect(c.get(p), 200).json)
    check("last_used_at" in g, "no last_used_at right after a VALID "
          "verification: %r" % g)
    lu = h.parse_time(g["last_used_at"])
    check(t0 - 1.0 <= lu <= t1 + 1.0, "last_used_at %s, verified between %s "
          "and %s" % (g["last_used_at"], h.fmt_time(t0), h.fmt_time(t1)))

    time.sleep(1.2)
    vfy(v, secret, "FORBIDDEN", k, permission="execute")
    g2 = h.check_key(expect(c.get(p), 200).json)
    eq(g2.get("last_used_at"), g["last_used_at"],
       "last_used_at after a FORBIDDEN verification")
    t2 = time.time()
    vfy(v, secret, "VALID", k)
    t3 = time.time()
    g3 = h.check_key(expect(c.get(p), 200).json)
    lu3 = h.parse_time(g3["last_used_at"])
    check(t2 - 1.0 <= lu3 <= t3 + 1.0 and lu3 > lu + 1.0,
          "last_used_at %s after a second VALID verification between %s and "
          "%s (the first was %s)" % (g3["last_used_at"], h.fmt_time(t2),
                                     h.fmt_time(t3), g["last_used_at"]))


if __name__ == "__main__":
    h.main(globals())
