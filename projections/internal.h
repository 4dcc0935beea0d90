/* Private to projections/: the state's indexes and the helpers the fold
 * (projections.c) and snapshots (snapshot.c) share. */
#ifndef KL_PROJECTIONS_INTERNAL_H
#define KL_PROJECTIONS_INTERNAL_H

#include "projections.h"

/* Entities stored here must begin with their kl_id. */
typedef struct kl_idmap {
    void **slots;               /* NULL marks an empty slot */
    uint32_t cap, len;
} kl_idmap;

void *kl_idmap_get(const kl_idmap *m, const kl_id *id);
int kl_idmap_put(kl_idmap *m, void *entity);     /* adds or replaces */
int kl_idmap_add(kl_idmap *m, void *entity);     /* KL_EEXIST if its id is in */
int kl_idmap_reserve(kl_idmap *m, uint32_t n);   /* room for n without growing */
void kl_idmap_free(kl_idmap *m);

struct kl_proj {
    uint64_t seq;
    kl_vec orgs;                /* kl_org *, in creation order */
    kl_idmap org_by_id, user_by_id, sa_by_id, key_by_id, idem_by_slot;
    kl_idmap computer_by_id, session_by_id, message_by_id;
    kl_idmap alert_by_id, alert_by_cond;
};

char *kl_p_str_dup(kl_str s);               /* NUL-terminated copy */
int kl_p_vec_reserve(kl_vec *v);            /* room for one more */
void kl_p_vec_insert_sorted(kl_vec *v, void *item);   /* after reserve */
/* A key's name, description, access and flows (and rate limit, expiry)
 * from the event's fields; the others stay. */
int kl_p_key_settings(kl_key *k, const kl_event *ev);
void kl_p_prefix_set(kl_key *k, kl_str prefix);

#endif
