/*
 * tests/unit/test_projections.c — the fold. Events are built by hand and
 * applied in order; the state is read back through projections.h. Every
 * misfit must come back as KL_ECORRUPT with the state exactly as before,
 * which is checked by dumping the whole state to text before and after.
 *
 * The last test writes the same events through a real log in a temp dir,
 * replays them (kl_event_decode + kl_proj_apply) into a second state and
 * compares the two dumps: replay equals live, and a replay stopped at a
 * seq equals the live state as it was at that seq.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <ftw.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "projections.h"

enum { T0_MS = 1000 };
static const int64_t T0 = 1768473000000;    /* 2026-01-15T10:30:00Z */

/* ---- a small world of events --------------------------------------------- */

enum { MAX_KNOWN = 2048 };

typedef struct world {
    kl_proj *p;
    int64_t ts;
    kl_id org;                  /* the org events go to */
    kl_actor actor;             /* who does them */
    kl_idgen g;
    kl_log *log;                /* when set, applied events are written too */
    kl_id keys[MAX_KNOWN];      /* every id created, deleted ones included */
    size_t nkeys;
    kl_id users[64], sas[64], slots[64];
    size_t nusers, nsas, nslots;
} world;

static world *world_new(void)
{
    world *w = calloc(1, sizeof *w);
    assert_non_null(w);
    assert_int_equal(kl_proj_new(&w->p), KL_OK);
    w->ts = T0;
    w->actor.type = KL_PRINCIPAL_SYSTEM;
    kl_idgen_init(&w->g);
    return w;
}

static void world_free(world *w)
{
    kl_proj_free(w->p);
    free(w);
}

static kl_id new_id(world *w)
{
    kl_id id;
    assert_int_equal(kl_id_new(&w->g, w->ts, &id), KL_OK);
    return id;
}

static kl_str S(const char *s) { return (kl_str){s, (uint32_t)strlen(s)}; }

/* The next event: the next seq, a later time, the current org and actor. */
static kl_event ev_make(world *w, kl_event_type t)
{
    kl_event ev;
    memset(&ev, 0, sizeof ev);
    ev.type = t;
    ev.seq = kl_proj_seq(w->p) + 1;
    w->ts += T0_MS;
    ev.ts = w->ts;
    ev.org = w->org;
    ev.actor = w->actor;
    return ev;
}

static void write_to_log(world *w, const kl_event *ev)
{
    kl_buf body = {0}, batch = {0};
    assert_int_equal(kl_event_encode(ev, &body), KL_OK);
    kl_log_mark m;
    kl_log_mark_get(w->log, &m);
    uint64_t seq;
    assert_int_equal(kl_log_frame(w->log, (const uint8_t *)body.data, body.len,
                                  false, &batch, &seq), KL_OK);
    assert_int_equal(seq, ev->seq);
    kl_err err = {0};
    assert_int_equal(kl_log_write(w->log, &batch, &m, &err), KL_OK);
    kl_buf_free(&body);
    kl_buf_free(&batch);
}

static void apply_ok(world *w, const kl_event *ev)
{
    kl_err err = {0};
    int rc = kl_proj_apply(w->p, ev, &err);
    if (rc != KL_OK)
        fail_msg("apply seq %llu (%s): %d %s", (unsigned long long)ev->seq,
                 kl_event_type_name(ev->type), rc, err.msg);
    assert_int_equal(kl_proj_seq(w->p), ev->seq);
    if (w->log != NULL)
        write_to_log(w, ev);
    if (ev->type == KL_EV_KEY_CREATED && w->nkeys < MAX_KNOWN)
        w->keys[w->nkeys++] = ev->id;
    if (ev->type == KL_EV_USER_INVITED && w->nusers < 64)
        w->users[w->nusers++] = ev->id;
    if (ev->type == KL_EV_SA_CREATED && w->nsas < 64)
        w->sas[w->nsas++] = ev->id;
    if ((ev->has & KL_F_IDEM) && w->nslots < 64)
        kl_idem_slot(&ev->org, &ev->actor.key_id, ev->idem_key.ptr,
                     ev->idem_key.len, &w->slots[w->nslots++]);
}

static kl_id org_created(world *w, const char *name)
{
    w->org = new_id(w);
    kl_event ev = ev_make(w, KL_EV_ORG_CREATED);
    ev.actor = (kl_actor){KL_PRINCIPAL_SYSTEM, {{0}}, {{0}}};
    ev.has = KL_F_NAME;
    ev.name = S(name);
    apply_ok(w, &ev);
    return w->org;
}

static kl_id user_invited(world *w, const char *email, kl_role role)
{
    kl_event ev = ev_make(w, KL_EV_USER_INVITED);
    ev.has = KL_F_ID | KL_F_EMAIL | KL_F_ROLE;
    ev.id = new_id(w);
    ev.email = S(email);
    ev.role = role;
    apply_ok(w, &ev);
    return ev.id;
}

static kl_id sa_created(world *w, const char *name, kl_role role)
{
    kl_event ev = ev_make(w, KL_EV_SA_CREATED);
    ev.has = KL_F_ID | KL_F_NAME | KL_F_ROLE;
    ev.id = new_id(w);
    ev.name = S(name);
    ev.role = role;
    apply_ok(w, &ev);
    return ev.id;
}

static kl_event key_event(world *w, kl_principal otype, const kl_id *owner)
{
    kl_event ev = ev_make(w, KL_EV_KEY_CREATED);
    ev.has = KL_F_ID | KL_F_NAME | KL_F_OWNER | KL_F_HASH | KL_F_PREFIX |
             KL_F_ENV | KL_F_ACCESS;
    ev.id = new_id(w);
    ev.name = S("k");
    ev.owner_type = otype;
    ev.owner = *owner;
    memcpy(ev.hash, ev.id.b, 16);
    memcpy(ev.hash + 16, ev.id.b, 16);
    ev.prefix = S("kl_live_01234567");
    ev.env = KL_ENV_LIVE;
    ev.access = KL_ACCESS_FULL;
    return ev;
}

static kl_id key_created(world *w, kl_principal otype, const kl_id *owner)
{
    kl_event ev = key_event(w, otype, owner);
    apply_ok(w, &ev);
    return ev.id;
}

static kl_event id_event(world *w, kl_event_type t, const kl_id *id)
{
    kl_event ev = ev_make(w, t);
    ev.has = KL_F_ID;
    ev.id = *id;
    return ev;
}

static void simple(world *w, kl_event_type t, const kl_id *id)
{
    kl_event ev = id_event(w, t, id);
    apply_ok(w, &ev);
}

/* ---- the whole state as text ------------------------------------------------ */

static const char *idtxt(const kl_id *id, char out[33])
{
    kl_hex(id->b, 16, out);
    return out;
}

static void dump_key(kl_buf *b, const kl_proj *p, const kl_key *k)
{
    char a[33], c[33], d[33], e[33], h[65], oh[65];
    /* The pointers agree with the ids, inside this state. */
    assert_ptr_equal(kl_proj_key(p, &k->id), k);
    assert_ptr_equal(kl_proj_org(p, &kl_key_org(k)->id), kl_key_org(k));
    kl_ref owner = kl_key_owner(k);
    if (owner.type == KL_PRINCIPAL_USER)
        assert_ptr_equal(kl_proj_user(p, &owner.id), k->owner_ptr);
    else
        assert_ptr_equal(kl_proj_sa(p, &owner.id), k->owner_ptr);
    kl_hex(k->hash, KL_HASH_LEN, h);
    static const kl_key_grace no_grace;
    static const kl_key_revocation no_revocation;
    const kl_key_grace *g = kl_key_grace_of(k) != NULL ? kl_key_grace_of(k) : &no_grace;
    const kl_key_revocation *r = kl_key_revocation_of(k) != NULL ? kl_key_revocation_of(k)
                                                                 : &no_revocation;
    assert_true(k->revoked == (kl_key_revocation_of(k) != NULL));
    kl_hex(g->old_hash, KL_HASH_LEN, oh);
    kl_buf_printf(b, "key %s org=%s owner=%d:%s by=%d:%s name=[%s] desc=[%s] "
                  "prefix=[%s] env=%d access=%d flows=%u",
                  idtxt(&k->id, a), idtxt(&kl_key_org(k)->id, c), owner.type,
                  idtxt(&owner.id, d), k->created_by.type,
                  idtxt(&k->created_by.id, e), kl_key_name(k), kl_key_description(k),
                  k->prefix, k->env, k->access, kl_key_nflows(k));
    for (uint32_t i = 0; i < kl_key_nflows(k); i++)
        kl_buf_printf(b, " [%s]", kl_key_flow(k, i));
    kl_buf_printf(b, " rl=%u/%u at=%lld/%lld exp=%lld used=%lld hash=%s old=%s "
                  "until=%lld revoked=%d deleted=%d revoked_at=%lld "
                  "revoked_by=%d:%s comment=[%s] v=%llu\n",
                  k->rl_minute, k->rl_day, (long long)k->created_at,
                  (long long)k->updated_at, (long long)k->expires_at,
                  (long long)k->last_used_at, h, oh, (long long)g->until,
                  k->revoked, k->deleted, (long long)r->at,
                  r->by.type, idtxt(&r->by.id, a),
                  r->comment != NULL ? r->comment : "(none)",
                  (unsigned long long)k->version);
}

static void dump_user(kl_buf *b, const kl_user *u)
{
    char a[33], c[33];
    kl_buf_printf(b, "user %s org=%s email=[%s] name=[%s] role=%d removed=%d "
                  "at=%lld/%lld v=%llu\n",
                  idtxt(&u->id, a), idtxt(&u->org->id, c), u->email, u->name,
                  u->role, u->removed, (long long)u->created_at,
                  (long long)u->updated_at, (unsigned long long)u->version);
}

static void dump_sa(kl_buf *b, const kl_sa *s)
{
    char a[33], c[33], d[33];
    kl_buf_printf(b, "sa %s org=%s name=[%s] desc=[%s] role=%d active=%d "
                  "deleted=%d by=%d:%s at=%lld/%lld/%lld v=%llu\n",
                  idtxt(&s->id, a), idtxt(&s->org->id, c), s->name,
                  s->description, s->role, s->active, s->deleted,
                  s->created_by.type, idtxt(&s->created_by.id, d),
                  (long long)s->created_at, (long long)s->updated_at,
                  (long long)s->deactivated_at, (unsigned long long)s->version);
}

static void dump_computer(kl_buf *b, const kl_computer *m)
{
    char a[33], c[33], d[33];
    kl_buf_printf(b, "computer %s name=[%s] owner=%d:%s by=%d:%s deleted=%d "
                  "at=%lld/%lld/%lld v=%llu\n",
                  idtxt(&m->id, a), m->name, m->owner.type, idtxt(&m->owner.id, c),
                  m->created_by.type, idtxt(&m->created_by.id, d), m->deleted,
                  (long long)m->created_at, (long long)m->updated_at,
                  (long long)m->restarted_at, (unsigned long long)m->version);
}

static void dump_session(kl_buf *b, const kl_session *s)
{
    char a[33], c[33], d[33];
    kl_buf_printf(b, "session %s title=[%s] computer=%s by=%d:%s deleted=%d "
                  "at=%lld/%lld v=%llu messages=%u\n",
                  idtxt(&s->id, a), s->title ? s->title : "(none)",
                  idtxt(&s->computer, c), s->created_by.type,
                  idtxt(&s->created_by.id, d), s->deleted, (long long)s->created_at,
                  (long long)s->updated_at, (unsigned long long)s->version,
                  s->messages.len);
    for (uint32_t i = 0; i < s->messages.len; i++) {
        const kl_message *m = s->messages.items[i];
        assert_ptr_equal(m->session, s);
        kl_buf_printf(b, "  message %s author=%d by=%d:%s at=%lld [%s]\n",
                      idtxt(&m->id, a), m->author, m->created_by.type,
                      idtxt(&m->created_by.id, d), (long long)m->created_at,
                      m->content);
    }
}

/* Everything reachable: orgs in order with their lists, then every entity
 * by the ids the world made (deleted ones are only found that way), the
 * idempotency records and the counts. */
static char *dump(const world *w, const kl_proj *p)
{
    kl_buf b = {0};
    char a[33];
    kl_buf_printf(&b, "seq %llu\n", (unsigned long long)kl_proj_seq(p));
    for (uint32_t i = 0; i < kl_proj_org_count(p); i++) {
        const kl_org *o = kl_proj_org_at(p, i);
        assert_ptr_equal(kl_proj_org(p, &o->id), o);
        kl_buf_printf(&b, "org %s name=[%s] at=%lld/%lld v=%llu lim=%u/%u/%u "
                      "owners=%u users=%u sas=%u keys=%u\n",
                      idtxt(&o->id, a), o->name, (long long)o->created_at,
                      (long long)o->updated_at, (unsigned long long)o->version,
                      o->lim_minute, o->lim_day, o->lim_month, o->active_owners,
                      o->users.len, o->sas.len, o->keys.len);
        for (uint32_t j = 0; j < o->users.len; j++)
            dump_user(&b, o->users.items[j]);
        for (uint32_t j = 0; j < o->sas.len; j++)
            dump_sa(&b, o->sas.items[j]);
        for (uint32_t j = 0; j < o->keys.len; j++)
            dump_key(&b, p, o->keys.items[j]);
        for (uint32_t j = 0; j < o->computers.len; j++)
            dump_computer(&b, o->computers.items[j]);
        for (uint32_t j = 0; j < o->sessions.len; j++)
            dump_session(&b, o->sessions.items[j]);
    }
    kl_buf_printf(&b, "all:\n");
    for (size_t i = 0; i < w->nusers; i++)
        dump_user(&b, kl_proj_user(p, &w->users[i]));
    for (size_t i = 0; i < w->nsas; i++)
        dump_sa(&b, kl_proj_sa(p, &w->sas[i]));
    for (size_t i = 0; i < w->nkeys; i++)
        dump_key(&b, p, kl_proj_key(p, &w->keys[i]));
    for (size_t i = 0; i < w->nslots; i++) {
        const kl_idem *r = kl_proj_idem(p, &w->slots[i]);
        assert_non_null(r);
        char fp[33], t[33];
        kl_hex(r->fp, 16, fp);
        kl_buf_printf(&b, "idem %s fp=%s type=%d target=%s ts=%lld\n",
                      idtxt(&r->slot, a), fp, r->type, idtxt(&r->target, t),
                      (long long)r->ts);
    }
    kl_proj_stats st;
    kl_proj_stats_get(p, &st);
    kl_buf_printf(&b, "stats %llu %llu %llu %llu %llu\n",
                  (unsigned long long)st.orgs, (unsigned long long)st.users,
                  (unsigned long long)st.sas, (unsigned long long)st.keys,
                  (unsigned long long)st.idem);
    return b.data;
}

static void assert_snapshot_round_trip(const world *w, const kl_proj *p);
static void assert_same_dump(const char *live, const char *replayed);

/* The event does not fit: KL_ECORRUPT naming its seq, state untouched. */
static void apply_misfit(world *w, const kl_event *ev, const char *what)
{
    char *before = dump(w, w->p);
    kl_err err = {0};
    int rc = kl_proj_apply(w->p, ev, &err);
    if (rc != KL_ECORRUPT)
        fail_msg("%s: expected KL_ECORRUPT, got %d", what, rc);
    char seq[32];
    snprintf(seq, sizeof seq, "seq %llu", (unsigned long long)ev->seq);
    if (strstr(err.msg, seq) == NULL)
        fail_msg("%s: message does not name %s: %s", what, seq, err.msg);
    char *after = dump(w, w->p);
    if (strcmp(before, after) != 0)
        fail_msg("%s changed the state:\n--- before\n%s--- after\n%s", what,
                 before, after);
    free(before);
    free(after);
}

/* ---- keys: the whole lifecycle ---------------------------------------------- */

static void test_key_lifecycle(void **state)
{
    (void)state;
    world *w = world_new();
    kl_proj_stats st;
    kl_proj_stats_get(w->p, &st);
    assert_int_equal(st.orgs + st.users + st.sas + st.keys + st.idem, 0);
    assert_int_equal(kl_proj_seq(w->p), 0);

    kl_id org = org_created(w, "Acme");
    kl_org *o = kl_proj_org(w->p, &org);
    assert_non_null(o);
    assert_string_equal(o->name, "Acme");
    assert_int_equal(o->created_at, T0 + 1000);
    assert_int_equal(o->version, 1);
    assert_int_equal(kl_proj_org_count(w->p), 1);
    assert_ptr_equal(kl_proj_org_at(w->p, 0), o);

    kl_event ev = ev_make(w, KL_EV_USER_INVITED);
    ev.has = KL_F_ID | KL_F_EMAIL | KL_F_ROLE | KL_F_NAME;
    ev.id = new_id(w);
    ev.email = S("Ada@Example.com");
    ev.role = KL_ROLE_OWNER;
    ev.name = S("Ada");
    apply_ok(w, &ev);
    kl_id uid = ev.id;
    kl_user *u = kl_proj_user(w->p, &uid);
    assert_non_null(u);
    assert_ptr_equal(u->org, o);
    assert_string_equal(u->email, "Ada@Example.com");
    assert_string_equal(u->name, "Ada");
    assert_int_equal(u->role, KL_ROLE_OWNER);
    assert_false(u->removed);
    assert_int_equal(o->users.len, 1);
    assert_int_equal(o->active_owners, 1);
    assert_ptr_equal(kl_proj_user_by_email(o, "ada@example.COM", 15), u);
    assert_null(kl_proj_user_by_email(o, "ada@example.co", 14));

    /* The owner acts through a key of theirs from here on. */
    w->actor = (kl_actor){KL_PRINCIPAL_USER, uid, new_id(w)};

    const int64_t expiry = T0 + 86400000;
    ev = key_event(w, KL_PRINCIPAL_USER, &uid);
    ev.has |= KL_F_RATE_LIMIT | KL_F_EXPIRES;
    ev.name = S("deploy");
    ev.access = KL_ACCESS_FLOWS;
    ev.flows[0] = S("billing.read");
    ev.flows[1] = S("billing.write");
    ev.nflows = 2;
    ev.rl_minute = 10;
    ev.rl_day = 1000;
    ev.expires_at = expiry;
    apply_ok(w, &ev);
    kl_id kid = ev.id;
    const int64_t created = ev.ts;
    uint8_t h1[KL_HASH_LEN];
    memcpy(h1, ev.hash, KL_HASH_LEN);
    kl_key *k = kl_proj_key(w->p, &kid);
    assert_non_null(k);
    assert_ptr_equal(kl_key_org(k), o);
    assert_int_equal(kl_key_owner(k).type, KL_PRINCIPAL_USER);
    assert_true(kl_id_eq(kl_key_owner_id(k), &uid));
    assert_ptr_equal(k->owner_ptr, u);
    assert_int_equal(k->created_by.type, KL_PRINCIPAL_USER);
    assert_true(kl_id_eq(&k->created_by.id, &uid));
    assert_string_equal(kl_key_name(k), "deploy");
    assert_string_equal(kl_key_description(k), "");
    assert_string_equal(k->prefix, "kl_live_01234567");
    assert_int_equal(k->env, KL_ENV_LIVE);
    assert_int_equal(k->access, KL_ACCESS_FLOWS);
    assert_int_equal(kl_key_nflows(k), 2);
    assert_string_equal(kl_key_flow(k, 0), "billing.read");
    assert_string_equal(kl_key_flow(k, 1), "billing.write");
    assert_int_equal(k->rl_minute, 10);
    assert_int_equal(k->rl_day, 1000);
    assert_int_equal(k->expires_at, expiry);
    assert_int_equal(k->created_at, created);
    assert_int_equal(k->updated_at, created);
    assert_int_equal(k->last_used_at, 0);
    assert_memory_equal(k->hash, h1, KL_HASH_LEN);
    assert_null(kl_key_grace_of(k));
    assert_false(k->revoked);
    assert_false(k->deleted);
    assert_null(kl_key_revocation_of(k));
    assert_int_equal(k->version, 1);
    assert_int_equal(o->keys.len, 1);
    assert_ptr_equal(o->keys.items[0], k);
    assert_int_equal(kl_key_role(k), KL_ROLE_OWNER);
    assert_true(kl_key_owner_enabled(k));
    assert_int_equal(kl_key_status_at(k, created), KL_KEY_ACTIVE);

    /* Update: new name, flows, limits; the expiry cleared. */
    ev = id_event(w, KL_EV_KEY_UPDATED, &kid);
    ev.has |= KL_F_NAME | KL_F_ACCESS | KL_F_RATE_LIMIT | KL_F_EXPIRES;
    ev.name = S("deploy (prod)");
    ev.access = KL_ACCESS_FLOWS;
    ev.flows[0] = S("deploy.run");
    ev.nflows = 1;
    ev.rl_minute = 0;
    ev.rl_day = 50;
    ev.expires_at = 0;
    apply_ok(w, &ev);
    assert_string_equal(kl_key_name(k), "deploy (prod)");
    assert_string_equal(kl_key_description(k), "");
    assert_int_equal(kl_key_nflows(k), 1);
    assert_string_equal(kl_key_flow(k, 0), "deploy.run");
    assert_int_equal(k->rl_minute, 0);
    assert_int_equal(k->rl_day, 50);
    assert_int_equal(k->expires_at, 0);
    assert_int_equal(kl_key_status_at(k, expiry + 1), KL_KEY_ACTIVE);
    assert_int_equal(k->created_at, created);
    assert_int_equal(k->updated_at, ev.ts);
    assert_int_equal(k->version, 2);

    /* An update with one field leaves the others alone. */
    ev = id_event(w, KL_EV_KEY_UPDATED, &kid);
    ev.has |= KL_F_DESCRIPTION;
    ev.description = S("ships builds");
    apply_ok(w, &ev);
    assert_string_equal(kl_key_name(k), "deploy (prod)");
    assert_string_equal(kl_key_description(k), "ships builds");
    assert_int_equal(k->access, KL_ACCESS_FLOWS);
    assert_int_equal(kl_key_nflows(k), 1);
    assert_int_equal(k->rl_day, 50);
    /* Access without flows drops the old flows. */
    ev = id_event(w, KL_EV_KEY_UPDATED, &kid);
    ev.has |= KL_F_ACCESS;
    ev.access = KL_ACCESS_READ_ONLY;
    apply_ok(w, &ev);
    assert_int_equal(k->access, KL_ACCESS_READ_ONLY);
    assert_int_equal(kl_key_nflows(k), 0);
    assert_int_equal(k->version, 4);

    /* Regenerate with a grace period: the old hash stays valid until then. */
    const int64_t grace = w->ts + 3600000;
    ev = id_event(w, KL_EV_KEY_REGENERATED, &kid);
    ev.has |= KL_F_HASH | KL_F_PREFIX | KL_F_GRACE;
    memset(ev.hash, 0x22, KL_HASH_LEN);
    ev.prefix = S("kl_live_abcdefgh");
    ev.grace_until = grace;
    apply_ok(w, &ev);
    uint8_t h2[KL_HASH_LEN];
    memset(h2, 0x22, sizeof h2);
    assert_memory_equal(k->hash, h2, KL_HASH_LEN);
    assert_non_null(kl_key_grace_of(k));
    assert_memory_equal(kl_key_grace_of(k)->old_hash, h1, KL_HASH_LEN);
    assert_int_equal(kl_key_grace_of(k)->until, grace);
    assert_string_equal(k->prefix, "kl_live_abcdefgh");
    assert_int_equal(k->version, 5);
    /* And without one: the old secret stops at once. */
    ev = id_event(w, KL_EV_KEY_REGENERATED, &kid);
    ev.has |= KL_F_HASH | KL_F_PREFIX;
    memset(ev.hash, 0x33, KL_HASH_LEN);
    ev.prefix = S("kl_live_zz");
    apply_ok(w, &ev);
    assert_null(kl_key_grace_of(k));
    assert_string_equal(k->prefix, "kl_live_zz");
    /* A prefix longer than the field is cut to fit, never overflows. */
    ev = id_event(w, KL_EV_KEY_REGENERATED, &kid);
    ev.has |= KL_F_HASH | KL_F_PREFIX;
    memset(ev.hash, 0x33, KL_HASH_LEN);
    ev.prefix = S("kl_live_0123456789abcdefghijklmnop");
    apply_ok(w, &ev);
    assert_int_equal(strlen(k->prefix), sizeof k->prefix - 1);
    assert_memory_equal(k->prefix, ev.prefix.ptr, sizeof k->prefix - 1);
    /* A grace again, then revoked: revoking ends the grace too. */
    ev = id_event(w, KL_EV_KEY_REGENERATED, &kid);
    ev.has |= KL_F_HASH | KL_F_PREFIX | KL_F_GRACE;
    memset(ev.hash, 0x44, KL_HASH_LEN);
    ev.prefix = S("kl_live_yy");
    ev.grace_until = w->ts + 3600000;
    apply_ok(w, &ev);
    assert_int_equal(kl_key_grace_of(k)->until, ev.grace_until);

    ev = id_event(w, KL_EV_KEY_REVOKED, &kid);
    ev.has |= KL_F_COMMENT;
    ev.comment = S("leaked in a gist");
    apply_ok(w, &ev);
    const int64_t revoked_at = ev.ts;
    assert_true(k->revoked);
    assert_int_equal(kl_key_revocation_of(k)->at, revoked_at);
    assert_int_equal(kl_key_revocation_of(k)->by.type, KL_PRINCIPAL_USER);
    assert_true(kl_id_eq(&kl_key_revocation_of(k)->by.id, &uid));
    assert_string_equal(kl_key_revocation_of(k)->comment, "leaked in a gist");
    assert_null(kl_key_grace_of(k));
    assert_int_equal(kl_key_status_at(k, revoked_at), KL_KEY_REVOKED);
    assert_int_equal(kl_key_status_at(k, 0), KL_KEY_REVOKED);
    assert_false(k->deleted);
    assert_int_equal(o->keys.len, 1);
    assert_int_equal(k->version, 9);

    simple(w, KL_EV_KEY_DELETED, &kid);
    assert_true(k->deleted);
    assert_int_equal(o->keys.len, 0);
    assert_ptr_equal(kl_proj_key(w->p, &kid), k);   /* its id stays taken */
    assert_int_equal(k->version, 10);
    kl_proj_stats_get(w->p, &st);
    assert_int_equal(st.orgs, 1);
    assert_int_equal(st.users, 1);
    assert_int_equal(st.sas, 0);
    assert_int_equal(st.keys, 1);
    assert_int_equal(st.idem, 0);

    /* A revoke comment is optional. */
    kl_id k2 = key_created(w, KL_PRINCIPAL_USER, &uid);
    simple(w, KL_EV_KEY_REVOKED, &k2);
    assert_true(kl_proj_key(w->p, &k2)->revoked);
    assert_null(kl_key_revocation_of(kl_proj_key(w->p, &k2))->comment);
    world_free(w);
}

static void test_status_at(void **state)
{
    (void)state;
    world *w = world_new();
    org_created(w, "o");
    kl_id uid = user_invited(w, "a@b.c", KL_ROLE_MEMBER);
    const int64_t e = T0 + 7 * 86400000ll;
    kl_event ev = key_event(w, KL_PRINCIPAL_USER, &uid);
    ev.has |= KL_F_EXPIRES;
    ev.expires_at = e;
    apply_ok(w, &ev);
    kl_key *k = kl_proj_key(w->p, &ev.id);
    assert_int_equal(kl_key_status_at(k, T0), KL_KEY_ACTIVE);
    assert_int_equal(kl_key_status_at(k, e - 1), KL_KEY_ACTIVE);
    assert_int_equal(kl_key_status_at(k, e), KL_KEY_EXPIRED);
    assert_int_equal(kl_key_status_at(k, e + 1), KL_KEY_EXPIRED);
    assert_string_equal(kl_key_status_name(KL_KEY_ACTIVE), "active");
    assert_string_equal(kl_key_status_name(KL_KEY_EXPIRED), "expired");
    assert_string_equal(kl_key_status_name(KL_KEY_REVOKED), "revoked");

    /* Extending the expiry makes it active again at the same instant. */
    kl_event up = id_event(w, KL_EV_KEY_UPDATED, &ev.id);
    up.has |= KL_F_EXPIRES;
    up.expires_at = e + 1000;
    apply_ok(w, &up);
    assert_int_equal(kl_key_status_at(k, e), KL_KEY_ACTIVE);
    assert_int_equal(kl_key_status_at(k, e + 1000), KL_KEY_EXPIRED);

    kl_id forever = key_created(w, KL_PRINCIPAL_USER, &uid);
    kl_key *f = kl_proj_key(w->p, &forever);
    assert_int_equal(f->expires_at, 0);
    assert_int_equal(kl_key_status_at(f, INT64_MAX), KL_KEY_ACTIVE);
    assert_int_equal(kl_key_status_at(f, INT64_MIN), KL_KEY_ACTIVE);

    /* Revoked wins over expired, before and after the expiry. */
    simple(w, KL_EV_KEY_REVOKED, &ev.id);
    assert_int_equal(kl_key_status_at(k, e - 1), KL_KEY_REVOKED);
    assert_int_equal(kl_key_status_at(k, e + 5000), KL_KEY_REVOKED);
    world_free(w);
}

/* ---- owners --------------------------------------------------------------- */

/* Keys naming the same flows in the same order share one list; a change
 * of one key's flows leaves the others' alone, and a list no key holds is
 * gone (ASan would see it leak or be used after it is freed). */
static kl_id flows_key(world *w, const kl_id *owner, const char *a, const char *b)
{
    kl_event ev = key_event(w, KL_PRINCIPAL_USER, owner);
    ev.access = KL_ACCESS_FLOWS;
    ev.flows[0] = S(a);
    ev.flows[1] = S(b);
    ev.nflows = 2;
    apply_ok(w, &ev);
    return ev.id;
}

static void test_shared_flow_lists(void **state)
{
    (void)state;
    world *w = world_new();
    org_created(w, "o");
    kl_id uid = user_invited(w, "owner@x.io", KL_ROLE_OWNER);
    kl_id id1 = flows_key(w, &uid, "orders", "refunds");
    kl_id id2 = flows_key(w, &uid, "orders", "refunds");
    kl_id id3 = flows_key(w, &uid, "refunds", "orders");
    kl_id id4 = flows_key(w, &uid, "ordersr", "efunds");
    kl_key *k1 = kl_proj_key(w->p, &id1);
    kl_key *k2 = kl_proj_key(w->p, &id2), *k3 = kl_proj_key(w->p, &id3);
    kl_key *k4 = kl_proj_key(w->p, &id4);
    assert_ptr_equal(k1->flows, k2->flows);
    assert_int_equal(k1->flows->refs, 2);
    assert_true(k3->flows != k1->flows);    /* order is part of the list */
    assert_true(k4->flows != k1->flows);    /* so are the names' bounds */
    assert_string_equal(kl_key_flow(k4, 0), "ordersr");
    assert_string_equal(kl_key_flow(k4, 1), "efunds");

    /* k1 moves to k3's list: k2 keeps its own, now held once. */
    kl_event ev = id_event(w, KL_EV_KEY_UPDATED, &id1);
    ev.has |= KL_F_ACCESS;
    ev.access = KL_ACCESS_FLOWS;
    ev.flows[0] = S("refunds");
    ev.flows[1] = S("orders");
    ev.nflows = 2;
    apply_ok(w, &ev);
    assert_ptr_equal(k1->flows, k3->flows);
    assert_int_equal(k3->flows->refs, 2);
    assert_int_equal(k2->flows->refs, 1);
    assert_string_equal(kl_key_flow(k2, 0), "orders");
    assert_string_equal(kl_key_flow(k2, 1), "refunds");

    /* k2 gives up flows: its list goes; a new key with it makes a new one. */
    ev = id_event(w, KL_EV_KEY_UPDATED, &id2);
    ev.has |= KL_F_ACCESS;
    ev.access = KL_ACCESS_FULL;
    apply_ok(w, &ev);
    assert_null(k2->flows);
    assert_int_equal(kl_key_nflows(k2), 0);
    kl_id id5 = flows_key(w, &uid, "orders", "refunds");
    assert_int_equal(kl_proj_key(w->p, &id5)->flows->refs, 1);

    /* Many lists: the table grows and keeps every one. */
    char a[32], b[32];
    kl_id many[200];
    for (int i = 0; i < 200; i++) {
        snprintf(a, sizeof a, "flow.%d", i);
        snprintf(b, sizeof b, "flow.%d", i % 7);
        many[i] = flows_key(w, &uid, a, b);
    }
    for (int i = 0; i < 200; i++) {
        const kl_key *k = kl_proj_key(w->p, &many[i]);
        snprintf(a, sizeof a, "flow.%d", i);
        assert_string_equal(kl_key_flow(k, 0), a);
        assert_int_equal(k->flows->refs, 1);
    }
    world_free(w);
}

/* The id index across many resizes: every key found, no other id found
 * (ids made in the same millisecond differ only in their random bits). */
static void test_many_keys_found(void **state)
{
    (void)state;
    world *w = world_new();
    org_created(w, "o");
    kl_id uid = user_invited(w, "owner@x.io", KL_ROLE_OWNER);
    enum { N = 20000 };
    kl_id *ids = malloc(N * sizeof *ids);
    assert_non_null(ids);
    for (int i = 0; i < N; i++) {
        kl_event ev = key_event(w, KL_PRINCIPAL_USER, &uid);
        apply_ok(w, &ev);
        ids[i] = ev.id;
    }
    for (int i = 0; i < N; i++) {
        const kl_key *k = kl_proj_key(w->p, &ids[i]);
        assert_non_null(k);
        assert_true(kl_id_eq(&k->id, &ids[i]));
        kl_id other = ids[i];
        other.b[15] ^= 0x5a;
        const kl_key *o = kl_proj_key(w->p, &other);
        assert_true(o == NULL || kl_id_eq(&o->id, &other));
        assert_null(kl_proj_key(w->p, &(kl_id){{0}}));
    }
    kl_proj_stats st;
    kl_proj_stats_get(w->p, &st);
    assert_int_equal(st.keys, N);

    /* Loaded from a snapshot: one block for them all, faulted in by a
     * second thread while the loader fills it, then indexed at once. */
    kl_buf snap = {0};
    assert_int_equal(kl_proj_snapshot(w->p, &snap), KL_OK);
    kl_proj *loaded = NULL;
    kl_err err = {0};
    assert_int_equal(kl_proj_load(&loaded, (const uint8_t *)snap.data, snap.len, &err),
                     KL_OK);
    for (int i = 0; i < N; i++) {
        const kl_key *k = kl_proj_key(loaded, &ids[i]);
        assert_non_null(k);
        assert_true(kl_id_eq(&k->id, &ids[i]));
        assert_string_equal(kl_key_name(k), "k");
    }
    kl_proj_free(loaded);
    /* Cut short inside the keys: refused, the thread waited for. */
    loaded = NULL;
    assert_int_equal(kl_proj_load(&loaded, (const uint8_t *)snap.data, snap.len / 2, &err),
                     KL_ECORRUPT);
    assert_null(loaded);
    kl_buf_free(&snap);
    free(ids);
    world_free(w);
}

/* The key split in a snapshot's header (its only uint 64, 9 bytes at
 * *at), and writing one there. */
static uint64_t header_split(uint8_t *b, uint8_t **at)
{
    *at = memchr(b + 17, 0xcf, 64);
    assert_non_null(*at);
    uint64_t split = 0;
    for (int i = 1; i <= 8; i++)
        split = split << 8 | (*at)[i];
    return split;
}

static void set_split(uint8_t *at, uint64_t split)
{
    for (int i = 8; i >= 1; i--, split >>= 8)
        at[i] = (uint8_t)split;
}

/* A snapshot of 20,000 keys or more loads in two halves on two threads:
 * owners and flow lists changing in runs, two orgs (the second's keys cut
 * between the halves), deleted and revoked keys, all the same after the
 * load (the round trip also cuts and flips bytes); a split that is not
 * where the second half begins is refused, 0 means one loader; a loaded
 * key's texts (from the loader's chunks) can be replaced, and every flow
 * list counts exactly the keys holding it. */
static void test_snapshot_in_two_halves(void **state)
{
    (void)state;
    world *w = world_new();
    kl_id oa = org_created(w, "a");
    kl_id ua = user_invited(w, "a@x.io", KL_ROLE_OWNER);
    kl_id sa = sa_created(w, "bot", KL_ROLE_MEMBER);
    static const char *lists[3][2] = {{"orders", "refunds"}, {"x", "y"}, {"refunds", "orders"}};
    enum { PER_ORG = 11000 };
    kl_id second = {{0}}, flowed[3];
    for (int i = 0; i < PER_ORG; i++) {
        bool by_sa = (i / 5) % 2 == 1;
        kl_event ev = key_event(w, by_sa ? KL_PRINCIPAL_SA : KL_PRINCIPAL_USER,
                                by_sa ? &sa : &ua);
        char name[32];
        snprintf(name, sizeof name, "key %d", i);
        ev.name = S(name);
        if (i % 3 != 0) {
            ev.access = KL_ACCESS_FLOWS;
            ev.flows[0] = S(lists[(i / 7) % 3][0]);
            ev.flows[1] = S(lists[(i / 7) % 3][1]);
            ev.nflows = 2;
            flowed[(i / 7) % 3] = ev.id;
        }
        apply_ok(w, &ev);
        if (i == 1)
            second = ev.id;
        if (i % 101 == 0)
            simple(w, KL_EV_KEY_REVOKED, &ev.id);
        if (i % 103 == 0)
            simple(w, KL_EV_KEY_DELETED, &ev.id);
    }
    org_created(w, "b");
    kl_id ub = user_invited(w, "b@x.io", KL_ROLE_OWNER);
    for (int i = 0; i < PER_ORG + 2000; i++)
        key_created(w, KL_PRINCIPAL_USER, &ub);
    assert_snapshot_round_trip(w, w->p);

    kl_buf snap = {0};
    assert_int_equal(kl_proj_snapshot(w->p, &snap), KL_OK);
    uint8_t *b = (uint8_t *)snap.data, *at;
    uint64_t split = header_split(b, &at);
    assert_true(split > 0 && split < snap.len);
    kl_proj *loaded = NULL;
    kl_err err = {0};
    for (int delta = -1; delta <= 1; delta += 2) {
        set_split(at, split + (uint64_t)delta);
        assert_int_equal(kl_proj_load(&loaded, b, snap.len, &err), KL_ECORRUPT);
        assert_null(loaded);
    }
    set_split(at, 0);                   /* 0: one loader */
    assert_int_equal(kl_proj_load(&loaded, b, snap.len, &err), KL_OK);
    char *want = dump(w, w->p), *got = dump(w, loaded);
    assert_same_dump(want, got);
    free(want);
    free(got);
    kl_proj_free(loaded);
    set_split(at, split);
    assert_int_equal(kl_proj_load(&loaded, b, snap.len, &err), KL_OK);
    kl_buf_free(&snap);

    /* Each of the three lists counts as many holders as the state's own. */
    for (int l = 0; l < 3; l++) {
        const kl_flowset *set = kl_proj_key(loaded, &flowed[l])->flows;
        assert_non_null(set);
        assert_int_equal(set->refs, kl_proj_key(w->p, &flowed[l])->flows->refs);
    }
    /* A loaded key's texts replaced: the old ones are the chunks', not
     * freed on their own (ASan would say). */
    kl_event ev = id_event(w, KL_EV_KEY_UPDATED, &second);
    ev.org = oa;
    ev.has |= KL_F_NAME | KL_F_DESCRIPTION;
    ev.name = S("renamed");
    ev.description = S("after the load");
    assert_int_equal(kl_proj_apply(loaded, &ev, &err), KL_OK);
    const kl_key *k = kl_proj_key(loaded, &second);
    assert_string_equal(kl_key_name(k), "renamed");
    assert_string_equal(kl_key_description(k), "after the load");
    assert_false(k->texts_in_chunk);
    kl_proj_free(loaded);
    world_free(w);
}

static void usage(world *w, const kl_id *key, int64_t last_used);

/* A key written as text is byte for byte jansson's dump of kl_render_key
 * (with `key` last): both answer the same routes. */
static void text_matches_tree(const kl_key *k, int64_t now, const char *secret)
{
    json_t *o = kl_render_key(k, now);
    if (secret != NULL)
        json_object_set_new(o, "key", json_string(secret));
    char *want = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    size_t max = kl_render_key_max(k, secret);
    char *buf = malloc(max);
    kl_jw w = {buf, buf + max, false};
    kl_render_key_text(&w, k, now, secret);
    assert_false(w.full);
    assert_int_equal((size_t)(w.p - buf), strlen(want));
    assert_memory_equal(buf, want, strlen(want));
    /* One byte short of the answer: full, nothing written past the end. */
    kl_jw shortw = {buf, buf + strlen(want) - 1, false};
    kl_render_key_text(&shortw, k, now, secret);
    assert_true(shortw.full);
    free(buf);
    free(want);
}

static void test_key_as_text(void **state)
{
    (void)state;
    world *w = world_new();
    org_created(w, "o");
    kl_id uid = user_invited(w, "owner@x.io", KL_ROLE_OWNER);
    kl_id sid = sa_created(w, "ci", KL_ROLE_MEMBER);
    w->actor = (kl_actor){KL_PRINCIPAL_USER, uid, new_id(w)};

    /* Every text with every kind of character jansson escapes. */
    kl_event ev = key_event(w, KL_PRINCIPAL_SA, &sid);
    ev.has |= KL_F_DESCRIPTION | KL_F_RATE_LIMIT | KL_F_EXPIRES;
    ev.name = S("quote \" back \\ slash / tab \t nl \n cr \r bs \b ff \f");
    ev.description = S("ctl \x01\x1f del \x7f utf-8 \xc3\xa9\xe2\x82\xac");
    ev.access = KL_ACCESS_FLOWS;
    ev.flows[0] = S("orders.read");
    ev.flows[1] = S("a\"b");
    ev.nflows = 2;
    ev.rl_minute = 0;
    ev.rl_day = 4000000000u;
    ev.expires_at = w->ts + 1000;
    apply_ok(w, &ev);
    kl_key *k = kl_proj_key(w->p, &ev.id);
    text_matches_tree(k, w->ts, NULL);
    text_matches_tree(k, w->ts, "kl_live_secret\"x");
    text_matches_tree(k, w->ts + 5000, NULL);          /* expired */
    usage(w, &k->id, w->ts);
    text_matches_tree(k, w->ts, NULL);                 /* last_used_at */

    /* A user's key, no limits, no flows; revoked with and without a comment,
     * by the system. */
    kl_id uk = key_created(w, KL_PRINCIPAL_USER, &uid);
    k = kl_proj_key(w->p, &uk);
    text_matches_tree(k, w->ts, "kl_live_x");
    ev = id_event(w, KL_EV_KEY_UPDATED, &uk);
    ev.has |= KL_F_RATE_LIMIT | KL_F_ACCESS;
    ev.access = KL_ACCESS_FLOWS;
    ev.nflows = 0;
    ev.rl_minute = 7;
    ev.rl_day = 0;
    apply_ok(w, &ev);
    text_matches_tree(k, w->ts, NULL);                 /* flows: [] */
    ev = id_event(w, KL_EV_KEY_REVOKED, &uk);
    ev.has |= KL_F_COMMENT;
    ev.comment = S("leaked \"here\"\n");
    apply_ok(w, &ev);
    text_matches_tree(k, w->ts, NULL);
    kl_id uk2 = key_created(w, KL_PRINCIPAL_USER, &uid);
    w->actor = (kl_actor){KL_PRINCIPAL_SYSTEM, {{0}}, {{0}}};
    ev = id_event(w, KL_EV_KEY_REVOKED, &uk2);
    apply_ok(w, &ev);
    text_matches_tree(kl_proj_key(w->p, &uk2), w->ts, NULL);
    world_free(w);
}

/* A snapshot naming one key id in two orgs is damage: refused whole (the
 * keys are indexed all at once after the last is loaded). */
static void test_snapshot_key_id_twice(void **state)
{
    (void)state;
    world *w = world_new();
    org_created(w, "a");
    kl_id ua = user_invited(w, "a@a.io", KL_ROLE_OWNER);
    kl_id ka = key_created(w, KL_PRINCIPAL_USER, &ua);
    org_created(w, "b");
    kl_id ub = user_invited(w, "b@b.io", KL_ROLE_OWNER);
    kl_id kb = key_created(w, KL_PRINCIPAL_USER, &ub);
    kl_buf snap = {0};
    assert_int_equal(kl_proj_snapshot(w->p, &snap), KL_OK);
    kl_proj *loaded = NULL;
    kl_err err = {0};
    assert_int_equal(kl_proj_load(&loaded, (const uint8_t *)snap.data, snap.len, &err),
                     KL_OK);
    kl_proj_free(loaded);
    int swapped = 0;
    for (size_t i = 0; i + 16 <= snap.len; i++) {
        if (memcmp(snap.data + i, kb.b, 16) == 0) {
            memcpy(snap.data + i, ka.b, 16);
            swapped++;
        }
    }
    assert_true(swapped >= 1);
    loaded = NULL;
    assert_int_equal(kl_proj_load(&loaded, (const uint8_t *)snap.data, snap.len, &err),
                     KL_ECORRUPT);
    assert_null(loaded);
    assert_non_null(strstr(err.msg, "keys"));
    kl_buf_free(&snap);
    world_free(w);
}

static void test_role_follows_owner(void **state)
{
    (void)state;
    world *w = world_new();
    kl_id org = org_created(w, "o");
    kl_org *o = kl_proj_org(w->p, &org);
    kl_id owner = user_invited(w, "owner@x.io", KL_ROLE_OWNER);
    kl_id uid = user_invited(w, "m@x.io", KL_ROLE_MEMBER);
    kl_id kid = key_created(w, KL_PRINCIPAL_USER, &uid);
    kl_key *k = kl_proj_key(w->p, &kid);
    assert_int_equal(kl_key_role(k), KL_ROLE_MEMBER);
    assert_int_equal(o->active_owners, 1);

    kl_event ev = id_event(w, KL_EV_USER_ROLE_CHANGED, &uid);
    ev.has |= KL_F_ROLE;
    ev.role = KL_ROLE_MANAGER;
    apply_ok(w, &ev);
    assert_int_equal(kl_key_role(k), KL_ROLE_MANAGER);
    assert_int_equal(kl_proj_user(w->p, &uid)->version, 2);
    assert_int_equal(kl_proj_user(w->p, &uid)->updated_at, ev.ts);

    ev = id_event(w, KL_EV_USER_ROLE_CHANGED, &uid);
    ev.has |= KL_F_ROLE;
    ev.role = KL_ROLE_OWNER;
    apply_ok(w, &ev);
    assert_int_equal(kl_key_role(k), KL_ROLE_OWNER);
    assert_int_equal(o->active_owners, 2);

    ev = id_event(w, KL_EV_USER_ROLE_CHANGED, &owner);
    ev.has |= KL_F_ROLE;
    ev.role = KL_ROLE_GUEST;
    apply_ok(w, &ev);
    assert_int_equal(o->active_owners, 1);

    /* UserUpdated changes the name only. */
    ev = id_event(w, KL_EV_USER_UPDATED, &uid);
    ev.has |= KL_F_NAME;
    ev.name = S("Mia");
    apply_ok(w, &ev);
    assert_string_equal(kl_proj_user(w->p, &uid)->name, "Mia");
    assert_int_equal(kl_key_role(k), KL_ROLE_OWNER);

    /* A service account's key acts with the account's role. */
    kl_id sid = sa_created(w, "ci", KL_ROLE_GUEST);
    kl_id skid = key_created(w, KL_PRINCIPAL_SA, &sid);
    kl_key *sk = kl_proj_key(w->p, &skid);
    assert_int_equal(kl_key_role(sk), KL_ROLE_GUEST);
    ev = id_event(w, KL_EV_SA_UPDATED, &sid);
    ev.has |= KL_F_ROLE | KL_F_DESCRIPTION;
    ev.role = KL_ROLE_MEMBER;
    ev.description = S("builds");
    apply_ok(w, &ev);
    assert_int_equal(kl_key_role(sk), KL_ROLE_MEMBER);
    assert_string_equal(kl_proj_sa(w->p, &sid)->description, "builds");
    assert_string_equal(kl_proj_sa(w->p, &sid)->name, "ci");
    world_free(w);
}

static void test_owner_enabled(void **state)
{
    (void)state;
    world *w = world_new();
    kl_id org = org_created(w, "o");
    kl_org *o = kl_proj_org(w->p, &org);
    kl_id owner = user_invited(w, "own@x.io", KL_ROLE_OWNER);
    kl_id uid = user_invited(w, "u@x.io", KL_ROLE_OWNER);
    kl_id kid = key_created(w, KL_PRINCIPAL_USER, &uid);
    kl_key *k = kl_proj_key(w->p, &kid);
    assert_true(kl_key_owner_enabled(k));
    assert_int_equal(o->active_owners, 2);

    simple(w, KL_EV_USER_REMOVED, &uid);
    kl_user *u = kl_proj_user(w->p, &uid);
    assert_true(u->removed);
    assert_false(kl_key_owner_enabled(k));
    assert_int_equal(o->active_owners, 1);
    assert_int_equal(o->users.len, 2);              /* removed ones stay listed */
    assert_null(kl_proj_user_by_email(o, "u@x.io", 6));
    assert_false(k->revoked);                       /* the key itself is as it was */
    assert_int_equal(kl_key_status_at(k, w->ts), KL_KEY_ACTIVE);
    (void)owner;

    kl_id sid = sa_created(w, "bot", KL_ROLE_MEMBER);
    kl_sa *s = kl_proj_sa(w->p, &sid);
    assert_true(s->active);
    assert_int_equal(o->sas.len, 1);
    kl_id skid = key_created(w, KL_PRINCIPAL_SA, &sid);
    kl_key *sk = kl_proj_key(w->p, &skid);
    assert_true(kl_key_owner_enabled(sk));

    simple(w, KL_EV_SA_DEACTIVATED, &sid);
    assert_false(s->active);
    assert_int_equal(s->deactivated_at, w->ts);
    assert_false(kl_key_owner_enabled(sk));
    simple(w, KL_EV_SA_REACTIVATED, &sid);
    assert_true(s->active);
    assert_int_equal(s->deactivated_at, 0);
    assert_true(kl_key_owner_enabled(sk));
    simple(w, KL_EV_SA_DELETED, &sid);
    assert_true(s->deleted);
    assert_false(s->active);
    assert_false(kl_key_owner_enabled(sk));
    assert_int_equal(o->sas.len, 1);       /* kept: its name stays taken */
    assert_ptr_equal(kl_proj_sa(w->p, &sid), s);
    assert_int_equal(s->version, 4);
    world_free(w);
}

/* ---- misfits --------------------------------------------------------------- */

static void test_misfits_leave_state_unchanged(void **state)
{
    (void)state;
    world *w = world_new();
    kl_id org_a = org_created(w, "a");
    kl_id ua = user_invited(w, "a@a.io", KL_ROLE_OWNER);
    kl_id gone = user_invited(w, "gone@a.io", KL_ROLE_MEMBER);
    simple(w, KL_EV_USER_REMOVED, &gone);
    kl_id sa = sa_created(w, "sa", KL_ROLE_MEMBER);
    kl_id dead_sa = sa_created(w, "dead", KL_ROLE_MEMBER);
    simple(w, KL_EV_SA_DELETED, &dead_sa);
    kl_id ka = key_created(w, KL_PRINCIPAL_USER, &ua);
    kl_id revoked = key_created(w, KL_PRINCIPAL_USER, &ua);
    simple(w, KL_EV_KEY_REVOKED, &revoked);
    kl_id deleted = key_created(w, KL_PRINCIPAL_SA, &sa);
    simple(w, KL_EV_KEY_DELETED, &deleted);
    kl_id org_b = org_created(w, "b");
    kl_id ub = user_invited(w, "b@b.io", KL_ROLE_OWNER);
    kl_id kb = key_created(w, KL_PRINCIPAL_USER, &ub);
    w->org = org_a;
    kl_id nobody = new_id(w);
    kl_event ev;

    /* Keys. */
    ev = id_event(w, KL_EV_KEY_REVOKED, &revoked);
    apply_misfit(w, &ev, "revoking twice");
    ev = id_event(w, KL_EV_KEY_REGENERATED, &revoked);
    ev.has |= KL_F_HASH | KL_F_PREFIX | KL_F_GRACE;
    ev.prefix = S("p");
    ev.grace_until = w->ts;
    apply_misfit(w, &ev, "regenerating a revoked key");
    ev = id_event(w, KL_EV_KEY_UPDATED, &deleted);
    ev.has |= KL_F_NAME;
    ev.name = S("x");
    apply_misfit(w, &ev, "updating a deleted key");
    ev = id_event(w, KL_EV_KEY_DELETED, &deleted);
    apply_misfit(w, &ev, "deleting twice");
    ev = id_event(w, KL_EV_KEY_REVOKED, &kb);
    apply_misfit(w, &ev, "revoking another org's key");
    ev = id_event(w, KL_EV_KEY_REVOKED, &nobody);
    apply_misfit(w, &ev, "revoking an unknown key");
    ev = key_event(w, KL_PRINCIPAL_USER, &nobody);
    apply_misfit(w, &ev, "key for an unknown user");
    ev = key_event(w, KL_PRINCIPAL_USER, &ub);
    apply_misfit(w, &ev, "key for another org's user");
    ev = key_event(w, KL_PRINCIPAL_USER, &gone);
    apply_misfit(w, &ev, "key for a removed user");
    ev = key_event(w, KL_PRINCIPAL_SA, &dead_sa);
    apply_misfit(w, &ev, "key for a deleted service account");
    ev = key_event(w, KL_PRINCIPAL_SA, &ua);
    apply_misfit(w, &ev, "a user's id as a service account owner");
    ev = key_event(w, KL_PRINCIPAL_USER, &sa);
    apply_misfit(w, &ev, "a service account's id as a user owner");
    ev = key_event(w, KL_PRINCIPAL_USER, &ua);
    ev.id = ka;
    apply_misfit(w, &ev, "duplicate key id");
    ev.id = deleted;
    apply_misfit(w, &ev, "the id of a deleted key");
    ev.id = kb;
    apply_misfit(w, &ev, "another org's key id");

    /* Users and service accounts. */
    ev = id_event(w, KL_EV_USER_INVITED, &ua);
    ev.has |= KL_F_EMAIL | KL_F_ROLE;
    ev.email = S("dup@a.io");
    ev.role = KL_ROLE_MEMBER;
    apply_misfit(w, &ev, "duplicate user id");
    ev.id = ub;
    apply_misfit(w, &ev, "another org's user id");
    ev = id_event(w, KL_EV_USER_ROLE_CHANGED, &gone);
    ev.has |= KL_F_ROLE;
    ev.role = KL_ROLE_OWNER;
    apply_misfit(w, &ev, "role change of a removed user");
    ev = id_event(w, KL_EV_USER_REMOVED, &gone);
    apply_misfit(w, &ev, "removing twice");
    ev = id_event(w, KL_EV_USER_UPDATED, &ub);
    apply_misfit(w, &ev, "updating another org's user");
    ev = id_event(w, KL_EV_SA_CREATED, &sa);
    ev.has |= KL_F_NAME | KL_F_ROLE;
    ev.name = S("again");
    ev.role = KL_ROLE_GUEST;
    apply_misfit(w, &ev, "duplicate service account id");
    ev = id_event(w, KL_EV_SA_REACTIVATED, &dead_sa);
    apply_misfit(w, &ev, "reactivating a deleted service account");
    ev = id_event(w, KL_EV_SA_DEACTIVATED, &nobody);
    apply_misfit(w, &ev, "deactivating an unknown service account");

    /* Organizations. */
    ev = ev_make(w, KL_EV_ORG_CREATED);
    ev.has = KL_F_NAME;
    ev.name = S("again");
    ev.org = org_b;
    apply_misfit(w, &ev, "duplicate org");
    w->org = nobody;
    ev = id_event(w, KL_EV_USER_INVITED, &(kl_id){{9}});
    ev.has |= KL_F_EMAIL | KL_F_ROLE;
    ev.email = S("x@y.z");
    ev.role = KL_ROLE_MEMBER;
    apply_misfit(w, &ev, "user in an unknown org");
    ev = key_event(w, KL_PRINCIPAL_USER, &ua);
    apply_misfit(w, &ev, "key in an unknown org");
    ev = ev_make(w, KL_EV_USAGE_LIMITS_CHANGED);
    ev.has = KL_F_LIMITS;
    apply_misfit(w, &ev, "limits of an unknown org");
    w->org = org_a;

    /* Sequence. */
    ev = id_event(w, KL_EV_KEY_REVOKED, &ka);
    ev.seq += 1;
    apply_misfit(w, &ev, "a gap in the sequence");
    ev.seq -= 2;
    apply_misfit(w, &ev, "a seq applied before");
    ev.seq = 0;
    apply_misfit(w, &ev, "seq 0");

    /* Usage of a key that is not there. */
    ev = id_event(w, KL_EV_USAGE_RECORDED, &kb);
    ev.has |= KL_F_USAGE;
    ev.last_used = w->ts;
    apply_misfit(w, &ev, "usage of another org's key");
    ev.id = nobody;
    apply_misfit(w, &ev, "usage of an unknown key");

    /* Types the fold does not know how to apply. */
    ev = ev_make(w, (kl_event_type)999);
    apply_misfit(w, &ev, "an event type out of range");

    /* An idempotency key on a misfit records nothing. */
    ev = id_event(w, KL_EV_KEY_REVOKED, &revoked);
    ev.has |= KL_F_IDEM;
    ev.idem_key = S("never");
    apply_misfit(w, &ev, "revoking twice with an idempotency key");
    kl_id slot;
    kl_idem_slot(&ev.org, &ev.actor.key_id, "never", 5, &slot);
    assert_null(kl_proj_idem(w->p, &slot));

    /* After all that the next seq still applies. */
    uint64_t seq = kl_proj_seq(w->p);
    ev = id_event(w, KL_EV_KEY_REVOKED, &ka);
    assert_int_equal(ev.seq, seq + 1);
    apply_ok(w, &ev);
    assert_true(kl_proj_key(w->p, &ka)->revoked);
    world_free(w);
}

/* ---- usage ---------------------------------------------------------------- */

static void usage(world *w, const kl_id *key, int64_t last_used)
{
    kl_event ev = id_event(w, KL_EV_USAGE_RECORDED, key);
    ev.has |= KL_F_USAGE;
    ev.usage_from = w->ts - 60000;
    ev.usage_to = w->ts;
    ev.successes = last_used != 0 ? 3 : 0;
    ev.failures = 1;
    ev.last_used = last_used;
    apply_ok(w, &ev);
}

/* Computers, sessions and messages: attribution, lifecycle, and the events
 * that do not fit. */
static void test_resources(void **state)
{
    (void)state;
    world *w = world_new();
    org_created(w, "a");
    kl_id owner = user_invited(w, "a@a.io", KL_ROLE_OWNER);
    w->actor = (kl_actor){KL_PRINCIPAL_USER, owner, {{0}}};
    kl_id sa = sa_created(w, "bot", KL_ROLE_MANAGER);
    kl_id off = sa_created(w, "off", KL_ROLE_MANAGER);
    simple(w, KL_EV_SA_DEACTIVATED, &off);

    kl_event ev = ev_make(w, KL_EV_COMPUTER_CREATED);
    ev.has = KL_F_ID | KL_F_NAME | KL_F_OWNER;
    ev.id = new_id(w);
    ev.name = S("box");
    ev.owner_type = KL_PRINCIPAL_SA;
    ev.owner = sa;
    apply_ok(w, &ev);
    kl_id cmp = ev.id;
    kl_computer *m = kl_proj_computer(w->p, &cmp);
    assert_non_null(m);
    assert_string_equal(m->name, "box");
    assert_int_equal(m->owner.type, KL_PRINCIPAL_SA);
    assert_true(kl_id_eq(&m->created_by.id, &owner));
    assert_int_equal(m->version, 1);
    ev.id = new_id(w);
    ev.owner = off;
    apply_misfit(w, &ev, "a computer for a deactivated service account");
    ev.owner_type = KL_PRINCIPAL_USER;
    ev.owner = sa;
    apply_misfit(w, &ev, "a service account's id as a user owner");
    ev.id = cmp;
    ev.owner = owner;
    apply_misfit(w, &ev, "duplicate computer id");

    simple(w, KL_EV_COMPUTER_RESTARTED, &cmp);
    assert_int_equal(m->restarted_at, w->ts);
    assert_int_equal(m->version, 2);

    ev = ev_make(w, KL_EV_SESSION_CREATED);
    ev.has = KL_F_ID | KL_F_TITLE | KL_F_REF;
    ev.id = new_id(w);
    ev.title = S("deploy");
    ev.ref = cmp;
    apply_ok(w, &ev);
    kl_id ses = ev.id;
    kl_session *s = kl_proj_session(w->p, &ses);
    assert_string_equal(s->title, "deploy");
    assert_true(kl_id_eq(&s->computer, &cmp));
    ev.id = new_id(w);
    ev.ref = new_id(w);
    apply_misfit(w, &ev, "a session on an unknown computer");

    for (int i = 0; i < 3; i++) {
        ev = ev_make(w, KL_EV_MESSAGE_POSTED);
        ev.has = KL_F_ID | KL_F_REF | KL_F_AUTHOR | KL_F_CONTENT;
        ev.id = new_id(w);
        ev.ref = ses;
        ev.author = i % 2 ? KL_AUTHOR_ASSISTANT : KL_AUTHOR_USER;
        ev.content = S(i % 2 ? "done" : "go");
        apply_ok(w, &ev);
        assert_ptr_equal(kl_proj_message(w->p, &ev.id), s->messages.items[i]);
    }
    assert_int_equal(s->messages.len, 3);
    apply_misfit(w, &ev, "duplicate message id");

    simple(w, KL_EV_COMPUTER_DELETED, &cmp);
    assert_true(m->deleted);
    ev = id_event(w, KL_EV_COMPUTER_RESTARTED, &cmp);
    apply_misfit(w, &ev, "restarting a deleted computer");
    ev = ev_make(w, KL_EV_SESSION_CREATED);
    ev.has = KL_F_ID | KL_F_REF;
    ev.id = new_id(w);
    ev.ref = cmp;
    apply_misfit(w, &ev, "a session on a deleted computer");

    simple(w, KL_EV_SESSION_DELETED, &ses);
    assert_true(s->deleted);
    ev = ev_make(w, KL_EV_MESSAGE_POSTED);
    ev.has = KL_F_ID | KL_F_REF | KL_F_AUTHOR | KL_F_CONTENT;
    ev.id = new_id(w);
    ev.ref = ses;
    ev.author = KL_AUTHOR_USER;
    ev.content = S("late");
    apply_misfit(w, &ev, "a message to a deleted session");

    /* Service account names stay taken after deletion. */
    simple(w, KL_EV_SA_DELETED, &sa);
    ev = ev_make(w, KL_EV_SA_CREATED);
    ev.has = KL_F_ID | KL_F_NAME | KL_F_ROLE;
    ev.id = new_id(w);
    ev.name = S("bot");
    ev.role = KL_ROLE_MEMBER;
    apply_misfit(w, &ev, "reusing a deleted service account's name");
    const kl_org *o = kl_proj_org(w->p, &w->org);
    assert_ptr_equal(kl_proj_sa_by_name(o, "bot", 3), kl_proj_sa(w->p, &sa));
    assert_null(kl_proj_sa_by_name(o, "bo", 2));

    kl_proj_stats st;
    kl_proj_stats_get(w->p, &st);
    assert_int_equal(st.computers, 1);
    assert_int_equal(st.sessions, 1);
    assert_snapshot_round_trip(w, w->p);
    world_free(w);
}

static void test_usage_last_used(void **state)
{
    (void)state;
    world *w = world_new();
    org_created(w, "o");
    kl_id uid = user_invited(w, "u@x.io", KL_ROLE_OWNER);
    kl_id kid = key_created(w, KL_PRINCIPAL_USER, &uid);
    kl_key *k = kl_proj_key(w->p, &kid);
    assert_int_equal(k->last_used_at, 0);
    const uint64_t v = k->version;
    const int64_t updated = k->updated_at;

    usage(w, &kid, T0 + 5000);
    assert_int_equal(k->last_used_at, T0 + 5000);
    usage(w, &kid, T0 + 4000);          /* older: the latest use stays */
    assert_int_equal(k->last_used_at, T0 + 5000);
    usage(w, &kid, 0);                  /* no accepted use in the period */
    assert_int_equal(k->last_used_at, T0 + 5000);
    /* Usage is not a change of the key. */
    assert_int_equal(k->version, v);
    assert_int_equal(k->updated_at, updated);

    /* A deleted key's usage still counts (its history stays). */
    simple(w, KL_EV_KEY_DELETED, &kid);
    usage(w, &kid, T0 + 9000);
    assert_int_equal(k->last_used_at, T0 + 9000);

    /* The daemon's touch moves it forward only. */
    kl_key_touch(k, T0 + 8000);
    assert_int_equal(k->last_used_at, T0 + 9000);
    kl_key_touch(k, T0 + 10000);
    assert_int_equal(k->last_used_at, T0 + 10000);
    world_free(w);
}

/* ---- pagination ------------------------------------------------------------ */

static int cmp_id(const void *a, const void *b)
{
    return memcmp(((const kl_id *)a)->b, ((const kl_id *)b)->b, 16);
}

static void test_pagination(void **state)
{
    (void)state;
    enum { N = 1000, PAGE = 7 };
    world *w = world_new();
    kl_id org = org_created(w, "many");
    kl_org *o = kl_proj_org(w->p, &org);
    kl_id uid = user_invited(w, "u@x.io", KL_ROLE_OWNER);

    /* Ids made in order, created in a shuffled order: the list sorts. */
    kl_id *ids = malloc(N * sizeof *ids);
    assert_non_null(ids);
    for (int i = 0; i < N; i++)
        ids[i] = new_id(w);
    uint64_t x = 0x2545F4914F6CDD1Dull;
    for (int i = N - 1; i > 0; i--) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        int j = (int)(x % (uint64_t)(i + 1));
        kl_id t = ids[i];
        ids[i] = ids[j];
        ids[j] = t;
    }
    for (int i = 0; i < N; i++) {
        kl_event ev = key_event(w, KL_PRINCIPAL_USER, &uid);
        ev.id = ids[i];
        apply_ok(w, &ev);
    }
    assert_int_equal(o->keys.len, N);
    qsort(ids, N, sizeof *ids, cmp_id);

    /* Pages of 7: every key once, in id order. */
    const kl_id *after = NULL;
    uint32_t seen = 0, pages = 0;
    for (;;) {
        uint32_t start = kl_vec_after(&o->keys, after);
        if (start >= o->keys.len)
            break;
        uint32_t end = start + PAGE < o->keys.len ? start + PAGE : o->keys.len;
        for (uint32_t i = start; i < end; i++) {
            const kl_key *k = o->keys.items[i];
            assert_true(kl_id_eq(&k->id, &ids[seen]));
            seen++;
        }
        after = &((const kl_key *)o->keys.items[end - 1])->id;
        pages++;
    }
    assert_int_equal(seen, N);
    assert_int_equal(pages, (N + PAGE - 1) / PAGE);

    /* Edges: nothing before the smallest id, nothing after the largest. */
    kl_id zero = {{0}}, top;
    memset(top.b, 0xff, 16);
    assert_int_equal(kl_vec_after(&o->keys, NULL), 0);
    assert_int_equal(kl_vec_after(&o->keys, &zero), 0);
    assert_int_equal(kl_vec_after(&o->keys, &top), N);
    for (uint32_t i = 0; i < N; i++)
        assert_int_equal(kl_vec_after(&o->keys, &ids[i]), i + 1);
    kl_vec empty = {0};
    assert_int_equal(kl_vec_after(&empty, &ids[0]), 0);

    /* A cursor on a key deleted since still continues after it. */
    simple(w, KL_EV_KEY_DELETED, &ids[500]);
    assert_int_equal(o->keys.len, N - 1);
    uint32_t at = kl_vec_after(&o->keys, &ids[500]);
    assert_true(kl_id_eq(&((const kl_key *)o->keys.items[at])->id, &ids[501]));
    assert_int_equal(at, 500);
    free(ids);
    world_free(w);
}

/* ---- idempotency ------------------------------------------------------------ */

static void test_idempotency_records(void **state)
{
    (void)state;
    world *w = world_new();
    kl_id org = org_created(w, "o");
    kl_id uid = user_invited(w, "u@x.io", KL_ROLE_OWNER);
    kl_id key1 = new_id(w), key2 = new_id(w);
    w->actor = (kl_actor){KL_PRINCIPAL_USER, uid, key1};

    kl_id s1, s1b, s2, s3, s4, s5;
    kl_idem_slot(&org, &key1, "abc", 3, &s1);
    kl_idem_slot(&org, &key1, "abc", 3, &s1b);
    kl_idem_slot(&org, &key2, "abc", 3, &s2);
    kl_idem_slot(&org, &key1, "abd", 3, &s3);
    kl_idem_slot(&uid, &key1, "abc", 3, &s4);
    kl_idem_slot(&org, &key1, "abcd", 3, &s5);  /* only len bytes count */
    assert_true(kl_id_eq(&s1, &s1b));
    assert_false(kl_id_eq(&s1, &s2));
    assert_false(kl_id_eq(&s1, &s3));
    assert_false(kl_id_eq(&s1, &s4));
    assert_true(kl_id_eq(&s1, &s5));

    kl_event ev = key_event(w, KL_PRINCIPAL_USER, &uid);
    ev.has |= KL_F_IDEM;
    ev.idem_key = S("abc");
    memset(ev.idem_fp, 0x5a, 16);
    apply_ok(w, &ev);
    kl_id first_key = ev.id;
    const int64_t first_ts = ev.ts;
    const kl_idem *r = kl_proj_idem(w->p, &s1);
    assert_non_null(r);
    assert_true(kl_id_eq(&r->slot, &s1));
    assert_int_equal(r->type, KL_EV_KEY_CREATED);
    assert_true(kl_id_eq(&r->target, &first_key));
    assert_int_equal(r->ts, first_ts);
    uint8_t fp[16];
    memset(fp, 0x5a, 16);
    assert_memory_equal(r->fp, fp, 16);

    /* The same key again (another request): the first one stays. */
    ev = id_event(w, KL_EV_KEY_REVOKED, &first_key);
    ev.has |= KL_F_IDEM;
    ev.idem_key = S("abc");
    memset(ev.idem_fp, 0x77, 16);
    apply_ok(w, &ev);
    r = kl_proj_idem(w->p, &s1);
    assert_int_equal(r->type, KL_EV_KEY_CREATED);
    assert_true(kl_id_eq(&r->target, &first_key));
    assert_int_equal(r->ts, first_ts);
    assert_memory_equal(r->fp, fp, 16);

    /* Another caller key with the same text has its own record. */
    assert_null(kl_proj_idem(w->p, &s2));
    w->actor.key_id = key2;
    ev = ev_make(w, KL_EV_USAGE_LIMITS_CHANGED);
    ev.has = KL_F_LIMITS | KL_F_IDEM;
    ev.lim_minute = 5;
    ev.idem_key = S("abc");
    apply_ok(w, &ev);
    r = kl_proj_idem(w->p, &s2);
    assert_non_null(r);
    assert_int_equal(r->type, KL_EV_USAGE_LIMITS_CHANGED);
    assert_true(kl_id_is_zero(&r->target));
    assert_int_equal(kl_proj_org(w->p, &org)->lim_minute, 5);
    assert_int_equal(kl_proj_org(w->p, &org)->version, 2);

    /* Events without a key record nothing. */
    kl_proj_stats st;
    kl_proj_stats_get(w->p, &st);
    assert_int_equal(st.idem, 2);
    key_created(w, KL_PRINCIPAL_USER, &uid);
    kl_proj_stats_get(w->p, &st);
    assert_int_equal(st.idem, 2);
    assert_null(kl_proj_idem(w->p, &s3));
    world_free(w);
}

/* ---- replay equals live ------------------------------------------------------ */

static int rm_entry(const char *path, const struct stat *st, int flag,
                    struct FTW *ftw)
{
    (void)st; (void)flag; (void)ftw;
    return remove(path);
}

/* The live state part way through, and the ids known by then. */
typedef struct snapshot {
    uint64_t seq;
    char *dump;
    size_t nkeys, nusers, nsas, nslots;
} snapshot;

/* A bit of everything, with two orgs interleaved. */
static uint64_t scenario(world *w, snapshot *mid)
{
    kl_id a = org_created(w, "Acme");
    kl_id owner = user_invited(w, "owner@acme.io", KL_ROLE_OWNER);
    w->actor = (kl_actor){KL_PRINCIPAL_USER, owner, new_id(w)};
    kl_id mem = user_invited(w, "mem@acme.io", KL_ROLE_MEMBER);
    kl_id ci = sa_created(w, "ci", KL_ROLE_MANAGER);
    kl_event ev = ev_make(w, KL_EV_USAGE_LIMITS_CHANGED);
    ev.has = KL_F_LIMITS | KL_F_IDEM;
    ev.lim_minute = 100;
    ev.lim_day = 10000;
    ev.lim_month = 0;
    ev.idem_key = S("limits-1");
    apply_ok(w, &ev);

    kl_id keys[40];
    for (int i = 0; i < 40; i++) {
        const kl_id *o = i % 3 == 0 ? &ci : i % 3 == 1 ? &mem : &owner;
        ev = key_event(w, i % 3 == 0 ? KL_PRINCIPAL_SA : KL_PRINCIPAL_USER, o);
        ev.has |= KL_F_DESCRIPTION | KL_F_RATE_LIMIT | KL_F_EXPIRES;
        ev.description = S(i % 2 ? "odd" : "");
        ev.rl_minute = (uint32_t)i;
        ev.rl_day = (uint32_t)i * 100;
        ev.expires_at = i % 4 ? 0 : T0 + i * 3600000ll;
        ev.env = i % 2 ? KL_ENV_TEST : KL_ENV_LIVE;
        if (i % 5 == 0) {
            ev.access = KL_ACCESS_FLOWS;
            ev.flows[0] = S("a.read");
            ev.flows[1] = S("b.write");
            ev.nflows = 2;
        }
        if (i % 7 == 0) {
            ev.has |= KL_F_IDEM;
            ev.idem_key = S(i == 0 ? "k0" : i == 7 ? "k7" : i == 14 ? "k14" :
                            i == 21 ? "k21" : i == 28 ? "k28" : "k35");
            memset(ev.idem_fp, i, 16);
        }
        apply_ok(w, &ev);
        keys[i] = ev.id;
    }
    *mid = (snapshot){kl_proj_seq(w->p), dump(w, w->p), w->nkeys, w->nusers,
                      w->nsas, w->nslots};

    kl_id b = org_created(w, "Beta");
    kl_id bo = user_invited(w, "b@beta.io", KL_ROLE_OWNER);
    kl_id bk = key_created(w, KL_PRINCIPAL_USER, &bo);
    w->org = a;
    for (int i = 0; i < 40; i += 4) {
        ev = id_event(w, KL_EV_KEY_UPDATED, &keys[i]);
        ev.has |= KL_F_NAME | KL_F_ACCESS | KL_F_EXPIRES;
        ev.name = S("updated");
        ev.access = KL_ACCESS_READ_ONLY;
        ev.expires_at = 0;
        apply_ok(w, &ev);
    }
    for (int i = 1; i < 40; i += 5) {
        ev = id_event(w, KL_EV_KEY_REGENERATED, &keys[i]);
        ev.has |= KL_F_HASH | KL_F_PREFIX | (i % 2 ? KL_F_GRACE : 0);
        memset(ev.hash, i, KL_HASH_LEN);
        ev.prefix = S("kl_test_regen000");
        ev.grace_until = w->ts + 60000;
        apply_ok(w, &ev);
    }
    for (int i = 2; i < 40; i += 6) {
        ev = id_event(w, KL_EV_KEY_REVOKED, &keys[i]);
        if (i % 4 == 2) {
            ev.has |= KL_F_COMMENT;
            ev.comment = S("rotated");
        }
        apply_ok(w, &ev);
    }
    for (int i = 3; i < 40; i += 9)
        simple(w, KL_EV_KEY_DELETED, &keys[i]);
    ev = id_event(w, KL_EV_USER_ROLE_CHANGED, &mem);
    ev.has |= KL_F_ROLE | KL_F_IDEM;
    ev.role = KL_ROLE_GUEST;
    ev.idem_key = S("role-1");
    apply_ok(w, &ev);
    ev = id_event(w, KL_EV_USER_UPDATED, &mem);
    ev.has |= KL_F_NAME;
    ev.name = S("Mem Ber");
    apply_ok(w, &ev);
    simple(w, KL_EV_SA_DEACTIVATED, &ci);
    simple(w, KL_EV_SA_REACTIVATED, &ci);
    ev = id_event(w, KL_EV_SA_UPDATED, &ci);
    ev.has |= KL_F_DESCRIPTION;
    ev.description = S("pipelines");
    apply_ok(w, &ev);
    kl_id tmp = sa_created(w, "tmp", KL_ROLE_GUEST);
    key_created(w, KL_PRINCIPAL_SA, &tmp);
    simple(w, KL_EV_SA_DELETED, &tmp);
    usage(w, &keys[5], w->ts - 1000);
    usage(w, &keys[3], w->ts - 2000);   /* deleted by now */
    usage(w, &keys[5], w->ts - 90000);
    simple(w, KL_EV_USER_REMOVED, &mem);
    w->org = b;
    simple(w, KL_EV_KEY_REVOKED, &bk);
    return kl_proj_seq(w->p);
}

typedef struct replay_into {
    kl_proj *p;
    uint64_t stop_after;        /* 0: all */
    uint64_t count;
    kl_err err;
} replay_into;

static int replay_record(uint64_t seq, const uint8_t *payload, size_t len,
                         const uint8_t hash[KL_HASH_LEN], void *arg)
{
    replay_into *r = arg;
    kl_record_head head;
    kl_event ev;
    int rc = kl_event_decode(payload, len, &head, &ev, &r->err);
    if (rc == KL_OK)
        rc = kl_proj_apply(r->p, &ev, &r->err);
    if (rc != KL_OK)
        return rc;
    assert_int_equal(head.seq, seq);
    r->count++;
    return r->stop_after != 0 && seq == r->stop_after ? 1 : 0;
}

static void replay_log(kl_log *log, kl_proj *p, uint64_t stop_after)
{
    replay_into r = {.p = p, .stop_after = stop_after};
    kl_err err = {0};
    int rc = kl_log_replay(log, 1, true, replay_record, &r, &err);
    if (stop_after != 0 && rc == 1)
        rc = KL_OK;
    if (rc != KL_OK)
        fail_msg("replay: %d %s %s", rc, err.msg, r.err.msg);
    assert_int_equal(r.count, stop_after != 0 ? stop_after : kl_log_head_seq(log));
}

static void assert_same_dump(const char *live, const char *replayed)
{
    if (strcmp(live, replayed) != 0)
        fail_msg("replayed state differs:\n--- live\n%s--- replayed\n%s", live,
                 replayed);
}

/* A temp dir for the test, removed by the teardown even when it fails. */
static int tmp_setup(void **state)
{
    char *dir = malloc(512);
    if (dir == NULL)
        return -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, 512, "%s/kl-test-proj-XXXXXX",
             tmp != NULL && tmp[0] != '\0' ? tmp : P_tmpdir);
    if (mkdtemp(dir) == NULL) {
        free(dir);
        return -1;
    }
    *state = dir;
    return 0;
}

static int tmp_teardown(void **state)
{
    nftw(*state, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    free(*state);
    return 0;
}

/* A snapshot of p loads into a state that dumps the same; every cut and
 * a flipped byte anywhere are refused or load something, never crash. */
static void assert_snapshot_round_trip(const world *w, const kl_proj *p)
{
    kl_buf snap = {0};
    assert_int_equal(kl_proj_snapshot(p, &snap), KL_OK);
    kl_proj *loaded = NULL;
    kl_err err = {0};
    int rc = kl_proj_load(&loaded, (const uint8_t *)snap.data, snap.len, &err);
    if (rc != KL_OK)
        fail_msg("loading a snapshot: %s", err.msg);
    assert_int_equal(kl_proj_seq(loaded), kl_proj_seq(p));
    char *a = dump(w, p), *b = dump(w, loaded);
    assert_same_dump(a, b);
    free(a);
    free(b);
    kl_proj_free(loaded);
    /* The same bytes again: the snapshot is a function of the state. */
    kl_buf again = {0};
    assert_int_equal(kl_proj_snapshot(p, &again), KL_OK);
    assert_int_equal(again.len, snap.len);
    assert_memory_equal(again.data, snap.data, snap.len);
    kl_buf_free(&again);
    uint8_t *copy = malloc(snap.len);
    assert_non_null(copy);
    size_t step = snap.len / 97 + 1;
    for (size_t cut = 0; cut < snap.len; cut += step) {
        memcpy(copy, snap.data, cut);
        loaded = NULL;
        assert_int_equal(kl_proj_load(&loaded, copy, cut, &err), KL_ECORRUPT);
        assert_null(loaded);
    }
    for (size_t at = 0; at < snap.len; at += step) {
        memcpy(copy, snap.data, snap.len);
        copy[at] ^= 0x5a;
        loaded = NULL;
        rc = kl_proj_load(&loaded, copy, snap.len, &err);
        assert_true(rc == KL_OK || rc == KL_ECORRUPT);
        kl_proj_free(loaded);
    }
    free(copy);
    kl_buf_free(&snap);
}

static void test_replay_equals_live(void **state)
{
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = *state;
    cfg.fsync = KL_FSYNC_OFF;
    cfg.segment_bytes = 4096;           /* several segments */
    kl_err err = {0};
    kl_log_recovery rec;
    world *w = world_new();
    assert_int_equal(kl_log_create(&cfg, &err), KL_OK);
    assert_int_equal(kl_log_open(&w->log, &cfg, &rec, &err), KL_OK);

    snapshot mid;
    uint64_t last = scenario(w, &mid);
    assert_int_equal(last, 91);
    assert_int_equal(kl_log_head_seq(w->log), last);
    kl_log_close(w->log);
    w->log = NULL;
    char *live = dump(w, w->p);

    kl_log *log = NULL;
    cfg.read_only = true;
    assert_int_equal(kl_log_open(&log, &cfg, &rec, &err), KL_OK);
    assert_int_equal(rec.records, last);

    /* All of it. */
    world *r = world_new();
    memcpy(r->keys, w->keys, sizeof w->keys);
    r->nkeys = w->nkeys;
    memcpy(r->users, w->users, sizeof w->users);
    r->nusers = w->nusers;
    memcpy(r->sas, w->sas, sizeof w->sas);
    r->nsas = w->nsas;
    memcpy(r->slots, w->slots, sizeof w->slots);
    r->nslots = w->nslots;
    replay_log(log, r->p, 0);
    assert_int_equal(kl_proj_seq(r->p), last);
    char *replayed = dump(r, r->p);
    assert_same_dump(live, replayed);
    free(replayed);
    assert_snapshot_round_trip(w, w->p);

    /* Stopped at the middle: the state as it was then, read with the ids
     * known by then. */
    world *m = world_new();
    kl_proj *mp = m->p;
    *m = *r;
    m->p = mp;
    m->nkeys = mid.nkeys;
    m->nusers = mid.nusers;
    m->nsas = mid.nsas;
    m->nslots = mid.nslots;
    assert_int_equal(mid.nkeys, 40);
    assert_int_equal(mid.nslots, 7);    /* limits and every 7th key */
    replay_log(log, m->p, mid.seq);
    assert_int_equal(kl_proj_seq(m->p), mid.seq);
    char *mid_replayed = dump(m, m->p);
    assert_same_dump(mid.dump, mid_replayed);
    free(mid_replayed);

    kl_log_close(log);
    free(live);
    free(mid.dump);
    world_free(m);
    world_free(r);
    world_free(w);
}

/* Writes payload as the snapshot of the log's head. */
static void snapshot_file(const char *dir, kl_log *log, const uint8_t *payload, size_t len)
{
    uint8_t hash[KL_HASH_LEN];
    kl_log_head_hash(log, hash);
    kl_err err = {0};
    assert_int_equal(kl_snapshot_write(dir, kl_log_head_seq(log), hash, payload, len, &err),
                     KL_OK);
}

static uint64_t rebuilt_from(world *w, kl_log *log, const char *dir, const char *live)
{
    kl_proj *p = NULL;
    uint64_t from = 99;
    kl_err err = {0};
    assert_int_equal(kl_proj_rebuild(&p, log, dir, NULL, &from, &err), KL_OK);
    char *got = dump(w, p);
    assert_same_dump(live, got);
    free(got);
    kl_proj_free(p);
    return from;
}

/* A start from a snapshot file through kl_proj_rebuild: 22,000 keys (two
 * halves, each read from the file in pieces), one with an hourly usage history of 280 KB, texts and flows; it
 * equals the live state. A flipped byte in either half, or the split moved
 * by one under a checksum made for it, and the start replays the whole log
 * instead, to the same state. */
static void test_snapshot_from_file(void **state)
{
    const char *dir = *state;
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = dir;
    cfg.fsync = KL_FSYNC_OFF;
    kl_err err = {0};
    kl_log_recovery rec;
    world *w = world_new();
    assert_int_equal(kl_log_create(&cfg, &err), KL_OK);
    assert_int_equal(kl_log_open(&w->log, &cfg, &rec, &err), KL_OK);
    org_created(w, "a");
    kl_id owner = user_invited(w, "a@x.io", KL_ROLE_OWNER);
    enum { KEYS = 22000, HOURS = 14000 };
    kl_id used = {{0}};
    for (int i = 0; i < KEYS; i++) {
        kl_event ev = key_event(w, KL_PRINCIPAL_USER, &owner);
        char name[32];
        snprintf(name, sizeof name, "key %d", i);
        ev.name = S(name);
        if (i % 2 == 0) {
            ev.access = KL_ACCESS_FLOWS;
            ev.flows[0] = S(i % 4 == 0 ? "orders" : "refunds");
            ev.nflows = 1;
        }
        apply_ok(w, &ev);
        if (i == KEYS - 3)
            used = ev.id;               /* in the second half */
    }
    for (int h = 0; h < HOURS; h++) {
        w->ts += 3600000;
        usage(w, &used, w->ts);
    }
    kl_log_close(w->log);
    w->log = NULL;
    char *live = dump(w, w->p);
    cfg.read_only = true;
    kl_log *log = NULL;
    assert_int_equal(kl_log_open(&log, &cfg, &rec, &err), KL_OK);

    kl_buf snap = {0};
    assert_int_equal(kl_proj_snapshot(w->p, &snap), KL_OK);
    assert_true(snap.len > (4u << 20));     /* pieces and windows many times over */
    snapshot_file(dir, log, (const uint8_t *)snap.data, snap.len);
    assert_int_equal(rebuilt_from(w, log, dir, live), kl_log_head_seq(log));

    uint8_t *b = (uint8_t *)snap.data, *at;
    uint64_t split = header_split(b, &at);
    assert_true(split > 0 && split < snap.len);
    /* A flipped byte in a key of each half: the file's checksum differs. */
    char path[600];
    snprintf(path, sizeof path, "%s/snapshot-%020llu.kls", dir,
             (unsigned long long)kl_log_head_seq(log));
    size_t flips[2] = {(size_t)split / 2, (size_t)split + (snap.len - (size_t)split) / 3};
    for (int f = 0; f < 2; f++) {
        snapshot_file(dir, log, (const uint8_t *)snap.data, snap.len);
        FILE *fp = fopen(path, "r+b");
        assert_non_null(fp);
        assert_int_equal(fseek(fp, 72 + (long)flips[f], SEEK_SET), 0);  /* past the header */
        assert_int_equal(fputc(b[flips[f]] ^ 0x20, fp), b[flips[f]] ^ 0x20);
        fclose(fp);
        assert_int_equal(rebuilt_from(w, log, dir, live), 0);
    }
    /* The split one byte off, under a checksum that fits. */
    set_split(at, split + 1);
    snapshot_file(dir, log, (const uint8_t *)snap.data, snap.len);
    assert_int_equal(rebuilt_from(w, log, dir, live), 0);

    kl_buf_free(&snap);
    kl_log_close(log);
    free(live);
    world_free(w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_lifecycle),
        cmocka_unit_test(test_status_at),
        cmocka_unit_test(test_shared_flow_lists),
        cmocka_unit_test(test_many_keys_found),
        cmocka_unit_test(test_snapshot_in_two_halves),
        cmocka_unit_test(test_key_as_text),
        cmocka_unit_test(test_snapshot_key_id_twice),
        cmocka_unit_test(test_role_follows_owner),
        cmocka_unit_test(test_owner_enabled),
        cmocka_unit_test(test_misfits_leave_state_unchanged),
        cmocka_unit_test(test_resources),
        cmocka_unit_test(test_usage_last_used),
        cmocka_unit_test(test_pagination),
        cmocka_unit_test(test_idempotency_records),
        cmocka_unit_test_setup_teardown(test_replay_equals_live, tmp_setup,
                                        tmp_teardown),
        cmocka_unit_test_setup_teardown(test_snapshot_from_file, tmp_setup,
                                        tmp_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
