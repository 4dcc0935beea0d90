"""
End-to-end tests of the organization API: users and roles, service
accounts, usage limits, computers, sessions and messages, and the control
history (contract sections 2, 3 and 4 "Organization and users", "Service
accounts", "Owned resources" and `GET /v1/org/control-history`), with the
choices of docs/api-notes.md where the contract is silent.

Every test starts its own daemon on a fresh data dir (a second organization,
when one is needed, is made with `keyledger org-create` before the daemon
starts). The client checks X-Request-Id and the error shape on every
response (see harness.validate_response).

Run: KL_BUILD_DIR=build python3 tests/e2e/test_org.py [name-substring...]
"""

import hashlib
import os
import re
import sys
import threading
import time

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, expect_error, fail  # noqa: E402

GENERIC_401 = "invalid, expired or revoked API key"
ROLES = ("owner", "manager", "member", "guest")
SA_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
PRINCIPAL_RE = h.PRINCIPAL_RE
MISSING = object()

USERS = "/v1/org/users"
U = "/v1/org/users/%s"
SAS = "/v1/service-accounts"
SA = "/v1/service-accounts/%s"
KEYS = "/v1/api-keys"
K = "/v1/api-keys/%s"
CMPS = "/v1/computers"
CMP = "/v1/computers/%s"
SESS = "/v1/sessions"
SES = "/v1/sessions/%s"
LIMITS = "/v1/org/usage-limits"
HISTORY = "/v1/org/control-history"

USER_FIELDS = {"id", "org_id", "email", "name", "role", "status",
               "created_at", "updated_at", "version"}
SA_REQUIRED = {"id", "org_id", "name", "description", "role", "is_active",
               "created_at", "created_by", "updated_at", "version"}
SA_OPTIONAL = {"deactivated_at"}
CMP_REQUIRED = {"id", "name", "owner", "status", "created_by", "created_at",
                "version"}
CMP_OPTIONAL = {"restarted_at"}
SES_REQUIRED = {"id", "created_by", "created_at", "version"}
SES_OPTIONAL = {"title", "computer_id"}
MSG_FIELDS = {"id", "session_id", "role", "content", "created_by", "created_at"}
EVENT_REQUIRED = {"seq", "id", "type", "category", "occurred_at", "org_id",
                  "actor", "data", "hash"}
EVENT_OPTIONAL = {"target", "request_id"}
LIMIT_FIELDS = ("requests_per_minute", "requests_per_day", "requests_per_month")


def starts_with(prefix):
    return lambda f: isinstance(f, str) and f.startswith(prefix)


def expect_401_generic(resp):
    return expect_error(resp, 401, "unauthenticated",
                        message_contains=GENERIC_401)


def expect_403(resp):
    return expect_error(resp, 403, "permission_denied")


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_version(obj, what):
    check(is_int(obj.get("version")) and obj["version"] >= 1,
          "%s version %r" % (what, obj.get("version")))


def check_fields(obj, required, optional, what):
    check(isinstance(obj, dict), "%s is not an object: %r" % (what, obj))
    missing = required - set(obj)
    check(not missing, "%s lacks %s: %s" % (what, sorted(missing), h._short(obj)))
    extra = set(obj) - required - optional
    check(not extra, "%s has fields the contract does not list %s: %s" % (
        what, sorted(extra), h._short(obj)))


# --------------------------------------------------------------------------
# Object checks

def check_user(u, org_id=None):
    check_fields(u, USER_FIELDS, set(), "user")
    check(h.is_id(u["id"], "usr"), "user id %r" % u["id"])
    check(h.is_id(u["org_id"], "org"), "user org_id %r" % u["org_id"])
    if org_id is not None:
        eq(u["org_id"], org_id, "user org_id")
    check(isinstance(u["email"], str) and u["email"].count("@") == 1,
          "user email %r" % u["email"])
    check(isinstance(u["name"], str) and len(u["name"]) <= 128,
          "user name %r" % u["name"])
    check(u["role"] in ROLES, "user role %r" % u["role"])
    check(u["status"] in ("active", "removed"), "user status %r" % u["status"])
    created = h.parse_time(u["created_at"], "user created_at")
    check(h.parse_time(u["updated_at"], "user updated_at") >= created,
          "user updated_at before created_at: %r" % u)
    check_version(u, "user")
    return u


def check_sa(s, org_id=None):
    check_fields(s, SA_REQUIRED, SA_OPTIONAL, "service account")
    check(h.is_id(s["id"], "sa"), "service account id %r" % s["id"])
    check(h.is_id(s["org_id"], "org"), "org_id %r" % s["org_id"])
    if org_id is not None:
        eq(s["org_id"], org_id, "service account org_id")
    check(isinstance(s["name"], str) and SA_NAME_RE.match(s["name"]),
          "service account name %r" % s["name"])
    check(isinstance(s["description"], str) and len(s["description"]) <= 1024,
          "service account description %r" % s["description"])
    check(s["role"] in ("manager", "member"), "service account role %r" %
          s["role"])
    check(isinstance(s["is_active"], bool), "is_active %r" % s["is_active"])
    check(isinstance(s["created_by"], str) and
          PRINCIPAL_RE.match(s["created_by"]) is not None,
          "service account created_by %r is not a usr_/sa_ id" % s["created_by"])
    created = h.parse_time(s["created_at"], "service account created_at")
    check(h.parse_time(s["updated_at"], "updated_at") >= created,
          "service account updated_at before created_at: %r" % s)
    # deactivated_at: present while inactive, absent while active.
    eq("deactivated_at" in s, not s["is_active"],
       "presence of deactivated_at with is_active=%s" % s["is_active"])
    if "deactivated_at" in s:
        h.parse_time(s["deactivated_at"], "deactivated_at")
    check_version(s, "service account")
    return s


def check_principal_ref(o, what):
    check(isinstance(o, dict) and set(o) == {"type", "id"},
          "%s must be {type, id}: %r" % (what, o))
    check(o["type"] in ("user", "service_account"), "%s.type %r" % (what, o))
    check(h.is_id(o["id"], "usr" if o["type"] == "user" else "sa"),
          "%s.id %r" % (what, o))


def check_computer(cm):
    check_fields(cm, CMP_REQUIRED, CMP_OPTIONAL, "computer")
    check(h.is_id(cm["id"], "cmp"), "computer id %r" % cm["id"])
    check(isinstance(cm["name"], str) and 1 <= len(cm["name"]) <= 128,
          "computer name %r" % cm["name"])
    check_principal_ref(cm["owner"], "computer owner")
    check(cm["status"] in ("running", "restarting", "deleted"),
          "computer status %r" % cm["status"])
    check(isinstance(cm["created_by"], str) and
          PRINCIPAL_RE.match(cm["created_by"]) is not None,
          "computer created_by %r" % cm["created_by"])
    h.parse_time(cm["created_at"], "computer created_at")
    if "restarted_at" in cm:
        h.parse_time(cm["restarted_at"], "restarted_at")
    check_version(cm, "computer")
    return cm


def check_session(s):
    check_fields(s, SES_REQUIRED, SES_OPTIONAL, "session")
    check(h.is_id(s["id"], "ses"), "session id %r" % s["id"])
    if "title" in s:
        check(isinstance(s["title"], str) and len(s["title"]) <= 256,
              "session title %r" % s["title"])
    if "computer_id" in s:
        check(h.is_id(s["computer_id"], "cmp"), "computer_id %r" %
              s["computer_id"])
    check(isinstance(s["created_by"], str) and
          PRINCIPAL_RE.match(s["created_by"]) is not None,
          "session created_by %r" % s["created_by"])
    h.parse_time(s["created_at"], "session created_at")
    check_version(s, "session")
    return s


def check_message(m):
    check_fields(m, MSG_FIELDS, set(), "message")
    check(h.is_id(m["id"], "msg"), "message id %r" % m["id"])
    check(h.is_id(m["session_id"], "ses"), "session_id %r" % m["session_id"])
    check(m["role"] in ("user", "assistant"), "message role %r" % m["role"])
    check(isinstance(m["content"], str) and 1 <= len(m["content"]) <= 16384,
          "message content of %r" % (type(m["content"]),))
    check(isinstance(m["created_by"], str) and
          PRINCIPAL_RE.match(m["created_by"]) is not None,
          "message created_by %r" % m["created_by"])
    h.parse_time(m["created_at"], "message created_at")
    return m


def check_key(k, with_secret=False, env=None):
    """h.check_key, except that is_active may be false on an `active` key
    whose owner is removed or deactivated (docs/api-notes.md: such keys keep
    their status and show is_active false); the harness insists on
    is_active == (status == "active")."""
    check(isinstance(k, dict), "key object is not an object: %r" % (k,))
    copy = dict(k)
    if copy.get("status") == "active" and copy.get("is_active") is False:
        copy["is_active"] = True
    h.check_key(copy, with_secret=with_secret, env=env)
    check(isinstance(k["is_active"], bool), "is_active %r" % k["is_active"])
    if k["status"] != "active":
        eq(k["is_active"], False, "is_active of a %s key" % k["status"])
    return k


def unknown_id(prefix):
    """A well-formed id no daemon issued; its first character is 0, so it is
    also a valid 128-bit ULID (h.random_id may start above 7)."""
    return prefix + "_0" + h.random_id(prefix)[len(prefix) + 2:]


def no_last_used(v):
    if isinstance(v, dict):
        return {k: no_last_used(x) for k, x in v.items() if k != "last_used_at"}
    if isinstance(v, list):
        return [no_last_used(x) for x in v]
    return v


def sibling_id(some_id):
    """The same id with another last character: issued by nobody, and next
    to some_id in id order."""
    last = some_id[-1]
    return some_id[:-1] + ("0" if last != "0" else "1")


def check_event(e, org_id):
    check_fields(e, EVENT_REQUIRED, EVENT_OPTIONAL, "event")
    check(is_int(e["seq"]) and e["seq"] >= 1, "event seq %r" % e["seq"])
    check(isinstance(e["id"], str) and e["id"], "event id %r" % e["id"])
    check(isinstance(e["type"], str) and e["type"], "event type %r" % e["type"])
    check(e["category"] in ("control", "keys"), "control history holds "
          "categories control and keys only, got %r: %s" % (e["category"],
                                                             h._short(e)))
    h.parse_time(e["occurred_at"], "occurred_at")
    eq(e["org_id"], org_id, "event org_id (never another org's events)")
    a = e["actor"]
    check(isinstance(a, dict) and {"type", "id"} <= set(a) <=
          {"type", "id", "key_id"}, "actor %r" % (a,))
    check(a["type"] in ("user", "service_account", "system"), "actor.type %r"
          % (a,))
    if a["type"] == "user":
        check(h.is_id(a["id"], "usr"), "actor.id %r" % (a,))
    elif a["type"] == "service_account":
        check(h.is_id(a["id"], "sa"), "actor.id %r" % (a,))
    if "key_id" in a:
        check(h.is_id(a["key_id"], "key"), "actor.key_id %r" % (a,))
    if "target" in e:
        t = e["target"]
        check(isinstance(t, dict) and set(t) == {"type", "id"},
              "target %r" % (t,))
    check(isinstance(e["data"], dict), "data %r" % (e["data"],))
    if "request_id" in e:
        check(h.REQ_ID_RE.match(e["request_id"]) is not None,
              "request_id %r" % e["request_id"])
    check(isinstance(e["hash"], str) and re.match(r"^[0-9a-f]{64}$", e["hash"]),
          "hash %r" % e["hash"])
    return e


# --------------------------------------------------------------------------
# Making things

def invite(c, email, role="member", name=None):
    body = {"email": email, "role": role}
    if name is not None:
        body["name"] = name
    u = check_user(expect(c.post(USERS, body), 201).json)
    eq(u["email"].lower(), email.lower(), "invited email")
    eq(u["role"], role, "invited role")
    eq(u["status"], "active", "invited status")
    return u


def mint_user_key(c, uid, name="k", **fields):
    body = {"name": name}
    body.update(fields)
    r = expect(c.post(U % uid + "/api-keys", body), 201)
    k = check_key(r.json, with_secret=True)
    eq(k["owner"], {"type": "user", "id": uid}, "minted key owner")
    return k, k["key"]


def mint_sa_key(c, sid, name="k", **fields):
    body = {"name": name}
    body.update(fields)
    r = expect(c.post(SA % sid + "/api-keys", body), 201)
    k = check_key(r.json, with_secret=True)
    eq(k["owner"], {"type": "service_account", "id": sid}, "minted key owner")
    return k, k["key"]


def create_sa(c, name, **fields):
    body = {"name": name}
    body.update(fields)
    s = check_sa(expect(c.post(SAS, body), 201).json)
    eq(s["name"], name, "service account name")
    return s


def create_computer(c, name="box", owner=None):
    body = {"name": name}
    if owner is not None:
        body["owner"] = owner
    cm = check_computer(expect(c.post(CMPS, body), 201).json)
    eq(cm["name"], name, "computer name")
    eq(cm["status"], "running", "new computer status")
    return cm


def create_session(c, title=None, computer_id=None):
    body = {}
    if title is not None:
        body["title"] = title
    if computer_id is not None:
        body["computer_id"] = computer_id
    return check_session(expect(c.post(SESS, body), 201).json)


def post_message(c, sid, role, content):
    m = check_message(expect(c.post(SES % sid + "/messages",
                                    {"role": role, "content": content}), 201).json)
    eq((m["session_id"], m["role"], m["content"]), (sid, role, content),
       "message as posted")
    return m


def me(c):
    return h.me(c)


# --------------------------------------------------------------------------
# Reading things

def list_all_of(c, path, field, limit=500, query=None):
    """Follows next_cursor; every item of the list in order."""
    out, cursor = [], None
    for _ in range(1000):
        q = {"limit": str(limit)}
        q.update(query or {})
        if cursor is not None:
            q["cursor"] = cursor
        r = expect(c.get(path, query=q), 200)
        body = r.json
        check(isinstance(body, dict) and set(body) == {field, "next_cursor"},
              "list must be exactly {%s, next_cursor}: %s" % (field, r.describe()))
        check(isinstance(body[field], list), "%s is not a list" % field)
        out.extend(body[field])
        cursor = body["next_cursor"]
        if cursor is None:
            return out
        check(isinstance(cursor, str) and cursor, "next_cursor %r" % (cursor,))
    fail("pagination of %s did not end" % path)


def page_sizes(c, path, field, limit, query=None):
    """(sizes of each page, ids over all pages) with this limit."""
    sizes, ids, cursor = [], [], None
    while True:
        q = {"limit": str(limit)}
        q.update(query or {})
        if cursor is not None:
            q["cursor"] = cursor
        body = expect(c.get(path, query=q), 200).json
        sizes.append(len(body[field]))
        ids.extend(x["id"] for x in body[field])
        cursor = body["next_cursor"]
        if cursor is None:
            return sizes, ids
        check(len(sizes) <= 200, "pagination does not end (limit %d)" % limit)


def history(c, query=None, limit=500):
    """Every control-history event matching query, newest first."""
    return list_all_of(c, HISTORY, "events", limit=limit, query=query)


def ids_of(items):
    return [x["id"] for x in items]


def org_snapshot(c):
    """The visible state of the caller's org (keys minus last_used_at, which
    moves whenever a key is used; the newest control-history seq)."""
    snap = {
        "org": expect(c.get("/v1/org"), 200).json,
        "usage_limits": expect(c.get(LIMITS), 200).json,
        "users": list_all_of(c, USERS, "users"),
        "service_accounts": list_all_of(c, SAS, "service_accounts"),
        "keys": h.key_snapshot(c),
        "computers": list_all_of(c, CMPS, "computers"),
        "sessions": list_all_of(c, SESS, "sessions"),
    }
    snap["messages"] = {s["id"]: list_all_of(c, SES % s["id"] + "/messages",
                                             "messages")
                        for s in snap["sessions"]}
    ev = expect(c.get(HISTORY, query={"limit": "1"}), 200).json["events"]
    snap["history_head"] = ev[0]["seq"] if ev else None
    return snap


def assert_same(c, before, what="a rejected request"):
    after = org_snapshot(c)
    for k in before:
        if before[k] != after[k]:
            fail("%s changed %s: before %s; after %s" % (
                what, k, h._short(before[k], 600), h._short(after[k], 600)))


def fresh_namer(prefix):
    n = [0]

    def name():
        n[0] += 1
        return "%s%d" % (prefix, n[0])
    return name


def two_org_env():
    """An org from `init` and a second one from `org-create` in the same log;
    returns (env, info of the second org)."""
    env = h.Env(start=False)
    other = h.org_create(env.data, org="Other Org", email="owner2@example.net")
    env.start()
    return env, other


# --------------------------------------------------------------------------
# Users

def test_invite_get_and_list_users():
    env = h.Env()
    c = env.client()
    org = env.info["org_id"]
    t0 = time.time()
    r = expect(c.post(USERS, {"email": "ada@example.com", "name": "Ada Lovelace",
                              "role": "manager"}), 201)
    ada = check_user(r.json, org)
    eq((ada["email"], ada["name"], ada["role"], ada["status"]),
       ("ada@example.com", "Ada Lovelace", "manager", "active"), "invited user")
    h.near(h.parse_time(ada["created_at"]), t0, 10, "created_at")
    eq(ada["updated_at"], ada["created_at"], "updated_at of a new user")
    check(ada["id"] > env.info["user_id"], "user ids are time-ordered")
    eq(expect(c.get(U % ada["id"]), 200).json, ada, "GET after invite")

    bob = invite(c, "bob@example.com", "guest")
    eq(bob["name"], "", "name when none was given")
    for role in ("member", "owner"):
        invite(c, "%s-user@example.com" % role, role)

    users = list_all_of(c, USERS, "users")
    byid = {u["id"]: check_user(u, org) for u in users}
    eq(len(byid), 5, "users listed (owner + 4 invited)")
    check(ada["id"] in byid and bob["id"] in byid, "invited users listed")
    own = byid[env.info["user_id"]]
    eq((own["email"], own["role"], own["status"]),
       ("owner@example.com", "owner", "active"), "the owner from init")
    for uid, u in byid.items():
        eq(expect(c.get(U % uid), 200).json, u, "list entry vs GET %s" % uid)

    before = org_snapshot(c)
    # Unique among the org's active users, case-insensitively.
    for email in ("ada@example.com", "ADA@Example.COM", "Owner@example.com"):
        expect_error(c.post(USERS, {"email": email, "role": "member"}), 409,
                     "conflict")
    expect_error(c.post(USERS, {"email": "carol@example.com"}), 400,
                 "invalid_argument", "role")
    expect_error(c.post(USERS, {"role": "member"}), 400, "invalid_argument",
                 "email")
    for uid in (unknown_id("usr"), "nope", env.info["key_id"]):
        expect_error(c.get(U % uid), 404, "not_found")
        expect_error(c.patch(U % uid, {"name": "x"}), 404, "not_found")
        expect_error(c.delete(U % uid), 404, "not_found")
        expect_error(c.get(U % uid + "/api-keys"), 404, "not_found")
        expect_error(c.post(U % uid + "/api-keys", {"name": "x"}), 404,
                     "not_found")
    assert_same(c, before)

    # Boundaries that are accepted: 128-char name, 254-char address.
    u = invite(c, "long@example.com", "member", name="n" * 128)
    eq(u["name"], "n" * 128, "128-character name")
    local = "a" * 60
    domain = "b" * 60 + "." + "c" * 60 + "." + "example.com"
    email = local + "@" + "d" * (254 - len(local) - 1 - len(domain) - 1) + \
        "." + domain
    eq(len(email), 254, "test setup: email length")
    invite(c, email, "guest")
    for ok in ("a@b.co", "first.last+tag@sub.example.org", "x_y-z@ex-ample.io"):
        invite(c, ok, "guest")


def test_users_pagination():
    env = h.Env()
    c = env.client()
    for i in range(11):
        invite(c, "page%02d@example.com" % i, "member")
    everything = list_all_of(c, USERS, "users")
    eq(len(everything), 12, "users listed (owner + 11)")
    ids = ids_of(everything)
    eq(len(set(ids)), 12, "distinct user ids")
    body = expect(c.get(USERS), 200).json
    eq(ids_of(body["users"]), ids, "default page (limit 50) holds all 12")
    check(body["next_cursor"] is None, "next_cursor must be null on the last "
          "page: %r" % (body["next_cursor"],))
    for limit, sizes in ((1, [1] * 12), (5, [5, 5, 2]), (6, [6, 6]),
                         (12, [12]), (500, [12])):
        got_sizes, got_ids = page_sizes(c, USERS, "users", limit)
        eq(got_sizes, sizes, "page sizes with limit=%d" % limit)
        eq(got_ids, ids, "ids over all pages with limit=%d" % limit)
    for bad in ("0", "501", "-1", "abc"):
        expect_error(c.get(USERS, query={"limit": bad}), 400,
                     "invalid_argument", "limit")
    expect_error(c.get(USERS, query={"cursor": "not-a-cursor"}), 400,
                 "invalid_argument", "cursor")
    # The default page is 50.
    for i in range(40):
        invite(c, "more%02d@example.com" % i, "guest")
    everything = list_all_of(c, USERS, "users")
    eq(len(everything), 52, "users listed (owner + 51)")
    body = expect(c.get(USERS), 200).json
    eq(ids_of(body["users"]), ids_of(everything)[:50], "default page")
    check(isinstance(body["next_cursor"], str) and body["next_cursor"],
          "next_cursor after a full default page: %r" % (body["next_cursor"],))
    rest = expect(c.get(USERS, query={"cursor": body["next_cursor"]}), 200).json
    eq(ids_of(rest["users"]), ids_of(everything)[50:], "second default page")
    check(rest["next_cursor"] is None, "next_cursor on the last page")


def test_patch_user_name_and_role():
    env = h.Env()
    c = env.client()
    u = invite(c, "pat@example.com", "member", name="Pat")
    r = expect(c.patch(U % u["id"], {"name": "Patricia"}), 200)
    u1 = check_user(r.json)
    eq((u1["name"], u1["role"], u1["email"]), ("Patricia", "member",
                                               "pat@example.com"), "after name")
    check(u1["version"] > u["version"], "version must grow on a change")
    check(u1["updated_at"] >= u["updated_at"], "updated_at must not go back")
    eq(u1["created_at"], u["created_at"], "created_at stays")
    u2 = check_user(expect(c.patch(U % u["id"], {"role": "guest"}), 200).json)
    eq((u2["name"], u2["role"]), ("Patricia", "guest"), "after role change")
    check(u2["version"] > u1["version"], "version grows on a role change")
    u3 = check_user(expect(c.patch(U % u["id"], {"role": "manager",
                                                 "name": "P"}), 200).json)
    eq((u3["name"], u3["role"]), ("P", "manager"), "after name and role")
    eq(expect(c.get(U % u["id"]), 200).json, u3, "GET after the patches")
    # Nothing asked that is not already so: nothing written.
    for body in ({}, {"role": "manager"}, {"name": "P", "role": "manager"}):
        r = check_user(expect(c.patch(U % u["id"], body), 200).json)
        eq(r["version"], u3["version"], "version after a no-op PATCH %r" % body)
    eq(expect(c.get(U % u["id"]), 200).json, u3, "GET after no-op patches")


def test_remove_user():
    env = h.Env()
    c = env.client()
    u = invite(c, "rem@example.com", "manager")
    k, secret = mint_user_key(c, u["id"], "rem key")
    cu = h.Client(env.port, secret)
    eq(me(cu)["role"], "manager", "role before removal")
    expect(cu.get("/v1/org"), 200)
    r = expect(c.delete(U % u["id"]), 204)
    eq(r.body, b"", "204 body")
    # The user's keys stop at once.
    expect_401_generic(cu.get("/v1/me"))
    expect_401_generic(cu.get("/v1/org"))
    expect_401_generic(cu.post(KEYS, {"name": "x"}))
    g = check_user(expect(c.get(U % u["id"]), 200).json)
    eq(g["status"], "removed", "status after DELETE")
    eq((g["email"], g["role"]), (u["email"], u["role"]), "removed user keeps "
       "email and role")
    check(g["version"] > u["version"], "version grows on removal")
    listed = {x["id"]: x for x in list_all_of(c, USERS, "users")}
    check(u["id"] in listed, "a removed user stays listed")
    eq(listed[u["id"]], g, "removed user in the list")
    kg = check_key(expect(c.get(K % k["id"]), 200).json)
    eq((kg["status"], kg["is_active"]), ("active", False),
       "key of a removed user: status unchanged, is_active false")
    uk = list_all_of(c, U % u["id"] + "/api-keys", "api_keys")
    eq(ids_of(uk), [k["id"]], "the removed user's keys")
    listed_key = [x for x in h.list_all(c) if x["id"] == k["id"]]
    eq(len(listed_key), 1, "the removed user's key in GET /v1/api-keys")
    eq(listed_key[0], kg, "list entry vs GET of the removed user's key")

    before = org_snapshot(c)
    expect_error(c.patch(U % u["id"], {"name": "x"}), 409, "conflict")
    expect_error(c.patch(U % u["id"], {"role": "member"}), 409, "conflict")
    expect_error(c.delete(U % u["id"]), 409, "conflict")
    expect_error(c.post(U % u["id"] + "/api-keys", {"name": "x"}), 409,
                 "conflict")
    assert_same(c, before, "changes to a removed user")

    # The address can be invited again: a new user.
    again = invite(c, "REM@example.com", "member")
    check(again["id"] != u["id"], "re-invite made a new user id")
    _, s2 = mint_user_key(c, again["id"])
    eq(me(h.Client(env.port, s2))["principal"], {"type": "user",
                                                 "id": again["id"]}, "new key")
    expect_401_generic(cu.get("/v1/me"))
    statuses = {x["id"]: x["status"] for x in list_all_of(c, USERS, "users")}
    eq((statuses[u["id"]], statuses[again["id"]]), ("removed", "active"),
       "both users listed with their status")
    expect_error(c.post(USERS, {"email": "rem@example.com", "role": "guest"}),
                 409, "conflict")

    # A manager may remove themself; their key stops on the next request.
    m2 = invite(c, "self@example.com", "manager")
    _, s3 = mint_user_key(c, m2["id"])
    c3 = h.Client(env.port, s3)
    expect(c3.delete(U % m2["id"]), 204)
    expect_401_generic(c3.get("/v1/me"))
    eq(expect(c.get(U % m2["id"]), 200).json["status"], "removed",
       "status after removing oneself")


def test_manager_limits_on_owner_role():
    env = h.Env()
    c = env.client()
    owner_id = env.info["user_id"]
    mgr = invite(c, "mgr@example.com", "manager")
    _, ms = mint_user_key(c, mgr["id"])
    cm = h.Client(env.port, ms)
    o2 = invite(c, "o2@example.com", "owner")     # an owner grants owner
    mem = invite(c, "mem@example.com", "member")
    before = org_snapshot(c)
    for method, path, body in (
            ("POST", USERS, {"email": "x@example.com", "role": "owner"}),
            ("PATCH", U % mem["id"], {"role": "owner"}),
            ("PATCH", U % mgr["id"], {"role": "owner"}),
            ("PATCH", U % o2["id"], {"role": "manager"}),
            ("PATCH", U % owner_id, {"role": "member"}),
            ("DELETE", U % o2["id"], None),
            ("DELETE", U % owner_id, None),
            ("PUT", LIMITS, {"requests_per_day": 100000}),
            ("POST", U % mem["id"] + "/api-keys", {"name": "borrow"}),
            ("POST", U % owner_id + "/api-keys", {"name": "borrow"})):
        expect_403(cm.request(method, path, body))
    assert_same(c, before, "a manager's owner-only requests")
    eq(expect(cm.get(LIMITS), 200).json, {}, "a manager reads usage limits")

    # What a manager may do: invite and change non-owners, remove them, grant
    # manager/member/guest, and mint keys for themself.
    for role in ("manager", "member", "guest"):
        u = check_user(expect(cm.post(USERS, {"email": "by-mgr-%s@example.com"
                                              % role, "role": role}), 201).json)
        eq(u["role"], role, "role granted by a manager")
    for role in ("manager", "guest", "member"):
        u = check_user(expect(cm.patch(U % mem["id"], {"role": role}), 200).json)
        eq(u["role"], role, "role set by a manager")
    u = check_user(expect(cm.patch(U % mem["id"], {"name": "Mem"}), 200).json)
    eq(u["name"], "Mem", "name set by a manager")
    expect(cm.delete(U % mem["id"]), 204)
    eq(expect(c.get(U % mem["id"]), 200).json["status"], "removed",
       "removed by a manager")
    k = check_key(expect(cm.post(U % mgr["id"] + "/api-keys",
                                   {"name": "self"}), 201).json, with_secret=True)
    eq((k["owner"], k["created_by"]), ({"type": "user", "id": mgr["id"]},
                                       mgr["id"]), "manager's own key")
    eq(me(h.Client(env.port, k["key"]))["role"], "manager", "role of that key")

    # An owner grants and takes owner, and removes another owner.
    o3 = check_user(expect(c.patch(U % mgr["id"], {"role": "owner"}), 200).json)
    eq(o3["role"], "owner", "owner promotes a manager to owner")
    eq(check_user(expect(c.patch(U % o2["id"], {"role": "manager"}),
                         200).json)["role"], "manager", "owner demotes an owner")
    expect(c.delete(U % mgr["id"]), 204)
    eq(expect(c.get(U % mgr["id"]), 200).json["status"], "removed",
       "an owner removes another owner")


def test_manager_cannot_borrow_an_owner_key_by_regenerating_it():
    # The contract forbids a manager to mint a key for someone else because
    # "a manager minting a key for someone else could borrow a higher role".
    # Regenerating an owner's key hands the manager a new secret that acts
    # as that owner, so the same rule must hold (403, nothing changed).
    env = h.Env()
    c = env.client()
    mgr = invite(c, "mgr@example.com", "manager")
    _, ms = mint_user_key(c, mgr["id"])
    sam = create_sa(c, "sa-mgr")
    _, ss = mint_sa_key(c, sam["id"])
    o2 = invite(c, "o2@example.com", "owner")
    o2k, o2s = mint_user_key(c, o2["id"])
    before = org_snapshot(c)
    for secret in (ms, ss):
        for kid in (env.info["key_id"], o2k["id"]):
            for grace in (0, 600):
                r = h.Client(env.port, secret).post(
                    K % kid + "/regenerate", {"grace_period_seconds": grace})
                if r.status == 200:
                    stolen = r.json.get("key", "")
                    fail("a %s regenerated an owner's key and got a secret "
                         "acting as %s: %s" % (
                             "manager" if secret == ms else "manager SA",
                             me(h.Client(env.port, stolen))["role"]
                             if stolen else "?", r.describe()))
                expect_403(r)
    assert_same(c, before, "regenerating an owner's key as a manager")
    eq(me(c)["key_id"], env.info["key_id"], "the owner's key still works")
    eq(me(h.Client(env.port, o2s))["key_id"], o2k["id"], "o2's key still works")
    # Regenerating is minting a new secret, so the minting rule holds: a
    # manager may regenerate their own keys and service accounts' keys, not
    # another user's (not even a member's: keys for others come from an
    # owner).
    mem = invite(c, "mem@example.com", "member")
    mk, _ = mint_user_key(c, mem["id"])
    for secret in (ms, ss):
        expect_403(h.Client(env.port, secret).post(K % mk["id"] + "/regenerate", {}))
    own, _ = mint_user_key(h.Client(env.port, ms), mgr["id"])
    sak, _ = mint_sa_key(c, sam["id"])
    for kid, role in ((own["id"], "manager"), (sak["id"], "manager")):
        r = expect(h.Client(env.port, ms).post(K % kid + "/regenerate", {}), 200)
        eq(me(h.Client(env.port, r.json["key"]))["role"], role,
           "role of a regenerated key")


def test_last_owner_cannot_be_demoted_or_removed():
    env = h.Env()
    c = env.client()
    owner_id = env.info["user_id"]
    before = org_snapshot(c)
    for role in ("manager", "member", "guest"):
        expect_error(c.patch(U % owner_id, {"role": role}), 409, "conflict")
    expect_error(c.patch(U % owner_id, {"role": "guest", "name": "x"}), 409,
                 "conflict")
    expect_error(c.delete(U % owner_id), 409, "conflict")
    assert_same(c, before, "demoting or removing the last owner")
    eq(me(c)["role"], "owner", "still owner")

    o2 = invite(c, "o2@example.com", "owner")
    _, s2 = mint_user_key(c, o2["id"])
    c2 = h.Client(env.port, s2)
    # Two owners: the first may be removed (by the other).
    expect(c2.delete(U % owner_id), 204)
    expect_401_generic(c.get("/v1/me"))
    # A removed owner does not count: o2 is now the last active owner.
    before = org_snapshot(c2)
    expect_error(c2.patch(U % o2["id"], {"role": "manager"}), 409, "conflict")
    expect_error(c2.delete(U % o2["id"]), 409, "conflict")
    assert_same(c2, before, "demoting or removing the last active owner")
    # With another owner, o2 may demote themself.
    o3 = invite(c2, "o3@example.com", "owner")
    _, s3 = mint_user_key(c2, o3["id"])
    c3 = h.Client(env.port, s3)
    eq(check_user(expect(c2.patch(U % o2["id"], {"role": "manager"}),
                         200).json)["role"], "manager", "self-demotion")
    eq(me(c2)["role"], "manager", "demotion applies to the next request")
    expect_403(c2.put(LIMITS, {"requests_per_day": 100000}))
    expect_403(c2.patch(U % o3["id"], {"role": "manager"}))
    before = org_snapshot(c3)
    expect_error(c3.patch(U % o3["id"], {"role": "member"}), 409, "conflict")
    expect_error(c3.delete(U % o3["id"]), 409, "conflict")
    assert_same(c3, before, "demoting or removing the last active owner")


def test_key_follows_its_owners_current_role():
    env = h.Env()
    c = env.client()
    u = invite(c, "shifty@example.com", "guest")
    _, s = mint_user_key(c, u["id"])
    cu = h.Client(env.port, s)
    m = me(cu)
    eq((m["role"], m["principal"]), ("guest", {"type": "user", "id": u["id"]}),
       "/v1/me of a guest key")
    expect_403(cu.get("/v1/org"))
    expect(c.patch(U % u["id"], {"role": "member"}), 200)
    eq(me(cu)["role"], "member", "role after promotion to member")
    expect_403(cu.get(KEYS))
    expect(c.patch(U % u["id"], {"role": "manager"}), 200)
    # A promotion takes effect on the very next request.
    expect(cu.get("/v1/org"), 200)
    eq(me(cu)["role"], "manager", "role after promotion to manager")
    invite(cu, "by-shifty@example.com", "member")
    expect_403(cu.put(LIMITS, {"requests_per_day": 100000}))
    expect(c.patch(U % u["id"], {"role": "owner"}), 200)
    expect(cu.put(LIMITS, {"requests_per_day": 100000}), 200)
    expect(cu.put(LIMITS, {}), 200)
    # A demotion too.
    expect(c.patch(U % u["id"], {"role": "member"}), 200)
    expect_403(cu.get("/v1/org"))
    expect_403(cu.post(USERS, {"email": "no@example.com", "role": "guest"}))
    eq(me(cu)["role"], "member", "role after demotion")
    expect(c.patch(U % u["id"], {"role": "manager"}), 200)
    expect(cu.get("/v1/org"), 200)


def test_keys_for_users():
    env = h.Env()
    c = env.client()
    owner_id = env.info["user_id"]
    mem = invite(c, "mem@example.com", "member")
    mgr = invite(c, "mgr@example.com", "manager")
    t0 = time.time()
    r = expect(c.post(U % mem["id"] + "/api-keys",
                      {"name": "mem key", "description": "for mem",
                       "permissions": {"access": "read_only"},
                       "environment": "test", "expires_in_days": 10}), 201)
    mk = check_key(r.json, with_secret=True, env="test")
    eq((mk["owner"], mk["created_by"]), ({"type": "user", "id": mem["id"]},
                                         owner_id), "owner and created_by")
    eq((mk["name"], mk["description"], mk["permissions"]),
       ("mem key", "for mem", {"access": "read_only"}), "fields as sent")
    h.near(h.parse_time(mk["expires_at"]), t0 + 10 * 86400, 120, "expires_at")
    m = me(h.Client(env.port, mk["key"]))
    eq((m["principal"], m["role"], m["key_id"]),
       ({"type": "user", "id": mem["id"]}, "member", mk["id"]),
       "/v1/me of a key minted for a member")
    expect_403(h.Client(env.port, mk["key"]).get("/v1/org"))

    gk, gs = mint_user_key(c, mgr["id"], "mgr key")
    cm = h.Client(env.port, gs)
    sk = check_key(expect(cm.post(U % mgr["id"] + "/api-keys",
                                    {"name": "self"}), 201).json,
                     with_secret=True)
    eq((sk["owner"], sk["created_by"]), ({"type": "user", "id": mgr["id"]},
                                         mgr["id"]), "manager's own key")
    before = org_snapshot(c)
    expect_403(cm.post(U % mem["id"] + "/api-keys", {"name": "x"}))
    expect_403(cm.post(U % owner_id + "/api-keys", {"name": "x"}))
    assert_same(c, before, "a manager minting for someone else")

    for cl in (c, cm):
        r = expect(cl.get(U % mem["id"] + "/api-keys"), 200)
        check(mk["key"].encode() not in r.body, "secret in a list")
        eq(set(r.json), {"api_keys", "next_cursor"}, "user keys list fields")
        eq(ids_of(r.json["api_keys"]), [mk["id"]], "keys of the member")
        for x in r.json["api_keys"]:
            check_key(x)
        eq(sorted(ids_of(list_all_of(cl, U % mgr["id"] + "/api-keys",
                                     "api_keys"))),
           sorted([gk["id"], sk["id"]]), "keys of the manager")
    eq(ids_of(list_all_of(c, U % owner_id + "/api-keys", "api_keys")),
       [env.info["key_id"]], "keys of the owner")
    eq(ids_of(list_all_of(c, KEYS, "api_keys", query={"owner": mem["id"]})),
       [mk["id"]], "GET /v1/api-keys?owner=<member>")


# --------------------------------------------------------------------------
# Service accounts

def test_service_account_create_get_list():
    env = h.Env()
    c = env.client()
    org = env.info["org_id"]
    owner_id = env.info["user_id"]
    t0 = time.time()
    s1 = create_sa(c, "ci-deploy", description="Deploys main", role="member")
    check_sa(s1, org)
    eq((s1["description"], s1["role"], s1["is_active"], s1["created_by"]),
       ("Deploys main", "member", True, owner_id), "service account as created")
    h.near(h.parse_time(s1["created_at"]), t0, 10, "created_at")
    eq(s1["updated_at"], s1["created_at"], "updated_at of a new account")
    s2 = create_sa(c, "build-bot")
    eq((s2["role"], s2["description"]), ("manager", ""), "defaults")
    check(s2["id"] > s1["id"], "service account ids are time-ordered")
    for s in (s1, s2):
        eq(expect(c.get(SA % s["id"]), 200).json, s, "GET after create")
    listed = list_all_of(c, SAS, "service_accounts")
    eq(ids_of(listed), [s1["id"], s2["id"]], "service accounts listed")
    eq(listed, [s1, s2], "list entries vs create responses")

    # Names: ^[a-z0-9][a-z0-9-]{1,62}$
    for name in ("ab", "0a", "a-", "9-9", "a" * 63, "x" + "-" * 62):
        create_sa(c, name)
    mgr = invite(c, "m@example.com", "manager")
    _, ms = mint_user_key(c, mgr["id"])
    by_mgr = create_sa(h.Client(env.port, ms), "made-by-manager")
    eq(by_mgr["created_by"], mgr["id"], "created_by a manager user")
    _, ss = mint_sa_key(c, s2["id"])
    by_sa = create_sa(h.Client(env.port, ss), "made-by-sa")
    eq(by_sa["created_by"], s2["id"], "created_by a service account")

    before = org_snapshot(c)
    for bad in ("", "a", "-ab", "Ab", "AB", "a_b", "a b", "a.b", "a" * 64,
                "\u00e9t\u00e9", "ab\n", 5, None, True, ["ab"], {"n": "ab"}):
        expect_error(c.post(SAS, {"name": bad}), 400, "invalid_argument", "name")
    expect_error(c.post(SAS, {}), 400, "invalid_argument", "name")
    expect_error(c.post(SAS, {"description": "no name"}), 400,
                 "invalid_argument", "name")
    for taken in ("ci-deploy", "build-bot", "ab"):
        expect_error(c.post(SAS, {"name": taken}), 409, "conflict")
    for sid in (unknown_id("sa"), "nope", env.info["user_id"]):
        expect_error(c.get(SA % sid), 404, "not_found")
        expect_error(c.patch(SA % sid, {"description": "x"}), 404, "not_found")
        expect_error(c.delete(SA % sid), 404, "not_found")
        expect_error(c.get(SA % sid + "/api-keys"), 404, "not_found")
        expect_error(c.post(SA % sid + "/api-keys", {"name": "x"}), 404,
                     "not_found")
    assert_same(c, before)

    # Unique forever: the name stays taken after the account is deleted.
    expect(c.delete(SA % s1["id"]), 204)
    expect_error(c.get(SA % s1["id"]), 404, "not_found")
    check(s1["id"] not in ids_of(list_all_of(c, SAS, "service_accounts")),
          "a deleted service account is listed")
    before = org_snapshot(c)
    expect_error(c.post(SAS, {"name": "ci-deploy"}), 409, "conflict")
    expect_error(c.post(SAS, {"name": "ci-deploy", "role": "manager"}), 409,
                 "conflict")
    assert_same(c, before, "re-using a deleted account's name")
    d = create_sa(c, "desc-max", description="d" * 1024)
    eq(d["description"], "d" * 1024, "1024-character description")


def test_service_accounts_pagination():
    env = h.Env()
    c = env.client()
    made = [create_sa(c, "sa-%02d" % i)["id"] for i in range(7)]
    eq(ids_of(list_all_of(c, SAS, "service_accounts")), made, "listed in order")
    for limit, sizes in ((1, [1] * 7), (3, [3, 3, 1]), (7, [7])):
        got_sizes, got_ids = page_sizes(c, SAS, "service_accounts", limit)
        eq(got_sizes, sizes, "page sizes with limit=%d" % limit)
        eq(got_ids, made, "ids with limit=%d" % limit)
    for bad in ("0", "501", "x"):
        expect_error(c.get(SAS, query={"limit": bad}), 400, "invalid_argument",
                     "limit")
    expect_error(c.get(SAS, query={"cursor": "zzz"}), 400, "invalid_argument",
                 "cursor")


def test_service_account_patch_and_activation():
    env = h.Env()
    c = env.client()
    s = create_sa(c, "worker", description="first")
    k, secret = mint_sa_key(c, s["id"], "worker key")
    eq(k["created_by"], env.info["user_id"], "key created_by")
    cs = h.Client(env.port, secret)
    m = me(cs)
    eq((m["principal"], m["role"], m["key_id"]),
       ({"type": "service_account", "id": s["id"]}, "manager", k["id"]),
       "/v1/me of a service account key")
    expect(cs.get("/v1/org"), 200)

    s1 = check_sa(expect(c.patch(SA % s["id"], {"description": "second"}),
                         200).json)
    check(s1["updated_at"] >= s["updated_at"], "updated_at went back")
    eq((s1["description"], s1["name"], s1["role"]), ("second", "worker",
                                                     "manager"), "after PATCH")
    check(s1["version"] > s["version"], "version grows")
    eq(s1["created_at"], s["created_at"], "created_at stays")
    s2 = check_sa(expect(c.patch(SA % s["id"], {"role": "member"}), 200).json)
    eq(s2["role"], "member", "role after PATCH")
    expect_403(cs.get("/v1/org"))           # at once
    eq(me(cs)["role"], "member", "/v1/me role after PATCH")
    s3 = check_sa(expect(c.patch(SA % s["id"], {"role": "manager"}), 200).json)
    expect(cs.get("/v1/org"), 200)

    # No-op patches write nothing.
    for body in ({}, {"is_active": True}):
        r = check_sa(expect(c.patch(SA % s["id"], body), 200).json)
        eq(r, s3, "no-op PATCH %r" % body)
    before = org_snapshot(c)
    for body in ({"name": "worker"}, {"name": "renamed"},
                 {"name": "renamed", "description": "x"}):
        expect_error(c.patch(SA % s["id"], body), 400, "invalid_argument", "name")
    assert_same(c, before, "renaming a service account")

    t0 = time.time()
    s4 = check_sa(expect(c.patch(SA % s["id"], {"is_active": False}), 200).json)
    eq(s4["is_active"], False, "is_active after deactivation")
    h.near(h.parse_time(s4["deactivated_at"]), t0, 10, "deactivated_at")
    check(s4["version"] > s3["version"], "version grows on deactivation")
    expect_401_generic(cs.get("/v1/me"))        # at once
    expect_401_generic(cs.get("/v1/org"))
    kg = check_key(expect(c.get(K % k["id"]), 200).json)
    eq((kg["status"], kg["is_active"]), ("active", False),
       "key of a deactivated account")
    eq(expect(c.get(SA % s["id"]), 200).json, s4, "GET while inactive")
    check(s["id"] in ids_of(list_all_of(c, SAS, "service_accounts")),
          "an inactive account is still listed")
    before = org_snapshot(c)
    eq(check_sa(expect(c.patch(SA % s["id"], {"is_active": False}), 200).json),
       s4, "deactivating twice changes nothing")
    expect_error(c.post(SA % s["id"] + "/api-keys", {"name": "x"}), 409,
                 "conflict")
    assert_same(c, before, "a key for a deactivated account")
    eq(ids_of(list_all_of(c, SA % s["id"] + "/api-keys", "api_keys")),
       [k["id"]], "keys of an inactive account are still listed")

    s5 = check_sa(expect(c.patch(SA % s["id"], {"is_active": True}), 200).json)
    eq(s5["is_active"], True, "is_active after reactivation")
    check("deactivated_at" not in s5, "deactivated_at after reactivation")
    eq(me(cs)["key_id"], k["id"], "the key works again after reactivation")
    eq(check_key(expect(c.get(K % k["id"]), 200).json)["is_active"], True,
       "key is_active after reactivation")
    k2, _ = mint_sa_key(c, s["id"], "second")
    eq(sorted(ids_of(list_all_of(c, SA % s["id"] + "/api-keys", "api_keys"))),
       sorted([k["id"], k2["id"]]), "keys of the service account")
    eq(sorted(ids_of(list_all_of(c, KEYS, "api_keys",
                                 query={"owner": s["id"]}))),
       sorted([k["id"], k2["id"]]), "GET /v1/api-keys?owner=<service account>")


def test_service_account_delete_cascades():
    env = h.Env()
    c = env.client()
    owner_id = env.info["user_id"]
    s = create_sa(c, "doomed")
    keep = create_sa(c, "survivor")
    k1, s1 = mint_sa_key(c, s["id"], "k1")
    k2, s2 = mint_sa_key(c, s["id"], "k2", environment="test")
    k3, _ = mint_sa_key(c, s["id"], "k3")
    expect(c.post(K % k3["id"] + "/revoke", {"comment": "old"}), 200)
    ck, _ = mint_sa_key(c, keep["id"], "survivor key")
    cs = h.Client(env.port, s1)
    owned = create_computer(c, "owned", owner=s["id"])
    by_sa = create_computer(cs, "made-by-sa")
    eq((by_sa["owner"], by_sa["created_by"]),
       ({"type": "service_account", "id": s["id"]}, s["id"]),
       "computer made with the account's key: owner and created_by")
    mine = create_computer(c, "mine")
    kept = create_computer(c, "kept", owner=keep["id"])
    ses_sa = create_session(cs, "sa session")
    eq(ses_sa["created_by"], s["id"], "session created_by")
    msg = post_message(cs, ses_sa["id"], "user", "hello")
    eq(msg["created_by"], s["id"], "message created_by")
    ses_own = create_session(c, "owner session")
    post_message(cs, ses_own["id"], "assistant", "sa writes in owner session")

    t0 = time.time()
    expect(c.delete(SA % s["id"]), 204)
    for secret in (s1, s2):
        expect_401_generic(h.Client(env.port, secret).get("/v1/me"))
    for method, path, body in (("GET", SA % s["id"], None),
                               ("PATCH", SA % s["id"], {"description": "x"}),
                               ("PATCH", SA % s["id"], {"is_active": True}),
                               ("DELETE", SA % s["id"], None),
                               ("GET", SA % s["id"] + "/api-keys", None),
                               ("POST", SA % s["id"] + "/api-keys",
                                {"name": "x"})):
        expect_error(c.request(method, path, body), 404, "not_found")
    eq(ids_of(list_all_of(c, SAS, "service_accounts")), [keep["id"]],
       "service accounts listed after the delete")

    allkeys = {x["id"]: check_key(x) for x in h.list_all(c)}
    for k in (k1, k2):
        x = allkeys.get(k["id"])
        check(x is not None, "revoked key %s missing from include_revoked "
              "list" % k["id"])
        eq((x["status"], x["is_active"], x["revoked_comment"]),
           ("revoked", False, "service account deleted"),
           "key of a deleted service account")
        eq(x["revoked_by"], owner_id, "revoked_by (who deleted the account)")
        h.near(h.parse_time(x["revoked_at"]), t0, 10, "revoked_at")
        eq(expect(c.get(K % k["id"]), 200).json, x, "GET vs list")
    eq(allkeys[k3["id"]]["revoked_comment"], "old",
       "a key revoked before keeps its comment")
    eq(allkeys[ck["id"]]["status"], "active", "other account's key")
    active = ids_of(h.list_all(c, include_revoked=False))
    for k in (k1, k2, k3):
        check(k["id"] not in active, "revoked key in the default list")

    for cm in (owned, by_sa):
        g = check_computer(expect(c.get(CMP % cm["id"]), 200).json)
        eq(g["status"], "deleted", "computer owned by the deleted account")
    eq(sorted(ids_of(list_all_of(c, CMPS, "computers"))),
       sorted([mine["id"], kept["id"]]), "computers listed")
    for cm in (mine, kept):
        eq(expect(c.get(CMP % cm["id"]), 200).json["status"], "running",
           "other computers keep running")
    expect_error(c.get(SES % ses_sa["id"]), 404, "not_found")
    expect_error(c.get(SES % ses_sa["id"] + "/messages"), 404, "not_found")
    expect_error(c.post(SES % ses_sa["id"] + "/messages",
                        {"role": "user", "content": "x"}), 404, "not_found")
    eq(ids_of(list_all_of(c, SESS, "sessions")), [ses_own["id"]],
       "sessions listed")
    eq(len(list_all_of(c, SES % ses_own["id"] + "/messages", "messages")), 1,
       "messages of a session that was not the account's")

    ev = history(c, {"type": "KeyRevoked"})
    by_target = {e["target"]["id"]: e for e in ev}
    for k in (k1, k2):
        check(k["id"] in by_target, "no KeyRevoked event for %s" % k["id"])
        eq(by_target[k["id"]]["data"].get("comment"), "service account deleted",
           "KeyRevoked data.comment")
    deleted = history(c, {"type": "ServiceAccountDeleted"})
    eq([e["target"] for e in deleted], [{"type": "service_account",
                                         "id": s["id"]}],
       "ServiceAccountDeleted events")
    expect_error(c.post(SAS, {"name": "doomed"}), 409, "conflict")

    # A manager service account may delete itself, with its own key.
    me_sa = create_sa(c, "self-deleter")
    k, secret = mint_sa_key(c, me_sa["id"])
    cself = h.Client(env.port, secret)
    expect(cself.delete(SA % me_sa["id"]), 204)
    expect_401_generic(cself.get("/v1/me"))
    g = check_key(expect(c.get(K % k["id"]), 200).json)
    eq((g["status"], g["revoked_comment"], g["revoked_by"]),
       ("revoked", "service account deleted", me_sa["id"]),
       "key of a service account that deleted itself")
    expect_error(c.get(SA % me_sa["id"]), 404, "not_found")


def test_service_account_keys_act_with_its_role():
    env = h.Env()
    c = env.client()
    mgr_sa = create_sa(c, "mgr-sa", role="manager")
    mem_sa = create_sa(c, "mem-sa", role="member")
    _, ms = mint_sa_key(c, mgr_sa["id"])
    _, bs = mint_sa_key(c, mem_sa["id"])
    cm = h.Client(env.port, ms)
    cb = h.Client(env.port, bs)
    eq(me(cb)["role"], "member", "member SA key role")
    eq(me(cb)["principal"], {"type": "service_account", "id": mem_sa["id"]},
       "member SA key principal")
    before = org_snapshot(c)
    for method, path, body in (("GET", "/v1/org", None), ("GET", KEYS, None),
                               ("GET", USERS, None), ("GET", SAS, None),
                               ("GET", SA % mem_sa["id"], None),
                               ("POST", KEYS, {"name": "x"}),
                               ("POST", SA % mem_sa["id"] + "/api-keys",
                                {"name": "x"}),
                               ("PATCH", SA % mem_sa["id"], {"role": "manager"}),
                               ("POST", CMPS, {"name": "x"}),
                               ("POST", SESS, {}),
                               ("GET", HISTORY, None)):
        expect_403(cb.request(method, path, body))
    assert_same(c, before, "a member service account's requests")

    k = check_key(expect(cm.post(KEYS, {"name": "own"}), 201).json,
                    with_secret=True)
    eq((k["owner"], k["created_by"]), ({"type": "service_account",
                                        "id": mgr_sa["id"]}, mgr_sa["id"]),
       "key made by a manager service account")
    u = invite(cm, "via-sa@example.com", "member")
    eq(history(c, {"type": "UserInvited", "target": u["id"]})[0]["actor"]["id"],
       mgr_sa["id"], "actor of an invitation by a service account")
    before = org_snapshot(c)
    expect_403(cm.put(LIMITS, {"requests_per_day": 100000}))
    expect_403(cm.post(U % u["id"] + "/api-keys", {"name": "x"}))
    expect_403(cm.post(USERS, {"email": "o@example.com", "role": "owner"}))
    assert_same(c, before, "owner-only requests by a manager service account")
    # The account's role is current on every request.
    expect(c.patch(SA % mgr_sa["id"], {"role": "member"}), 200)
    expect_403(cm.get("/v1/org"))
    expect(c.patch(SA % mem_sa["id"], {"role": "manager"}), 200)
    expect(cb.get("/v1/org"), 200)


# --------------------------------------------------------------------------
# Usage limits

def test_usage_limits():
    env = h.Env()
    c = env.client()
    eq(expect(c.get(LIMITS), 200).json, {}, "usage limits before any PUT")
    eq(expect(c.get("/v1/org"), 200).json.get("usage_limits", {}), {},
       "/v1/org usage_limits before any PUT")
    full = {"requests_per_minute": 6000, "requests_per_day": 1000000,
            "requests_per_month": 30000000}
    for body, want in ((full, full),
                       ({"requests_per_day": 500000}, {"requests_per_day": 500000}),
                       ({"requests_per_minute": None, "requests_per_day": 400000,
                         "requests_per_month": None}, {"requests_per_day": 400000}),
                       ({"requests_per_month": 9000000, "requests_per_minute": 5000},
                        {"requests_per_month": 9000000,
                         "requests_per_minute": 5000})):
        got = expect(c.put(LIMITS, body), 200).json
        eq(got, want, "PUT %r answers" % body)
        eq(expect(c.get(LIMITS), 200).json, want, "GET after PUT %r" % body)
        eq(expect(c.get("/v1/org"), 200).json["usage_limits"], want,
           "/v1/org usage_limits after PUT %r" % body)
    mgr = invite(c, "m@example.com", "manager")
    _, ms = mint_user_key(c, mgr["id"])
    cm = h.Client(env.port, ms)
    mem = invite(c, "b@example.com", "member")
    _, bs = mint_user_key(c, mem["id"])
    before = org_snapshot(c)
    expect_403(cm.put(LIMITS, {}))
    expect_403(cm.put(LIMITS, {"requests_per_day": 1}))
    expect_403(h.Client(env.port, bs).get(LIMITS))
    expect_403(h.Client(env.port, bs).put(LIMITS, {}))
    assert_same(c, before, "usage-limit changes by a manager or member")
    eq(expect(cm.get(LIMITS), 200).json, {"requests_per_month": 9000000,
                                         "requests_per_minute": 5000},
       "a manager reads usage limits")
    ev = history(c, {"type": "UsageLimitsChanged"})
    eq(len(ev), 4, "UsageLimitsChanged events")
    eq(ev[0]["target"], {"type": "org", "id": env.info["org_id"]},
       "UsageLimitsChanged target")
    eq(ev[0]["data"].get("usage_limits"), {"requests_per_month": 9000000,
                                           "requests_per_minute": 5000},
       "UsageLimitsChanged data.usage_limits")
    eq(expect(c.put(LIMITS, {}), 200).json, {}, "PUT {} clears every limit")
    eq(expect(c.get(LIMITS), 200).json, {}, "GET after PUT {}")


# --------------------------------------------------------------------------
# Computers, sessions, messages

def test_computers():
    env = h.Env()
    c = env.client()
    owner_id = env.info["user_id"]
    t0 = time.time()
    a = create_computer(c, "build box")
    eq((a["owner"], a["created_by"]), ({"type": "user", "id": owner_id},
                                       owner_id), "default owner: the caller")
    check("restarted_at" not in a, "restarted_at on a new computer")
    h.near(h.parse_time(a["created_at"]), t0, 10, "created_at")
    s = create_sa(c, "runner")
    b = create_computer(c, "sa box", owner=s["id"])
    eq((b["owner"], b["created_by"]), ({"type": "service_account",
                                        "id": s["id"]}, owner_id),
       "owner given in the body")
    _, ss = mint_sa_key(c, s["id"])
    d = create_computer(h.Client(env.port, ss), "made by sa")
    eq((d["owner"], d["created_by"]), ({"type": "service_account", "id": s["id"]},
                                       s["id"]), "computer made by an SA key")
    create_computer(c, "n" * 128)
    for cm in (a, b, d):
        eq(expect(c.get(CMP % cm["id"]), 200).json, cm, "GET after create")
    listed = list_all_of(c, CMPS, "computers")
    eq(ids_of(listed)[:3], [a["id"], b["id"], d["id"]], "computers listed")
    eq(listed[:3], [a, b, d], "list entries")
    sizes, ids = page_sizes(c, CMPS, "computers", 3)
    eq((sizes, ids), ([3, 1], ids_of(listed)), "computers paged by 3")

    t1 = time.time()
    r = check_computer(expect(c.post(CMP % a["id"] + "/restart"), 200).json)
    eq(r["status"], "running", "status after a restart")
    h.near(h.parse_time(r["restarted_at"]), t1, 10, "restarted_at")
    check(r["version"] > a["version"], "version grows on restart")
    eq((r["name"], r["owner"], r["created_at"]), (a["name"], a["owner"],
                                                  a["created_at"]), "restart")
    eq(expect(c.get(CMP % a["id"]), 200).json, r, "GET after restart")
    r2 = check_computer(expect(c.post(CMP % a["id"] + "/restart", {}), 200).json)
    check(r2["restarted_at"] >= r["restarted_at"], "second restart")

    expect(c.delete(CMP % b["id"]), 204)
    g = check_computer(expect(c.get(CMP % b["id"]), 200).json)
    eq(g["status"], "deleted", "status after DELETE")
    check(b["id"] not in ids_of(list_all_of(c, CMPS, "computers")),
          "a deleted computer is listed")
    before = org_snapshot(c)
    expect_error(c.post(CMP % b["id"] + "/restart"), 409, "conflict")
    expect_error(c.delete(CMP % b["id"]), 409, "conflict")
    for cid in (unknown_id("cmp"), "nope", s["id"]):
        expect_error(c.get(CMP % cid), 404, "not_found")
        expect_error(c.post(CMP % cid + "/restart"), 404, "not_found")
        expect_error(c.delete(CMP % cid), 404, "not_found")
    expect_error(c.post(CMPS, {"name": "x", "owner": unknown_id("sa")}), 404,
                 "not_found", "owner")
    assert_same(c, before, "rejected computer requests")
    s2 = create_sa(c, "sleeper")
    expect(c.patch(SA % s2["id"], {"is_active": False}), 200)
    mid = org_snapshot(c)
    expect_error(c.post(CMPS, {"name": "x", "owner": s2["id"]}), 409, "conflict")
    assert_same(c, mid, "a computer for a deactivated service account")
    expect(c.patch(SA % s2["id"], {"is_active": True}), 200)
    create_computer(c, "x", owner=s2["id"])


def test_sessions_and_messages():
    env = h.Env()
    c = env.client()
    owner_id = env.info["user_id"]
    cm = create_computer(c, "box")
    gone = create_computer(c, "gone")
    expect(c.delete(CMP % gone["id"]), 204)
    t0 = time.time()
    s1 = create_session(c)
    for f in ("title", "computer_id"):
        check(f not in s1, "%s on a session made without it: %r" % (f, s1))
    eq(s1["created_by"], owner_id, "session created_by")
    h.near(h.parse_time(s1["created_at"]), t0, 10, "created_at")
    s2 = create_session(c, "Debug the build", cm["id"])
    eq((s2["title"], s2["computer_id"]), ("Debug the build", cm["id"]),
       "session fields")
    s3 = create_session(c, "t" * 256)
    sa = create_sa(c, "chatter")
    _, ss = mint_sa_key(c, sa["id"])
    csa = h.Client(env.port, ss)
    s4 = create_session(csa, "by sa")
    eq(s4["created_by"], sa["id"], "session made by an SA key")
    body = expect(c.get(SESS), 200).json
    eq(set(body), {"sessions", "next_cursor"}, "sessions list fields")
    eq(body["sessions"], [s1, s2, s3, s4], "sessions listed")
    check(body["next_cursor"] is None, "next_cursor on the last page")
    for s in (s1, s2, s3, s4):
        eq(expect(c.get(SES % s["id"]), 200).json, s, "GET session")

    before = org_snapshot(c)
    expect_error(c.post(SESS, {"computer_id": gone["id"]}), 404, "not_found",
                 "computer_id")
    expect_error(c.post(SESS, {"computer_id": unknown_id("cmp")}), 404,
                 "not_found", "computer_id")
    for sid in (unknown_id("ses"), "nope", cm["id"]):
        expect_error(c.get(SES % sid), 404, "not_found")
        expect_error(c.get(SES % sid + "/messages"), 404, "not_found")
        expect_error(c.post(SES % sid + "/messages",
                            {"role": "user", "content": "x"}), 404, "not_found")
    assert_same(c, before)

    posted = []
    for i in range(5):
        role = "user" if i % 2 == 0 else "assistant"
        m = post_message(c, s2["id"], role, "message %d" % i)
        eq(m["created_by"], owner_id, "message created_by")
        posted.append(m)
    m = post_message(csa, s2["id"], "user", "x" * 16384)
    eq(m["created_by"], sa["id"], "message posted with an SA key")
    posted.append(m)
    body = expect(c.get(SES % s2["id"] + "/messages"), 200).json
    eq(set(body), {"messages", "next_cursor"}, "messages list fields")
    eq(body["messages"], posted, "messages, oldest first")
    for limit, sizes in ((2, [2, 2, 2]), (4, [4, 2]), (6, [6])):
        got = page_sizes(c, SES % s2["id"] + "/messages", "messages", limit)
        eq(got, (sizes, ids_of(posted)), "messages paged by %d" % limit)
    eq(list_all_of(c, SES % s1["id"] + "/messages", "messages"), [],
       "messages of an empty session")
    # A deleted computer: its sessions stay.
    expect(c.delete(CMP % cm["id"]), 204)
    eq(expect(c.get(SES % s2["id"]), 200).json, s2, "session of a deleted "
       "computer")


# --------------------------------------------------------------------------
# Control history

def build_history(env, other_key):
    """A lifecycle in org A (env) and some noise in org B; returns what was
    done, in order, as (type, target id, actor id) plus handy ids."""
    c = env.client()
    owner_id = env.info["user_id"]
    cb = h.Client(env.port, other_key)
    done = []
    secrets = [env.key, other_key]

    def rec(r, typ, target, actor):
        done.append((typ, target, actor, h.check_request_id(r)))
        return r

    r = rec(expect(c.post(USERS, {"email": "mgr@example.com", "role": "manager",
                                  "name": "Mgr"}), 201),
            "UserInvited", None, owner_id)
    mgr = r.json
    done[-1] = ("UserInvited", mgr["id"], owner_id, done[-1][3])
    r = expect(c.post(U % mgr["id"] + "/api-keys", {"name": "mgr key"}), 201)
    mk = r.json
    secrets.append(mk["key"])
    rec(r, "KeyCreated", mk["id"], owner_id)
    cm = h.Client(env.port, mk["key"])
    r = expect(cm.post(USERS, {"email": "u@example.com", "role": "member"}), 201)
    u = r.json
    rec(r, "UserInvited", u["id"], mgr["id"])
    rec(expect(cm.patch(U % u["id"], {"name": "Ulla"}), 200), "UserUpdated",
        u["id"], mgr["id"])
    rec(expect(cm.patch(U % u["id"], {"role": "guest"}), 200),
        "UserRoleChanged", u["id"], mgr["id"])
    r = expect(c.post(SAS, {"name": "hist-sa", "description": "d"}), 201)
    sa = r.json
    rec(r, "ServiceAccountCreated", sa["id"], owner_id)
    rec(expect(c.patch(SA % sa["id"], {"description": "d2"}), 200),
        "ServiceAccountUpdated", sa["id"], owner_id)
    rec(expect(c.patch(SA % sa["id"], {"is_active": False}), 200),
        "ServiceAccountDeactivated", sa["id"], owner_id)
    rec(expect(c.patch(SA % sa["id"], {"is_active": True}), 200),
        "ServiceAccountReactivated", sa["id"], owner_id)
    r = expect(c.post(SA % sa["id"] + "/api-keys", {"name": "ka"}), 201)
    ka = r.json
    secrets.append(ka["key"])
    rec(r, "KeyCreated", ka["id"], owner_id)
    # Resources are not control history: these must not show.
    create_computer(c, "not in history", owner=sa["id"])
    create_session(c, "not in history")
    rec(expect(c.patch(K % ka["id"], {"name": "ka2"}), 200), "KeyUpdated",
        ka["id"], owner_id)
    r = expect(c.post(K % ka["id"] + "/regenerate", {}), 200)
    secrets.append(r.json["key"])
    rec(r, "KeyRegenerated", ka["id"], owner_id)
    # A key in use: usage is not control history either.
    eq(me(h.Client(env.port, r.json["key"]))["key_id"], ka["id"], "ka works")
    rec(expect(c.post(K % ka["id"] + "/revoke", {"comment": "done"}), 200),
        "KeyRevoked", ka["id"], owner_id)
    r = expect(cm.post(KEYS, {"name": "kb"}), 201)
    kb = r.json
    secrets.append(kb["key"])
    rec(r, "KeyCreated", kb["id"], mgr["id"])
    rec(expect(cm.delete(K % kb["id"]), 204), "KeyDeleted", kb["id"], mgr["id"])
    rec(expect(c.put(LIMITS, {"requests_per_day": 1000000}), 200),
        "UsageLimitsChanged", env.info["org_id"], owner_id)
    rec(expect(cm.delete(U % u["id"]), 204), "UserRemoved", u["id"], mgr["id"])
    r = expect(c.post(SA % sa["id"] + "/api-keys", {"name": "kc"}), 201)
    kc = r.json
    secrets.append(kc["key"])
    rec(r, "KeyCreated", kc["id"], owner_id)
    r = expect(c.delete(SA % sa["id"]), 204)
    rec(r, "ServiceAccountDeleted", sa["id"], owner_id)
    rec(r, "KeyRevoked", kc["id"], owner_id)

    # Org B does the same kinds of things.
    bu = check_user(expect(cb.post(USERS, {"email": "bu@example.net",
                                           "role": "member"}), 201).json)
    bk = check_key(expect(cb.post(U % bu["id"] + "/api-keys", {"name": "bk"}),
                            201).json, with_secret=True)
    secrets.append(bk["key"])
    bsa = check_sa(expect(cb.post(SAS, {"name": "hist-sa"}), 201).json)
    expect(cb.patch(U % bu["id"], {"role": "guest"}), 200)
    expect(cb.post(K % bk["id"] + "/revoke", {}), 200)
    expect(cb.put(LIMITS, {"requests_per_day": 2000000}), 200)
    return {"done": done, "mgr": mgr, "mgr_key": mk, "u": u, "sa": sa,
            "ka": ka, "kb": kb, "kc": kc, "secrets": secrets,
            "b_ids": [bu["id"], bk["id"], bsa["id"]]}


def test_control_history_records_the_lifecycle():
    env, other = two_org_env()
    c = env.client()
    org = env.info["org_id"]
    x = build_history(env, other["key"])
    done = x["done"]
    events = history(c)
    for e in events:
        check_event(e, org)
    seqs = [e["seq"] for e in events]
    eq(seqs, sorted(seqs, reverse=True), "events newest first (seq)")
    eq(len(set(seqs)), len(seqs), "distinct seqs")
    times = [e["occurred_at"] for e in events]
    eq(times, sorted(times, reverse=True), "occurred_at newest first")
    eq(len(set(e["id"] for e in events)), len(events), "distinct event ids")
    eq({e["category"] for e in events}, {"control", "keys"},
       "both categories appear")

    got = [(e["type"], e.get("target", {}).get("id"), e["actor"]["id"])
           for e in events[:len(done)]]
    want = [d[:3] for d in reversed(done)]
    eq(got, want, "the newest events (type, target, actor)")
    # Oldest: what `keyledger init` wrote, by the system.
    eq(events[-1]["actor"]["type"], "system", "actor of the oldest event")
    check(len(events) > len(done), "init's events are missing")
    for e in events[len(done):]:
        eq(e["actor"]["type"], "system", "actor of init's events %s" % e["type"])

    mine = list(reversed(events[:len(done)]))     # oldest first, as done
    for e, (typ, target, actor, rid) in zip(mine, done):
        at = "user" if actor.startswith("usr_") else "service_account"
        eq((e["actor"]["type"], e["actor"]["id"]), (at, actor), "actor of %s"
           % typ)
        check("key_id" in e["actor"], "actor.key_id missing on %s" % typ)
        eq(e["request_id"], rid, "request_id of %s vs the X-Request-Id "
           "of the request that made it" % typ)
        h.near(h.parse_time(e["occurred_at"]), time.time(), 60,
               "occurred_at of %s" % typ)
    kinds = {"User": "user", "ServiceAccount": "service_account", "Key": "api_key",
             "UsageLimits": "org"}
    for e in mine:
        want_type = [v for k, v in kinds.items() if e["type"].startswith(k)][0]
        eq(e["target"]["type"], want_type, "target.type of %s" % e["type"])
    owner_key = env.info["key_id"]
    eq(mine[0]["actor"].get("key_id"), owner_key, "actor.key_id (the owner's)")
    eq(mine[2]["actor"].get("key_id"), x["mgr_key"]["id"],
       "actor.key_id (the manager's)")

    def first(typ, target):
        for e in mine:
            if e["type"] == typ and e["target"]["id"] == target:
                return e
        fail("no %s event for %s" % (typ, target))
    eq(first("UserInvited", x["u"]["id"])["data"].get("email"), "u@example.com",
       "UserInvited data.email")
    eq(first("UserInvited", x["u"]["id"])["data"].get("role"), "member",
       "UserInvited data.role")
    eq(first("UserUpdated", x["u"]["id"])["data"].get("name"), "Ulla",
       "UserUpdated data.name")
    eq(first("UserRoleChanged", x["u"]["id"])["data"].get("role"), "guest",
       "UserRoleChanged data.role")
    eq(first("ServiceAccountCreated", x["sa"]["id"])["data"].get("name"),
       "hist-sa", "ServiceAccountCreated data.name")
    eq(first("ServiceAccountUpdated", x["sa"]["id"])["data"].get("description"),
       "d2", "ServiceAccountUpdated data.description")
    eq(first("KeyRevoked", x["ka"]["id"])["data"].get("comment"), "done",
       "KeyRevoked data.comment")
    eq(first("KeyRevoked", x["kc"]["id"])["data"].get("comment"),
       "service account deleted", "KeyRevoked data.comment on SA delete")
    eq(first("KeyCreated", x["ka"]["id"])["data"].get("owner"),
       {"type": "service_account", "id": x["sa"]["id"]}, "KeyCreated data.owner")
    eq(first("UsageLimitsChanged", org)["data"].get("usage_limits"),
       {"requests_per_day": 1000000}, "UsageLimitsChanged data.usage_limits")
    # Never another org's events, ids or data.
    raw = expect(c.get(HISTORY, query={"limit": "500"}), 200).body.decode()
    for bid in x["b_ids"] + [other["org_id"], other["user_id"], other["key_id"]]:
        check(bid not in raw, "another org's id %s in the control history" % bid)
    check("bu@example.net" not in raw, "another org's data in the history")

    # The other org sees its own history only.
    cb = h.Client(env.port, other["key"])
    bev = history(cb)
    for e in bev:
        check_event(e, other["org_id"])
    braw = expect(cb.get(HISTORY, query={"limit": "500"}), 200).body.decode()
    for aid in (org, x["u"]["id"], x["mgr"]["id"], x["sa"]["id"], x["ka"]["id"],
                env.info["user_id"]):
        check(aid not in braw, "org A's id %s in org B's history" % aid)
    eq([e["type"] for e in bev[:6]],
       ["UsageLimitsChanged", "KeyRevoked", "UserRoleChanged",
        "ServiceAccountCreated", "KeyCreated", "UserInvited"],
       "org B's newest events")

    # Who may read it: owners and managers.
    mem = invite(c, "reader@example.com", "member")
    _, ms = mint_user_key(c, mem["id"])
    expect_403(h.Client(env.port, ms).get(HISTORY))
    mgr_events = history(h.Client(env.port, x["mgr_key"]["key"]))
    eq(mgr_events[2:], events, "a manager reads the same history (plus the "
       "two newest: the member's invitation and key)")


def test_control_history_filters_and_paging():
    env, other = two_org_env()
    c = env.client()
    org = env.info["org_id"]
    x = build_history(env, other["key"])
    events = history(c)
    n = len(events)
    check(n >= 22, "expected at least 22 events, got %d" % n)

    def sub(pred):
        return [e for e in events if pred(e)]

    types = sorted({e["type"] for e in events})
    for want in ("UserInvited", "UserUpdated", "UserRoleChanged", "UserRemoved",
                 "ServiceAccountCreated", "ServiceAccountUpdated",
                 "ServiceAccountDeactivated", "ServiceAccountReactivated",
                 "ServiceAccountDeleted", "KeyCreated", "KeyUpdated",
                 "KeyRegenerated", "KeyRevoked", "KeyDeleted",
                 "UsageLimitsChanged"):
        check(want in types, "no %s event in the history" % want)
    for t in types:
        eq(history(c, {"type": t}), sub(lambda e: e["type"] == t),
           "type=%s" % t)
    for cat in ("control", "keys"):
        eq(history(c, {"category": cat}), sub(lambda e: e["category"] == cat),
           "category=%s" % cat)
    check(all(e["type"].startswith("Key") for e in sub(
        lambda e: e["category"] == "keys")), "category keys holds Key* events")
    for actor in (env.info["user_id"], x["mgr"]["id"], "system"):
        got = history(c, {"actor": actor})
        eq(got, sub(lambda e: e["actor"]["id"] == actor), "actor=%s" % actor)
        check(got, "no events for actor=%s" % actor)
    for target in (x["u"]["id"], x["sa"]["id"], x["ka"]["id"], org):
        got = history(c, {"target": target})
        eq(got, sub(lambda e: e.get("target", {}).get("id") == target),
           "target=%s" % target)
        check(got, "no events for target=%s" % target)
    eq([e["type"] for e in history(c, {"target": x["u"]["id"]})],
       ["UserRemoved", "UserRoleChanged", "UserUpdated", "UserInvited"],
       "the story of one user")
    eq(history(c, {"type": "UserInvited", "actor": x["mgr"]["id"]}),
       sub(lambda e: e["type"] == "UserInvited" and
           e["actor"]["id"] == x["mgr"]["id"]), "type + actor")
    eq(history(c, {"category": "keys", "target": x["ka"]["id"]}),
       sub(lambda e: e.get("target", {}).get("id") == x["ka"]["id"]),
       "category + target")

    # since (inclusive) / until (exclusive), on occurred_at.
    pivot = events[n // 2]["occurred_at"]
    late = events[n // 4]["occurred_at"]
    eq(history(c, {"since": pivot}), sub(lambda e: e["occurred_at"] >= pivot),
       "since=%s" % pivot)
    eq(history(c, {"until": pivot}), sub(lambda e: e["occurred_at"] < pivot),
       "until=%s" % pivot)
    eq(history(c, {"since": pivot, "until": late}),
       sub(lambda e: pivot <= e["occurred_at"] < late), "since + until")
    eq(history(c, {"since": h.fmt_time(time.time() + 3600)}), [],
       "since an hour from now")
    eq(history(c, {"until": "2001-01-01T00:00:00.000Z"}), [], "until 2001")

    # limit + next_cursor.
    for limit in (1, 3, 7, n):
        pages, got, cursor = [], [], None
        while True:
            q = {"limit": str(limit)}
            if cursor is not None:
                q["cursor"] = cursor
            body = expect(c.get(HISTORY, query=q), 200).json
            eq(set(body), {"events", "next_cursor"}, "history page fields")
            pages.append(len(body["events"]))
            got.extend(body["events"])
            cursor = body["next_cursor"]
            if cursor is None:
                break
            check(isinstance(cursor, str) and cursor, "next_cursor %r" % cursor)
            check(len(pages) <= n + 1, "history paging does not end")
        eq(got, events, "events over all pages with limit=%d" % limit)
        eq(pages, [limit] * (n // limit) + ([n % limit] if n % limit else []),
           "page sizes with limit=%d" % limit)
    body = expect(c.get(HISTORY), 200).json
    eq(body["events"], events[:50], "default limit is 50")
    got = history(c, {"type": "KeyCreated"}, limit=2)
    eq(got, sub(lambda e: e["type"] == "KeyCreated"), "type filter, paged by 2")

    # Other org's principals and targets match nothing here.
    for q in ({"actor": other["user_id"]}, {"target": other["user_id"]},
              {"target": other["key_id"]}, {"target": other["org_id"]},
              {"target": x["b_ids"][2]}):
        r = expect(c.get(HISTORY, query=q), 200)
        eq(r.json, {"events": [], "next_cursor": None}, "history %r" % q)

    for q, field in (({"type": "NoSuchEvent"}, "type"),
                     ({"limit": "0"}, "limit"), ({"limit": "501"}, "limit"),
                     ({"limit": "many"}, "limit"),
                     ({"since": "yesterday"}, "since"),
                     ({"until": "2026-13-45T00:00:00.000Z"}, "until"),
                     ({"cursor": "not-a-cursor"}, "cursor"),
                     ({"actor": "bob"}, "actor"),
                     # Types and categories the control history does not
                     # serve (docs/audit.md).
                     ({"type": "UsageRecorded"}, "type"),
                     ({"type": "ComputerCreated"}, "type"),
                     ({"category": "resources"}, "category"),
                     ({"category": "usage"}, "category"),
                     ({"target": "nothing"}, "target")):
        expect_error(c.get(HISTORY, query=q), 400, "invalid_argument", field)


def test_control_history_never_holds_secrets():
    env, other = two_org_env()
    c = env.client()
    x = build_history(env, other["key"])
    # More secrets: regenerations with grace, a read_only and a flows key.
    k, s = h.create_key(c, "rot", permissions={"access": "read_only"})
    x["secrets"].append(s)
    for grace in (0, 3600):
        r = expect(c.post(K % k["id"] + "/regenerate",
                          {"grace_period_seconds": grace}), 200)
        x["secrets"].append(r.json["key"])
    _, s = h.create_key(c, "fl", permissions={"access": "flows",
                                              "flows": ["flow_abc"]})
    x["secrets"].append(s)
    hashes = {hashlib.sha256(sec.encode()).hexdigest() for sec in x["secrets"]}
    randoms = [h.SECRET_RE.match(sec).group(4) for sec in x["secrets"]]

    bodies = []
    for client in (c, h.Client(env.port, other["key"])):
        cursor = None
        while True:
            q = {"limit": "7"}
            if cursor:
                q["cursor"] = cursor
            r = expect(client.get(HISTORY, query=q), 200)
            bodies.append((r.body.decode("utf-8"), r.json))
            cursor = r.json["next_cursor"]
            if cursor is None:
                break
    count = 0
    for raw, body in bodies:
        # The whole response, once every event's own "hash" is taken out.
        hashes_here = set(e["hash"] for e in body["events"])
        rest, n_out = re.subn(
            r'"hash"\s*:\s*"([0-9a-f]{64})"',
            lambda mm: '"hash":""' if mm.group(1) in hashes_here
            else mm.group(0), raw)
        check(n_out >= len(hashes_here), "could not take the event hashes "
              "out of the raw response")
        m = HEX64_RE.search(rest)
        check(m is None, "a 64-hex string outside the events' hash field: "
              "...%s..." % rest[max(0, m.start() - 80):m.end() + 20]
              if m else "")
        for sec, rnd in zip(x["secrets"], randoms):
            check(sec not in raw, "a secret in the control history")
            check(rnd not in raw, "a secret's random part in the history")
        for hx in hashes:
            check(hx not in raw.lower(), "a secret's SHA-256 in the history")
        for e in body["events"]:
            count += 1
            for f, v in e.items():
                if f == "hash":
                    check(v not in hashes, "event hash is a secret's hash")
                    continue
                for path, s in strings_in(v, f):
                    check(HEX64_RE.search(s) is None, "a 64-hex string at "
                          "%s of a %s event: %r" % (path, e["type"], s))
            for f in ("hash", "secret", "key", "key_hash", "secret_hash"):
                check(f not in e["data"], "data.%s in a %s event" % (f, e["type"]))
    check(count >= 30, "history pages held only %d events" % count)
    # The key lists never show them either.
    for path in (KEYS + "?include_revoked=true", U % x["mgr"]["id"] + "/api-keys",
                 U % env.info["user_id"] + "/api-keys"):
        raw = expect(c.get(path), 200).body.decode()
        for sec in x["secrets"]:
            check(sec not in raw, "a secret in %s" % path)


def strings_in(v, path):
    """(path, string) for every string in v, keys of objects included."""
    if isinstance(v, str):
        yield path, v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield path + "{key}", k
            for item in strings_in(x, path + "." + k):
                yield item
    elif isinstance(v, list):
        for i, x in enumerate(v):
            for item in strings_in(x, "%s[%d]" % (path, i)):
                yield item


# --------------------------------------------------------------------------
# Role x route

READ_OK = {"owner", "manager", "sa_manager", "read_only"}
WRITE_OK = {"owner", "manager", "sa_manager"}
OWNER_ONLY = {"owner"}
PRINCIPALS = ("owner", "manager", "member", "guest", "sa_manager", "sa_member",
              "read_only", "flows")

# (method, path template, body (callable on a counter, or a value), principals
#  that succeed, success status, destructive). {user}/{sa}/{key}/{cmp}/{ses}
#  are fixtures; destructive routes get a fresh target for each success.
# {self} is the caller's own user (routes with it skip service accounts).
# GET /v1/me answers every valid key, flows keys included: it is the one
# route members and guests keep, and it manages nothing. The usage reports
# (GET /v1/api-keys/{id}/usage, /v1/usage) are not served yet and are left
# out.
ROUTES = [
    ("GET", "/v1/me", None, set(PRINCIPALS), 200, False),
    ("GET", "/v1/org", None, READ_OK, 200, False),
    ("GET", USERS, None, READ_OK, 200, False),
    ("POST", USERS, lambda n: {"email": "inv%d@example.com" % n,
                               "role": "member"}, WRITE_OK, 201, False),
    ("GET", "/v1/org/users/{user}", None, READ_OK, 200, False),
    ("PATCH", "/v1/org/users/{user}", lambda n: {"name": "n%d" % n}, WRITE_OK,
     200, False),
    ("DELETE", "/v1/org/users/{user}", None, WRITE_OK, 204, True),
    ("POST", "/v1/org/users/{user}/api-keys", {"name": "k"}, OWNER_ONLY, 201,
     False),
    ("POST", "/v1/org/users/{self}/api-keys", {"name": "k"},
     {"owner", "manager"}, 201, False),
    ("GET", "/v1/org/users/{user}/api-keys", None, READ_OK, 200, False),
    ("GET", LIMITS, None, READ_OK, 200, False),
    ("PUT", LIMITS, {"requests_per_day": 1000000}, OWNER_ONLY, 200, False),
    ("GET", HISTORY, None, READ_OK, 200, False),
    ("POST", SAS, lambda n: {"name": "made-%d" % n}, WRITE_OK, 201, False),
    ("GET", SAS, None, READ_OK, 200, False),
    ("GET", "/v1/service-accounts/{sa}", None, READ_OK, 200, False),
    ("PATCH", "/v1/service-accounts/{sa}", lambda n: {"description": "d%d" % n},
     WRITE_OK, 200, False),
    ("DELETE", "/v1/service-accounts/{sa}", None, WRITE_OK, 204, True),
    ("POST", "/v1/service-accounts/{sa}/api-keys", {"name": "k"}, WRITE_OK, 201,
     False),
    ("GET", "/v1/service-accounts/{sa}/api-keys", None, READ_OK, 200, False),
    ("POST", KEYS, {"name": "k"}, WRITE_OK, 201, False),
    ("GET", KEYS, None, READ_OK, 200, False),
    ("GET", "/v1/api-keys/{key}", None, READ_OK, 200, False),
    ("PATCH", "/v1/api-keys/{key}", lambda n: {"description": "d%d" % n},
     WRITE_OK, 200, False),
    ("POST", "/v1/api-keys/{key}/regenerate", {}, WRITE_OK, 200, False),
    ("POST", "/v1/api-keys/{key}/revoke", {"comment": "x"}, WRITE_OK, 200, True),
    ("DELETE", "/v1/api-keys/{key}", None, WRITE_OK, 204, True),
    ("POST", CMPS, lambda n: {"name": "c%d" % n}, WRITE_OK, 201, False),
    ("GET", CMPS, None, READ_OK, 200, False),
    ("GET", "/v1/computers/{cmp}", None, READ_OK, 200, False),
    ("POST", "/v1/computers/{cmp}/restart", None, WRITE_OK, 200, False),
    ("DELETE", "/v1/computers/{cmp}", None, WRITE_OK, 204, True),
    ("POST", SESS, lambda n: {"title": "s%d" % n}, WRITE_OK, 201, False),
    ("GET", SESS, None, READ_OK, 200, False),
    ("GET", "/v1/sessions/{ses}", None, READ_OK, 200, False),
    ("POST", "/v1/sessions/{ses}/messages", {"role": "user", "content": "hi"},
     WRITE_OK, 201, False),
    ("GET", "/v1/sessions/{ses}/messages", None, READ_OK, 200, False),
]


def test_role_by_route_table():
    env = h.Env()
    c = env.client()
    owner_id = env.info["user_id"]
    mgr = invite(c, "mgr@example.com", "manager")
    mem = invite(c, "mem@example.com", "member")
    gst = invite(c, "gst@example.com", "guest")
    sam = create_sa(c, "sa-manager", role="manager")
    sab = create_sa(c, "sa-member", role="member")
    secrets = {"owner": env.key}
    self_ids = {"owner": owner_id, "read_only": owner_id, "flows": owner_id,
                "manager": mgr["id"], "member": mem["id"], "guest": gst["id"]}
    for p, u in (("manager", mgr), ("member", mem), ("guest", gst)):
        secrets[p] = mint_user_key(c, u["id"], p)[1]
    secrets["sa_manager"] = mint_sa_key(c, sam["id"], "sam")[1]
    secrets["sa_member"] = mint_sa_key(c, sab["id"], "sab")[1]
    secrets["read_only"] = h.create_key(c, "ro", permissions={
        "access": "read_only"})[1]
    secrets["flows"] = h.create_key(c, "fl", permissions={
        "access": "flows", "flows": ["flow_abc"]})[1]
    for p in PRINCIPALS:
        if p in ("read_only", "flows"):
            continue
        eq(me(h.Client(env.port, secrets[p]))["role"],
           {"sa_manager": "manager", "sa_member": "member"}.get(p, p),
           "role of the %s key" % p)

    tu = invite(c, "target@example.com", "member")
    # Key routes act on a service account's key: a manager may regenerate
    # that one (another user's key only an owner may; see
    # test_manager_cannot_borrow_an_owner_key_by_regenerating_it).
    key_owner = create_sa(c, "target-key-owner")["id"]
    fixtures = {
        "user": tu["id"],
        "sa": create_sa(c, "target-sa")["id"],
        "key": mint_sa_key(c, key_owner, "target key")[0]["id"],
        "cmp": create_computer(c, "target box")["id"],
        "ses": create_session(c, "target session")["id"],
    }
    counter = [0]

    def nxt():
        counter[0] += 1
        return counter[0]

    def fresh(kind):
        n = nxt()
        if kind == "user":
            return invite(c, "fresh%d@example.com" % n, "member")["id"]
        if kind == "sa":
            return create_sa(c, "fresh-%d" % n)["id"]
        if kind == "key":
            return mint_sa_key(c, key_owner, "fresh %d" % n)[0]["id"]
        if kind == "cmp":
            return create_computer(c, "fresh %d" % n)["id"]
        fail("no fresh %s" % kind)

    results = []
    for p in PRINCIPALS:
        cp = h.Client(env.port, secrets[p])
        denied_row = not any(p in ok and m != "GET"
                             for m, _, _, ok, _, _ in ROUTES)
        before = org_snapshot(c) if denied_row else None
        for method, tmpl, body, ok, status, destructive in ROUTES:
            if "{self}" in tmpl and p not in self_ids:
                continue
            allowed = p in ok
            path = tmpl.replace("{self}", self_ids.get(p, ""))
            for kind in ("user", "sa", "key", "cmp", "ses"):
                if "{%s}" % kind in path:
                    target = fresh(kind) if (allowed and destructive) \
                        else fixtures[kind]
                    path = path.replace("{%s}" % kind, target)
            b = body(nxt()) if callable(body) else body
            r = cp.request(method, path, b)
            want = status if allowed else 403
            if r.status != want:
                results.append("%s: %s %s -> %s, expected %s (%s)" % (
                    p, method, tmpl, r.status, want,
                    h._short(r.body.decode("utf-8", "replace"), 160)))
            elif not allowed:
                expect_403(r)
        if denied_row:
            assert_same(c, before, "the %s key's denied requests" % p)
    check(not results, "%d of the role x route checks failed:\n  %s" % (
        len(results), "\n  ".join(results[:25])))


# --------------------------------------------------------------------------
# Isolation between organizations

def populate(c, tag):
    """One of everything, in the caller's org; returns the ids."""
    o = {}
    u = invite(c, "user-%s@example.com" % tag, "member")
    o["user"] = u["id"]
    o["user_key"] = mint_user_key(c, u["id"], "uk")[0]["id"]
    gone = invite(c, "gone-%s@example.com" % tag, "guest")
    expect(c.delete(U % gone["id"]), 204)
    o["removed_user"] = gone["id"]
    sa = create_sa(c, "bot-" + tag)
    o["sa"] = sa["id"]
    k, s = mint_sa_key(c, sa["id"], "sk")
    o["sa_key"], o["sa_secret"] = k["id"], s
    o["key"] = h.create_key(c, "k-" + tag)[0]["id"]
    dsa = create_sa(c, "dead-" + tag)
    expect(c.delete(SA % dsa["id"]), 204)
    o["deleted_sa"] = dsa["id"]
    cm = create_computer(c, "box-" + tag, owner=sa["id"])
    o["cmp"] = cm["id"]
    ses = create_session(c, "session " + tag, cm["id"])
    o["ses"] = ses["id"]
    o["msg"] = post_message(c, ses["id"], "user", "hello " + tag)["id"]
    return o


def foreign_calls(o, me_info):
    """Every route with the other org's ids."""
    calls = []
    for uid in (o["user"], o["removed_user"], o["owner"]):
        calls += [("GET", U % uid, None), ("PATCH", U % uid, {"name": "x"}),
                  ("PATCH", U % uid, {"role": "guest"}), ("DELETE", U % uid, None),
                  ("GET", U % uid + "/api-keys", None),
                  ("POST", U % uid + "/api-keys", {"name": "x"})]
    for sid in (o["sa"], o["deleted_sa"]):
        calls += [("GET", SA % sid, None),
                  ("PATCH", SA % sid, {"description": "x"}),
                  ("PATCH", SA % sid, {"is_active": False}),
                  ("DELETE", SA % sid, None),
                  ("GET", SA % sid + "/api-keys", None),
                  ("POST", SA % sid + "/api-keys", {"name": "x"})]
    for kid in (o["key"], o["sa_key"], o["user_key"], o["owner_key"]):
        calls += [("GET", K % kid, None), ("PATCH", K % kid, {"name": "x"}),
                  ("POST", K % kid + "/regenerate", {}),
                  ("POST", K % kid + "/revoke", {}), ("DELETE", K % kid, None)]
    calls += [("GET", CMP % o["cmp"], None),
              ("POST", CMP % o["cmp"] + "/restart", None),
              ("DELETE", CMP % o["cmp"], None),
              ("GET", SES % o["ses"], None),
              ("GET", SES % o["ses"] + "/messages", None),
              ("POST", SES % o["ses"] + "/messages",
               {"role": "user", "content": "x"})]
    return calls


def test_isolation_between_orgs():
    env, other = two_org_env()
    ca = env.client()
    cb = h.Client(env.port, other["key"])
    A = populate(ca, "a")
    B = populate(cb, "b")
    A.update(owner=env.info["user_id"], owner_key=env.info["key_id"],
             org=env.info["org_id"], secret=env.key)
    B.update(owner=other["user_id"], owner_key=other["key_id"],
             org=other["org_id"], secret=other["key"])
    # Names and emails are per org.
    create_sa(cb, "bot-a")
    invite(cb, "user-a@example.com", "guest")

    for mine, theirs in ((B, A), (A, B)):
        c_mine = h.Client(env.port, mine["secret"])
        c_theirs = h.Client(env.port, theirs["secret"])
        foreign = [v for v in theirs.values()
                   if isinstance(v, str) and v[:4] in ("usr_", "sa_", "key_",
                                                       "cmp_", "ses_", "msg_",
                                                       "org_")]
        before_theirs = org_snapshot(c_theirs)
        before_mine = org_snapshot(c_mine)
        for walker in (c_mine, h.Client(env.port, mine["sa_secret"])):
            for method, path, body in foreign_calls(theirs, mine):
                r = walker.request(method, path, body)
                expect_error(r, 404, "not_found")
                for fid in foreign:
                    check(fid.encode() not in r.body, "a 404 echoes the other "
                          "org's id %s: %s" % (fid, r.describe()))
            # Ids in bodies and filters.
            r = walker.post(CMPS, {"name": "x", "owner": theirs["sa"]})
            expect_error(r, 404, "not_found", "owner")
            check(theirs["sa"].encode() not in r.body, "404 echoes the id")
            r = walker.post(SESS, {"computer_id": theirs["cmp"]})
            expect_error(r, 404, "not_found", "computer_id")
            check(theirs["cmp"].encode() not in r.body, "404 echoes the id")
            for owner in (theirs["user"], theirs["sa"], theirs["owner"]):
                eq(expect(walker.get(KEYS, query={"owner": owner,
                                                  "include_revoked": "true"}),
                          200).json, {"api_keys": [], "next_cursor": None},
                   "keys listed with owner=<other org's id>")
            for q in ({"target": theirs["user"]}, {"actor": theirs["owner"]},
                      {"target": theirs["sa"]}, {"target": theirs["org"]}):
                eq(expect(walker.get(HISTORY, query=q), 200).json,
                   {"events": [], "next_cursor": None},
                   "control history %r" % q)
            # A cursor that is another org's id answers exactly as an id
            # that exists nowhere at the same place in the id order (the
            # same id with another last character): "exists elsewhere"
            # must not show.
            for path, cur in (
                    (USERS, theirs["user"]), (SAS, theirs["sa"]),
                    (KEYS, theirs["key"]), (CMPS, theirs["cmp"]),
                    (SESS, theirs["ses"]),
                    (SES % mine["ses"] + "/messages", theirs["msg"]),
                    (U % mine["user"] + "/api-keys", theirs["user_key"]),
                    (SA % mine["sa"] + "/api-keys", theirs["sa_key"])):
                r1 = walker.get(path, query={"cursor": cur})
                r2 = walker.get(path, query={"cursor": sibling_id(cur)})
                check(cur.encode() not in r1.body, "%s?cursor= echoes the other "
                      "org's id: %s" % (path, r1.describe()))
                eq((r1.status, r1.json.get("error", {}).get("code"),
                    r1.json.get("error", {}).get("field")),
                   (r2.status, r2.json.get("error", {}).get("code"),
                    r2.json.get("error", {}).get("field")),
                   "%s with another org's id as cursor vs an unknown id" % path)
                if r1.status == 200:
                    # (the walking key may be on the page: its last_used_at
                    # moves between the two requests)
                    eq(no_last_used(r1.json), no_last_used(r2.json),
                       "%s page after a foreign cursor" % path)
            # Lists never show them.
            for path in (USERS, SAS, KEYS + "?include_revoked=true", CMPS, SESS,
                         SES % mine["ses"] + "/messages", "/v1/org", LIMITS,
                         HISTORY + "?limit=500", "/v1/me",
                         U % mine["user"] + "/api-keys",
                         SA % mine["sa"] + "/api-keys"):
                raw = expect(walker.get(path), 200).body
                for fid in foreign:
                    check(fid.encode() not in raw, "%s shows the other org's "
                          "id %s" % (path, fid))
        assert_same(c_theirs, before_theirs, "the other org's requests")
        assert_same(c_mine, before_mine, "requests with another org's ids")
        # And the counts are what each org made.
        eq(len(before_theirs["service_accounts"]), 1 if theirs is A else 2,
           "service accounts of the org")
        eq(len(before_theirs["users"]), 3 if theirs is A else 4,
           "users of the org")
        eq(len(before_theirs["computers"]), 1, "computers of the org")
        eq(len(before_theirs["sessions"]), 1, "sessions of the org")
    # Each org's keys still work.
    for o in (A, B):
        eq(me(h.Client(env.port, o["sa_secret"]))["org_id"], o["org"],
           "org of the SA key")


# --------------------------------------------------------------------------
# Restart

def full_walk(c, walker_key_id, extra_ids):
    """Every GET of the org, by label -> (status, body), with exactly the
    walking key's last_used_at taken out (it is used by the walk itself)."""
    out = {}

    def get(label, path, query=None):
        r = c.get(path, query=query)
        body = r.json if r.body else None
        if r.status >= 400:
            body["error"].pop("request_id")     # new for every response
        out[label] = (r.status, body)
        return r

    get("me", "/v1/me")
    get("org", "/v1/org")
    get("usage-limits", LIMITS)
    out["users"] = list_all_of(c, USERS, "users")
    for u in out["users"]:
        get("user " + u["id"], U % u["id"])
        get("user keys " + u["id"], U % u["id"] + "/api-keys")
    out["sas"] = list_all_of(c, SAS, "service_accounts")
    for s in out["sas"]:
        get("sa " + s["id"], SA % s["id"])
        get("sa keys " + s["id"], SA % s["id"] + "/api-keys")
    out["keys"] = list_all_of(c, KEYS, "api_keys",
                              query={"include_revoked": "true"})
    out["keys active"] = list_all_of(c, KEYS, "api_keys")
    for k in out["keys"]:
        get("key " + k["id"], K % k["id"])
    out["computers"] = list_all_of(c, CMPS, "computers")
    for cm in out["computers"]:
        get("computer " + cm["id"], CMP % cm["id"])
    out["sessions"] = list_all_of(c, SESS, "sessions")
    for s in out["sessions"]:
        get("session " + s["id"], SES % s["id"])
        get("messages " + s["id"], SES % s["id"] + "/messages")
    out["control-history"] = history(c)
    # Things lists leave out: deleted computers, deleted service accounts,
    # deleted sessions and keys.
    for label, path in extra_ids:
        get(label, path)
    strip_last_used(out, walker_key_id)
    return out


def strip_last_used(v, key_id):
    if isinstance(v, dict):
        if v.get("id") == key_id and "prefix" in v:
            v.pop("last_used_at", None)
        for x in v.values():
            strip_last_used(x, key_id)
    elif isinstance(v, (list, tuple)):
        for x in v:
            strip_last_used(x, key_id)


def test_everything_survives_kill9():
    env = h.Env()
    c = env.client()
    mgr = invite(c, "mgr@example.com", "manager", name="Manny")
    mem = invite(c, "mem@example.com", "member")
    gst = invite(c, "gst@example.com", "guest", name="Guest")
    gone = invite(c, "gone@example.com", "member")
    o2 = invite(c, "o2@example.com", "owner")
    expect(c.patch(U % mem["id"], {"name": "Mem", "role": "guest"}), 200)
    expect(c.patch(U % o2["id"], {"role": "manager"}), 200)
    mk, ms = mint_user_key(c, mgr["id"], "mgr key", description="manager's",
                           environment="test")
    _, gs = mint_user_key(c, gone["id"], "gone key")
    mint_user_key(c, gst["id"], "guest key", expires_in_days=30,
                  permissions={"access": "read_only"})
    expect(c.delete(U % gone["id"]), 204)
    cm = h.Client(env.port, ms)
    sa_a = create_sa(cm, "alpha", description="made by the manager")
    sa_b = create_sa(c, "beta", role="member")
    sa_c = create_sa(c, "gamma")
    ak1, as1 = mint_sa_key(c, sa_a["id"], "a1", rate_limit={
        "requests_per_minute": 1000, "requests_per_day": 100000})
    ak2, _ = mint_sa_key(cm, sa_a["id"], "a2",
                         permissions={"access": "flows", "flows": ["f1", "f2"]})
    expect(c.post(K % ak2["id"] + "/revoke", {"comment": "rotated"}), 200)
    _, bs = mint_sa_key(c, sa_b["id"], "b1")
    expect(c.patch(SA % sa_b["id"], {"is_active": False}), 200)
    _, cs_ = mint_sa_key(c, sa_c["id"], "c1")
    ok1, _ = h.create_key(c, "owner one", description="x", expires_in_days=90)
    expect(c.patch(K % ok1["id"], {"name": "owner one renamed"}), 200)
    expect(c.post(K % ok1["id"] + "/regenerate", {"grace_period_seconds": 600}),
           200)
    ok2, _ = h.create_key(c, "owner two")
    expect(c.delete(K % ok2["id"]), 204)
    ca = h.Client(env.port, as1)
    ccc = h.Client(env.port, cs_)
    cmp1 = create_computer(c, "plain")
    create_computer(ca, "alpha's")
    cmp3 = create_computer(c, "restarted", owner=sa_a["id"])
    expect(c.post(CMP % cmp3["id"] + "/restart"), 200)
    cmp4 = create_computer(cm, "deleted")
    expect(c.delete(CMP % cmp4["id"]), 204)
    cmp5 = create_computer(c, "gamma's", owner=sa_c["id"])
    ses1 = create_session(c, "with computer", cmp1["id"])
    ses2 = create_session(ca)
    ses3 = create_session(ccc, "gamma's session")
    for i in range(3):
        post_message(c, ses1["id"], "user", "q%d" % i)
        post_message(ca, ses1["id"], "assistant", "a%d \u00e9\u2603" % i)
    post_message(ca, ses2["id"], "user", "alone")
    post_message(ccc, ses3["id"], "user", "will vanish")
    expect(c.delete(SA % sa_c["id"]), 204)
    expect(c.put(LIMITS, {"requests_per_minute": 100000,
                          "requests_per_month": 100000000}), 200)
    extra = [("deleted computer", CMP % cmp4["id"]),
             ("sa-deleted computer", CMP % cmp5["id"]),
             ("deleted sa", SA % sa_c["id"]),
             ("deleted session", SES % ses3["id"]),
             ("deleted key", K % ok2["id"]),
             ("inactive sa", SA % sa_b["id"]),
             ("removed user", U % gone["id"])]
    # Keys used by other principals have their last use written to the log
    # once per usage flush interval (1 s): let it pass before comparing.
    time.sleep(1.6)
    before = full_walk(c, env.info["key_id"], extra)
    check(len(before["control-history"]) >= 30, "history too short")
    for kid in (mk["id"], ak1["id"]):
        check("last_used_at" in before["key " + kid][1],
              "key %s was used but has no last_used_at" % kid)
    env.daemon.kill9()
    env.start()
    c = env.client()
    after = full_walk(c, env.info["key_id"], extra)
    diffs = [label for label in sorted(set(before) | set(after))
             if before.get(label) != after.get(label)]
    if diffs:
        label = diffs[0]
        fail("%d GETs differ after kill -9 and restart (%s); first %s: before "
             "%s; after %s" % (len(diffs), ", ".join(diffs[:8]), label,
                               h._short(before.get(label), 700),
                               h._short(after.get(label), 700)))
    eq(before["deleted sa"][0], 404, "deleted service account")
    eq(before["deleted computer"][1]["status"], "deleted", "deleted computer")
    # The keys still do what they did (new clients: the port is new).
    eq(me(h.Client(env.port, ms))["role"], "manager",
       "manager key after restart")
    eq(me(h.Client(env.port, as1))["principal"]["id"], sa_a["id"],
       "SA key after restart")
    for secret in (gs, bs, cs_):
        expect_401_generic(h.Client(env.port, secret).get("/v1/me"))
    expect_403(h.Client(env.port, mint_user_key(c, mem["id"])[1]).get(USERS))
    # The rules that hang on history hold after the replay too.
    expect_error(c.post(USERS, {"email": "MGR@example.com", "role": "guest"}),
                 409, "conflict")
    again = invite(c, "gone@example.com", "guest")
    check(again["id"] != gone["id"], "re-invited user has a new id")
    for name in ("alpha", "beta", "gamma"):
        expect_error(c.post(SAS, {"name": name}), 409, "conflict")
    expect_error(c.patch(U % env.info["user_id"], {"role": "manager"}), 409,
                 "conflict")
    expect_error(c.post(SA % sa_b["id"] + "/api-keys", {"name": "x"}), 409,
                 "conflict")
    expect_error(c.post(U % gone["id"] + "/api-keys", {"name": "x"}), 409,
                 "conflict")
    expect_error(c.post(CMP % cmp4["id"] + "/restart"), 409, "conflict")
    expect_error(c.post(SESS, {"computer_id": cmp5["id"]}), 404, "not_found",
                 "computer_id")


# --------------------------------------------------------------------------
# Concurrent requests that only one may win

def race(port, requests):
    """Sends (key, method, path, body) all at once, one connection each;
    returns the responses in the same order."""
    out = [None] * len(requests)
    errors = []
    barrier = threading.Barrier(len(requests))
    clients = [h.Client(port, key) for key, _, _, _ in requests]
    for cl in clients:
        expect(cl.get("/healthz"), 200)         # connect before the race

    def run(i):
        _, method, path, body = requests[i]
        try:
            barrier.wait(10)
            out[i] = clients[i].request(method, path, body)
        except Exception as e:                  # reported below
            errors.append(repr(e))
    threads = [threading.Thread(target=run, args=(i,))
               for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    check(not errors, "racing requests failed: %s" % errors)
    return out


def test_concurrent_requests_keep_the_rules():
    env = h.Env()
    c = env.client()
    for round_ in range(3):
        email = "race%d@example.com" % round_
        rs = race(env.port, [(env.key, "POST", USERS,
                              {"email": email, "role": "member"})] * 8)
        eq(sorted(r.status for r in rs), [201] + [409] * 7,
           "8 concurrent invitations of one address")
        name = "race-%d" % round_
        rs = race(env.port, [(env.key, "POST", SAS, {"name": name})] * 8)
        eq(sorted(r.status for r in rs), [201] + [409] * 7,
           "8 concurrent creations of one service-account name")
    emails = [u["email"] for u in list_all_of(c, USERS, "users")]
    eq(len(emails), len(set(emails)), "distinct emails")

    # Two owners demoting or removing each other at once: one must stay.
    for round_ in range(4):
        a = invite(c, "a%d@example.com" % round_, "owner")
        b = invite(c, "b%d@example.com" % round_, "owner")
        _, sa_ = mint_user_key(c, a["id"])
        _, sb = mint_user_key(c, b["id"])
        # The init owner steps down first, so a and b are the only owners.
        expect(c.patch(U % env.info["user_id"], {"role": "manager"}), 200)
        if round_ % 2 == 0:
            reqs = [(sa_, "PATCH", U % b["id"], {"role": "manager"}),
                    (sb, "PATCH", U % a["id"], {"role": "manager"}),
                    (sa_, "PATCH", U % a["id"], {"role": "member"}),
                    (sb, "PATCH", U % b["id"], {"role": "member"})]
        else:
            reqs = [(sa_, "DELETE", U % b["id"], None),
                    (sb, "DELETE", U % a["id"], None),
                    (sa_, "DELETE", U % a["id"], None),
                    (sb, "DELETE", U % b["id"], None)]
        race(env.port, reqs)
        owners = [u for u in list_all_of(c, USERS, "users")
                  if u["role"] == "owner" and u["status"] == "active"]
        check(len(owners) >= 1, "no active owner left after concurrent "
              "demotions/removals (round %d)" % round_)
        # Hand the org back to the init owner for the next round.
        survivor = h.Client(env.port, sa_ if owners[0]["id"] == a["id"] else sb)
        expect(survivor.patch(U % env.info["user_id"], {"role": "owner"}), 200)
        for u in (a, b):
            g = expect(c.get(U % u["id"]), 200).json
            if g["status"] == "active":
                expect(c.delete(U % u["id"]), 204)
    eq(me(c)["role"], "owner", "the init owner at the end")


# --------------------------------------------------------------------------
# Bad input

def bad_cases(env, c):
    """(method, path, base body, field, bad values); MISSING drops the field."""
    u = invite(c, "target@example.com", "member")
    s = create_sa(c, "target-sa")
    ses = create_session(c, "s")
    long_email = "a" * 60 + "@" + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + \
        "." + "example.com"
    long_email = "e" * (255 - len(long_email)) + long_email
    return u, s, ses, [
        ("POST", USERS, {"email": "new@example.com", "role": "member"}, "email",
         [MISSING, None, "", 5, True, ["a@example.com"], {"a": 1},
          "plainaddress", "@example.com", "a@", "a@example", "a b@example.com",
          "a@b@example.com", "a@exa mple.com", " a@example.com", long_email]),
        ("POST", USERS, {"email": "new@example.com", "role": "member"}, "role",
         [MISSING, None, "", "admin", "Owner", "MEMBER", 1, ["member"], {}]),
        ("POST", USERS, {"email": "new@example.com", "role": "member"}, "name",
         [5, "n" * 129, ["n"], True, {}]),
        ("PATCH", U % u["id"], {}, "role",
         ["", "admin", "OWNER", 1, ["guest"], True]),
        ("PATCH", U % u["id"], {}, "name", [5, "n" * 129, ["n"], True]),
        ("PUT", LIMITS, {}, "requests_per_minute",
         [0, -1, "100", 1.5, True, [], {}]),
        ("PUT", LIMITS, {}, "requests_per_day", [0, -5, "100", 2.5, False, [1]]),
        ("PUT", LIMITS, {}, "requests_per_month", [0, -1, "1", 0.5, True, {}]),
        ("POST", SAS, {"name": "fresh-name"}, "name",
         [MISSING, None, "", "a", "-a", "Fresh", "a" * 64, 5, ["fresh"]]),
        ("POST", SAS, {"name": "fresh-name"}, "description",
         [5, "d" * 1025, ["d"], True, {}]),
        ("POST", SAS, {"name": "fresh-name"}, "role",
         ["", "owner", "guest", "admin", "Manager", 1, ["manager"], True]),
        ("PATCH", SA % s["id"], {}, "description", [5, "d" * 1025, ["d"], True]),
        ("PATCH", SA % s["id"], {}, "is_active",
         ["false", "true", 0, 1, None, [], {}]),
        ("PATCH", SA % s["id"], {}, "role",
         ["", "owner", "guest", "admin", 1, None, ["member"]]),
        ("PATCH", SA % s["id"], {}, "name", ["target-sa", "renamed", "", 5]),
        ("POST", CMPS, {"name": "box"}, "name",
         [MISSING, None, "", "n" * 129, 5, ["box"], True]),
        ("POST", CMPS, {"name": "box"}, "owner",
         ["", 5, [], {}, True, {"type": "service_account", "id": s["id"]},
          u["id"], env.info["user_id"], ses["id"]]),
        ("POST", SESS, {}, "title", [5, "t" * 257, ["t"], True, {}]),
        ("POST", SESS, {}, "computer_id", ["", 5, [], True, {}]),
        ("POST", SES % ses["id"] + "/messages", {"role": "user", "content": "hi"},
         "role", [MISSING, None, "", "system", "USER", "owner", 5, ["user"]]),
        ("POST", SES % ses["id"] + "/messages", {"role": "user", "content": "hi"},
         "content", [MISSING, None, "", "c" * 16385, 5, ["hi"], True, {}]),
        ("POST", U % u["id"] + "/api-keys", {"name": "k"}, "name",
         [MISSING, None, "", "n" * 129, 5]),
        ("POST", SA % s["id"] + "/api-keys", {"name": "k"}, "name",
         [MISSING, None, "", "n" * 129, 5]),
        ("POST", SA % s["id"] + "/api-keys", {"name": "k"}, "environment",
         ["prod", "", 1]),
    ]


UNKNOWN_FIELDS = [
    ("POST", USERS, {"email": "new@example.com", "role": "member"},
     ["status", "id", "org_id", "emial", "version"]),
    ("PATCH", "{user}", {}, ["email", "status", "nmae", "id"]),
    ("PUT", LIMITS, {"requests_per_day": 100000},
     ["requests_per_hour", "requests_per_year", "rpm"]),
    ("POST", SAS, {"name": "fresh-name"},
     ["is_active", "created_by", "id", "nmae", "deactivated_at"]),
    ("PATCH", "{sa}", {}, ["created_by", "deactivated_at", "descriptoin", "id"]),
    ("POST", CMPS, {"name": "box"}, ["status", "created_by", "restarted_at",
                                     "id"]),
    ("POST", SESS, {}, ["messages", "created_by", "computer", "id"]),
    ("POST", "{ses}/messages", {"role": "user", "content": "hi"},
     ["session_id", "created_by", "text", "id"]),
    ("POST", "{user}/api-keys", {"name": "k"}, ["owner", "user_id", "nmae"]),
    ("POST", "{sa}/api-keys", {"name": "k"}, ["owner", "nmae", "role"]),
    ("POST", "{cmp}/restart", {}, ["force"]),
]


def test_lengths_count_characters_not_bytes():
    env = h.Env()
    c = env.client()
    e = "\u00e9"
    u = invite(c, "uni@example.com", "member", name=e * 128)
    eq(u["name"], e * 128, "128 two-byte characters")
    eq(check_user(expect(c.patch(U % u["id"], {"name": "\u2603" * 128}),
                         200).json)["name"], "\u2603" * 128, "128 snowmen")
    s = create_sa(c, "uni", description=e * 1024)
    eq(s["description"], e * 1024, "1024 two-byte characters")
    cm = create_computer(c, e * 128)
    ses = create_session(c, e * 256, cm["id"])
    eq(ses["title"], e * 256, "256 two-byte characters")
    m = post_message(c, ses["id"], "assistant", e * 16384)
    eq(m["content"], e * 16384, "16384 two-byte characters")
    before = org_snapshot(c)
    for method, path, body, field in (
            ("POST", USERS, {"email": "u2@example.com", "role": "guest",
                             "name": e * 129}, "name"),
            ("PATCH", U % u["id"], {"name": e * 129}, "name"),
            ("POST", SAS, {"name": "uni-2", "description": e * 1025},
             "description"),
            ("PATCH", SA % s["id"], {"description": e * 1025}, "description"),
            ("POST", CMPS, {"name": e * 129}, "name"),
            ("POST", SESS, {"title": e * 257}, "title"),
            ("POST", SES % ses["id"] + "/messages",
             {"role": "user", "content": e * 16385}, "content")):
        expect_error(c.request(method, path, body), 400, "invalid_argument",
                     field)
    assert_same(c, before)


def test_bad_input_on_every_new_field():
    env = h.Env()
    c = env.client()
    u, s, ses, cases = bad_cases(env, c)
    cm = create_computer(c, "restart target")
    subst = {"{user}": U % u["id"], "{sa}": SA % s["id"],
             "{ses}": SES % ses["id"], "{cmp}": CMP % cm["id"]}
    before = org_snapshot(c)
    failures = []
    for method, path, base, field, values in cases:
        for v in values:
            body = dict(base)
            if v is MISSING:
                body.pop(field, None)
            else:
                body[field] = v
            r = c.request(method, path, body)
            if r.status != 400 or r.json["error"]["code"] != "invalid_argument" \
                    or r.json["error"].get("field") != field:
                failures.append("%s %s %s -> %s %s" % (
                    method, path, h._short(body, 80), r.status,
                    h._short(r.body.decode("utf-8", "replace"), 160)))
    for method, path, base, names in UNKNOWN_FIELDS:
        for k, v in subst.items():
            path = path.replace(k, v)
        for name in names:
            body = dict(base)
            body[name] = "x"
            r = c.request(method, path, body)
            if r.status != 400 or r.json["error"]["code"] != "invalid_argument" \
                    or r.json["error"].get("field") != name:
                failures.append("%s %s %s -> %s %s" % (
                    method, path, h._short(body, 80), r.status,
                    h._short(r.body.decode("utf-8", "replace"), 160)))
    # Bodies that are not JSON objects, and bodies that are not JSON.
    for method, path in (("POST", USERS), ("PATCH", U % u["id"]),
                         ("PUT", LIMITS), ("POST", SAS), ("PATCH", SA % s["id"]),
                         ("POST", CMPS), ("POST", SESS),
                         ("POST", SES % ses["id"] + "/messages")):
        for raw in ('[]', '"x"', '5'):
            r = c.request(method, path, raw)
            if r.status != 400:
                failures.append("%s %s %s -> %s" % (method, path, raw, r.status))
        expect_error(c.request(method, path, '{"name":'), 400, "malformed_json")
        expect_error(c.request(method, path, '{"role":"member"}',
                               content_type="text/plain"), 415,
                     "unsupported_media_type")
    check(not failures, "%d bad inputs not answered 400 invalid_argument with "
          "the right field:\n  %s" % (len(failures), "\n  ".join(failures)))
    assert_same(c, before, "rejected bodies")


def test_if_match_and_idempotency_on_new_routes():
    env = h.Env()
    c = env.client()
    u = invite(c, "im@example.com", "member")
    s = create_sa(c, "im-sa")
    cm = create_computer(c, "im box")
    before = org_snapshot(c)
    stale = {"If-Match": '"999"'}
    for method, path, body in (("PATCH", U % u["id"], {"name": "x"}),
                               ("DELETE", U % u["id"], None),
                               ("PATCH", SA % s["id"], {"description": "x"}),
                               ("DELETE", SA % s["id"], None),
                               ("POST", CMP % cm["id"] + "/restart", None),
                               ("DELETE", CMP % cm["id"], None)):
        expect_error(c.request(method, path, body, headers=stale), 412,
                     "precondition_failed")
    assert_same(c, before, "requests with a stale If-Match")
    v = {"If-Match": '"%d"' % u["version"]}
    u2 = check_user(expect(c.patch(U % u["id"], {"name": "y"}, headers=v),
                           200).json)
    expect(c.delete(U % u["id"], headers={"If-Match": '"%d"' % u2["version"]}),
           204)
    expect(c.patch(SA % s["id"], {"description": "y"},
                   headers={"If-Match": '"%d"' % s["version"]}), 200)
    expect(c.post(CMP % cm["id"] + "/restart",
                  headers={"If-Match": '"%d"' % cm["version"]}), 200)

    hdr = {"Idempotency-Key": "invite-1"}
    body = {"email": "idem@example.com", "role": "guest"}
    r1 = expect(c.post(USERS, body, headers=hdr), 201)
    r2 = expect(c.post(USERS, body, headers=hdr), 201)
    eq((r2.header("Idempotent-Replayed") or "").lower(), "true",
       "Idempotent-Replayed on the replay")
    eq(r2.json, r1.json, "replayed invitation")
    emails = [x["email"] for x in list_all_of(c, USERS, "users")]
    eq(emails.count("idem@example.com"), 1, "users made by two identical POSTs")
    before = org_snapshot(c)
    expect_error(c.post(USERS, {"email": "other@example.com", "role": "guest"},
                        headers=hdr), 422, "idempotency_mismatch")
    assert_same(c, before, "an idempotency mismatch")
    # The same key from another caller is not a replay of the owner's request.
    mgr = invite(c, "idem-mgr@example.com", "manager")
    _, ms = mint_user_key(c, mgr["id"])
    r3 = h.Client(env.port, ms).post(USERS, body, headers=hdr)
    check((r3.header("Idempotent-Replayed") or "").lower() != "true",
          "another caller got the owner's replay: " + r3.describe())
    expect_error(r3, 409, "conflict")
    r1 = expect(c.post(SAS, {"name": "idem-sa"}, headers={"Idempotency-Key":
                                                          "sa-1"}), 201)
    r2 = expect(c.post(SAS, {"name": "idem-sa"}, headers={"Idempotency-Key":
                                                          "sa-1"}), 201)
    eq(r2.json, r1.json, "replayed service account")


def test_method_not_allowed_on_new_routes():
    env = h.Env()
    c = env.client()
    u = invite(c, "x@example.com", "member")
    s = create_sa(c, "mna")
    cm = create_computer(c, "mna")
    ses = create_session(c)
    before = org_snapshot(c)
    for method, path, allowed in (
            ("PUT", USERS, {"GET", "POST"}),
            ("DELETE", USERS, {"GET", "POST"}),
            ("PUT", U % u["id"], {"GET", "PATCH", "DELETE"}),
            ("POST", U % u["id"], {"GET", "PATCH", "DELETE"}),
            ("DELETE", U % u["id"] + "/api-keys", {"GET", "POST"}),
            ("POST", LIMITS, {"GET", "PUT"}),
            ("DELETE", LIMITS, {"GET", "PUT"}),
            ("POST", HISTORY, {"GET"}),
            ("PATCH", SAS, {"GET", "POST"}),
            ("POST", SA % s["id"], {"GET", "PATCH", "DELETE"}),
            ("PUT", SA % s["id"] + "/api-keys", {"GET", "POST"}),
            ("PATCH", CMP % cm["id"], {"GET", "DELETE"}),
            ("GET", CMP % cm["id"] + "/restart", {"POST"}),
            ("DELETE", SESS, {"GET", "POST"}),
            ("DELETE", SES % ses["id"] + "/messages", {"GET", "POST"})):
        r = c.request(method, path, {} if method in ("POST", "PUT", "PATCH")
                      else None)
        expect_error(r, 405, "method_not_allowed")
        allow = {m.strip().upper() for m in r.header("Allow").split(",")}
        check(allowed <= allow and method not in allow,
              "Allow %r for %s %s should list %s" % (r.header("Allow"), method,
                                                     path, sorted(allowed)))
    assert_same(c, before)


if __name__ == "__main__":
    h.main(globals())
