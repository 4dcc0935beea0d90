/*
 * The event catalogue and its msgpack codec.
 *
 * A record payload is one msgpack array of 10 elements:
 *
 *   [seq, prev, more, type, version, ts, org, actor, request_id, body]
 *
 *   seq         uint      gapless, from 1
 *   prev        bin 32    chain hash of the previous record (zeros for seq 1)
 *   more        bool      the next record belongs to the same command
 *   type        str       "KeyCreated", ... (the catalogue below)
 *   version     uint      schema version of that type
 *   ts          int       ms since the epoch
 *   org         bin 16    organization id
 *   actor       array 3   [principal uint, id bin16|nil, key_id bin16|nil]
 *   request_id  bin16|nil
 *   body        map       str keys (below); only the fields the type allows
 *
 * kl_event_encode writes elements 4..10; kl_log_frame writes the array
 * header, seq, prev and more in front of them. Body keys and their C fields:
 *
 *   id bin16, name str, desc str, email str, comment str, prefix str,
 *   role uint, otype uint + owner bin16, hash bin32, env uint,
 *   access uint + flows [str], rl [minute, day], lim [minute, day, month],
 *   exp int (0 = never), grace int, active bool, idem [key str, fp bin16],
 *   usage [from int, to int, successes uint, failures uint, last_used int],
 *   title str, ref bin16, content str, author uint,
 *   fl [[flow str, successes uint, failures uint], ...] (UsageRecorded v2),
 *   alert [type uint, condition bin16],
 *   auth [from int, to int, [count uint per kl_fail_reason 1..7]],
 *   compact [through_seq uint, through_hash bin32, cutoff int, folded uint,
 *            totals uint] (LogCompacted)
 *
 * Enumerations are stored as the small integers of log.h (documented in
 * docs/events.md); they are never renumbered. A new field or meaning means a
 * new version of that type, and old versions must keep decoding.
 */
#include "log.h"

#include <msgpack.h>
#include <string.h>

enum { PAYLOAD_FIELDS = 10, MAX_STR = 65536 };

typedef struct event_spec {
    const char *name;
    uint32_t version;           /* current version written */
    kl_category category;
    uint32_t required;          /* KL_F_* that must be present */
    uint32_t allowed;           /* KL_F_* that may be present */
} event_spec;

#define KEY_SETTINGS (KL_F_NAME | KL_F_DESCRIPTION | KL_F_ACCESS | \
                      KL_F_RATE_LIMIT | KL_F_EXPIRES)

static const event_spec specs[KL_EV_TYPE_COUNT] = {
    [KL_EV_ORG_CREATED] = {"OrgCreated", 1, KL_CAT_CONTROL,
        KL_F_NAME, KL_F_NAME},
    [KL_EV_USER_INVITED] = {"UserInvited", 1, KL_CAT_CONTROL,
        KL_F_ID | KL_F_EMAIL | KL_F_ROLE,
        KL_F_ID | KL_F_EMAIL | KL_F_ROLE | KL_F_NAME | KL_F_IDEM},
    [KL_EV_USER_UPDATED] = {"UserUpdated", 1, KL_CAT_CONTROL,
        KL_F_ID, KL_F_ID | KL_F_NAME | KL_F_IDEM},
    [KL_EV_USER_ROLE_CHANGED] = {"UserRoleChanged", 1, KL_CAT_CONTROL,
        KL_F_ID | KL_F_ROLE, KL_F_ID | KL_F_ROLE | KL_F_IDEM},
    [KL_EV_USER_REMOVED] = {"UserRemoved", 1, KL_CAT_CONTROL,
        KL_F_ID, KL_F_ID | KL_F_IDEM},
    [KL_EV_SA_CREATED] = {"ServiceAccountCreated", 1, KL_CAT_CONTROL,
        KL_F_ID | KL_F_NAME | KL_F_ROLE,
        KL_F_ID | KL_F_NAME | KL_F_ROLE | KL_F_DESCRIPTION | KL_F_IDEM},
    [KL_EV_SA_UPDATED] = {"ServiceAccountUpdated", 1, KL_CAT_CONTROL,
        KL_F_ID, KL_F_ID | KL_F_DESCRIPTION | KL_F_ROLE | KL_F_IDEM},
    [KL_EV_SA_DEACTIVATED] = {"ServiceAccountDeactivated", 1, KL_CAT_CONTROL,
        KL_F_ID, KL_F_ID | KL_F_IDEM},
    [KL_EV_SA_REACTIVATED] = {"ServiceAccountReactivated", 1, KL_CAT_CONTROL,
        KL_F_ID, KL_F_ID | KL_F_IDEM},
    [KL_EV_SA_DELETED] = {"ServiceAccountDeleted", 1, KL_CAT_CONTROL,
        KL_F_ID, KL_F_ID | KL_F_IDEM},
    [KL_EV_KEY_CREATED] = {"KeyCreated", 1, KL_CAT_KEYS,
        KL_F_ID | KL_F_NAME | KL_F_OWNER | KL_F_HASH | KL_F_PREFIX |
            KL_F_ENV | KL_F_ACCESS,
        KL_F_ID | KEY_SETTINGS | KL_F_OWNER | KL_F_HASH | KL_F_PREFIX |
            KL_F_ENV | KL_F_IDEM},
    [KL_EV_KEY_UPDATED] = {"KeyUpdated", 1, KL_CAT_KEYS,
        KL_F_ID, KL_F_ID | KEY_SETTINGS | KL_F_IDEM},
    [KL_EV_KEY_REGENERATED] = {"KeyRegenerated", 1, KL_CAT_KEYS,
        KL_F_ID | KL_F_HASH | KL_F_PREFIX,
        KL_F_ID | KL_F_HASH | KL_F_PREFIX | KL_F_GRACE | KL_F_IDEM},
    [KL_EV_KEY_REVOKED] = {"KeyRevoked", 1, KL_CAT_KEYS,
        KL_F_ID, KL_F_ID | KL_F_COMMENT | KL_F_IDEM},
    [KL_EV_KEY_DELETED] = {"KeyDeleted", 1, KL_CAT_KEYS,
        KL_F_ID, KL_F_ID | KL_F_IDEM},
    [KL_EV_USAGE_LIMITS_CHANGED] = {"UsageLimitsChanged", 1, KL_CAT_CONTROL,
        KL_F_LIMITS, KL_F_LIMITS | KL_F_IDEM},
    [KL_EV_USAGE_RECORDED] = {"UsageRecorded", 2, KL_CAT_USAGE,
        KL_F_ID | KL_F_USAGE, KL_F_ID | KL_F_USAGE | KL_F_FLOW_USAGE},
    [KL_EV_AUTH_FAILED] = {"AuthFailed", 1, KL_CAT_AUTH, KL_F_AUTH, KL_F_AUTH | KL_F_ID},
    [KL_EV_ALERT_RAISED] = {"AlertRaised", 1, KL_CAT_ALERTS,
        KL_F_ID | KL_F_ALERT | KL_F_CONTENT, KL_F_ID | KL_F_ALERT | KL_F_CONTENT | KL_F_REF},
    [KL_EV_ALERT_ACKNOWLEDGED] = {"AlertAcknowledged", 1, KL_CAT_ALERTS,
        KL_F_ID, KL_F_ID | KL_F_IDEM},
    [KL_EV_COMPUTER_CREATED] = {"ComputerCreated", 1, KL_CAT_RESOURCES,
        KL_F_ID | KL_F_NAME | KL_F_OWNER, KL_F_ID | KL_F_NAME | KL_F_OWNER | KL_F_IDEM},
    [KL_EV_COMPUTER_RESTARTED] = {"ComputerRestarted", 1, KL_CAT_RESOURCES,
        KL_F_ID, KL_F_ID | KL_F_IDEM},
    [KL_EV_COMPUTER_DELETED] = {"ComputerDeleted", 1, KL_CAT_RESOURCES,
        KL_F_ID, KL_F_ID | KL_F_IDEM},
    [KL_EV_SESSION_CREATED] = {"SessionCreated", 1, KL_CAT_RESOURCES,
        KL_F_ID, KL_F_ID | KL_F_TITLE | KL_F_REF | KL_F_IDEM},
    [KL_EV_MESSAGE_POSTED] = {"MessagePosted", 1, KL_CAT_RESOURCES,
        KL_F_ID | KL_F_REF | KL_F_AUTHOR | KL_F_CONTENT,
        KL_F_ID | KL_F_REF | KL_F_AUTHOR | KL_F_CONTENT | KL_F_IDEM},
    [KL_EV_SESSION_DELETED] = {"SessionDeleted", 1, KL_CAT_RESOURCES,
        KL_F_ID, KL_F_ID | KL_F_IDEM},
    [KL_EV_LOG_COMPACTED] = {"LogCompacted", 1, KL_CAT_CONTROL,
        KL_F_COMPACT, KL_F_COMPACT},
};

const char *kl_event_type_name(kl_event_type t)
{
    return (t > KL_EV_NONE && t < KL_EV_TYPE_COUNT) ? specs[t].name : "?";
}

kl_event_type kl_event_type_parse(const char *s, size_t len)
{
    for (int t = 1; t < KL_EV_TYPE_COUNT; t++)
        if (strlen(specs[t].name) == len && memcmp(specs[t].name, s, len) == 0)
            return (kl_event_type)t;
    return KL_EV_NONE;
}

kl_category kl_event_category(kl_event_type t)
{
    return (t > KL_EV_NONE && t < KL_EV_TYPE_COUNT) ? specs[t].category
                                                    : KL_CAT_CONTROL;
}

const char *kl_category_name(kl_category c)
{
    static const char *const names[] = {"control", "keys", "usage", "auth",
                                        "alerts", "resources"};
    return (unsigned)c < 6 ? names[c] : "?";
}

/* ---- enumerations ---------------------------------------------------- */

static int name_index(const char *const *names, int n, const char *s, size_t len)
{
    for (int i = 1; i < n; i++)
        if (strlen(names[i]) == len && memcmp(names[i], s, len) == 0)
            return i;
    return 0;
}

static const char *const role_names[] = {"", "owner", "manager", "member", "guest"};
static const char *const principal_names[] = {"", "user", "service_account", "system"};
static const char *const access_names[] = {"", "full", "read_only", "flows"};
static const char *const env_names[] = {"", "live", "test"};
static const char *const author_names[] = {"", "user", "assistant"};
static const char *const alert_names[] = {
    "", "failed_auth_spike", "usage_threshold", "unused_key", "expiring_soon",
    "rotation_due", "unusual_activity"};

const char *kl_role_name(kl_role r) { return (unsigned)r < 5 ? role_names[r] : ""; }
kl_role kl_role_parse(const char *s, size_t len)
{
    return (kl_role)name_index(role_names, 5, s, len);
}
const char *kl_principal_name(kl_principal p)
{
    return (unsigned)p < 4 ? principal_names[p] : "";
}
const char *kl_access_name(kl_access a) { return (unsigned)a < 4 ? access_names[a] : ""; }
kl_access kl_access_parse(const char *s, size_t len)
{
    return (kl_access)name_index(access_names, 4, s, len);
}
const char *kl_env_name(kl_env e) { return (unsigned)e < 3 ? env_names[e] : ""; }
kl_env kl_env_parse(const char *s, size_t len)
{
    return (kl_env)name_index(env_names, 3, s, len);
}
const char *kl_author_name(kl_author a)
{
    return (unsigned)a < 3 ? author_names[a] : "";
}
kl_author kl_author_parse(const char *s, size_t len)
{
    return (kl_author)name_index(author_names, 3, s, len);
}
const char *kl_fail_reason_name(kl_fail_reason r)
{
    static const char *const names[] = {
        "", "unknown_key", "bad_checksum", "wrong_secret", "expired", "revoked",
        "deleted", "owner_disabled"};
    return (unsigned)r < KL_FAIL_REASONS ? names[r] : "";
}

const char *kl_alert_type_name(kl_alert_type t)
{
    return (unsigned)t < 7 ? alert_names[t] : "";
}
kl_alert_type kl_alert_type_parse(const char *s, size_t len)
{
    return (kl_alert_type)name_index(alert_names, 7, s, len);
}

/* ---- encoding -------------------------------------------------------- */

static int buf_write(void *data, const char *p, size_t n)
{
    return kl_buf_append(data, p, n) == KL_OK ? 0 : -1;
}

static int pack_str(msgpack_packer *pk, const char *s, size_t n)
{
    return msgpack_pack_str(pk, n) || msgpack_pack_str_body(pk, s, n);
}

static int pack_key(msgpack_packer *pk, const char *k)
{
    return pack_str(pk, k, strlen(k));
}

static int pack_bin(msgpack_packer *pk, const void *p, size_t n)
{
    return msgpack_pack_bin(pk, n) || msgpack_pack_bin_body(pk, p, n);
}

static int pack_id_or_nil(msgpack_packer *pk, const kl_id *id)
{
    return kl_id_is_zero(id) ? msgpack_pack_nil(pk) : pack_bin(pk, id->b, 16);
}

static int popcount32(uint32_t v) { return __builtin_popcount(v); }

int kl_event_encode(const kl_event *ev, kl_buf *out)
{
    if (ev->type <= KL_EV_NONE || ev->type >= KL_EV_TYPE_COUNT)
        return KL_EINVAL;
    const event_spec *sp = &specs[ev->type];
    if ((ev->has & sp->required) != sp->required || (ev->has & ~sp->allowed))
        return KL_EINVAL;
    /* Refuse what the decoder would refuse: a record written here must
     * always replay. */
    const kl_str *strs[] = {&ev->name, &ev->description, &ev->email, &ev->comment,
                            &ev->prefix, &ev->idem_key, &ev->title, &ev->content};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
        if (strs[i]->len > MAX_STR)
            return KL_EINVAL;
    if (ev->actor.type < KL_PRINCIPAL_USER || ev->actor.type > KL_PRINCIPAL_SYSTEM ||
        ((ev->has & KL_F_ROLE) && (ev->role < KL_ROLE_OWNER || ev->role > KL_ROLE_GUEST)) ||
        ((ev->has & KL_F_OWNER) &&
         (ev->owner_type < KL_PRINCIPAL_USER || ev->owner_type > KL_PRINCIPAL_SA)) ||
        ((ev->has & KL_F_ENV) && (ev->env < KL_ENV_LIVE || ev->env > KL_ENV_TEST)) ||
        ((ev->has & KL_F_ALERT) &&
         (ev->alert < KL_ALERT_FAILED_AUTH_SPIKE || ev->alert > KL_ALERT_UNUSUAL_ACTIVITY)) ||
        ((ev->has & KL_F_AUTHOR) &&
         (ev->author < KL_AUTHOR_USER || ev->author > KL_AUTHOR_ASSISTANT)) ||
        ((ev->has & KL_F_ACCESS) &&
         (ev->access < KL_ACCESS_FULL || ev->access > KL_ACCESS_FLOWS)) ||
        ev->nflows > KL_MAX_FLOWS)
        return KL_EINVAL;
    for (uint32_t i = 0; (ev->has & (KL_F_ACCESS | KL_F_FLOW_USAGE)) && i < ev->nflows;
         i++)
        if (ev->flows[i].len > MAX_STR)
            return KL_EINVAL;

    msgpack_packer pk;
    msgpack_packer_init(&pk, out, buf_write);
    uint32_t has = ev->has;
    int rc = pack_key(&pk, sp->name) ||
             msgpack_pack_uint32(&pk, sp->version) ||
             msgpack_pack_int64(&pk, ev->ts) ||
             pack_bin(&pk, ev->org.b, 16) ||
             msgpack_pack_array(&pk, 3) ||
             msgpack_pack_uint8(&pk, (uint8_t)ev->actor.type) ||
             pack_id_or_nil(&pk, &ev->actor.id) ||
             pack_id_or_nil(&pk, &ev->actor.key_id) ||
             pack_id_or_nil(&pk, &ev->request_id);
    /* Two bits stand for one map entry each, except the ones that are two
     * C fields in one entry (owner, access): counted once via popcount. */
    rc = rc || msgpack_pack_map(&pk, (size_t)popcount32(has));
    if (!rc && (has & KL_F_ID))
        rc = pack_key(&pk, "id") || pack_bin(&pk, ev->id.b, 16);
    if (!rc && (has & KL_F_NAME))
        rc = pack_key(&pk, "name") || pack_str(&pk, ev->name.ptr, ev->name.len);
    if (!rc && (has & KL_F_DESCRIPTION))
        rc = pack_key(&pk, "desc") ||
             pack_str(&pk, ev->description.ptr, ev->description.len);
    if (!rc && (has & KL_F_EMAIL))
        rc = pack_key(&pk, "email") || pack_str(&pk, ev->email.ptr, ev->email.len);
    if (!rc && (has & KL_F_ROLE))
        rc = pack_key(&pk, "role") || msgpack_pack_uint8(&pk, (uint8_t)ev->role);
    if (!rc && (has & KL_F_OWNER))
        rc = pack_key(&pk, "owner") || msgpack_pack_array(&pk, 2) ||
             msgpack_pack_uint8(&pk, (uint8_t)ev->owner_type) ||
             pack_bin(&pk, ev->owner.b, 16);
    if (!rc && (has & KL_F_HASH))
        rc = pack_key(&pk, "hash") || pack_bin(&pk, ev->hash, KL_HASH_LEN);
    if (!rc && (has & KL_F_PREFIX))
        rc = pack_key(&pk, "prefix") || pack_str(&pk, ev->prefix.ptr, ev->prefix.len);
    if (!rc && (has & KL_F_ENV))
        rc = pack_key(&pk, "env") || msgpack_pack_uint8(&pk, (uint8_t)ev->env);
    if (!rc && (has & KL_F_ACCESS)) {
        rc = pack_key(&pk, "access") || msgpack_pack_array(&pk, 2) ||
             msgpack_pack_uint8(&pk, (uint8_t)ev->access) ||
             msgpack_pack_array(&pk, ev->nflows);
        for (uint32_t i = 0; !rc && i < ev->nflows; i++)
            rc = pack_str(&pk, ev->flows[i].ptr, ev->flows[i].len);
    }
    if (!rc && (has & KL_F_RATE_LIMIT))
        rc = pack_key(&pk, "rl") || msgpack_pack_array(&pk, 2) ||
             msgpack_pack_uint32(&pk, ev->rl_minute) ||
             msgpack_pack_uint32(&pk, ev->rl_day);
    if (!rc && (has & KL_F_EXPIRES))
        rc = pack_key(&pk, "exp") || msgpack_pack_int64(&pk, ev->expires_at);
    if (!rc && (has & KL_F_GRACE))
        rc = pack_key(&pk, "grace") || msgpack_pack_int64(&pk, ev->grace_until);
    if (!rc && (has & KL_F_COMMENT))
        rc = pack_key(&pk, "comment") ||
             pack_str(&pk, ev->comment.ptr, ev->comment.len);
    if (!rc && (has & KL_F_ACTIVE))
        rc = pack_key(&pk, "active") ||
             (ev->active ? msgpack_pack_true(&pk) : msgpack_pack_false(&pk));
    if (!rc && (has & KL_F_LIMITS))
        rc = pack_key(&pk, "lim") || msgpack_pack_array(&pk, 3) ||
             msgpack_pack_uint32(&pk, ev->lim_minute) ||
             msgpack_pack_uint32(&pk, ev->lim_day) ||
             msgpack_pack_uint32(&pk, ev->lim_month);
    if (!rc && (has & KL_F_USAGE))
        rc = pack_key(&pk, "usage") || msgpack_pack_array(&pk, 5) ||
             msgpack_pack_int64(&pk, ev->usage_from) ||
             msgpack_pack_int64(&pk, ev->usage_to) ||
             msgpack_pack_uint32(&pk, ev->successes) ||
             msgpack_pack_uint32(&pk, ev->failures) ||
             msgpack_pack_int64(&pk, ev->last_used);
    if (!rc && (has & KL_F_FLOW_USAGE)) {
        rc = pack_key(&pk, "fl") || msgpack_pack_array(&pk, ev->nflows);
        for (uint32_t i = 0; !rc && i < ev->nflows; i++)
            rc = msgpack_pack_array(&pk, 3) ||
                 pack_str(&pk, ev->flows[i].ptr, ev->flows[i].len) ||
                 msgpack_pack_uint32(&pk, ev->flow_successes[i]) ||
                 msgpack_pack_uint32(&pk, ev->flow_failures[i]);
    }
    if (!rc && (has & KL_F_ALERT))
        rc = pack_key(&pk, "alert") || msgpack_pack_array(&pk, 2) ||
             msgpack_pack_uint8(&pk, (uint8_t)ev->alert) || pack_bin(&pk, ev->cond.b, 16);
    if (!rc && (has & KL_F_AUTH)) {
        rc = pack_key(&pk, "auth") || msgpack_pack_array(&pk, 3) ||
             msgpack_pack_int64(&pk, ev->usage_from) ||
             msgpack_pack_int64(&pk, ev->usage_to) ||
             msgpack_pack_array(&pk, KL_FAIL_REASONS - 1);
        for (int i = 1; !rc && i < KL_FAIL_REASONS; i++)
            rc = msgpack_pack_uint32(&pk, ev->auth_counts[i]);
    }
    if (!rc && (has & KL_F_COMPACT))
        rc = pack_key(&pk, "compact") || msgpack_pack_array(&pk, 5) ||
             msgpack_pack_uint64(&pk, ev->compact.through_seq) ||
             pack_bin(&pk, ev->compact.through_hash, KL_HASH_LEN) ||
             msgpack_pack_int64(&pk, ev->compact.cutoff) ||
             msgpack_pack_uint64(&pk, ev->compact.folded) ||
             msgpack_pack_uint64(&pk, ev->compact.totals);
    if (!rc && (has & KL_F_TITLE))
        rc = pack_key(&pk, "title") || pack_str(&pk, ev->title.ptr, ev->title.len);
    if (!rc && (has & KL_F_REF))
        rc = pack_key(&pk, "ref") || pack_bin(&pk, ev->ref.b, 16);
    if (!rc && (has & KL_F_CONTENT))
        rc = pack_key(&pk, "content") ||
             pack_str(&pk, ev->content.ptr, ev->content.len);
    if (!rc && (has & KL_F_AUTHOR))
        rc = pack_key(&pk, "author") || msgpack_pack_uint8(&pk, (uint8_t)ev->author);
    if (!rc && (has & KL_F_IDEM))
        rc = pack_key(&pk, "idem") || msgpack_pack_array(&pk, 2) ||
             pack_str(&pk, ev->idem_key.ptr, ev->idem_key.len) ||
             pack_bin(&pk, ev->idem_fp, sizeof ev->idem_fp);
    return rc ? KL_ENOMEM : KL_OK;
}

/* ---- decoding -------------------------------------------------------- */

/* Every reader checks the object's type and bounds; bytes from disk are not
 * trusted even when their CRC matched. */
static bool get_uint(const msgpack_object *o, uint64_t max, uint64_t *v)
{
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 > max)
        return false;
    *v = o->via.u64;
    return true;
}

static bool get_int(const msgpack_object *o, int64_t *v)
{
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= INT64_MAX)
        *v = (int64_t)o->via.u64;
    else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
        *v = o->via.i64;
    else
        return false;
    return true;
}

static bool get_u32(const msgpack_object *o, uint32_t *v)
{
    uint64_t u;
    if (!get_uint(o, UINT32_MAX, &u))
        return false;
    *v = (uint32_t)u;
    return true;
}

static bool get_enum(const msgpack_object *o, unsigned max, unsigned *v)
{
    uint64_t u;
    if (!get_uint(o, max, &u) || u == 0)
        return false;
    *v = (unsigned)u;
    return true;
}

static bool get_str(const msgpack_object *o, kl_str *s)
{
    if (o->type != MSGPACK_OBJECT_STR || o->via.str.size > MAX_STR)
        return false;
    s->ptr = o->via.str.ptr;
    s->len = o->via.str.size;
    return true;
}

static bool get_bin(const msgpack_object *o, void *out, size_t n)
{
    if (o->type != MSGPACK_OBJECT_BIN || o->via.bin.size != n)
        return false;
    memcpy(out, o->via.bin.ptr, n);
    return true;
}

static bool get_id_or_nil(const msgpack_object *o, kl_id *id)
{
    if (o->type == MSGPACK_OBJECT_NIL) {
        memset(id, 0, sizeof *id);
        return true;
    }
    return get_bin(o, id->b, 16);
}

static bool is_array(const msgpack_object *o, uint32_t n)
{
    return o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size == n;
}

static bool key_is(const msgpack_object *k, const char *name)
{
    size_t n = strlen(name);
    return k->via.str.size == n && memcmp(k->via.str.ptr, name, n) == 0;
}

/* Reads one body entry into ev; returns the KL_F_ bit it set, 0 if the key
 * is unknown or the value malformed. */
static uint32_t decode_field(const msgpack_object *k, const msgpack_object *v,
                             kl_event *ev)
{
    unsigned e;
    const msgpack_object *a;
    if (key_is(k, "id"))
        return get_bin(v, ev->id.b, 16) ? KL_F_ID : 0;
    if (key_is(k, "name"))
        return get_str(v, &ev->name) ? KL_F_NAME : 0;
    if (key_is(k, "desc"))
        return get_str(v, &ev->description) ? KL_F_DESCRIPTION : 0;
    if (key_is(k, "email"))
        return get_str(v, &ev->email) ? KL_F_EMAIL : 0;
    if (key_is(k, "comment"))
        return get_str(v, &ev->comment) ? KL_F_COMMENT : 0;
    if (key_is(k, "prefix"))
        return get_str(v, &ev->prefix) ? KL_F_PREFIX : 0;
    if (key_is(k, "role")) {
        if (!get_enum(v, KL_ROLE_GUEST, &e))
            return 0;
        ev->role = (kl_role)e;
        return KL_F_ROLE;
    }
    if (key_is(k, "owner")) {
        if (!is_array(v, 2) || !get_enum(&v->via.array.ptr[0], KL_PRINCIPAL_SA, &e) ||
            !get_bin(&v->via.array.ptr[1], ev->owner.b, 16))
            return 0;
        ev->owner_type = (kl_principal)e;
        return KL_F_OWNER;
    }
    if (key_is(k, "hash"))
        return get_bin(v, ev->hash, KL_HASH_LEN) ? KL_F_HASH : 0;
    if (key_is(k, "fl")) {
        if (v->type != MSGPACK_OBJECT_ARRAY || v->via.array.size > KL_MAX_FLOWS)
            return 0;
        ev->nflows = v->via.array.size;
        for (uint32_t i = 0; i < ev->nflows; i++) {
            a = &v->via.array.ptr[i];
            if (!is_array(a, 3) || !get_str(&a->via.array.ptr[0], &ev->flows[i]) ||
                !get_u32(&a->via.array.ptr[1], &ev->flow_successes[i]) ||
                !get_u32(&a->via.array.ptr[2], &ev->flow_failures[i]))
                return 0;
        }
        return KL_F_FLOW_USAGE;
    }
    if (key_is(k, "alert")) {
        if (!is_array(v, 2) ||
            !get_enum(&v->via.array.ptr[0], KL_ALERT_UNUSUAL_ACTIVITY, &e) ||
            !get_bin(&v->via.array.ptr[1], ev->cond.b, 16))
            return 0;
        ev->alert = (kl_alert_type)e;
        return KL_F_ALERT;
    }
    if (key_is(k, "auth")) {
        if (!is_array(v, 3) || !get_int(&v->via.array.ptr[0], &ev->usage_from) ||
            !get_int(&v->via.array.ptr[1], &ev->usage_to))
            return 0;
        a = &v->via.array.ptr[2];
        if (!is_array(a, KL_FAIL_REASONS - 1))
            return 0;
        for (int i = 1; i < KL_FAIL_REASONS; i++)
            if (!get_u32(&a->via.array.ptr[i - 1], &ev->auth_counts[i]))
                return 0;
        return KL_F_AUTH;
    }
    if (key_is(k, "title"))
        return get_str(v, &ev->title) ? KL_F_TITLE : 0;
    if (key_is(k, "ref"))
        return get_bin(v, ev->ref.b, 16) ? KL_F_REF : 0;
    if (key_is(k, "content"))
        return get_str(v, &ev->content) ? KL_F_CONTENT : 0;
    if (key_is(k, "compact")) {
        a = v->via.array.ptr;
        return is_array(v, 5) && get_uint(&a[0], UINT64_MAX, &ev->compact.through_seq) &&
                       get_bin(&a[1], ev->compact.through_hash, KL_HASH_LEN) &&
                       get_int(&a[2], &ev->compact.cutoff) &&
                       get_uint(&a[3], UINT64_MAX, &ev->compact.folded) &&
                       get_uint(&a[4], UINT64_MAX, &ev->compact.totals)
                   ? KL_F_COMPACT : 0;
    }
    if (key_is(k, "author")) {
        if (!get_enum(v, KL_AUTHOR_ASSISTANT, &e))
            return 0;
        ev->author = (kl_author)e;
        return KL_F_AUTHOR;
    }
    if (key_is(k, "env")) {
        if (!get_enum(v, KL_ENV_TEST, &e))
            return 0;
        ev->env = (kl_env)e;
        return KL_F_ENV;
    }
    if (key_is(k, "access")) {
        if (!is_array(v, 2) || !get_enum(&v->via.array.ptr[0], KL_ACCESS_FLOWS, &e))
            return 0;
        ev->access = (kl_access)e;
        a = &v->via.array.ptr[1];
        if (a->type != MSGPACK_OBJECT_ARRAY || a->via.array.size > KL_MAX_FLOWS)
            return 0;
        ev->nflows = a->via.array.size;
        for (uint32_t i = 0; i < ev->nflows; i++)
            if (!get_str(&a->via.array.ptr[i], &ev->flows[i]))
                return 0;
        return KL_F_ACCESS;
    }
    if (key_is(k, "rl"))
        return is_array(v, 2) && get_u32(&v->via.array.ptr[0], &ev->rl_minute) &&
                       get_u32(&v->via.array.ptr[1], &ev->rl_day)
                   ? KL_F_RATE_LIMIT : 0;
    if (key_is(k, "lim"))
        return is_array(v, 3) && get_u32(&v->via.array.ptr[0], &ev->lim_minute) &&
                       get_u32(&v->via.array.ptr[1], &ev->lim_day) &&
                       get_u32(&v->via.array.ptr[2], &ev->lim_month)
                   ? KL_F_LIMITS : 0;
    if (key_is(k, "exp"))
        return get_int(v, &ev->expires_at) ? KL_F_EXPIRES : 0;
    if (key_is(k, "grace"))
        return get_int(v, &ev->grace_until) ? KL_F_GRACE : 0;
    if (key_is(k, "active")) {
        if (v->type != MSGPACK_OBJECT_BOOLEAN)
            return 0;
        ev->active = v->via.boolean;
        return KL_F_ACTIVE;
    }
    if (key_is(k, "usage")) {
        const msgpack_object *u = v->via.array.ptr;
        return is_array(v, 5) && get_int(&u[0], &ev->usage_from) &&
                       get_int(&u[1], &ev->usage_to) &&
                       get_u32(&u[2], &ev->successes) &&
                       get_u32(&u[3], &ev->failures) && get_int(&u[4], &ev->last_used)
                   ? KL_F_USAGE : 0;
    }
    if (key_is(k, "idem"))
        return is_array(v, 2) && get_str(&v->via.array.ptr[0], &ev->idem_key) &&
                       get_bin(&v->via.array.ptr[1], ev->idem_fp, sizeof ev->idem_fp)
                   ? KL_F_IDEM : 0;
    return 0;
}

/*
 * msgpack-c allocates room for a container's declared element count before
 * reading the elements, so 5 bytes can ask for gigabytes. This walk checks
 * first that the payload is one well-formed value, no deeper than 8, whose
 * every count fits in the bytes that remain (each element takes at least
 * one byte).
 */
static bool well_formed(const uint8_t *p, size_t len)
{
    enum { MAX_DEPTH = 8 };
    uint64_t left[MAX_DEPTH + 1];   /* values still to read at each depth */
    int depth = 0;
    left[0] = 1;
    size_t i = 0;
    while (depth >= 0) {
        if (left[depth] == 0) {
            depth--;
            continue;
        }
        left[depth]--;
        if (i >= len)
            return false;
        uint8_t b = p[i++];
        uint64_t skip = 0, items = 0;
        size_t need = 0;            /* bytes of the length that follows */
        bool container = false, map = false;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            /* fixint, nil, bool */
        } else if (b >= 0xa0 && b <= 0xbf) {
            skip = b & 0x1f;
        } else if (b >= 0x90 && b <= 0x9f) {
            items = b & 0x0f;
            container = true;
        } else if (b >= 0x80 && b <= 0x8f) {
            items = b & 0x0f;
            container = map = true;
        } else {
            switch (b) {
            case 0xcc: case 0xd0: skip = 1; break;
            case 0xcd: case 0xd1: skip = 2; break;
            case 0xca: case 0xce: case 0xd2: skip = 4; break;
            case 0xcb: case 0xcf: case 0xd3: skip = 8; break;
            case 0xc4: case 0xd9: need = 1; break;
            case 0xc5: case 0xda: need = 2; break;
            case 0xc6: case 0xdb: need = 4; break;
            case 0xdc: need = 2; container = true; break;
            case 0xdd: need = 4; container = true; break;
            case 0xde: need = 2; container = map = true; break;
            case 0xdf: need = 4; container = map = true; break;
            default: return false;  /* ext types and the unused byte */
            }
            if (need != 0) {
                if (len - i < need)
                    return false;
                uint64_t n = 0;
                for (size_t k = 0; k < need; k++)
                    n = n << 8 | p[i + k];
                i += need;
                if (container)
                    items = n;
                else
                    skip = n;
            }
        }
        if (skip > len - i)
            return false;
        i += skip;
        if (container) {
            uint64_t values = map ? items * 2 : items;
            if (values > len - i || depth == MAX_DEPTH)
                return false;
            left[++depth] = values;
        }
    }
    return i == len;
}

int kl_event_decode(const uint8_t *payload, size_t len, kl_record_head *head,
                    kl_event *ev, kl_err *err)
{
    msgpack_unpacked up;
    size_t off = 0;
    int rc = KL_ECORRUPT;
    memset(ev, 0, sizeof *ev);
    if (!well_formed(payload, len)) {
        kl_err_set(err, "payload is not one well-formed msgpack value");
        return KL_ECORRUPT;
    }
    msgpack_unpacked_init(&up);

    msgpack_unpack_return ur =
        msgpack_unpack_next(&up, (const char *)payload, len, &off);
    if (ur != MSGPACK_UNPACK_SUCCESS || off != len) {
        kl_err_set(err, "payload is not one msgpack value");
        goto cleanup;
    }
    const msgpack_object *root = &up.data;
    if (!is_array(root, PAYLOAD_FIELDS)) {
        kl_err_set(err, "payload is not an array of %d", PAYLOAD_FIELDS);
        goto cleanup;
    }
    const msgpack_object *f = root->via.array.ptr;
    kl_str type;
    uint64_t version;
    unsigned principal;
    if (!get_uint(&f[0], UINT64_MAX, &head->seq) ||
        !get_bin(&f[1], head->prev, KL_HASH_LEN) ||
        f[2].type != MSGPACK_OBJECT_BOOLEAN) {
        kl_err_set(err, "malformed record prefix");
        goto cleanup;
    }
    head->more = f[2].via.boolean;
    f++;                        /* the event proper */
    if (!get_str(&f[2], &type) ||
        !get_uint(&f[3], UINT32_MAX, &version) || !get_int(&f[4], &ev->ts) ||
        !get_bin(&f[5], ev->org.b, 16) || !is_array(&f[6], 3) ||
        !get_enum(&f[6].via.array.ptr[0], KL_PRINCIPAL_SYSTEM, &principal) ||
        !get_id_or_nil(&f[6].via.array.ptr[1], &ev->actor.id) ||
        !get_id_or_nil(&f[6].via.array.ptr[2], &ev->actor.key_id) ||
        !get_id_or_nil(&f[7], &ev->request_id) ||
        f[8].type != MSGPACK_OBJECT_MAP) {
        kl_err_set(err, "malformed event envelope");
        goto cleanup;
    }
    ev->seq = head->seq;
    ev->actor.type = (kl_principal)principal;
    ev->type = kl_event_type_parse(type.ptr, type.len);
    ev->version = (uint32_t)version;
    if (ev->type == KL_EV_NONE || version == 0 ||
        version > specs[ev->type].version) {
        kl_err_set(err, "unknown event type %.*s version %u (seq %llu): "
                   "written by a newer keyledger?", (int)type.len, type.ptr,
                   (unsigned)version, (unsigned long long)head->seq);
        rc = KL_EUNKNOWN;
        goto cleanup;
    }
    const event_spec *sp = &specs[ev->type];
    const msgpack_object_map *body = &f[8].via.map;
    for (uint32_t i = 0; i < body->size; i++) {
        const msgpack_object *k = &body->ptr[i].key;
        uint32_t bit = k->type == MSGPACK_OBJECT_STR
                           ? decode_field(k, &body->ptr[i].val, ev) : 0;
        if (bit == 0 || (ev->has & bit) || !(sp->allowed & bit)) {
            kl_err_set(err, "%s (seq %llu): bad or unexpected field #%u",
                       sp->name, (unsigned long long)head->seq, i);
            goto cleanup;
        }
        ev->has |= bit;
    }
    if ((ev->has & sp->required) != sp->required) {
        kl_err_set(err, "%s (seq %llu): missing required fields", sp->name,
                   (unsigned long long)head->seq);
        goto cleanup;
    }
    rc = KL_OK;
cleanup:
    msgpack_unpacked_destroy(&up);
    return rc;
}
