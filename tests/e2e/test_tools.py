"""
End-to-end tests of the `keyledger` tool (init, org-create, verify) and of
both programs' exit statuses (0 success, 1 user-facing failure, 2 bad
usage), plus isolation between the organizations the tool creates.

Run: KL_BUILD_DIR=build python3 tests/e2e/test_tools.py [name-substring...]
"""

import os
import re
import sys

sys.dont_write_bytecode = True      # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from harness import check, eq, expect, expect_error  # noqa: E402

KEY_PATH = "/v1/api-keys/%s"
SECRET_SEARCH = re.compile(r"kl_live_[0-9a-hjkmnp-tv-z]{26}[0-9A-Za-z]{38,}")


def test_init_json_creates_dir_and_log():
    root = h.tempdir()
    data = os.path.join(root, "fresh")          # does not exist yet
    out = h.init(data, org="Acme Corp", email="owner@example.com")
    check(os.path.isdir(data), "init did not create the data dir")
    check(h.segment_names(data), "init left no segment file: %s" %
          sorted(os.listdir(data)))
    v = h.verify_ok(data)
    eq(v["head_seq"], v["events"], "head_seq vs events")
    check(not h.files_containing(data, out["key"]), "the secret was written to disk")
    body = h.SECRET_RE.match(out["key"]).group(4)
    check(not h.files_containing(data, body), "the secret's random part was "
          "written to disk")

    d = h.start_daemon(data)
    c = d.client(out["key"])
    m = h.me(c)
    eq(m, {"org_id": out["org_id"], "key_id": out["key_id"], "role": "owner",
           "principal": {"type": "user", "id": out["user_id"]}}, "/v1/me")
    eq(expect(c.get("/v1/org"), 200).json["name"], "Acme Corp", "org name")


def test_init_into_existing_empty_dir_and_owner_name():
    root = h.tempdir()
    data = os.path.join(root, "empty")
    os.mkdir(data)
    out = h.init(data, org="Initech", email="peter@initech.example",
                 name="Peter Gibbons")
    h.verify_ok(data)
    d = h.start_daemon(data)
    eq(h.me(d.client(out["key"]))["org_id"], out["org_id"], "org_id")


def test_init_plain_output_prints_the_key_once():
    root = h.tempdir()
    data = os.path.join(root, "data")
    res = h.run_tool("init", "--data", data, "--org", "Plain",
                     "--owner-email", "plain@example.com")
    eq(res.rc, 0, "init without --json: " + res.describe())
    keys = SECRET_SEARCH.findall(res.stdout)
    check(len(set(keys)) == 1, "init without --json should print the one key: "
          + res.describe())
    h.check_secret(keys[0])
    check(not h.files_containing(data, keys[0]), "the secret was written to disk")
    d = h.start_daemon(data)
    expect(d.client(keys[0]).get("/v1/me"), 200)


def test_init_refuses_existing_log():
    root = h.tempdir()
    data = os.path.join(root, "data")
    h.init(data)
    v1 = h.verify_ok(data)
    res = h.run_tool("init", "--data", data, "--org", "Second",
                     "--owner-email", "second@example.com", "--json")
    eq(res.rc, 1, "second init: " + res.describe())
    check(res.stderr.strip(), "second init should say why on stderr")
    check(not SECRET_SEARCH.search(res.stdout), "refused init printed a key")
    eq(h.verify_ok(data), v1, "log after a refused init")


def test_bad_usage_exits_2():
    root = h.tempdir()
    data = os.path.join(root, "never")
    cases = [
        [],
        ["frobnicate"],
        ["init"],
        ["init", "--data", data],
        ["init", "--data", data, "--org", "X"],
        ["init", "--data", data, "--owner-email", "x@example.com"],
        ["init", "--data", data, "--org", "X", "--owner-email", "x@example.com",
         "--bogus"],
        ["init", "--data", data, "--org", "X", "--owner-email", "x@example.com",
         "stray"],
        ["init", "--data"],
        ["org-create", "--data", data],
        ["verify"],
        ["verify", "--data", data, "--bogus"],
    ]
    for args in cases:
        res = h.run_tool(*args)
        eq(res.rc, 2, "exit status for bad usage: " + res.describe())
        check(res.stderr.strip(), "bad usage without a message: " + res.describe())
        check(not os.path.exists(data), "bad usage created the data dir: "
              + res.describe())


def test_daemon_bad_usage_exits_2():
    env = h.Env(start=False)
    for args in (["--data", env.data, "--listen", "127.0.0.1:0", "--bogus"],
                 ["--data", env.data, "--listen", "127.0.0.1:0",
                  "--fsync", "sometimes"],
                 ["--listen", "127.0.0.1:0"],
                 ["--data", env.data, "--listen", "127.0.0.1:0", "stray"]):
        rc, err = h.run_daemon_args(args)
        check(rc is not None, "keyledgerd %s kept running instead of exiting 2"
              % " ".join(args[2:] if args[0] == "--data" else args))
        eq(rc, 2, "keyledgerd exit status for %r (stderr %s)" % (
            args, h._short(err, 300)))
        check(err.strip(), "keyledgerd bad usage without a message: %r" % args)
    # Missing data dir is a user-facing failure, not bad usage.
    rc, err = h.run_daemon_args(["--data", os.path.join(env.root, "nope"),
                                 "--listen", "127.0.0.1:0"])
    eq(rc, 1, "keyledgerd on a missing data dir (stderr %s)" % h._short(err, 300))


def test_verify_summary_and_head_moves():
    env = h.Env(start=False)
    v1 = h.verify_ok(env.data)
    eq(v1["head_seq"], v1["events"], "head_seq vs events after init")
    res = h.run_tool("verify", "--data", env.data)
    eq(res.json(), v1, "verify is repeatable")
    env.start()
    c = env.client()
    for i in range(3):
        h.create_key(c, "v-%d" % i)
    env.stop()
    v2 = h.verify_ok(env.data)
    check(v2["events"] >= v1["events"] + 3, "events %d -> %d after 3 writes" % (
        v1["events"], v2["events"]))
    eq(v2["head_seq"], v2["events"], "head_seq vs events")
    check(v2["head_hash"] != v1["head_hash"], "head_hash did not move")


def test_verify_missing_dir_fails():
    root = h.tempdir()
    res = h.run_tool("verify", "--data", os.path.join(root, "nope"))
    eq(res.rc, 1, "verify on a missing dir: " + res.describe())
    check(res.stderr.strip(), "verify failure without a message")


def test_org_create_shape_and_isolation():
    env = h.Env(start=False)
    o1 = env.info
    o2 = h.org_create(env.data, org="Globex", email="hank@globex.example")
    for f in ("org_id", "user_id", "key_id"):
        check(o2[f] != o1[f], "org-create reused %s %s" % (f, o1[f]))
    h.verify_ok(env.data)
    env.start()
    c1 = env.client()
    c2 = h.Client(env.port, o2["key"])
    eq(h.me(c2), {"org_id": o2["org_id"], "key_id": o2["key_id"], "role": "owner",
                  "principal": {"type": "user", "id": o2["user_id"]}},
       "/v1/me of the second org's owner")
    eq(expect(c2.get("/v1/org"), 200).json["name"], "Globex", "second org name")
    eq(expect(c1.get("/v1/org"), 200).json["name"], "Acme Corp", "first org name")

    k1, s1 = h.create_key(c1, "acme-key")
    k2, s2 = h.create_key(c2, "globex-key")
    eq(k2["org_id"], o2["org_id"], "org_id of a key made by the second org")
    eq({x["id"] for x in h.list_all(c2)}, {o2["key_id"], k2["id"]},
       "the second org's list")
    eq({x["id"] for x in h.list_all(c1)}, {o1["key_id"], k1["id"]},
       "the first org's list")

    before1 = h.key_snapshot(c1)
    before2 = h.key_snapshot(c2)
    for client, foreign in ((c2, (o1["key_id"], k1["id"])),
                            (c1, (o2["key_id"], k2["id"]))):
        for kid in foreign:
            p = KEY_PATH % kid
            expect_error(client.get(p), 404, "not_found")
            expect_error(client.patch(p, {"name": "stolen"}), 404, "not_found")
            expect_error(client.post(p + "/revoke", {}), 404, "not_found")
            expect_error(client.post(p + "/regenerate", {}), 404, "not_found")
            expect_error(client.delete(p), 404, "not_found")
    h.assert_unchanged(c1, before1, "another org's attempts")
    h.assert_unchanged(c2, before2, "another org's attempts")
    eq(h.me(c1, key=s1)["org_id"], o1["org_id"], "first org key still works")
    eq(h.me(c2, key=s2)["org_id"], o2["org_id"], "second org key works")


def test_org_create_refused_while_daemon_runs():
    env = h.Env()
    res = h.run_tool("org-create", "--data", env.data, "--org", "Late",
                     "--owner-email", "late@example.com", "--json")
    eq(res.rc, 1, "org-create while the daemon holds the lock: " + res.describe())
    low = res.stderr.lower()
    check(any(w in low for w in ("lock", "in use", "running", "already")),
          "org-create should say the data dir is locked/in use: " + res.describe())
    check(not SECRET_SEARCH.search(res.stdout), "refused org-create printed a key")
    eq(h.me(env.client())["key_id"], env.info["key_id"], "daemon still serves")
    env.stop()
    # Nothing was added: a fresh org-create now works and is the only extra.
    o2 = h.org_create(env.data, org="Late", email="late@example.com")
    env.start()
    eq(h.me(h.Client(env.port, o2["key"]))["org_id"], o2["org_id"],
       "org created after the daemon stopped")


def test_org_create_on_missing_dir_fails():
    root = h.tempdir()
    data = os.path.join(root, "nope")
    res = h.run_tool("org-create", "--data", data, "--org", "X",
                     "--owner-email", "x@example.com", "--json")
    eq(res.rc, 1, "org-create without a log: " + res.describe())
    check(res.stderr.strip(), "org-create failure without a message")


if __name__ == "__main__":
    h.main(globals())
