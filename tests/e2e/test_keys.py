"""
End-to-end tests of the API-keys management API (contract sections 2, 3 and
4 "API keys"), GET /v1/me, GET /v1/org, /healthz and /readyz, plus the HTTP
limits (431, 413, pipelining, request and idle timeouts).

Every test starts its own daemon on a fresh data dir. The client used here
checks on every response that X-Request-Id is `req_` + 26 Crockford chars and
that every 4xx/5xx has exactly the contract's error shape with a request_id
equal to the header (see harness.validate_response).

Run: KL_BUILD_DIR=build python3 tests/e2e/test_keys.py [name-substring...]
"""

import os
import random
import sys
import time

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, expect_error, fail  # noqa: E402

GENERIC_401 = "invalid, expired or revoked API key"
DAY = 86400.0
KEY_PATH = "/v1/api-keys/%s"


def starts_with(prefix):
    return lambda f: isinstance(f, str) and f.startswith(prefix)


def rand_base62(n):
    return "".join(random.choice(h.BASE62) for _ in range(n))


def stripped(obj, *fields):
    d = dict(obj)
    for f in fields:
        d.pop(f, None)
    return d


def expect_401_generic(resp):
    e = expect_error(resp, 401, "unauthenticated", message_contains=GENERIC_401)
    return e["message"]


def is_replayed(resp):
    return (resp.header("Idempotent-Replayed") or "").strip().lower() == "true"


# --------------------------------------------------------------------------
# Health, /v1/me, /v1/org

def test_health_endpoints_need_no_key():
    env = h.Env()
    c = h.Client(env.port, None)
    ids = set()
    for path in ("/healthz", "/readyz", "/healthz", "/readyz"):
        r = expect(c.get(path), 200)
        ids.add(h.check_request_id(r))
    eq(len(ids), 4, "distinct X-Request-Id values over 4 responses")


def test_me_and_org():
    env = h.Env(org="Acme Corp")
    c = env.client()
    m = h.me(c)
    eq(set(m), {"org_id", "principal", "role", "key_id"}, "/v1/me fields")
    eq(m["org_id"], env.info["org_id"], "/v1/me org_id")
    eq(m["principal"], {"type": "user", "id": env.info["user_id"]},
       "/v1/me principal")
    eq(m["role"], "owner", "/v1/me role")
    eq(m["key_id"], env.info["key_id"], "/v1/me key_id")

    org = expect(c.get("/v1/org"), 200).json
    # The contract lists {id, name, created_at, usage_limits}; `version` is
    # tolerated because "every resource has an integer version", and
    # usage_limits may be omitted while no limit is set (no value -> omitted).
    check({"id", "name", "created_at"} <= set(org) <=
          {"id", "name", "created_at", "usage_limits", "version"},
          "/v1/org fields: %r" % (org,))
    eq(org["id"], env.info["org_id"], "org id")
    eq(org["name"], "Acme Corp", "org name")
    h.near(h.parse_time(org["created_at"], "org created_at"), time.time(), 120,
           "org created_at")
    if "usage_limits" in org:
        check(isinstance(org["usage_limits"], dict) and set(org["usage_limits"])
              <= {"requests_per_minute", "requests_per_day", "requests_per_month"},
              "usage_limits %r" % (org["usage_limits"],))

    anon = h.Client(env.port, None)
    for path in ("/v1/me", "/v1/org"):
        expect_error(anon.get(path), 401, "unauthenticated")


def test_init_key_object():
    env = h.Env()
    c = env.client()
    h.me(c)  # use the key once, so last_used_at has a value
    r = expect(c.get(KEY_PATH % env.info["key_id"]), 200)
    k = h.check_key(r.json, env="live")
    eq(k["id"], env.info["key_id"], "id")
    eq(k["org_id"], env.info["org_id"], "org_id")
    eq(k["owner"], {"type": "user", "id": env.info["user_id"]}, "owner")
    eq(k["prefix"], env.key[:16] + "...", "prefix")
    eq(k["permissions"], {"access": "full"}, "permissions")
    eq((k["status"], k["is_active"]), ("active", True), "status/is_active")
    for f in ("expires_at", "rate_limit", "revoked_at", "revoked_by",
              "revoked_comment"):
        check(f not in k, "%s must be omitted when it has no value: %r" % (f, k))
    check("last_used_at" in k, "last_used_at missing after the key was used")
    h.near(h.parse_time(k["last_used_at"]), time.time(), 10, "last_used_at")
    check(env.key.encode() not in r.body, "the secret appears in GET")


# --------------------------------------------------------------------------
# Create

def test_create_minimal():
    env = h.Env()
    c = env.client()
    t0 = time.time()
    r = expect(c.post("/v1/api-keys", {"name": "ci deploy"}), 201)
    check(not is_replayed(r), "first response marked Idempotent-Replayed")
    k = h.check_key(r.json, with_secret=True, env="live")
    secret = k["key"]
    eq(k["name"], "ci deploy", "name")
    eq(k["org_id"], env.info["org_id"], "org_id")
    eq(k["owner"], {"type": "user", "id": env.info["user_id"]}, "owner")
    eq(k["created_by"], env.info["user_id"], "created_by")
    eq(k["permissions"], {"access": "full"}, "default permissions")
    eq((k["status"], k["is_active"]), ("active", True), "status/is_active")
    for f in ("expires_at", "rate_limit", "revoked_at", "revoked_by",
              "revoked_comment", "last_used_at"):
        check(f not in k, "%s must be omitted on a fresh key: %r" % (f, k))
    # No description sent: omitted, or empty (listed without `?`).
    check(k.get("description", "") == "", "description %r" % k.get("description"))
    h.near(h.parse_time(k["created_at"]), t0, 10, "created_at")
    check(k["id"] > env.info["key_id"], "ids are time-ordered: %s !> %s" % (
        k["id"], env.info["key_id"]))

    m = h.me(c, key=secret)
    eq(m["key_id"], k["id"], "/v1/me key_id with the new key")
    eq(m["principal"], {"type": "user", "id": env.info["user_id"]}, "principal")
    eq(m["role"], "owner", "role of the new key (its owner's role)")

    g = expect(c.get(KEY_PATH % k["id"]), 200)
    gk = h.check_key(g.json)
    check("key" not in gk, "GET returned the secret")
    eq(stripped(gk, "last_used_at"), stripped(k, "key"), "GET vs create response")
    check("last_used_at" in gk, "last_used_at missing after the key was used")
    lst = expect(c.get("/v1/api-keys", query={"include_revoked": "true"}), 200)
    for resp in (g, lst):
        check(secret.encode() not in resp.body, "secret leaked: " + resp.path)
    ids = [x["id"] for x in lst.json["api_keys"]]
    eq(sorted(ids), sorted([env.info["key_id"], k["id"]]), "listed ids")
    for x in lst.json["api_keys"]:
        h.check_key(x)


def test_create_all_fields():
    env = h.Env()
    c = env.client()
    body = {"name": "partner", "description": "Used by the ERP system",
            "expires_in_days": 30, "permissions": {"access": "read_only"},
            "environment": "test",
            "rate_limit": {"requests_per_minute": 100, "requests_per_day": 10000}}
    t0 = time.time()
    r = expect(c.post("/v1/api-keys", body), 201)
    k = h.check_key(r.json, with_secret=True, env="test")
    check("_test_" in k["key"] and k["key"].startswith("kl_test_"),
          "test key secret %r" % k["key"])
    eq(k["description"], body["description"], "description")
    eq(k["permissions"], {"access": "read_only"}, "permissions")
    eq(k["rate_limit"], body["rate_limit"], "rate_limit")
    h.near(h.parse_time(k["expires_at"]), t0 + 30 * DAY, 120, "expires_at")
    eq(h.me(c, key=k["key"])["key_id"], k["id"], "test key authenticates")

    k2, s2 = h.create_key(c, "explicit-live", environment="live")
    h.check_secret(s2, key_id=k2["id"], env="live")
    eq(k2["environment"], "live", "environment")

    before = h.key_snapshot(c)
    for bad in ("prod", "LIVE", "", 1, ["live"]):
        expect_error(c.post("/v1/api-keys", {"name": "x", "environment": bad}),
                     400, "invalid_argument", "environment")
    h.assert_unchanged(c, before)


def test_expiry_rules():
    env = h.Env()
    c = env.client()
    before = h.key_snapshot(c)
    now = time.time()
    both = ("expires_at", "expires_in_days")
    cases = [
        ({"expires_at": h.fmt_time(now - 60)}, "expires_at"),
        ({"expires_at": h.fmt_time(now - 400 * DAY)}, "expires_at"),
        ({"expires_at": h.fmt_time(now + 366 * DAY + 600)}, "expires_at"),
        ({"expires_at": h.fmt_time(now + 367 * DAY)}, "expires_at"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": "2026-13-45T99:00:00.000Z"}, "expires_at"),
        ({"expires_at": 1893456000}, "expires_at"),
        ({"expires_in_days": 0}, "expires_in_days"),
        ({"expires_in_days": -5}, "expires_in_days"),
        ({"expires_in_days": 367}, "expires_in_days"),
        ({"expires_in_days": 1.5}, "expires_in_days"),
        ({"expires_in_days": "30"}, "expires_in_days"),
        ({"expires_at": h.fmt_time(now + DAY), "expires_in_days": 1}, both),
    ]
    for extra, field in cases:
        body = {"name": "exp"}
        body.update(extra)
        expect_error(c.post("/v1/api-keys", body), 400, "invalid_argument", field)
    h.assert_unchanged(c, before)

    t0 = time.time()
    k, _ = h.create_key(c, "d366", expires_in_days=366)
    h.near(h.parse_time(k["expires_at"]), t0 + 366 * DAY, 120, "366-day expiry")
    k, _ = h.create_key(c, "d1", expires_in_days=1)
    h.near(h.parse_time(k["expires_at"]), t0 + DAY, 120, "1-day expiry")
    eq(k["status"], "active", "status of a key that expires tomorrow")
    at = h.fmt_time(time.time() + 365 * DAY + 0.123)
    k, _ = h.create_key(c, "at365", expires_at=at)
    eq(k["expires_at"], at, "expires_at echoed as sent (canonical form)")
    # "at most 366 days from now": just inside the bound is accepted.
    k, _ = h.create_key(c, "at366", expires_at=h.fmt_time(time.time() + 366 * DAY - 300))
    eq(k["is_active"], True, "is_active")
    # Sending no expiry at all is allowed.
    k, _ = h.create_key(c, "forever")
    check("expires_at" not in k, "expires_at present on a key without expiry")


def test_expired_key_is_listed_inactive_and_rejected():
    # Expiry by time: a key that expires 2 s from now (expires_at only has
    # to be in the future), then we wait past it.
    env = h.Env()
    c = env.client()
    exp = time.time() + 2.0
    k, secret = h.create_key(c, "short-lived", expires_at=h.fmt_time(exp))
    eq((k["status"], k["is_active"]), ("active", True), "before expiry")
    if time.time() < exp - 0.3:
        eq(h.me(c, key=secret)["key_id"], k["id"], "key works before expiry")
    time.sleep(max(0.0, exp + 0.6 - time.time()))
    expect_401_generic(c.get("/v1/me", key=secret))
    g = h.check_key(expect(c.get(KEY_PATH % k["id"]), 200).json)
    eq((g["status"], g["is_active"]), ("expired", False), "GET after expiry")
    # Expired-but-not-revoked keys are always listed, even without
    # include_revoked.
    for q in ({}, {"include_revoked": "false"}, {"include_revoked": "true"}):
        lst = expect(c.get("/v1/api-keys", query=q), 200).json["api_keys"]
        mine = [x for x in lst if x["id"] == k["id"]]
        eq(len(mine), 1, "expired key in list %r" % q)
        h.check_key(mine[0])
        eq((mine[0]["status"], mine[0]["is_active"]), ("expired", False),
           "expired key in list %r" % q)


def test_name_and_description_limits():
    env = h.Env()
    c = env.client()
    before = h.key_snapshot(c)
    for body, field in [
            ({}, "name"),
            ({"name": ""}, "name"),
            ({"name": None}, "name"),
            ({"name": "a" * 129}, "name"),
            ({"name": "\u00e9" * 129}, "name"),
            ({"name": "ok", "description": "d" * 1025}, "description")]:
        expect_error(c.post("/v1/api-keys", body), 400, "invalid_argument", field)
    h.assert_unchanged(c, before)
    h.create_key(c, "a")
    h.create_key(c, "a" * 128)
    # Limits count characters, not bytes: 128 two-byte characters fit.
    h.create_key(c, "\u00e9" * 128)
    k, _ = h.create_key(c, "desc", description="d" * 1024)
    eq(k["description"], "d" * 1024, "1024-char description")


def test_permissions_on_create():
    env = h.Env()
    c = env.client()
    for perms in ({"access": "full"}, {"access": "read_only"},
                  {"access": "flows", "flows": ["flow_abc"]},
                  {"access": "flows", "flows": ["flow_abc", "flow_def"]}):
        k, _ = h.create_key(c, "p", permissions=perms)
        eq(k["permissions"], perms, "permissions echoed")
    before = h.key_snapshot(c)
    for perms in ({"access": "flows"}, {"access": "flows", "flows": []},
                  {"access": "flows", "flows": "flow_abc"},
                  {"access": "flows", "flows": [1]},
                  {"access": "admin"}, {"access": 1}, "full", ["full"]):
        expect_error(c.post("/v1/api-keys", {"name": "x", "permissions": perms}),
                     400, "invalid_argument", starts_with("permissions"))
    h.assert_unchanged(c, before)


def test_unknown_fields_rejected():
    env = h.Env()
    c = env.client()
    k, secret = h.create_key(c, "target")
    p = KEY_PATH % k["id"]
    before = h.key_snapshot(c)
    expect_error(c.post("/v1/api-keys", {"name": "x", "nmae": "y"}), 400,
                 "invalid_argument", "nmae")
    expect_error(c.post("/v1/api-keys", {"name": "x", "owner": {
        "type": "user", "id": env.info["user_id"]}}), 400, "invalid_argument",
        "owner")
    expect_error(c.post("/v1/api-keys", {"name": "x", "key": "kl_live_x"}), 400,
                 "invalid_argument", "key")
    expect_error(c.post("/v1/api-keys", {"name": "x", "permissions": {
        "access": "full", "scope": "all"}}), 400, "invalid_argument",
        ("permissions.scope", "scope"))
    expect_error(c.patch(p, {"nmae": "y"}), 400, "invalid_argument", "nmae")
    # environment is not among PATCH's fields.
    expect_error(c.patch(p, {"environment": "test"}), 400, "invalid_argument",
                 "environment")
    expect_error(c.post(p + "/regenerate", {"grace_period": 5}), 400,
                 "invalid_argument", "grace_period")
    expect_error(c.post(p + "/revoke", {"reason": "x"}), 400,
                 "invalid_argument", "reason")
    h.assert_unchanged(c, before)
    eq(h.me(c, key=secret)["key_id"], k["id"], "key untouched by rejected actions")


def test_wrong_types_rejected():
    env = h.Env()
    c = env.client()
    k, _ = h.create_key(c, "target")
    p = KEY_PATH % k["id"]
    before = h.key_snapshot(c)
    for extra, field in [
            ({"name": 123}, "name"),
            ({"name": ["a"]}, "name"),
            ({"name": True}, "name"),
            ({"description": 5}, "description"),
            ({"environment": 1}, "environment"),
            ({"permissions": "full"}, starts_with("permissions")),
            ({"expires_in_days": "30"}, "expires_in_days"),
            ({"expires_at": 12345}, "expires_at"),
            ({"rate_limit": "fast"}, starts_with("rate_limit")),
            ({"rate_limit": {"requests_per_minute": "10"}},
             starts_with("rate_limit"))]:
        body = {"name": "x"}
        body.update(extra)
        expect_error(c.post("/v1/api-keys", body), 400, "invalid_argument", field)
    for root in ('[]', '["name"]', '"name"', '5', 'null'):
        # A JSON document that is not an object: either code is a fair
        # reading of the contract.
        expect_error(c.post("/v1/api-keys", root), 400,
                     ("invalid_argument", "malformed_json"))
    expect_error(c.patch(p, {"name": 5}), 400, "invalid_argument", "name")
    expect_error(c.patch(p, {"description": []}), 400, "invalid_argument",
                 "description")
    expect_error(c.post(p + "/revoke", {"comment": 5}), 400, "invalid_argument",
                 "comment")
    h.assert_unchanged(c, before)


def test_malformed_json():
    env = h.Env()
    c = env.client()
    k, _ = h.create_key(c, "target")
    p = KEY_PATH % k["id"]
    before = h.key_snapshot(c)
    for raw in ('{"name":', '{name: "x"}', 'not json', '{"name":"x",}',
                '{"name":"x"} {"name":"y"}', '{"name":"x"}garbage',
                "{'name': 'x'}"):
        expect_error(c.post("/v1/api-keys", raw), 400, "malformed_json")
        expect_error(c.patch(p, raw), 400, "malformed_json")
    expect_error(c.post(p + "/revoke", '{"comment": '), 400, "malformed_json")
    # Invalid UTF-8 inside a string, and an empty body that claims JSON.
    expect_error(c.post("/v1/api-keys", b'{"name":"\xff\xfe"}'), 400,
                 ("malformed_json", "invalid_argument"))
    expect_error(c.post("/v1/api-keys", b""), 400,
                 ("malformed_json", "invalid_argument"))
    h.assert_unchanged(c, before)


def test_content_type_required():
    env = h.Env()
    c = env.client()
    k, _ = h.create_key(c, "target")
    p = KEY_PATH % k["id"]
    before = h.key_snapshot(c)
    body = '{"name":"ct"}'
    for ct in (None, "text/plain", "application/x-www-form-urlencoded"):
        expect_error(c.post("/v1/api-keys", body, content_type=ct), 415,
                     "unsupported_media_type")
    expect_error(c.patch(p, '{"name":"y"}', content_type=None), 415,
                 "unsupported_media_type")
    expect_error(c.post(p + "/revoke", '{"comment":"c"}', content_type=None),
                 415, "unsupported_media_type")
    expect_error(c.post(p + "/regenerate", '{}', content_type="text/plain"),
                 415, "unsupported_media_type")
    h.assert_unchanged(c, before)
    # A charset parameter is still application/json.
    r = expect(c.post("/v1/api-keys", body,
                      content_type="application/json; charset=utf-8"), 201)
    h.check_key(r.json, with_secret=True)


# --------------------------------------------------------------------------
# List

def test_list_revoked_deleted_and_owner_filter():
    env = h.Env()
    c = env.client()
    a, _ = h.create_key(c, "a")
    b, _ = h.create_key(c, "b")
    d, _ = h.create_key(c, "d")
    e, _ = h.create_key(c, "e")
    expect(c.post(KEY_PATH % b["id"] + "/revoke", {"comment": "gone"}), 200)
    expect(c.delete(KEY_PATH % d["id"]), 204)
    init_id = env.info["key_id"]

    def listed(query):
        r = expect(c.get("/v1/api-keys", query=query), 200)
        body = r.json
        eq(set(body), {"api_keys", "next_cursor"}, "list fields")
        check(body["next_cursor"] is None, "next_cursor must be present and "
              "null on the last page: " + r.describe())
        for x in body["api_keys"]:
            h.check_key(x)
            check("key" not in x, "list shows a secret")
        return {x["id"]: x for x in body["api_keys"]}

    active = {init_id, a["id"], e["id"]}
    eq(set(listed({})), active, "default list (revoked hidden, deleted gone)")
    eq(set(listed({"include_revoked": "false"})), active, "include_revoked=false")
    full = listed({"include_revoked": "true"})
    eq(set(full), active | {b["id"]}, "include_revoked=true (deleted never)")
    eq((full[b["id"]]["status"], full[b["id"]]["is_active"]), ("revoked", False),
       "revoked key in list")
    eq(full[b["id"]]["revoked_comment"], "gone", "revoked_comment in list")
    for kid, x in full.items():
        g = expect(c.get(KEY_PATH % kid), 200).json
        eq(stripped(x, "last_used_at"), stripped(g, "last_used_at"),
           "list entry vs GET for %s" % kid)
    eq(set(listed({"owner": env.info["user_id"]})), active, "owner=<user id>")


def test_list_pagination():
    env = h.Env()
    c = env.client()
    for i in range(50):
        h.create_key(c, "page-%02d" % i)
    # 51 keys with the init key.
    everything = h.list_all(c, limit=500)
    eq(len(everything), 51, "keys listed with limit=500")
    ids = [x["id"] for x in everything]
    eq(len(set(ids)), 51, "distinct ids")

    r = expect(c.get("/v1/api-keys"), 200).json
    eq(len(r["api_keys"]), 50, "default page size")
    check(isinstance(r["next_cursor"], str) and r["next_cursor"],
          "next_cursor after a full default page: %r" % (r["next_cursor"],))

    for limit, sizes in ((1, [1] * 51), (7, [7] * 7 + [2]), (17, [17, 17, 17]),
                         (51, [51]), (500, [51])):
        pages, got, cursor = [], [], None
        while True:
            q = {"limit": str(limit)}
            if cursor is not None:
                q["cursor"] = cursor
            body = expect(c.get("/v1/api-keys", query=q), 200).json
            pages.append(len(body["api_keys"]))
            got.extend(x["id"] for x in body["api_keys"])
            cursor = body["next_cursor"]
            if cursor is None:
                break
            check(len(pages) <= 60, "pagination does not end (limit %d)" % limit)
        # Literal reading: the page that holds the last item IS the last
        # page (next_cursor null), never followed by an empty page.
        eq(pages, sizes, "page sizes with limit=%d" % limit)
        eq(got, ids, "ids over all pages with limit=%d (same order as one "
           "page)" % limit)

    before = h.key_snapshot(c)
    for bad in ("501", "0", "-1", "abc", "1.5"):
        expect_error(c.get("/v1/api-keys", query={"limit": bad}), 400,
                     "invalid_argument", "limit")
    expect_error(c.get("/v1/api-keys", query={"cursor": "not-a-cursor"}), 400,
                 "invalid_argument", "cursor")
    h.assert_unchanged(c, before, "a rejected list")


# --------------------------------------------------------------------------
# Get, 404, 405

def test_not_found():
    env = h.Env()
    c = env.client()
    k, _ = h.create_key(c, "exists")
    before = h.key_snapshot(c)
    unknown = h.random_id("key")
    for kid in (unknown, "not-a-key", env.info["user_id"], env.info["org_id"],
                k["id"] + "x", "key_"):
        p = KEY_PATH % kid
        expect_error(c.get(p), 404, "not_found")
        expect_error(c.patch(p, {"name": "x"}), 404, "not_found")
        expect_error(c.delete(p), 404, "not_found")
        expect_error(c.post(p + "/revoke", {}), 404, "not_found")
        expect_error(c.post(p + "/regenerate", {}), 404, "not_found")
    for path in ("/v1/nope", "/nope", "/v1/api-keys/%s/nope" % k["id"],
                 "/v1/api-keys/%s/revoke/x" % k["id"], "/v2/api-keys"):
        expect_error(c.get(path), 404, "not_found")
    expect_error(c.post("/v1/nope", {"name": "x"}), 404, "not_found")
    h.assert_unchanged(c, before)


def test_method_not_allowed():
    env = h.Env()
    c = env.client()
    k, _ = h.create_key(c, "exists")
    p = KEY_PATH % k["id"]
    before = h.key_snapshot(c)
    cases = [("PUT", "/v1/api-keys", {"name": "x"}, {"GET", "POST"}),
             ("DELETE", "/v1/api-keys", None, {"GET", "POST"}),
             ("PATCH", "/v1/api-keys", {"name": "x"}, {"GET", "POST"}),
             ("POST", p, {"name": "x"}, {"GET", "PATCH", "DELETE"}),
             ("PUT", p, {"name": "x"}, {"GET", "PATCH", "DELETE"}),
             ("GET", p + "/revoke", None, {"POST"}),
             ("DELETE", p + "/regenerate", None, {"POST"}),
             ("POST", "/v1/me", {}, {"GET"}),
             ("DELETE", "/v1/org", None, {"GET"}),
             ("POST", "/healthz", {}, {"GET"})]
    for method, path, body, allowed in cases:
        r = c.request(method, path, body)
        expect_error(r, 405, "method_not_allowed")
        allow = {m.strip().upper() for m in r.header("Allow").split(",")}
        check(allowed <= allow and method not in allow,
              "Allow %r for %s %s should list %s" % (r.header("Allow"), method,
                                                     path, sorted(allowed)))
    h.assert_unchanged(c, before)


# --------------------------------------------------------------------------
# Patch and If-Match

def test_patch_fields():
    env = h.Env()
    c = env.client()
    k, secret = h.create_key(c, "orig", description="d1")
    p = KEY_PATH % k["id"]
    v = k["version"]
    cur = k
    exp = h.fmt_time(time.time() + 10 * DAY)
    for change in ({"name": "renamed"}, {"description": "d2"},
                   {"expires_at": exp},
                   {"rate_limit": {"requests_per_minute": 50}},
                   {"permissions": {"access": "flows", "flows": ["flow_x"]}},
                   {"permissions": {"access": "read_only"}}):
        r = expect(c.patch(p, change), 200)
        new = h.check_key(r.json)
        check("key" not in new, "PATCH returned a secret")
        v += 1
        eq(new["version"], v, "version after PATCH %r" % change)
        for f, val in change.items():
            eq(new[f], val, "%s after PATCH" % f)
        for f in ("id", "org_id", "owner", "created_by", "created_at", "prefix",
                  "environment"):
            eq(new[f], cur[f], "%s must not change on PATCH" % f)
        untouched = set(cur) - set(change) - {"version", "updated_at",
                                              "last_used_at", "key"}
        for f in untouched:
            eq(new.get(f), cur.get(f), "%s changed by PATCH %r" % (f, change))
        check(h.parse_time(new["updated_at"]) >= h.parse_time(cur["updated_at"]),
              "updated_at went backwards")
        cur = new
    g = h.check_key(expect(c.get(p), 200).json)
    eq(stripped(g, "last_used_at"), stripped(cur, "last_used_at"), "GET after PATCH")
    # The secret is unchanged by PATCH, and the new permissions apply at once.
    eq(h.me(c, key=secret)["key_id"], k["id"], "secret after PATCH")
    expect_error(c.post("/v1/api-keys", {"name": "x"}, key=secret), 403,
                 "permission_denied")

    before = h.key_snapshot(c)
    now = time.time()
    for change, field in [({"name": ""}, "name"), ({"name": "a" * 129}, "name"),
                          ({"description": "d" * 1025}, "description"),
                          ({"expires_at": h.fmt_time(now - 10)}, "expires_at"),
                          ({"expires_at": h.fmt_time(now + 400 * DAY)}, "expires_at"),
                          ({"permissions": {"access": "flows"}},
                           starts_with("permissions"))]:
        expect_error(c.patch(p, change), 400, "invalid_argument", field)
    h.assert_unchanged(c, before)


def test_if_match():
    env = h.Env()
    c = env.client()
    k, secret = h.create_key(c, "guarded")
    p = KEY_PATH % k["id"]
    v = k["version"]

    def im(n):
        return {"If-Match": '"%d"' % n}

    before = h.key_snapshot(c)
    expect_error(c.patch(p, {"name": "x"}, headers=im(v + 5)), 412,
                 "precondition_failed")
    h.assert_unchanged(c, before)
    r = expect(c.patch(p, {"name": "x"}, headers=im(v)), 200)
    eq(r.json["version"], v + 1, "version after a matching If-Match")
    eq(r.json["name"], "x", "name")

    before = h.key_snapshot(c)
    expect_error(c.patch(p, {"name": "y"}, headers=im(v)), 412,
                 "precondition_failed")
    expect_error(c.post(p + "/regenerate", {}, headers=im(v)), 412,
                 "precondition_failed")
    expect_error(c.post(p + "/revoke", {}, headers=im(v)), 412,
                 "precondition_failed")
    expect_error(c.delete(p, headers=im(v)), 412, "precondition_failed")
    h.assert_unchanged(c, before)
    eq(h.me(c, key=secret)["key_id"], k["id"], "secret after rejected actions")

    r = expect(c.post(p + "/regenerate", {}, headers=im(v + 1)), 200)
    v2 = r.json["version"]
    check(v2 > v + 1, "regenerate must bump the version")
    r = expect(c.post(p + "/revoke", {}, headers=im(v2)), 200)
    v3 = r.json["version"]
    check(v3 > v2, "revoke must bump the version")
    expect_error(c.delete(p, headers=im(v2)), 412, "precondition_failed")
    expect(c.delete(p, headers=im(v3)), 204)
    expect_error(c.get(p), 404, "not_found")


# --------------------------------------------------------------------------
# Regenerate

def test_regenerate_without_grace():
    env = h.Env()
    c = env.client()
    k, old = h.create_key(c, "rot", description="x", environment="test",
                          permissions={"access": "read_only"}, expires_in_days=10)
    p = KEY_PATH % k["id"]
    h.me(c, key=old)
    r = expect(c.post(p + "/regenerate", {}), 200)
    n = h.check_key(r.json, with_secret=True, env="test")
    new = n["key"]
    eq(n["id"], k["id"], "same id after regenerate")
    check(new != old, "regenerate returned the old secret")
    h.check_secret(new, key_id=k["id"], env="test")
    # The contract says "new prefix", but with prefix = first 16 chars of the
    # secret and the secret = kl_<env>_<key id><random>, those 16 characters
    # only come from the unchanged id. We hold it to the literal formula.
    eq(n["prefix"], new[:16] + "...", "prefix after regenerate")
    for f in ("name", "description", "permissions", "environment", "expires_at",
              "created_at", "owner", "created_by", "org_id"):
        eq(n.get(f), k.get(f), "%s must survive regenerate" % f)
    check(n["version"] > k["version"], "version must increase on regenerate")
    eq((n["status"], n["is_active"]), ("active", True), "status")
    expect_401_generic(c.get("/v1/me", key=old))
    eq(h.me(c, key=new)["key_id"], k["id"], "new secret works")
    g = expect(c.get(p), 200)
    check("key" not in g.json, "GET shows the secret")
    eq(g.json["prefix"], n["prefix"], "prefix in GET")
    lst = expect(c.get("/v1/api-keys"), 200)
    for resp in (g, lst):
        check(new.encode() not in resp.body and old.encode() not in resp.body,
              "a secret leaked in " + resp.path)

    # No body at all (default grace 0) needs no Content-Type.
    r = expect(c.post(p + "/regenerate", None, content_type=None), 200)
    newer = h.check_key(r.json, with_secret=True)["key"]
    expect_401_generic(c.get("/v1/me", key=new))
    eq(h.me(c, key=newer)["key_id"], k["id"], "secret from the second regenerate")


def test_regenerate_with_grace_period():
    env = h.Env()
    c = env.client()
    k, old = h.create_key(c, "graceful")
    p = KEY_PATH % k["id"]
    t0 = time.time()
    r = expect(c.post(p + "/regenerate", {"grace_period_seconds": 2}), 200)
    new = h.check_key(r.json, with_secret=True)["key"]
    eq(h.me(c, key=old)["key_id"], k["id"], "old secret inside the grace period")
    eq(h.me(c, key=new)["key_id"], k["id"], "new secret")
    time.sleep(max(0.0, t0 + 1.0 - time.time()))
    if time.time() - t0 < 1.6:
        eq(h.me(c, key=old)["key_id"], k["id"], "old secret 1 s into a 2 s grace")
    stopped = [None]

    def old_stopped():
        r2 = c.get("/v1/me", key=old)
        if r2.status == 401:
            stopped[0] = time.time() - t0
            expect_401_generic(r2)
            return True
        expect(r2, 200)
        return False
    h.wait_until(old_stopped, timeout=max(0.5, t0 + 4.5 - time.time()),
                 interval=0.1, what="the old secret to stop after its 2 s grace")
    check(stopped[0] >= 1.5, "old secret stopped after %.2fs, before its 2 s "
          "grace period" % stopped[0])
    eq(h.me(c, key=new)["key_id"], k["id"], "new secret after the grace period")


def test_regenerate_validation():
    env = h.Env()
    c = env.client()
    k, old = h.create_key(c, "rot")
    p = KEY_PATH % k["id"]
    before = h.key_snapshot(c)
    for bad in (-1, 604801, "5", 1.5, True, [5]):
        expect_error(c.post(p + "/regenerate", {"grace_period_seconds": bad}),
                     400, "invalid_argument", "grace_period_seconds")
    h.assert_unchanged(c, before)
    eq(h.me(c, key=old)["key_id"], k["id"], "old secret after rejected regenerates")
    r = expect(c.post(p + "/regenerate", {"grace_period_seconds": 604800}), 200)
    new = h.check_key(r.json, with_secret=True)["key"]
    eq(h.me(c, key=old)["key_id"], k["id"], "old secret inside a 7-day grace")
    eq(h.me(c, key=new)["key_id"], k["id"], "new secret")
    r = expect(c.post(p + "/regenerate", {"grace_period_seconds": 0}), 200)
    expect_401_generic(c.get("/v1/me", key=new))


# --------------------------------------------------------------------------
# Revoke and delete

def test_revoke():
    env = h.Env()
    c = env.client()
    k, secret = h.create_key(c, "to-revoke")
    p = KEY_PATH % k["id"]
    t0 = time.time()
    r = expect(c.post(p + "/revoke", {"comment": "rotated"}), 200)
    o = h.check_key(r.json)
    check("key" not in o, "revoke returned a secret")
    eq((o["status"], o["is_active"]), ("revoked", False), "status after revoke")
    eq(o["revoked_comment"], "rotated", "revoked_comment")
    eq(o["revoked_by"], env.info["user_id"], "revoked_by")
    h.near(h.parse_time(o["revoked_at"]), t0, 10, "revoked_at")
    check(o["version"] > k["version"], "version must increase on revoke")
    expect_401_generic(c.get("/v1/me", key=secret))

    before = h.key_snapshot(c)
    expect_error(c.post(p + "/revoke", {"comment": "again"}), 409, "conflict")
    expect_error(c.post(p + "/revoke", None, content_type=None), 409, "conflict")
    h.assert_unchanged(c, before)

    g = h.check_key(expect(c.get(p), 200).json)
    eq(stripped(g, "last_used_at"), stripped(o, "last_used_at"), "GET after revoke")
    ids = [x["id"] for x in expect(c.get("/v1/api-keys"), 200).json["api_keys"]]
    check(k["id"] not in ids, "revoked key in the default list")

    # Without a body: no comment, so revoked_comment is omitted.
    k2, s2 = h.create_key(c, "no-comment")
    r = expect(c.post(KEY_PATH % k2["id"] + "/revoke", None, content_type=None),
               200)
    o2 = h.check_key(r.json)
    check("revoked_comment" not in o2, "revoked_comment without a comment: %r"
          % o2)
    eq(o2["status"], "revoked", "status")
    expect_401_generic(c.get("/v1/me", key=s2))


def test_delete():
    env = h.Env()
    c = env.client()
    k, secret = h.create_key(c, "to-delete")
    p = KEY_PATH % k["id"]
    r = expect(c.delete(p), 204)
    eq(r.body, b"", "204 body")
    expect_error(c.get(p), 404, "not_found")
    ids = [x["id"] for x in h.list_all(c)]
    check(k["id"] not in ids, "deleted key still listed with include_revoked")
    expect_401_generic(c.get("/v1/me", key=secret))
    before = h.key_snapshot(c)
    expect_error(c.delete(p), 404, "not_found")
    expect_error(c.patch(p, {"name": "x"}), 404, "not_found")
    expect_error(c.post(p + "/revoke", {}), 404, "not_found")
    expect_error(c.post(p + "/regenerate", {}), 404, "not_found")
    h.assert_unchanged(c, before)

    # A revoked key can be deleted too, and then leaves the full list.
    k2, _ = h.create_key(c, "revoked-then-deleted")
    p2 = KEY_PATH % k2["id"]
    expect(c.post(p2 + "/revoke", {"comment": "x"}), 200)
    expect(c.delete(p2), 204)
    expect_error(c.get(p2), 404, "not_found")
    check(k2["id"] not in [x["id"] for x in h.list_all(c)],
          "deleted revoked key still listed")


# --------------------------------------------------------------------------
# Idempotency

def test_idempotency_replay_and_mismatch():
    env = h.Env()
    c = env.client()
    hdr = {"Idempotency-Key": "create-0001"}
    body = '{"name": "idem", "description": "once"}'
    r1 = expect(c.post("/v1/api-keys", body, headers=hdr), 201)
    check(not is_replayed(r1), "first response marked as replayed")
    first = h.check_key(r1.json, with_secret=True)
    r2 = expect(c.post("/v1/api-keys", body, headers=hdr), 201)
    check(is_replayed(r2), "replay lacks Idempotent-Replayed: true: " + r2.describe())
    eq(r2.json, first, "replayed body (same key id, same secret while running)")
    names = [x["name"] for x in h.list_all(c)]
    eq(names.count("idem"), 1, "keys created by two identical idempotent POSTs")

    before = h.key_snapshot(c)
    expect_error(c.post("/v1/api-keys", '{"name": "idem2"}', headers=hdr), 422,
                 "idempotency_mismatch")
    h.assert_unchanged(c, before)
    eq(h.me(c, key=first["key"])["key_id"], first["id"], "replayed secret works")

    r3 = expect(c.post("/v1/api-keys", body,
                       headers={"Idempotency-Key": "create-0002"}), 201)
    check(r3.json["id"] != first["id"], "a new Idempotency-Key made no new key")
    check(not is_replayed(r3), "new Idempotency-Key marked replayed")

    # Any POST: a replayed revoke answers 200 again instead of 409.
    p = KEY_PATH % r3.json["id"] + "/revoke"
    rv1 = expect(c.post(p, {"comment": "x"}, headers={"Idempotency-Key": "rv-1"}),
                 200)
    rv2 = expect(c.post(p, {"comment": "x"}, headers={"Idempotency-Key": "rv-1"}),
                 200)
    check(is_replayed(rv2), "replayed revoke lacks Idempotent-Replayed: true")
    eq(rv2.json, rv1.json, "replayed revoke body")
    expect_error(c.post(p, {"comment": "x"}), 409, "conflict")


def test_idempotency_survives_restart_without_secret():
    env = h.Env()
    c = env.client()
    hdr = {"Idempotency-Key": "restart-0001"}
    body = '{"name": "idem-restart"}'
    r1 = expect(c.post("/v1/api-keys", body, headers=hdr), 201)
    first = h.check_key(r1.json, with_secret=True)
    env.restart()
    c = env.client()
    r2 = c.post("/v1/api-keys", body, headers=hdr)
    expect(r2, 201)
    check(is_replayed(r2), "replay after restart lacks Idempotent-Replayed: true")
    replay = h.check_key(r2.json)
    check("key" not in replay, "a secret came back after a restart (secrets are "
          "never written to disk)")
    eq(replay, stripped(first, "key"), "replayed key object after restart")
    names = [x["name"] for x in h.list_all(c)]
    eq(names.count("idem-restart"), 1, "keys named idem-restart")
    eq(h.me(c, key=first["key"])["key_id"], first["id"],
       "secret still valid after restart")
    before = h.key_snapshot(c)
    expect_error(c.post("/v1/api-keys", '{"name": "other"}', headers=hdr), 422,
                 "idempotency_mismatch")
    h.assert_unchanged(c, before)


# --------------------------------------------------------------------------
# Request ids and error shape across many kinds of response

def test_request_id_on_every_response():
    env = h.Env()
    c = env.client()
    anon = h.Client(env.port, None)
    k, _ = h.create_key(c, "rid")
    p = KEY_PATH % k["id"]
    responses = [
        c.get("/v1/me"), c.get("/healthz"), anon.get("/readyz"),
        c.post("/v1/api-keys", {"name": "rid2"}),
        c.patch(p, {"name": "rid3"}),
        c.post("/v1/api-keys", {"nmae": "x"}),
        c.post("/v1/api-keys", "{"),
        anon.get("/v1/me"),
        c.get(KEY_PATH % h.random_id("key")),
        c.put("/v1/api-keys", {"name": "x"}),
        c.patch(p, {"name": "x"}, headers={"If-Match": '"9999"'}),
        c.post("/v1/api-keys", '{"name":"x"}', content_type=None),
        c.post(p + "/revoke", {}),
        c.post(p + "/revoke", {}),
        c.post("/v1/api-keys", {"name": "i1"}, headers={"Idempotency-Key": "r1"}),
        c.post("/v1/api-keys", {"name": "i2"}, headers={"Idempotency-Key": "r1"}),
        c.delete(p),
    ]
    statuses = sorted({r.status for r in responses})
    eq(statuses, [200, 201, 204, 400, 401, 404, 405, 409, 412, 415, 422],
       "statuses produced")
    ids = [h.check_request_id(r) for r in responses]
    eq(len(set(ids)), len(ids), "request ids must be unique per response")


# --------------------------------------------------------------------------
# Authentication

def test_missing_authorization():
    env = h.Env()
    c = env.client()
    anon = h.Client(env.port, None)
    before = h.key_snapshot(c)
    for method, path, body in (("GET", "/v1/me", None),
                               ("GET", "/v1/api-keys", None),
                               ("GET", KEY_PATH % env.info["key_id"], None),
                               ("POST", "/v1/api-keys", {"name": "x"}),
                               ("DELETE", KEY_PATH % env.info["key_id"], None)):
        r = anon.request(method, path, body)
        expect_error(r, 401, "unauthenticated")
    for value in ("Basic dXNlcjpwYXNzd29yZA==", "Bearer", "Token " + env.key,
                  env.key):
        r = anon.get("/v1/me", headers={"Authorization": value})
        expect_error(r, 401, "unauthenticated")
    h.assert_unchanged(c, before)


def test_bad_keys_get_one_generic_401():
    env = h.Env()
    c = env.client()
    exp = time.time() + 2.0
    ek, expired = h.create_key(c, "expiring", expires_at=h.fmt_time(exp))
    rk, revoked = h.create_key(c, "revoked")
    expect(c.post(KEY_PATH % rk["id"] + "/revoke", {}), 200)
    dk, deleted = h.create_key(c, "deleted")
    expect(c.delete(KEY_PATH % dk["id"]), 204)

    good = env.key
    m = h.SECRET_RE.match(good)
    id_body, rnd = m.group(3), m.group(4)
    last = good[-1]
    bad = {
        "bad checksum": good[:-1] + ("A" if last != "A" else "B"),
        "bad checksum (random part changed)": good[:-7] +
        ("x" if good[-7] != "x" else "y") + good[-6:],
        "unknown id, valid checksum": h.make_secret(h.random_id("key")[4:],
                                                    rand_base62(40)),
        "known id, wrong secret, valid checksum": h.make_secret(
            id_body, rand_base62(len(rnd))),
        "other environment, valid checksum": h.make_secret(id_body, rnd, env="test"),
        "other product prefix, valid checksum": h.make_secret(id_body, rnd,
                                                              prefix="xx"),
        "truncated": good[:-10],
        "malformed": "garbage",
        "prefix only": "kl_live_",
        "bad characters": "kl_live_" + "!" * 70,
        "very long": "kl_live_" + "a" * 4000,
        "revoked": revoked,
        "deleted": deleted,
    }
    messages = {}
    for reason, secret in bad.items():
        r = c.get("/v1/me", key=secret)
        if r.status != 401:
            fail("%s key: expected 401: %s" % (reason, r.describe()))
        messages[reason] = expect_401_generic(r)
    before = h.key_snapshot(c)
    for reason in ("unknown id, valid checksum", "revoked", "bad checksum"):
        r = c.post("/v1/api-keys", {"name": "x"}, key=bad[reason])
        messages[reason + " (POST)"] = expect_401_generic(r)
    h.assert_unchanged(c, before)

    time.sleep(max(0.0, exp + 0.5 - time.time()))
    messages["expired"] = expect_401_generic(c.get("/v1/me", key=expired))
    distinct = set(messages.values())
    check(len(distinct) == 1, "401 messages must not tell the reason apart: %r"
          % messages)


def test_query_key_refused_without_flag():
    env = h.Env()
    c = env.client()
    anon = h.Client(env.port, None)
    r = anon.get("/v1/me", query={"api_key": env.key})
    e = expect_error(r, 401, "unauthenticated")
    msg = e["message"].lower()
    check("authorization" in msg and "header" in msg,
          "the message should say to use the Authorization header: %r"
          % e["message"])
    before = h.key_snapshot(c)
    r = anon.post("/v1/api-keys?api_key=" + env.key, {"name": "x"})
    expect_error(r, 401, "unauthenticated")
    h.assert_unchanged(c, before)


def test_query_key_accepted_with_flag():
    env = h.Env(allow_query_key=True)
    anon = h.Client(env.port, None)
    m = expect(anon.get("/v1/me", query={"api_key": env.key}), 200).json
    eq(m["key_id"], env.info["key_id"], "/v1/me key_id via ?api_key=")
    r = anon.get("/v1/api-keys", query={"api_key": env.key, "limit": "5"})
    eq(len(expect(r, 200).json["api_keys"]), 1, "keys listed via ?api_key=")
    bogus = h.make_secret(h.random_id("key")[4:], rand_base62(40))
    expect_401_generic(anon.get("/v1/me", query={"api_key": bogus}))
    bad_sum = env.key[:-1] + ("0" if env.key[-1] != "0" else "1")
    expect_401_generic(anon.get("/v1/me", query={"api_key": bad_sum}))
    eq(h.me(env.client())["key_id"], env.info["key_id"], "header still works")


# --------------------------------------------------------------------------
# Authorization by permissions.access

def test_read_only_key():
    env = h.Env()
    c = env.client()
    ro, ro_secret = h.create_key(c, "ro", permissions={"access": "read_only"})
    other, other_secret = h.create_key(c, "other")
    before = h.key_snapshot(c)
    cr = h.Client(env.port, ro_secret)
    eq(h.me(cr)["key_id"], ro["id"], "/v1/me with a read_only key")
    expect(cr.get("/v1/api-keys"), 200)
    expect(cr.get(KEY_PATH % other["id"]), 200)
    expect(cr.get("/v1/org"), 200)
    for method, path, body in (
            ("POST", "/v1/api-keys", {"name": "x"}),
            ("PATCH", KEY_PATH % other["id"], {"name": "x"}),
            ("PATCH", KEY_PATH % ro["id"], {"permissions": {"access": "full"}}),
            ("POST", KEY_PATH % other["id"] + "/revoke", {}),
            ("POST", KEY_PATH % other["id"] + "/regenerate", {}),
            ("POST", KEY_PATH % ro["id"] + "/regenerate", {}),
            ("DELETE", KEY_PATH % other["id"], None),
            ("DELETE", KEY_PATH % ro["id"], None)):
        expect_error(cr.request(method, path, body), 403, "permission_denied")
    h.assert_unchanged(c, before)
    eq(h.me(c, key=other_secret)["key_id"], other["id"], "other key untouched")


def test_flows_key_has_no_management_access():
    env = h.Env()
    c = env.client()
    fk, f_secret = h.create_key(c, "flows",
                                permissions={"access": "flows", "flows": ["flow_abc"]})
    eq(fk["permissions"], {"access": "flows", "flows": ["flow_abc"]}, "permissions")
    before = h.key_snapshot(c)
    cf = h.Client(env.port, f_secret)
    for method, path, body in (
            ("GET", "/v1/api-keys", None),
            ("GET", KEY_PATH % fk["id"], None),
            ("GET", KEY_PATH % env.info["key_id"], None),
            ("GET", "/v1/org", None),
            ("POST", "/v1/api-keys", {"name": "x"}),
            ("PATCH", KEY_PATH % fk["id"], {"permissions": {"access": "full"}}),
            ("POST", KEY_PATH % env.info["key_id"] + "/revoke", {}),
            ("DELETE", KEY_PATH % env.info["key_id"], None)):
        expect_error(cf.request(method, path, body), 403, "permission_denied")
    h.assert_unchanged(c, before)


# --------------------------------------------------------------------------
# HTTP limits

def test_huge_headers_431():
    env = h.Env()   # default max_header_bytes 16384
    c = env.client()

    def send(raw):
        rc = h.RawConn(env.port)
        try:
            rc.send(raw)
            return rc.read_response()
        finally:
            rc.close()

    def check_431(r, what, also=()):
        check(r.status == 431 or r.status in also,
              "%s: expected 431: %s" % (what, r.describe()))
        h.check_request_id(r)
        if r.body:
            e = h.check_error_shape(r)
            check(e["code"], "431 error code")

    r = send(h.raw_request("GET", "/v1/me", key=env.key,
                           headers=[("X-Big", "a" * 20000)]))
    check_431(r, "one 20 KB header")
    r = send(h.raw_request("GET", "/v1/me", key=env.key,
                           headers=[("X-H-%03d" % i, "b" * 40) for i in range(400)]))
    check_431(r, "400 headers of 40 bytes")
    r = send(h.raw_request("GET", "/v1/api-keys?pad=" + "c" * 20000, key=env.key))
    check_431(r, "a 20 KB request line", also=(414,))
    # Well under the limit is fine.
    r = send(h.raw_request("GET", "/v1/me", key=env.key,
                           headers=[("X-Big", "a" * 8000)]))
    eq(r.status, 200, "8 KB of headers")
    h.check_request_id(r)
    expect(c.get("/healthz"), 200)


def test_body_too_large_413():
    env = h.Env(config={"max_body_bytes": 4096})
    c = env.client()
    before = h.key_snapshot(c)

    def padded(n):
        b = b'{"name":"sized"}'
        return b + b" " * (n - len(b))

    def send(raw):
        rc = h.RawConn(env.port)
        try:
            rc.send(raw)
            return rc.read_response()
        finally:
            rc.close()

    json_ct = [("Content-Type", "application/json")]
    for n in (4097, 5000, 20000):
        r = send(h.raw_request("POST", "/v1/api-keys", key=env.key,
                               headers=json_ct, body=padded(n)))
        h.check_request_id(r)
        expect_error(r, 413, "payload_too_large")
    # Same through http.client on the keep-alive client.
    expect_error(c.post("/v1/api-keys", padded(4500)), 413, "payload_too_large")
    # Chunked: whatever the answer, it is not a success and writes nothing.
    chunk = b"x" * 3000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2)) + \
        b"0\r\n\r\n"
    raw = ("POST /v1/api-keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
           "Bearer %s\r\nContent-Type: application/json\r\nTransfer-Encoding: "
           "chunked\r\n\r\n" % env.key).encode() + body
    r = send(raw)
    check(r.status >= 400, "chunked body over the limit accepted: " + r.describe())
    h.assert_unchanged(c, before, "a body over max_body_bytes")
    # Exactly at the limit is accepted.
    r = expect(c.post("/v1/api-keys", padded(4096)), 201)
    eq(r.json["name"], "sized", "name")


def test_malformed_http_requests():
    # Garbage on the wire: a 400 (with X-Request-Id, and the error shape if
    # it has a JSON body) or a closed connection, never a hang, and the
    # daemon keeps serving.
    env = h.Env()
    c = env.client()
    before = h.key_snapshot(c)
    for raw in (b"GARBAGE\r\n\r\n",
                b"GET /v1/me HTTP/9.9\r\nHost: x\r\n\r\n",
                b"GET /v1/me HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
                ("POST /v1/api-keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 "%s\r\nContent-Type: application/json\r\nContent-Length: abc"
                 "\r\n\r\n{}" % env.key).encode(),
                ("POST /v1/api-keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 "%s\r\nContent-Type: application/json\r\nContent-Length: 14\r\n"
                 "Content-Length: 15\r\n\r\n{\"name\":\"dup\"}" % env.key).encode(),
                b"\x00\x01\x02\x03\xff\xfe\r\n\r\n"):
        rc = h.RawConn(env.port)
        try:
            rc.send(raw)
            try:
                r = rc.read_response(timeout=5.0)
            except h.Failure:
                if rc.closed_by_peer and not rc.buf:
                    continue            # closed without an answer: fine
                raise
            check(r.status in (400, 413, 431, 505),
                  "malformed request %r answered %s" % (raw[:60], r.describe()))
            h.check_request_id(r)
            if r.body:
                h.check_error_shape(r)
        finally:
            rc.close()
    h.assert_unchanged(c, before, "malformed HTTP requests")
    expect(h.Client(env.port, None).get("/healthz"), 200)


def test_connection_close_and_http10():
    env = h.Env(config={"idle_timeout_ms": 20000})
    for raw in (h.raw_request("GET", "/healthz", headers=[("Connection", "close")]),
                b"GET /healthz HTTP/1.0\r\n\r\n"):
        rc = h.RawConn(env.port)
        try:
            rc.send(raw)
            r = rc.read_response()
            eq(r.status, 200, "status for %r" % raw[:40])
            h.check_request_id(r)
            check(rc.closed_by_peer or rc.wait_closed(3.0),
                  "connection left open after %r" % raw[:40])
        finally:
            rc.close()


def test_pipelined_requests_answered_in_order():
    env = h.Env()
    ct = [("Content-Type", "application/json")]
    batch = (h.raw_request("GET", "/healthz") +
             h.raw_request("POST", "/v1/api-keys", key=env.key, headers=ct,
                           body='{"name":"pipe-1"}') +
             h.raw_request("GET", "/v1/nope", key=env.key) +
             h.raw_request("POST", "/v1/api-keys", key=env.key, headers=ct,
                           body='{"name":"pipe-2"}') +
             h.raw_request("GET", "/v1/api-keys?limit=500", key=env.key) +
             h.raw_request("GET", "/v1/me", key=env.key))
    rc = h.RawConn(env.port)
    try:
        rc.send(batch)
        rs = [rc.read_response() for _ in range(6)]
    finally:
        rc.close()
    eq([r.status for r in rs], [200, 201, 404, 201, 200, 200], "statuses in order")
    for r in rs:
        h.check_request_id(r)
    eq(len({r.header("X-Request-Id") for r in rs}), 6, "distinct request ids")
    k1 = h.check_key(rs[1].json, with_secret=True)
    k2 = h.check_key(rs[3].json, with_secret=True)
    eq((k1["name"], k2["name"]), ("pipe-1", "pipe-2"), "created names in order")
    expect_error(rs[2], 404, "not_found")
    listed = {x["id"] for x in rs[4].json["api_keys"]}
    check({k1["id"], k2["id"]} <= listed, "the list pipelined after two creates "
          "must show both")
    eq(rs[5].json["key_id"], env.info["key_id"], "/v1/me key_id")

    # A request split across several writes is reassembled.
    rc = h.RawConn(env.port)
    try:
        raw = h.raw_request("GET", "/v1/me", key=env.key)
        for i in range(0, len(raw), 7):
            rc.send(raw[i:i + 7])
            time.sleep(0.002)
        eq(rc.read_response().status, 200, "request sent in 7-byte pieces")
    finally:
        rc.close()


def test_slow_client_is_disconnected():
    env = h.Env(config={"request_timeout_ms": 1000, "idle_timeout_ms": 20000})
    c = env.client()
    before = h.key_snapshot(c)

    # 1. Half a request, then silence.
    rc = h.RawConn(env.port)
    t0 = time.time()
    rc.send("GET /v1/me HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    closed = rc.wait_closed(4.0)
    took = time.time() - t0
    rc.close()
    check(closed, "a half-sent request was not dropped within 4 s "
          "(request_timeout_ms=1000)")
    check(0.5 <= took <= 4.0, "dropped after %.2fs, expected about 1 s" % took)

    # 2. A request dribbled one byte per 100 ms never completes: the timeout
    #    bounds the whole request, not the gap between bytes.
    rc = h.RawConn(env.port)
    t0 = time.time()
    rc.send("GET /v1/me HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    closed = False
    while time.time() - t0 < 4.0:
        try:
            rc.send(b"a")
        except OSError:
            closed = True
            break
        if not rc.is_open_now():
            closed = True
            break
        time.sleep(0.1)
    took = time.time() - t0
    rc.close()
    check(closed, "a client dribbling a header was not dropped within 4 s")
    check(took <= 3.0, "dribbling client dropped only after %.2fs" % took)

    # 3. A body that never finishes; nothing is created.
    rc = h.RawConn(env.port)
    t0 = time.time()
    rc.send("POST /v1/api-keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
            "Bearer %s\r\nContent-Type: application/json\r\nContent-Length: 100"
            "\r\n\r\n{\"name\":" % env.key)
    closed = rc.wait_closed(4.0)
    rc.close()
    check(closed, "an unfinished body was not dropped within 4 s")
    h.assert_unchanged(c, before, "an unfinished request")
    expect(h.Client(env.port, None).get("/healthz"), 200)


def test_idle_keepalive_connection_closed():
    env = h.Env(config={"idle_timeout_ms": 1000, "request_timeout_ms": 20000})
    rc = h.RawConn(env.port)
    try:
        rc.send(h.raw_request("GET", "/healthz"))
        eq(rc.read_response().status, 200, "first request")
        time.sleep(0.4)
        check(rc.is_open_now(), "keep-alive connection closed after 0.4 s idle "
              "(idle_timeout_ms=1000)")
        rc.send(h.raw_request("GET", "/v1/me", key=env.key))
        eq(rc.read_response().status, 200, "second request on the connection")
        t1 = time.time()
        closed = rc.wait_closed(4.0)
        took = time.time() - t1
        check(closed, "idle keep-alive connection still open 4 s later")
        check(took >= 0.6, "idle connection closed after %.2fs, before "
              "idle_timeout_ms=1000" % took)
    finally:
        rc.close()
    expect(h.Client(env.port, None).get("/healthz"), 200)


if __name__ == "__main__":
    h.main(globals())
