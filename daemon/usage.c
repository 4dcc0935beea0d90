/*
 * Usage of keys: every call with a key is counted in memory (accepted or
 * refused) and once per flush interval each key that was used gets one
 * UsageRecorded event with its counts and last use. A crash loses at most
 * one interval of counts; a clean stop flushes first. Nothing on the
 * request path waits for the disk.
 */
#include "daemon.h"

#include <stdlib.h>
#include <string.h>

typedef struct entry {
    kl_key *key;
    uint32_t successes, failures;
    int64_t from, last;
} entry;

struct kl_usage {
    kl_daemon *d;
    uv_timer_t timer;
    entry *items;               /* keys used since the last flush */
    uint32_t len, cap;
};

void kl_usage_note(kl_usage *u, kl_key *k, bool accepted, int64_t now)
{
    entry *e;
    if (k->usage_slot != 0) {
        e = &u->items[k->usage_slot - 1];
    } else {
        if (u->len == u->cap) {
            uint32_t cap = u->cap ? u->cap * 2 : 64;
            entry *items = realloc(u->items, cap * sizeof *items);
            if (items == NULL)
                return;         /* counts are best effort under no memory */
            u->items = items;
            u->cap = cap;
        }
        e = &u->items[u->len++];
        *e = (entry){.key = k, .from = now};
        k->usage_slot = u->len;
    }
    if (accepted) {
        e->successes++;
        e->last = now;
    } else {
        e->failures++;
    }
}

static int decide_usage(kl_daemon *d, kl_cmd *c)
{
    const entry *e = c->data;
    kl_event ev = {.type = KL_EV_USAGE_RECORDED, .has = KL_F_ID | KL_F_USAGE,
                   .id = e->key->id, .usage_from = e->from, .usage_to = c->now,
                   .successes = e->successes, .failures = e->failures,
                   .last_used = e->last};
    return kl_cmd_event(d, c, &ev) == KL_OK ? 0 : -1;
}

void kl_usage_flush(kl_usage *u)
{
    kl_daemon *d = u->d;
    for (uint32_t i = 0; i < u->len; i++) {
        entry *e = &u->items[i];
        e->key->usage_slot = 0;
        kl_cmd *c = kl_cmd_new(d, NULL, NULL);
        entry *copy = malloc(sizeof *copy);
        if (c == NULL || copy == NULL) {
            free(copy);
            kl_cmd_free(c);
            continue;
        }
        *copy = *e;
        c->caller.org = e->key->org;
        c->data = copy;
        c->decide = decide_usage;
        kl_cmd_submit(d, c);
    }
    u->len = 0;
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
    free(u->items);
    free(u);
}

void kl_usage_free(kl_usage *u)
{
    if (u != NULL)
        uv_close((uv_handle_t *)&u->timer, on_closed);
}
