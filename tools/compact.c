/*
 * keyledger compact: rewrites the log into a snapshot plus a shorter log.
 *
 * UsageRecorded events that ended at or before the cutoff (now minus the
 * usage retention) are folded into one daily total per key and UTC day,
 * written where the last event it folds was (a key's only event of a day
 * stays as it is); every other event is kept, in
 * order, its body byte for byte. The new log goes on from the old one's
 * head: its first record's prev is the old head's hash, its seqs start
 * after the old head, and it ends with a LogCompacted record that names
 * that head and what was folded. The state it folds to is the old state,
 * except that usage before the cutoff is counted per day rather than per
 * hour (docs/log-format.md, "Compaction"). When there is nothing to fold,
 * the log is left as it is and only its snapshot is written.
 *
 * Steps: open the old log as its writer (the lock: not while the daemon
 * runs); read it once checking the whole chain and gathering the daily
 * totals; read it again writing the new log into DATA/compact.tmp and
 * folding it into a fresh state; write the snapshot of that state; commit
 * (kl_log_compact_commit: one rename, then the switch, which any later
 * writer finishes if a crash stops it).
 */
#include "tools.h"

#include "projections.h"

#include <dirent.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

enum { BATCH_BYTES = 4 << 20, MAX_RETENTION_DAYS = 36500 };
#define DAY_MS INT64_C(86400000)

/* ---- daily totals --------------------------------------------------- */

typedef struct flow_total {
    char *name;
    uint32_t len;
    uint64_t ok, failed;
    bool written;               /* in an event already (counts may be 0) */
} flow_total;

/* The folded usage of one key on one UTC day. */
typedef struct total {
    kl_id key, org;
    int64_t day;
    uint64_t last_seq;          /* where the daily total is written */
    uint32_t count;             /* events it folds (1: the event is kept) */
    int64_t from, to, last_used;
    uint64_t ok, failed;
    flow_total *flows;
    uint32_t nflows, cap_flows;
} total;

/* Open addressing over (key, day), holding indexes into `items`. */
typedef struct totals {
    total *items;
    size_t len, cap;
    uint32_t *slots;            /* index + 1; 0 = empty */
    size_t nslots;              /* a power of two, at least 2 * len */
} totals;

static uint64_t total_hash(const kl_id *key, int64_t day)
{
    uint64_t h;
    memcpy(&h, key->b + 8, sizeof h);  /* the id's random bits */
    return (h ^ (uint64_t)day) * UINT64_C(0x9e3779b97f4a7c15);
}

static int totals_grow(totals *t)
{
    size_t n = t->nslots ? 2 * t->nslots : 1024;
    uint32_t *slots = calloc(n, sizeof *slots);
    if (slots == NULL)
        return KL_ENOMEM;
    for (size_t i = 0; i < t->len; i++) {
        size_t s = total_hash(&t->items[i].key, t->items[i].day) & (n - 1);
        while (slots[s] != 0)
            s = (s + 1) & (n - 1);
        slots[s] = (uint32_t)(i + 1);
    }
    free(t->slots);
    t->slots = slots;
    t->nslots = n;
    return KL_OK;
}

/* The total of (key, day), made if `make`; NULL if absent (or no memory:
 * then *rc says so). */
static total *totals_get(totals *t, const kl_id *key, int64_t day, bool make, int *rc)
{
    *rc = KL_OK;
    if (t->nslots != 0) {
        size_t s = total_hash(key, day) & (t->nslots - 1);
        for (; t->slots[s] != 0; s = (s + 1) & (t->nslots - 1)) {
            total *x = &t->items[t->slots[s] - 1];
            if (x->day == day && kl_id_eq(&x->key, key))
                return x;
        }
    }
    if (!make)
        return NULL;
    if (t->len >= UINT32_MAX - 1 ||
        (2 * (t->len + 1) > t->nslots && totals_grow(t) != KL_OK)) {
        *rc = KL_ENOMEM;
        return NULL;
    }
    if (t->len == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 1024;
        total *items = realloc(t->items, cap * sizeof *items);
        if (items == NULL) {
            *rc = KL_ENOMEM;
            return NULL;
        }
        t->items = items;
        t->cap = cap;
    }
    total *x = &t->items[t->len++];
    memset(x, 0, sizeof *x);
    x->key = *key;
    x->day = day;
    size_t s = total_hash(key, day) & (t->nslots - 1);
    while (t->slots[s] != 0)
        s = (s + 1) & (t->nslots - 1);
    t->slots[s] = (uint32_t)t->len;
    return x;
}

static void totals_free(totals *t)
{
    for (size_t i = 0; i < t->len; i++) {
        for (uint32_t j = 0; j < t->items[i].nflows; j++)
            free(t->items[i].flows[j].name);
        free(t->items[i].flows);
    }
    free(t->items);
    free(t->slots);
}

static int total_add(total *x, const kl_event *ev, uint64_t seq)
{
    if (x->last_seq == 0 || ev->usage_from < x->from)
        x->from = ev->usage_from;
    if (ev->usage_to > x->to)
        x->to = ev->usage_to;
    if (ev->last_used > x->last_used)
        x->last_used = ev->last_used;
    x->org = ev->org;
    x->last_seq = seq;
    x->count++;
    x->ok += ev->successes;
    x->failed += ev->failures;
    for (uint32_t i = 0; (ev->has & KL_F_FLOW_USAGE) && i < ev->nflows; i++) {
        flow_total *f = NULL;
        for (uint32_t j = 0; j < x->nflows && f == NULL; j++)
            if (x->flows[j].len == ev->flows[i].len &&
                memcmp(x->flows[j].name, ev->flows[i].ptr, ev->flows[i].len) == 0)
                f = &x->flows[j];
        if (f == NULL) {
            if (x->nflows == x->cap_flows) {
                uint32_t cap = x->cap_flows ? 2 * x->cap_flows : 4;
                flow_total *fl = realloc(x->flows, cap * sizeof *fl);
                if (fl == NULL)
                    return KL_ENOMEM;
                x->flows = fl;
                x->cap_flows = cap;
            }
            f = &x->flows[x->nflows];
            *f = (flow_total){.name = malloc(ev->flows[i].len + 1u),
                              .len = ev->flows[i].len};
            if (f->name == NULL)
                return KL_ENOMEM;
            memcpy(f->name, ev->flows[i].ptr, f->len);
            x->nflows++;
        }
        f->ok += ev->flow_successes[i];
        f->failed += ev->flow_failures[i];
    }
    return KL_OK;
}

/* ---- the rewrite ------------------------------------------------------ */

typedef struct compact {
    int64_t cutoff;             /* usage that ended at or before it is folded */
    totals totals;
    uint64_t old_head, folded, written_totals;
    kl_log *out;                /* the new log, in compact.tmp */
    uint64_t next_seq;          /* what the next record held will be */
    kl_proj *proj;              /* the new log's state */
    kl_buf batch;
    kl_log_mark batch_start;
    /* The last record framed: its `more` is settled only when the next
     * record comes (or its old group ends), so it is held here. */
    kl_buf held;
    bool holding, held_more;
    kl_event ev;                /* scratch: decoding and daily totals */
    kl_err err;
    uint64_t started_ms, progress_ms, seen;
} compact;

static bool folded(const compact *c, const kl_event *ev)
{
    return ev->type == KL_EV_USAGE_RECORDED && ev->usage_to <= c->cutoff;
}

static void progress(compact *c, const char *what, uint64_t seq)
{
    if (++c->seen % 4096 != 0)
        return;
    uint64_t now = (uint64_t)kl_now_ms();
    if (now - c->progress_ms < 2000)
        return;
    c->progress_ms = now;
    fprintf(stderr, "keyledger compact: %s record %" PRIu64 " of %" PRIu64 " (%.0f s)\n",
            what, seq, c->old_head, (double)(now - c->started_ms) / 1000.0);
}

/* Pass 1: the chain is checked by the replay itself; gather the totals. */
static int gather(uint64_t seq, const uint8_t *payload, size_t len,
                  const uint8_t hash[KL_HASH_LEN], void *arg)
{
    (void)hash;
    compact *c = arg;
    kl_record_head head;
    int rc = kl_event_decode(payload, len, &head, &c->ev, &c->err);
    progress(c, "checking", seq);
    if (rc != KL_OK || !folded(c, &c->ev))
        return rc;
    total *x = totals_get(&c->totals, &c->ev.id, kl_time_day_start(c->ev.usage_from),
                          true, &rc);
    return x == NULL ? rc : total_add(x, &c->ev, seq);
}

/* Frames the held record, if any, into the batch; writes the batch when it
 * is big and ends on a whole command. */
static int flush_held(compact *c)
{
    if (!c->holding)
        return KL_OK;
    c->holding = false;
    uint64_t seq;
    int rc = kl_log_frame(c->out, (const uint8_t *)c->held.data, c->held.len,
                          c->held_more, &c->batch, &seq);
    if (rc == KL_OK && !c->held_more && c->batch.len >= BATCH_BYTES) {
        rc = kl_log_write(c->out, &c->batch, &c->batch_start, &c->err);
        c->batch.len = 0;
        kl_log_mark_get(c->out, &c->batch_start);
    }
    if (rc == KL_EINVAL)
        kl_err_set(&c->err, "record %" PRIu64 " does not fit a record", seq);
    return rc;
}

/* Holds `body`, the encoding of ev, as the next record of the new log (the
 * one held before is framed first, as part of the same command), and folds
 * ev into the new state with the seq the record will have: only its `more`
 * is left to settle, and the fold does not read that. */
static int hold(compact *c, const void *body, size_t len, kl_event *ev)
{
    int rc = flush_held(c);
    if (rc != KL_OK)
        return rc;
    ev->seq = c->next_seq++;
    if ((rc = kl_proj_apply(c->proj, ev, &c->err)) != KL_OK)
        return rc;
    c->held.len = 0;
    if (kl_buf_append(&c->held, body, len) != KL_OK)
        return KL_ENOMEM;
    c->holding = true;
    c->held_more = true;
    return KL_OK;
}

static uint32_t take(uint64_t *n)
{
    uint32_t t = *n > UINT32_MAX ? UINT32_MAX : (uint32_t)*n;
    *n -= t;
    return t;
}

/* Holds the daily total(s) of x: one event, or more when a count passes
 * 32 bits or there are more than KL_MAX_FLOWS flows. */
static int hold_total(compact *c, total *x, const kl_event *last)
{
    kl_buf body = {0};
    int rc = KL_OK;
    bool more;
    do {
        kl_event *ev = &c->ev;
        memset(ev, 0, sizeof *ev);
        ev->type = KL_EV_USAGE_RECORDED;
        ev->ts = last->ts;
        ev->org = x->org;
        ev->actor = last->actor;
        ev->has = KL_F_ID | KL_F_USAGE;
        ev->id = x->key;
        ev->usage_from = x->from;
        ev->usage_to = x->to;
        ev->last_used = x->last_used;
        ev->successes = take(&x->ok);
        ev->failures = take(&x->failed);
        more = x->ok != 0 || x->failed != 0;
        for (uint32_t j = 0; j < x->nflows; j++) {
            flow_total *f = &x->flows[j];
            if (f->written && f->ok == 0 && f->failed == 0)
                continue;
            if (ev->nflows == KL_MAX_FLOWS) {
                more = true;
                break;
            }
            ev->has |= KL_F_FLOW_USAGE;
            ev->flows[ev->nflows] = (kl_str){f->name, f->len};
            ev->flow_successes[ev->nflows] = take(&f->ok);
            ev->flow_failures[ev->nflows] = take(&f->failed);
            ev->nflows++;
            f->written = true;
            more = more || f->ok != 0 || f->failed != 0;
        }
        body.len = 0;
        rc = kl_event_encode(ev, &body);
        if (rc == KL_OK)
            rc = hold(c, body.data, body.len, ev);
        c->written_totals++;
    } while (rc == KL_OK && more);
    kl_buf_free(&body);
    return rc;
}

/* Pass 2: every record in order, kept or folded, into the new log. */
static int rewrite(uint64_t seq, const uint8_t *payload, size_t len,
                   const uint8_t hash[KL_HASH_LEN], void *arg)
{
    (void)hash;
    compact *c = arg;
    kl_record_head head;
    int rc = kl_event_decode(payload, len, &head, &c->ev, &c->err);
    if (rc != KL_OK)
        return rc;
    progress(c, "rewriting", seq);
    total *x = NULL;
    if (folded(c, &c->ev)) {
        x = totals_get(&c->totals, &c->ev.id, kl_time_day_start(c->ev.usage_from),
                       false, &rc);
        if (x == NULL) {
            kl_err_set(&c->err, "seq %" PRIu64 ": usage that the first reading "
                       "did not see (the log changed)", seq);
            return KL_ECORRUPT;
        }
    }
    /* Kept as it is: any other event, and usage alone on its key and day. */
    if (x == NULL || x->count == 1) {
        rc = hold(c, payload + KL_RECORD_PREFIX_LEN, len - KL_RECORD_PREFIX_LEN, &c->ev);
    } else {
        c->folded++;
        if (x->last_seq == seq) {
            kl_event last = c->ev;      /* hold_total reuses c->ev */
            rc = hold_total(c, x, &last);
        }
    }
    /* The old command ends here: so does the new one. */
    if (rc == KL_OK && !head.more)
        c->held_more = false;
    return rc;
}

/* ---- the command ------------------------------------------------------ */

/* Bytes of the segment files in dir. */
static uint64_t segments_bytes(const char *dir)
{
    uint64_t n = 0;
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d != NULL && (e = readdir(d)) != NULL) {
        size_t l = strlen(e->d_name);
        struct stat st;
        char path[4096];
        if (l == 24 && strcmp(e->d_name + 20, ".log") == 0 &&
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name) < (int)sizeof path &&
            stat(path, &st) == 0)
            n += (uint64_t)st.st_size;
    }
    if (d != NULL)
        closedir(d);
    return n;
}

static int usage(void)
{
    fprintf(stderr, "usage: keyledger compact --data DIR [--usage-retention-days N]\n");
    return 2;
}

/* Writes the new log and its snapshot into `stage`; on success the new
 * head is in *head_seq / head_hash. */
static int build(compact *c, kl_log *old, const char *stage, const kl_logger *lg,
                 uint64_t *head_seq, uint8_t head_hash[KL_HASH_LEN])
{
    uint8_t old_hash[KL_HASH_LEN];
    uint64_t old_head = c->old_head;
    kl_log_head_hash(old, old_hash);
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = stage;
    cfg.logger = lg;
    kl_log_recovery rec;
    int rc = kl_log_create_after(&cfg, old_head, old_hash, &c->err);
    if (rc == KL_OK)
        rc = kl_log_open(&c->out, &cfg, &rec, &c->err);
    if (rc == KL_OK)
        rc = kl_proj_new(&c->proj);
    if (rc != KL_OK)
        return rc;
    kl_log_mark_get(c->out, &c->batch_start);
    c->next_seq = old_head + 1;
    rc = kl_log_replay(old, 0, false, rewrite, c, &c->err);
    if (rc == KL_OK)
        rc = flush_held(c);
    if (rc == KL_OK) {
        kl_event *ev = &c->ev;
        memset(ev, 0, sizeof *ev);
        ev->type = KL_EV_LOG_COMPACTED;
        ev->ts = kl_now_ms();
        ev->actor.type = KL_PRINCIPAL_SYSTEM;
        ev->has = KL_F_COMPACT;
        ev->compact.through_seq = old_head;
        memcpy(ev->compact.through_hash, old_hash, KL_HASH_LEN);
        ev->compact.cutoff = c->cutoff;
        ev->compact.folded = c->folded;
        ev->compact.totals = c->written_totals;
        rc = kl_log_frame_event(c->out, ev, false, &c->batch);
        ev->seq = c->next_seq;
        if (rc == KL_OK)
            rc = kl_proj_apply(c->proj, ev, &c->err);
    }
    if (rc == KL_OK)
        rc = kl_log_write(c->out, &c->batch, &c->batch_start, &c->err);
    kl_buf snap = {0};
    *head_seq = kl_log_head_seq(c->out);
    kl_log_head_hash(c->out, head_hash);
    if (rc == KL_OK)
        rc = kl_proj_snapshot(c->proj, &snap);
    if (rc == KL_OK)
        rc = kl_snapshot_write(stage, *head_seq, head_hash, snap.data, snap.len, &c->err);
    kl_buf_free(&snap);
    kl_log_close(c->out);
    c->out = NULL;
    return rc;
}

/* Whether any key has two usage events or more on a day before the
 * cutoff: otherwise a rewrite would fold nothing. */
static bool anything_to_fold(const totals *t)
{
    for (size_t i = 0; i < t->len; i++)
        if (t->items[i].count > 1)
            return true;
    return false;
}

/* Nothing to fold: the log stays as it is, so every seq, hash and audit
 * cursor stays valid, and only the snapshot of its head is written. */
static int snapshot_only(compact *c, kl_log *old, const char *data, const kl_logger *lg,
                         uint64_t *head_seq, uint8_t head_hash[KL_HASH_LEN])
{
    *head_seq = kl_log_head_seq(old);
    kl_log_head_hash(old, head_hash);
    if (*head_seq == 0)
        return KL_OK;           /* an empty log has no state to keep */
    uint64_t bytes;
    return kl_tool_write_snapshot(old, data, lg, &bytes, &c->err);
}

int kl_tool_compact(int argc, char **argv)
{
    static const struct option opts[] = {
        {"data", required_argument, NULL, 'd'},
        {"usage-retention-days", required_argument, NULL, 'r'},
        {NULL, 0, NULL, 0},
    };
    const char *data = NULL;
    long days = 90;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        char *end;
        if (ch == 'd') {
            data = optarg;
        } else if (ch == 'r') {
            days = strtol(optarg, &end, 10);
            if (end == optarg || *end != '\0' || days < 0 || days > MAX_RETENTION_DAYS) {
                fprintf(stderr, "keyledger: --usage-retention-days takes 0 to %d\n",
                        MAX_RETENTION_DAYS);
                return 2;
            }
        } else {
            return usage();
        }
    }
    if (optind != argc || data == NULL)
        return usage();

    kl_logger lg = {KL_WARN, NULL};
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = data;
    cfg.logger = &lg;
    kl_log *old = NULL;
    kl_log_recovery rec;
    compact c = {0};
    c.started_ms = (uint64_t)kl_now_ms();
    c.progress_ms = c.started_ms;
    c.cutoff = (int64_t)c.started_ms - days * DAY_MS;
    char *stage = NULL;
    uint64_t before_bytes = 0, events_before = 0, head_seq = 0;
    uint8_t head_hash[KL_HASH_LEN];
    int rc = kl_log_open(&old, &cfg, &rec, &c.err);
    if (rc == KL_OK) {
        before_bytes = segments_bytes(data);
        c.old_head = kl_log_head_seq(old);
        events_before = c.old_head + 1 - kl_log_first_seq(old);
        rc = kl_log_replay(old, 0, true, gather, &c, &c.err);
    }
    bool rewrite = rc == KL_OK && anything_to_fold(&c.totals);
    if (rc == KL_OK && !rewrite)
        rc = snapshot_only(&c, old, data, &lg, &head_seq, head_hash);
    if (rewrite && (stage = kl_log_compact_prepare(data, &c.err)) == NULL)
        rc = KL_EIO;
    if (rewrite && rc == KL_OK)
        rc = build(&c, old, stage, &lg, &head_seq, head_hash);
    if (rewrite && rc == KL_OK)
        rc = kl_log_compact_commit(data, &lg, &c.err);
    else if (stage != NULL)
        kl_log_compact_abandon(data);   /* the old log stays the log */
    if (rc == KL_OK) {
        char hex[2 * KL_HASH_LEN + 1], snap[4096];
        kl_hex(head_hash, KL_HASH_LEN, hex);
        struct stat st;
        snprintf(snap, sizeof snap, "%s/snapshot-%020" PRIu64 ".kls", data, head_seq);
        uint64_t snap_bytes = stat(snap, &st) == 0 ? (uint64_t)st.st_size : 0;
        uint64_t events_after = rewrite ? head_seq - c.old_head : events_before;
        printf("{\"events_before\":%" PRIu64 ",\"events_after\":%" PRIu64
               ",\"usage_events_folded\":%" PRIu64 ",\"daily_totals\":%" PRIu64
               ",\"bytes_before\":%" PRIu64 ",\"bytes_after\":%" PRIu64
               ",\"head_seq\":%" PRIu64 ",\"head_hash\":\"%s\""
               ",\"snapshot\":\"snapshot-%020" PRIu64 ".kls\",\"snapshot_bytes\":%" PRIu64
               ",\"seconds\":%.3f}\n",
               events_before, events_after, c.folded,
               c.written_totals, before_bytes, segments_bytes(data), head_seq, hex,
               head_seq, snap_bytes,
               (double)((uint64_t)kl_now_ms() - c.started_ms) / 1000.0);
    } else {
        fprintf(stderr, "keyledger: %s%s\n",
                rc == KL_ENOMEM ? "out of memory" : c.err.msg,
                c.err.segment[0] ? " (see keyledger verify)" : "");
    }
    free(stage);
    kl_buf_free(&c.batch);
    kl_buf_free(&c.held);
    kl_proj_free(c.proj);
    totals_free(&c.totals);
    kl_log_close(old);
    return rc == KL_OK ? 0 : 1;
}
