/*
 * Where keys live. A key is never freed on its own (a deleted key keeps its
 * id, its usage and its place in the audit), so keys are cut from blocks,
 * each a run of structs with no malloc header or rounding between them. A
 * block holds twice the keys of the one before, up to MAX_BLOCK; a snapshot
 * that knows how many keys it holds asks for one block of them all, and a
 * second thread faults that block in while the loader fills it (on a VM
 * the host backs memory on first touch: most of what loading a million
 * keys costs).
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

enum { MIN_BLOCK = 64, MAX_BLOCK = 16384 };

struct kl_key_block {
    kl_key_block *older;
    uint32_t used, cap;
    kl_key keys[];
};

kl_key *kl_keys_new(kl_key_slab *s)
{
    kl_key_block *b = s->head;
    if (b == NULL || b->used == b->cap) {
        uint32_t cap = s->next_cap ? s->next_cap : MIN_BLOCK;
        b = calloc(1, sizeof *b + (size_t)cap * sizeof(kl_key));
        if (b == NULL)
            return NULL;
        b->cap = cap;
        b->older = s->head;
        s->head = b;
        s->next_cap = cap < MAX_BLOCK ? cap * 2 : MAX_BLOCK;
    }
    return &b->keys[b->used++];
}

static void *populate(void *arg)
{
    const kl_key_slab *s = arg;
    /* Faults the pages in without changing a byte: safe beside the loader.
     * Where the kernel cannot (before Linux 5.14), the loader faults them. */
    (void)madvise(s->fill_addr, s->fill_len, MADV_POPULATE_WRITE);
    return NULL;
}

void kl_keys_reserve(kl_key_slab *s, uint32_t n)
{
    kl_key_block *b = s->head;
    uint32_t room = b != NULL ? b->cap - b->used : 0;
    if (n <= room || n - room <= MAX_BLOCK || s->filling)
        return;
    b = calloc(1, sizeof *b + (size_t)(n - room) * sizeof(kl_key));
    if (b == NULL)
        return;                 /* the loader asks block by block */
    b->cap = n - room;
    b->older = s->head;
    s->head = b;
    /* The pages wholly inside the block (a block this big is mapped on its
     * own, so they are fresh). */
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t from = ((uintptr_t)b->keys + page - 1) & ~(page - 1);
    uintptr_t to = ((uintptr_t)(b->keys + b->cap)) & ~(page - 1);
    if (to > from) {
        s->fill_addr = (void *)from;
        s->fill_len = to - from;
        s->filling = pthread_create(&s->filler, NULL, populate, s) == 0;
    }
}

void kl_keys_settle(kl_key_slab *s)
{
    if (s->filling)
        pthread_join(s->filler, NULL);
    s->filling = false;
}

static void release(kl_key *k)
{
    if (k->usage != NULL)
        free(k->usage->items);
    free(k->usage);
    free(k->strings);
    if (k->revoked) {
        free(k->aside.revocation->comment);
        free(k->aside.revocation);
    } else {
        free(k->aside.grace);
    }
}

void kl_keys_drop(kl_key_slab *s, kl_key *k)
{
    release(k);
    memset(k, 0, sizeof *k);
    if (s->head != NULL && s->head->used > 0 && k == &s->head->keys[s->head->used - 1])
        s->head->used--;
}

void kl_keys_free(kl_key_slab *s)
{
    kl_keys_settle(s);
    for (kl_key_block *b = s->head, *older; b != NULL; b = older) {
        older = b->older;
        for (uint32_t i = 0; i < b->used; i++)
            release(&b->keys[i]);
        free(b);
    }
    memset(s, 0, sizeof *s);
}
