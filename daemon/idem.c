/*
 * Answers to requests that carried an Idempotency-Key, kept in memory for
 * 24 hours so a retry gets the very same bytes (including a new key's
 * secret, which is never written to disk). After a restart the log's
 * idempotency records still catch retries; the answer is then rebuilt from
 * the state (api.c).
 *
 * A chained hash table by slot, plus a FIFO list in insertion order: the
 * oldest entries expire from the front on every put.
 */
#include "daemon.h"

#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

enum { TTL_MS = 24 * 3600 * 1000, BUCKETS = 4096 };

typedef struct entry {
    struct entry *chain;        /* next in the bucket */
    struct entry *older, *newer;/* FIFO */
    kl_id slot;
    int status;
    int64_t at;
    size_t len;
    char body[];
} entry;

struct kl_idem_cache {
    entry *buckets[BUCKETS];
    entry *oldest, *newest;
};

static unsigned bucket_of(const kl_id *slot)
{
    /* Slots are SHA-256 output: any bytes are uniform. */
    return ((unsigned)slot->b[0] << 8 | slot->b[1]) % BUCKETS;
}

int kl_idem_cache_new(kl_idem_cache **out)
{
    *out = calloc(1, sizeof **out);
    return *out != NULL ? KL_OK : KL_ENOMEM;
}

static void unlink_entry(kl_idem_cache *c, entry *e)
{
    entry **pp = &c->buckets[bucket_of(&e->slot)];
    while (*pp != e)
        pp = &(*pp)->chain;
    *pp = e->chain;
    if (e->older != NULL)
        e->older->newer = e->newer;
    else
        c->oldest = e->newer;
    if (e->newer != NULL)
        e->newer->older = e->older;
    else
        c->newest = e->older;
    OPENSSL_cleanse(e->body, e->len);
    free(e);
}

void kl_idem_cache_free(kl_idem_cache *c)
{
    if (c == NULL)
        return;
    while (c->oldest != NULL)
        unlink_entry(c, c->oldest);
    free(c);
}

void kl_idem_cache_put(kl_idem_cache *c, const kl_id *slot, int status,
                       const char *body, size_t len, int64_t now)
{
    while (c->oldest != NULL && c->oldest->at + TTL_MS <= now)
        unlink_entry(c, c->oldest);
    entry *e = malloc(sizeof *e + len);
    if (e == NULL)
        return;                 /* a later retry is answered from the state */
    e->slot = *slot;
    e->status = status;
    e->at = now;
    e->len = len;
    if (len != 0)
        memcpy(e->body, body, len);
    unsigned b = bucket_of(slot);
    e->chain = c->buckets[b];
    c->buckets[b] = e;
    e->older = c->newest;
    e->newer = NULL;
    if (c->newest != NULL)
        c->newest->newer = e;
    else
        c->oldest = e;
    c->newest = e;
}

int kl_idem_cache_get(kl_idem_cache *c, const kl_id *slot, int64_t now,
                      const char **body, size_t *len, int *status)
{
    for (entry *e = c->buckets[bucket_of(slot)]; e != NULL; e = e->chain) {
        if (kl_id_eq(&e->slot, slot) && e->at + TTL_MS > now) {
            *body = e->body;
            *len = e->len;
            *status = e->status;
            return 0;
        }
    }
    return -1;
}
