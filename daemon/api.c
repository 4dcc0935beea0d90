/*
 * What every handler shares: authentication and authorization (API.md §3),
 * request bodies, If-Match, Idempotency-Key, pagination and answers.
 */
#include "daemon.h"

#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

enum { IDEM_TTL_MS = 24 * 3600 * 1000, IDEM_KEY_MAX = 255 };

static const char BAD_KEY[] = "invalid, expired or revoked API key";

/* ---- answers ---------------------------------------------------------- */

void kl_api_json(kl_http_request *req, int status, json_t *body,
                 const char *headers)
{
    /* json_dumpb, not json_dumps: the text is ours to free with free()
     * (jansson's own allocations may live in verify.c's arena). */
    char stackbuf[4096];
    size_t n = json_dumpb(body, stackbuf, sizeof stackbuf, JSON_COMPACT);
    if (n <= sizeof stackbuf) {
        kl_http_respond_json(req, status, headers, stackbuf, n);
    } else {
        char *big = malloc(n);
        if (big != NULL && json_dumpb(body, big, n, JSON_COMPACT) == n)
            kl_http_respond_json(req, status, headers, big, n);
        else
            kl_http_respond_error(req, 500, "internal", "out of memory", NULL, NULL);
        free(big);
    }
    json_decref(body);
}

void kl_api_error(kl_http_request *req, int status, const char *code,
                  const char *message, const char *field)
{
    const char *headers = status == 401 ? "WWW-Authenticate: Bearer\r\n" : NULL;
    kl_http_respond_error(req, status, code, message, field, headers);
}

static void bad_arg(kl_http_request *req, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void bad_arg(kl_http_request *req, const char *field, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    kl_api_error(req, 400, "invalid_argument", msg, field);
}

/* ---- authentication --------------------------------------------------- */

/* The credential: "Authorization: Bearer <key>", or ?api_key= when allowed.
 * Returns 0 with the token in buf, or answers 401 and returns -1. */
static int credential(kl_daemon *d, kl_http_request *req, char *buf, size_t len)
{
    kl_http_slice h;
    if (kl_http_header(req, "authorization", &h)) {
        if (h.len < 7 || strncasecmp(h.ptr, "Bearer ", 7) != 0) {
            kl_api_error(req, 401, "unauthenticated",
                         "the Authorization header must be \"Bearer <key>\"", NULL);
            return -1;
        }
        size_t n = h.len - 7;
        const char *p = h.ptr + 7;
        while (n > 0 && *p == ' ') {
            p++;
            n--;
        }
        if (n == 0 || n >= len) {
            kl_api_error(req, 401, "unauthenticated", BAD_KEY, NULL);
            return -1;
        }
        memcpy(buf, p, n);
        buf[n] = '\0';
        return 0;
    }
    int q = kl_http_query(req, "api_key", buf, len);
    if (q != 0 && !d->cfg.allow_query_key) {
        kl_api_error(req, 401, "unauthenticated",
                     "API keys in the query string are not accepted; send the key "
                     "in the Authorization header: \"Authorization: Bearer <key>\"",
                     NULL);
        return -1;
    }
    if (q < 0) {
        kl_api_error(req, 401, "unauthenticated", BAD_KEY, NULL);
        return -1;
    }
    if (q == 0) {
        kl_api_error(req, 401, "unauthenticated",
                     "missing API key: send \"Authorization: Bearer <key>\"", NULL);
        return -1;
    }
    return 0;
}

kl_key *kl_api_lookup_secret(kl_daemon *d, const char *secret, size_t len,
                             int64_t now, kl_fail_reason *why)
{
    kl_id id;
    kl_env env;
    if (kl_secret_parse(secret, len, NULL, &id, &env) != KL_OK) {
        *why = KL_FAIL_BAD_CHECKSUM;    /* bad shape or checksum: no lookup */
        return NULL;
    }
    kl_key *k = kl_proj_key(d->proj, &id);
    if (k == NULL || k->env != env) {
        *why = KL_FAIL_UNKNOWN_KEY;
        return NULL;
    }
    uint8_t h[KL_HASH_LEN];
    kl_sha256(secret, len, h);
    bool match = CRYPTO_memcmp(h, k->hash, KL_HASH_LEN) == 0;
    const kl_key_grace *g = kl_key_grace_of(k);
    if (!match && g != NULL && g->until > now)
        match = CRYPTO_memcmp(h, g->old_hash, KL_HASH_LEN) == 0;
    kl_key_status st = kl_key_status_at(k, now);
    if (k->deleted)
        *why = KL_FAIL_DELETED;
    else if (!match)
        *why = KL_FAIL_WRONG_SECRET;
    else if (st == KL_KEY_REVOKED)
        *why = KL_FAIL_REVOKED;
    else if (st == KL_KEY_EXPIRED)
        *why = KL_FAIL_EXPIRED;
    else if (!kl_key_owner_enabled(k))
        *why = KL_FAIL_OWNER_DISABLED;
    else
        *why = KL_FAIL_NONE;
    return k;
}

/* The key a secret belongs to if it may be used now; a refusal is counted
 * with its reason. */
static kl_key *key_for_secret(kl_daemon *d, const char *secret, int64_t now)
{
    kl_fail_reason why;
    kl_key *k = kl_api_lookup_secret(d, secret, strlen(secret), now, &why);
    if (why == KL_FAIL_NONE)
        return k;
    kl_usage_refused(d->usage, k, why, (kl_str){"", 0}, now);
    return NULL;
}

void kl_api_ratelimit_headers(const kl_ratelimit *rl, int64_t now, bool retry,
                              char *out, size_t len)
{
    out[0] = '\0';
    if (rl->limit == 0)
        return;
    static const struct { const char *name; long seconds; } WINDOWS[] = {
        {"minute", 60}, {"org-minute", 60}, {"day", 86400}, {"org-day", 86400},
        {"org-month", 2678400}};
    long w = 60;
    for (size_t i = 0; i < sizeof WINDOWS / sizeof WINDOWS[0]; i++)
        if (strcmp(WINDOWS[i].name, rl->window) == 0)
            w = WINDOWS[i].seconds;
    long t = rl->reset_at > now ? (long)((rl->reset_at - now + 999) / 1000) : 0;
    int n = snprintf(out, len, "RateLimit-Policy: \"%s\";q=%llu;w=%ld\r\n"
                     "RateLimit: \"%s\";r=%llu;t=%ld\r\n", rl->window,
                     (unsigned long long)rl->limit, w, rl->window,
                     (unsigned long long)rl->remaining, t);
    if (retry && n > 0 && (size_t)n < len)
        snprintf(out + n, len - (size_t)n, "Retry-After: %ld\r\n", t > 0 ? t : 1);
}

int kl_api_auth(kl_daemon *d, kl_http_request *req, kl_need need, kl_caller *c)
{
    if (!d->ready) {
        kl_api_error(req, 503, "unavailable", "keyledgerd is replaying its log",
                     NULL);
        return -1;
    }
    char secret[KL_SECRET_MAX + 1];
    if (credential(d, req, secret, sizeof secret) != 0)
        return -1;
    int64_t now = kl_daemon_now(d);
    kl_key *k = key_for_secret(d, secret, now);
    OPENSSL_cleanse(secret, sizeof secret);
    if (k == NULL) {
        kl_api_error(req, 401, "unauthenticated", BAD_KEY, NULL);
        return -1;
    }
    kl_ratelimit rl;
    kl_rl_verdict v = (need & KL_NEED_UNLIMITED) ? KL_RL_OK
                                                 : kl_usage_admit(d->usage, k, 1, now, &rl);
    need &= KL_NEED_LEVEL;
    if (v == KL_RL_OK)
        kl_usage_note(d->usage, k, (kl_str){"", 0}, 1, now);
    else
        kl_usage_refused(d->usage, k, KL_FAIL_NONE, (kl_str){"", 0}, now);
    if (v != KL_RL_OK) {
        char headers[256];
        kl_api_ratelimit_headers(&rl, now, true, headers, sizeof headers);
        kl_http_respond_error(req, 429, "rate_limited",
                              v == KL_RL_RATE ? "rate limit exceeded: slow down"
                                              : "usage quota exceeded",
                              NULL, headers);
        return -1;
    }
    kl_key_touch(k, now);
    c->key = k;
    c->org = kl_key_org(k);
    c->principal = kl_key_owner(k);
    c->role = kl_key_role(k);
    if (need == KL_NEED_ANY)
        return 0;
    if (k->access == KL_ACCESS_FLOWS) {
        kl_api_error(req, 403, "permission_denied",
                     "this key may only be used for its flows", NULL);
        return -1;
    }
    if (c->role != KL_ROLE_OWNER && c->role != KL_ROLE_MANAGER) {
        kl_api_error(req, 403, "permission_denied",
                     "only owners and managers may use the management API", NULL);
        return -1;
    }
    if (need == KL_NEED_WRITE && k->access == KL_ACCESS_READ_ONLY) {
        kl_api_error(req, 403, "permission_denied", "this key is read-only", NULL);
        return -1;
    }
    return 0;
}

/* ---- bodies ----------------------------------------------------------- */

static bool is_json_type(kl_http_slice ct)
{
    static const char want[] = "application/json";
    size_t n = sizeof want - 1;
    if (ct.len < n || strncasecmp(ct.ptr, want, n) != 0)
        return false;
    /* Parameters such as "; charset=utf-8" may follow. */
    return ct.len == n || ct.ptr[n] == ';' || ct.ptr[n] == ' ';
}

int kl_api_body(kl_http_request *req, const char *const *allowed, json_t **out)
{
    *out = NULL;
    if (req->body.len == 0) {
        *out = json_object();
        return 0;
    }
    kl_http_slice ct;
    if (!kl_http_header(req, "content-type", &ct) || !is_json_type(ct)) {
        kl_api_error(req, 415, "unsupported_media_type",
                     "send the body as Content-Type: application/json", NULL);
        return -1;
    }
    json_error_t jerr;
    json_t *j = json_loadb(req->body.ptr, req->body.len, JSON_REJECT_DUPLICATES, &jerr);
    if (j == NULL) {
        char msg[256];
        snprintf(msg, sizeof msg, "malformed JSON at line %d column %d: %s",
                 jerr.line, jerr.column, jerr.text);
        kl_api_error(req, 400, "malformed_json", msg, NULL);
        return -1;
    }
    if (!json_is_object(j)) {
        json_decref(j);
        bad_arg(req, NULL, "the body must be a JSON object");
        return -1;
    }
    const char *name;
    json_t *v;
    json_object_foreach(j, name, v) {
        bool ok = false;
        for (const char *const *a = allowed; *a != NULL && !ok; a++)
            ok = strcmp(*a, name) == 0;
        if (!ok) {
            char field[128];
            snprintf(field, sizeof field, "%s", name);
            json_decref(j);
            bad_arg(req, field, "unknown field %s", field);
            return -1;
        }
    }
    *out = j;
    return 0;
}

/*
 * The fast path for small bodies: a JSON object whose members, each named
 * in `allowed` and each once, are strings of printable ASCII without
 * escapes or unsigned integers of at most 9 digits: what clients send.
 * Anything else returns false and the caller takes kl_api_body, which
 * decides (and answers every error) as it always did: this path accepts
 * only bodies that one reads the same way, so it never disagrees with it.
 */
static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* A string without escapes after its opening quote: its end quote, or
 * NULL when it has anything but printable ASCII. */
static const char *plain_string(const char *p, const char *end)
{
    while (p < end && *p != '"') {
        if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f || *p == '\\')
            return NULL;
        p++;
    }
    return p < end ? p : NULL;
}

bool kl_api_flat_body(kl_http_request *req, const char *const *allowed,
                      kl_api_field *out)
{
    kl_http_slice ct;
    const char *p = req->body.ptr, *end = p + req->body.len;
    size_t nallowed = 0;
    while (allowed[nallowed] != NULL)
        nallowed++;
    memset(out, 0, nallowed * sizeof *out);
    if (req->body.len == 0 || !kl_http_header(req, "content-type", &ct) ||
        !is_json_type(ct))
        return false;
    p = skip_ws(p, end);
    if (p == end || *p++ != '{')
        return false;
    p = skip_ws(p, end);
    if (p < end && *p == '}')
        return false;                   /* {}: the general path says why */
    for (;;) {
        if (p == end || *p++ != '"')
            return false;
        const char *name = p;
        if ((p = plain_string(p, end)) == NULL)
            return false;
        size_t i = 0;
        while (i < nallowed && !(strlen(allowed[i]) == (size_t)(p - name) &&
                                 memcmp(allowed[i], name, (size_t)(p - name)) == 0))
            i++;
        if (i == nallowed || out[i].kind != KL_FIELD_ABSENT)
            return false;               /* unknown, or said twice */
        p = skip_ws(p + 1, end);
        if (p == end || *p++ != ':')
            return false;
        p = skip_ws(p, end);
        if (p < end && *p == '"') {
            const char *v = p + 1;
            if ((p = plain_string(v, end)) == NULL)
                return false;
            out[i].kind = KL_FIELD_STRING;
            out[i].str = (kl_str){v, (uint32_t)(p - v)};
            p++;
        } else {
            const char *d = p;
            uint64_t n = 0;
            while (p < end && *p >= '0' && *p <= '9' && p - d < 10)
                n = n * 10 + (uint64_t)(*p++ - '0');
            if (p == d || p - d > 9 || (*d == '0' && p - d > 1) ||
                (p < end && (*p == '.' || *p == 'e' || *p == 'E' ||
                             (*p >= '0' && *p <= '9'))))
                return false;
            out[i].kind = KL_FIELD_NUMBER;
            out[i].num = n;
        }
        p = skip_ws(p, end);
        if (p < end && *p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        if (p == end || *p++ != '}')
            return false;
        return skip_ws(p, end) == end;
    }
}

/* ---- If-Match --------------------------------------------------------- */

int kl_api_if_match(kl_http_request *req, uint64_t version)
{
    kl_http_slice h;
    if (!kl_http_header(req, "if-match", &h))
        return 0;
    const char *p = h.ptr;
    size_t n = h.len;
    if (n >= 2 && p[0] == 'W' && p[1] == '/') {
        p += 2;
        n -= 2;
    }
    if (n >= 2 && p[0] == '"' && p[n - 1] == '"') {
        p++;
        n -= 2;
    }
    if (n == 1 && p[0] == '*')
        return 0;
    uint64_t v = 0;
    if (n == 0 || n > 19) {
        bad_arg(req, "If-Match", "If-Match must be \"<version>\"");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') {
            bad_arg(req, "If-Match", "If-Match must be \"<version>\"");
            return -1;
        }
        v = v * 10 + (uint64_t)(p[i] - '0');
    }
    if (v != version) {
        char msg[128];
        snprintf(msg, sizeof msg, "the resource is at version %llu, not %llu",
                 (unsigned long long)version, (unsigned long long)v);
        kl_api_error(req, 412, "precondition_failed", msg, NULL);
        return -1;
    }
    return 0;
}

/* ---- Idempotency-Key -------------------------------------------------- */

int kl_api_idempotency(kl_cmd *c)
{
    kl_http_request *req = c->req;
    kl_http_slice h;
    if (!kl_http_header(req, "idempotency-key", &h))
        return 0;
    if (h.len == 0 || h.len > IDEM_KEY_MAX) {
        bad_arg(req, "Idempotency-Key", "Idempotency-Key must be 1 to %d "
                "characters", IDEM_KEY_MAX);
        return -1;
    }
    for (size_t i = 0; i < h.len; i++) {
        if (h.ptr[i] < 0x21 || h.ptr[i] > 0x7e) {
            bad_arg(req, "Idempotency-Key",
                    "Idempotency-Key must be printable ASCII without spaces");
            return -1;
        }
    }
    memcpy(c->idem_key, h.ptr, h.len);
    c->idem_key[h.len] = '\0';
    c->has_idem = true;
    kl_idem_slot(&c->caller.org->id, &c->caller.key->id, c->idem_key, h.len,
                 &c->idem_slot);
    /* Fingerprint: method, path and body. */
    kl_buf fp = {0};
    uint8_t hash[KL_HASH_LEN];
    if (kl_buf_printf(&fp, "%d ", req->method) != KL_OK ||
        kl_buf_append(&fp, req->path.ptr, req->path.len) != KL_OK ||
        kl_buf_append(&fp, "\n", 1) != KL_OK ||
        kl_buf_append(&fp, req->body.ptr, req->body.len) != KL_OK) {
        kl_buf_free(&fp);
        kl_api_error(req, 503, "unavailable", "out of memory", NULL);
        return -1;
    }
    kl_sha256(fp.data, fp.len, hash);
    kl_buf_free(&fp);
    memcpy(c->idem_fp, hash, sizeof c->idem_fp);
    kl_cmd_lock(c, &c->idem_slot);
    return 0;
}

/* A replay after a restart: the answer is rebuilt from the current state of
 * what the first request made (without any secret, which never reaches the
 * disk). The first event of the request says what it was. */
static void replay_from_state(kl_daemon *d, kl_cmd *c, const kl_idem *r)
{
    static const char hdr[] = "Idempotent-Replayed: true\r\n";
    const kl_id *id = &r->target;
    int status = 200;
    json_t *o = NULL;
    switch (r->type) {
    case KL_EV_KEY_DELETED:
    case KL_EV_USER_REMOVED:
    case KL_EV_SA_DELETED:
    case KL_EV_COMPUTER_DELETED:
        kl_http_respond(c->req, 204, NULL, hdr, NULL, 0);
        return;
    case KL_EV_KEY_CREATED:
        status = 201;
        /* fall through */
    case KL_EV_KEY_UPDATED:
    case KL_EV_KEY_REGENERATED:
    case KL_EV_KEY_REVOKED: {
        const kl_key *k = kl_proj_key(d->proj, id);
        if (k != NULL && !k->deleted)
            o = kl_render_key(k, kl_daemon_now(d));
        break;
    }
    case KL_EV_USER_INVITED:
        status = 201;
        /* fall through */
    case KL_EV_USER_UPDATED:
    case KL_EV_USER_ROLE_CHANGED:
        o = kl_render_user(kl_proj_user(d->proj, id));
        break;
    case KL_EV_SA_CREATED:
        status = 201;
        /* fall through */
    case KL_EV_SA_UPDATED:
    case KL_EV_SA_DEACTIVATED:
    case KL_EV_SA_REACTIVATED: {
        const kl_sa *s = kl_proj_sa(d->proj, id);
        if (!s->deleted)
            o = kl_render_sa(s);
        break;
    }
    case KL_EV_USAGE_LIMITS_CHANGED:
        o = kl_render_limits(c->caller.org);
        break;
    case KL_EV_COMPUTER_CREATED:
        status = 201;
        /* fall through */
    case KL_EV_COMPUTER_RESTARTED:
        o = kl_render_computer(kl_proj_computer(d->proj, id));
        break;
    case KL_EV_SESSION_CREATED: {
        const kl_session *s = kl_proj_session(d->proj, id);
        status = 201;
        if (!s->deleted)
            o = kl_render_session(s);
        break;
    }
    case KL_EV_MESSAGE_POSTED: {
        const kl_message *m = kl_proj_message(d->proj, id);
        status = 201;
        if (!m->session->deleted)
            o = kl_render_message(m);
        break;
    }
    default:
        break;
    }
    if (o != NULL)
        kl_api_json(c->req, status, o, hdr);
    else
        kl_api_error(c->req, 404, "not_found",
                     "the resource this Idempotency-Key acted on no longer exists",
                     NULL);
}

int kl_api_idem_replay(kl_daemon *d, kl_cmd *c)
{
    int64_t now = kl_daemon_now(d);
    const kl_idem *r = kl_proj_idem(d->proj, &c->idem_slot);
    if (r == NULL || r->ts + IDEM_TTL_MS <= now)
        return 0;
    if (memcmp(r->fp, c->idem_fp, sizeof r->fp) != 0) {
        kl_api_error(c->req, 422, "idempotency_mismatch",
                     "this Idempotency-Key was used with a different request",
                     NULL);
        return -1;
    }
    const char *body;
    size_t len;
    int status;
    if (kl_idem_cache_get(d->idem, &c->idem_slot, now, &body, &len, &status) == 0)
        kl_http_respond(c->req, status, len ? "application/json" : NULL,
                        "Idempotent-Replayed: true\r\n", body, len);
    else
        replay_from_state(d, c, r);
    return -1;
}

void kl_cmd_answer_text(kl_daemon *d, kl_cmd *c, int status, const char *text,
                        size_t len)
{
    if (c->has_idem)
        kl_idem_cache_put(d->idem, &c->idem_slot, status, text, len, c->now);
    kl_http_respond(c->req, status, text != NULL ? "application/json" : NULL, NULL,
                    text, len);
}

void kl_cmd_answer(kl_daemon *d, kl_cmd *c, int status, json_t *body)
{
    if (body == NULL) {
        kl_cmd_answer_text(d, c, status, NULL, 0);
        return;
    }
    /* One dump into the stack when it fits (most answers), else a second
     * one into a buffer of the size the first measured. */
    char stack[4096], *text = stack;
    size_t len = json_dumpb(body, stack, sizeof stack, JSON_COMPACT);
    if (len > sizeof stack) {
        text = malloc(len);
        if (text == NULL || json_dumpb(body, text, len, JSON_COMPACT) != len) {
            json_decref(body);
            free(text);
            kl_api_error(c->req, 500, "internal", "out of memory", NULL);
            return;
        }
    }
    json_decref(body);
    kl_cmd_answer_text(d, c, status, text, len);
    OPENSSL_cleanse(text, len);     /* it may hold a new secret */
    if (text != stack)
        free(text);
}

/* ---- commands --------------------------------------------------------- */

kl_cmd *kl_api_cmd(kl_daemon *d, kl_http_request *req, const kl_caller *caller,
                   json_t *body, size_t data_size)
{
    kl_cmd *c = kl_cmd_new(d, req, caller);
    void *data = calloc(1, data_size > 0 ? data_size : 1);
    if (c == NULL || data == NULL) {
        free(data);
        kl_cmd_free(c);
        json_decref(body);
        kl_api_error(req, 503, "unavailable", "out of memory", NULL);
        return NULL;
    }
    c->body = body;
    c->data = data;
    if (kl_api_idempotency(c) != 0) {
        kl_cmd_free(c);
        return NULL;
    }
    return c;
}

kl_cmd *kl_api_write_cmd(kl_daemon *d, kl_http_request *req, kl_id_kind target,
                         const char *const *fields, size_t data_size)
{
    kl_caller caller;
    kl_id id;
    json_t *body;
    if (kl_api_auth(d, req, KL_NEED_WRITE, &caller) != 0 ||
        (target != KL_ID_KIND_COUNT && kl_api_path_id(req, 0, target, &id) != 0) ||
        kl_api_body(req, fields, &body) != 0)
        return NULL;
    kl_cmd *c = kl_api_cmd(d, req, &caller, body, data_size);
    if (c != NULL && target != KL_ID_KIND_COUNT) {
        c->target = id;
        kl_cmd_lock(c, &id);
    }
    return c;
}

int kl_api_emit(kl_daemon *d, kl_cmd *c, kl_event *ev)
{
    if (kl_cmd_event(d, c, ev) != KL_OK) {
        kl_api_error(c->req, 503, "unavailable", "out of memory", NULL);
        return -1;
    }
    return 0;
}

bool kl_api_may_mint_for_user(const kl_caller *c, const kl_id *user)
{
    return c->role == KL_ROLE_OWNER ||
           (c->principal.type == KL_PRINCIPAL_USER && kl_id_eq(&c->principal.id, user));
}

int kl_api_emit_new(kl_daemon *d, kl_cmd *c, kl_event *ev)
{
    if (kl_id_new(&d->ids, c->now, &ev->id) != KL_OK) {
        kl_api_error(c->req, 503, "unavailable", "no randomness available", NULL);
        return -1;
    }
    ev->has |= KL_F_ID;
    c->target = ev->id;
    return kl_api_emit(d, c, ev);
}

/* ---- ids, queries and pages ------------------------------------------- */

int kl_api_query_bool(kl_http_request *req, const char *name, bool *out)
{
    char buf[8];
    int q = kl_http_query(req, name, buf, sizeof buf);
    if (q == 0)
        return 0;
    if (q < 0 || (strcmp(buf, "true") != 0 && strcmp(buf, "false") != 0)) {
        bad_arg(req, name, "%s must be true or false", name);
        return -1;
    }
    *out = strcmp(buf, "true") == 0;
    return 0;
}

int kl_api_path_id(kl_http_request *req, int i, kl_id_kind kind, kl_id *out)
{
    if (i >= req->nparams ||
        kl_id_parse(kind, req->params[i].ptr, req->params[i].len, out) != KL_OK) {
        kl_api_error(req, 404, "not_found", "no such resource", NULL);
        return -1;
    }
    return 0;
}

int kl_api_page(kl_http_request *req, kl_id_kind kind, kl_page *pg)
{
    char buf[64];
    pg->limit = 50;
    pg->has_cursor = false;
    int q = kl_http_query(req, "limit", buf, sizeof buf);
    if (q != 0) {
        char *end;
        long v = q > 0 ? strtol(buf, &end, 10) : 0;
        if (q < 0 || *buf == '\0' || *end != '\0' || v < 1 || v > 500) {
            bad_arg(req, "limit", "limit must be an integer from 1 to 500");
            return -1;
        }
        pg->limit = (uint32_t)v;
    }
    q = kl_http_query(req, "cursor", buf, sizeof buf);
    if (q != 0) {
        if (q < 0 || kl_id_parse(kind, buf, strlen(buf), &pg->cursor) != KL_OK) {
            bad_arg(req, "cursor", "cursor is not one this list returned");
            return -1;
        }
        pg->has_cursor = true;
    }
    return 0;
}

json_t *kl_api_page_body(const char *name, json_t *items, kl_id_kind kind,
                         const kl_id *last, bool more)
{
    json_t *o = json_object();
    json_object_set_new(o, name, items);
    json_object_set_new(o, "next_cursor",
                        more && last != NULL ? kl_json_id(kind, last) : json_null());
    return o;
}

/* ---- typed fields ----------------------------------------------------- */

static size_t utf8_chars(const char *s, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ((unsigned char)s[i] & 0xc0) != 0x80;
    return c;
}

int kl_api_str_value(kl_http_request *req, json_t *v, const char *field,
                     size_t min_chars, size_t max_chars, kl_str *out)
{
    if (!json_is_string(v)) {
        bad_arg(req, field, "%s must be a string", field);
        return -1;
    }
    const char *s = json_string_value(v);
    size_t n = json_string_length(v), chars = utf8_chars(s, n);
    if (chars < min_chars || chars > max_chars) {
        if (min_chars > 0)
            bad_arg(req, field, "%s must be %zu to %zu characters", field,
                    min_chars, max_chars);
        else
            bad_arg(req, field, "%s must be at most %zu characters", field,
                    max_chars);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) {
            bad_arg(req, field, "%s must not contain control characters", field);
            return -1;
        }
    }
    *out = (kl_str){s, (uint32_t)n};
    return 1;
}

int kl_api_get_str(kl_http_request *req, json_t *obj, const char *key,
                   const char *field, size_t min_chars, size_t max_chars,
                   kl_str *out)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL)
        return 0;
    return kl_api_str_value(req, v, field, min_chars, max_chars, out);
}

int kl_api_get_uint(kl_http_request *req, json_t *obj, const char *key,
                    const char *field, uint64_t min, uint64_t max, uint64_t *out)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
        (uint64_t)json_integer_value(v) < min || (uint64_t)json_integer_value(v) > max) {
        bad_arg(req, field, "%s must be an integer from %llu to %llu", field,
                (unsigned long long)min, (unsigned long long)max);
        return -1;
    }
    *out = (uint64_t)json_integer_value(v);
    return 1;
}

int kl_api_get_time(kl_http_request *req, json_t *obj, const char *key,
                    const char *field, int64_t *out)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL)
        return 0;
    if (!json_is_string(v) ||
        kl_time_parse(json_string_value(v), json_string_length(v), out) != KL_OK) {
        bad_arg(req, field, "%s must be an RFC 3339 time such as "
                "2026-01-15T10:30:00.000Z", field);
        return -1;
    }
    return 1;
}

/* Unknown keys inside a nested object. */
int kl_api_only_fields(kl_http_request *req, json_t *obj, const char *parent,
                       const char *const *allowed)
{
    const char *name;
    json_t *v;
    json_object_foreach(obj, name, v) {
        bool ok = false;
        for (const char *const *a = allowed; *a != NULL && !ok; a++)
            ok = strcmp(*a, name) == 0;
        if (!ok) {
            char field[160];
            snprintf(field, sizeof field, "%s.%.100s", parent, name);
            bad_arg(req, field, "unknown field %s", field);
            return -1;
        }
    }
    return 0;
}

void kl_api_bad_arg(kl_http_request *req, const char *field, const char *message)
{
    kl_api_error(req, 400, "invalid_argument", message, field);
}
