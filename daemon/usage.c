/*
 * Usage, rate limits and quotas.
 *
 * Every call with a key is counted in memory (accepted or refused, and by
 * flow when it named one) and once per flush interval the keys that were
 * used get one UsageRecorded event each, all in one command, with one
 * AuthFailed event per key whose authentication was refused (by reason:
 * the 401 hides it, the audit history must not) and one for refusals that
 * named no key. A crash loses
 * at most one interval of counts; a clean stop flushes first. Nothing on
 * the request path waits for the disk or allocates once a key is in use:
 * a key's entry (with the flow names it has seen) lives on across flushes
 * until the key has been idle for IDLE_MS.
 *
 * Windows (API.md "Verification"): a key's requests_per_minute and its
 * org's requests_per_minute are sliding windows kept only in memory (the
 * current and the previous minute, weighted); a key's requests_per_day and
 * its org's requests_per_day and _month are fixed UTC windows counted from
 * the log (the projections fold UsageRecorded) plus what was accepted since
 * the last flush plus what a flush is still writing ("in flight" until its
 * events are applied), so a restart does not reset a day's count and no
 * call is ever missing from the count.
 */
#include "daemon.h"

#include <stdlib.h>
#include <string.h>

enum {
    ENTRY_FLOWS = 8,            /* flows counted apart per key and interval */
    MINUTE_MS = 60000,
    IDLE_MS = 2 * MINUTE_MS     /* longer than any minute window */
};

/* A sliding minute: calls in the current fixed minute and the one before. */
typedef struct window {
    int64_t start;
    uint32_t cur, prev;
} window;

typedef struct flow_count {
    char *name;
    uint32_t successes, failures;
} flow_count;

typedef struct entry {
    kl_key *key;
    uint32_t successes, failures;   /* since the last flush */
    uint32_t inflight;              /* successes a flush is writing */
    int64_t from, last;             /* period start; last accepted use */
    int64_t active;                 /* last call */
    window minute;
    window refused;                 /* refused calls, for failed_auth_spike */
    uint32_t why[KL_FAIL_REASONS];  /* refused authentications since the flush */
    uint32_t nflows;
    flow_count flows[ENTRY_FLOWS];  /* more flows count in the totals only */
} entry;

/* An org's window and what its keys were granted since the last flush. */
typedef struct org_entry {
    kl_org *org;
    window minute;
    uint64_t pending;               /* granted since the last flush */
    uint64_t inflight;              /* granted, being written */
} org_entry;

/* What one flush is writing: taken off the in-flight counts once its
 * events are applied (or failed to be written). */
typedef struct flushed {
    uint32_t nkeys, norgs;
    struct { kl_key *key; uint32_t n; } *keys;
    struct { kl_org *org; uint64_t n; } *orgs;
} flushed;

struct kl_usage {
    kl_daemon *d;
    uv_timer_t timer;
    entry *items;
    uint32_t len, cap;
    org_entry *orgs;
    uint32_t norgs, cap_orgs;
    uint32_t nameless[KL_FAIL_REASONS]; /* refusals that named no key */
    int64_t nameless_from;
};

/* ---- entries ---------------------------------------------------------- */

static entry *entry_for(kl_usage *u, kl_key *k, int64_t now)
{
    if (k->usage_slot != 0)
        return &u->items[k->usage_slot - 1];
    if (u->len == u->cap) {
        uint32_t cap = u->cap ? u->cap * 2 : 64;
        entry *items = realloc(u->items, cap * sizeof *items);
        if (items == NULL)
            return NULL;        /* counts are best effort under no memory */
        u->items = items;
        u->cap = cap;
    }
    entry *e = &u->items[u->len++];
    *e = (entry){.key = k, .from = now, .active = now};
    k->usage_slot = u->len;
    return e;
}

static org_entry *org_entry_for(kl_usage *u, kl_org *o)
{
    for (uint32_t i = 0; i < u->norgs; i++)
        if (u->orgs[i].org == o)
            return &u->orgs[i];
    if (u->norgs == u->cap_orgs) {
        uint32_t cap = u->cap_orgs ? u->cap_orgs * 2 : 8;
        org_entry *orgs = realloc(u->orgs, cap * sizeof *orgs);
        if (orgs == NULL)
            return NULL;
        u->orgs = orgs;
        u->cap_orgs = cap;
    }
    org_entry *oe = &u->orgs[u->norgs++];
    *oe = (org_entry){.org = o};
    return oe;
}

static void count_flow(entry *e, kl_str flow, bool accepted, uint32_t n)
{
    flow_count *f = NULL;
    for (uint32_t i = 0; i < e->nflows && f == NULL; i++)
        if (strlen(e->flows[i].name) == flow.len &&
            memcmp(e->flows[i].name, flow.ptr, flow.len) == 0)
            f = &e->flows[i];
    /* A new flow takes a free slot, or one whose flow was not used since
     * the last flush (a busy key's flows change over time). */
    for (uint32_t i = 0; f == NULL && e->nflows == ENTRY_FLOWS && i < ENTRY_FLOWS; i++) {
        if (e->flows[i].successes == 0 && e->flows[i].failures == 0) {
            free(e->flows[i].name);
            e->flows[i] = e->flows[--e->nflows];
        }
    }
    if (f == NULL && e->nflows < ENTRY_FLOWS) {
        char *name = malloc((size_t)flow.len + 1);
        if (name == NULL)
            return;
        memcpy(name, flow.ptr, flow.len);
        name[flow.len] = '\0';
        f = &e->flows[e->nflows++];
        *f = (flow_count){name, 0, 0};
    }
    if (f != NULL) {
        if (accepted)
            f->successes += n;
        else
            f->failures += n;
    }
}

static void window_roll(window *w, int64_t now);

void kl_usage_note(kl_usage *u, kl_key *k, kl_str flow, uint32_t n, int64_t now)
{
    entry *e = entry_for(u, k, now);
    if (e == NULL)
        return;
    e->active = now;
    e->successes += n;
    e->last = now;
    org_entry *oe = org_entry_for(u, k->org);
    if (oe != NULL)
        oe->pending += n;
    if (flow.len > 0)
        count_flow(e, flow, true, n);
}

void kl_usage_refused(kl_usage *u, kl_key *k, kl_fail_reason why, kl_str flow,
                      int64_t now)
{
    if (k == NULL) {
        if (u->nameless_from == 0)
            u->nameless_from = now;
        u->nameless[why]++;
        return;
    }
    entry *e = entry_for(u, k, now);
    if (e == NULL)
        return;
    e->active = now;
    e->failures++;
    e->why[why]++;
    if (flow.len > 0)
        count_flow(e, flow, false, 1);
    window_roll(&e->refused, now);
    e->refused.cur++;
    kl_alert_failures(u->d, k, NULL, e->refused.cur, now);
}

/* ---- windows ---------------------------------------------------------- */

static void window_roll(window *w, int64_t now)
{
    int64_t start = now - now % MINUTE_MS;
    if (start == w->start)
        return;
    w->prev = start - w->start == MINUTE_MS ? w->cur : 0;
    w->cur = 0;
    w->start = start;
}

/* Calls counted in the minute before now: the previous fixed minute
 * weighted by how much of it the sliding window still covers. */
static uint64_t window_count(const window *w, int64_t now)
{
    uint64_t covered = (uint64_t)(MINUTE_MS - (now - w->start));
    return w->cur + (uint64_t)w->prev * covered / MINUTE_MS;
}

/* Tracks the tightest window seen: the one with the fewest calls left. */
static void consider(kl_ratelimit *rl, const char *name, uint64_t limit,
                     uint64_t used, int64_t reset_at)
{
    uint64_t left = used >= limit ? 0 : limit - used;
    if (rl->limit == 0 || left < rl->remaining) {
        rl->window = name;
        rl->limit = limit;
        rl->remaining = left;
        rl->reset_at = reset_at;
    }
}

kl_rl_verdict kl_usage_admit(kl_usage *u, kl_key *k, uint32_t cost, int64_t now,
                             kl_ratelimit *rl)
{
    memset(rl, 0, sizeof *rl);
    kl_org *o = k->org;
    if (k->rl_minute == 0 && k->rl_day == 0 && o->lim_minute == 0 &&
        o->lim_day == 0 && o->lim_month == 0)
        return KL_RL_OK;        /* nothing to count against */
    entry *e = entry_for(u, k, now);
    org_entry *oe = org_entry_for(u, o);
    if (e == NULL || oe == NULL)
        return KL_RL_OK;        /* no memory to count with: fail open */
    window_roll(&e->minute, now);
    window_roll(&oe->minute, now);
    int64_t next_minute = e->minute.start + MINUTE_MS;
    int64_t day = kl_time_day_start(now);
    kl_rl_verdict v = KL_RL_OK;

    if (k->rl_minute != 0) {
        uint64_t used = window_count(&e->minute, now);
        consider(rl, "minute", k->rl_minute, used, next_minute);
        if (used + cost > k->rl_minute)
            v = KL_RL_RATE;
    }
    if (o->lim_minute != 0) {
        uint64_t used = window_count(&oe->minute, now);
        consider(rl, "org-minute", o->lim_minute, used, next_minute);
        if (used + cost > o->lim_minute && v == KL_RL_OK)
            v = KL_RL_RATE;
    }
    if (k->rl_day != 0) {
        uint64_t used = kl_key_used_since(k, day) + e->successes + e->inflight;
        consider(rl, "day", k->rl_day, used, day + 86400000);
        if (used + cost > k->rl_day && v == KL_RL_OK)
            v = KL_RL_QUOTA;
    }
    if (o->lim_day != 0) {
        uint64_t used = kl_org_used_day(o, now) + oe->pending + oe->inflight;
        consider(rl, "org-day", o->lim_day, used, day + 86400000);
        if (used + cost > o->lim_day && v == KL_RL_OK)
            v = KL_RL_QUOTA;
    }
    if (o->lim_month != 0) {
        uint64_t used = kl_org_used_month(o, now) + oe->pending + oe->inflight;
        consider(rl, "org-month", o->lim_month, used, kl_time_next_month(now));
        if (used + cost > o->lim_month && v == KL_RL_OK)
            v = KL_RL_QUOTA;
    }
    if (v == KL_RL_OK) {
        e->minute.cur += cost;
        oe->minute.cur += cost;
        rl->remaining = rl->remaining > cost ? rl->remaining - cost : 0;
    }
    return v;
}

/* ---- flushing --------------------------------------------------------- */

static void entry_drop(kl_usage *u, uint32_t i)
{
    entry *e = &u->items[i];
    for (uint32_t f = 0; f < e->nflows; f++)
        free(e->flows[f].name);
    e->key->usage_slot = 0;
    if (i != u->len - 1) {
        *e = u->items[u->len - 1];
        e->key->usage_slot = i + 1;
    }
    u->len--;
}

/* One AuthFailed event for the refusals counted in `why`, if any: of one
 * key, or (key NULL, org zero) of secrets that named no key. */
static int auth_failed(kl_daemon *d, kl_cmd *c, const kl_id *org, const kl_id *key,
                       const uint32_t why[KL_FAIL_REASONS], int64_t from, int64_t now)
{
    kl_event ev = {.type = KL_EV_AUTH_FAILED, .has = KL_F_AUTH, .org = *org,
                   .usage_from = from, .usage_to = now};
    bool any = false;
    for (int i = 1; i < KL_FAIL_REASONS; i++) {
        ev.auth_counts[i] = why[i];
        any = any || why[i] != 0;
    }
    if (!any)
        return KL_OK;
    if (key != NULL) {
        ev.has |= KL_F_ID;
        ev.id = *key;
    }
    return kl_cmd_event(d, c, &ev);
}

static int decide_nothing(kl_daemon *d, kl_cmd *c)
{
    (void)d;
    (void)c;
    return 0;                   /* the events were made at flush time */
}

/* The flush's counts are in the projections now (or lost with a failed
 * write): no longer in flight. */
static int flush_done(kl_daemon *d, kl_cmd *c)
{
    kl_usage *u = d->usage;
    flushed *f = c->data;
    if (u == NULL)
        return 0;               /* shutting down: nothing counts any more */
    for (uint32_t i = 0; i < f->nkeys; i++) {
        kl_key *k = f->keys[i].key;
        if (k->usage_slot != 0)
            u->items[k->usage_slot - 1].inflight -= f->keys[i].n;
    }
    for (uint32_t i = 0; i < f->norgs; i++) {
        org_entry *oe = org_entry_for(u, f->orgs[i].org);
        if (oe != NULL)
            oe->inflight -= f->orgs[i].n;
    }
    return 0;
}

static void flushed_free(void *p)
{
    flushed *f = p;
    free(f->keys);
    free(f->orgs);
}

void kl_usage_flush(kl_usage *u)
{
    kl_daemon *d = u->d;
    int64_t now = kl_daemon_now(d);
    kl_cmd *c = kl_cmd_new(d, NULL, NULL);
    flushed *f = calloc(1, sizeof *f);
    if (f != NULL) {
        f->keys = calloc(u->len + 1, sizeof *f->keys);
        f->orgs = calloc(u->norgs + 1, sizeof *f->orgs);
    }
    if (c == NULL || f == NULL || f->keys == NULL || f->orgs == NULL) {
        KL_LOGF(&d->logger, KL_WARN, "usage not flushed: out of memory");
        if (f != NULL)
            flushed_free(f);
        free(f);
        kl_cmd_free(c);
        return;                 /* the counts stay for the next flush */
    }
    for (uint32_t i = 0; i < u->len;) {
        entry *e = &u->items[i];
        if (e->successes == 0 && e->failures == 0) {
            if (now - e->active >= IDLE_MS && e->inflight == 0) {
                entry_drop(u, i);
                continue;
            }
            i++;
            continue;
        }
        kl_event ev = {.type = KL_EV_USAGE_RECORDED, .has = KL_F_ID | KL_F_USAGE,
                       .org = e->key->org->id, .id = e->key->id,
                       .usage_from = e->from, .usage_to = now,
                       .successes = e->successes, .failures = e->failures,
                       .last_used = e->last};
        for (uint32_t j = 0; j < e->nflows; j++) {
            flow_count *fc = &e->flows[j];
            if (fc->successes == 0 && fc->failures == 0)
                continue;
            ev.flows[ev.nflows] = (kl_str){fc->name, (uint32_t)strlen(fc->name)};
            ev.flow_successes[ev.nflows] = fc->successes;
            ev.flow_failures[ev.nflows++] = fc->failures;
            fc->successes = fc->failures = 0;
        }
        if (ev.nflows > 0)
            ev.has |= KL_F_FLOW_USAGE;
        if (kl_cmd_event(d, c, &ev) != KL_OK)
            KL_LOGF(&d->logger, KL_WARN, "usage of a key not recorded: out of memory");
        else if (e->successes > 0) {
            f->keys[f->nkeys].key = e->key;
            f->keys[f->nkeys++].n = e->successes;
            e->inflight += e->successes;
        }
        if (auth_failed(d, c, &e->key->org->id, &e->key->id, e->why, e->from,
                        now) != KL_OK)
            KL_LOGF(&d->logger, KL_WARN, "refusals not recorded: out of memory");
        memset(e->why, 0, sizeof e->why);
        e->successes = e->failures = 0;
        e->from = now;
        e->last = 0;
        i++;
    }
    for (uint32_t i = 0; i < u->norgs; i++) {
        org_entry *oe = &u->orgs[i];
        if (oe->pending == 0)
            continue;
        f->orgs[f->norgs].org = oe->org;
        f->orgs[f->norgs++].n = oe->pending;
        oe->inflight += oe->pending;
        oe->pending = 0;
    }
    static const kl_id none;
    if (auth_failed(d, c, &none, NULL, u->nameless, u->nameless_from, now) != KL_OK)
        KL_LOGF(&d->logger, KL_WARN, "refusals not recorded: out of memory");
    memset(u->nameless, 0, sizeof u->nameless);
    u->nameless_from = 0;
    c->data = f;
    c->data_free = flushed_free;
    c->decide = decide_nothing;
    c->render = flush_done;
    c->failed = flush_done;
    kl_cmd_submit(d, c);        /* with no events, it just ends */
}

static void on_flush_timer(uv_timer_t *t) { kl_usage_flush(t->data); }

int kl_usage_new(kl_daemon *d, unsigned interval_ms, kl_usage **out)
{
    kl_usage *u = calloc(1, sizeof *u);
    if (u == NULL)
        return KL_ENOMEM;
    u->d = d;
    int rc = uv_timer_init(d->loop, &u->timer);
    if (rc == 0) {
        u->timer.data = u;
        rc = uv_timer_start(&u->timer, on_flush_timer, interval_ms, interval_ms);
    }
    if (rc != 0) {
        free(u);
        return rc;
    }
    *out = u;
    return KL_OK;
}

static void on_closed(uv_handle_t *h)
{
    kl_usage *u = h->data;
    while (u->len > 0)
        entry_drop(u, u->len - 1);
    free(u->items);
    free(u->orgs);
    free(u);
}

void kl_usage_free(kl_usage *u)
{
    if (u != NULL)
        uv_close((uv_handle_t *)&u->timer, on_closed);
}
