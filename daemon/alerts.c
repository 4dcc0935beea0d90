/*
 * Alerts (API.md "Alerts"): conditions worth a human's look, each raised
 * once as an AlertRaised event, listed and acknowledged over the API.
 *
 * A condition is named by text ("rotation_due key_… 1768473000000"); its
 * hash goes into the event, and the fold refuses a second alert with the
 * same hash, so "once per condition" survives restarts. A raise locks the
 * hash, so two raises of one condition in flight decide one after the
 * other and the second finds the first.
 *
 * Failed-authentication spikes are raised where failures are counted; the
 * other conditions are checked by a timer on the loop that looks at the
 * keys a slice at a time: at most CHECK_SLICE keys and CHECK_NS of loop time
 * per tick, so a million keys never stall a request.
 */
#include "daemon.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { CHECK_SLICE = 20000, CHECK_NS = 1000000 };
static const int64_t HOUR_MS = 3600000, DAY_MS = 86400000;

struct kl_alerts {
    kl_daemon *d;
    uv_timer_t timer;
    uint32_t org, key;          /* where the next slice starts */
};

/* ---- raising ---------------------------------------------------------- */

typedef struct raise_data {
    kl_alert_type type;
    kl_id key;                  /* zero: none */
    kl_id cond;
    char details[];             /* JSON text */
} raise_data;

static int decide_raise(kl_daemon *d, kl_cmd *c)
{
    raise_data *r = c->data;
    if (kl_proj_alert_raised(d->proj, &r->cond))
        return 0;               /* raised meanwhile: nothing to write */
    kl_event ev = {.type = KL_EV_ALERT_RAISED, .has = KL_F_ID | KL_F_ALERT | KL_F_CONTENT,
                   .alert = r->type, .cond = r->cond,
                   .content = {r->details, (uint32_t)strlen(r->details)}};
    if (!kl_id_is_zero(&r->key)) {
        ev.has |= KL_F_REF;
        ev.ref = r->key;
    }
    if (kl_id_new(&d->ids, c->now, &ev.id) != KL_OK)
        return -1;
    return kl_cmd_event(d, c, &ev) == KL_OK ? 0 : -1;
}

void kl_alert_raise(kl_daemon *d, kl_org *org, kl_alert_type type, const kl_key *key,
                    const char *cond_text, json_t *details)
{
    kl_id cond;
    uint8_t h[KL_HASH_LEN];
    kl_sha256(cond_text, strlen(cond_text), h);
    memcpy(cond.b, h, sizeof cond.b);
    if (kl_proj_alert_raised(d->proj, &cond) || d->stopping || !d->ready) {
        json_decref(details);
        return;
    }
    /* Into our own memory: this may run inside a verification, whose
     * jansson allocations live in an arena (verify.c). */
    size_t len = json_dumpb(details, NULL, 0, JSON_COMPACT | JSON_SORT_KEYS);
    kl_cmd *c = kl_cmd_new(d, NULL, NULL);
    raise_data *r = calloc(1, sizeof *r + len + 1);
    if (c == NULL || r == NULL ||
        json_dumpb(details, r->details, len, JSON_COMPACT | JSON_SORT_KEYS) != len) {
        json_decref(details);
        kl_cmd_free(c);
        free(r);
        return;
    }
    json_decref(details);
    r->type = type;
    r->cond = cond;
    if (key != NULL)
        r->key = key->id;
    c->caller.org = org;
    c->data = r;
    kl_cmd_lock(c, &cond);
    c->decide = decide_raise;
    kl_cmd_submit(d, c);
}

/* ---- the periodic check ----------------------------------------------- */

static void key_text(const kl_key *k, char out[KL_ID_TEXT_MAX])
{
    kl_id_format(KL_ID_KEY, &k->id, out);
}

/* A quota at 80% and 100%: one alert per threshold, window and window
 * start. */
static void check_quota(kl_daemon *d, kl_org *o, const kl_key *k, const char *window,
                        int64_t start, uint64_t limit, uint64_t used)
{
    static const unsigned PCTS[] = {100, 80};
    if (limit == 0)
        return;
    for (size_t i = 0; i < 2; i++) {
        if (used * 100 < limit * PCTS[i])
            continue;
        char who[KL_ID_TEXT_MAX], cond[160];
        if (k != NULL)
            key_text(k, who);
        else
            kl_id_format(KL_ID_ORG, &o->id, who);
        snprintf(cond, sizeof cond, "usage_threshold %s %s %lld %u", who, window,
                 (long long)start, PCTS[i]);
        kl_alert_raise(d, o, KL_ALERT_USAGE_THRESHOLD, k, cond,
                       json_pack("{s:s,s:I,s:I,s:i}", "window", window, "limit",
                                 (json_int_t)limit, "used", (json_int_t)used,
                                 "percent", (int)PCTS[i]));
        return;                 /* the higher threshold covers the lower */
    }
}

/* Calls recorded in [from, to) for the key (all flows). */
static uint64_t recorded(const kl_key *k, int64_t from, int64_t to)
{
    uint64_t n = 0;
    const kl_usage_series *s = k->usage;
    for (uint32_t i = s->len; i > 0 && s->items[i - 1].hour >= from; i--) {
        const kl_usage_bucket *b = &s->items[i - 1];
        if (b->flow == 0 && b->hour < to)
            n += (uint64_t)b->successes + b->failures;
    }
    return n;
}

static void check_key(kl_daemon *d, kl_key *k, int64_t now)
{
    const kl_config *cfg = &d->cfg;
    kl_org *o = kl_key_org(k);
    if (k->deleted || k->revoked)
        return;
    char id[KL_ID_TEXT_MAX], cond[160];     /* formatted only for a raise */
    if (k->expires_at != 0 && now < k->expires_at &&
        k->expires_at - now <= (int64_t)cfg->alert_expiring_s * 1000) {
        key_text(k, id);
        snprintf(cond, sizeof cond, "expiring_soon %s %lld", id, (long long)k->expires_at);
        kl_alert_raise(d, o, KL_ALERT_EXPIRING_SOON, k, cond,
                       json_pack("{s:o}", "expires_at", kl_json_time(k->expires_at)));
    }
    if (now >= k->expires_at && k->expires_at != 0)
        return;                 /* expired: nothing more to say */
    int64_t period = (int64_t)(k->env == KL_ENV_TEST ? cfg->alert_rotation_test_s
                                                     : cfg->alert_rotation_live_s) * 1000;
    if (now - k->rotated_at >= period) {
        key_text(k, id);
        snprintf(cond, sizeof cond, "rotation_due %s %lld", id, (long long)k->rotated_at);
        kl_alert_raise(d, o, KL_ALERT_ROTATION_DUE, k, cond,
                       json_pack("{s:o,s:I}", "rotated_at", kl_json_time(k->rotated_at),
                                 "rotation_period_days", (json_int_t)(period / DAY_MS)));
    }
    int64_t last = k->last_used_at != 0 ? k->last_used_at : k->created_at;
    if (now - last >= (int64_t)cfg->alert_unused_s * 1000) {
        key_text(k, id);
        snprintf(cond, sizeof cond, "unused_key %s %lld", id, (long long)last);
        json_t *det = json_object();
        if (k->last_used_at != 0)
            json_object_set_new(det, "last_used_at", kl_json_time(k->last_used_at));
        json_object_set_new(det, "unused_days",
                            json_integer((json_int_t)((now - last) / DAY_MS)));
        kl_alert_raise(d, o, KL_ALERT_UNUSED_KEY, k, cond, det);
    }
    if (k->usage == NULL)
        return;
    int64_t day = kl_time_day_start(now);
    check_quota(d, o, k, "day", day, k->rl_day, kl_key_used_since(k, day));
    /* This hour against the key's own hourly average over the day before. */
    int64_t hour = kl_time_hour_start(now);
    uint64_t cur = recorded(k, hour, hour + HOUR_MS);
    uint64_t base = recorded(k, hour - 24 * HOUR_MS, hour) / 24;
    if (cur >= cfg->alert_unusual_min &&
        cur > (uint64_t)cfg->alert_unusual_factor * (base > 0 ? base : 1)) {
        key_text(k, id);
        snprintf(cond, sizeof cond, "unusual_activity %s %lld", id, (long long)hour);
        kl_alert_raise(d, o, KL_ALERT_UNUSUAL_ACTIVITY, k, cond,
                       json_pack("{s:o,s:I,s:I}", "hour", kl_json_time(hour),
                                 "requests", (json_int_t)cur,
                                 "hourly_baseline", (json_int_t)base));
    }
}

static void on_check(uv_timer_t *t)
{
    kl_alerts *a = t->data;
    kl_daemon *d = a->d;
    if (!d->ready || kl_commit_unavailable(d->commit) != NULL)
        return;
    int64_t now = kl_daemon_now(d);
    uint64_t deadline = uv_hrtime() + CHECK_NS;
    uint32_t budget = CHECK_SLICE;
    uint32_t norgs = kl_proj_org_count(d->proj);
    while (budget > 0 && a->org < norgs) {
        kl_org *o = kl_proj_org_at(d->proj, a->org);
        if (a->key == 0) {
            check_quota(d, o, NULL, "org-day", kl_time_day_start(now), o->lim_day,
                        kl_org_used_day(o, now));
            check_quota(d, o, NULL, "org-month", kl_time_month_start(now), o->lim_month,
                        kl_org_used_month(o, now));
        }
        for (; budget > 0 && a->key < o->keys.len; budget--) {
            check_key(d, o->keys.items[a->key++], now);
            if (budget % 64 == 0 && uv_hrtime() > deadline)
                budget = 1;     /* time is up: the next tick goes on */
        }
        if (a->key >= o->keys.len) {
            a->org++;
            a->key = 0;
        }
    }
    if (a->org >= norgs)
        a->org = 0;             /* a pass is done: the next tick starts over */
}

void kl_alert_failures(kl_daemon *d, const kl_key *k, const char *addr,
                       uint32_t failures, int64_t now)
{
    if (failures != d->cfg.alert_failed_auth_per_minute)
        return;                 /* raise once, when the threshold is crossed */
    char who[KL_ID_TEXT_MAX + 64], cond[160];
    if (addr != NULL)
        snprintf(who, sizeof who, "address %s", addr);
    else
        key_text(k, who);
    int64_t minute = now - now % 60000;
    snprintf(cond, sizeof cond, "failed_auth_spike %s %lld", who, (long long)minute);
    json_t *det = json_pack("{s:I,s:o}", "failures", (json_int_t)failures,
                            "minute", kl_json_time(minute));
    if (addr != NULL)
        json_object_set_new(det, "address", json_string(addr));
    kl_alert_raise(d, kl_key_org(k), KL_ALERT_FAILED_AUTH_SPIKE, addr != NULL ? NULL : k, cond,
                   det);
}

int kl_alerts_new(kl_daemon *d, kl_alerts **out)
{
    kl_alerts *a = calloc(1, sizeof *a);
    if (a == NULL)
        return KL_ENOMEM;
    a->d = d;
    int rc = uv_timer_init(d->loop, &a->timer);
    if (rc == 0) {
        a->timer.data = a;
        rc = uv_timer_start(&a->timer, on_check, d->cfg.alert_check_ms,
                            d->cfg.alert_check_ms);
    }
    if (rc != 0) {
        free(a);
        return KL_EIO;
    }
    *out = a;
    return KL_OK;
}

static void on_closed(uv_handle_t *h) { free(h->data); }

void kl_alerts_free(kl_alerts *a)
{
    if (a != NULL)
        uv_close((uv_handle_t *)&a->timer, on_closed);
}

/* ---- the API ---------------------------------------------------------- */

void kl_h_alerts_list(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_page pg;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_page(req, KL_ID_ALERT, &pg) != 0)
        return;
    char buf[16];
    int want = -1;              /* -1 all, 0 open, 1 acknowledged */
    int q = kl_http_query(req, "status", buf, sizeof buf);
    if (q != 0) {
        if (q > 0 && strcmp(buf, "open") == 0)
            want = 0;
        else if (q > 0 && strcmp(buf, "acknowledged") == 0)
            want = 1;
        else {
            kl_api_bad_arg(req, "status", "status must be open or acknowledged");
            return;
        }
    }
    const kl_vec *v = &caller.org->alerts;
    json_t *items = json_array();
    const kl_id *last = NULL;
    bool more = false;
    uint32_t n = 0;
    for (uint32_t i = kl_vec_after(v, pg.has_cursor ? &pg.cursor : NULL); i < v->len; i++) {
        const kl_alert *a = v->items[i];
        if (want >= 0 && a->acked != (want == 1))
            continue;
        if (n == pg.limit) {
            more = true;
            break;
        }
        json_array_append_new(items, kl_render_alert(d->proj, a));
        last = &a->id;
        n++;
    }
    kl_api_json(req, 200, kl_api_page_body("alerts", items, KL_ID_ALERT, last, more), NULL);
}

static int decide_ack(kl_daemon *d, kl_cmd *c)
{
    kl_alert *a = kl_proj_alert(d->proj, &c->target);
    if (a == NULL || a->org != c->caller.org) {
        kl_api_error(c->req, 404, "not_found", "no such alert", NULL);
        return -1;
    }
    if (kl_api_if_match(c->req, a->version) != 0)
        return -1;
    if (a->acked) {
        kl_api_error(c->req, 409, "conflict", "the alert is already acknowledged", NULL);
        return -1;
    }
    kl_event ev = {.type = KL_EV_ALERT_ACKNOWLEDGED, .has = KL_F_ID, .id = a->id};
    return kl_api_emit(d, c, &ev);
}

static int render_ack(kl_daemon *d, kl_cmd *c)
{
    kl_cmd_answer(d, c, 200, kl_render_alert(d->proj, kl_proj_alert(d->proj, &c->target)));
    return 0;
}

void kl_h_alerts_ack(kl_http_request *req)
{
    static const char *const no_fields[] = {NULL};
    kl_daemon *d = req->ctx;
    kl_cmd *c = kl_api_write_cmd(d, req, KL_ID_ALERT, no_fields, 1);
    if (c == NULL)
        return;
    c->decide = decide_ack;
    c->render = render_ack;
    kl_cmd_submit(d, c);
}
