/*
 * POST /v1/keys/verify (API.md "Verification"): is this key good, for this
 * flow and permission, right now? Every outcome is a 200 with a code, except
 * the one guard against guessing: a client address with too many failed
 * verifications in the current minute gets 429 before any lookup.
 *
 * This is the hot path: no disk, no lock, and no allocation once a key is
 * in use. The request body is parsed by jansson into a per-request arena
 * (jansson's allocator is pointed at it only while a verification runs; the
 * daemon's only jansson user is the loop thread), and the answer is
 * written straight into a stack buffer.
 */
#include "daemon.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- jansson's arena -------------------------------------------------- */

enum { ARENA_BYTES = 32 * 1024 };

static struct {
    bool on;
    size_t used;
    _Alignas(16) char buf[ARENA_BYTES];
} arena;

static void *arena_malloc(size_t n)
{
    if (arena.on) {
        n = (n + 15) & ~(size_t)15;
        if (n <= ARENA_BYTES - arena.used) {
            void *p = arena.buf + arena.used;
            arena.used += n;
            return p;
        }
    }
    return malloc(n);           /* a body too big for the arena, or not in one */
}

static void arena_free(void *p)
{
    if ((char *)p >= arena.buf && (char *)p < arena.buf + ARENA_BYTES)
        return;                 /* the arena is emptied whole */
    free(p);
}

/* ---- failed verifications per client address --------------------------- */

enum { THROTTLE_SLOTS = 4096, THROTTLE_PROBES = 8, ADDR_MAX = 48 };

typedef struct throttle_slot {
    char addr[ADDR_MAX];
    int64_t minute;
    uint32_t failures;
} throttle_slot;

struct kl_throttle {
    throttle_slot slots[THROTTLE_SLOTS];
};

static uint32_t addr_hash(const char *s)
{
    uint32_t h = 2166136261u;   /* FNV-1a */
    for (; *s != '\0'; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

/* The address's slot for this minute: its own, a stale one, or (the table
 * being full of busy addresses) the one it hashes to. */
static throttle_slot *throttle_slot_for(kl_throttle *t, const char *addr,
                                        int64_t minute)
{
    uint32_t h = addr_hash(addr);
    throttle_slot *free_slot = NULL;
    for (uint32_t i = 0; i < THROTTLE_PROBES; i++) {
        throttle_slot *s = &t->slots[(h + i) % THROTTLE_SLOTS];
        if (strcmp(s->addr, addr) == 0) {
            if (s->minute != minute) {
                s->minute = minute;
                s->failures = 0;
            }
            return s;
        }
        if (free_slot == NULL && s->minute != minute)
            free_slot = s;
    }
    throttle_slot *s = free_slot != NULL ? free_slot : &t->slots[h % THROTTLE_SLOTS];
    snprintf(s->addr, sizeof s->addr, "%s", addr);
    s->minute = minute;
    s->failures = 0;
    return s;
}

int kl_verify_init(kl_daemon *d)
{
    d->throttle = calloc(1, sizeof *d->throttle);
    if (d->throttle == NULL)
        return KL_ENOMEM;
    json_set_alloc_funcs(arena_malloc, arena_free);
    return KL_OK;
}

void kl_verify_free(kl_daemon *d)
{
    free(d->throttle);
    d->throttle = NULL;
}

/* ---- the answer ------------------------------------------------------- */

typedef enum {
    V_VALID = 0, V_NOT_FOUND, V_EXPIRED, V_REVOKED, V_DISABLED, V_FORBIDDEN,
    V_RATE_LIMITED, V_USAGE_EXCEEDED
} outcome;

/* By outcome; also the labels of keyledger_verify_total (metrics.c). */
const char *const kl_verify_codes[KL_VERIFY_NCODES] = {
    "VALID", "NOT_FOUND", "EXPIRED", "REVOKED", "DISABLED", "FORBIDDEN",
    "RATE_LIMITED", "USAGE_EXCEEDED"};
_Static_assert((int)V_USAGE_EXCEEDED + 1 == (int)KL_VERIFY_NCODES,
               "one code per outcome");

/* The answer, written straight into `out` (the hot path: no JSON tree).
 * ANSWER_MAX holds the longest answer: 64 flow ids of 128 characters, each
 * escaped to 6 bytes. */
enum { ANSWER_MAX = 1024 + KL_MAX_FLOWS * (6 * KL_MAX_FLOW_LEN + 3) };

static size_t answer(char *buf, size_t len, outcome v, const kl_key *k,
                     const kl_ratelimit *rl)
{
    kl_jw w = {buf, buf + len, false};
    kl_jw_lit(&w, v == V_VALID ? "{\"valid\":true,\"code\":\"" : "{\"valid\":false,\"code\":\"");
    kl_jw_lit(&w, kl_verify_codes[v]);
    kl_jw_raw(&w, "\"", 1);
    if (k != NULL) {
        kl_jw_lit(&w, ",\"key_id\":");
        kl_jw_id(&w, KL_ID_KEY, &k->id);
        kl_jw_lit(&w, ",\"org_id\":");
        kl_jw_id(&w, KL_ID_ORG, &kl_key_org(k)->id);
        kl_jw_lit(&w, ",\"owner\":{\"type\":\"");
        kl_jw_lit(&w, kl_principal_name(k->owner_type));
        kl_jw_lit(&w, "\",\"id\":");
        kl_jw_id(&w, k->owner_type == KL_PRINCIPAL_SA ? KL_ID_SA : KL_ID_USER,
                 kl_key_owner_id(k));
        kl_jw_lit(&w, "},\"permissions\":{\"access\":\"");
        kl_jw_lit(&w, kl_access_name(k->access));
        kl_jw_raw(&w, "\"", 1);
        if (k->access == KL_ACCESS_FLOWS) {
            kl_jw_lit(&w, ",\"flows\":[");
            for (uint32_t i = 0; i < kl_key_nflows(k); i++) {
                if (i > 0)
                    kl_jw_raw(&w, ",", 1);
                kl_jw_str(&w, kl_key_flow(k, i));
            }
            kl_jw_raw(&w, "]", 1);
        }
        kl_jw_raw(&w, "}", 1);
        if (rl->limit != 0) {
            kl_jw_lit(&w, ",\"ratelimit\":{\"limit\":");
            kl_jw_uint(&w, rl->limit);
            kl_jw_lit(&w, ",\"remaining\":");
            kl_jw_uint(&w, rl->remaining);
            kl_jw_lit(&w, ",\"reset_at\":");
            kl_jw_time(&w, rl->reset_at);
            kl_jw_raw(&w, "}", 1);
        }
    }
    kl_jw_raw(&w, "}", 1);
    assert(!w.full);            /* ANSWER_MAX is the longest answer */
    return (size_t)(w.p - buf);
}

/* ---- the decision ----------------------------------------------------- */

typedef struct request {
    kl_str key, flow;
    int permission;             /* 0 none, 1 read, 2 write, 3 execute */
    uint32_t cost;
} request;

static bool flow_allowed(const kl_key *k, kl_str flow)
{
    for (uint32_t i = 0; i < kl_key_nflows(k); i++)
        if (strlen(kl_key_flow(k, i)) == flow.len &&
            memcmp(kl_key_flow(k, i), flow.ptr, flow.len) == 0)
            return true;
    return false;
}

/* The outcome for r; the key when the secret names one, and why it was
 * refused when it was. */
static outcome decide(kl_daemon *d, const request *r, int64_t now, kl_key **key,
                      kl_fail_reason *why, kl_ratelimit *rl)
{
    kl_key *k = kl_api_lookup_secret(d, r->key.ptr, r->key.len, now, why);
    *key = k;
    outcome v = V_VALID;
    switch (*why) {
    case KL_FAIL_NONE:
        break;
    case KL_FAIL_REVOKED:
        v = V_REVOKED;
        break;
    case KL_FAIL_EXPIRED:
        v = V_EXPIRED;
        break;
    case KL_FAIL_OWNER_DISABLED:
        v = V_DISABLED;
        break;
    default:                    /* no such key, for the caller */
        return V_NOT_FOUND;
    }
    if (v == V_VALID &&
        ((k->access == KL_ACCESS_FLOWS && (r->flow.len == 0 || !flow_allowed(k, r->flow))) ||
         (k->access == KL_ACCESS_READ_ONLY && r->permission > 1)))
        v = V_FORBIDDEN;
    if (v != V_VALID) {
        kl_usage_admit(d->usage, k, 0, now, rl);    /* the windows, untouched */
        return v;
    }
    switch (kl_usage_admit(d->usage, k, r->cost, now, rl)) {
    case KL_RL_RATE:
        return V_RATE_LIMITED;
    case KL_RL_QUOTA:
        return V_USAGE_EXCEEDED;
    default:
        return V_VALID;
    }
}

static const char *const FIELDS[] = {"key", "flow", "permission", "cost", NULL};
static const char *const PERMISSIONS[] = {"", "read", "write", "execute"};
enum { MAX_COST = 1000 };

/* Reads the body into r; answers 400 and returns -1 when it is not a
 * verification request. */
static int parse(kl_http_request *req, json_t *body, request *r)
{
    int got = kl_api_get_str(req, body, "key", "key", 1, KL_SECRET_MAX, &r->key);
    if (got == 0)
        kl_api_bad_arg(req, "key", "key is required");
    if (got <= 0)
        return -1;
    if (kl_api_get_str(req, body, "flow", "flow", 1, KL_MAX_FLOW_LEN, &r->flow) < 0)
        return -1;
    kl_str perm;
    got = kl_api_get_str(req, body, "permission", "permission", 1, 16, &perm);
    if (got < 0)
        return -1;
    for (int i = 1; got > 0 && i < 4 && r->permission == 0; i++)
        if (strlen(PERMISSIONS[i]) == perm.len && memcmp(PERMISSIONS[i], perm.ptr, perm.len) == 0)
            r->permission = i;
    if (got > 0 && r->permission == 0) {
        kl_api_bad_arg(req, "permission", "permission must be read, write or execute");
        return -1;
    }
    uint64_t cost = 1;
    if (kl_api_get_uint(req, body, "cost", "cost", 0, MAX_COST, &cost) < 0)
        return -1;
    r->cost = (uint32_t)cost;
    return 0;
}

/* The flat fields (kl_api_flat_body) into r when they are all valid;
 * false sends the request down the general path, which says what is
 * wrong. */
static bool flat_request(const kl_api_field *f, request *r)
{
    const kl_api_field *key = &f[0], *flow = &f[1], *perm = &f[2], *cost = &f[3];
    if (key->kind != KL_FIELD_STRING || key->str.len == 0 || key->str.len > KL_SECRET_MAX ||
        (flow->kind != KL_FIELD_ABSENT &&
         (flow->kind != KL_FIELD_STRING || flow->str.len == 0 ||
          flow->str.len > KL_MAX_FLOW_LEN)) ||
        (perm->kind != KL_FIELD_ABSENT && perm->kind != KL_FIELD_STRING) ||
        (cost->kind != KL_FIELD_ABSENT &&
         (cost->kind != KL_FIELD_NUMBER || cost->num > MAX_COST)))
        return false;
    r->key = key->str;
    if (flow->kind == KL_FIELD_STRING)
        r->flow = flow->str;
    for (int i = 1; perm->kind == KL_FIELD_STRING && i < 4 && r->permission == 0; i++)
        if (strlen(PERMISSIONS[i]) == perm->str.len &&
            memcmp(PERMISSIONS[i], perm->str.ptr, perm->str.len) == 0)
            r->permission = i;
    if (perm->kind == KL_FIELD_STRING && r->permission == 0)
        return false;
    if (cost->kind == KL_FIELD_NUMBER)
        r->cost = (uint32_t)cost->num;
    return true;
}

static void verify_and_answer(kl_daemon *d, kl_http_request *req, const request *r,
                              throttle_slot *ts, int64_t now)
{
    kl_key *k;
    kl_fail_reason why;
    kl_ratelimit rl = {0};
    outcome v = decide(d, r, now, &k, &why, &rl);
    kl_metrics_verify(d->metrics, (int)v);
    if (v == V_VALID) {
        kl_usage_note(d->usage, k, r->flow, r->cost, now);
        kl_key_touch(k, now);
    } else {
        kl_usage_refused(d->usage, k, why, r->flow, now);
    }
    if (v != V_VALID && v != V_RATE_LIMITED && v != V_USAGE_EXCEEDED) {
        ts->failures++;
        if (k != NULL)
            kl_alert_failures(d, k, ts->addr, ts->failures, now);
    }
    char out[ANSWER_MAX];
    size_t n = answer(out, sizeof out, v, v == V_NOT_FOUND ? NULL : k, &rl);
    kl_http_respond_json(req, 200, NULL, out, n);
}

void kl_h_verify(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    if (!d->ready) {
        kl_api_error(req, 503, "unavailable", "keyledgerd is replaying its log", NULL);
        return;
    }
    int64_t now = kl_daemon_now(d);
    throttle_slot *ts = throttle_slot_for(d->throttle, kl_http_peer(req), now / 60000);
    if (ts->failures >= d->cfg.verify_failures_per_minute) {
        char headers[64];
        snprintf(headers, sizeof headers, "Retry-After: %lld\r\n",
                 (long long)(60 - (now / 1000) % 60));
        kl_http_respond_error(req, 429, "rate_limited",
                              "too many failed verifications from this address; "
                              "retry later", NULL, headers);
        return;
    }
    request r = {{NULL, 0}, {"", 0}, 0, 1};
    kl_api_field flat[4];
    if (kl_api_flat_body(req, FIELDS, flat) && flat_request(flat, &r)) {
        verify_and_answer(d, req, &r, ts, now);
        return;
    }
    arena.on = true;
    arena.used = 0;
    json_t *body;
    if (kl_api_body(req, FIELDS, &body) == 0) {
        if (parse(req, body, &r) == 0)
            verify_and_answer(d, req, &r, ts, now);
        json_decref(body);
    }
    arena.on = false;
}
