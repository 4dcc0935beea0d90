/*
 * Where keys live. A key is never freed on its own (a deleted key keeps its
 * id, its usage and its place in the audit), so keys are cut from blocks,
 * each a run of structs with no malloc header or rounding between them. A
 * block holds twice the keys of the one before, up to MAX_BLOCK; a snapshot
 * that knows how many keys it holds takes one block of them all, and a
 * second thread faults that block in while the loaders fill it (on a VM
 * the host backs memory on first touch: most of what loading a million
 * keys costs). A snapshot's key texts come from big chunks the slab frees
 * with it, not an allocation each.
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

/* Faults in the pages wholly inside [p, p + n) for writing, in one call. */
static void prefault(void *p, size_t n)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t from = ((uintptr_t)p + page - 1) & ~(page - 1);
    uintptr_t to = ((uintptr_t)p + n) & ~(page - 1);
    /* Faults the pages in without changing a byte. Where the kernel cannot
     * (before Linux 5.14), the first writes fault them. */
    if (to > from)
        (void)madvise((void *)from, to - from, MADV_POPULATE_WRITE);
}

void *kl_big_alloc(size_t n)
{
    if (n < KL_HUGE_PAGE)
        return malloc(n);
    /* Whole huge pages: a part of one would be 4 KiB pages. */
    size_t size = (n + KL_HUGE_PAGE - 1) & ~(size_t)(KL_HUGE_PAGE - 1);
    void *p;
    if (size < n || posix_memalign(&p, KL_HUGE_PAGE, size) != 0)
        return NULL;
    (void)madvise(p, size, MADV_HUGEPAGE);  /* a hint: 4 KiB pages still work */
    prefault(p, size);
    return p;
}

static void *populate(void *arg)
{
    const kl_key_slab *s = arg;
    prefault(s->fill_addr, s->fill_len);    /* safe beside the loader */
    return NULL;
}

kl_key *kl_keys_take(kl_key_slab *s, uint32_t n)
{
    if (n == 0 || s->filling)
        return NULL;
    kl_key_block *b = calloc(1, sizeof *b + (size_t)n * sizeof(kl_key));
    if (b == NULL)
        return NULL;
    b->cap = b->used = n;
    b->older = s->head;
    s->head = b;
    if (n <= MAX_BLOCK)
        return b->keys;
    /* A block this big is mapped on its own, so its pages are fresh. */
    s->fill_addr = b->keys;
    s->fill_len = (size_t)n * sizeof(kl_key);
    s->filling = pthread_create(&s->filler, NULL, populate, s) == 0;
    return b->keys;
}

/* Chunks of texts, a huge page each (kl_big_alloc); a text longer than
 * that gets a chunk of its own. */

struct kl_text_chunk {
    kl_text_chunk *next;
    size_t used, cap;
    char data[];
};

char *kl_keys_text(kl_text_chunk **chunks, size_t n)
{
    kl_text_chunk *c = *chunks;
    if (c == NULL || c->cap - c->used < n) {
        size_t cap = KL_HUGE_PAGE - sizeof *c;
        cap = n > cap ? n : cap;
        if ((c = kl_big_alloc(sizeof *c + cap)) == NULL)
            return NULL;
        c->used = 0;
        c->cap = cap;
        c->next = *chunks;
        *chunks = c;
    }
    c->used += n;
    return c->data + c->used - n;
}

void kl_keys_adopt_texts(kl_key_slab *s, kl_text_chunk *chunks)
{
    while (chunks != NULL) {
        kl_text_chunk *next = chunks->next;
        chunks->next = s->texts;
        s->texts = chunks;
        chunks = next;
    }
}

static void free_texts(kl_text_chunk *chunks)
{
    for (kl_text_chunk *next; chunks != NULL; chunks = next) {
        next = chunks->next;
        free(chunks);
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
    if (!k->texts_in_chunk)
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
    free_texts(s->texts);
    memset(s, 0, sizeof *s);
}
