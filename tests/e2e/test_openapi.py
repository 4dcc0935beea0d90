"""
End-to-end tests of GET /openapi.json (contract section 4 "Operations"):
the document the daemon serves is docs/openapi.json byte for byte, and it
is true of the running daemon:

- every path + method it lists reaches a handler: a request with
  well-formed but unknown ids and no body never gets the router's own
  "no such route" 404 or a 405, and answers a status the document lists
  for that operation, in the documented shape;
- real answers (keys, users, service accounts, the org, the caller,
  verification, alerts, audit events, usage, computers, sessions,
  messages, errors, a 429 with its headers) validate against the
  document's schemas, as do the request bodies sent to get them.

The JSON Schema check is a small subset written here (type with type
arrays for nullable, enum, const, required, properties,
additionalProperties, items, string lengths and patterns, number bounds,
array sizes, allOf/anyOf/oneOf/not, $ref): enough for the document, which
uses nothing else that constrains values.
tests/unit/test_openapi.c checks the same document against the route
table without a daemon.

Run: KL_BUILD_DIR=build python3 tests/e2e/test_openapi.py [name-substring...]
"""

import json
import os
import re
import sys
import time

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, fail  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC_PATH = os.path.join(ROOT, "docs", "openapi.json")
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
CONFIG = {"alert_check_ms": 50, "usage_flush_ms": 100}

_doc = None


def doc():
    global _doc
    if _doc is None:
        with open(DOC_PATH, "rb") as f:
            _doc = json.loads(f.read().decode("utf-8"))
    return _doc


def operations(d):
    for path, item in d["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


# --------------------------------------------------------------------------
# A JSON Schema subset

def resolve(d, ref):
    check(ref.startswith("#/"), "$ref %r is not local" % ref)
    at = d
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(at, list):
            at = at[int(token)]
        else:
            check(isinstance(at, dict) and token in at,
                  "$ref %r names nothing" % ref)
            at = at[token]
    return at


def deref(d, v):
    while isinstance(v, dict) and "$ref" in v:
        v = resolve(d, v["$ref"])
    return v


def _is_type(value, t):
    if t == "null":
        return value is None
    if t == "boolean":
        return isinstance(value, bool)
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "string":
        return isinstance(value, str)
    if t == "array":
        return isinstance(value, list)
    if t == "object":
        return isinstance(value, dict)
    fail("unknown schema type %r" % t)


def _same(a, b):
    """JSON equality (True is not 1)."""
    return type(a) is type(b) and a == b or (
        _is_type(a, "number") and _is_type(b, "number") and a == b)


def schema_errors(d, schema, value, where="$"):
    errs = []
    _validate(d, schema, value, where, errs)
    return errs


def _validate(d, schema, value, where, errs):
    if schema is True:
        return
    if schema is False:
        errs.append("%s: no value is allowed here" % where)
        return
    if "$ref" in schema:
        _validate(d, resolve(d, schema["$ref"]), value, where, errs)
        schema = {k: v for k, v in schema.items() if k != "$ref"}
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_is_type(value, x) for x in types):
            errs.append("%s: %s is not of type %s" % (where, h._short(value, 80),
                                                      "/".join(types)))
            return
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        errs.append("%s: %r is not one of %r" % (where, value, schema["enum"]))
    if "const" in schema and not _same(value, schema["const"]):
        errs.append("%s: %r is not %r" % (where, value, schema["const"]))
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errs.append("%s: %r is shorter than %d" % (where, value, schema["minLength"]))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.append("%s: %s is longer than %d" % (where, h._short(value, 80),
                                                      schema["maxLength"]))
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            errs.append("%s: %r does not match %s" % (where, value, schema["pattern"]))
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append("%s: %r is below %r" % (where, value, schema["minimum"]))
        if "maximum" in schema and value > schema["maximum"]:
            errs.append("%s: %r is above %r" % (where, value, schema["maximum"]))
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errs.append("%s: fewer than %d items" % (where, schema["minItems"]))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.append("%s: more than %d items" % (where, schema["maxItems"]))
        if schema.get("uniqueItems"):
            seen = [json.dumps(v, sort_keys=True) for v in value]
            if len(set(seen)) != len(seen):
                errs.append("%s: items repeat" % where)
        if "items" in schema:
            for i, v in enumerate(value):
                _validate(d, schema["items"], v, "%s[%d]" % (where, i), errs)
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                errs.append("%s: required %r is missing" % (where, name))
        props = schema.get("properties", {})
        for name, v in value.items():
            if name in props:
                _validate(d, props[name], v, "%s.%s" % (where, name), errs)
            elif schema.get("additionalProperties") is False:
                errs.append("%s: %r is not a documented property" % (where, name))
            elif isinstance(schema.get("additionalProperties"), dict):
                _validate(d, schema["additionalProperties"], v,
                          "%s.%s" % (where, name), errs)
    for sub in schema.get("allOf", ()):
        _validate(d, sub, value, where, errs)
    if "anyOf" in schema and not any(not schema_errors(d, s, value, where)
                                     for s in schema["anyOf"]):
        errs.append("%s: matches none of anyOf" % where)
    if "oneOf" in schema and sum(1 for s in schema["oneOf"]
                                 if not schema_errors(d, s, value, where)) != 1:
        errs.append("%s: does not match exactly one of oneOf" % where)
    if "not" in schema and not schema_errors(d, schema["not"], value, where):
        errs.append("%s: matches what `not` excludes" % where)


def check_valid(schema, value, what):
    errs = schema_errors(doc(), schema, value)
    check(not errs, "%s does not validate against docs/openapi.json: %s; value: %s"
          % (what, "; ".join(errs[:5]), h._short(value, 600)))


# --------------------------------------------------------------------------
# Answers against the document

def operation(method, template):
    item = doc()["paths"].get(template)
    check(item is not None and method.lower() in item,
          "%s %s is not in docs/openapi.json" % (method, template))
    return item[method.lower()]


def request_schema(method, template):
    body = deref(doc(), operation(method, template).get("requestBody"))
    check(body is not None, "%s %s documents no request body" % (method, template))
    return body["content"]["application/json"]["schema"]


def conforms(resp, template, what=None):
    """resp, answered by the route `template`, is what the document says the
    operation answers: a listed status, the listed headers that are
    required, and a body that validates against the schema of its media
    type. Returns resp."""
    what = what or "%s %s" % (resp.method, resp.path)
    op = operation(resp.method, template)
    responses = op["responses"]
    spec = responses.get(str(resp.status)) or responses.get(
        "%dXX" % (resp.status // 100)) or responses.get("default")
    check(spec is not None, "%s answered %s, which docs/openapi.json does not "
          "list for %s %s (it lists %s): %s" % (what, resp.status, resp.method,
                                                template, sorted(responses),
                                                resp.describe()))
    spec = deref(doc(), spec)
    for name, hdr in spec.get("headers", {}).items():
        hdr = deref(doc(), hdr)
        if hdr.get("required"):
            check(resp.header(name) is not None, "%s: no %s header, which the "
                  "document requires for %s: %s" % (what, name, resp.status,
                                                     resp.describe()))
    content = spec.get("content")
    if not content:
        eq(resp.body, b"", "%s: body of a response documented without content" % what)
        return resp
    ct = (resp.header("Content-Type") or "").split(";")[0].strip().lower()
    check(ct in content, "%s: Content-Type %r is not documented for %s (%s): %s"
          % (what, ct, resp.status, sorted(content), resp.describe()))
    schema = content[ct].get("schema")
    if ct == "application/json" and schema is not None:
        check_valid(schema, resp.json, "%s (%s)" % (what, resp.status))
    return resp


def call(c, method, path, template, body=None, status=None, **kw):
    """One request; the body (when a dict) must validate against the
    documented request schema, the answer against the documented
    response."""
    if isinstance(body, dict):
        check_valid(request_schema(method, template), body,
                    "request body of %s %s" % (method, template))
    r = c.request(method, path, body, **kw)
    if status is not None:
        expect(r, status)
    return conforms(r, template)


# --------------------------------------------------------------------------
# Tests

def test_document_is_served():
    env = h.Env()
    for key in (None, env.key):
        r = expect(h.Client(env.port, key).get("/openapi.json"), 200)
        eq((r.header("Content-Type") or "").split(";")[0].strip(), "application/json",
           "Content-Type of /openapi.json")
        with open(DOC_PATH, "rb") as f:
            want = f.read()
        check(r.body == want, "GET /openapi.json is not docs/openapi.json byte for "
              "byte (%d bytes served, %d in the file): rebuild?" % (len(r.body),
                                                                     len(want)))
        d = r.json
        check(isinstance(d.get("openapi"), str) and d["openapi"].startswith("3.1"),
              "openapi is %r, not 3.1.x" % (d.get("openapi"),))
        eq(d["info"]["title"], "keyledger", "info.title")
        check(d["paths"], "no paths")
        conforms(r, "/openapi.json")
    env.stop()


def fill(template, op):
    """The path with each {param} a well-formed id no daemon issued, of the
    kind its documented schema's pattern names (e.g. ^key_...)."""
    kinds = {}
    for p in op.get("parameters", []):
        p = deref(doc(), p)
        if p.get("in") == "path":
            schema = deref(doc(), p["schema"])
            m = re.match(r"^\^([a-z]+)_", schema.get("pattern", ""))
            check(m is not None, "path parameter %s of %s has no id pattern"
                  % (p["name"], template))
            kinds[p["name"]] = m.group(1)

    def sub(m):
        check(m.group(1) in kinds, "{%s} of %s is not a documented path parameter"
              % (m.group(1), template))
        return h.random_id(kinds[m.group(1)])
    return re.sub(r"\{([^}]+)\}", sub, template)


def test_every_documented_operation_is_routed():
    env = h.Env()
    c = env.client()
    n = 0
    for template, method, op in operations(doc()):
        path = fill(template, op)
        r = c.request(method.upper(), path)
        check(r.status != 405, "%s %s (as %s): 405 from the router: %s" % (
            method, template, path, r.describe()))
        if r.status == 404:
            e = r.json["error"]
            check(e.get("message") != "no such route", "%s %s (as %s): the "
                  "router knows no such route: %s" % (method, template, path,
                                                      r.describe()))
        conforms(r, template, "%s %s (as %s, no body)" % (method, template, path))
        n += 1
    check(n > 40, "only %d operations documented" % n)
    env.stop()


def test_router_404_is_told_apart():
    # The check above relies on the router's own message.
    env = h.Env()
    r = env.client().get("/v1/no-such-thing")
    h.expect_error(r, 404, "not_found", message_contains="no such route")
    r = env.client().request("PUT", "/v1/me")
    h.expect_error(r, 405, "method_not_allowed")
    env.stop()


def test_answers_validate_against_the_schemas():
    env = h.Env(config=CONFIG)
    c = env.client()
    port = env.port

    # The caller, the org and its limits.
    me = call(c, "GET", "/v1/me", "/v1/me", status=200).json
    call(c, "GET", "/v1/org", "/v1/org", status=200)
    call(c, "PUT", "/v1/org/usage-limits", "/v1/org/usage-limits",
         {"requests_per_day": 100000, "requests_per_month": None}, status=200)
    call(c, "GET", "/v1/org/usage-limits", "/v1/org/usage-limits", status=200)
    call(c, "GET", "/v1/org", "/v1/org", status=200)

    # Keys.
    k = call(c, "POST", "/v1/api-keys", "/v1/api-keys",
             {"name": "ci", "description": "for the openapi test",
              "expires_in_days": 5, "environment": "test",
              "permissions": {"access": "flows", "flows": ["flow_a", "flow_b"]},
              "rate_limit": {"requests_per_minute": 1000, "requests_per_day": 5000}},
             status=201).json
    K = "/v1/api-keys/{id}"
    call(c, "GET", K.format(id=k["id"]), K, status=200)
    call(c, "PATCH", K.format(id=k["id"]), K,
         {"description": None, "rate_limit": {"requests_per_minute": 1000}},
         status=200)
    secret = call(c, "POST", K.format(id=k["id"]) + "/regenerate", K + "/regenerate",
                  {"grace_period_seconds": 60}, status=200,
                  headers={"If-Match": '"2"'}).json["key"]
    plain = h.create_key(c, "plain")[0]
    call(c, "PATCH", K.format(id=plain["id"]), K, {"name": "plain-2", "expires_at": None},
         status=200)
    call(c, "POST", K.format(id=plain["id"]) + "/revoke", K + "/revoke",
         {"comment": "leaked"}, status=200)
    call(c, "GET", "/v1/api-keys?include_revoked=true&limit=2", "/v1/api-keys",
         status=200)
    gone = call(c, "POST", "/v1/api-keys", "/v1/api-keys", {"name": "gone"},
                status=201).json
    call(c, "DELETE", K.format(id=gone["id"]), K, status=204)

    # Verification: VALID (with ratelimit), FORBIDDEN, NOT_FOUND.
    anon = h.Client(port, None)
    V = "/v1/keys/verify"
    v = call(anon, "POST", V, V, {"key": secret, "flow": "flow_a", "cost": 2},
             status=200).json
    eq(v["code"], "VALID", "verification code")
    check("ratelimit" in v, "no ratelimit in a verification of a key with a "
          "window: %r" % (v,))
    eq(call(anon, "POST", V, V, {"key": secret, "flow": "flow_z",
                                 "permission": "read"}, status=200).json["code"],
       "FORBIDDEN", "verification code for another flow")
    eq(call(anon, "POST", V, V, {"key": "kl_live_nope"}, status=200).json,
       {"valid": False, "code": "NOT_FOUND"}, "verification of a bad key")

    # Users and their keys.
    u = call(c, "POST", "/v1/org/users", "/v1/org/users",
             {"email": "ada@example.com", "name": "Ada", "role": "manager"},
             status=201).json
    U = "/v1/org/users/{id}"
    call(c, "GET", U.format(id=u["id"]), U, status=200)
    call(c, "PATCH", U.format(id=u["id"]), U, {"role": "member"}, status=200)
    call(c, "POST", U.format(id=u["id"]) + "/api-keys", U + "/api-keys",
         {"name": "ada-key"}, status=201)
    call(c, "GET", U.format(id=u["id"]) + "/api-keys", U + "/api-keys", status=200)
    call(c, "GET", "/v1/org/users", "/v1/org/users", status=200)
    gone_user = call(c, "POST", "/v1/org/users", "/v1/org/users",
                     {"email": "bob@example.com", "role": "guest"}, status=201).json
    call(c, "DELETE", U.format(id=gone_user["id"]), U, status=204)
    call(c, "GET", U.format(id=gone_user["id"]), U, status=200)

    # Service accounts and their keys.
    S = "/v1/service-accounts/{id}"
    sa = call(c, "POST", "/v1/service-accounts", "/v1/service-accounts",
              {"name": "ci-bot", "description": "builds", "role": "member"},
              status=201).json
    call(c, "GET", S.format(id=sa["id"]), S, status=200)
    call(c, "POST", S.format(id=sa["id"]) + "/api-keys", S + "/api-keys",
         {"name": "bot-key", "permissions": {"access": "read_only"}}, status=201)
    call(c, "GET", S.format(id=sa["id"]) + "/api-keys", S + "/api-keys", status=200)
    call(c, "PATCH", S.format(id=sa["id"]), S, {"is_active": False}, status=200)
    call(c, "GET", "/v1/service-accounts", "/v1/service-accounts", status=200)

    # Computers, sessions, messages.
    C = "/v1/computers/{id}"
    sa2 = call(c, "POST", "/v1/service-accounts", "/v1/service-accounts",
               {"name": "runner"}, status=201).json
    m = call(c, "POST", "/v1/computers", "/v1/computers",
             {"name": "box", "owner": sa2["id"]}, status=201).json
    call(c, "POST", C.format(id=m["id"]) + "/restart", C + "/restart", status=200)
    call(c, "GET", C.format(id=m["id"]), C, status=200)
    call(c, "GET", "/v1/computers", "/v1/computers", status=200)
    SE = "/v1/sessions/{id}"
    s = call(c, "POST", "/v1/sessions", "/v1/sessions",
             {"title": "debugging", "computer_id": m["id"]}, status=201).json
    call(c, "POST", "/v1/sessions", "/v1/sessions", status=201)
    call(c, "GET", SE.format(id=s["id"]), SE, status=200)
    call(c, "POST", SE.format(id=s["id"]) + "/messages", SE + "/messages",
         {"role": "user", "content": "hello"}, status=201)
    call(c, "GET", SE.format(id=s["id"]) + "/messages", SE + "/messages", status=200)
    call(c, "GET", "/v1/sessions", "/v1/sessions", status=200)
    gone_box = call(c, "POST", "/v1/computers", "/v1/computers", {"name": "tmp"},
                    status=201).json
    call(c, "DELETE", C.format(id=gone_box["id"]), C, status=204)
    call(c, "GET", C.format(id=gone_box["id"]), C, status=200)
    call(c, "DELETE", S.format(id=sa2["id"]), S, status=204)

    # Alerts: the key expiring in 5 days raises expiring_soon.
    def open_alerts():
        r = call(c, "GET", "/v1/alerts?status=open", "/v1/alerts", status=200)
        return r.json["alerts"]
    alerts = h.wait_until(open_alerts, 15, what="an expiring_soon alert")
    A = "/v1/alerts/{id}/ack"
    call(c, "POST", A.format(id=alerts[0]["id"]), A, status=200)
    call(c, "GET", "/v1/alerts", "/v1/alerts", status=200)

    # Usage, once the verifications are flushed.
    time.sleep(0.5)
    UK = "/v1/api-keys/{id}/usage"
    rep = call(c, "GET", UK.format(id=k["id"]) + "?granularity=hour", UK,
               status=200).json
    check(rep["totals"]["requests"] > 0 and rep["flows"], "usage report without "
          "the verifications: %s" % h._short(rep))
    call(c, "GET", UK.format(id=k["id"]) + "?format=csv", UK, status=200,
         validate=False)  # not JSON: the harness would object
    call(c, "GET", "/v1/usage", "/v1/usage", status=200)
    call(c, "GET", "/v1/usage?format=csv", "/v1/usage", status=200,
         validate=False)  # not JSON: the harness would object

    # The audit history.
    ev = call(c, "GET", "/v1/audit-events?limit=500", "/v1/audit-events",
              status=200).json
    types = {e["type"] for e in ev["events"]}
    for t in ("OrgCreated", "KeyCreated", "KeyRevoked", "UserInvited",
              "ServiceAccountCreated", "ComputerCreated", "MessagePosted",
              "AlertRaised"):
        check(t in types, "no %s event among %s" % (t, sorted(types)))
    call(c, "GET", "/v1/audit-events?limit=1", "/v1/audit-events", status=200)
    call(c, "GET", "/v1/audit-events?format=jsonl&limit=2", "/v1/audit-events",
         status=200, validate=False)
    call(c, "GET", "/v1/audit-events/head", "/v1/audit-events/head", status=200)
    call(c, "GET", "/v1/org/control-history", "/v1/org/control-history", status=200)

    # Operations.
    plain_client = h.Client(port, None)
    for p in ("/healthz", "/readyz", "/metrics"):
        if p in doc()["paths"]:
            call(plain_client, "GET", p, p, status=200)
    eq(me["key_id"], env.info["key_id"], "/v1/me key_id")
    env.stop()


def test_errors_validate_against_the_schemas():
    env = h.Env()
    c = env.client()
    port = env.port
    K = "/v1/api-keys/{id}"
    # 404 for an unknown id, 400 naming an unknown field (which the
    # document's request schema rejects too), 400 malformed JSON, 415, 401.
    call(c, "GET", K.format(id=h.random_id("key")), K, status=404)
    body = {"name": "x", "nmae": "typo"}
    check(schema_errors(doc(), request_schema("POST", "/v1/api-keys"), body),
          "the document accepts a key body with an unknown field")
    r = conforms(expect(c.post("/v1/api-keys", body), 400), "/v1/api-keys")
    eq(r.json["error"]["field"], "nmae", "error.field")
    conforms(expect(c.post("/v1/api-keys", "{", content_type="application/json"),
                    400), "/v1/api-keys")
    conforms(expect(c.post("/v1/api-keys", "name=x", content_type="text/plain"),
                    415), "/v1/api-keys")
    conforms(expect(h.Client(port, None).get("/v1/org"), 401), "/v1/org")
    conforms(expect(h.Client(port, "kl_live_nope").get("/v1/me"), 401), "/v1/me")
    both = {"name": "x", "expires_at": h.fmt_time(time.time() + 3600),
            "expires_in_days": 1}
    check(schema_errors(doc(), request_schema("POST", "/v1/api-keys"), both),
          "the document accepts expires_at with expires_in_days")
    conforms(expect(c.post("/v1/api-keys", both), 400), "/v1/api-keys")

    # 409, 412, 422.
    k, _ = h.create_key(c, "twice")
    call(c, "POST", K.format(id=k["id"]) + "/revoke", K + "/revoke", status=200)
    call(c, "POST", K.format(id=k["id"]) + "/revoke", K + "/revoke", status=409)
    call(c, "PATCH", K.format(id=k["id"]), K, {"name": "y"}, status=412,
         headers={"If-Match": '"99"'})
    idem = {"Idempotency-Key": "openapi-1"}
    first = call(c, "POST", "/v1/api-keys", "/v1/api-keys", {"name": "idem"},
                 status=201, headers=idem)
    again = call(c, "POST", "/v1/api-keys", "/v1/api-keys", {"name": "idem"},
                 status=201, headers=idem)
    eq(again.header("Idempotent-Replayed"), "true", "Idempotent-Replayed")
    eq(again.json["id"], first.json["id"], "replayed key id")
    call(c, "POST", "/v1/api-keys", "/v1/api-keys", {"name": "other"},
         status=422, headers=idem)

    # 403: a member's key on the management API.
    u = expect(c.post("/v1/org/users", {"email": "m@example.com", "role": "member"}),
               201).json
    mk = expect(c.post("/v1/org/users/%s/api-keys" % u["id"], {"name": "m"}),
                201).json["key"]
    call(h.Client(port, mk), "GET", "/v1/org", "/v1/org", status=403)
    call(h.Client(port, mk), "GET", "/v1/me", "/v1/me", status=200)

    # 429 with RateLimit headers: a key allowed one call a minute.
    _, slow = h.create_key(c, "slow", rate_limit={"requests_per_minute": 1})
    sc = h.Client(port, slow)
    call(sc, "GET", "/v1/me", "/v1/me", status=200)
    r = call(sc, "GET", "/v1/me", "/v1/me", status=429)
    check("minute" in (r.header("RateLimit") or ""), "RateLimit header %r"
          % r.header("RateLimit"))
    env.stop()


def test_verify_throttle_validates():
    env = h.Env(config={"verify_failures_per_minute": 2})
    anon = h.Client(env.port, None)
    V = "/v1/keys/verify"
    # Two failures a minute, then 429 (a few more tries in case a minute
    # turns over between them).
    statuses = [call(anon, "POST", V, V, {"key": "kl_live_nope"}).status
                for _ in range(6)]
    check(429 in statuses and set(statuses) <= {200, 429},
          "statuses of failed verifications: %r" % statuses)
    call(anon, "POST", V, V)
    env.stop()


if __name__ == "__main__":
    h.main(globals())
