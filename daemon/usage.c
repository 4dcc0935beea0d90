/*
 * Usage, rate limits and quotas.
 *
 * Every call with a key is counted in memory (accepted or refused, and by
 * flow when it named one) and once per flush interval the keys that were
 * used get one UsageRecorded event each, with one AuthFailed event per key
 * whose authentication was refused (by reason: the 401 hides it, the audit
 * history must not) and one for refusals that named no key. A crash loses
 * at most about one interval of counts; a clean stop flushes first. Nothing
 * on the request path waits for the disk or allocates once a key is in use:
 * a key's entry (with the flow names it has seen) lives on across flushes
 * until the key has been idle for IDLE_MS.
 *
 * A flush is a pass over the entries, in commands of at most CHUNK_EVENTS
 * events: building, framing and applying 10,000 events in one go would hold
 * the loop for many milliseconds (every verification waiting behind it),
 * one command of CHUNK_EVENTS for a fraction of one. The pass builds the
 * next command on the loop turn after the previous one is applied (an idle
 * handle), so at most one flush command is being written at a time, the
 * loop answers requests between any two, and user writes never queue
 * behind more than one. Each key's counts go out in exactly one command of
 * the pass, covering [from, the command's time], and the next period starts
 * there: nothing is counted twice, and a count made just after its key was
 * passed waits one interval (plus the pass's spread, a few milliseconds).
 * A clean stop writes everything at once (kl_usage_flush).
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

#include <assert.h>
#include <stdlib.h>
#include <string.h>

enum {
    ENTRY_FLOWS = 8,            /* flows counted apart per key and interval */
    MINUTE_MS = 60000,
    IDLE_MS = 2 * MINUTE_MS,    /* longer than any minute window */
    CHUNK_EVENTS = 256,         /* events per flush command (a key makes at
                                   most 2): applying them takes well under
                                   a millisecond */
    CHUNK_SCAN = 4096           /* entries a pass looks at per loop turn */
};

/* A sliding minute: calls in the current fixed minute and the one before. */
typedef struct window {
    int64_t start;
    uint32_t cur, prev;
} window;

typedef struct flow_count {
    char *name;
    uint32_t successes, failures;
    enum { FLOW_UNKNOWN = 0, FLOW_NAMED, FLOW_UNNAMED } named;  /* by the org */
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
    uint32_t new_flows;             /* flow names this pass gives the org */
    uint64_t inflight;              /* granted, being written */
} org_entry;

/* What one flush command is writing: taken off the in-flight counts once
 * its events are applied (or failed to be written). A key's successes and
 * what its org counted of them (norg: the same, but for an org entry that
 * ran out of memory) are in flight together. */
typedef struct flushed {
    uint64_t pass;              /* the pass it belongs to; 0: kl_usage_flush */
    bool last;                  /* the pass's last command */
    uint32_t nkeys;
    struct { kl_key *key; uint32_t n, norg; } keys[CHUNK_EVENTS];
} flushed;

struct kl_usage {
    kl_daemon *d;
    uv_timer_t timer;
    uv_idle_t step;             /* builds a pass's next command */
    uint64_t pass;              /* the pass under way (0: none); numbers
                                   only grow, so a command of an abandoned
                                   pass does not drive the current one */
    uint64_t passes;            /* passes begun */
    bool again;                 /* the timer fired during the pass */
    uint32_t cursor;            /* the next entry the pass looks at */
    uint64_t pass_t0;           /* uv_hrtime at the pass's start */
    uint32_t pass_events, pass_cmds;
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

/* An org's entry, found through its slot like a key's (every accepted
 * call comes here: no search); org entries live as long as the daemon. */
static org_entry *org_entry_for(kl_usage *u, kl_org *o)
{
    if (o->usage_slot != 0)
        return &u->orgs[o->usage_slot - 1];
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
    o->usage_slot = u->norgs;
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
        *f = (flow_count){name, 0, 0, FLOW_UNKNOWN};
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
    org_entry *oe = org_entry_for(u, kl_key_org(k));
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
    kl_org *o = kl_key_org(k);
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

static void pass_next(kl_usage *u);
static void pass_end(kl_usage *u);

/* A flush command's counts are in the projections now (or lost with a
 * failed write): no longer in flight. Then the pass goes on. */
static int chunk_done(kl_daemon *d, kl_cmd *c)
{
    kl_usage *u = d->usage;
    flushed *f = c->data;
    if (u == NULL)
        return 0;               /* shutting down: nothing counts any more */
    for (uint32_t i = 0; i < f->nkeys; i++) {
        kl_key *k = f->keys[i].key;
        /* An entry with successes in flight is never dropped. */
        if (k->usage_slot != 0)
            u->items[k->usage_slot - 1].inflight -= f->keys[i].n;
        if (f->keys[i].norg != 0) {
            org_entry *oe = org_entry_for(u, kl_key_org(k));
            if (oe != NULL)
                oe->inflight -= f->keys[i].norg;
        }
    }
    if (f->pass != 0 && f->pass == u->pass) {
        if (f->last)
            pass_end(u);
        else
            pass_next(u);
    }
    return 0;
}

/* A command to carry flush events, with its in-flight record. */
static int chunk_new(kl_usage *u, kl_cmd **out)
{
    kl_cmd *c = kl_cmd_new(u->d, NULL, NULL);
    flushed *f = malloc(sizeof *f);
    if (c == NULL || f == NULL) {
        free(f);
        kl_cmd_free(c);
        return KL_ENOMEM;
    }
    f->pass = 0;
    f->last = false;
    f->nkeys = 0;
    c->data = f;
    c->decide = decide_nothing;
    c->render = chunk_done;
    c->failed = chunk_done;
    *out = c;
    return KL_OK;
}

/* Whether the flow goes into the key's UsageRecorded: the log names no
 * more flows for an org than the org can name (KL_ORG_MAX_FLOWS), counting
 * the names this pass's events give it before they are applied, so its
 * names never depend on the order of its usage (which compaction changes).
 * A flow the org names stays named, and a full org stays full: those
 * answers stick to the entry's flow. */
static bool flow_logged(kl_usage *u, kl_org *org, flow_count *fc)
{
    if (fc->named != FLOW_UNKNOWN)
        return fc->named == FLOW_NAMED;
    if (kl_org_names_flow(org, fc->name, strlen(fc->name))) {
        fc->named = FLOW_NAMED;
        return true;
    }
    if (org->nflow_names == KL_ORG_MAX_FLOWS) {
        fc->named = FLOW_UNNAMED;   /* the org is full for good */
        return false;
    }
    org_entry *oe = org_entry_for(u, org);
    if (oe == NULL || org->nflow_names + oe->new_flows >= KL_ORG_MAX_FLOWS)
        return false;               /* maybe next time: names in flight */
    oe->new_flows++;                /* named once the event is applied */
    return true;
}

/* Moves one entry's counts into c: its UsageRecorded and AuthFailed
 * events, and its successes (the key's and its org's) into flight. */
static void entry_flush(kl_usage *u, entry *e, kl_cmd *c)
{
    kl_daemon *d = u->d;
    flushed *f = c->data;
    int64_t now = c->now;       /* the events' time */
    kl_event ev = {.type = KL_EV_USAGE_RECORDED, .has = KL_F_ID | KL_F_USAGE,
                   .org = kl_key_org(e->key)->id, .id = e->key->id,
                   .usage_from = e->from, .usage_to = now,
                   .successes = e->successes, .failures = e->failures,
                   .last_used = e->last};
    for (uint32_t j = 0; j < e->nflows; j++) {
        flow_count *fc = &e->flows[j];
        if ((fc->successes == 0 && fc->failures == 0) ||
            !flow_logged(u, kl_key_org(e->key), fc)) {
            fc->successes = fc->failures = 0;
            continue;
        }
        ev.flows[ev.nflows] = (kl_str){fc->name, (uint32_t)strlen(fc->name)};
        ev.flow_successes[ev.nflows] = fc->successes;
        ev.flow_failures[ev.nflows++] = fc->failures;
        fc->successes = fc->failures = 0;
    }
    if (ev.nflows > 0)
        ev.has |= KL_F_FLOW_USAGE;
    /* The org counted the same successes (unless it had no entry for
     * want of memory): they leave its pending count with the key's. */
    uint32_t norg = 0;
    org_entry *oe = e->successes > 0 ? org_entry_for(u, kl_key_org(e->key)) : NULL;
    if (oe != NULL) {
        norg = oe->pending < e->successes ? (uint32_t)oe->pending : e->successes;
        oe->pending -= norg;
    }
    if (kl_cmd_event(d, c, &ev) != KL_OK) {
        KL_LOGF(&d->logger, KL_WARN, "usage of a key not recorded: out of memory");
    } else if (e->successes > 0) {
        f->keys[f->nkeys].key = e->key;
        f->keys[f->nkeys].n = e->successes;
        f->keys[f->nkeys++].norg = norg;
        e->inflight += e->successes;
        if (oe != NULL)
            oe->inflight += norg;
    }
    if (auth_failed(d, c, &kl_key_org(e->key)->id, &e->key->id, e->why, e->from,
                    now) != KL_OK)
        KL_LOGF(&d->logger, KL_WARN, "refusals not recorded: out of memory");
    memset(e->why, 0, sizeof e->why);
    e->successes = e->failures = 0;
    e->from = now;
    e->last = 0;
}

/* Fills c from the entry at u->cursor on, until c is full or `scan`
 * entries were looked at; drops entries idle for IDLE_MS on the way.
 * Returns true when every entry was looked at and the refusals that named
 * no key are in c too. Entries only move when one is dropped (the last
 * takes its place, at the cursor) and new ones are added at the end, so a
 * pass looks at every entry once. */
static bool chunk_fill(kl_usage *u, kl_cmd *c, uint32_t scan)
{
    kl_daemon *d = u->d;
    while (u->cursor < u->len && scan > 0 && c->nevents + 2 <= CHUNK_EVENTS) {
        entry *e = &u->items[u->cursor];
        scan--;
        if (e->successes == 0 && e->failures == 0) {
            if (c->now - e->active >= IDLE_MS && e->inflight == 0)
                entry_drop(u, u->cursor);
            else
                u->cursor++;
            continue;
        }
        entry_flush(u, e, c);
        u->cursor++;
    }
    if (u->cursor < u->len || c->nevents >= CHUNK_EVENTS)
        return false;
    static const kl_id none;
    if (auth_failed(d, c, &none, NULL, u->nameless, u->nameless_from,
                    c->now) != KL_OK)
        KL_LOGF(&d->logger, KL_WARN, "refusals not recorded: out of memory");
    memset(u->nameless, 0, sizeof u->nameless);
    u->nameless_from = 0;
    return true;
}

/* ---- passes ------------------------------------------------------------ */

static void on_step(uv_idle_t *h);

static void pass_begin(kl_usage *u)
{
    u->pass = ++u->passes;
    u->cursor = 0;
    u->pass_t0 = uv_hrtime();
    u->pass_events = u->pass_cmds = 0;
    pass_next(u);
}

static void pass_end(kl_usage *u)
{
    KL_LOGF(&u->d->logger, KL_DEBUG, "usage flush: %u events in %u commands "
            "over %.1f ms", u->pass_events, u->pass_cmds,
            (double)(uv_hrtime() - u->pass_t0) / 1e6);
    u->pass = 0;
    /* Every event of the pass is applied (or lost): the orgs' names count
     * what they gave. */
    for (uint32_t i = 0; i < u->norgs; i++)
        u->orgs[i].new_flows = 0;
    if (u->again) {             /* the pass took longer than an interval */
        u->again = false;
        pass_begin(u);
    }
}

/* The next command, on the next loop turn: requests are read in between. */
static void pass_next(kl_usage *u)
{
    int rc = uv_idle_start(&u->step, on_step);
    assert(rc == 0);            /* only fails without a callback */
    (void)rc;
}

static void on_step(uv_idle_t *h)
{
    kl_usage *u = h->data;
    uv_idle_stop(h);
    if (u->pass == 0)
        return;
    kl_cmd *c;
    if (chunk_new(u, &c) != KL_OK) {
        KL_LOGF(&u->d->logger, KL_WARN, "usage not flushed: out of memory");
        u->again = false;
        pass_end(u);            /* the counts stay for the next pass */
        return;
    }
    bool last = chunk_fill(u, c, CHUNK_SCAN);
    if (c->nevents == 0) {      /* only idle entries this turn */
        kl_cmd_free(c);
        if (last)
            pass_end(u);
        else
            pass_next(u);
        return;
    }
    flushed *f = c->data;
    f->pass = u->pass;
    f->last = last;
    u->pass_events += c->nevents;
    u->pass_cmds++;
    /* No locks: decided at once; chunk_done goes on with the pass once
     * the events are applied (or the write failed). */
    kl_cmd_submit(u->d, c);
}

static void on_flush_timer(uv_timer_t *t)
{
    kl_usage *u = t->data;
    if (u->pass != 0)
        u->again = true;
    else
        pass_begin(u);
}

void kl_usage_flush(kl_usage *u)
{
    kl_daemon *d = u->d;
    /* Everything, now: a pass under way is abandoned (its command being
     * written still releases its counts) and this one starts over. */
    uv_idle_stop(&u->step);
    u->pass = 0;
    u->again = false;
    u->cursor = 0;
    for (bool last = false; !last;) {
        kl_cmd *c;
        if (chunk_new(u, &c) != KL_OK) {
            KL_LOGF(&d->logger, KL_WARN, "usage not flushed: out of memory");
            return;             /* the counts stay for the next flush */
        }
        last = chunk_fill(u, c, UINT32_MAX);
        if (c->nevents == 0)
            kl_cmd_free(c);
        else
            kl_cmd_submit(d, c);
    }
}

int kl_usage_new(kl_daemon *d, unsigned interval_ms, kl_usage **out)
{
    kl_usage *u = calloc(1, sizeof *u);
    if (u == NULL)
        return KL_ENOMEM;
    u->d = d;
    int rc = uv_timer_init(d->loop, &u->timer);
    if (rc == 0)
        rc = uv_idle_init(d->loop, &u->step);
    if (rc == 0) {
        u->timer.data = u;
        u->step.data = u;
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
    for (uint32_t i = 0; i < u->norgs; i++)
        u->orgs[i].org->usage_slot = 0;
    free(u->items);
    free(u->orgs);
    free(u);
}

static void on_timer_closed(uv_handle_t *h)
{
    kl_usage *u = h->data;
    uv_close((uv_handle_t *)&u->step, on_closed);
}

void kl_usage_free(kl_usage *u)
{
    if (u != NULL)
        uv_close((uv_handle_t *)&u->timer, on_timer_closed);
}
