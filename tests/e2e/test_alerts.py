"""
End-to-end tests of alerts (contract sections 2, 3 and 4 "Alerts", with the
usage limits of "Organization and users"): GET /v1/alerts and
POST /v1/alerts/{id}/ack, and every alert type raised from a real situation.

The daemon's thresholds are configuration keys (alert_check_ms,
alert_expiring_seconds, alert_rotation_live_seconds,
alert_rotation_test_seconds, alert_unused_seconds,
alert_failed_auth_per_minute, alert_unusual_factor,
alert_unusual_min_requests, usage_flush_ms, verify_failures_per_minute), so
each test sets the one it exercises to seconds and leaves the others at
their defaults. Rules checked throughout:

  - each condition raises ONE alert, ever: after the alert shows, the test
    waits several checker periods (and, in one test, restarts) and still
    finds one;
  - alerts are events in the log: the list is identical after a clean
    restart and after kill -9, acknowledgements included;
  - alerts are category `alerts`, never in GET /v1/org/control-history.

Every test starts its own daemon on a fresh data dir. The client checks
X-Request-Id and the error shape on every response.

Run: KL_BUILD_DIR=build python3 tests/e2e/test_alerts.py [name-substring...]
"""

import json
import os
import random
import sys
import time

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, expect_error, fail  # noqa: E402

ALERTS = "/v1/alerts"
ACK = "/v1/alerts/%s/ack"
KEYS = "/v1/api-keys"
K = "/v1/api-keys/%s"
USERS = "/v1/org/users"
SAS = "/v1/service-accounts"
LIMITS = "/v1/org/usage-limits"
HISTORY = "/v1/org/control-history"
AUDIT = "/v1/audit-events"
VERIFY = "/v1/keys/verify"

DAY = 86400.0
CHECK_MS = 100
# Several checker (and usage flush) periods: long enough for a second,
# wrong raise of a condition to show.
SETTLE = 0.5

TYPES = {"failed_auth_spike", "usage_threshold", "unused_key",
         "expiring_soon", "rotation_due", "unusual_activity"}
ALERT_REQUIRED = {"id", "type", "created_at", "status", "details", "version"}
ALERT_OPTIONAL = {"key_id", "service_account_id", "acknowledged_at",
                  "acknowledged_by"}
GENERIC_401 = "invalid, expired or revoked API key"


def config(**over):
    """Test-sized timers; every threshold not named stays at its default."""
    cfg = {"alert_check_ms": CHECK_MS, "usage_flush_ms": 100}
    cfg.update(over)
    return cfg


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------
# Alert objects and lists

def check_alert(a, org_key_ids=None):
    """One alert exactly as the contract (and the daemon's description)
    lists its fields."""
    check(isinstance(a, dict), "alert is not an object: %r" % (a,))
    missing = ALERT_REQUIRED - set(a)
    check(not missing, "alert lacks %s: %s" % (sorted(missing), h._short(a)))
    extra = set(a) - ALERT_REQUIRED - ALERT_OPTIONAL
    check(not extra, "alert has fields the contract does not list %s: %s" % (
        sorted(extra), h._short(a)))
    check(h.is_id(a["id"], "alr"), "alert id %r" % (a["id"],))
    check(a["type"] in TYPES, "alert type %r" % (a["type"],))
    if "key_id" in a:
        check(h.is_id(a["key_id"], "key"), "alert key_id %r" % (a["key_id"],))
        if org_key_ids is not None:
            check(a["key_id"] in org_key_ids, "alert names a key %s that is "
                  "not the caller's organization's: %s" % (a["key_id"],
                                                           h._short(a)))
    if "service_account_id" in a:
        check(h.is_id(a["service_account_id"], "sa"),
              "service_account_id %r" % (a["service_account_id"],))
        check("key_id" in a, "service_account_id without key_id: %s"
              % h._short(a))
    h.parse_time(a["created_at"], "alert created_at")
    check(a["status"] in ("open", "acknowledged"), "status %r" % (a["status"],))
    check(isinstance(a["details"], dict), "details is not an object: %s"
          % h._short(a))
    check(is_int(a["version"]), "version %r" % (a["version"],))
    acked = a["status"] == "acknowledged"
    for f in ("acknowledged_at", "acknowledged_by"):
        eq(f in a, acked, "presence of %s for status %s" % (f, a["status"]))
    if acked:
        check(h.parse_time(a["acknowledged_at"], "acknowledged_at") >=
              h.parse_time(a["created_at"]), "acknowledged before it was "
              "raised: %s" % h._short(a))
        check(h.PRINCIPAL_RE.match(a["acknowledged_by"]) is not None,
              "acknowledged_by %r is not a usr_/sa_ id" % (a["acknowledged_by"],))
        eq(a["version"], 2, "version of an acknowledged alert")
    else:
        eq(a["version"], 1, "version of an open alert")
    return a


def list_page(c, query=None, key=h._DEFAULT):
    r = expect(c.get(ALERTS, query=query, key=key), 200)
    body = r.json
    check(isinstance(body, dict) and set(body) == {"alerts", "next_cursor"},
          "alert list must be exactly {alerts, next_cursor}: " + r.describe())
    check(isinstance(body["alerts"], list), "alerts is not a list: "
          + r.describe())
    cur = body["next_cursor"]
    check(cur is None or (isinstance(cur, str) and cur),
          "next_cursor %r" % (cur,))
    return body["alerts"], cur


def alerts(c, status=None, limit=500, key=h._DEFAULT, org_key_ids=None):
    """Every alert (following next_cursor), validated, oldest first."""
    out = []
    cursor = None
    for _ in range(1000):
        q = {"limit": str(limit)}
        if status is not None:
            q["status"] = status
        if cursor is not None:
            q["cursor"] = cursor
        page, cursor = list_page(c, q, key=key)
        check(len(page) <= limit, "page of %d alerts for limit=%d" % (
            len(page), limit))
        out.extend(page)
        if cursor is None:
            break
        check(page, "an empty page with a next_cursor")
    else:
        fail("alert pagination did not end")
    for a in out:
        check_alert(a, org_key_ids)
        if status is not None:
            eq(a["status"], status, "status of an alert listed with "
               "status=%s" % status)
    ids = [a["id"] for a in out]
    eq(len(set(ids)), len(ids), "alert ids are unique in the list")
    stamps = [h.parse_time(a["created_at"]) for a in out]
    check(stamps == sorted(stamps), "alerts are not oldest first: %s"
          % [a["created_at"] for a in out])
    return out


def of(items, type_=None, key_id=h.ANY, pred=None):
    """The alerts of one type (and key_id, or ABSENT for none)."""
    res = []
    for a in items:
        if type_ is not None and a["type"] != type_:
            continue
        if key_id is h.ABSENT and "key_id" in a:
            continue
        if key_id not in (h.ANY, h.ABSENT) and a.get("key_id") != key_id:
            continue
        if pred is not None and not pred(a):
            continue
        res.append(a)
    return res


def wait_alert(c, type_, key_id=h.ANY, pred=None, timeout=8.0, what=None):
    """Polls the list until exactly one matching alert shows; returns it."""
    found = h.wait_until(lambda: of(alerts(c), type_, key_id, pred), timeout,
                         interval=0.05,
                         what=what or "a %s alert for %s" % (type_, key_id))
    eq(len(found), 1, "number of %s alerts for %s (one per condition): %s" % (
        type_, key_id, h._short(found)))
    return found[0]


def condition(a):
    """What names an alert's condition: the details that stay the same while
    the condition lasts (counts such as `used` or `requests` may grow)."""
    d = a["details"]
    stay = {"expiring_soon": ("expires_at",),
            "rotation_due": ("rotated_at",),
            "unused_key": ("last_used_at",),
            "usage_threshold": ("window", "percent"),
            "failed_auth_spike": ("address", "minute"),
            "unusual_activity": ("hour",)}[a["type"]]
    return (a["type"], a.get("key_id")) + tuple(d.get(f) for f in stay)


def still_one(c, alert, what, *more):
    """After several checker periods each condition has still raised exactly
    its one alert (alert, then any more alerts, checked after one wait)."""
    time.sleep(SETTLE)
    listed = alerts(c)
    for al in (alert,) + more:
        same = [a for a in listed if condition(a) == condition(al)]
        eq([a["id"] for a in same], [al["id"]], "%s: alerts for one "
           "condition after %d checker periods" % (
               what, int(SETTLE * 1000 / CHECK_MS)))


def none_of(c, type_, key_id=h.ANY, pred=None, what=""):
    found = of(alerts(c), type_, key_id, pred)
    eq(found, [], "%s alerts %s" % (type_, what))


def avoid_boundary(period, margin):
    """Sleeps past the next multiple of `period` seconds (UTC) when it is
    less than `margin` seconds away, so a burst stays in one window."""
    left = period - (time.time() % period)
    if left < margin:
        time.sleep(left + 0.05)


def verify(c, secret, **fields):
    body = {"key": secret}
    body.update(fields)
    return expect(c.post(VERIFY, body, key=None), 200).json


def revoke(c, key_id):
    return expect(c.post(K % key_id + "/revoke", {}), 200).json


def key_ids(c):
    return {k["id"] for k in h.list_all(c)}


def forged_secret(key_id, env="live"):
    """A well-formed secret (valid checksum) for an existing key id that is
    not its secret: a guess at the key."""
    rnd = "".join(random.choice(h.BASE62) for _ in range(40))
    return h.make_secret(key_id[len("key_"):], rnd, env=env)


def alive_or_fail(env, what):
    if not env.daemon.alive():
        fail("keyledgerd died (exit %s) %s; stderr tail: %s" % (
            env.daemon.proc.returncode, what,
            h._short(env.daemon.stderr_text()[-600:].strip(), 600)))


def stable(items):
    """A list as JSON text, for byte-for-byte comparisons."""
    return json.dumps(items, sort_keys=True)


# --------------------------------------------------------------------------
# The list itself

def test_empty_list_and_bad_queries():
    env = h.Env(config=config())
    c = env.client()
    page, cur = list_page(c)
    eq((page, cur), ([], None), "alerts of a fresh organization")
    for st in ("open", "acknowledged"):
        eq(list_page(c, {"status": st}), ([], None), "status=%s list" % st)
    for bad in ("", "OPEN", "closed", "all", "open,acknowledged", "x" * 40):
        expect_error(c.get(ALERTS, query={"status": bad}), 400,
                     "invalid_argument", "status")
    for bad in ("0", "501", "-1", "ten"):
        expect_error(c.get(ALERTS, query={"limit": bad}), 400,
                     "invalid_argument", "limit")
    expect_error(h.Client(env.port, None).get(ALERTS), 401, "unauthenticated")
    expect_error(c.post(ACK % h.random_id("alr")), 404, "not_found")

    # With the default thresholds nothing here is worth an alert.
    h.create_key(c, "test-env", environment="test")
    h.create_key(c, "a-month", expires_in_days=30)
    _, s = h.create_key(c, "limited", rate_limit={"requests_per_day": 1000})
    for _ in range(5):
        eq(verify(c, s)["code"], "VALID", "verify")
    time.sleep(SETTLE)
    eq(list_page(c), ([], None), "alerts after a few checker periods with "
       "default thresholds")


# --------------------------------------------------------------------------
# expiring_soon

def test_expiring_soon():
    # Default window (7 days): only the key that expires in 5 days.
    env = h.Env(config=config())
    c = env.client()
    t0 = time.time()
    e5, _ = h.create_key(c, "five-days", expires_in_days=5)
    e30, _ = h.create_key(c, "thirty-days", expires_in_days=30)
    e60, _ = h.create_key(c, "sixty-days", expires_in_days=60)
    r30, _ = h.create_key(c, "revoked-thirty", expires_in_days=30)
    revoke(c, r30["id"])
    forever, _ = h.create_key(c, "no-expiry")
    a5 = wait_alert(c, "expiring_soon", e5["id"])
    eq(a5["details"], {"expires_at": e5["expires_at"]}, "expiring_soon details")
    eq(a5["status"], "open", "a new alert's status")
    check("service_account_id" not in a5, "service_account_id on a user's "
          "key alert: %s" % h._short(a5))
    h.near(h.parse_time(a5["created_at"]), t0, 10, "alert created_at")
    still_one(c, a5, "expiring_soon (7-day window)")
    eq(of(alerts(c), "expiring_soon"), [a5], "expiring_soon alerts with the "
       "default 7-day window (keys expiring in 30/60 days or never do not "
       "alert)")

    # A 40-day window: the 30-day key now alerts, the revoked one, the
    # 60-day one and the one without expiry do not, and the 5-day key's
    # condition, raised before the restart, is not raised again.
    env.stop()
    env.start(config=config(alert_expiring_seconds=int(40 * DAY)))
    c = env.client()
    a30 = wait_alert(c, "expiring_soon", e30["id"])
    eq(a30["details"], {"expires_at": e30["expires_at"]}, "details")
    time.sleep(SETTLE)
    got = of(alerts(c), "expiring_soon")
    eq(sorted(a["id"] for a in got), sorted([a5["id"], a30["id"]]),
       "expiring_soon alerts after a restart with a 40-day window (none for "
       "the revoked key %s, the 60-day key %s or the key without expiry %s; "
       "the 5-day key's alert not raised twice)" % (
           r30["id"], e60["id"], forever["id"]))
    eq([a for a in got if a["id"] == a5["id"]], [a5], "the 5-day key's alert "
       "after the restart")

    # Moving the 60-day key's expiry into the window is a new condition.
    new_exp = h.fmt_time(time.time() + 20 * DAY)
    p = h.check_key(expect(c.patch(K % e60["id"], {"expires_at": new_exp}),
                           200).json)
    a60 = wait_alert(c, "expiring_soon", e60["id"])
    eq(a60["details"], {"expires_at": p["expires_at"]}, "details after PATCH "
       "expires_at")
    still_one(c, a60, "expiring_soon after PATCH")


# --------------------------------------------------------------------------
# rotation_due

LIVE_PERIOD = 2          # whole seconds (the config key is an integer)


def test_rotation_due_per_environment_and_after_regenerate():
    env = h.Env(config=config(alert_rotation_test_seconds=1,
                              alert_rotation_live_seconds=LIVE_PERIOD))
    c = env.client()
    live, _ = h.create_key(c, "live-key", environment="live")
    test, _ = h.create_key(c, "test-key", environment="test")
    gone, _ = h.create_key(c, "revoked-test", environment="test")
    revoke(c, gone["id"])
    t_live = h.parse_time(live["created_at"])

    at = wait_alert(c, "rotation_due", test["id"])
    seen = time.time()
    eq(at["details"], {"rotated_at": test["created_at"],
                       "rotation_period_days": 0},
       "rotation_due details of a test key (period 1 s: 0 whole days)")
    check(h.parse_time(at["created_at"]) - h.parse_time(test["created_at"])
          >= 0.999, "test key's rotation_due raised before its 1 s period: "
          "key created %s, alert %s" % (test["created_at"], at["created_at"]))
    if seen - t_live < LIVE_PERIOD - 0.2:
        none_of(c, "rotation_due", live["id"], what="for the live key %.2fs "
                "after creation (live period %s s)" % (seen - t_live,
                                                        LIVE_PERIOD))

    al = wait_alert(c, "rotation_due", live["id"])
    eq(al["details"], {"rotated_at": live["created_at"],
                       "rotation_period_days": 0}, "live key details")
    check(h.parse_time(al["created_at"]) - t_live >= LIVE_PERIOD - 0.001,
          "live key's rotation_due raised before its period: key "
          "created %s, alert %s" % (live["created_at"], al["created_at"]))
    none_of(c, "rotation_due", gone["id"], what="for a revoked key")

    # Regenerating starts a new period: a second alert, later, with the
    # new rotated_at; the first one stays as it was.
    t_regen = time.time()
    rg = expect(c.post(K % live["id"] + "/regenerate", {}), 200).json
    h.check_key(rg, with_secret=True)
    time.sleep(LIVE_PERIOD / 2)
    eq(of(alerts(c), "rotation_due", live["id"]), [al], "rotation_due alerts "
       "half a period after a regenerate")

    def second():
        return of(alerts(c), "rotation_due", live["id"],
                  lambda a: a["id"] != al["id"])
    a2 = h.wait_until(second, 6.0, what="a second rotation_due after the "
                      "regenerate")
    eq(len(a2), 1, "rotation_due alerts for the regenerated key's new period")
    a2 = a2[0]
    eq(set(a2["details"]), {"rotated_at", "rotation_period_days"},
       "details fields")
    h.near(h.parse_time(a2["details"]["rotated_at"]), t_regen, 2,
           "rotated_at after the regenerate")
    check(h.parse_time(a2["created_at"]) -
          h.parse_time(a2["details"]["rotated_at"]) >= LIVE_PERIOD - 0.001,
          "second rotation_due less than a period after the regenerate: %s"
          % h._short(a2))
    still_one(c, a2, "rotation_due after regenerate", al, at)
    eq(of(alerts(c), "rotation_due", live["id"]), [al, a2],
       "rotation_due alerts of the regenerated key")


# --------------------------------------------------------------------------
# unused_key

def test_unused_key():
    env = h.Env(config=config(alert_unused_seconds=1))
    c = env.client()
    never, _ = h.create_key(c, "never-used")
    busy, busy_secret = h.create_key(c, "busy")
    gone, _ = h.create_key(c, "revoked")
    revoke(c, gone["id"])
    t0 = time.time()
    # `busy` is used every 0.3 s for 1.8 s: never unused for 1 s.
    while time.time() - t0 < 1.8:
        eq(verify(c, busy_secret)["code"], "VALID", "verify busy key")
        time.sleep(0.3)
    an = wait_alert(c, "unused_key", never["id"], timeout=3)
    eq(an["details"], {"unused_days": 0}, "unused_key details of a never-used "
       "key (no last_used_at; 0 whole days)")
    check(h.parse_time(an["created_at"]) - h.parse_time(never["created_at"])
          >= 0.999, "unused_key raised before the key was 1 s old: %s"
          % h._short(an))
    none_of(c, "unused_key", busy["id"], what="for a key used every 0.3 s")
    last_use = time.time()

    ab = wait_alert(c, "unused_key", busy["id"], timeout=4)
    k = h.check_key(expect(c.get(K % busy["id"]), 200).json)
    eq(ab["details"], {"last_used_at": k["last_used_at"], "unused_days": 0},
       "unused_key details of a key used before")
    check(h.parse_time(ab["created_at"]) - h.parse_time(k["last_used_at"])
          >= 0.999, "unused_key raised less than 1 s after the last use: "
          "%s" % h._short(ab))
    h.near(h.parse_time(k["last_used_at"]), last_use, 1, "last_used_at")
    still_one(c, an, "unused_key", ab)
    none_of(c, "unused_key", gone["id"], what="for a revoked key")


# --------------------------------------------------------------------------
# usage_threshold

def usage_detail(window, limit, used, percent):
    return {"window": window, "limit": limit, "used": used, "percent": percent}


def test_usage_threshold_key_day():
    avoid_boundary(DAY, 30)
    env = h.Env(config=config())
    c = env.client()
    k1, s1 = h.create_key(c, "ten-a-day", rate_limit={"requests_per_day": 10})
    k2, s2 = h.create_key(c, "fifty-a-day", rate_limit={"requests_per_day": 50})
    k3, s3 = h.create_key(c, "seventy-percent",
                          rate_limit={"requests_per_day": 10})

    for _ in range(8):
        eq(verify(c, s1)["code"], "VALID", "verification within the quota")
    for _ in range(7):
        eq(verify(c, s3)["code"], "VALID", "verification within the quota")
    a80 = wait_alert(c, "usage_threshold", k1["id"])
    eq(a80["details"], usage_detail("day", 10, 8, 80), "80% details")
    still_one(c, a80, "usage_threshold 80%")
    none_of(c, "usage_threshold", k3["id"], what="at 70% of the key's quota")

    for _ in range(2):
        eq(verify(c, s1)["code"], "VALID", "verification up to the quota")
    eq(verify(c, s1)["code"], "USAGE_EXCEEDED", "verification over the quota")
    a100 = wait_alert(c, "usage_threshold", k1["id"],
                      lambda a: a["details"].get("percent") == 100)
    eq(a100["details"], usage_detail("day", 10, 10, 100), "100% details")
    still_one(c, a100, "usage_threshold 100%")
    eq(of(alerts(c), "usage_threshold", k1["id"]), [a80, a100],
       "usage_threshold alerts of the key (80% then 100%, each once)")

    # 0% -> 100% in one step (cost = the whole quota): only the 100% alert.
    eq(verify(c, s2, cost=50)["code"], "VALID", "one verification of cost 50")
    b100 = wait_alert(c, "usage_threshold", k2["id"])
    eq(b100["details"], usage_detail("day", 50, 50, 100),
       "details when 100% is reached in one step")
    still_one(c, b100, "usage_threshold in one step")
    eq(of(alerts(c), "usage_threshold", k2["id"]), [b100],
       "usage_threshold alerts when 100% is reached in one step (no 80%)")
    none_of(c, "usage_threshold", k3["id"], what="at 70% of the key's quota")


def test_usage_threshold_org_day_and_month():
    avoid_boundary(DAY, 30)
    env = h.Env(config=config())
    c = env.client()
    k, s = h.create_key(c, "busy")
    expect(c.put(LIMITS, {"requests_per_day": 1000,
                          "requests_per_month": 5000}), 200)
    # Management calls may count too (the contract limits them): 850 plus
    # a few stays between 80% and 100% of the day, under 80% of the month.
    eq(verify(c, s, cost=850)["code"], "VALID", "verification of cost 850")
    ad = wait_alert(c, "usage_threshold", pred=lambda a:
                    a["details"].get("window") == "org-day")
    check("key_id" not in ad and "service_account_id" not in ad,
          "an org-wide usage alert names a key: %s" % h._short(ad))
    eq(set(ad["details"]), {"window", "limit", "used", "percent"},
       "org-day details fields")
    eq((ad["details"]["limit"], ad["details"]["percent"]), (1000, 80),
       "org-day limit and percent")
    check(is_int(ad["details"]["used"]) and
          850 <= ad["details"]["used"] < 1000,
          "org-day used %r (850 verified, a few management calls)"
          % (ad["details"]["used"],))
    still_one(c, ad, "usage_threshold org-day 80%")
    eq(of(alerts(c), "usage_threshold"), [ad], "usage_threshold alerts at "
       "~85% of the org's day and ~17% of its month")

    # The month: 80% of 1050 is 840, 100% is 1050.
    expect(c.put(LIMITS, {"requests_per_month": 1050}), 200)
    am = wait_alert(c, "usage_threshold", pred=lambda a:
                    a["details"].get("window") == "org-month")
    check("key_id" not in am, "org-month alert names a key: %s" % h._short(am))
    eq((am["details"]["limit"], am["details"]["percent"]), (1050, 80),
       "org-month limit and percent")
    check(is_int(am["details"]["used"]) and
          850 <= am["details"]["used"] < 1050,
          "org-month used %r" % (am["details"]["used"],))
    still_one(c, am, "usage_threshold org-month 80%")
    eq(of(alerts(c), "usage_threshold"), [ad, am], "usage_threshold alerts")


# --------------------------------------------------------------------------
# failed_auth_spike

def test_failed_auth_spike_from_management_calls():
    avoid_boundary(60, 3)
    env = h.Env(config=config(alert_failed_auth_per_minute=20,
                              verify_failures_per_minute=1000))
    c = env.client()
    rk, rs = h.create_key(c, "revoked")
    revoke(c, rk["id"])
    target, ts = h.create_key(c, "guessed")
    quiet, qs = h.create_key(c, "nineteen")
    qk = revoke(c, quiet["id"])

    t0 = time.time()
    bad = h.Client(env.port, rs)
    for i in range(19):
        expect_error(bad.get("/v1/me"), 401, "unauthenticated",
                     message_contains=GENERIC_401)
        expect_error(h.Client(env.port, qs).get("/v1/me"), 401,
                     "unauthenticated")
    time.sleep(SETTLE)
    none_of(c, "failed_auth_spike", what="after 19 refused calls per key "
            "(threshold 20)")
    expect_error(bad.get(KEYS), 401, "unauthenticated")
    a = wait_alert(c, "failed_auth_spike", rk["id"])
    minute = t0 - t0 % 60
    eq(a["details"], {"failures": 20, "minute": h.fmt_time(minute)},
       "failed_auth_spike details")
    for i in range(25):
        expect_error(bad.get("/v1/me"), 401, "unauthenticated")
    still_one(c, a, "failed_auth_spike after 45 refused calls")

    # Guessing: well-formed secrets naming an existing key's id.
    g = h.Client(env.port, None)
    for i in range(20):
        expect_error(g.get("/v1/me", key=forged_secret(target["id"])), 401,
                     "unauthenticated", message_contains=GENERIC_401)
    ag = wait_alert(c, "failed_auth_spike", target["id"])
    eq(ag["details"]["failures"], 20, "failures of the guessed key")
    eq(h.me(c, key=ts)["key_id"], target["id"], "the guessed key still works")
    still_one(c, ag, "failed_auth_spike (guessing)")
    none_of(c, "failed_auth_spike", qk["id"], what="for a key refused 19 times")
    eq(len(of(alerts(c), "failed_auth_spike")), 2,
       "failed_auth_spike alerts (management calls count for no address)")


def test_failed_auth_spike_from_verifications():
    avoid_boundary(60, 3)
    env = h.Env(config=config(alert_failed_auth_per_minute=20,
                              verify_failures_per_minute=1000))
    c = env.client()
    rk, rs = h.create_key(c, "revoked")
    revoke(c, rk["id"])
    t0 = time.time()
    v = h.Client(env.port, None)
    for i in range(19):
        eq(verify(v, rs)["code"], "REVOKED", "verification of a revoked key")
    time.sleep(SETTLE)
    none_of(c, "failed_auth_spike", what="after 19 failed verifications "
            "(threshold 20)")
    try:
        res = verify(v, rs)
    except OSError as e:
        alive_or_fail(env, "on the 20th failed verification of a revoked key "
                      "(the one that raises failed_auth_spike): POST %s -> %r"
                      % (VERIFY, e))
        raise
    eq(res["code"], "REVOKED", "20th verification")
    alive_or_fail(env, "after the 20th failed verification")
    minute = h.fmt_time(t0 - t0 % 60)

    ak = wait_alert(c, "failed_auth_spike", rk["id"])
    eq(ak["details"], {"failures": 20, "minute": minute}, "per-key details")
    aa = wait_alert(c, "failed_auth_spike",
                    pred=lambda a: "address" in a["details"],
                    what="a failed_auth_spike alert for the client address")
    eq(set(aa["details"]), {"failures", "minute", "address"},
       "per-address details fields")
    eq((aa["details"]["failures"], aa["details"]["minute"]), (20, minute),
       "per-address failures and minute")
    check(str(aa["details"]["address"]).startswith("127.0.0.1"),
          "address %r (the test client is 127.0.0.1)"
          % (aa["details"]["address"],))
    for i in range(25):
        eq(verify(v, rs)["code"], "REVOKED", "more failed verifications")
    time.sleep(SETTLE)
    eq(sorted(a["id"] for a in of(alerts(c), "failed_auth_spike")),
       sorted([ak["id"], aa["id"]]), "failed_auth_spike alerts after 45 "
       "failures (one per key, one per address)")


# --------------------------------------------------------------------------
# unusual_activity

def test_unusual_activity():
    avoid_boundary(3600, 10)
    env = h.Env(config=config(alert_unusual_min_requests=30,
                              alert_unusual_factor=10))
    c = env.client()
    k, s = h.create_key(c, "bursty")
    for _ in range(29):
        eq(verify(c, s)["code"], "VALID", "verify")
    time.sleep(SETTLE)
    none_of(c, "unusual_activity", k["id"], what="at 29 calls (minimum 30)")
    eq(verify(c, s)["code"], "VALID", "30th verify")
    t = time.time()
    a = wait_alert(c, "unusual_activity", k["id"])
    eq(a["details"], {"hour": h.fmt_time(t - t % 3600), "requests": 30,
                      "hourly_baseline": 0}, "unusual_activity details")
    for _ in range(10):
        eq(verify(c, s)["code"], "VALID", "verify")
    still_one(c, a, "unusual_activity (once per key and hour)")


# --------------------------------------------------------------------------
# service_account_id, acknowledgement and the list

def test_service_account_alerts_and_ack_by_service_account():
    env = h.Env(config=config(alert_rotation_test_seconds=1))
    c = env.client()
    sa = expect(c.post(SAS, {"name": "ci-bot"}), 201).json
    sk = expect(c.post(SAS + "/%s/api-keys" % sa["id"],
                       {"name": "ci", "environment": "test"}), 201).json
    uk, _ = h.create_key(c, "mine", environment="test")
    mgr = expect(c.post(SAS + "/%s/api-keys" % sa["id"], {"name": "ops"}),
                 201).json["key"]
    member_sa = expect(c.post(SAS, {"name": "reader", "role": "member"}),
                       201).json
    member = expect(c.post(SAS + "/%s/api-keys" % member_sa["id"],
                           {"name": "r"}), 201).json["key"]

    a_sa = wait_alert(c, "rotation_due", sk["id"])
    eq(a_sa.get("service_account_id"), sa["id"], "service_account_id of an "
       "alert on a service account's key")
    a_user = wait_alert(c, "rotation_due", uk["id"])
    check("service_account_id" not in a_user, "service_account_id on a "
          "user's key alert: %s" % h._short(a_user))

    # A service account (role manager by default) lists and acknowledges.
    sac = h.Client(env.port, mgr)
    eq([a["id"] for a in alerts(sac)], [a["id"] for a in alerts(c)],
       "the service account's list vs the owner's")
    r = expect(sac.post(ACK % a_sa["id"]), 200).json
    check_alert(r)
    eq(r["acknowledged_by"], sa["id"], "acknowledged_by (a service account)")
    eq(r["service_account_id"], sa["id"], "service_account_id after ack")

    # A member service account: 403 on both.
    mc = h.Client(env.port, member)
    expect_error(mc.get(ALERTS), 403, "permission_denied")
    expect_error(mc.post(ACK % a_user["id"]), 403, "permission_denied")
    eq(of(alerts(c), key_id=uk["id"]), [a_user], "alert after a member's ack")


def test_ack_flow_filters_and_errors():
    env = h.Env(config=config(alert_rotation_test_seconds=1))
    c = env.client()
    ks = [h.create_key(c, "t%d" % i, environment="test")[0] for i in range(3)]
    for k in ks:
        wait_alert(c, "rotation_due", k["id"])
    time.sleep(SETTLE)
    all3 = alerts(c)
    eq([a.get("key_id") for a in all3], [k["id"] for k in ks],
       "three rotation_due alerts, oldest first")
    eq(all3, alerts(c, status="open"), "status=open while nothing is acked")
    eq(alerts(c, status="acknowledged"), [], "status=acknowledged")
    eq(alerts(c, limit=1), all3, "the list paged by 1")
    eq(alerts(c, limit=2), all3, "the list paged by 2")
    first, mid, last = all3

    # If-Match
    expect_error(c.post(ACK % mid["id"], headers={"If-Match": '"2"'}), 412,
                 "precondition_failed")
    eq(alerts(c)[1], mid, "alert after a 412")
    t0 = time.time()
    r = expect(c.post(ACK % mid["id"], headers={"If-Match": '"1"'}), 200)
    acked = check_alert(r.json)
    eq(acked["status"], "acknowledged", "status after ack")
    eq(acked["acknowledged_by"], env.info["user_id"], "acknowledged_by")
    h.near(h.parse_time(acked["acknowledged_at"]), t0, 5, "acknowledged_at")
    eq(acked["version"], 2, "version after ack")
    for f in ("id", "type", "key_id", "created_at", "details"):
        eq(acked[f], mid[f], "%s after ack" % f)
    expect_error(c.post(ACK % mid["id"]), 409, "conflict")
    expect_error(c.post(ACK % mid["id"], headers={"If-Match": '"1"'}), 412,
                 "precondition_failed")
    eq(alerts(c)[1], acked, "the listed alert after ack")

    # Filters
    eq(alerts(c, status="open"), [first, last], "status=open")
    eq(alerts(c, status="acknowledged"), [acked], "status=acknowledged")
    eq(alerts(c, status="open", limit=1), [first, last], "status=open by 1")
    page, cur = list_page(c, {"status": "open", "limit": "1"})
    eq(([a["id"] for a in page], cur is not None), ([first["id"]], True),
       "first page of status=open by 1")
    page, cur = list_page(c, {"status": "open", "limit": "1", "cursor": cur})
    eq([a["id"] for a in page], [last["id"]], "second page of status=open")

    # Idempotency-Key on the ack
    hdr = {"Idempotency-Key": "ack-first-1"}
    r1 = expect(c.post(ACK % first["id"], headers=hdr), 200)
    r2 = expect(c.post(ACK % first["id"], headers=hdr), 200)
    eq((r2.header("Idempotent-Replayed") or "").lower(), "true",
       "Idempotent-Replayed on the replayed ack")
    eq(r2.json, r1.json, "replayed ack body")

    # Bodies and ids
    expect_error(c.post(ACK % last["id"], {"comment": "seen"}), 400,
                 "invalid_argument", "comment")
    expect_error(c.post(ACK % last["id"], "{}", content_type="text/plain"),
                 415, "unsupported_media_type")
    expect_error(c.post(ACK % h.random_id("alr")), 404, "not_found")
    for bad in ("alr_nope", ks[0]["id"]):
        r = c.post(ACK % bad)
        check(r.status in (400, 404), "ack of %s: %s" % (bad, r.describe()))
    r = expect(c.post(ACK % last["id"], {}), 200).json
    eq(r["status"], "acknowledged", "ack with an empty JSON body")

    eq(alerts(c, status="open"), [], "status=open after acking all")
    eq([a["id"] for a in alerts(c, status="acknowledged")],
       [a["id"] for a in all3], "status=acknowledged after acking all")
    time.sleep(SETTLE)
    eq(len(alerts(c)), 3, "alerts after acking (conditions not raised again)")


def test_access_rules():
    env = h.Env(config=config(alert_rotation_test_seconds=1))
    c = env.client()
    k, _ = h.create_key(c, "t", environment="test")
    k2, _ = h.create_key(c, "t2", environment="test")
    users = {}
    for role in ("manager", "member", "guest"):
        u = expect(c.post(USERS, {"email": "%s@example.com" % role,
                                  "role": role}), 201).json
        users[role] = (u["id"], expect(c.post(USERS + "/%s/api-keys" % u["id"],
                                              {"name": role}), 201).json["key"])
    _, ro = h.create_key(c, "ro", permissions={"access": "read_only"})
    _, fl = h.create_key(c, "fl", permissions={"access": "flows",
                                                "flows": ["flow_a"]})
    a = wait_alert(c, "rotation_due", k["id"])
    b = wait_alert(c, "rotation_due", k2["id"])

    for role in ("member", "guest"):
        x = h.Client(env.port, users[role][1])
        expect_error(x.get(ALERTS), 403, "permission_denied")
        expect_error(x.post(ACK % a["id"]), 403, "permission_denied")
    fc = h.Client(env.port, fl)
    expect_error(fc.get(ALERTS), 403, "permission_denied")
    expect_error(fc.post(ACK % a["id"]), 403, "permission_denied")
    rc = h.Client(env.port, ro)
    eq([x["id"] for x in alerts(rc)], [x["id"] for x in alerts(c)],
       "a read_only key's list")
    expect_error(rc.post(ACK % a["id"]), 403, "permission_denied")
    anon = h.Client(env.port, None)
    expect_error(anon.get(ALERTS), 401, "unauthenticated")
    expect_error(anon.post(ACK % a["id"]), 401, "unauthenticated")
    eq(of(alerts(c), key_id=k["id"]), [a], "alert after refused acks")

    mc = h.Client(env.port, users["manager"][1])
    r = expect(mc.post(ACK % a["id"]), 200).json
    eq(r["acknowledged_by"], users["manager"][0], "acknowledged_by (manager)")
    eq(r["status"], "acknowledged", "status")
    eq(alerts(mc, status="open"), [b], "the manager's status=open list")


# --------------------------------------------------------------------------
# Isolation, history, restarts

def test_isolation_between_orgs():
    env = h.Env(start=False, config=config(alert_rotation_test_seconds=1))
    other = h.org_create(env.data, org="Other Org", email="owner2@example.net")
    env.start()
    ca = env.client()
    cb = h.Client(env.port, other["key"])
    ka, _ = h.create_key(ca, "a", environment="test")
    kb, _ = h.create_key(cb, "b", environment="test")
    aa = wait_alert(ca, "rotation_due", ka["id"])
    ab = wait_alert(cb, "rotation_due", kb["id"])
    time.sleep(SETTLE)
    la = alerts(ca, org_key_ids=key_ids(ca))
    lb = alerts(cb, org_key_ids=key_ids(cb))
    eq([a["id"] for a in la], [aa["id"]], "org A's alerts")
    eq([a["id"] for a in lb], [ab["id"]], "org B's alerts")
    expect_error(cb.post(ACK % aa["id"]), 404, "not_found")
    expect_error(cb.post(ACK % aa["id"], headers={"If-Match": '"1"'}), 404,
                 "not_found")
    eq(alerts(ca), la, "org A's alerts after org B tried to ack one")
    page, cur = list_page(ca, {"limit": "1"})
    eq(cur, None, "org A's single page")
    expect(cb.post(ACK % ab["id"]), 200)
    eq(alerts(ca), la, "org A's alerts after org B acked its own")
    eq(alerts(ca, status="acknowledged"), [], "org A's acknowledged alerts")
    eq([a["id"] for a in alerts(cb, status="acknowledged")], [ab["id"]],
       "org B's acknowledged alerts")


def alert_events(c):
    """GET /v1/audit-events?category=alerts, every page."""
    out = []
    cursor = None
    for _ in range(100):
        q = {"category": "alerts", "limit": "500"}
        if cursor is not None:
            q["cursor"] = cursor
        body = expect(c.get(AUDIT, query=q), 200).json
        out.extend(body["events"])
        cursor = body["next_cursor"]
        if cursor is None:
            return out
    fail("audit-event pagination did not end")


def raised_events(c):
    """AlertRaised events by alert id; insists on one per alert."""
    by_id = {}
    for e in alert_events(c):
        eq(e.get("category"), "alerts", "category of %s" % h._short(e))
        if e.get("type") == "AlertRaised":
            aid = (e.get("target") or {}).get("id")
            check(aid not in by_id, "two AlertRaised events for %s" % aid)
            by_id[aid] = e
    return by_id


def test_alerts_not_in_control_history():
    avoid_boundary(60, 3)
    env = h.Env(config=config(alert_rotation_test_seconds=1,
                              alert_failed_auth_per_minute=5))
    c = env.client()
    k, _ = h.create_key(c, "t", environment="test")
    rk, rs = h.create_key(c, "r")
    revoke(c, rk["id"])
    for _ in range(5):
        expect_error(h.Client(env.port, rs).get("/v1/me"), 401,
                     "unauthenticated")
    a1 = wait_alert(c, "rotation_due", k["id"])
    a2 = wait_alert(c, "failed_auth_spike", rk["id"])
    expect(c.post(ACK % a1["id"]), 200)
    r = expect(c.get(HISTORY, query={"limit": "500"}), 200)
    events = r.json["events"]
    check(events, "the control history is empty after key changes")
    for e in events:
        check(e.get("category") != "alerts" and
              "alert" not in str(e.get("type", "")).lower() and
              (e.get("target") or {}).get("type") != "alert",
              "an alert event in the control history: %s" % h._short(e))
    for a in (a1, a2):
        check(a["id"].encode() not in r.body, "alert id %s in the control "
              "history: %s" % (a["id"], r.describe()))

    # They are in the audit history, category `alerts` (contract: "Alerts
    # are events in the log, so they replay and show in the audit history").
    evs = alert_events(c)
    raised = raised_events(c)
    eq(sorted(raised), sorted([a1["id"], a2["id"]]), "alerts raised in the "
       "audit history")
    for a in (a1, a2):
        eq((raised[a["id"]]["data"].get("alert_type"),
            raised[a["id"]]["data"].get("details")), (a["type"], a["details"]),
           "AlertRaised data of %s" % a["id"])
    acks = [e for e in evs if e.get("type") != "AlertRaised"]
    eq([(e.get("target") or {}).get("id") for e in acks], [a1["id"]],
       "targets of the other alert events (the one acknowledgement)")
    eq((acks[0].get("actor") or {}).get("id"), env.info["user_id"],
       "actor of the acknowledgement")


def test_alerts_survive_restart_and_kill9():
    avoid_boundary(60, 3)
    avoid_boundary(DAY, 30)
    env = h.Env(config=config(alert_rotation_test_seconds=1,
                              alert_expiring_seconds=int(2 * DAY),
                              alert_failed_auth_per_minute=5))
    c = env.client()
    tk, _ = h.create_key(c, "test-key", environment="test")
    ek, _ = h.create_key(c, "expiring", expires_in_days=1)
    qk, qs = h.create_key(c, "quota", rate_limit={"requests_per_day": 10})
    rk, rs = h.create_key(c, "revoked")
    revoke(c, rk["id"])
    for _ in range(5):
        expect_error(h.Client(env.port, rs).get("/v1/me"), 401,
                     "unauthenticated")
    eq(verify(c, qs, cost=10)["code"], "VALID", "verify cost 10")
    wait_alert(c, "rotation_due", tk["id"])
    wait_alert(c, "expiring_soon", ek["id"])
    wait_alert(c, "usage_threshold", qk["id"])
    spike = wait_alert(c, "failed_auth_spike", rk["id"])
    expect(c.post(ACK % spike["id"]), 200)
    time.sleep(SETTLE)
    before = alerts(c)
    eq(len(before), 4, "alerts before the restart: %s" % h._short(before))

    env.restart()
    c = env.client()
    time.sleep(SETTLE)
    eq(stable(alerts(c)), stable(before), "alerts after a clean restart")
    eq([a["id"] for a in alerts(c, status="acknowledged")], [spike["id"]],
       "acknowledged alerts after a clean restart")

    # A new alert and a new acknowledgement, then kill -9.
    t2, _ = h.create_key(c, "test-key-2", environment="test")
    new = wait_alert(c, "rotation_due", t2["id"])
    opened = [a for a in before if a["status"] == "open"]
    expect(c.post(ACK % opened[0]["id"]), 200)
    time.sleep(SETTLE)
    before = alerts(c)
    eq(len(before), 5, "alerts before kill -9")
    check(any(a["id"] == new["id"] for a in before), "new alert listed")
    env.daemon.kill9()
    env.start()
    c = env.client()
    time.sleep(SETTLE)
    after = alerts(c)
    eq(stable(after), stable(before), "alerts after kill -9 and a restart")
    eq(len(alerts(c, status="acknowledged")), 2, "acknowledged after kill -9")
    eq(sorted(raised_events(c)), sorted(a["id"] for a in after),
       "AlertRaised events in the log after two restarts (one per alert)")
    env.stop()
    h.verify_ok(env.data)


if __name__ == "__main__":
    h.main(globals())
