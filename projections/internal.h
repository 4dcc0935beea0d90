/* Private to projections/: the id index behind the lookups. */
#ifndef KL_PROJECTIONS_INTERNAL_H
#define KL_PROJECTIONS_INTERNAL_H

#include "projections.h"

typedef struct kl_idmap_slot {
    kl_id id;
    void *value;                /* NULL marks an empty slot */
} kl_idmap_slot;

typedef struct kl_idmap {
    kl_idmap_slot *slots;
    uint32_t cap, len;
} kl_idmap;

void *kl_idmap_get(const kl_idmap *m, const kl_id *id);
int kl_idmap_put(kl_idmap *m, const kl_id *id, void *value);
void kl_idmap_free(kl_idmap *m);

#endif
