/*
 * The fold: kl_proj_apply(state, event) for every event type, and the
 * queries over the result.
 *
 * Each apply_* function first checks that the event fits the state, then
 * changes it; a misfit leaves the state as it was and names the seq. Events
 * were validated by the command service before they were written, so a
 * misfit means the log was edited or the code has a bug: either way the
 * daemon must not start on it.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>


/* ---- small helpers ---------------------------------------------------- */

char *kl_p_str_dup(kl_str s)
{
    char *p = malloc((size_t)s.len + 1);
    if (p != NULL) {
        memcpy(p, s.ptr, s.len);
        p[s.len] = '\0';
    }
    return p;
}

/* Replace *dst with a copy of s; *dst is untouched when out of memory. */
static int str_set(char **dst, kl_str s)
{
    char *p = kl_p_str_dup(s);
    if (p == NULL)
        return KL_ENOMEM;
    free(*dst);
    *dst = p;
    return KL_OK;
}

int kl_p_vec_reserve(kl_vec *v)
{
    if (v->len < v->cap)
        return KL_OK;
    uint32_t cap = v->cap ? v->cap * 2 : 8;
    void **items = realloc(v->items, cap * sizeof *items);
    if (items == NULL)
        return KL_ENOMEM;
    v->items = items;
    v->cap = cap;
    return KL_OK;
}

void **kl_p_vec_grow(kl_vec *v, uint32_t cap)
{
    if (cap <= v->cap)
        return v->items;
    size_t size = (size_t)cap * sizeof *v->items;
    void **items = v->len == 0 ? kl_big_alloc(size) : realloc(v->items, size);
    if (items == NULL)
        return NULL;
    if (v->len == 0)
        free(v->items);
    v->items = items;
    v->cap = cap;
    return items;
}

/* Entities start with their kl_id: compare through that. */
static int id_cmp(const kl_id *a, const kl_id *b)
{
    return memcmp(a->b, b->b, sizeof a->b);
}

uint32_t kl_vec_after(const kl_vec *v, const kl_id *after)
{
    if (after == NULL)
        return 0;
    uint32_t lo = 0, hi = v->len;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (id_cmp((const kl_id *)v->items[mid], after) <= 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Insert keeping id order; new ids almost always go at the end. The caller
 * has reserved room. */
void kl_p_vec_insert_sorted(kl_vec *v, void *item)
{
    uint32_t at = kl_vec_after(v, (const kl_id *)item);
    memmove(&v->items[at + 1], &v->items[at], (v->len - at) * sizeof *v->items);
    v->items[at] = item;
    v->len++;
}

static void vec_remove(kl_vec *v, const void *item)
{
    for (uint32_t i = 0; i < v->len; i++) {
        if (v->items[i] == item) {
            memmove(&v->items[i], &v->items[i + 1],
                    (v->len - i - 1) * sizeof *v->items);
            v->len--;
            return;
        }
    }
}

static int misfit(kl_err *err, const kl_event *ev, const char *why)
{
    kl_err_set(err, "event seq %llu (%s) does not fit the state: %s",
               (unsigned long long)ev->seq, kl_event_type_name(ev->type), why);
    return KL_ECORRUPT;
}

static kl_ref actor_ref(const kl_event *ev)
{
    return (kl_ref){ev->actor.type, ev->actor.id};
}

/* ---- lifecycle -------------------------------------------------------- */

int kl_proj_new(kl_proj **out)
{
    *out = calloc(1, sizeof **out);
    return *out != NULL ? KL_OK : KL_ENOMEM;
}

static void free_all(kl_idmap *m, void (*fn)(void *))
{
    for (uint32_t i = 0; i < m->cap; i++)
        if (kl_idmap_at(m, i) != NULL)
            fn(kl_idmap_at(m, i));
    kl_idmap_free(m);
}

static void org_free(void *p)
{
    kl_org *o = p;
    free(o->name);
    free(o->users.items);
    free(o->sas.items);
    free(o->keys.items);
    free(o->deleted_keys.items);
    free(o->computers.items);
    free(o->sessions.items);
    free(o->alerts.items);
    for (uint32_t i = 0; i < o->nflow_names; i++)
        free(o->flow_names[i]);
    free(o->flow_names);
    free(o->history);
    free(o);
}

static void user_free(void *p)
{
    kl_user *u = p;
    free(u->email);
    free(u->name);
    free(u);
}

static void sa_free(void *p)
{
    kl_sa *s = p;
    free(s->name);
    free(s->description);
    free(s);
}


static void alert_free(void *p)
{
    kl_alert *a = p;
    free(a->details);
    free(a);
}

static void computer_free(void *p)
{
    kl_computer *c = p;
    free(c->name);
    free(c);
}

static void message_free(kl_message *m)
{
    free(m->content);
    free(m);
}

static void session_free(void *p)
{
    kl_session *s = p;
    for (uint32_t i = 0; i < s->messages.len; i++)
        message_free(s->messages.items[i]);
    free(s->messages.items);
    free(s->title);
    free(s);
}

void kl_proj_free(kl_proj *p)
{
    if (p == NULL)
        return;
    kl_idmap_free(&p->message_by_id);   /* sessions own their messages */
    free_all(&p->alert_by_cond, free);
    free_all(&p->alert_by_id, alert_free);
    free_all(&p->session_by_id, session_free);
    free_all(&p->computer_by_id, computer_free);
    kl_idmap_free(&p->key_by_id);
    kl_keys_free(&p->keys);
    kl_flowsets_free(&p->flowsets);     /* after the keys that hold them */
    free_all(&p->sa_by_id, sa_free);
    free_all(&p->user_by_id, user_free);
    free_all(&p->org_by_id, org_free);
    free_all(&p->idem_by_slot, free);
    free(p->orgs.items);
    free(p);
}

/* ---- organizations and users ------------------------------------------ */

/* Room for one more history entry, made before the event is applied so
 * that recording it afterwards cannot fail. */
static int history_reserve(kl_org *o)
{
    if (o->history_len < o->history_cap)
        return KL_OK;
    uint64_t cap = o->history_cap ? o->history_cap * 2 : 16;
    uint64_t *h = realloc(o->history, cap * sizeof *h);
    if (h == NULL)
        return KL_ENOMEM;
    o->history = h;
    o->history_cap = cap;
    return KL_OK;
}

static int apply_org_created(kl_proj *p, const kl_event *ev, kl_err *err)
{
    if (kl_idmap_get(&p->org_by_id, &ev->org) != NULL)
        return misfit(err, ev, "organization exists");
    kl_org *o = calloc(1, sizeof *o);
    if (o == NULL)
        return KL_ENOMEM;
    o->id = ev->org;
    if (kl_p_vec_reserve(&p->orgs) != KL_OK || (o->name = kl_p_str_dup(ev->name)) == NULL ||
        history_reserve(o) != KL_OK || kl_idmap_put(&p->org_by_id, o) != KL_OK) {
        org_free(o);
        return KL_ENOMEM;
    }
    o->created_at = o->updated_at = ev->ts;
    o->version = 1;
    p->orgs.items[p->orgs.len++] = o;
    return KL_OK;
}

static int apply_user_invited(kl_proj *p, kl_org *o, const kl_event *ev,
                              kl_err *err)
{
    if (kl_idmap_get(&p->user_by_id, &ev->id) != NULL)
        return misfit(err, ev, "user id exists");
    kl_user *u = calloc(1, sizeof *u);
    if (u == NULL)
        return KL_ENOMEM;
    u->id = ev->id;
    u->org = o;
    u->role = ev->role;
    u->created_at = u->updated_at = ev->ts;
    u->version = 1;
    kl_str none = {"", 0};
    if ((u->email = kl_p_str_dup(ev->email)) == NULL ||
        (u->name = kl_p_str_dup(ev->has & KL_F_NAME ? ev->name : none)) == NULL ||
        kl_p_vec_reserve(&o->users) != KL_OK ||
        kl_idmap_put(&p->user_by_id, u) != KL_OK) {
        user_free(u);
        return KL_ENOMEM;
    }
    kl_p_vec_insert_sorted(&o->users, u);
    if (u->role == KL_ROLE_OWNER)
        o->active_owners++;
    return KL_OK;
}

static kl_user *org_user(kl_proj *p, const kl_org *o, const kl_id *id)
{
    kl_user *u = kl_idmap_get(&p->user_by_id, id);
    return u != NULL && u->org == o && !u->removed ? u : NULL;
}

static int apply_user_change(kl_proj *p, kl_org *o, const kl_event *ev,
                             kl_err *err)
{
    kl_user *u = org_user(p, o, &ev->id);
    if (u == NULL)
        return misfit(err, ev, "no such active user in the organization");
    if (ev->type == KL_EV_USER_UPDATED && (ev->has & KL_F_NAME) &&
        str_set(&u->name, ev->name) != KL_OK)
        return KL_ENOMEM;
    if (ev->type == KL_EV_USER_ROLE_CHANGED) {
        o->active_owners -= u->role == KL_ROLE_OWNER;
        u->role = ev->role;
        o->active_owners += u->role == KL_ROLE_OWNER;
    }
    if (ev->type == KL_EV_USER_REMOVED) {
        o->active_owners -= u->role == KL_ROLE_OWNER;
        u->removed = true;
    }
    u->updated_at = ev->ts;
    u->version++;
    return KL_OK;
}

/* ---- service accounts ------------------------------------------------- */

static int apply_sa_created(kl_proj *p, kl_org *o, const kl_event *ev,
                            kl_err *err)
{
    if (kl_idmap_get(&p->sa_by_id, &ev->id) != NULL)
        return misfit(err, ev, "service account id exists");
    if (kl_proj_sa_by_name(o, ev->name.ptr, ev->name.len) != NULL)
        return misfit(err, ev, "service account name taken");
    kl_sa *s = calloc(1, sizeof *s);
    if (s == NULL)
        return KL_ENOMEM;
    s->id = ev->id;
    s->org = o;
    s->role = ev->role;
    s->active = true;
    s->created_by = actor_ref(ev);
    s->created_at = s->updated_at = ev->ts;
    s->version = 1;
    kl_str none = {"", 0};
    if ((s->name = kl_p_str_dup(ev->name)) == NULL ||
        (s->description = kl_p_str_dup(ev->has & KL_F_DESCRIPTION ? ev->description
                                                             : none)) == NULL ||
        kl_p_vec_reserve(&o->sas) != KL_OK ||
        kl_idmap_put(&p->sa_by_id, s) != KL_OK) {
        sa_free(s);
        return KL_ENOMEM;
    }
    kl_p_vec_insert_sorted(&o->sas, s);
    return KL_OK;
}

static int apply_sa_change(kl_proj *p, kl_org *o, const kl_event *ev,
                           kl_err *err)
{
    kl_sa *s = kl_idmap_get(&p->sa_by_id, &ev->id);
    if (s == NULL || s->org != o || s->deleted)
        return misfit(err, ev, "no such service account in the organization");
    switch (ev->type) {
    case KL_EV_SA_UPDATED:
        if ((ev->has & KL_F_DESCRIPTION) &&
            str_set(&s->description, ev->description) != KL_OK)
            return KL_ENOMEM;
        if (ev->has & KL_F_ROLE)
            s->role = ev->role;
        break;
    case KL_EV_SA_DEACTIVATED:
        s->active = false;
        s->deactivated_at = ev->ts;
        break;
    case KL_EV_SA_REACTIVATED:
        s->active = true;
        s->deactivated_at = 0;
        break;
    default: /* KL_EV_SA_DELETED */
        if (s->active)
            s->deactivated_at = ev->ts;     /* deleting ends its activity too */
        s->deleted = true;
        s->active = false;
        break;
    }
    s->updated_at = ev->ts;
    s->version++;
    return KL_OK;
}

/* ---- keys ------------------------------------------------------------- */

/* Copies the settings an event carries (name, description, permissions,
 * rate limit, expiry) onto the key. The name and description live in one
 * allocation (k->strings), the flows in a list shared with the keys that
 * name the same ones; a change builds the new ones from the new values and
 * the kept old ones before it drops the old, so a failed allocation leaves
 * the key as it was. */
int kl_p_key_settings(kl_proj *p, kl_key *k, const kl_event *ev)
{
    bool had = k->strings != NULL;
    const char *old_name = had ? kl_key_name(k) : "";
    const char *old_desc = had ? kl_key_description(k) : "";
    kl_str name = ev->has & KL_F_NAME ? ev->name
                  : (kl_str){old_name, (uint32_t)strlen(old_name)};
    kl_str desc = ev->has & KL_F_DESCRIPTION ? ev->description
                  : (kl_str){old_desc, (uint32_t)strlen(old_desc)};
    if ((uint64_t)name.len + desc.len + 2 > UINT32_MAX)
        return KL_EINVAL;
    char *blob = malloc((size_t)name.len + 1 + desc.len + 1);
    if (blob == NULL)
        return KL_ENOMEM;
    memcpy(blob, name.ptr, name.len);
    blob[name.len] = '\0';
    if (desc.len)
        memcpy(blob + name.len + 1, desc.ptr, desc.len);
    blob[name.len + 1 + desc.len] = '\0';
    if (ev->has & KL_F_ACCESS) {
        const kl_flowset *flows = NULL;
        if (ev->nflows > 0 &&
            kl_flowsets_get(&p->flowsets, ev->flows, ev->nflows, &flows) != KL_OK) {
            free(blob);
            return KL_ENOMEM;
        }
        kl_flowsets_put(&p->flowsets, k->flows);
        k->flows = flows;
        k->access = ev->access;
    }
    if (!k->texts_in_chunk)
        free(k->strings);
    k->strings = blob;
    k->texts_in_chunk = false;
    if (ev->has & KL_F_RATE_LIMIT) {
        k->rl_minute = ev->rl_minute;
        k->rl_day = ev->rl_day;
    }
    if (ev->has & KL_F_EXPIRES)
        k->expires_at = ev->expires_at;
    return KL_OK;
}

void kl_p_prefix_set(kl_key *k, kl_str prefix)
{
    size_t n = prefix.len < sizeof k->prefix - 1 ? prefix.len : sizeof k->prefix - 1;
    memcpy(k->prefix, prefix.ptr, n);
    k->prefix[n] = '\0';
}

static int apply_key_created(kl_proj *p, kl_org *o, const kl_event *ev,
                             kl_err *err)
{
    if (kl_idmap_get(&p->key_by_id, &ev->id) != NULL)
        return misfit(err, ev, "key id exists");
    void *owner = NULL;
    if (ev->owner_type == KL_PRINCIPAL_USER) {
        owner = org_user(p, o, &ev->owner);
    } else {
        kl_sa *s = kl_idmap_get(&p->sa_by_id, &ev->owner);
        owner = s != NULL && s->org == o && !s->deleted ? s : NULL;
    }
    if (owner == NULL)
        return misfit(err, ev, "no such owner in the organization");
    kl_key *k = kl_keys_new(&p->keys);
    if (k == NULL)
        return KL_ENOMEM;
    k->id = ev->id;
    k->owner_type = (uint8_t)ev->owner_type;
    k->owner_ptr = owner;
    k->created_by = actor_ref(ev);
    k->env = ev->env;
    memcpy(k->hash, ev->hash, KL_HASH_LEN);
    kl_p_prefix_set(k, ev->prefix);
    k->created_at = k->updated_at = k->rotated_at = ev->ts;
    k->version = 1;
    if (kl_p_key_settings(p, k, ev) != KL_OK || kl_p_vec_reserve(&o->keys) != KL_OK ||
        kl_idmap_put(&p->key_by_id, k) != KL_OK) {
        kl_flowsets_put(&p->flowsets, k->flows);
        kl_keys_drop(&p->keys, k);
        return KL_ENOMEM;
    }
    kl_p_vec_insert_sorted(&o->keys, k);
    return KL_OK;
}

static int apply_key_change(kl_proj *p, kl_org *o, const kl_event *ev,
                            kl_err *err)
{
    kl_key *k = kl_idmap_get(&p->key_by_id, &ev->id);
    if (k == NULL || kl_key_org(k) != o || k->deleted)
        return misfit(err, ev, "no such key in the organization");
    switch (ev->type) {
    case KL_EV_KEY_UPDATED:
        if (kl_p_key_settings(p, k, ev) != KL_OK)
            return KL_ENOMEM;
        break;
    case KL_EV_KEY_REGENERATED:
        if (k->revoked)
            return misfit(err, ev, "key is revoked");
        if (ev->has & KL_F_GRACE) {
            kl_key_grace *g = k->aside.grace;
            if (g == NULL && (g = k->aside.grace = malloc(sizeof *g)) == NULL)
                return KL_ENOMEM;
            memcpy(g->old_hash, k->hash, KL_HASH_LEN);
            g->until = ev->grace_until;
        } else {
            free(k->aside.grace);
            k->aside.grace = NULL;
        }
        memcpy(k->hash, ev->hash, KL_HASH_LEN);
        kl_p_prefix_set(k, ev->prefix);
        k->rotated_at = ev->ts;
        break;
    case KL_EV_KEY_REVOKED: {
        if (k->revoked)
            return misfit(err, ev, "key already revoked");
        kl_key_revocation *r = calloc(1, sizeof *r);
        if (r == NULL)
            return KL_ENOMEM;
        if ((ev->has & KL_F_COMMENT) && (r->comment = kl_p_str_dup(ev->comment)) == NULL) {
            free(r);
            return KL_ENOMEM;
        }
        r->at = ev->ts;
        r->by = actor_ref(ev);
        free(k->aside.grace);   /* revoking ends a grace period too */
        k->aside.revocation = r;
        k->revoked = true;
        break;
    }
    default: /* KL_EV_KEY_DELETED */
        if (kl_p_vec_reserve(&o->deleted_keys) != KL_OK)
            return KL_ENOMEM;
        k->deleted = true;
        vec_remove(&o->keys, k);
        kl_p_vec_insert_sorted(&o->deleted_keys, k);
        break;
    }
    k->updated_at = ev->ts;
    k->version++;
    return KL_OK;
}

/* ---- computers and sessions ------------------------------------------ */

/* The owner of a new computer must be an enabled principal of the org. */
static bool owner_fits(kl_proj *p, const kl_org *o, kl_principal type,
                       const kl_id *id)
{
    if (type == KL_PRINCIPAL_USER) {
        const kl_user *u = kl_idmap_get(&p->user_by_id, id);
        return u != NULL && u->org == o && !u->removed;
    }
    const kl_sa *s = kl_idmap_get(&p->sa_by_id, id);
    return type == KL_PRINCIPAL_SA && s != NULL && s->org == o && s->active;
}

static int apply_computer(kl_proj *p, kl_org *o, const kl_event *ev, kl_err *err)
{
    kl_computer *c = kl_idmap_get(&p->computer_by_id, &ev->id);
    if (ev->type == KL_EV_COMPUTER_CREATED) {
        if (c != NULL)
            return misfit(err, ev, "computer id exists");
        if (!owner_fits(p, o, ev->owner_type, &ev->owner))
            return misfit(err, ev, "no such enabled owner in the organization");
        if ((c = calloc(1, sizeof *c)) == NULL)
            return KL_ENOMEM;
        c->id = ev->id;
        c->org = o;
        c->owner = (kl_ref){ev->owner_type, ev->owner};
        c->created_by = actor_ref(ev);
        c->created_at = c->updated_at = ev->ts;
        c->version = 1;
        if ((c->name = kl_p_str_dup(ev->name)) == NULL || kl_p_vec_reserve(&o->computers) != KL_OK ||
            kl_idmap_put(&p->computer_by_id, c) != KL_OK) {
            computer_free(c);
            return KL_ENOMEM;
        }
        kl_p_vec_insert_sorted(&o->computers, c);
        return KL_OK;
    }
    if (c == NULL || c->org != o || c->deleted)
        return misfit(err, ev, "no such computer in the organization");
    if (ev->type == KL_EV_COMPUTER_RESTARTED)
        c->restarted_at = ev->ts;
    else
        c->deleted = true;
    c->updated_at = ev->ts;
    c->version++;
    return KL_OK;
}

static int apply_session(kl_proj *p, kl_org *o, const kl_event *ev, kl_err *err)
{
    kl_session *s = kl_idmap_get(&p->session_by_id, &ev->id);
    if (ev->type == KL_EV_SESSION_CREATED) {
        if (s != NULL)
            return misfit(err, ev, "session id exists");
        if (ev->has & KL_F_REF) {
            const kl_computer *c = kl_idmap_get(&p->computer_by_id, &ev->ref);
            if (c == NULL || c->org != o || c->deleted)
                return misfit(err, ev, "no such computer in the organization");
        }
        if ((s = calloc(1, sizeof *s)) == NULL)
            return KL_ENOMEM;
        s->id = ev->id;
        s->org = o;
        s->computer = ev->ref;
        s->created_by = actor_ref(ev);
        s->created_at = s->updated_at = ev->ts;
        s->version = 1;
        if (((ev->has & KL_F_TITLE) && (s->title = kl_p_str_dup(ev->title)) == NULL) ||
            kl_p_vec_reserve(&o->sessions) != KL_OK ||
            kl_idmap_put(&p->session_by_id, s) != KL_OK) {
            session_free(s);
            return KL_ENOMEM;
        }
        kl_p_vec_insert_sorted(&o->sessions, s);
        return KL_OK;
    }
    if (s == NULL || s->org != o || s->deleted)
        return misfit(err, ev, "no such session in the organization");
    s->deleted = true;
    s->updated_at = ev->ts;
    s->version++;
    return KL_OK;
}

static int apply_message(kl_proj *p, kl_org *o, const kl_event *ev, kl_err *err)
{
    kl_session *s = kl_idmap_get(&p->session_by_id, &ev->ref);
    if (s == NULL || s->org != o || s->deleted)
        return misfit(err, ev, "no such session in the organization");
    if (kl_idmap_get(&p->message_by_id, &ev->id) != NULL)
        return misfit(err, ev, "message id exists");
    kl_message *m = calloc(1, sizeof *m);
    if (m == NULL)
        return KL_ENOMEM;
    m->id = ev->id;
    m->session = s;
    m->author = ev->author;
    m->created_by = actor_ref(ev);
    m->created_at = ev->ts;
    if ((m->content = kl_p_str_dup(ev->content)) == NULL ||
        kl_p_vec_reserve(&s->messages) != KL_OK ||
        kl_idmap_put(&p->message_by_id, m) != KL_OK) {
        message_free(m);
        return KL_ENOMEM;
    }
    kl_p_vec_insert_sorted(&s->messages, m);
    s->updated_at = ev->ts;
    return KL_OK;
}

/* Usage of a key, deleted or not (its history stays). */
/* ---- alerts ------------------------------------------------------------ */

static int apply_alert(kl_proj *p, kl_org *o, const kl_event *ev, kl_err *err)
{
    kl_alert *a = kl_idmap_get(&p->alert_by_id, &ev->id);
    if (ev->type == KL_EV_ALERT_ACKNOWLEDGED) {
        if (a == NULL || a->org != o || a->acked)
            return misfit(err, ev, "no such open alert in the organization");
        a->acked = true;
        a->acked_at = ev->ts;
        a->acked_by = actor_ref(ev);
        a->version++;
        return KL_OK;
    }
    if (a != NULL)
        return misfit(err, ev, "alert id exists");
    if (kl_idmap_get(&p->alert_by_cond, &ev->cond) != NULL)
        return misfit(err, ev, "an alert for this condition was raised before");
    a = calloc(1, sizeof *a);
    kl_id *cond = malloc(sizeof *cond);
    if (a == NULL || cond == NULL) {
        free(a);
        free(cond);
        return KL_ENOMEM;
    }
    *cond = ev->cond;
    a->id = ev->id;
    a->org = o;
    a->type = ev->alert;
    a->key = ev->has & KL_F_REF ? ev->ref : (kl_id){{0}};
    a->cond = ev->cond;
    a->created_at = ev->ts;
    a->version = 1;
    if ((a->details = kl_p_str_dup(ev->content)) == NULL || kl_p_vec_reserve(&o->alerts) != KL_OK ||
        kl_idmap_put(&p->alert_by_id, a) != KL_OK) {
        alert_free(a);
        free(cond);
        return KL_ENOMEM;
    }
    if (kl_idmap_put(&p->alert_by_cond, cond) != KL_OK)
        free(cond);             /* only the once-per-condition check is lost */
    kl_p_vec_insert_sorted(&o->alerts, a);
    return KL_OK;
}

/* The flow's index in the org's names, or -1. */
static int64_t flow_index(const kl_org *o, const char *name, size_t len)
{
    for (uint32_t i = 0; i < o->nflow_names; i++)
        if (strlen(o->flow_names[i]) == len && memcmp(o->flow_names[i], name, len) == 0)
            return i;
    return -1;
}

bool kl_org_names_flow(const kl_org *o, const char *name, size_t len)
{
    return flow_index(o, name, len) >= 0;
}

/* The flow's number in the org (index + 1), made on first use; 0 when the
 * org already names KL_ORG_MAX_FLOWS flows (their calls still count in the
 * totals). The daemon never writes more (kl_usage), so which flows an org
 * names does not depend on the order its usage is in. */
static int flow_number(kl_org *o, kl_str name, uint32_t *out)
{
    int64_t i = flow_index(o, name.ptr, name.len);
    *out = (uint32_t)(i + 1);
    if (i >= 0 || o->nflow_names == KL_ORG_MAX_FLOWS)
        return KL_OK;
    if (o->nflow_names == o->cap_flow_names) {
        uint32_t cap = o->cap_flow_names ? o->cap_flow_names * 2 : 8;
        char **names = realloc(o->flow_names, cap * sizeof *names);
        if (names == NULL)
            return KL_ENOMEM;
        o->flow_names = names;
        o->cap_flow_names = cap;
    }
    if ((o->flow_names[o->nflow_names] = kl_p_str_dup(name)) == NULL)
        return KL_ENOMEM;
    *out = ++o->nflow_names;
    return KL_OK;
}

/* Adds counts to the key's bucket for (hour, flow), made where the hour
 * order wants it (usage arrives in time order, so almost always at the
 * end). */
static int bucket_add(kl_key *k, int64_t hour, uint32_t flow, uint32_t ok,
                      uint32_t failed)
{
    if (k->usage == NULL && (k->usage = calloc(1, sizeof *k->usage)) == NULL)
        return KL_ENOMEM;
    kl_usage_series *s = k->usage;
    uint32_t i = s->len;
    for (; i > 0 && s->items[i - 1].hour >= hour; i--) {
        kl_usage_bucket *b = &s->items[i - 1];
        if (b->hour == hour && b->flow == flow) {
            b->successes += ok;
            b->failures += failed;
            return KL_OK;
        }
    }
    if (s->len == s->cap) {
        uint32_t cap = s->cap ? s->cap * 2 : 4;
        kl_usage_bucket *items = realloc(s->items, cap * sizeof *items);
        if (items == NULL)
            return KL_ENOMEM;
        s->items = items;
        s->cap = cap;
    }
    memmove(&s->items[i + 1], &s->items[i], (s->len - i) * sizeof *s->items);
    s->items[i] = (kl_usage_bucket){hour, flow, ok, failed};
    s->len++;
    return KL_OK;
}

static int apply_usage(kl_proj *p, kl_org *o, const kl_event *ev, kl_err *err)
{
    kl_key *k = kl_idmap_get(&p->key_by_id, &ev->id);
    if (k == NULL || kl_key_org(k) != o)
        return misfit(err, ev, "usage of a key not in the organization");
    if (ev->last_used > k->last_used_at)
        k->last_used_at = ev->last_used;
    int64_t hour = kl_time_hour_start(ev->usage_from);
    int rc = bucket_add(k, hour, 0, ev->successes, ev->failures);
    for (uint32_t i = 0; rc == KL_OK && (ev->has & KL_F_FLOW_USAGE) && i < ev->nflows;
         i++) {
        uint32_t flow;
        rc = flow_number(o, ev->flows[i], &flow);
        if (rc == KL_OK && flow != 0)
            rc = bucket_add(k, hour, flow, ev->flow_successes[i], ev->flow_failures[i]);
    }
    /* The org's quotas count accepted calls in the current day and month;
     * a late event for an earlier window changes neither. */
    int64_t day = kl_time_day_start(ev->usage_from);
    int64_t month = kl_time_month_start(ev->usage_from);
    if (day > o->used_day_start) {
        o->used_day_start = day;
        o->used_day = 0;
    }
    if (day == o->used_day_start)
        o->used_day += ev->successes;
    if (month > o->used_month_start) {
        o->used_month_start = month;
        o->used_month = 0;
    }
    if (month == o->used_month_start)
        o->used_month += ev->successes;
    return rc;
}

static int apply_limits(kl_org *o, const kl_event *ev)
{
    o->lim_minute = ev->lim_minute;
    o->lim_day = ev->lim_day;
    o->lim_month = ev->lim_month;
    o->updated_at = ev->ts;
    o->version++;
    return KL_OK;
}

/* ---- idempotency records --------------------------------------------- */

void kl_idem_slot(const kl_id *org, const kl_id *caller_key, const char *key,
                  size_t len, kl_id *out)
{
    /* SHA-256 over a length-prefixed concatenation; 16 bytes are plenty to
     * tell callers' keys apart. */
    uint8_t buf[32 + 256 + 4], h[KL_HASH_LEN];
    size_t n = len < 256 ? len : 256;
    memcpy(buf, org->b, 16);
    memcpy(buf + 16, caller_key->b, 16);
    buf[32] = (uint8_t)n;
    memcpy(buf + 33, key, n);
    kl_sha256(buf, 33 + n, h);
    memcpy(out->b, h, 16);
}

const kl_idem *kl_proj_idem(const kl_proj *p, const kl_id *slot)
{
    return kl_idmap_get(&p->idem_by_slot, slot);
}

/* A record stays in memory (about 80 bytes per idempotent write); the
 * daemon ignores it once it is older than a day by its own clock. The fold
 * cannot expire it: it has no clock but the events'. */
static int apply_idem(kl_proj *p, const kl_event *ev)
{
    if (!(ev->has & KL_F_IDEM))
        return KL_OK;
    kl_id slot;
    kl_idem_slot(&ev->org, &ev->actor.key_id, ev->idem_key.ptr, ev->idem_key.len,
                 &slot);
    if (kl_idmap_get(&p->idem_by_slot, &slot) != NULL)
        return KL_OK;   /* the first request with this key decides */
    kl_idem *r = calloc(1, sizeof *r);
    if (r == NULL)
        return KL_ENOMEM;
    r->slot = slot;
    memcpy(r->fp, ev->idem_fp, sizeof r->fp);
    r->type = ev->type;
    r->target = ev->id;
    r->ts = ev->ts;
    if (kl_idmap_put(&p->idem_by_slot, r) != KL_OK) {
        free(r);
        return KL_ENOMEM;
    }
    return KL_OK;
}

/* ---- dispatch --------------------------------------------------------- */

int kl_proj_apply(kl_proj *p, const kl_event *ev, kl_err *err)
{
    if (ev->seq != p->seq + 1 && p->seq != 0)
        return misfit(err, ev, "sequence gap");
    int rc;
    kl_org *o = NULL;
    if ((ev->type == KL_EV_AUTH_FAILED && kl_id_is_zero(&ev->org)) ||
        ev->type == KL_EV_LOG_COMPACTED) {
        p->seq = ev->seq;       /* no org's: refusals that named no key, and
                                   the log's own record of a compaction */
        return KL_OK;
    }
    if (ev->type != KL_EV_ORG_CREATED) {
        o = kl_idmap_get(&p->org_by_id, &ev->org);
        if (o == NULL)
            return misfit(err, ev, "unknown organization");
        if (history_reserve(o) != KL_OK)
            return KL_ENOMEM;
    }
    switch (ev->type) {
    case KL_EV_ORG_CREATED:
        rc = apply_org_created(p, ev, err);
        break;
    case KL_EV_USER_INVITED:
        rc = apply_user_invited(p, o, ev, err);
        break;
    case KL_EV_USER_UPDATED:
    case KL_EV_USER_ROLE_CHANGED:
    case KL_EV_USER_REMOVED:
        rc = apply_user_change(p, o, ev, err);
        break;
    case KL_EV_SA_CREATED:
        rc = apply_sa_created(p, o, ev, err);
        break;
    case KL_EV_SA_UPDATED:
    case KL_EV_SA_DEACTIVATED:
    case KL_EV_SA_REACTIVATED:
    case KL_EV_SA_DELETED:
        rc = apply_sa_change(p, o, ev, err);
        break;
    case KL_EV_KEY_CREATED:
        rc = apply_key_created(p, o, ev, err);
        break;
    case KL_EV_KEY_UPDATED:
    case KL_EV_KEY_REGENERATED:
    case KL_EV_KEY_REVOKED:
    case KL_EV_KEY_DELETED:
        rc = apply_key_change(p, o, ev, err);
        break;
    case KL_EV_USAGE_LIMITS_CHANGED:
        rc = apply_limits(o, ev);
        break;
    case KL_EV_USAGE_RECORDED:
        rc = apply_usage(p, o, ev, err);
        break;
    case KL_EV_COMPUTER_CREATED:
    case KL_EV_COMPUTER_RESTARTED:
    case KL_EV_COMPUTER_DELETED:
        rc = apply_computer(p, o, ev, err);
        break;
    case KL_EV_SESSION_CREATED:
    case KL_EV_SESSION_DELETED:
        rc = apply_session(p, o, ev, err);
        break;
    case KL_EV_MESSAGE_POSTED:
        rc = apply_message(p, o, ev, err);
        break;
    case KL_EV_ALERT_RAISED:
    case KL_EV_ALERT_ACKNOWLEDGED:
        rc = apply_alert(p, o, ev, err);
        break;
    case KL_EV_AUTH_FAILED: {
        /* Only history: the refusals change no state. */
        const kl_key *k = kl_idmap_get(&p->key_by_id, &ev->id);
        rc = !(ev->has & KL_F_ID) || (k != NULL && kl_key_org(k) == o)
                 ? KL_OK
                 : misfit(err, ev, "refusals of a key not in the organization");
        break;
    }
    default:
        return misfit(err, ev, "this build cannot apply the event type");
    }
    if (rc == KL_OK)
        rc = apply_idem(p, ev);
    if (rc == KL_OK && o == NULL)       /* OrgCreated made it, with room */
        o = kl_idmap_get(&p->org_by_id, &ev->org);
    if (rc == KL_OK) {
        o->history[o->history_len++] = ev->seq << 8 | (uint64_t)ev->type;
        p->seq = ev->seq;
    }
    else if (rc == KL_ENOMEM)
        kl_err_set(err, "out of memory applying seq %llu",
                   (unsigned long long)ev->seq);
    return rc;
}

int kl_proj_apply_record(kl_proj *p, const uint8_t *payload, size_t len,
                         kl_err *err)
{
    kl_record_head head;
    kl_event ev;
    int rc = kl_event_decode(payload, len, &head, &ev, err);
    return rc == KL_OK ? kl_proj_apply(p, &ev, err) : rc;
}

/* ---- queries ---------------------------------------------------------- */

uint64_t kl_proj_seq(const kl_proj *p) { return p->seq; }

kl_org *kl_proj_org(const kl_proj *p, const kl_id *id)
{
    return kl_idmap_get(&p->org_by_id, id);
}
kl_user *kl_proj_user(const kl_proj *p, const kl_id *id)
{
    return kl_idmap_get(&p->user_by_id, id);
}
kl_sa *kl_proj_sa(const kl_proj *p, const kl_id *id)
{
    return kl_idmap_get(&p->sa_by_id, id);
}
kl_key *kl_proj_key(const kl_proj *p, const kl_id *id)
{
    return kl_idmap_get(&p->key_by_id, id);
}
kl_computer *kl_proj_computer(const kl_proj *p, const kl_id *id)
{
    return kl_idmap_get(&p->computer_by_id, id);
}
kl_session *kl_proj_session(const kl_proj *p, const kl_id *id)
{
    return kl_idmap_get(&p->session_by_id, id);
}
kl_message *kl_proj_message(const kl_proj *p, const kl_id *id)
{
    return kl_idmap_get(&p->message_by_id, id);
}
kl_alert *kl_proj_alert(const kl_proj *p, const kl_id *id)
{
    return kl_idmap_get(&p->alert_by_id, id);
}
bool kl_proj_alert_raised(const kl_proj *p, const kl_id *cond)
{
    return kl_idmap_get(&p->alert_by_cond, cond) != NULL;
}
uint32_t kl_proj_org_count(const kl_proj *p) { return p->orgs.len; }
kl_org *kl_proj_org_at(const kl_proj *p, uint32_t i) { return p->orgs.items[i]; }

kl_user *kl_proj_user_by_email(const kl_org *org, const char *email, size_t len)
{
    for (uint32_t i = 0; i < org->users.len; i++) {
        kl_user *u = org->users.items[i];
        if (!u->removed && strlen(u->email) == len &&
            strncasecmp(u->email, email, len) == 0)
            return u;
    }
    return NULL;
}

kl_sa *kl_proj_sa_by_name(const kl_org *org, const char *name, size_t len)
{
    for (uint32_t i = 0; i < org->sas.len; i++) {
        kl_sa *s = org->sas.items[i];
        if (strlen(s->name) == len && memcmp(s->name, name, len) == 0)
            return s;
    }
    return NULL;
}

uint64_t kl_key_used_since(const kl_key *k, int64_t since)
{
    uint64_t n = 0;
    int64_t hour = kl_time_hour_start(since);
    if (k->usage == NULL)
        return 0;
    for (uint32_t i = k->usage->len; i > 0 && k->usage->items[i - 1].hour >= hour; i--)
        if (k->usage->items[i - 1].flow == 0)
            n += k->usage->items[i - 1].successes;
    return n;
}

uint64_t kl_org_used_day(const kl_org *o, int64_t now)
{
    return o->used_day_start == kl_time_day_start(now) ? o->used_day : 0;
}

uint64_t kl_org_used_month(const kl_org *o, int64_t now)
{
    return o->used_month_start == kl_time_month_start(now) ? o->used_month : 0;
}

kl_key_status kl_key_status_at(const kl_key *k, int64_t now)
{
    if (k->revoked)
        return KL_KEY_REVOKED;
    if (k->expires_at != 0 && now >= k->expires_at)
        return KL_KEY_EXPIRED;
    return KL_KEY_ACTIVE;
}

const char *kl_key_status_name(kl_key_status s)
{
    static const char *const names[] = {"active", "expired", "revoked"};
    return names[s];
}

bool kl_key_owner_enabled(const kl_key *k)
{
    if (k->owner_type == KL_PRINCIPAL_USER)
        return !((const kl_user *)k->owner_ptr)->removed;
    const kl_sa *s = k->owner_ptr;
    return s->active && !s->deleted;
}

bool kl_key_usable(const kl_key *k, int64_t now)
{
    return kl_key_status_at(k, now) == KL_KEY_ACTIVE && kl_key_owner_enabled(k);
}

void kl_key_touch(kl_key *k, int64_t now)
{
    if (now > k->last_used_at)
        k->last_used_at = now;
}

kl_role kl_key_role(const kl_key *k)
{
    if (k->owner_type == KL_PRINCIPAL_USER)
        return ((const kl_user *)k->owner_ptr)->role;
    return ((const kl_sa *)k->owner_ptr)->role;
}

void kl_proj_stats_get(const kl_proj *p, kl_proj_stats *st)
{
    st->orgs = p->org_by_id.len;
    st->users = p->user_by_id.len;
    st->sas = p->sa_by_id.len;
    st->keys = p->key_by_id.len;
    st->idem = p->idem_by_slot.len;
    st->computers = p->computer_by_id.len;
    st->sessions = p->session_by_id.len;
}
