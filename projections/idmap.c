/*
 * An open-addressing hash map from 16-byte ids to pointers, the index behind
 * every lookup by id. Linear probing, power-of-two capacity, at most 70%
 * full, no deletion (ids are never reused: a deleted entity keeps its slot).
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static uint64_t id_hash(const kl_id *id)
{
    /* Ids are partly time, partly random; mix all 16 bytes so ids read from
     * disk cannot be arranged to collide cheaply. */
    uint64_t a, b;
    memcpy(&a, id->b, 8);
    memcpy(&b, id->b + 8, 8);
    uint64_t h = (a ^ 0x9e3779b97f4a7c15ull) * 0xbf58476d1ce4e5b9ull;
    h ^= b + 0x94d049bb133111ebull + (h << 6) + (h >> 2);
    h ^= h >> 31;
    h *= 0x94d049bb133111ebull;
    return h ^ (h >> 29);
}

void kl_idmap_free(kl_idmap *m)
{
    free(m->slots);
    memset(m, 0, sizeof *m);
}

static int grow(kl_idmap *m)
{
    uint32_t cap = m->cap ? m->cap * 2 : 64;
    kl_idmap_slot *slots = calloc(cap, sizeof *slots);
    if (slots == NULL)
        return KL_ENOMEM;
    for (uint32_t i = 0; i < m->cap; i++) {
        if (m->slots[i].value == NULL)
            continue;
        uint32_t j = (uint32_t)id_hash(&m->slots[i].id) & (cap - 1);
        while (slots[j].value != NULL)
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
    while (m->slots[j].value != NULL) {
        if (kl_id_eq(&m->slots[j].id, id))
            return m->slots[j].value;
        j = (j + 1) & (m->cap - 1);
    }
    return NULL;
}

int kl_idmap_put(kl_idmap *m, const kl_id *id, void *value)
{
    if ((uint64_t)(m->len + 1) * 10 > (uint64_t)m->cap * 7 && grow(m) != KL_OK)
        return KL_ENOMEM;
    uint32_t j = (uint32_t)id_hash(id) & (m->cap - 1);
    while (m->slots[j].value != NULL) {
        if (kl_id_eq(&m->slots[j].id, id)) {
            m->slots[j].value = value;
            return KL_OK;
        }
        j = (j + 1) & (m->cap - 1);
    }
    m->slots[j].id = *id;
    m->slots[j].value = value;
    m->len++;
    return KL_OK;
}
