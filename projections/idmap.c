/*
 * An open-addressing hash map from 16-byte ids to entities, the index behind
 * every lookup by id. Every entity struct begins with its kl_id, so a slot
 * holds only the pointer (8 bytes a slot, not 24: this index is a good part
 * of the memory per key). A user-space pointer uses the low 48 bits of its
 * 64 (x86-64 and arm64 Linux hand out no higher addresses unless asked), so
 * the top 16 bits of a slot hold 16 bits of its id's hash: a probe compares
 * those and follows the pointer only when they match, so a lookup touches
 * one entity, not one per probe, and the map can be 80% full. Linear
 * probing, power-of-two capacity, no deletion (ids are never reused: a
 * deleted entity keeps its slot).
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#define ADDR_BITS 48
#define ADDR_MASK ((UINT64_C(1) << ADDR_BITS) - 1)

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
 * spread, and so ids read from disk cannot be arranged to collide cheaply.
 * The low bits pick the slot, the top 16 are the slot's tag. */
static uint64_t id_hash(const kl_id *id)
{
    uint64_t a, b;
    memcpy(&a, id->b, 8);
    memcpy(&b, id->b + 8, 8);
    return fmix64(a ^ fmix64(b));
}

static uint64_t tag_of(uint64_t hash) { return hash & ~ADDR_MASK; }
static void *entity_of(uint64_t slot) { return (void *)(uintptr_t)(slot & ADDR_MASK); }

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

static int resize(kl_idmap *m, uint32_t cap)
{
    size_t size = (size_t)cap * sizeof(uint64_t);
    uint64_t *slots = kl_big_alloc(size);
    if (slots == NULL)
        return KL_ENOMEM;
    memset(slots, 0, size);
    for (uint32_t i = 0; i < m->cap; i++) {
        if (m->slots[i] == 0)
            continue;
        uint32_t j = (uint32_t)id_hash(entity_of(m->slots[i])) & (cap - 1);
        while (slots[j] != 0)
            j = (j + 1) & (cap - 1);
        slots[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return KL_OK;
}

static bool full(uint64_t len, uint64_t cap)
{
    return len * 5 > cap * 4;
}

int kl_idmap_reserve(kl_idmap *m, uint32_t n)
{
    uint64_t cap = m->cap ? m->cap : 64;
    while (full(n, cap))
        cap *= 2;
    if (cap > UINT32_C(1) << 31)
        return KL_ENOMEM;
    return cap > m->cap ? resize(m, (uint32_t)cap) : KL_OK;
}

/* Where id (of hash h) is, or the empty slot it would go to. */
static uint32_t find(const kl_idmap *m, const kl_id *id, uint64_t h)
{
    uint64_t tag = tag_of(h);
    uint32_t j = (uint32_t)h & (m->cap - 1);
    for (;; j = (j + 1) & (m->cap - 1)) {
        uint64_t s = m->slots[j];
        if (s == 0 || (tag_of(s) == tag && id_same(entity_of(s), id)))
            return j;
    }
}

void *kl_idmap_get(const kl_idmap *m, const kl_id *id)
{
    return m->cap == 0 ? NULL : entity_of(m->slots[find(m, id, id_hash(id))]);
}

void *kl_idmap_at(const kl_idmap *m, uint32_t i)
{
    return entity_of(m->slots[i]);
}

static int insert(kl_idmap *m, void *entity, uint64_t h, bool replace)
{
    uint64_t addr = (uintptr_t)entity;
    if ((addr & ~ADDR_MASK) != 0)
        return KL_ENOMEM;       /* an address this map cannot hold */
    if (full((uint64_t)m->len + 1, m->cap) &&
        resize(m, m->cap ? m->cap * 2 : 64) != KL_OK)
        return KL_ENOMEM;
    uint32_t j = find(m, entity, h);
    if (m->slots[j] != 0) {
        if (!replace)
            return KL_EEXIST;
    } else {
        m->len++;
    }
    m->slots[j] = tag_of(h) | addr;
    return KL_OK;
}

int kl_idmap_put(kl_idmap *m, void *entity)
{
    return insert(m, entity, id_hash(entity), true);
}

int kl_idmap_add(kl_idmap *m, void *entity)
{
    return insert(m, entity, id_hash(entity), false);
}

uint64_t kl_idmap_prefetch(const kl_idmap *m, const kl_id *id)
{
    uint64_t h = id_hash(id);
    __builtin_prefetch(&m->slots[(uint32_t)h & (m->cap - 1)], 1);
    return h;
}

bool kl_idmap_has_room(const kl_idmap *m, uint32_t n)
{
    return m->cap > 0 && !full((uint64_t)m->len + n, m->cap);
}

/* As insert, but a slot is taken with a compare-and-swap: two threads
 * adding at once each see the other's entries (an id added by both is
 * KL_EEXIST for one of them). The entity's bytes are published with its
 * slot (release), read after it (acquire). */
int kl_idmap_add_concurrent(kl_idmap *m, void *entity, uint64_t h)
{
    uint64_t addr = (uintptr_t)entity;
    if ((addr & ~ADDR_MASK) != 0)
        return KL_ENOMEM;
    const kl_id *id = entity;
    uint64_t tag = tag_of(h);
    for (uint32_t j = (uint32_t)h & (m->cap - 1);; j = (j + 1) & (m->cap - 1)) {
        uint64_t s = __atomic_load_n(&m->slots[j], __ATOMIC_ACQUIRE);
        while (s == 0) {
            if (__atomic_compare_exchange_n(&m->slots[j], &s, tag | addr, false,
                                            __ATOMIC_RELEASE, __ATOMIC_ACQUIRE))
                return KL_OK;
        }
        if (tag_of(s) == tag && id_same(entity_of(s), id))
            return KL_EEXIST;
    }
}

void kl_idmap_count_added(kl_idmap *m, uint32_t n)
{
    m->len += n;
}
