/* Private to projections/: the state's indexes and the helpers the fold
 * (projections.c) and snapshots (snapshot.c) share. */
#ifndef KL_PROJECTIONS_INTERNAL_H
#define KL_PROJECTIONS_INTERNAL_H

#include "projections.h"

#include <pthread.h>

/* Entities stored here must begin with their kl_id. */
typedef struct kl_idmap {
    uint64_t *slots;            /* tag | pointer (idmap.c); 0: empty */
    uint32_t cap, len;
} kl_idmap;

void *kl_idmap_get(const kl_idmap *m, const kl_id *id);
void *kl_idmap_at(const kl_idmap *m, uint32_t i);  /* slot i (< cap), or NULL */
int kl_idmap_put(kl_idmap *m, void *entity);     /* adds or replaces */
int kl_idmap_add(kl_idmap *m, void *entity);     /* KL_EEXIST if its id is in */
int kl_idmap_reserve(kl_idmap *m, uint32_t n);   /* room for n without growing */
void kl_idmap_free(kl_idmap *m);
/* Adding from two threads at once, into a map with room for all they add
 * (has_room): add_concurrent never grows the map nor counts; count_added
 * counts what was added, once the threads are done. */
bool kl_idmap_has_room(const kl_idmap *m, uint32_t n);
/* Fetches the slot an id will probe first; returns the id's hash, for
 * kl_idmap_add_concurrent (so an id is hashed once). */
uint64_t kl_idmap_prefetch(const kl_idmap *m, const kl_id *id);
int kl_idmap_add_concurrent(kl_idmap *m, void *entity, uint64_t hash);
void kl_idmap_count_added(kl_idmap *m, uint32_t n);

/* Flow lists shared by keys (flowset.c). get finds or adds `flows` and
 * counts one more holder; put counts one fewer and frees the list with its
 * last holder (NULL is none). */
typedef struct kl_flowsets {
    kl_flowset **buckets;
    uint32_t cap, len;
    uint64_t seed;
} kl_flowsets;

int kl_flowsets_get(kl_flowsets *t, const kl_str *flows, uint32_t n,
                    const kl_flowset **out);
/* Whether `set` is the list `flows`; hold counts `more` holders of it. */
bool kl_flowset_is(const kl_flowset *set, const kl_str *flows, uint32_t n);
void kl_flowsets_hold(const kl_flowset *set, uint32_t more);
void kl_flowsets_put(kl_flowsets *t, const kl_flowset *set);
void kl_flowsets_free(kl_flowsets *t);

/* Keys come from blocks of many (keys.c): a key is never freed on its own
 * (its id stays taken), so it need not carry malloc's header and rounding,
 * a tenth of its memory. new gives a zeroed key; drop frees what a key
 * holds and gives the newest key back (a create that failed half way);
 * take gives n zeroed keys in one block, all counted as used (a snapshot's:
 * a loader fills them in place), and for many has a thread fault the block
 * in; settle waits for that thread. */
typedef struct kl_key_block kl_key_block;
typedef struct kl_text_chunk kl_text_chunk;
typedef struct kl_key_slab {
    kl_key_block *head;         /* the newest block; it links the older */
    uint32_t next_cap;          /* keys in the next block */
    bool filling;               /* a thread faults in [fill_addr, +len) */
    pthread_t filler;
    void *fill_addr;
    size_t fill_len;
    kl_text_chunk *texts;       /* where loaded keys' texts are */
} kl_key_slab;

kl_key *kl_keys_new(kl_key_slab *s);
void kl_keys_drop(kl_key_slab *s, kl_key *k);
kl_key *kl_keys_take(kl_key_slab *s, uint32_t n);
/* n bytes for an array about to be filled whole (not zeroed; free() frees
 * them). From KL_HUGE_PAGE on they are whole huge pages, faulted in with
 * one call: on a VM a 4 KiB page costs microseconds to fault in and again
 * to touch the first time, most of what filling fresh memory costs (256
 * MiB took 0.6 s on 4 KiB pages, 24 ms on huge pages, measured). */
enum { KL_HUGE_PAGE = 2 << 20 };
void *kl_big_alloc(size_t n);
void kl_keys_settle(kl_key_slab *s);
void kl_keys_free(kl_key_slab *s);      /* every key and what it holds */
/* n bytes for a key's texts from a list of chunks (one list per loading
 * thread, no lock); adopt hands a list to the slab, which frees it with
 * the keys (texts_in_chunk: a key's strings are there). */
char *kl_keys_text(kl_text_chunk **chunks, size_t n);
void kl_keys_adopt_texts(kl_key_slab *s, kl_text_chunk *chunks);

struct kl_proj {
    uint64_t seq;
    kl_vec orgs;                /* kl_org *, in creation order */
    kl_idmap org_by_id, user_by_id, sa_by_id, key_by_id, idem_by_slot;
    kl_idmap computer_by_id, session_by_id, message_by_id;
    kl_idmap alert_by_id, alert_by_cond;
    kl_flowsets flowsets;
    kl_key_slab keys;
};

char *kl_p_str_dup(kl_str s);               /* NUL-terminated copy */
int kl_p_vec_reserve(kl_vec *v);            /* room for one more */
void **kl_p_vec_grow(kl_vec *v, uint32_t cap);  /* room for cap; NULL: none */
void kl_p_vec_insert_sorted(kl_vec *v, void *item);   /* after reserve */
/* A key's name, description, access and flows (and rate limit, expiry)
 * from the event's fields; the others stay. */
int kl_p_key_settings(kl_proj *p, kl_key *k, const kl_event *ev);
void kl_p_prefix_set(kl_key *k, kl_str prefix);

#endif
