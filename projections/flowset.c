/*
 * Interned flow lists. Keys with access "flows" name the flows they may
 * call, and the keys of an org mostly share a few such lists: each distinct
 * list is kept once, counted by the keys that hold it, and freed with the
 * last of them. A chained hash table over the list's names (in order: a
 * list is the same list only with the same names in the same order, the
 * order the key shows). The hash is seeded at random so that names read
 * from the network cannot be picked to share a chain.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static uint64_t list_hash(uint64_t seed, const kl_str *flows, uint32_t n)
{
    uint64_t h = seed ^ n;
    for (uint32_t i = 0; i < n; i++) {
        h = (h ^ flows[i].len) * 0x100000001b3ull;
        for (uint32_t j = 0; j < flows[i].len; j++)
            h = (h ^ (uint8_t)flows[i].ptr[j]) * 0x100000001b3ull;
    }
    return h ^ (h >> 29);
}

static bool same_list(const kl_flowset *f, const kl_str *flows, uint32_t n)
{
    if (f->n != n)
        return false;
    for (uint32_t i = 0; i < n; i++)
        if (strlen(f->flow[i]) != flows[i].len ||
            memcmp(f->flow[i], flows[i].ptr, flows[i].len) != 0)
            return false;
    return true;
}

static int grow(kl_flowsets *t)
{
    uint32_t cap = t->cap ? t->cap * 2 : 16;
    kl_flowset **b = calloc(cap, sizeof *b);
    if (b == NULL)
        return KL_ENOMEM;
    for (uint32_t i = 0; i < t->cap; i++) {
        for (kl_flowset *f = t->buckets[i], *next; f != NULL; f = next) {
            next = f->next;
            f->next = b[f->hash & (cap - 1)];
            b[f->hash & (cap - 1)] = f;
        }
    }
    free(t->buckets);
    t->buckets = b;
    t->cap = cap;
    return KL_OK;
}

int kl_flowsets_get(kl_flowsets *t, const kl_str *flows, uint32_t n,
                    const kl_flowset **out)
{
    if (t->cap == 0 && kl_random(&t->seed, sizeof t->seed) != KL_OK)
        return KL_ENOMEM;
    if (t->len >= t->cap && grow(t) != KL_OK)
        return KL_ENOMEM;
    uint64_t h = list_hash(t->seed, flows, n);
    kl_flowset **head = &t->buckets[h & (t->cap - 1)];
    for (kl_flowset *f = *head; f != NULL; f = f->next) {
        if (f->hash == h && same_list(f, flows, n)) {
            f->refs++;
            *out = f;
            return KL_OK;
        }
    }
    size_t size = sizeof(kl_flowset) + n * sizeof(char *);
    for (uint32_t i = 0; i < n; i++)
        size += flows[i].len + 1;
    kl_flowset *f = malloc(size);
    if (f == NULL)
        return KL_ENOMEM;
    f->hash = h;
    f->refs = 1;
    f->n = n;
    char *at = (char *)&f->flow[n];
    for (uint32_t i = 0; i < n; i++) {
        memcpy(at, flows[i].ptr, flows[i].len);
        at[flows[i].len] = '\0';
        f->flow[i] = at;
        at += flows[i].len + 1;
    }
    f->next = *head;
    *head = f;
    t->len++;
    *out = f;
    return KL_OK;
}

bool kl_flowset_is(const kl_flowset *set, const kl_str *flows, uint32_t n)
{
    return same_list(set, flows, n);
}

void kl_flowsets_hold(const kl_flowset *set, uint32_t more)
{
    ((kl_flowset *)set)->refs += more;
}

void kl_flowsets_put(kl_flowsets *t, const kl_flowset *set)
{
    if (set == NULL || --((kl_flowset *)set)->refs > 0)
        return;
    kl_flowset **at = &t->buckets[set->hash & (t->cap - 1)];
    while (*at != set)
        at = &(*at)->next;
    *at = set->next;
    t->len--;
    free((void *)set);
}

void kl_flowsets_free(kl_flowsets *t)
{
    for (uint32_t i = 0; i < t->cap; i++) {
        for (kl_flowset *f = t->buckets[i], *next; f != NULL; f = next) {
            next = f->next;
            free(f);
        }
    }
    free(t->buckets);
    memset(t, 0, sizeof *t);
}
