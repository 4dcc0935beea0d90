/*
 * projections/ — the in-memory state every query is answered from, built by
 * folding events: kl_proj_apply(state, event). The fold is pure: no I/O, no
 * clock (time comes in the event), so startup replay, live writes and
 * `keyledger state --at` agree. The state is disposable: it can always be
 * rebuilt from the log.
 *
 * Entities are heap objects that never move, found by id through hash
 * indexes (O(1)); each organization keeps its users, service accounts and
 * keys in id order for cursor pagination. Callers read the structs directly
 * and never write them: only kl_proj_apply changes state.
 */
#ifndef KL_PROJECTIONS_H
#define KL_PROJECTIONS_H

#include <jansson.h>
#include <string.h>

#include "log.h"

typedef struct kl_proj kl_proj;

/* A growable array of entity pointers, kept in id order. */
typedef struct kl_vec {
    void **items;
    uint32_t len, cap;
} kl_vec;

/* Who did something: a user, a service account or the system. */
typedef struct kl_ref {
    kl_principal type;
    kl_id id;
} kl_ref;

typedef struct kl_org {
    kl_id id;
    char *name;
    int64_t created_at, updated_at;
    uint64_t version;
    uint32_t lim_minute, lim_day, lim_month;   /* 0 = no limit */
    kl_vec users;               /* kl_user *, removed ones included */
    kl_vec sas;                 /* kl_sa *, deleted ones included (their
                                   names stay taken) */
    kl_vec keys;                /* kl_key *, deleted ones excluded */
    kl_vec deleted_keys;        /* kl_key *, in id order (their usage stays) */
    kl_vec computers;           /* kl_computer *, deleted ones included */
    kl_vec sessions;            /* kl_session *, deleted ones included */
    kl_vec alerts;              /* kl_alert * */
    uint32_t active_owners;
    /* Flow ids seen in usage, numbered in order of first use. */
    char **flow_names;
    uint32_t nflow_names, cap_flow_names;
    /* Accepted calls of all keys in the current UTC day and month, from
     * UsageRecorded: the org's quotas survive a restart. */
    int64_t used_day_start, used_month_start;
    uint64_t used_day, used_month;
    /* Every event of the org, oldest first, as seq << 8 | type: what the
     * audit queries walk (the events themselves stay in the log). */
    uint64_t *history;
    uint64_t history_len, history_cap;
    uint32_t usage_slot;        /* the daemon's usage entry + 1; not state */
} kl_org;

#define KL_HISTORY_SEQ(h) ((h) >> 8)
#define KL_HISTORY_TYPE(h) ((kl_event_type)((h) & 0xff))

typedef struct kl_user {
    kl_id id;
    kl_org *org;
    char *email;
    char *name;
    kl_role role;
    bool removed;
    int64_t created_at, updated_at;
    uint64_t version;
} kl_user;

typedef struct kl_sa {
    kl_id id;
    kl_org *org;
    char *name;
    char *description;
    kl_role role;
    bool active;
    bool deleted;
    kl_ref created_by;
    int64_t created_at, updated_at, deactivated_at;
    uint64_t version;
} kl_sa;

/* A key's use in one hour: all its calls (flow 0), or those that named one
 * flow (flow i + 1: the org's flow_names[i]). */
typedef struct kl_usage_bucket {
    int64_t hour;               /* start, ms */
    uint32_t flow;
    uint32_t successes, failures;
} kl_usage_bucket;

typedef struct kl_usage_series {
    kl_usage_bucket *items;     /* in hour order */
    uint32_t len, cap;
} kl_usage_series;

/* The secret before a regenerate, valid until `until`: only while a grace
 * period runs (most keys never have one, so it is not in kl_key). */
typedef struct kl_key_grace {
    uint8_t old_hash[KL_HASH_LEN];
    int64_t until;
} kl_key_grace;

/* Who revoked a key, when and why. */
typedef struct kl_key_revocation {
    int64_t at;
    kl_ref by;
    char *comment;              /* NULL = none */
} kl_key_revocation;

/* Fields are ordered so that the struct packs without holes: a key is the
 * entity there are most of. */
/* The flows a key with access "flows" may call, in the order given. Keys
 * with the same list share one (projections/flowset.c). */
typedef struct kl_flowset {
    struct kl_flowset *next;    /* the intern table's chain */
    uint64_t hash;
    uint32_t refs;              /* keys holding it */
    uint32_t n;
    const char *flow[];         /* n names; the names follow */
} kl_flowset;

typedef struct kl_key {
    kl_id id;
    kl_ref created_by;
    uint32_t rl_minute;         /* 0 = no limit */
    /* The owner, a kl_user * or kl_sa * by owner_type: both begin with
     * their id (kl_key_owner gives the reference); the key's org is its
     * owner's (kl_key_org). */
    void *owner_ptr;
    char *strings;              /* the name, NUL, the description, NUL */
    const kl_flowset *flows;    /* NULL: none (kl_key_flow and friends) */
    kl_usage_series *usage;     /* NULL until used */
    /* A key is revoked or may be in a grace period, never both (revoking
     * ends one): one pointer serves both, `revoked` says which. Read them
     * with kl_key_grace_of and kl_key_revocation_of. */
    union {
        kl_key_grace *grace;            /* not revoked: NULL unless one runs */
        kl_key_revocation *revocation;  /* revoked */
    } aside;
    int64_t created_at, updated_at;
    int64_t expires_at;         /* 0 = never */
    int64_t rotated_at;         /* created or last regenerated */
    int64_t last_used_at;       /* 0 = never */
    uint8_t hash[KL_HASH_LEN];  /* SHA-256 of the current secret */
    char prefix[20];            /* the display prefix: the secret's first
                                   16 characters (longer only if an event
                                   says so; kept up to 19) */
    uint32_t rl_day;            /* 0 = no limit */
    uint32_t usage_slot;        /* the daemon's usage entry + 1;
                                   not state: the fold never reads it */
    uint32_t version;
    uint8_t owner_type;         /* kl_principal: user or service account */
    uint8_t env;                /* kl_env */
    uint8_t access;             /* kl_access */
    bool revoked, deleted;
    bool texts_in_chunk;        /* strings is a snapshot's (keys.c), not
                                   an allocation of its own */
} kl_key;

static inline kl_org *kl_key_org(const kl_key *k)
{
    return k->owner_type == KL_PRINCIPAL_USER ? ((const kl_user *)k->owner_ptr)->org
                                              : ((const kl_sa *)k->owner_ptr)->org;
}
static inline const kl_id *kl_key_owner_id(const kl_key *k)
{
    return (const kl_id *)k->owner_ptr;
}
static inline kl_ref kl_key_owner(const kl_key *k)
{
    return (kl_ref){(kl_principal)k->owner_type, *kl_key_owner_id(k)};
}

static inline const kl_key_grace *kl_key_grace_of(const kl_key *k)
{
    return k->revoked ? NULL : k->aside.grace;
}
static inline const kl_key_revocation *kl_key_revocation_of(const kl_key *k)
{
    return k->revoked ? k->aside.revocation : NULL;
}

/* A key's texts, from its one allocation (a pointer to each would make the
 * struct too big for malloc's 208-byte size class). */
static inline const char *kl_key_name(const kl_key *k)
{
    return k->strings;
}
static inline const char *kl_key_description(const kl_key *k)
{
    return k->strings + strlen(k->strings) + 1;
}
/* The flows of a key with access "flows". */
static inline uint32_t kl_key_nflows(const kl_key *k)
{
    return k->flows != NULL ? k->flows->n : 0;
}
static inline const char *kl_key_flow(const kl_key *k, uint32_t i)
{
    return k->flows->flow[i];
}

/* Resources owned by principals (the Factory public API's computers and
 * sessions), each attributed to the principal that created it. */
typedef struct kl_computer {
    kl_id id;
    kl_org *org;
    char *name;
    kl_ref owner;               /* a user or a service account */
    kl_ref created_by;
    bool deleted;
    int64_t created_at, updated_at;
    int64_t restarted_at;       /* 0 = never */
    uint64_t version;
} kl_computer;

typedef struct kl_session kl_session;

typedef struct kl_message {
    kl_id id;
    kl_session *session;
    kl_author author;
    kl_ref created_by;
    int64_t created_at;
    char *content;
} kl_message;

struct kl_session {
    kl_id id;
    kl_org *org;
    char *title;                /* NULL = none */
    kl_id computer;             /* zero = none */
    kl_ref created_by;
    bool deleted;
    int64_t created_at, updated_at;
    uint64_t version;
    kl_vec messages;            /* kl_message *, oldest first */
};

/* An alert (API.md "Alerts"), raised once per condition. */
typedef struct kl_alert {
    kl_id id;
    kl_org *org;
    kl_alert_type type;
    kl_id key;                  /* zero when not about a key */
    kl_id cond;                 /* names the condition: never raised twice */
    char *details;              /* a JSON object, as raised */
    int64_t created_at;
    bool acked;
    int64_t acked_at;
    kl_ref acked_by;
    uint64_t version;
} kl_alert;

/* An Idempotency-Key the log remembers: who sent it, for what, with what. */
typedef struct kl_idem {
    kl_id slot;                 /* hash of (org, caller key, idempotency key) */
    uint8_t fp[16];             /* fingerprint of method, path and body */
    kl_event_type type;         /* the first event the request produced */
    kl_id target;               /* its subject */
    int64_t ts;
} kl_idem;

int kl_proj_new(kl_proj **out);
void kl_proj_free(kl_proj *p);

/*
 * Fold one event into the state. An event that does not fit the state (an
 * unknown org, a duplicate id, ...) means the log and the code disagree:
 * KL_ECORRUPT with a message naming the seq, and the state is unchanged.
 */
int kl_proj_apply(kl_proj *p, const kl_event *ev, kl_err *err);

/* Decode one record payload (kl_event_decode) and apply it: what startup
 * replay, the daemon's writes and the tools all do with a record. */
int kl_proj_apply_record(kl_proj *p, const uint8_t *payload, size_t len,
                         kl_err *err);

uint64_t kl_proj_seq(const kl_proj *p);   /* last applied seq */

kl_org *kl_proj_org(const kl_proj *p, const kl_id *id);
kl_user *kl_proj_user(const kl_proj *p, const kl_id *id);
kl_sa *kl_proj_sa(const kl_proj *p, const kl_id *id);
/* Deleted keys are still found (their ids stay taken); check ->deleted. */
kl_key *kl_proj_key(const kl_proj *p, const kl_id *id);
/* Iterate all organizations in creation order (i < count). */
uint32_t kl_proj_org_count(const kl_proj *p);
kl_org *kl_proj_org_at(const kl_proj *p, uint32_t i);

/* Deleted computers and sessions are still found; check ->deleted. */
kl_computer *kl_proj_computer(const kl_proj *p, const kl_id *id);
kl_session *kl_proj_session(const kl_proj *p, const kl_id *id);
kl_message *kl_proj_message(const kl_proj *p, const kl_id *id);
kl_alert *kl_proj_alert(const kl_proj *p, const kl_id *id);
/* Was an alert raised for this condition (any org)? */
bool kl_proj_alert_raised(const kl_proj *p, const kl_id *cond);

/* The active user with this email in the org, or NULL (case-insensitive). */
kl_user *kl_proj_user_by_email(const kl_org *org, const char *email, size_t len);
/* The service account with this name in the org, deleted or not, or NULL. */
kl_sa *kl_proj_sa_by_name(const kl_org *org, const char *name, size_t len);

/* Index of the first element of `v` whose id is greater than `after`
 * (all of them when after is NULL): where a page starts. */
uint32_t kl_vec_after(const kl_vec *v, const kl_id *after);

/* 16-byte slot for an idempotency record. */
void kl_idem_slot(const kl_id *org, const kl_id *caller_key, const char *key,
                  size_t len, kl_id *out);
const kl_idem *kl_proj_idem(const kl_proj *p, const kl_id *slot);

/* Key status at time `now` (ms): "active", "expired" or "revoked". */
typedef enum { KL_KEY_ACTIVE = 0, KL_KEY_EXPIRED, KL_KEY_REVOKED } kl_key_status;
kl_key_status kl_key_status_at(const kl_key *k, int64_t now);
const char *kl_key_status_name(kl_key_status s);
/* The key's owner can act: user not removed, service account active. */
bool kl_key_owner_enabled(const kl_key *k);
/* The key may be used at `now`: active status and an enabled owner (what
 * authentication accepts and `is_active` shows). */
bool kl_key_usable(const kl_key *k, int64_t now);
/* The one change outside the fold: a key's last use, recorded by the
 * daemon on every successful authentication so `last_used_at` is exact at
 * query time. It is memory-only until usage is written to the log. */
void kl_key_touch(kl_key *k, int64_t now);
/* The role the key acts with now: its owner's current role. */
kl_role kl_key_role(const kl_key *k);

/* Accepted calls with the key since `since` (ms, rounded down to its hour),
 * as recorded in the log. */
uint64_t kl_key_used_since(const kl_key *k, int64_t since);
/* The org's recorded accepted calls in the day / month holding `now`. */
/* An organization names at most KL_ORG_MAX_FLOWS flows: calls naming any
 * other count in the totals only. */
enum { KL_ORG_MAX_FLOWS = 1024 };
bool kl_org_names_flow(const kl_org *o, const char *name, size_t len);
uint64_t kl_org_used_day(const kl_org *o, int64_t now);
uint64_t kl_org_used_month(const kl_org *o, int64_t now);

/* Counts, for metrics and memory figures. */
typedef struct kl_proj_stats {
    uint64_t orgs, users, sas, keys, idem, computers, sessions;
} kl_proj_stats;
void kl_proj_stats_get(const kl_proj *p, kl_proj_stats *st);

/* ---- snapshots (snapshot.c) --------------------------------------------- */

/* The whole state at its seq, appended to `out` (docs/log-format.md,
 * "Snapshots"). */
int kl_proj_snapshot(const kl_proj *p, kl_buf *out);
/* A state from a snapshot's bytes. Nothing is trusted: KL_ECORRUPT (with
 * where, in err) for anything malformed or inconsistent, KL_ENOMEM. */
int kl_proj_load(kl_proj **out, const uint8_t *data, size_t len, kl_err *err);
/* The format a snapshot's bytes say they are in (0: none readable);
 * this build writes and loads KL_SNAPSHOT_FORMAT. */
enum { KL_SNAPSHOT_FORMAT = 2 };
int kl_proj_snapshot_format(const uint8_t *data, size_t len);
/* The state of an open log: the newest snapshot in `dir` that is whole and
 * chains to the log (the record after it names its hash as prev), then the
 * records after it; the whole log when there is no such snapshot (a
 * damaged or foreign one is logged and skipped). *from is the snapshot's
 * seq, 0 when none was used. */
int kl_proj_rebuild(kl_proj **out, kl_log *log, const char *dir, const kl_logger *lg,
                    uint64_t *from, kl_err *err);

/* ---- as JSON (render.c) ------------------------------------------------ */

/* The contract's objects; each returns a new reference. `now` decides a
 * key's status and is_active. */
json_t *kl_render_key(const kl_key *k, int64_t now);
json_t *kl_render_org(const kl_org *o);
json_t *kl_render_limits(const kl_org *o);   /* the org's usage_limits */
json_t *kl_render_user(const kl_user *u);
json_t *kl_render_sa(const kl_sa *s);
json_t *kl_render_computer(const kl_computer *c);
json_t *kl_render_session(const kl_session *s);
json_t *kl_render_message(const kl_message *m);
json_t *kl_render_alert(const kl_proj *p, const kl_alert *a);
json_t *kl_json_id(kl_id_kind kind, const kl_id *id);
json_t *kl_json_time(int64_t ms);
json_t *kl_json_ref(const kl_ref *r);   /* "usr_…" / "sa_…" id string */

/* JSON text written straight into a caller's buffer, without a tree: the
 * answers on hot paths (a verification, a key). Strings are escaped as
 * jansson escapes them, so text and tree answers read alike byte for byte.
 * A write that does not fit sets `full` and stops writing. */
typedef struct kl_jw {
    char *p, *end;
    bool full;
} kl_jw;
void kl_jw_raw(kl_jw *w, const char *s, size_t n);
void kl_jw_lit(kl_jw *w, const char *s);              /* unescaped, as is */
void kl_jw_str(kl_jw *w, const char *s);              /* a JSON string */
void kl_jw_id(kl_jw *w, kl_id_kind kind, const kl_id *id);
void kl_jw_time(kl_jw *w, int64_t ms);
void kl_jw_uint(kl_jw *w, uint64_t v);
/* kl_render_key as text, with `key` (the new secret) last when not NULL;
 * kl_render_key_max is room enough for it. */
void kl_render_key_text(kl_jw *w, const kl_key *k, int64_t now, const char *secret);
size_t kl_render_key_max(const kl_key *k, const char *secret);
/* An event as the audit history and `keyledger replay` show it (API.md
 * "Audit history"; docs/audit.md): `hash` is its record's chain hash. */
json_t *kl_render_event(const kl_event *ev, const uint8_t hash[KL_HASH_LEN]);
/* What an event is about (its `target`): false when nothing. */
bool kl_event_target(const kl_event *ev, kl_id_kind *kind, kl_id *id);

#endif
