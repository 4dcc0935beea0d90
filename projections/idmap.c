/*
 * An open-addressing hash map from 16-byte ids to entities, the index behind
 * every lookup by id. Every entity struct begins with its kl_id, so a slot
 * holds only the pointer (8 bytes a slot, not 24: this index is a good part
 * of the memory per key). Linear probing, power-of-two capacity, at most 70%
 * full, no deletion (ids are never reused: a deleted entity keeps its slot).
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static uint64_t fmix64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ull;
    return k ^ (k >> 33);
}

/* Ids are partly time, partly random, and consecutive ids differ only in
 * their last bits: mix all 16 bytes (MurmurHash3's finalizer) so they
 * spread, and so ids read from disk cannot be arranged to collide cheaply. */
static uint64_t id_hash(const kl_id *id)
{
    uint64_t a, b;
    memcpy(&a, id->b, 8);
    memcpy(&b, id->b + 8, 8);
    return fmix64(a ^ fmix64(b));
}

static bool id_same(const kl_id *x, const kl_id *y)
{
    uint64_t a0, a1, b0, b1;
    memcpy(&a0, x->b, 8);
    memcpy(&a1, x->b + 8, 8);
    memcpy(&b0, y->b, 8);
    memcpy(&b1, y->b + 8, 8);
    return ((a0 ^ b0) | (a1 ^ b1)) == 0;
}

void kl_idmap_free(kl_idmap *m)
{
    free(m->slots);
    memset(m, 0, sizeof *m);
}

static int grow(kl_idmap *m)
{
    uint32_t cap = m->cap ? m->cap * 2 : 64;
    void **slots = calloc(cap, sizeof *slots);
    if (slots == NULL)
        return KL_ENOMEM;
    for (uint32_t i = 0; i < m->cap; i++) {
        if (m->slots[i] == NULL)
            continue;
        uint32_t j = (uint32_t)id_hash(m->slots[i]) & (cap - 1);
        while (slots[j] != NULL)
            j = (j + 1) & (cap - 1);
        slots[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return KL_OK;
}

void *kl_idmap_get(const kl_idmap *m, const kl_id *id)
{
    if (m->cap == 0)
        return NULL;
    uint32_t j = (uint32_t)id_hash(id) & (m->cap - 1);
    while (m->slots[j] != NULL) {
        if (id_same(m->slots[j], id))
            return m->slots[j];
        j = (j + 1) & (m->cap - 1);
    }
    return NULL;
}

int kl_idmap_put(kl_idmap *m, void *entity)
{
    if ((uint64_t)(m->len + 1) * 10 > (uint64_t)m->cap * 7 && grow(m) != KL_OK)
        return KL_ENOMEM;
    const kl_id *id = entity;
    uint32_t j = (uint32_t)id_hash(id) & (m->cap - 1);
    while (m->slots[j] != NULL) {
        if (id_same(m->slots[j], id)) {
            m->slots[j] = entity;
            return KL_OK;
        }
        j = (j + 1) & (m->cap - 1);
    }
    m->slots[j] = entity;
    m->len++;
    return KL_OK;
}
