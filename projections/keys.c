/*
 * Where keys live. A key is never freed on its own (a deleted key keeps its
 * id, its usage and its place in the audit), so keys are cut from blocks,
 * each a run of structs with no malloc header or rounding between them. A
 * block holds twice the keys of the one before, up to MAX_BLOCK; a snapshot
 * that knows how many keys it holds asks for one block of them all.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

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

void kl_keys_reserve(kl_key_slab *s, uint32_t n)
{
    kl_key_block *b = s->head;
    uint32_t room = b != NULL ? b->cap - b->used : 0;
    if (n > room && n - room > s->next_cap)
        s->next_cap = n - room;
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
    for (kl_key_block *b = s->head, *older; b != NULL; b = older) {
        older = b->older;
        for (uint32_t i = 0; i < b->used; i++)
            release(&b->keys[i]);
        free(b);
    }
    memset(s, 0, sizeof *s);
}
