/*
 * Usage reports (API.md §4 "Usage"): GET /v1/api-keys/{id}/usage for one
 * key and GET /v1/usage for the whole organization, as JSON or CSV.
 * docs/api-notes.md "Usage reports" is the reference for clients: defaults,
 * bounds, the org report's shape and the CSV columns.
 *
 * Reports are read from the projection alone: each key's hourly buckets
 * (kl_key.usage), folded from the UsageRecorded events usage.c writes once
 * per flush interval, so a report lags the calls by at most that interval
 * and shows exactly what a restart would rebuild. Hours are summed into
 * the requested granularity over a range widened to whole buckets (the
 * data has no finer grain than an hour).
 *
 * The org's deleted keys (org->deleted_keys) stay in the org's report:
 * their usage happened.
 */
#include "daemon.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    MAX_BUCKETS = 1000,         /* per report */
    MAX_CSV_ROWS = 100000,      /* org CSV: keys with use x buckets */
    DEFAULT_HOURS = 24,         /* granularity=hour without from */
    DEFAULT_DAYS = 7,           /* granularity=day without from */
    REAL_DIGITS = 6             /* significant digits of success_rate */
};
static const int64_t HOUR_MS = 3600000;
static const int64_t DAY_MS = 86400000;
/* 9999-12-31T00:00:00Z: the latest `to`, so that the range widened to
 * whole buckets still ends in a year kl_time_format can show. */
static const int64_t TO_MAX = 253402214400000;

/* What the query asked for, with the range widened to whole buckets. */
typedef struct range {
    int64_t from, to;           /* ms; from inclusive, to exclusive */
    int64_t step;               /* HOUR_MS or DAY_MS */
    uint32_t nbuckets;
    bool day;                   /* granularity=day */
    bool csv;                   /* format=csv */
} range;

typedef struct tally {
    uint64_t successes, failures;
} tally;

/* The keys an org report covers, in id order. */
typedef struct key_list {
    kl_key **items;
    uint32_t len, cap;
} key_list;

/* ---- the query -------------------------------------------------------- */

/* The start of the bucket holding ms. */
static int64_t bucket_start(const range *r, int64_t ms)
{
    return r->day ? kl_time_day_start(ms) : kl_time_hour_start(ms);
}

/* ?name=<one of two words>: *second = true for the second one; left alone
 * when absent. Answers 400 and returns -1 otherwise. */
static int query_choice(kl_http_request *req, const char *name, const char *first,
                        const char *second, bool *is_second)
{
    char buf[16];
    int q = kl_http_query(req, name, buf, sizeof buf);
    if (q == 0)
        return 0;
    if (q < 0 || (strcmp(buf, first) != 0 && strcmp(buf, second) != 0)) {
        char msg[96];
        snprintf(msg, sizeof msg, "%s must be %s or %s", name, first, second);
        kl_api_bad_arg(req, name, msg);
        return -1;
    }
    *is_second = strcmp(buf, second) == 0;
    return 0;
}

/* ?name=<RFC 3339 time>: 1 present (in *out), 0 absent, -1 answered 400. */
static int query_time(kl_http_request *req, const char *name, int64_t *out)
{
    char buf[64];
    int q = kl_http_query(req, name, buf, sizeof buf);
    if (q == 0)
        return 0;
    if (q < 0 || kl_time_parse(buf, strlen(buf), out) != KL_OK) {
        char msg[128];
        snprintf(msg, sizeof msg, "%s must be an RFC 3339 time such as "
                 "2026-01-15T10:30:00.000Z (a '+' offset must be sent as %%2B)",
                 name);
        kl_api_bad_arg(req, name, msg);
        return -1;
    }
    return 1;
}

/* from, to, granularity and format; answers 400 and returns -1 on a bad
 * value. Without `to`, the range ends now; without `from`, it holds the
 * last DEFAULT_DAYS days or DEFAULT_HOURS hours up to and including the
 * bucket that holds `to`. */
static int parse_range(kl_http_request *req, int64_t now, range *r)
{
    memset(r, 0, sizeof *r);
    r->day = true;
    if (query_choice(req, "granularity", "hour", "day", &r->day) != 0 ||
        query_choice(req, "format", "json", "csv", &r->csv) != 0)
        return -1;
    r->step = r->day ? DAY_MS : HOUR_MS;
    int64_t from = 0, to = now;
    int has_from = query_time(req, "from", &from);
    if (has_from < 0 || query_time(req, "to", &to) < 0)
        return -1;
    if (to > TO_MAX) {
        kl_api_bad_arg(req, "to", "to must be at most 9999-12-31T00:00:00Z");
        return -1;
    }
    /* to - 1: a `to` on a bucket boundary ends the bucket before it. */
    int64_t end = bucket_start(r, to - 1) + r->step;
    if (has_from == 0)
        from = end - (r->day ? DEFAULT_DAYS : DEFAULT_HOURS) * r->step;
    if (from >= to) {
        kl_api_bad_arg(req, "from", "from must be before to");
        return -1;
    }
    r->from = bucket_start(r, from);
    r->to = end;
    int64_t n = (r->to - r->from) / r->step;
    if (n > MAX_BUCKETS) {
        char msg[160];
        snprintf(msg, sizeof msg, "from..to spans %" PRId64 " %ss; a report has at "
                 "most %d buckets: narrow the range%s", n, r->day ? "day" : "hour",
                 MAX_BUCKETS, r->day ? "" : " or use granularity=day");
        kl_api_bad_arg(req, "from", msg);
        return -1;
    }
    r->nbuckets = (uint32_t)n;
    return 0;
}

/* ---- counting --------------------------------------------------------- */

/* Index of the first bucket at or after `from` (series are in hour
 * order). */
static uint32_t series_first(const kl_usage_series *s, int64_t from)
{
    uint32_t lo = 0, hi = s->len;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (s->items[mid].hour < from)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/*
 * Adds k's use within r to *total, to `buckets` (r->nbuckets; NULL: not
 * wanted) and to `flows` (requests by the org's flow number - 1, `nflows`
 * of them; NULL: not wanted). Returns whether the key had any use.
 */
static bool key_add(const kl_key *k, const range *r, tally *total, tally *buckets,
                    uint64_t *flows, uint32_t nflows)
{
    const kl_usage_series *s = k->usage;
    if (s == NULL)
        return false;
    bool used = false;
    for (uint32_t i = series_first(s, r->from); i < s->len; i++) {
        const kl_usage_bucket *b = &s->items[i];
        if (b->hour >= r->to)
            break;
        if (b->flow != 0) {
            if (flows != NULL && b->flow <= nflows)
                flows[b->flow - 1] += (uint64_t)b->successes + b->failures;
            continue;
        }
        total->successes += b->successes;
        total->failures += b->failures;
        used |= b->successes + (uint64_t)b->failures > 0;
        if (buckets != NULL) {
            tally *t = &buckets[(b->hour - r->from) / r->step];
            t->successes += b->successes;
            t->failures += b->failures;
        }
    }
    return used;
}

/* ---- the org's keys --------------------------------------------------- */

static int key_list_push(key_list *l, kl_key *k)
{
    if (l->len == l->cap) {
        uint32_t cap = l->cap ? l->cap * 2 : 64;
        kl_key **items = realloc(l->items, cap * sizeof *items);
        if (items == NULL)
            return KL_ENOMEM;
        l->items = items;
        l->cap = cap;
    }
    l->items[l->len++] = k;
    return KL_OK;
}

static int key_cmp(const void *a, const void *b)
{
    const kl_key *x = *(kl_key *const *)a, *y = *(kl_key *const *)b;
    return memcmp(x->id.b, y->id.b, sizeof x->id.b);
}

/* Every key of the org that was ever used, deleted ones included, in id
 * order. */
static int org_keys(const kl_org *org, key_list *out)
{
    const kl_vec *lists[] = {&org->keys, &org->deleted_keys};
    int rc = KL_OK;
    for (size_t l = 0; l < 2; l++) {
        for (uint32_t i = 0; i < lists[l]->len && rc == KL_OK; i++) {
            kl_key *k = lists[l]->items[i];
            if (k->usage != NULL)
                rc = key_list_push(out, k);
        }
    }
    if (rc == KL_OK && out->len > 1)
        qsort(out->items, out->len, sizeof *out->items, key_cmp);
    return rc;
}

/* ---- JSON ------------------------------------------------------------- */

static json_t *json_count(uint64_t n) { return json_integer((json_int_t)n); }

static json_t *totals_json(const tally *t)
{
    uint64_t requests = t->successes + t->failures;
    double rate = requests > 0 ? (double)t->successes / (double)requests : 0.0;
    return json_pack("{s:o,s:o,s:o,s:f}", "requests", json_count(requests),
                     "successes", json_count(t->successes), "failures",
                     json_count(t->failures), "success_rate", rate);
}

static json_t *buckets_json(const range *r, const tally *buckets)
{
    json_t *a = json_array();
    for (uint32_t i = 0; i < r->nbuckets; i++) {
        const tally *t = &buckets[i];
        json_array_append_new(a, json_pack("{s:o,s:o,s:o,s:o}", "start",
                                           kl_json_time(r->from + i * r->step),
                                           "requests",
                                           json_count(t->successes + t->failures),
                                           "successes", json_count(t->successes),
                                           "failures", json_count(t->failures)));
    }
    return a;
}

typedef struct flow_row {
    const char *name;
    uint64_t requests;
} flow_row;

static int flow_row_cmp(const void *a, const void *b)
{
    const flow_row *x = a, *y = b;
    if (x->requests != y->requests)
        return x->requests > y->requests ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* [{flow, requests}] for the flows used, most requests first (ties: by
 * name, so the order depends on nothing but the counts: not on which flow
 * the org happened to see first, which a compaction may change). NULL when
 * out of memory. */
static json_t *flows_json(const kl_org *org, const uint64_t *flows, uint32_t nflows)
{
    flow_row *rows = malloc((nflows ? nflows : 1) * sizeof *rows);
    if (rows == NULL)
        return NULL;
    uint32_t n = 0;
    for (uint32_t i = 0; i < nflows; i++)
        if (flows[i] > 0)
            rows[n++] = (flow_row){org->flow_names[i], flows[i]};
    qsort(rows, n, sizeof *rows, flow_row_cmp);
    json_t *a = json_array();
    for (uint32_t i = 0; i < n; i++)
        json_array_append_new(a, json_pack("{s:s,s:o}", "flow", rows[i].name,
                                           "requests", json_count(rows[i].requests)));
    free(rows);
    return a;
}

/* {key_id?, from, to, granularity}: the head every JSON report starts
 * with. */
static json_t *report_head(const range *r, const kl_key *k)
{
    json_t *o = json_object();
    if (k != NULL)
        json_object_set_new(o, "key_id", kl_json_id(KL_ID_KEY, &k->id));
    json_object_set_new(o, "from", kl_json_time(r->from));
    json_object_set_new(o, "to", kl_json_time(r->to));
    json_object_set_new(o, "granularity", json_string(r->day ? "day" : "hour"));
    return o;
}

/* Like kl_api_json, with success_rate printed to REAL_DIGITS significant
 * digits rather than jansson's 17. */
static void answer_json(kl_http_request *req, json_t *body)
{
    char *text = body != NULL ? json_dumps(body, JSON_COMPACT |
                                           JSON_REAL_PRECISION(REAL_DIGITS))
                              : NULL;
    if (text != NULL)
        kl_http_respond_json(req, 200, NULL, text, strlen(text));
    else
        kl_api_error(req, 503, "unavailable", "out of memory", NULL);
    free(text);
    json_decref(body);
}

/* ---- CSV (RFC 4180) --------------------------------------------------- */

/* One field: quoted, with its quotes doubled, when it holds a comma, a
 * quote, CR or LF. */
static int csv_field(kl_buf *b, const char *s)
{
    size_t n = strlen(s);
    if (strpbrk(s, ",\"\r\n") == NULL)
        return kl_buf_append(b, s, n);
    int rc = kl_buf_append(b, "\"", 1);
    for (const char *p = s; rc == KL_OK && *p != '\0'; p++)
        rc = *p == '"' ? kl_buf_append(b, "\"\"", 2) : kl_buf_append(b, p, 1);
    return rc == KL_OK ? kl_buf_append(b, "\"", 1) : rc;
}

/* One record: fields separated by commas, ended by CRLF. */
static int csv_row(kl_buf *b, const char *const *fields, int n)
{
    int rc = KL_OK;
    for (int i = 0; i < n && rc == KL_OK; i++) {
        if (i > 0)
            rc = kl_buf_append(b, ",", 1);
        if (rc == KL_OK)
            rc = csv_field(b, fields[i]);
    }
    return rc == KL_OK ? kl_buf_append(b, "\r\n", 2) : rc;
}

/* One row per bucket: [key_id,]start,requests,successes,failures. */
static int csv_buckets(kl_buf *b, const range *r, const char *key_id,
                       const tally *buckets)
{
    int rc = KL_OK;
    for (uint32_t i = 0; i < r->nbuckets && rc == KL_OK; i++) {
        const tally *t = &buckets[i];
        char start[KL_TIME_TEXT_LEN + 1], req[24], ok[24], failed[24];
        kl_time_format(r->from + i * r->step, start);
        snprintf(req, sizeof req, "%" PRIu64, t->successes + t->failures);
        snprintf(ok, sizeof ok, "%" PRIu64, t->successes);
        snprintf(failed, sizeof failed, "%" PRIu64, t->failures);
        const char *row[] = {key_id, start, req, ok, failed};
        rc = key_id != NULL ? csv_row(b, row, 5) : csv_row(b, row + 1, 4);
    }
    return rc;
}

/* Answers CSV as a download named usage-<id>-<granularity>.csv. */
static void answer_csv(kl_http_request *req, const range *r, const char *id,
                       const kl_buf *body)
{
    char headers[160];
    snprintf(headers, sizeof headers,
             "Content-Disposition: attachment; filename=\"usage-%s-%s.csv\"\r\n",
             id, r->day ? "day" : "hour");
    kl_http_respond(req, 200, "text/csv; charset=utf-8", headers, body->data,
                    body->len);
}

/* ---- the two reports -------------------------------------------------- */

/* A report that could not be built: out of memory, answered 503 as the
 * other handlers answer it. */
static void answer_failure(kl_http_request *req)
{
    kl_api_error(req, 503, "unavailable", "out of memory", NULL);
}

/* The report of one key, for JSON; NULL when out of memory. */
static json_t *key_json(const range *r, const kl_key *k, const tally *total,
                        const tally *buckets, const uint64_t *flows)
{
    json_t *fl = flows_json(kl_key_org(k), flows, kl_key_org(k)->nflow_names);
    if (fl == NULL)
        return NULL;
    json_t *o = report_head(r, k);
    json_object_set_new(o, "totals", totals_json(total));
    json_object_set_new(o, "buckets", buckets_json(r, buckets));
    json_object_set_new(o, "flows", fl);
    return o;
}

static void report_key(kl_daemon *d, kl_http_request *req, const range *r,
                       const kl_key *k)
{
    const kl_org *org = kl_key_org(k);
    tally total = {0, 0};
    tally *buckets = calloc(r->nbuckets ? r->nbuckets : 1, sizeof *buckets);
    uint64_t *flows = calloc(org->nflow_names ? org->nflow_names : 1, sizeof *flows);
    kl_buf body = {0};
    json_t *o = NULL;
    int rc = KL_ENOMEM;
    if (buckets == NULL || flows == NULL)
        goto cleanup;
    key_add(k, r, &total, buckets, flows, org->nflow_names);
    if (r->csv) {
        static const char *const HEAD[] = {"start", "requests", "successes",
                                           "failures"};
        char id[KL_ID_TEXT_MAX];
        kl_id_format(KL_ID_KEY, &k->id, id);
        rc = csv_row(&body, HEAD, 4);
        if (rc == KL_OK)
            rc = csv_buckets(&body, r, NULL, buckets);
        if (rc == KL_OK)
            answer_csv(req, r, id, &body);
    } else if ((o = key_json(r, k, &total, buckets, flows)) != NULL) {
        answer_json(req, o);
        rc = KL_OK;
    }
cleanup:
    if (rc != KL_OK)
        answer_failure(req);
    kl_buf_free(&body);
    free(buckets);
    free(flows);
}

/* Org CSV: one row per key with use and bucket, in key id order. Returns 1
 * when it answered the request itself (too many rows). */
static int org_csv(kl_http_request *req, const range *r, const key_list *keys,
                   tally *scratch, kl_buf *body)
{
    static const char *const HEAD[] = {"key_id", "start", "requests", "successes",
                                       "failures"};
    int rc = csv_row(body, HEAD, 5);
    uint64_t rows = 0;
    for (uint32_t i = 0; i < keys->len && rc == KL_OK; i++) {
        tally total = {0, 0};
        memset(scratch, 0, r->nbuckets * sizeof *scratch);
        if (!key_add(keys->items[i], r, &total, scratch, NULL, 0))
            continue;
        rows += r->nbuckets;
        if (rows > MAX_CSV_ROWS) {
            char msg[160];
            snprintf(msg, sizeof msg, "the CSV would have more than %d rows (keys "
                     "with use x buckets): narrow the range%s", MAX_CSV_ROWS,
                     r->day ? "" : " or use granularity=day");
            kl_api_bad_arg(req, "from", msg);
            return 1;
        }
        char id[KL_ID_TEXT_MAX];
        kl_id_format(KL_ID_KEY, &keys->items[i]->id, id);
        rc = csv_buckets(body, r, id, scratch);
    }
    return rc;
}

/* Org JSON: org-wide totals, buckets and flows, and each used key's
 * totals. */
static json_t *org_json(const range *r, const kl_org *org, const key_list *keys,
                        tally *buckets, uint64_t *flows)
{
    tally total = {0, 0};
    json_t *rows = json_array();
    for (uint32_t i = 0; i < keys->len; i++) {
        tally t = {0, 0};
        if (!key_add(keys->items[i], r, &t, buckets, flows, org->nflow_names))
            continue;
        total.successes += t.successes;
        total.failures += t.failures;
        json_array_append_new(rows, json_pack("{s:o,s:o}", "key_id",
                                              kl_json_id(KL_ID_KEY, &keys->items[i]->id),
                                              "totals", totals_json(&t)));
    }
    json_t *fl = flows_json(org, flows, org->nflow_names);
    if (fl == NULL) {
        json_decref(rows);
        return NULL;
    }
    json_t *o = report_head(r, NULL);
    json_object_set_new(o, "totals", totals_json(&total));
    json_object_set_new(o, "buckets", buckets_json(r, buckets));
    json_object_set_new(o, "flows", fl);
    json_object_set_new(o, "keys", rows);
    return o;
}

static void report_org(kl_daemon *d, kl_http_request *req, const range *r,
                       const kl_org *org)
{
    key_list keys = {0};
    kl_buf body = {0};
    tally *buckets = calloc(r->nbuckets ? r->nbuckets : 1, sizeof *buckets);
    uint64_t *flows = calloc(org->nflow_names ? org->nflow_names : 1, sizeof *flows);
    json_t *o = NULL;
    int rc = KL_ENOMEM;
    if (buckets == NULL || flows == NULL)
        goto cleanup;
    rc = org_keys(org, &keys);
    if (rc != KL_OK)
        goto cleanup;
    if (r->csv) {
        char id[KL_ID_TEXT_MAX];
        kl_id_format(KL_ID_ORG, &org->id, id);
        rc = org_csv(req, r, &keys, buckets, &body);
        if (rc == KL_OK)
            answer_csv(req, r, id, &body);
        else if (rc > 0)
            rc = KL_OK;         /* answered */
        goto cleanup;
    }
    o = org_json(r, org, &keys, buckets, flows);
    rc = o != NULL ? KL_OK : KL_ENOMEM;
    if (o != NULL)
        answer_json(req, o);
cleanup:
    if (rc != KL_OK)
        answer_failure(req);
    kl_buf_free(&body);
    free(keys.items);
    free(buckets);
    free(flows);
}

/* ---- handlers --------------------------------------------------------- */

void kl_h_keys_usage(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id id;
    range r;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_KEY, &id) != 0)
        return;
    const kl_key *k = kl_proj_key(d->proj, &id);
    if (k == NULL || k->deleted || kl_key_org(k) != caller.org) {
        kl_api_error(req, 404, "not_found", "no such API key", NULL);
        return;
    }
    if (parse_range(req, kl_daemon_now(d), &r) != 0)
        return;
    report_key(d, req, &r, k);
}

void kl_h_org_usage(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    range r;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        parse_range(req, kl_daemon_now(d), &r) != 0)
        return;
    report_org(d, req, &r, caller.org);
}
