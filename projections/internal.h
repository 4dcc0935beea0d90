/* Private to projections/: the id index behind the lookups. */
#ifndef KL_PROJECTIONS_INTERNAL_H
#define KL_PROJECTIONS_INTERNAL_H

#include "projections.h"

/* Entities stored here must begin with their kl_id. */
typedef struct kl_idmap {
    void **slots;               /* NULL marks an empty slot */
    uint32_t cap, len;
} kl_idmap;

void *kl_idmap_get(const kl_idmap *m, const kl_id *id);
int kl_idmap_put(kl_idmap *m, void *entity);
void kl_idmap_free(kl_idmap *m);

#endif
