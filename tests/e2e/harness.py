"""
End-to-end harness for keyledger: starts the real binaries on an ephemeral
loopback port with a temporary data dir and speaks real HTTP to them.

What lives here:
  - locating the binaries ($KL_BUILD_DIR, default `build` under the repo root);
  - temp dirs, `keyledger` tool runs, daemon start / SIGTERM / kill -9 with
    stderr captured to a file and the port parsed from it;
  - a small keep-alive HTTP client (http.client) that checks the contract's
    invariants on every response (X-Request-Id, error shape), and a raw socket
    helper for malformed, huge, pipelined and slow requests;
  - readers for the on-disk log (segment header, record framing, CRC-32C) used
    by the crash and corruption tests;
  - assertion helpers and a tiny runner: each test file defines test_*
    functions; `main()` runs them, prints `PASS name` / `FAIL name: reason` /
    `SKIP name: reason` lines and ends with exactly one summary line
    `N passed, N failed[, N skipped]`; exit status 1 if anything failed.

Every daemon a test starts is stopped and every temp dir removed after the
test, pass or fail. Only the standard library is used.
"""

import atexit
import datetime
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import zlib

# --------------------------------------------------------------------------
# Locations

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def build_dir():
    d = os.environ.get("KL_BUILD_DIR", "build")
    if not os.path.isabs(d):
        d = os.path.join(REPO_ROOT, d)
    return d


def daemon_path():
    return os.path.join(build_dir(), "keyledgerd")


def tool_path():
    return os.path.join(build_dir(), "keyledger")


def binaries_problem():
    """None when both programs exist and are executable, else a message."""
    missing = [p for p in (daemon_path(), tool_path())
               if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if not missing:
        return None
    return ("binary not found or not executable: %s (build the project, or "
            "set KL_BUILD_DIR to the build directory)" % ", ".join(missing))


# --------------------------------------------------------------------------
# Failures and skips

class Failure(AssertionError):
    pass


class Skip(Exception):
    pass


def fail(msg):
    raise Failure(msg)


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def eq(actual, expected, what="value"):
    if actual != expected:
        raise Failure("%s: expected %s, got %s" % (what, _short(expected),
                                                    _short(actual)))


def _short(v, n=400):
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[:n] + "...(%d more)" % (len(s) - n)


# --------------------------------------------------------------------------
# Contract formats

CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"   # lowercase, no i l o u
ID_BODY = "[0-9a-hjkmnp-tv-z]{26}"
REQ_ID_RE = re.compile(r"^req_" + ID_BODY + r"$")
TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET_RE = re.compile(r"^([a-z0-9]+)_(live|test)_(" + ID_BODY +
                       r")([0-9A-Za-z]{32,})([0-9A-Za-z]{6})$")


def id_re(prefix):
    return re.compile(r"^" + prefix + "_" + ID_BODY + r"$")


def is_id(value, prefix):
    return isinstance(value, str) and bool(id_re(prefix).match(value))


def random_id(prefix):
    """A well-formed id that no daemon has issued (random, not time-ordered)."""
    import random
    return prefix + "_" + "".join(random.choice(CROCKFORD) for _ in range(26))


def base62_fixed(n, width=6):
    out = []
    for _ in range(width):
        out.append(BASE62[n % 62])
        n //= 62
    check(n == 0, "value does not fit in %d base62 digits" % width)
    return "".join(reversed(out))


def secret_checksum(text):
    """6-char base62 CRC32 of every character before the checksum."""
    return base62_fixed(zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF)


def make_secret(id_body, random_part, env="live", prefix="kl"):
    head = "%s_%s_%s%s" % (prefix, env, id_body, random_part)
    return head + secret_checksum(head)


def check_secret(secret, key_id=None, env="live", prefix="kl"):
    """Exact secret format: prefix_env_<id body><>=32 base62><6 base62 crc>."""
    check(isinstance(secret, str), "secret is not a string: %r" % (secret,))
    m = SECRET_RE.match(secret)
    check(m is not None, "secret %r does not match "
          "<prefix>_<env>_<26 base32><>=32 base62><6 base62>" % secret)
    eq(m.group(1), prefix, "secret product prefix")
    eq(m.group(2), env, "secret environment")
    if key_id is not None:
        eq(m.group(3), key_id[len("key_"):], "secret's key id body")
    eq(m.group(5), secret_checksum(secret[:-6]), "secret checksum (base62 "
       "CRC32 of %r)" % secret[:-6])
    return m


def parse_time(s, what="time"):
    check(isinstance(s, str) and TIME_RE.match(s) is not None,
          "%s %r is not RFC 3339 UTC with milliseconds and Z" % (what, s))
    dt = datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.replace(tzinfo=datetime.timezone.utc).timestamp()


def fmt_time(epoch):
    dt = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + ".%03dZ" % (dt.microsecond // 1000)


def near(actual_epoch, expected_epoch, tolerance, what):
    check(abs(actual_epoch - expected_epoch) <= tolerance,
          "%s is %s, expected within %ss of %s" % (
              what, fmt_time(actual_epoch), tolerance, fmt_time(expected_epoch)))


# --------------------------------------------------------------------------
# Resource registry: everything started or created is undone after each test.

_reg_lock = threading.Lock()
_daemons = []
_tmpdirs = []
_mounts = []


def tempdir(tag="kl-e2e-"):
    d = tempfile.mkdtemp(prefix=tag)
    with _reg_lock:
        _tmpdirs.append(d)
    return d


def register_mount(path):
    with _reg_lock:
        _mounts.append(path)


def cleanup_all():
    with _reg_lock:
        daemons = list(_daemons)
        del _daemons[:]
        mounts = list(_mounts)
        del _mounts[:]
        dirs = list(_tmpdirs)
        del _tmpdirs[:]
    for d in daemons:
        try:
            d.kill9()
        except Exception:
            pass
    for m in reversed(mounts):
        subprocess.run(["umount", "-l", m], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def remove_tree(path):
    """Remove a temp tree early (long loops); also forgotten by cleanup."""
    shutil.rmtree(path, ignore_errors=True)
    with _reg_lock:
        if path in _tmpdirs:
            _tmpdirs.remove(path)


# --------------------------------------------------------------------------
# The `keyledger` tool

class ToolResult(object):
    def __init__(self, args, rc, stdout, stderr):
        self.args, self.rc, self.stdout, self.stderr = args, rc, stdout, stderr

    def describe(self):
        return "`keyledger %s` exit %s; stdout=%s; stderr=%s" % (
            " ".join(self.args), self.rc, _short(self.stdout.strip(), 300),
            _short(self.stderr.strip(), 300))

    def json(self):
        try:
            v = json.loads(self.stdout)
        except ValueError as e:
            fail("stdout is not one JSON document (%s): %s" % (e, self.describe()))
        return v


def run_tool(*args, timeout=60):
    args = [str(a) for a in args]
    try:
        p = subprocess.run([tool_path()] + args, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        fail("`keyledger %s` did not finish within %ss" % (" ".join(args), timeout))
    return ToolResult(args, p.returncode, p.stdout.decode("utf-8", "replace"),
                      p.stderr.decode("utf-8", "replace"))


INIT_FIELDS = {"org_id", "user_id", "key_id", "key"}


def check_init_output(res):
    check(res.rc == 0, "expected exit 0: " + res.describe())
    out = res.json()
    check(isinstance(out, dict), "expected one JSON object: " + res.describe())
    eq(set(out), INIT_FIELDS, "fields printed by --json")
    check(is_id(out["org_id"], "org"), "org_id %r" % out["org_id"])
    check(is_id(out["user_id"], "usr"), "user_id %r" % out["user_id"])
    check(is_id(out["key_id"], "key"), "key_id %r" % out["key_id"])
    check_secret(out["key"], key_id=out["key_id"], env="live")
    return out


def init(data, org="Acme Corp", email="owner@example.com", name=None):
    args = ["init", "--data", data, "--org", org, "--owner-email", email]
    if name is not None:
        args += ["--owner-name", name]
    return check_init_output(run_tool(*(args + ["--json"])))


def org_create(data, org="Other Org", email="owner2@example.net", name=None):
    args = ["org-create", "--data", data, "--org", org, "--owner-email", email]
    if name is not None:
        args += ["--owner-name", name]
    return check_init_output(run_tool(*(args + ["--json"])))


VERIFY_FIELDS = {"events", "head_seq", "head_hash", "ok"}


def verify_ok(data):
    """Runs `keyledger verify` and insists it reports an intact log."""
    res = run_tool("verify", "--data", data)
    check(res.rc == 0, "verify should pass: " + res.describe())
    out = res.json()
    check(isinstance(out, dict), "verify output: " + res.describe())
    eq(set(out), VERIFY_FIELDS, "verify summary fields")
    check(out["ok"] is True, "verify ok should be true: " + res.describe())
    for f in ("events", "head_seq"):
        check(isinstance(out[f], int) and not isinstance(out[f], bool)
              and out[f] >= 1, "verify %s: %r" % (f, out[f]))
    check(isinstance(out["head_hash"], str) and out["head_hash"],
          "verify head_hash: %r" % (out["head_hash"],))
    return out


# --------------------------------------------------------------------------
# The daemon

LISTEN_RE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_counter = [0]


def _next_n():
    with _reg_lock:
        _counter[0] += 1
        return _counter[0]


class DaemonStartError(Failure):
    pass


class Daemon(object):
    """One keyledgerd process. stderr/stdout (and the --config file) go to
    files beside the data dir, or in log_dir."""

    def __init__(self, data, fsync=None, allow_query_key=False, config=None,
                 listen="127.0.0.1:0", extra_args=(), log_dir=None, env=None):
        self.data = data
        self.env = env
        self.n = _next_n()
        base = log_dir or os.path.dirname(os.path.abspath(data.rstrip("/")))
        self.stderr_path = os.path.join(base, "daemon-%d.stderr" % self.n)
        self.stdout_path = os.path.join(base, "daemon-%d.stdout" % self.n)
        self.args = [daemon_path(), "--data", data, "--listen", listen]
        if fsync is not None:
            self.args += ["--fsync", fsync]
        if allow_query_key:
            self.args += ["--allow-query-key"]
        if config is not None:
            cfg_path = os.path.join(base, "config-%d.json" % self.n)
            with open(cfg_path, "w") as f:
                json.dump(config, f)
            self.args += ["--config", cfg_path]
        self.args += list(extra_args)
        self.proc = None
        self.port = None
        self.rc = None

    # -- lifecycle
    def spawn(self):
        out = open(self.stdout_path, "wb")
        err = open(self.stderr_path, "wb")
        try:
            environ = None
            if self.env:
                environ = dict(os.environ)
                environ.update(self.env)
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, env=environ,
                                         start_new_session=True)
        finally:
            out.close()
            err.close()
        with _reg_lock:
            _daemons.append(self)
        return self

    def start(self, timeout=15.0, wait_ready=True):
        self.spawn()
        deadline = time.time() + timeout
        while True:
            m = LISTEN_RE.search(self.stderr_text())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                self._forget()
                raise DaemonStartError(
                    "keyledgerd exited with status %s before listening; "
                    "stderr: %s" % (self.proc.returncode,
                                    _short(self.stderr_text().strip(), 1500)))
            if time.time() > deadline:
                raise DaemonStartError(
                    "keyledgerd printed no 'listening on 127.0.0.1:PORT' "
                    "within %ss; stderr: %s" % (
                        timeout, _short(self.stderr_text().strip(), 1500)))
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready(max(1.0, deadline - time.time()))
        return self

    def wait_ready(self, timeout=15.0):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise DaemonStartError(
                    "keyledgerd exited with status %s while waiting for "
                    "/readyz; stderr: %s" % (self.proc.returncode, _short(
                        self.stderr_text().strip(), 1500)))
            try:
                r = Client(self.port, None, validate=False).get("/readyz")
                last = r.status
                if r.status == 200:
                    return
            except (OSError, http.client.HTTPException) as e:
                last = repr(e)
            time.sleep(0.02)
        raise DaemonStartError("/readyz not 200 within %ss (last: %s)" % (
            timeout, last))

    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout):
        try:
            self.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._forget()
        return self.rc

    def stop(self, timeout=15.0, expect_rc=0):
        """SIGTERM; by default insists on exit status 0."""
        if not self.alive():
            rc = self.proc.returncode if self.proc else None
            fail("daemon was not running when asked to stop (exit %s); "
                 "stderr: %s" % (rc, _short(self.stderr_text().strip(), 1000)))
        self.proc.send_signal(signal.SIGTERM)
        rc = self.wait_exit(timeout)
        if rc is None:
            self.kill9()
            fail("keyledgerd did not exit within %ss of SIGTERM" % timeout)
        if expect_rc is not None and rc != expect_rc:
            fail("keyledgerd exited %s after SIGTERM, expected %s; stderr: %s"
                 % (rc, expect_rc, _short(self.stderr_text().strip(), 1000)))
        return rc

    def kill9(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._forget()

    def _forget(self):
        with _reg_lock:
            if self in _daemons:
                _daemons.remove(self)

    def client(self, key=None):
        return Client(self.port, key)


def start_daemon(data, **kw):
    return Daemon(data, **kw).start()


def daemon_must_refuse(data, timeout=15.0, **kw):
    """Starts a daemon that must exit by itself; returns (rc, stderr)."""
    d = Daemon(data, **kw).spawn()
    rc = d.wait_exit(timeout)
    if rc is None:
        m = LISTEN_RE.search(d.stderr_text())
        d.kill9()
        fail("keyledgerd should have refused to start but was still running "
             "after %ss%s; stderr: %s" % (
                 timeout, " (it was listening)" if m else "",
                 _short(d.stderr_text().strip(), 1000)))
    return rc, d.stderr_text()


class Env(object):
    """A fresh data dir made by `keyledger init`, usually with a daemon."""

    def __init__(self, start=True, org="Acme Corp", email="owner@example.com",
                 **daemon_kw):
        self.root = tempdir()
        self.data = os.path.join(self.root, "data")
        self.info = init(self.data, org=org, email=email)
        self.key = self.info["key"]
        self.daemon_kw = daemon_kw
        self.daemon = None
        if start:
            self.start()

    def start(self, **kw):
        args = dict(self.daemon_kw)
        args.update(kw)
        self.daemon = start_daemon(self.data, **args)
        return self.daemon

    def stop(self):
        self.daemon.stop()

    def restart(self, **kw):
        self.stop()
        return self.start(**kw)

    @property
    def port(self):
        return self.daemon.port

    def client(self, key="owner"):
        if key == "owner":
            key = self.key
        return Client(self.daemon.port, key)


# --------------------------------------------------------------------------
# HTTP client

_DEFAULT = object()
ANY = object()
ABSENT = object()

ERROR_CODES = {
    400: {"invalid_argument", "malformed_json"},
    401: {"unauthenticated"},
    403: {"permission_denied"},
    404: {"not_found"},
    405: {"method_not_allowed"},
    409: {"conflict"},
    412: {"precondition_failed"},
    413: {"payload_too_large"},
    415: {"unsupported_media_type"},
    422: {"idempotency_mismatch"},
    429: {"rate_limited"},
    503: {"unavailable"},
}


class Response(object):
    def __init__(self, method, path, status, headers, body):
        self.method, self.path = method, path
        self.status = status
        self.headers = headers          # list of (name, value)
        self.body = body
        self._json = _DEFAULT

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def json(self):
        if self._json is _DEFAULT:
            try:
                self._json = json.loads(self.body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                fail("response body is not JSON (%s): %s" % (e, self.describe()))
        return self._json

    def describe(self):
        return "%s %s -> %s %s" % (self.method, _short(self.path, 120),
                                   self.status,
                                   _short(self.body.decode("utf-8", "replace"),
                                          500))


def check_request_id(resp):
    rid = resp.header("X-Request-Id")
    check(rid is not None, "no X-Request-Id header: " + resp.describe())
    check(REQ_ID_RE.match(rid) is not None,
          "X-Request-Id %r is not req_ + 26 lowercase Crockford base32: %s"
          % (rid, resp.describe()))
    return rid


def check_error_shape(resp):
    """{"error":{"code","message","field"?,"request_id"}}, request_id == header."""
    rid = check_request_id(resp)
    body = resp.json
    check(isinstance(body, dict) and set(body) == {"error"},
          "error body must be exactly {\"error\": {...}}: " + resp.describe())
    e = body["error"]
    check(isinstance(e, dict), "error is not an object: " + resp.describe())
    extra = set(e) - {"code", "message", "field", "request_id"}
    check(not extra, "unexpected error members %s: %s" % (sorted(extra),
                                                          resp.describe()))
    for f in ("code", "message", "request_id"):
        check(isinstance(e.get(f), str) and e.get(f),
              "error.%s missing or empty: %s" % (f, resp.describe()))
    if "field" in e:
        check(isinstance(e["field"], str) and e["field"],
              "error.field must be a non-empty string: " + resp.describe())
    eq(e["request_id"], rid, "error.request_id vs X-Request-Id header")
    if resp.status in ERROR_CODES:
        check(e["code"] in ERROR_CODES[resp.status],
              "code %r does not go with status %s: %s" % (
                  e["code"], resp.status, resp.describe()))
    if resp.status == 401:
        www = resp.header("WWW-Authenticate") or ""
        check(www.strip().lower().startswith("bearer"),
              "401 without WWW-Authenticate: Bearer: " + resp.describe())
    if resp.status == 405:
        check(resp.header("Allow") is not None,
              "405 without Allow header: " + resp.describe())
    if resp.status == 429:
        check(resp.header("Retry-After") is not None,
              "429 without Retry-After: " + resp.describe())
    return e


def validate_response(resp):
    """Invariants of every response (contract section 2)."""
    check_request_id(resp)
    if resp.status >= 400:
        check_error_shape(resp)
    elif resp.path.startswith("/v1") and resp.body and resp.status != 204:
        ct = resp.header("Content-Type") or ""
        check(ct.split(";")[0].strip().lower() == "application/json",
              "JSON response without Content-Type application/json (%r): %s"
              % (ct, resp.describe()))
    if resp.status == 204:
        eq(resp.body, b"", "204 response body")


class Client(object):
    """Keep-alive HTTP/1.1 client for one daemon; `key` is the default bearer."""

    def __init__(self, port, key=None, timeout=10.0, validate=True):
        self.port = port
        self.key = key
        self.timeout = timeout
        self.validate = validate
        self.conn = None
        self.used = False

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _conn(self):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                   timeout=self.timeout)
            self.used = False
        return self.conn

    def request(self, method, path, body=None, headers=None, key=_DEFAULT,
                content_type=_DEFAULT, query=None, validate=None):
        """body: dict/list/other JSON value -> JSON; str/bytes -> sent as is.
        key: None sends no Authorization. content_type: None sends none."""
        if query:
            path = path + ("&" if "?" in path else "?") + \
                urllib.parse.urlencode(query)
        hdrs = {}
        k = self.key if key is _DEFAULT else key
        if k is not None:
            hdrs["Authorization"] = "Bearer " + k
        data = None
        if body is not None:
            if isinstance(body, bytes):
                data = body
            elif isinstance(body, str):
                data = body.encode("utf-8")
            else:
                data = json.dumps(body).encode("utf-8")
            ct = "application/json" if content_type is _DEFAULT else content_type
            if ct is not None:
                hdrs["Content-Type"] = ct
        elif content_type not in (_DEFAULT, None):
            hdrs["Content-Type"] = content_type
        if headers:
            hdrs.update(headers)
        for attempt in (0, 1):
            conn = self._conn()
            reused = self.used
            try:
                conn.request(method, path, body=data, headers=hdrs)
                r = conn.getresponse()
                payload = r.read()
                self.used = True
                resp = Response(method, path, r.status, r.getheaders(), payload)
                if r.will_close:
                    self.close()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError, http.client.BadStatusLine) as e:
                self.close()
                # A keep-alive connection the server had already closed: the
                # request never reached it, so send it once more on a new one.
                if reused and attempt == 0:
                    continue
                raise
            except Exception:
                self.close()
                raise
        if self.validate if validate is None else validate:
            validate_response(resp)
        return resp

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def patch(self, path, body=None, **kw):
        return self.request("PATCH", path, body, **kw)

    def put(self, path, body=None, **kw):
        return self.request("PUT", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)


def expect(resp, status):
    if resp.status != status:
        fail("expected HTTP %s: %s" % (status, resp.describe()))
    return resp


def expect_error(resp, status, code, field=ANY, message_contains=None):
    """Exact status and code; field: ANY, ABSENT, a string, a set/tuple of
    acceptable strings, or a predicate on the field (None when absent)."""
    if resp.status != status:
        fail("expected HTTP %s %s: %s" % (status, code, resp.describe()))
    e = check_error_shape(resp)
    codes = code if isinstance(code, (set, tuple, list)) else (code,)
    check(e["code"] in codes, "expected error code %s: %s" % (
        "/".join(codes), resp.describe()))
    if field is ABSENT:
        check("field" not in e, "unexpected error.field: " + resp.describe())
    elif callable(field):
        check(field(e.get("field")), "unexpected error.field %r: %s" % (
            e.get("field"), resp.describe()))
    elif field is not ANY:
        fields = field if isinstance(field, (set, tuple, list)) else (field,)
        check(e.get("field") in fields, "expected error.field %s: %s" % (
            "/".join(fields), resp.describe()))
    if message_contains is not None:
        check(message_contains.lower() in e["message"].lower(),
              "error.message should contain %r: %s" % (message_contains,
                                                       resp.describe()))
    return e


# --------------------------------------------------------------------------
# Raw sockets, for what http.client will not send

class RawResponse(object):
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body
        self.method, self.path = "RAW", "(raw)"
        self._json = _DEFAULT

    header = Response.header
    json = Response.json
    describe = Response.describe


class RawConn(object):
    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.closed_by_peer = False

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, deadline):
        remaining = deadline - time.time()
        if remaining <= 0:
            raise socket.timeout("timed out waiting for the response")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed_by_peer = True
            return False
        self.buf += chunk
        return True

    def read_response(self, timeout=10.0, head_request=False):
        """Reads one HTTP response (Content-Length, chunked or close)."""
        try:
            return self._read_response(timeout, head_request)
        except (socket.timeout, TimeoutError):
            fail("no complete HTTP response within %ss (received so far: %r)"
                 % (timeout, self.buf[:300]))

    def _read_response(self, timeout, head_request):
        deadline = time.time() + timeout
        while b"\r\n\r\n" not in self.buf:
            if not self._fill(deadline):
                fail("connection closed before a full response header; got %r"
                     % self.buf[:300])
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        check(len(parts) >= 2 and parts[0].startswith("HTTP/1."),
              "bad status line %r" % lines[0])
        status = int(parts[1])
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
        resp = RawResponse(status, headers, b"")
        te = (resp.header("Transfer-Encoding") or "").lower()
        cl = resp.header("Content-Length")
        if head_request or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "chunked" in te:
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    if not self._fill(deadline):
                        fail("connection closed inside a chunked body")
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    if not self._fill(deadline):
                        fail("connection closed inside a chunk")
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    break
        elif cl is not None:
            n = int(cl)
            while len(self.buf) < n:
                if not self._fill(deadline):
                    fail("connection closed after %d of %d body bytes" % (
                        len(self.buf), n))
            body, self.buf = self.buf[:n], self.buf[n:]
        else:
            while self._fill(deadline):
                pass
            body, self.buf = self.buf, b""
        resp.body = body
        return resp

    def wait_closed(self, timeout):
        """True once the peer closes (EOF/reset) within timeout; data that
        arrives meanwhile is kept in self.buf."""
        deadline = time.time() + timeout
        while True:
            try:
                if not self._fill(deadline):
                    return True
            except (socket.timeout, TimeoutError):
                return False
            except OSError:
                return True

    def is_open_now(self):
        """Non-blocking probe: False if the peer has closed the connection."""
        r, _, _ = select.select([self.sock], [], [], 0)
        if not r:
            return True
        try:
            self.sock.settimeout(0.05)
            chunk = self.sock.recv(65536, socket.MSG_PEEK)
        except (socket.timeout, TimeoutError, BlockingIOError):
            return True
        except OSError:
            return False
        return bool(chunk)


def raw_request(method, path, headers=None, body=b"", key=None, host="127.0.0.1"):
    """Bytes of one HTTP/1.1 request with Content-Length when body given."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % host]
    if key is not None:
        lines.append("Authorization: Bearer %s" % key)
    for k, v in (headers or []):
        lines.append("%s: %s" % (k, v))
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------
# Key objects (contract section 4, "API keys")

KEY_REQUIRED = {"id", "org_id", "name", "prefix", "environment", "owner",
                "created_by", "permissions", "created_at", "updated_at",
                "is_active", "status", "version"}
# `description` is listed without `?` but section 2 says fields without a
# value are omitted: a key created without a description may leave it out.
KEY_OPTIONAL = {"description", "rate_limit", "last_used_at", "expires_at",
                "revoked_at", "revoked_by", "revoked_comment"}
PRINCIPAL_RE = re.compile(r"^(usr|sa)_" + ID_BODY + r"$")


def check_key(obj, with_secret=False, env=None):
    """Validates one key object exactly as the contract lists its fields."""
    check(isinstance(obj, dict), "key object is not an object: %r" % (obj,))
    allowed = KEY_REQUIRED | KEY_OPTIONAL | ({"key"} if with_secret else set())
    missing = KEY_REQUIRED - set(obj)
    check(not missing, "key object lacks %s: %s" % (sorted(missing), _short(obj)))
    extra = set(obj) - allowed
    check(not extra, "key object has fields the contract does not list %s "
          "(secret/hash must never appear): %s" % (sorted(extra), _short(obj)))
    if with_secret:
        check("key" in obj, "response lacks `key` (the secret): %s" % _short(obj))
    check(is_id(obj["id"], "key"), "key id %r" % obj["id"])
    check(is_id(obj["org_id"], "org"), "org_id %r" % obj["org_id"])
    check(isinstance(obj["name"], str) and 1 <= len(obj["name"]) <= 128,
          "name %r" % obj["name"])
    if "description" in obj:
        check(isinstance(obj["description"], str) and
              len(obj["description"]) <= 1024, "description %r" % obj["description"])
    check(obj["environment"] in ("live", "test"),
          "environment %r" % obj["environment"])
    if env is not None:
        eq(obj["environment"], env, "environment")
    o = obj["owner"]
    check(isinstance(o, dict) and set(o) == {"type", "id"},
          "owner must be {type, id}: %r" % (o,))
    check(o["type"] in ("user", "service_account"), "owner.type %r" % o["type"])
    check(is_id(o["id"], "usr" if o["type"] == "user" else "sa"),
          "owner.id %r" % o["id"])
    # created_by is a principal id (as revoked_by is in the seed documents);
    # "system" is tolerated for the key `keyledger init` makes.
    check(isinstance(obj["created_by"], str) and
          (PRINCIPAL_RE.match(obj["created_by"]) is not None or
           obj["created_by"] == "system"),
          "created_by %r is not a usr_/sa_ id" % (obj["created_by"],))
    p = obj["permissions"]
    check(isinstance(p, dict) and "access" in p and set(p) <= {"access", "flows"},
          "permissions %r" % (p,))
    check(p["access"] in ("full", "read_only", "flows"), "access %r" % p["access"])
    if p["access"] == "flows":
        check(isinstance(p.get("flows"), list) and p["flows"] and
              all(isinstance(x, str) for x in p["flows"]),
              "flows permissions need a non-empty flows list: %r" % (p,))
    else:
        check("flows" not in p, "flows present without access=flows: %r" % (p,))
    if "rate_limit" in obj:
        rl = obj["rate_limit"]
        check(isinstance(rl, dict) and rl and
              set(rl) <= {"requests_per_minute", "requests_per_day"},
              "rate_limit %r" % (rl,))
    for f in ("created_at", "updated_at", "last_used_at", "expires_at",
              "revoked_at"):
        if f in obj:
            parse_time(obj[f], f)
    check(parse_time(obj["updated_at"]) >= parse_time(obj["created_at"]),
          "updated_at before created_at: %s" % _short(obj))
    check(isinstance(obj["is_active"], bool), "is_active %r" % obj["is_active"])
    check(obj["status"] in ("active", "expired", "revoked"),
          "status %r" % obj["status"])
    eq(obj["is_active"], obj["status"] == "active", "is_active vs status %r"
       % obj["status"])
    revoked = obj["status"] == "revoked"
    for f in ("revoked_at", "revoked_by"):
        eq(f in obj, revoked, "presence of %s for status %s" % (f, obj["status"]))
    if not revoked:
        check("revoked_comment" not in obj, "revoked_comment on a key that is "
              "not revoked: %s" % _short(obj))
    else:
        check(PRINCIPAL_RE.match(obj["revoked_by"]) is not None,
              "revoked_by %r" % obj["revoked_by"])
    if obj["status"] == "expired":
        check("expires_at" in obj, "expired key without expires_at")
    check(isinstance(obj["version"], int) and not isinstance(obj["version"], bool)
          and obj["version"] >= 1, "version %r" % (obj["version"],))
    check(isinstance(obj["prefix"], str) and len(obj["prefix"]) == 19 and
          obj["prefix"].endswith("..."), "prefix %r is not 16 chars + '...'"
          % obj["prefix"])
    if with_secret:
        check_secret(obj["key"], key_id=obj["id"], env=obj["environment"])
        eq(obj["prefix"], obj["key"][:16] + "...", "prefix (first 16 chars of "
           "the secret + '...')")
    return obj


def create_key(client, name="k", status=201, **fields):
    """POST /v1/api-keys; returns (key object, secret)."""
    body = {"name": name}
    body.update(fields)
    r = client.post("/v1/api-keys", body)
    expect(r, status)
    obj = check_key(r.json, with_secret=True)
    eq(obj["name"], name, "name")
    return obj, obj["key"]


def list_all(client, include_revoked=True, limit=500, extra=None, key=_DEFAULT):
    """Follows next_cursor; returns every key object in order."""
    out = []
    cursor = None
    for _ in range(1000):
        q = {"limit": str(limit)}
        if include_revoked:
            q["include_revoked"] = "true"
        if cursor is not None:
            q["cursor"] = cursor
        if extra:
            q.update(extra)
        r = expect(client.get("/v1/api-keys", query=q, key=key), 200)
        body = r.json
        check(isinstance(body, dict) and set(body) == {"api_keys", "next_cursor"},
              "list must be exactly {api_keys, next_cursor}: " + r.describe())
        check(isinstance(body["api_keys"], list), "api_keys is not a list")
        out.extend(body["api_keys"])
        cursor = body["next_cursor"]
        if cursor is None:
            return out
        check(isinstance(cursor, str) and cursor, "next_cursor %r" % (cursor,))
    fail("list pagination did not end")


def key_snapshot(client):
    """Every key (revoked included) by id, minus last_used_at, which moves
    whenever a key is used."""
    snap = {}
    for k in list_all(client):
        k = dict(k)
        k.pop("last_used_at", None)
        check(k["id"] not in snap, "key %s listed twice" % k["id"])
        snap[k["id"]] = k
    return snap


def assert_unchanged(client, before, what="a rejected write"):
    after = key_snapshot(client)
    if after != before:
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(i for i in set(after) & set(before)
                         if after[i] != before[i])
        fail("%s changed state: added %s, removed %s, changed %s" % (
            what, added, removed,
            [(i, _short(before[i], 200), _short(after[i], 200))
             for i in changed[:2]]))


def me(client, key=_DEFAULT):
    return expect(client.get("/v1/me", key=key), 200).json


def wait_until(pred, timeout, interval=0.05, what="condition"):
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > deadline:
            fail("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


# --------------------------------------------------------------------------
# The log on disk (for crash and corruption tests)
#
# Segment NNNNNNNNNNNNNNNNNNNN.log (20 digits, first seq). 64-byte header:
#   0  magic "KLEDGERL"        8  u32 LE version (1)   12 u32 LE header size (64)
#   16 u64 LE first seq        24 32 bytes chain hash carried in
#   56 u32 LE reserved (0)     60 u32 LE CRC-32C of bytes 0..59
# then records: u32 LE payload length | u32 LE CRC-32C(payload) | payload.

SEGMENT_RE = re.compile(r"^(\d{20})\.log$")
HEADER_SIZE = 64
MAGIC = b"KLEDGERL"

_CRC32C_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    tbl = _CRC32C_TABLE
    for b in data:
        crc = tbl[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def segment_names(data):
    return sorted(n for n in os.listdir(data) if SEGMENT_RE.match(n))


class Record(object):
    def __init__(self, offset, length, crc, payload):
        self.offset, self.length, self.crc, self.payload = (offset, length,
                                                            crc, payload)

    @property
    def end(self):
        return self.offset + 8 + self.length


class Segment(object):
    pass


def parse_segment(path):
    """Parses header and records; stops at the first record that does not
    fit or fails its CRC (seg.trailing = bytes left after the last good one)."""
    with open(path, "rb") as f:
        raw = f.read()
    seg = Segment()
    seg.path, seg.name, seg.size = path, os.path.basename(path), len(raw)
    check(len(raw) >= HEADER_SIZE, "%s: shorter than a segment header" % seg.name)
    h = raw[:HEADER_SIZE]
    seg.magic = h[:8]
    seg.version, seg.header_size = struct.unpack_from("<II", h, 8)
    seg.first_seq, = struct.unpack_from("<Q", h, 16)
    seg.chain_in = h[24:56]
    seg.reserved, seg.header_crc = struct.unpack_from("<II", h, 56)
    seg.header_crc_ok = crc32c(h[:60]) == seg.header_crc
    seg.records = []
    off = HEADER_SIZE
    while off + 8 <= len(raw):
        length, crc = struct.unpack_from("<II", raw, off)
        if off + 8 + length > len(raw):
            break
        payload = raw[off + 8: off + 8 + length]
        if crc32c(payload) != crc:
            break
        seg.records.append(Record(off, length, crc, payload))
        off += 8 + length
    seg.good_end = off
    seg.trailing = len(raw) - off
    return seg


def check_segment_header(seg):
    eq(seg.magic, MAGIC, "%s magic" % seg.name)
    eq(seg.version, 2, "%s format version" % seg.name)
    eq(seg.header_size, HEADER_SIZE, "%s header size" % seg.name)
    eq(seg.reserved, 0, "%s reserved word" % seg.name)
    check(seg.header_crc_ok, "%s header CRC-32C does not match" % seg.name)
    eq(seg.first_seq, int(SEGMENT_RE.match(seg.name).group(1)),
       "%s first seq in header vs file name" % seg.name)


def parse_log(data):
    """All segments, in order, each checked for header and full framing."""
    names = segment_names(data)
    check(names, "no segment files in %s: %s" % (data, sorted(os.listdir(data))))
    segs = [parse_segment(os.path.join(data, n)) for n in names]
    for s in segs:
        check_segment_header(s)
        eq(s.trailing, 0, "%s: bytes after the last valid record" % s.name)
    return segs


def copy_data(src, tag="kl-e2e-copy-"):
    root = tempdir(tag)
    dst = os.path.join(root, "data")
    shutil.copytree(src, dst)
    return root, dst


def flip_byte(path, offset, mask=0xFF):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        check(len(b) == 1, "offset %d past the end of %s" % (offset, path))
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def numbers_in(text):
    """Every decimal and 0x-hex number mentioned in text, as ints."""
    nums = set()
    for m in re.finditer(r"0x([0-9a-fA-F]+)|(\d+)", text):
        nums.add(int(m.group(1), 16) if m.group(1) else int(m.group(2)))
    return nums


def files_containing(root, needle):
    """Paths under root whose bytes contain needle (for 'never on disk')."""
    if isinstance(needle, str):
        needle = needle.encode("utf-8")
    hits = []
    for dirpath, _, files in os.walk(root):
        for fn in files:
            path = os.path.join(dirpath, fn)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        hits.append(path)
            except OSError:
                pass
    return hits


def run_daemon_args(args, timeout=5.0):
    """Runs keyledgerd with exactly these arguments; returns (rc, stderr), rc
    None when it was still running after timeout (then it is killed)."""
    root = tempdir()
    err_path = os.path.join(root, "stderr")
    with open(err_path, "wb") as err:
        p = subprocess.Popen([daemon_path()] + list(args), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=err,
                             start_new_session=True)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        rc = None
    with open(err_path, "rb") as f:
        return rc, f.read().decode("utf-8", "replace")


# --------------------------------------------------------------------------
# Runner

def collect(namespace, prefix=""):
    return [(prefix + name, fn) for name, fn in list(namespace.items())
            if name.startswith("test_") and callable(fn)]


def run_tests(tests, argv=None):
    """Runs (name, fn) pairs; prints one line per test and the summary.
    argv: optional substrings; only tests whose name contains one run."""
    argv = [a for a in (argv or []) if not a.startswith("-")]
    if argv:
        tests = [(n, f) for n, f in tests if any(a in n for a in argv)]
    problem = binaries_problem()
    if problem:
        print("cannot run the end-to-end tests: %s" % problem, flush=True)
    passed = failed = skipped = 0
    for name, fn in tests:
        if problem:
            print("FAIL %s: keyledgerd/keyledger not built (see the message "
                  "above)" % name, flush=True)
            failed += 1
            continue
        t0 = time.time()
        try:
            fn()
        except Skip as e:
            skipped += 1
            print("SKIP %s: %s" % (name, _oneline(e)), flush=True)
        except KeyboardInterrupt:
            cleanup_all()
            raise
        except BaseException as e:
            failed += 1
            reason = _oneline(e) if isinstance(e, Failure) else "%s: %s" % (
                type(e).__name__, _oneline(e))
            print("FAIL %s: %s" % (name, reason), flush=True)
            tb = traceback.extract_tb(e.__traceback__)
            where = [fr for fr in tb if os.path.basename(fr.filename) !=
                     "harness.py"] or tb
            if where:
                fr = where[-1]
                sys.stderr.write("  at %s:%d in %s\n" % (
                    os.path.basename(fr.filename), fr.lineno, fr.name))
            with _reg_lock:
                ds = list(_daemons)
            for d in ds:
                sys.stderr.write("  daemon stderr (tail): %s\n" % _short(
                    d.stderr_text()[-1500:].strip(), 1500))
        else:
            passed += 1
            print("PASS %s" % name, flush=True)
        finally:
            cleanup_all()
            if os.environ.get("KL_E2E_TIMES"):
                sys.stderr.write("  (%s: %.2fs)\n" % (name, time.time() - t0))
    summary = "%d passed, %d failed" % (passed, failed)
    if skipped:
        summary += ", %d skipped" % skipped
    print(summary, flush=True)
    return 1 if failed else 0


def _oneline(e):
    s = str(e) or type(e).__name__
    return " ".join(s.split())


atexit.register(cleanup_all)


def main(namespace):
    try:
        rc = run_tests(collect(namespace), sys.argv[1:])
    finally:
        cleanup_all()
    sys.exit(rc)
