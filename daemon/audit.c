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

/* ---- an event as JSON ------------------------------------------------- */

/* What an event is about, from its type's name: the catalogue names every
 * type for its subject (KeyRevoked, SessionCreated), so types added later
 * map themselves. First match wins. */
static const struct {
    const char *prefix;
    kl_id_kind kind;
} TARGETS[] = {
    {"Org", KL_ID_ORG},
    {"UsageLimits", KL_ID_ORG},
    {"User", KL_ID_USER},
    {"ServiceAccount", KL_ID_SA},
    {"Key", KL_ID_KEY},
    {"Usage", KL_ID_KEY},       /* UsageRecorded: one key's counts */
    {"Auth", KL_ID_KEY},        /* AuthFailed: refusals of one key */
    {"Computer", KL_ID_COMPUTER},
    {"Session", KL_ID_SESSION},
    {"Message", KL_ID_MESSAGE},
    {"Alert", KL_ID_ALERT},
};

static const char *const TARGET_TYPES[KL_ID_KIND_COUNT] = {
    [KL_ID_ORG] = "org",           [KL_ID_USER] = "user",
    [KL_ID_SA] = "service_account", [KL_ID_KEY] = "api_key",
    [KL_ID_ALERT] = "alert",       [KL_ID_COMPUTER] = "computer",
    [KL_ID_SESSION] = "session",   [KL_ID_MESSAGE] = "message",
};

/* The kind of entity events of this type are about, or -1. */
static int target_kind(kl_event_type t)
{
    const char *name = kl_event_type_name(t);
    for (size_t i = 0; i < ARRAY_LEN(TARGETS); i++)
        if (strncmp(name, TARGETS[i].prefix, strlen(TARGETS[i].prefix)) == 0)
            return (int)TARGETS[i].kind;
    return -1;
}

/* The org itself for org events; otherwise the event's id, if it has one. */
static bool event_target(const kl_event *ev, kl_id_kind *kind, kl_id *id)
{
    int k = target_kind(ev->type);
    if (k < 0 || (k != KL_ID_ORG && !(ev->has & KL_F_ID)))
        return false;
    *kind = (kl_id_kind)k;
    *id = k == KL_ID_ORG ? ev->org : ev->id;
    return true;
}

/* Text fields of `data`, shown as they are. */
static const struct {
    uint32_t bit;
    const char *name;
    size_t off;
} TEXT_FIELDS[] = {
    {KL_F_NAME, "name", offsetof(kl_event, name)},
    {KL_F_DESCRIPTION, "description", offsetof(kl_event, description)},
    {KL_F_EMAIL, "email", offsetof(kl_event, email)},
    {KL_F_COMMENT, "comment", offsetof(kl_event, comment)},
    {KL_F_TITLE, "title", offsetof(kl_event, title)},
    {KL_F_CONTENT, "content", offsetof(kl_event, content)},
};

/* KL_F_REF, named as the API names it, by what the event is about. */
static const struct {
    kl_id_kind of;
    kl_id_kind kind;
    const char *name;
} REFS[] = {
    {KL_ID_SESSION, KL_ID_COMPUTER, "computer_id"},
    {KL_ID_MESSAGE, KL_ID_SESSION, "session_id"},
    {KL_ID_ALERT, KL_ID_KEY, "key_id"},
};

/* {names[i]: values[i]} for the values that are set (0 = no limit). */
static json_t *limits_json(const char *const *names, const uint32_t *values,
                           size_t n)
{
    json_t *o = json_object();
    for (size_t i = 0; i < n; i++)
        if (values[i] != 0)
            json_object_set_new(o, names[i], json_integer(values[i]));
    return o;
}

static json_t *principal_json(kl_principal type, const kl_id *id)
{
    kl_ref r = {type, *id};
    return json_pack("{s:s,s:o}", "type", kl_principal_name(type), "id",
                     kl_json_ref(&r));
}

/*
 * The event's body fields, one block per KL_F_ bit. Never shown: KL_F_HASH
 * (a secret's hash, API.md) and KL_F_IDEM (the caller's idempotency key and
 * our fingerprint of its request); KL_F_ID is the target.
 */
static json_t *event_data(const kl_event *ev)
{
    static const char *const RATE[] = {"requests_per_minute", "requests_per_day"};
    static const char *const LIMITS[] = {"requests_per_minute", "requests_per_day",
                                         "requests_per_month"};
    json_t *d = json_object();
    uint32_t has = ev->has;
    if (has & KL_F_ALERT) {
        /* An alert's content is its details, a JSON object. */
        json_object_set_new(d, "alert_type", json_string(kl_alert_type_name(ev->alert)));
        json_t *det = json_loadb(ev->content.ptr, ev->content.len, 0, NULL);
        json_object_set_new(d, "details", det != NULL ? det : json_object());
        has &= ~(uint32_t)KL_F_CONTENT;
    }
    for (size_t i = 0; i < ARRAY_LEN(TEXT_FIELDS); i++) {
        if (has & TEXT_FIELDS[i].bit) {
            const kl_str *s = (const kl_str *)((const char *)ev + TEXT_FIELDS[i].off);
            json_object_set_new(d, TEXT_FIELDS[i].name, json_stringn(s->ptr, s->len));
        }
    }
    if (ev->has & KL_F_PREFIX) {
        char p[64];
        snprintf(p, sizeof p, "%.*s...", (int)(ev->prefix.len < 48 ? ev->prefix.len : 48),
                 ev->prefix.ptr);
        json_object_set_new(d, "prefix", json_string(p));
    }
    if (ev->has & KL_F_ROLE)
        json_object_set_new(d, "role", json_string(kl_role_name(ev->role)));
    if (ev->has & KL_F_OWNER)
        json_object_set_new(d, "owner", principal_json(ev->owner_type, &ev->owner));
    if (ev->has & KL_F_ENV)
        json_object_set_new(d, "environment", json_string(kl_env_name(ev->env)));
    if (ev->has & KL_F_ACCESS) {
        json_t *perm = json_pack("{s:s}", "access", kl_access_name(ev->access));
        if (ev->access == KL_ACCESS_FLOWS) {
            json_t *flows = json_array();
            for (uint32_t i = 0; i < ev->nflows; i++)
                json_array_append_new(flows, json_stringn(ev->flows[i].ptr,
                                                          ev->flows[i].len));
            json_object_set_new(perm, "flows", flows);
        }
        json_object_set_new(d, "permissions", perm);
    }
    if (ev->has & KL_F_RATE_LIMIT) {
        /* Both 0: the limit was taken away (PATCH "rate_limit": null). */
        uint32_t v[] = {ev->rl_minute, ev->rl_day};
        json_object_set_new(d, "rate_limit", v[0] || v[1]
                                                 ? limits_json(RATE, v, 2)
                                                 : json_null());
    }
    if (ev->has & KL_F_EXPIRES)
        json_object_set_new(d, "expires_at", ev->expires_at != 0
                                                 ? kl_json_time(ev->expires_at)
                                                 : json_null());
    if (ev->has & KL_F_GRACE)
        json_object_set_new(d, "grace_until", kl_json_time(ev->grace_until));
    if (ev->has & KL_F_ACTIVE)
        json_object_set_new(d, "is_active", json_boolean(ev->active));
    if (ev->has & KL_F_LIMITS) {
        uint32_t v[] = {ev->lim_minute, ev->lim_day, ev->lim_month};
        json_object_set_new(d, "usage_limits", limits_json(LIMITS, v, 3));
    }
    if (ev->has & KL_F_AUTHOR)          /* a message's role, as posted */
        json_object_set_new(d, "role", json_string(kl_author_name(ev->author)));
    for (size_t i = 0; (ev->has & KL_F_REF) && i < ARRAY_LEN(REFS); i++)
        if ((int)REFS[i].of == target_kind(ev->type))
            json_object_set_new(d, REFS[i].name, kl_json_id(REFS[i].kind, &ev->ref));
    if (ev->has & KL_F_USAGE) {
        json_t *u = json_pack("{s:o,s:o,s:I,s:I}", "from", kl_json_time(ev->usage_from),
                              "to", kl_json_time(ev->usage_to),
                              "successes", (json_int_t)ev->successes,
                              "failures", (json_int_t)ev->failures);
        if (ev->last_used != 0)
            json_object_set_new(u, "last_used_at", kl_json_time(ev->last_used));
        json_object_set_new(d, "usage", u);
    }
    if (ev->has & KL_F_AUTH) {
        json_t *why = json_object();
        for (int i = 1; i < KL_FAIL_REASONS; i++)
            if (ev->auth_counts[i] != 0)
                json_object_set_new(why, kl_fail_reason_name((kl_fail_reason)i),
                                    json_integer((json_int_t)ev->auth_counts[i]));
        json_object_set_new(d, "from", kl_json_time(ev->usage_from));
        json_object_set_new(d, "to", kl_json_time(ev->usage_to));
        json_object_set_new(d, "reasons", why);
    }
    if (ev->has & KL_F_FLOW_USAGE) {
        json_t *flows = json_array();
        for (uint32_t i = 0; i < ev->nflows; i++)
            json_array_append_new(flows, json_pack("{s:s%,s:I,s:I}", "flow",
                                                   ev->flows[i].ptr,
                                                   (size_t)ev->flows[i].len,
                                                   "successes",
                                                   (json_int_t)ev->flow_successes[i],
                                                   "failures",
                                                   (json_int_t)ev->flow_failures[i]));
        json_object_set_new(d, "flows", flows);
    }
    return d;
}

json_t *kl_audit_event_json(const kl_event *ev, const uint8_t hash[KL_HASH_LEN])
{
    /* Events have no id of their own in the log: the seq is their identity
     * in the chain, the same after every restart and replay. The id is that
     * seq as 20 digits after "evt_": sortable as text, and never taken for
     * one of the contract's 26-character typed ids. */
    char id[32], hex[2 * KL_HASH_LEN + 1];
    snprintf(id, sizeof id, "evt_%020" PRIu64, ev->seq);
    kl_hex(hash, KL_HASH_LEN, hex);

    json_t *actor = principal_json(ev->actor.type, &ev->actor.id);
    if (!kl_id_is_zero(&ev->actor.key_id))
        json_object_set_new(actor, "key_id", kl_json_id(KL_ID_KEY, &ev->actor.key_id));
    json_t *o = json_object();
    json_object_set_new(o, "seq", json_integer((json_int_t)ev->seq));
    json_object_set_new(o, "id", json_string(id));
    json_object_set_new(o, "type", json_string(kl_event_type_name(ev->type)));
    json_object_set_new(o, "category",
                        json_string(kl_category_name(kl_event_category(ev->type))));
    json_object_set_new(o, "occurred_at", kl_json_time(ev->ts));
    json_object_set_new(o, "org_id", kl_json_id(KL_ID_ORG, &ev->org));
    json_object_set_new(o, "actor", actor);
    kl_id_kind kind;
    kl_id target;
    if (event_target(ev, &kind, &target))
        json_object_set_new(o, "target", json_pack("{s:s,s:o}", "type", TARGET_TYPES[kind],
                                                   "id", kl_json_id(kind, &target)));
    json_object_set_new(o, "data", event_data(ev));
    if (!kl_id_is_zero(&ev->request_id))
        json_object_set_new(o, "request_id", kl_json_id(KL_ID_REQUEST, &ev->request_id));
    json_object_set_new(o, "hash", json_string(hex));
    return o;
}

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
        if (!event_target(ev, &kind, &id) || kind != f->target_kind ||
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
                json_array_append_new(events, kl_audit_event_json(&ev, hash));
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

/* A decimal seq of 1 to 20 digits that fits in 64 bits. */
static bool seq_parse(const char *s, uint64_t *out)
{
    size_t n = strlen(s);
    uint64_t v = 0;
    if (n == 0 || n > 20)
        return false;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9' || v > (UINT64_MAX - 9) / 10)
            return false;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return true;
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
            if (TARGET_TYPES[i] != NULL &&
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
        if (q < 0 || !seq_parse(buf, &v) || v == 0 || v > kl_proj_seq(d->proj)) {
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
