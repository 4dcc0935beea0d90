/*
 * The audit history (API.md "Audit history"): events as the audit API's
 * JSON, and the one query every audit view runs with its own category
 * mask: GET /v1/org/control-history (control and keys) here, and
 * GET /v1/audit-events (every category) later. docs/audit.md is the
 * reference for clients.
 *
 * The events stay in the log. An org's history (projections.h) holds the
 * seq and type of each of its events, so the type and category filters
 * cost nothing; only candidates are read, through the daemon's one
 * kl_log_reader, and decoded for the other filters. The work per request
 * is bounded: a page ends early, with a cursor, after MAX_SCANNED history
 * entries or MAX_READ records.
 */
#include "daemon.h"

#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    DEFAULT_LIMIT = 50,
    MAX_LIMIT = 500,
    MAX_SCANNED = 100000,       /* history entries looked at per request */
    MAX_READ = 10000            /* records read and decoded per request */
};

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ---- the query -------------------------------------------------------- */

static bool type_wanted(const kl_audit_filter *f, kl_event_type t)
{
    return (f->type == KL_EV_NONE || f->type == t) &&
           (f->categories & KL_AUDIT_CAT(kl_event_category(t)));
}

/* The filters that need the event itself. */
static bool event_wanted(const kl_audit_filter *f, const kl_event *ev)
{
    if ((f->has_since && ev->ts < f->since) || (f->has_until && ev->ts >= f->until))
        return false;
    if (f->has_actor &&
        (ev->actor.type != f->actor.type ||
         (f->actor.type != KL_PRINCIPAL_SYSTEM && !kl_id_eq(&ev->actor.id, &f->actor.id))))
        return false;
    if (f->has_target) {
        kl_id_kind kind;
        kl_id id;
        if (!kl_event_target(ev, &kind, &id) || kind != f->target_kind ||
            !kl_id_eq(&id, &f->target))
            return false;
    }
    return true;
}

/* The daemon's reader of its own log, opened on first use. */
static int reader(kl_daemon *d, kl_err *err)
{
    return d->reader != NULL ? KL_OK
                             : kl_log_reader_open(d->cfg.data_dir, &d->reader, err);
}

/* Reads and decodes event `seq` of `org`. */
static int read_event(kl_daemon *d, const kl_org *org, uint64_t seq,
                      kl_buf *payload, kl_event *ev, kl_err *err)
{
    kl_record_head head;
    int rc = reader(d, err);
    if (rc == KL_OK)
        rc = kl_log_reader_get(d->reader, seq, payload, NULL, err);
    if (rc == KL_OK)
        rc = kl_event_decode((const uint8_t *)payload->data, payload->len, &head,
                             ev, err);
    /* The history and the log disagreeing must never show one org
     * another's event. */
    if (rc == KL_OK && (ev->seq != seq || !kl_id_eq(&ev->org, &org->id))) {
        kl_err_set(err, "record %" PRIu64 " is not the org's event %" PRIu64,
                   ev->seq, seq);
        rc = KL_ECORRUPT;
    }
    return rc;
}

int kl_audit_query(kl_daemon *d, const kl_org *org, const kl_audit_filter *f,
                   json_t *events, uint64_t *next, kl_err *err)
{
    /* Walk down from the first entry below the cursor (the history is in
     * seq order). */
    uint64_t i = org->history_len;
    if (f->cursor != 0) {
        uint64_t lo = 0;
        while (lo < i) {
            uint64_t mid = lo + (i - lo) / 2;
            if (KL_HISTORY_SEQ(org->history[mid]) < f->cursor)
                lo = mid + 1;
            else
                i = mid;
        }
    }
    kl_buf payload = {0};
    kl_event ev;
    uint64_t resume = 0;        /* every entry from here up is done */
    uint32_t scanned = 0, read = 0, n = 0;
    bool more = false;
    int rc = KL_OK;
    while (i > 0) {
        if (scanned == MAX_SCANNED || read == MAX_READ) {
            more = true;
            break;
        }
        scanned++;
        uint64_t h = org->history[i - 1], seq = KL_HISTORY_SEQ(h);
        if (type_wanted(f, KL_HISTORY_TYPE(h))) {
            read++;
            if ((rc = read_event(d, org, seq, &payload, &ev, err)) != KL_OK)
                break;
            if (event_wanted(f, &ev)) {
                if (n == f->limit) {
                    more = true;    /* one past the page: the next begins here */
                    break;
                }
                uint8_t hash[KL_HASH_LEN];
                kl_sha256(payload.data, payload.len, hash);
                json_array_append_new(events, kl_render_event(&ev, hash));
                n++;
            }
        }
        resume = seq;
        i--;
    }
    kl_buf_free(&payload);
    *next = more ? resume : 0;
    return rc;
}

/* ---- the request ------------------------------------------------------ */

static int bad_time(kl_http_request *req, const char *field)
{
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be an RFC 3339 time such as "
             "2026-01-15T10:30:00.000Z", field);
    kl_api_bad_arg(req, field, msg);
    return -1;
}

/* "category must be one of control, keys": the categories of this view. */
static int bad_category(kl_http_request *req, uint32_t categories)
{
    kl_buf msg = {0};
    const char *sep = " ";
    int rc = kl_buf_printf(&msg, "category must be one of");
    for (unsigned c = 0; rc == KL_OK && c < 32; c++) {
        if (categories & KL_AUDIT_CAT(c)) {
            rc = kl_buf_printf(&msg, "%s%s", sep, kl_category_name((kl_category)c));
            sep = ", ";
        }
    }
    kl_api_bad_arg(req, "category", rc == KL_OK ? msg.data : "bad category");
    kl_buf_free(&msg);
    return -1;
}

/* One of the view's categories by name, or -1. */
static int category_parse(const char *s, uint32_t categories)
{
    for (unsigned c = 0; c < 32; c++)
        if ((categories & KL_AUDIT_CAT(c)) &&
            strcmp(s, kl_category_name((kl_category)c)) == 0)
            return (int)c;
    return -1;
}

static int parse_time(kl_http_request *req, const char *name, bool *has,
                      int64_t *out)
{
    char buf[64];
    int q = kl_http_query(req, name, buf, sizeof buf);
    if (q == 0)
        return 0;
    if (q < 0 || kl_time_parse(buf, strlen(buf), out) != KL_OK)
        return bad_time(req, name);
    *has = true;
    return 0;
}

int kl_audit_parse(kl_daemon *d, kl_http_request *req, uint32_t categories,
                   kl_audit_filter *f)
{
    char buf[64];
    int q;
    memset(f, 0, sizeof *f);
    f->categories = categories;
    f->limit = DEFAULT_LIMIT;
    if (parse_time(req, "since", &f->has_since, &f->since) != 0 ||
        parse_time(req, "until", &f->has_until, &f->until) != 0)
        return -1;

    if ((q = kl_http_query(req, "category", buf, sizeof buf)) != 0) {
        int c = q > 0 ? category_parse(buf, categories) : -1;
        if (c < 0)
            return bad_category(req, categories);
        f->categories = KL_AUDIT_CAT(c);
    }
    if ((q = kl_http_query(req, "type", buf, sizeof buf)) != 0) {
        f->type = q > 0 ? kl_event_type_parse(buf, strlen(buf)) : KL_EV_NONE;
        if (f->type == KL_EV_NONE) {
            kl_api_bad_arg(req, "type", "type must be an event type such as KeyCreated");
            return -1;
        }
        if (!(categories & KL_AUDIT_CAT(kl_event_category(f->type)))) {
            kl_api_bad_arg(req, "type", "this history does not hold events of that type");
            return -1;
        }
    }
    if ((q = kl_http_query(req, "actor", buf, sizeof buf)) != 0) {
        size_t n = q > 0 ? strlen(buf) : 0;
        f->has_actor = true;
        if (q > 0 && strcmp(buf, "system") == 0)
            f->actor.type = KL_PRINCIPAL_SYSTEM;
        else if (q > 0 && kl_id_parse(KL_ID_USER, buf, n, &f->actor.id) == KL_OK)
            f->actor.type = KL_PRINCIPAL_USER;
        else if (q > 0 && kl_id_parse(KL_ID_SA, buf, n, &f->actor.id) == KL_OK)
            f->actor.type = KL_PRINCIPAL_SA;
        else {
            kl_api_bad_arg(req, "actor", "actor must be a user or service account "
                           "id, or system");
            return -1;
        }
    }
    if ((q = kl_http_query(req, "target", buf, sizeof buf)) != 0) {
        int k = KL_ID_KIND_COUNT;
        for (int i = 0; q > 0 && i < KL_ID_KIND_COUNT && k == KL_ID_KIND_COUNT; i++)
            if (i != KL_ID_REQUEST &&
                kl_id_parse((kl_id_kind)i, buf, strlen(buf), &f->target) == KL_OK)
                k = i;
        if (k == KL_ID_KIND_COUNT) {
            kl_api_bad_arg(req, "target", "target must be the id of an org, user, "
                           "service account, key, alert, computer, session or "
                           "message");
            return -1;
        }
        f->has_target = true;
        f->target_kind = (kl_id_kind)k;
    }
    /* The cursor is the seq the previous page ended at: one this log has. */
    if ((q = kl_http_query(req, "cursor", buf, sizeof buf)) != 0) {
        uint64_t v = 0;
        if (q < 0 || !kl_parse_u64(buf, strlen(buf), &v) || v == 0 ||
            v > kl_proj_seq(d->proj)) {
            kl_api_bad_arg(req, "cursor", "cursor is not one this list returned");
            return -1;
        }
        f->cursor = v;
    }
    if ((q = kl_http_query(req, "limit", buf, sizeof buf)) != 0) {
        char *end;
        long v = q > 0 ? strtol(buf, &end, 10) : 0;
        if (q < 0 || *buf == '\0' || *end != '\0' || v < 1 || v > MAX_LIMIT) {
            kl_api_bad_arg(req, "limit", "limit must be an integer from 1 to 500");
            return -1;
        }
        f->limit = (uint32_t)v;
    }
    if ((q = kl_http_query(req, "format", buf, sizeof buf)) != 0) {
        if (q < 0 || (strcmp(buf, "json") != 0 && strcmp(buf, "jsonl") != 0)) {
            kl_api_bad_arg(req, "format", "format must be json or jsonl");
            return -1;
        }
        f->jsonl = strcmp(buf, "jsonl") == 0;
    }
    return 0;
}

static int dump_to_buf(const char *p, size_t n, void *arg)
{
    return kl_buf_append(arg, p, n) == KL_OK ? 0 : -1;
}

/* JSON lines: one event per line, no envelope; the cursor in a header. */
static void answer_jsonl(kl_http_request *req, json_t *events, const char *cursor)
{
    kl_buf body = {0};
    char headers[64] = "";
    size_t i;
    json_t *e;
    int rc = 0;
    json_array_foreach(events, i, e) {
        if (rc == 0)
            rc = json_dump_callback(e, dump_to_buf, &body, JSON_COMPACT) ||
                 kl_buf_append(&body, "\n", 1) != KL_OK;
    }
    if (cursor[0] != '\0')
        snprintf(headers, sizeof headers, "Next-Cursor: %s\r\n", cursor);
    if (rc != 0)
        kl_api_error(req, 503, "unavailable", "out of memory", NULL);
    else
        kl_http_respond(req, 200, "application/x-ndjson", headers, body.data, body.len);
    kl_buf_free(&body);
    json_decref(events);
}

void kl_audit_serve(kl_daemon *d, kl_http_request *req, const kl_org *org,
                    uint32_t categories)
{
    kl_audit_filter f;
    if (kl_audit_parse(d, req, categories, &f) != 0)
        return;
    json_t *events = json_array();
    uint64_t next = 0;
    kl_err err = {0};
    int rc = kl_audit_query(d, org, &f, events, &next, &err);
    if (rc != KL_OK) {
        json_decref(events);
        KL_LOGF(&d->logger, KL_ERROR, "%s %s: cannot read the audit history: %s",
                req->request_id, req->route, err.msg);
        kl_api_error(req, 500, "internal", "cannot read the audit history from "
                     "the log", NULL);
        return;
    }
    char cursor[24] = "";
    if (next != 0)
        snprintf(cursor, sizeof cursor, "%" PRIu64, next);
    if (f.jsonl) {
        answer_jsonl(req, events, cursor);
        return;
    }
    json_t *body = json_object();
    json_object_set_new(body, "events", events);
    json_object_set_new(body, "next_cursor",
                        next != 0 ? json_string(cursor) : json_null());
    kl_api_json(req, 200, body, NULL);
}

void kl_h_control_history(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0)
        return;
    kl_audit_serve(d, req, caller.org, KL_AUDIT_CONTROL_PLANE);
}

void kl_h_audit_events(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0)
        return;
    kl_audit_serve(d, req, caller.org, KL_AUDIT_ALL);
}

/* The head of the hash chain as applied: every event up to `seq` is
 * durable and visible. The chain is one for the whole log, so the head is
 * too; `keyledger verify` prints the same pair. */
void kl_h_audit_head(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0)
        return;
    uint64_t seq = kl_proj_seq(d->proj);
    uint8_t hash[KL_HASH_LEN] = {0};
    kl_err err = {0};
    kl_buf payload = {0};
    int rc = KL_OK;
    if (seq > 0 && (rc = reader(d, &err)) == KL_OK)
        rc = kl_log_reader_get(d->reader, seq, &payload, hash, &err);
    kl_buf_free(&payload);
    if (rc != KL_OK) {
        KL_LOGF(&d->logger, KL_ERROR, "audit head: %s", err.msg);
        kl_api_error(req, 500, "internal", "cannot read the head of the log", NULL);
        return;
    }
    char hex[2 * KL_HASH_LEN + 1];
    kl_hex(hash, KL_HASH_LEN, hex);
    kl_api_json(req, 200, json_pack("{s:I,s:s}", "seq", (json_int_t)seq, "hash", hex),
                NULL);
}
