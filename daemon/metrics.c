/*
 * daemon/metrics.c — what GET /metrics shows, in the Prometheus text
 * exposition format 0.0.4: requests by route, method and status, request
 * latency histograms, verification outcomes, log appends, batch sizes and
 * fsync latency, and, read at scrape time, the applied seq, the replay time
 * and the projection's sizes.
 *
 * Cardinality is bounded by construction: requests are counted by the
 * route table's entry (its pattern, never the raw path) and a fixed list of
 * statuses; a request no route matched counts under route="unmatched" with
 * its method folded to a short list. So every counter lives in arrays
 * allocated once, sized by the route table, and counting a request is an
 * index computation and a few increments on the loop thread.
 *
 * Threads: everything here runs on the loop thread. The commit job measures
 * its fsync on the pool and hands the number over in its after-work
 * callback. The projection and replay_ns are written by the pool while the
 * startup replay runs, so the scrape reads them only once the daemon is
 * ready; before that those families have no samples.
 */
#include "daemon.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char CONTENT_TYPE[] = "text/plain; version=0.0.4; charset=utf-8";

/* ---- fixed label sets --------------------------------------------------- */

/* Statuses counted apart; any other is status="other". */
static const int STATUSES[] = {
    200, 201, 202, 204, 304, 400, 401, 403, 404, 405, 408, 409, 410, 412,
    413, 415, 422, 429, 431, 500, 501, 503, 504};
enum {
    N_STATUS = sizeof STATUSES / sizeof STATUSES[0],
    STATUS_OTHER = N_STATUS,    /* the last column */
    STATUS_MAX = 999            /* respond asserts 100..999 */
};

/* Methods of unmatched requests; the rest (and a request line that was not
 * understood) are method="other". Matched requests take their route's. */
static const struct {
    int method;
    const char *name;
} UNMATCHED_METHODS[] = {
    {HTTP_GET, "GET"}, {HTTP_HEAD, "HEAD"}, {HTTP_POST, "POST"},
    {HTTP_PUT, "PUT"}, {HTTP_PATCH, "PATCH"}, {HTTP_DELETE, "DELETE"},
    {HTTP_OPTIONS, "OPTIONS"}, {-1, "other"}};
enum { N_UNMATCHED = sizeof UNMATCHED_METHODS / sizeof UNMATCHED_METHODS[0] };

/* Histogram bounds, as numbers and as their `le` text. Seconds (request
 * and fsync latency): 100 µs to 5 s. */
static const uint64_t TIME_NS[] = {
    100000ull,   250000ull,   500000ull,   1000000ull,   2500000ull,
    5000000ull,  10000000ull, 25000000ull, 50000000ull,  100000000ull,
    250000000ull, 500000000ull, 1000000000ull, 2500000000ull, 5000000000ull};
static const char *const TIME_LE[] = {
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01",
    "0.025",  "0.05",    "0.1",    "0.25",  "0.5",    "1",     "2.5", "5"};
enum { N_TIME = sizeof TIME_NS / sizeof TIME_NS[0] };
_Static_assert(sizeof TIME_LE / sizeof TIME_LE[0] == N_TIME, "TIME_LE");

/* Records per batch. */
static const uint64_t BATCH_N[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
static const char *const BATCH_LE[] = {"1",  "2",  "4",   "8",   "16",  "32",
                                       "64", "128", "256", "512", "1024"};
enum { N_BATCH = sizeof BATCH_N / sizeof BATCH_N[0] };
_Static_assert(sizeof BATCH_LE / sizeof BATCH_LE[0] == N_BATCH, "BATCH_LE");

/* The `kind` labels of the projection's sizes, in the order render_state
 * lists kl_proj_stats' fields. */
static const char *const KINDS[] = {"orgs",      "users",    "service_accounts",
                                    "keys",      "computers", "sessions",
                                    "idempotency"};

/* ---- the counters ------------------------------------------------------- */

enum { MAX_BUCKETS = 16 };      /* the bounds above, plus +Inf */
_Static_assert((int)N_TIME < (int)MAX_BUCKETS && (int)N_BATCH < (int)MAX_BUCKETS,
               "MAX_BUCKETS");

/* Per-bucket counts (not cumulative: the scrape sums them), their sum. */
typedef struct histo {
    uint64_t bucket[MAX_BUCKETS];
    uint64_t sum;               /* ns for times, records for batches */
} histo;

/* One route (or one method of unmatched requests). */
typedef struct series {
    uint64_t status[N_STATUS + 1];
    histo latency;
} series;

struct kl_metrics {
    const kl_http_route *routes; /* borrowed: the server's table */
    unsigned nroutes;
    int64_t start_ms;           /* process start, wall clock */
    uint64_t verify[KL_VERIFY_NCODES];
    uint64_t appends;           /* records written */
    uint64_t append_bytes;
    uint64_t batches;
    uint64_t write_errors;
    histo batch_records;
    histo fsync;
    kl_buf text;                /* the last scrape's text, reused */
    uint8_t status_col[STATUS_MAX + 1]; /* status -> column in series.status */
    series series[];            /* nroutes, then N_UNMATCHED */
};

int kl_metrics_new(kl_metrics **out, const kl_http_route *routes,
                   int64_t start_ms)
{
    unsigned n = 0;
    while (routes[n].handler != NULL)
        n++;
    kl_metrics *m = calloc(1, sizeof *m + (n + N_UNMATCHED) * sizeof(series));
    *out = NULL;
    if (m == NULL)
        return KL_ENOMEM;
    m->routes = routes;
    m->nroutes = n;
    m->start_ms = start_ms;
    memset(m->status_col, STATUS_OTHER, sizeof m->status_col);
    for (unsigned i = 0; i < N_STATUS; i++)
        m->status_col[STATUSES[i]] = (uint8_t)i;
    *out = m;
    return KL_OK;
}

void kl_metrics_free(kl_metrics *m)
{
    if (m == NULL)
        return;
    kl_buf_free(&m->text);
    free(m);
}

/* Bounds are few and most observations land in the first ones. */
static void time_observe(histo *h, uint64_t ns)
{
    unsigned i = 0;
    while (i < N_TIME && ns > TIME_NS[i])
        i++;
    h->bucket[i]++;
    h->sum += ns;
}

void kl_metrics_observe(const kl_http_request *req, int status,
                        uint64_t duration_ns, void *ctx)
{
    kl_metrics *m = ((kl_daemon *)ctx)->metrics;
    if (m == NULL)
        return;
    unsigned row;
    if (req->route_index >= 0 && (unsigned)req->route_index < m->nroutes) {
        row = (unsigned)req->route_index;
    } else {
        unsigned j = 0;
        while (j < N_UNMATCHED - 1 && UNMATCHED_METHODS[j].method != req->method)
            j++;
        row = m->nroutes + j;
    }
    series *s = &m->series[row];
    s->status[status >= 0 && status <= STATUS_MAX ? m->status_col[status]
                                                  : STATUS_OTHER]++;
    time_observe(&s->latency, duration_ns);
}

void kl_metrics_verify(kl_metrics *m, int outcome)
{
    if (m != NULL && outcome >= 0 && outcome < KL_VERIFY_NCODES)
        m->verify[outcome]++;
}

void kl_metrics_log_batch(kl_metrics *m, uint32_t records, uint64_t bytes)
{
    if (m == NULL)
        return;
    m->appends += records;
    m->append_bytes += bytes;
    m->batches++;
    unsigned i = 0;
    while (i < N_BATCH && records > BATCH_N[i])
        i++;
    m->batch_records.bucket[i]++;
    m->batch_records.sum += records;
}

void kl_metrics_log_fsync(kl_metrics *m, uint64_t ns)
{
    if (m != NULL)
        time_observe(&m->fsync, ns);
}

void kl_metrics_log_error(kl_metrics *m)
{
    if (m != NULL)
        m->write_errors++;
}

/* ---- the text ----------------------------------------------------------- */

/* Appends to a buffer; the first failure sticks and later calls do
 * nothing, so a render checks once at the end. */
typedef struct out {
    kl_buf *b;
    int rc;
} out;

static void put(out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(out *o, const char *fmt, ...)
{
    if (o->rc != KL_OK)
        return;
    for (int pass = 0; pass < 2; pass++) {
        size_t room = o->b->cap - o->b->len;
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->b->data != NULL ? o->b->data + o->b->len : NULL,
                          room, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->rc = KL_ENOMEM;
            return;
        }
        if ((size_t)n < room) {
            o->b->len += (size_t)n;
            return;
        }
        if (kl_buf_reserve(o->b, (size_t)n + 1) != KL_OK) {
            o->rc = KL_ENOMEM;
            return;
        }
    }
    o->rc = KL_ENOMEM;          /* the second pass had room: unreachable */
}

static void family(out *o, const char *name, const char *type, const char *help)
{
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value as the format wants it: \\, \" and \n escaped. Our values
 * are route patterns and fixed names, so this is belt and braces. */
static void put_label(out *o, const char *name, const char *value, bool first)
{
    put(o, "%s%s=\"", first ? "" : ",", name);
    for (const char *p = value; *p != '\0' && o->rc == KL_OK; p++) {
        if (*p == '\\' || *p == '"')
            put(o, "\\%c", *p);
        else if (*p == '\n')
            put(o, "\\n");
        else
            put(o, "%c", *p);
    }
    put(o, "\"");
}

/* Nanoseconds as exact decimal seconds. */
static void put_seconds(out *o, uint64_t ns)
{
    put(o, "%llu.%09llu", (unsigned long long)(ns / 1000000000ull),
        (unsigned long long)(ns % 1000000000ull));
}

static void put_u64(out *o, uint64_t v)
{
    put(o, "%llu", (unsigned long long)v);
}

/* A family of one unlabelled sample. */
static void scalar(out *o, const char *name, const char *type,
                   const char *help, uint64_t v)
{
    family(o, name, type, help);
    put(o, "%s %llu\n", name, (unsigned long long)v);
}

/* The route and method labels of series row i, without braces. */
static void put_route_labels(out *o, const kl_metrics *m, unsigned i)
{
    if (i < m->nroutes) {
        put_label(o, "route", m->routes[i].pattern, true);
        put_label(o, "method",
                  llhttp_method_name((llhttp_method_t)m->routes[i].method), false);
    } else {
        put_label(o, "route", "unmatched", true);
        put_label(o, "method", UNMATCHED_METHODS[i - m->nroutes].name, false);
    }
}

static uint64_t histo_count(const histo *h, unsigned nbounds)
{
    uint64_t n = 0;
    for (unsigned i = 0; i <= nbounds; i++)
        n += h->bucket[i];
    return n;
}

/* _bucket lines (cumulative, ending in +Inf), _sum and _count. `labels`
 * writes the series' labels (without braces), or is NULL. */
typedef void (*labels_fn)(out *o, const kl_metrics *m, unsigned i);

static void put_histo(out *o, const char *name, const histo *h,
                      const char *const *les, unsigned nbounds, bool seconds,
                      labels_fn labels, const kl_metrics *m, unsigned row)
{
    uint64_t cum = 0;
    for (unsigned i = 0; i <= nbounds; i++) {
        cum += h->bucket[i];
        put(o, "%s_bucket{", name);
        if (labels != NULL) {
            labels(o, m, row);
            put(o, ",");
        }
        put(o, "le=\"%s\"} ", i < nbounds ? les[i] : "+Inf");
        put_u64(o, cum);
        put(o, "\n");
    }
    put(o, "%s_sum", name);
    if (labels != NULL) {
        put(o, "{");
        labels(o, m, row);
        put(o, "}");
    }
    put(o, " ");
    if (seconds)
        put_seconds(o, h->sum);
    else
        put_u64(o, h->sum);
    put(o, "\n%s_count", name);
    if (labels != NULL) {
        put(o, "{");
        labels(o, m, row);
        put(o, "}");
    }
    put(o, " ");
    put_u64(o, cum);
    put(o, "\n");
}

static void render_http(out *o, const kl_daemon *d, const kl_metrics *m)
{
    unsigned rows = m->nroutes + N_UNMATCHED;

    family(o, "keyledger_http_requests_total", "counter",
           "HTTP requests answered, by route pattern (\"unmatched\" when no "
           "route matched), method and status.");
    for (unsigned i = 0; i < rows; i++) {
        const series *s = &m->series[i];
        for (unsigned c = 0; c <= N_STATUS; c++) {
            if (s->status[c] == 0)
                continue;
            put(o, "keyledger_http_requests_total{");
            put_route_labels(o, m, i);
            if (c < N_STATUS)
                put(o, ",status=\"%d\"} ", STATUSES[c]);
            else
                put(o, ",status=\"other\"} ");
            put_u64(o, s->status[c]);
            put(o, "\n");
        }
    }

    family(o, "keyledger_http_request_duration_seconds", "histogram",
           "Time from a request's last byte to its answer being queued, by "
           "route pattern and method.");
    for (unsigned i = 0; i < rows; i++) {
        const histo *h = &m->series[i].latency;
        if (histo_count(h, N_TIME) != 0)
            put_histo(o, "keyledger_http_request_duration_seconds", h,
                      TIME_LE, N_TIME, true, put_route_labels, m, i);
    }

    family(o, "keyledger_http_connections", "gauge", "Open HTTP connections.");
    put(o, "keyledger_http_connections %u\n", kl_http_server_connections(d->http));
}

static void render_log(out *o, const kl_metrics *m)
{
    scalar(o, "keyledger_log_appends_total", "counter",
           "Records appended to the log by this process.", m->appends);
    scalar(o, "keyledger_log_append_bytes_total", "counter",
           "Bytes of framed records appended to the log by this process.",
           m->append_bytes);
    scalar(o, "keyledger_log_batches_total", "counter",
           "Batches written to the log (group commit: one write for every "
           "command decided meanwhile).", m->batches);
    family(o, "keyledger_log_batch_records", "histogram",
           "Records per batch written to the log.");
    put_histo(o, "keyledger_log_batch_records", &m->batch_records, BATCH_LE,
              N_BATCH, false, NULL, m, 0);
    family(o, "keyledger_log_fsync_duration_seconds", "histogram",
           "Time of each fsync of the log (with --fsync always: the batch's "
           "write and fsync together).");
    put_histo(o, "keyledger_log_fsync_duration_seconds", &m->fsync, TIME_LE,
              N_TIME, true, NULL, m, 0);
    scalar(o, "keyledger_log_write_errors_total", "counter",
           "Batches that could not be framed, written or synced, and failed "
           "syncs.", m->write_errors);
}

/* The loop thread may read the projection and replay_ns only once the
 * replay (on the pool) is over: before that these families are empty. */
static void render_state(out *o, const kl_daemon *d)
{
    family(o, "keyledger_events_total", "counter",
           "Events applied to the projection: the log's last seq, replayed "
           "ones included (absent while replaying).");
    if (d->ready) {
        put(o, "keyledger_events_total ");
        put_u64(o, kl_proj_seq(d->proj));
        put(o, "\n");
    }
    family(o, "keyledger_replay_seconds", "gauge",
           "Time the startup replay of the log took (absent while replaying).");
    if (d->ready) {
        put(o, "keyledger_replay_seconds ");
        put_seconds(o, d->replay_ns);
        put(o, "\n");
    }
    family(o, "keyledger_projection_entities", "gauge",
           "Entities held in the in-memory projection, by kind; deleted ones "
           "stay (their ids and history do). Absent while replaying.");
    if (d->ready) {
        kl_proj_stats st;
        kl_proj_stats_get(d->proj, &st);
        const uint64_t v[] = {st.orgs, st.users, st.sas, st.keys,
                              st.computers, st.sessions, st.idem};
        _Static_assert(sizeof v / sizeof v[0] == sizeof KINDS / sizeof KINDS[0],
                       "one kind per size");
        for (unsigned i = 0; i < sizeof v / sizeof v[0]; i++) {
            put(o, "keyledger_projection_entities{kind=\"%s\"} ", KINDS[i]);
            put_u64(o, v[i]);
            put(o, "\n");
        }
    }
}

static int render(const kl_daemon *d, kl_metrics *m)
{
    out o = {&m->text, KL_OK};
    m->text.len = 0;

    family(&o, "keyledger_up", "gauge", "1 while keyledgerd serves.");
    put(&o, "keyledger_up 1\n");
    family(&o, "keyledger_ready", "gauge",
           "1 once the startup replay is done (as /readyz), else 0.");
    put(&o, "keyledger_ready %d\n", d->ready ? 1 : 0);
    family(&o, "process_start_time_seconds", "gauge",
           "Start time of the process since the Unix epoch in seconds.");
    put(&o, "process_start_time_seconds %lld.%03lld\n",
        (long long)(m->start_ms / 1000), (long long)(m->start_ms % 1000));

    render_http(&o, d, m);

    family(&o, "keyledger_verify_total", "counter",
           "Verifications answered 200, by outcome code.");
    for (unsigned i = 0; i < KL_VERIFY_NCODES; i++) {
        put(&o, "keyledger_verify_total{code=\"%s\"} ", kl_verify_codes[i]);
        put_u64(&o, m->verify[i]);
        put(&o, "\n");
    }

    render_log(&o, m);
    render_state(&o, d);
    return o.rc;
}

void kl_h_metrics(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_metrics *m = d->metrics;
    if (m == NULL || render(d, m) != KL_OK) {
        kl_api_error(req, 500, "internal", "cannot build the metrics", NULL);
        return;
    }
    kl_http_respond(req, 200, CONTENT_TYPE, NULL, m->text.data, m->text.len);
    /* Scrapes are rare and the text is a few KiB: keep the buffer. */
}
