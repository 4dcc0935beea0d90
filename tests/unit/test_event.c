/*
 * tests/unit/test_event.c — the event codec: every event type encoded,
 * framed and decoded back field for field; the catalogue's required and
 * allowed fields; and payloads that are wrong in every way we can think of
 * (unknown types and versions, missing, unexpected and mistyped fields,
 * every truncation, byte flips), which must be refused, never crash.
 *
 * A payload is framed by hand as log/log.c documents it: 0x9a, 0xcf + seq
 * (u64 big endian), 0xc4 0x20 + prev (32 bytes), more (0xc2/0xc3), then
 * kl_event_encode's bytes. One test checks that kl_log_frame produces exactly those bytes.
 * Payloads handed to the decoder are heap copies of their exact length, so
 * a read past the end, or a string left pointing at freed memory, is a
 * sanitizer error.
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

#include <msgpack.h>

#include "log.h"

enum { PREFIX = 45 };

/* ---- building events ----------------------------------------------------- */

static kl_id id_of(uint8_t tag)
{
    kl_id id;
    for (int i = 0; i < 16; i++)
        id.b[i] = (uint8_t)(tag * 16 + i + 1);
    return id;
}

static kl_str S(const char *s) { return (kl_str){s, (uint32_t)strlen(s)}; }

static const uint8_t PREV[KL_HASH_LEN] = {
    0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 0xff};

/* The envelope every test event shares: a user acting through a key. */
static kl_event base_event(kl_event_type t)
{
    kl_event ev;
    memset(&ev, 0, sizeof ev);
    ev.type = t;
    ev.ts = 1768473000123;
    ev.org = id_of(1);
    ev.actor.type = KL_PRINCIPAL_USER;
    ev.actor.id = id_of(2);
    ev.actor.key_id = id_of(3);
    ev.request_id = id_of(4);
    return ev;
}

/* Every field filled; `has` decides which are written. */
static kl_event full_event(kl_event_type t, uint32_t has)
{
    kl_event ev = base_event(t);
    ev.has = has;
    ev.id = id_of(5);
    ev.name = S("Deploy key \xc3\xa9t\xc3\xa9");       /* UTF-8 */
    ev.description = S("used by the CI pipeline");
    ev.email = S("ada@example.com");
    ev.comment = S("leaked in a gist");
    ev.prefix = S("kl_live_01jhx3k9");
    ev.role = KL_ROLE_MANAGER;
    ev.owner_type = KL_PRINCIPAL_SA;
    ev.owner = id_of(6);
    for (int i = 0; i < KL_HASH_LEN; i++)
        ev.hash[i] = (uint8_t)(0xa0 + i);
    ev.env = KL_ENV_TEST;
    ev.access = KL_ACCESS_FLOWS;
    ev.flows[0] = S("billing.read");
    ev.flows[1] = S("");
    ev.flows[2] = S("deploy.*");
    ev.nflows = 3;
    ev.rl_minute = 60;
    ev.rl_day = 4000000000u;
    ev.lim_minute = 1;
    ev.lim_day = 0;
    ev.lim_month = UINT32_MAX;
    ev.expires_at = 1800000000000;
    ev.grace_until = 1768476600000;
    ev.active = true;
    ev.usage_from = 1768471200000;
    ev.usage_to = 1768474800000;
    ev.successes = 4000000000u;
    ev.failures = 3;
    ev.last_used = 1768474799999;
    ev.idem_key = S("create-0001");
    ev.title = S("nightly \"release\" run");
    ev.content = S("deploy the \xe2\x9c\x93 build");
    ev.ref = id_of(7);
    ev.author = KL_AUTHOR_ASSISTANT;
    ev.alert = KL_ALERT_ROTATION_DUE;
    ev.compact.through_seq = UINT64_MAX - 1;
    memset(ev.compact.through_hash, 0xa5, KL_HASH_LEN);
    ev.compact.cutoff = 1768471200000;
    ev.compact.folded = 1ull << 40;
    ev.compact.totals = 7;
    for (int i = 1; i < KL_FAIL_REASONS; i++)
        ev.auth_counts[i] = (uint32_t)(i * 7);
    ev.cond = id_of(8);
    for (uint32_t i = 0; i < ev.nflows; i++) {
        ev.flow_successes[i] = 1000 * i + 1;
        ev.flow_failures[i] = i == 2 ? UINT32_MAX : i;
    }
    for (int i = 0; i < 16; i++)
        ev.idem_fp[i] = (uint8_t)(0x10 * i + 7);
    return ev;
}

/* prefix + encode, the way kl_log_frame lays it out. */
static void frame_by_hand(const kl_event *ev, uint64_t seq, kl_buf *out)
{
    uint8_t pre[PREFIX];
    pre[0] = 0x9a;
    pre[1] = 0xcf;
    for (int i = 0; i < 8; i++)
        pre[2 + i] = (uint8_t)(seq >> (56 - 8 * i));
    pre[10] = 0xc4;
    pre[11] = 0x20;
    memcpy(pre + 12, PREV, KL_HASH_LEN);
    pre[44] = 0xc2;                     /* more: false */
    out->len = 0;
    assert_int_equal(kl_buf_append(out, pre, sizeof pre), KL_OK);
    assert_int_equal(kl_event_encode(ev, out), KL_OK);
}

/* ---- comparing ------------------------------------------------------------ */

static void assert_str_eq(kl_str got, kl_str want)
{
    assert_int_equal(got.len, want.len);
    if (want.len > 0)
        assert_memory_equal(got.ptr, want.ptr, want.len);
}

static void assert_in(kl_str s, const uint8_t *payload, size_t len)
{
    if (s.len == 0 && s.ptr == NULL)
        return;
    assert_true((const uint8_t *)s.ptr >= payload);
    assert_true((const uint8_t *)s.ptr + s.len <= payload + len);
}

static void assert_str_absent(kl_str s)
{
    assert_null(s.ptr);
    assert_int_equal(s.len, 0);
}

static void assert_zero(const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        assert_int_equal(b[i], 0);
}

/* `got` was decoded from what `want` encoded: the same event, field for
 * field, and nothing where `want` had nothing. Strings in `got` lie inside
 * the payload. */
static void assert_decoded(const kl_event *got, const kl_event *want,
                           const uint8_t *payload, size_t len)
{
    assert_int_equal(got->type, want->type);
    assert_int_equal(got->version, want->type == KL_EV_USAGE_RECORDED ? 2 : 1);
    assert_int_equal(got->ts, want->ts);
    assert_memory_equal(got->org.b, want->org.b, 16);
    assert_int_equal(got->actor.type, want->actor.type);
    assert_memory_equal(got->actor.id.b, want->actor.id.b, 16);
    assert_memory_equal(got->actor.key_id.b, want->actor.key_id.b, 16);
    assert_memory_equal(got->request_id.b, want->request_id.b, 16);
    assert_int_equal(got->has, want->has);
    uint32_t h = want->has;

    if (h & KL_F_ID)
        assert_memory_equal(got->id.b, want->id.b, 16);
    else
        assert_true(kl_id_is_zero(&got->id));
#define STR_FIELD(bit, f)                                                    \
    do {                                                                     \
        if (h & (bit)) {                                                     \
            assert_str_eq(got->f, want->f);                                  \
            assert_in(got->f, payload, len);                                 \
        } else {                                                             \
            assert_str_absent(got->f);                                       \
        }                                                                    \
    } while (0)
    STR_FIELD(KL_F_NAME, name);
    STR_FIELD(KL_F_DESCRIPTION, description);
    STR_FIELD(KL_F_EMAIL, email);
    STR_FIELD(KL_F_COMMENT, comment);
    STR_FIELD(KL_F_PREFIX, prefix);
    STR_FIELD(KL_F_IDEM, idem_key);
    STR_FIELD(KL_F_TITLE, title);
    STR_FIELD(KL_F_CONTENT, content);
#undef STR_FIELD
    if (h & KL_F_REF)
        assert_memory_equal(got->ref.b, want->ref.b, 16);
    else
        assert_true(kl_id_is_zero(&got->ref));
    assert_int_equal(got->author, h & KL_F_AUTHOR ? want->author : KL_AUTHOR_NONE);
    assert_int_equal(got->alert, h & KL_F_ALERT ? want->alert : KL_ALERT_NONE);
    for (int i = 0; i < KL_FAIL_REASONS; i++)
        assert_int_equal(got->auth_counts[i], h & KL_F_AUTH ? want->auth_counts[i] : 0);
    if (h & KL_F_ALERT)
        assert_memory_equal(got->cond.b, want->cond.b, 16);
    else
        assert_true(kl_id_is_zero(&got->cond));
    assert_int_equal(got->role, h & KL_F_ROLE ? want->role : KL_ROLE_NONE);
    if (h & KL_F_OWNER) {
        assert_int_equal(got->owner_type, want->owner_type);
        assert_memory_equal(got->owner.b, want->owner.b, 16);
    } else {
        assert_int_equal(got->owner_type, KL_PRINCIPAL_NONE);
        assert_true(kl_id_is_zero(&got->owner));
    }
    if (h & KL_F_HASH)
        assert_memory_equal(got->hash, want->hash, KL_HASH_LEN);
    else
        assert_zero(got->hash, KL_HASH_LEN);
    assert_int_equal(got->env, h & KL_F_ENV ? want->env : KL_ENV_NONE);
    assert_int_equal(got->access, h & KL_F_ACCESS ? want->access : KL_ACCESS_NONE);
    if (h & (KL_F_ACCESS | KL_F_FLOW_USAGE)) {
        assert_int_equal(got->nflows, want->nflows);
        for (uint32_t i = 0; i < want->nflows; i++) {
            assert_str_eq(got->flows[i], want->flows[i]);
            assert_in(got->flows[i], payload, len);
        }
    } else {
        assert_int_equal(got->nflows, 0);
    }
    for (uint32_t i = 0; i < KL_MAX_FLOWS; i++) {
        bool fu = (h & KL_F_FLOW_USAGE) && i < want->nflows;
        assert_int_equal(got->flow_successes[i], fu ? want->flow_successes[i] : 0);
        assert_int_equal(got->flow_failures[i], fu ? want->flow_failures[i] : 0);
    }
    assert_int_equal(got->rl_minute, h & KL_F_RATE_LIMIT ? want->rl_minute : 0);
    assert_int_equal(got->rl_day, h & KL_F_RATE_LIMIT ? want->rl_day : 0);
    assert_int_equal(got->lim_minute, h & KL_F_LIMITS ? want->lim_minute : 0);
    assert_int_equal(got->lim_day, h & KL_F_LIMITS ? want->lim_day : 0);
    assert_int_equal(got->lim_month, h & KL_F_LIMITS ? want->lim_month : 0);
    assert_int_equal(got->expires_at, h & KL_F_EXPIRES ? want->expires_at : 0);
    assert_int_equal(got->grace_until, h & KL_F_GRACE ? want->grace_until : 0);
    assert_int_equal(got->active, h & KL_F_ACTIVE ? want->active : false);
    if (h & KL_F_IDEM)
        assert_memory_equal(got->idem_fp, want->idem_fp, 16);
    else
        assert_zero(got->idem_fp, 16);
    assert_int_equal(got->usage_from, h & (KL_F_USAGE | KL_F_AUTH) ? want->usage_from : 0);
    assert_int_equal(got->usage_to, h & (KL_F_USAGE | KL_F_AUTH) ? want->usage_to : 0);
    assert_int_equal(got->successes, h & KL_F_USAGE ? want->successes : 0);
    assert_int_equal(got->failures, h & KL_F_USAGE ? want->failures : 0);
    assert_int_equal(got->last_used, h & KL_F_USAGE ? want->last_used : 0);
    if (h & KL_F_COMPACT) {
        assert_true(got->compact.through_seq == want->compact.through_seq);
        assert_memory_equal(got->compact.through_hash, want->compact.through_hash,
                            KL_HASH_LEN);
        assert_int_equal(got->compact.cutoff, want->compact.cutoff);
        assert_true(got->compact.folded == want->compact.folded);
        assert_int_equal(got->compact.totals, want->compact.totals);
    } else {
        assert_int_equal(got->compact.through_seq, 0);
        assert_zero(got->compact.through_hash, KL_HASH_LEN);
        assert_int_equal(got->compact.cutoff, 0);
    }
}

/* Copies the payload to a heap block of its exact size and decodes it. */
static int decode_exact(const void *p, size_t n, kl_record_head *head,
                        kl_event *ev, kl_err *err, uint8_t **copy_out)
{
    uint8_t *copy = malloc(n > 0 ? n : 1);
    assert_non_null(copy);
    if (n > 0)
        memcpy(copy, p, n);
    int rc = kl_event_decode(copy, n, head, ev, err);
    if (copy_out != NULL)
        *copy_out = copy;
    else
        free(copy);
    return rc;
}

/* Encode, frame, decode, compare. */
static void round_trip(const kl_event *ev, uint64_t seq)
{
    kl_buf b = {0};
    frame_by_hand(ev, seq, &b);
    kl_record_head head;
    kl_event got;
    kl_err err = {0};
    uint8_t *payload;
    int rc = decode_exact(b.data, b.len, &head, &got, &err, &payload);
    if (rc != KL_OK)
        fail_msg("decode %s: %d %s", kl_event_type_name(ev->type), rc, err.msg);
    /* The decoder's own objects are gone by now: what it gave back must
     * point into the payload. */
    assert_int_equal(head.seq, seq);
    assert_int_equal(got.seq, seq);
    assert_memory_equal(head.prev, PREV, KL_HASH_LEN);
    assert_decoded(&got, ev, payload, b.len);
    free(payload);
    kl_buf_free(&b);
}

/* ---- the catalogue, as docs/events.md states it ---------------------------- */

#define KEY_SETTINGS (KL_F_NAME | KL_F_DESCRIPTION | KL_F_ACCESS | \
                      KL_F_RATE_LIMIT | KL_F_EXPIRES)

typedef struct spec {
    kl_event_type type;
    const char *name;
    kl_category cat;
    uint32_t required, allowed;
} spec;

static const spec catalogue[] = {
    {KL_EV_ORG_CREATED, "OrgCreated", KL_CAT_CONTROL, KL_F_NAME, KL_F_NAME},
    {KL_EV_USER_INVITED, "UserInvited", KL_CAT_CONTROL,
     KL_F_ID | KL_F_EMAIL | KL_F_ROLE,
     KL_F_ID | KL_F_EMAIL | KL_F_ROLE | KL_F_NAME | KL_F_IDEM},
    {KL_EV_USER_UPDATED, "UserUpdated", KL_CAT_CONTROL, KL_F_ID,
     KL_F_ID | KL_F_NAME | KL_F_IDEM},
    {KL_EV_USER_ROLE_CHANGED, "UserRoleChanged", KL_CAT_CONTROL,
     KL_F_ID | KL_F_ROLE, KL_F_ID | KL_F_ROLE | KL_F_IDEM},
    {KL_EV_USER_REMOVED, "UserRemoved", KL_CAT_CONTROL, KL_F_ID,
     KL_F_ID | KL_F_IDEM},
    {KL_EV_SA_CREATED, "ServiceAccountCreated", KL_CAT_CONTROL,
     KL_F_ID | KL_F_NAME | KL_F_ROLE,
     KL_F_ID | KL_F_NAME | KL_F_ROLE | KL_F_DESCRIPTION | KL_F_IDEM},
    {KL_EV_SA_UPDATED, "ServiceAccountUpdated", KL_CAT_CONTROL, KL_F_ID,
     KL_F_ID | KL_F_DESCRIPTION | KL_F_ROLE | KL_F_IDEM},
    {KL_EV_SA_DEACTIVATED, "ServiceAccountDeactivated", KL_CAT_CONTROL, KL_F_ID,
     KL_F_ID | KL_F_IDEM},
    {KL_EV_SA_REACTIVATED, "ServiceAccountReactivated", KL_CAT_CONTROL, KL_F_ID,
     KL_F_ID | KL_F_IDEM},
    {KL_EV_SA_DELETED, "ServiceAccountDeleted", KL_CAT_CONTROL, KL_F_ID,
     KL_F_ID | KL_F_IDEM},
    {KL_EV_KEY_CREATED, "KeyCreated", KL_CAT_KEYS,
     KL_F_ID | KL_F_NAME | KL_F_OWNER | KL_F_HASH | KL_F_PREFIX | KL_F_ENV |
         KL_F_ACCESS,
     KL_F_ID | KEY_SETTINGS | KL_F_OWNER | KL_F_HASH | KL_F_PREFIX | KL_F_ENV |
         KL_F_IDEM},
    {KL_EV_KEY_UPDATED, "KeyUpdated", KL_CAT_KEYS, KL_F_ID,
     KL_F_ID | KEY_SETTINGS | KL_F_IDEM},
    {KL_EV_KEY_REGENERATED, "KeyRegenerated", KL_CAT_KEYS,
     KL_F_ID | KL_F_HASH | KL_F_PREFIX,
     KL_F_ID | KL_F_HASH | KL_F_PREFIX | KL_F_GRACE | KL_F_IDEM},
    {KL_EV_KEY_REVOKED, "KeyRevoked", KL_CAT_KEYS, KL_F_ID,
     KL_F_ID | KL_F_COMMENT | KL_F_IDEM},
    {KL_EV_KEY_DELETED, "KeyDeleted", KL_CAT_KEYS, KL_F_ID, KL_F_ID | KL_F_IDEM},
    {KL_EV_USAGE_LIMITS_CHANGED, "UsageLimitsChanged", KL_CAT_CONTROL,
     KL_F_LIMITS, KL_F_LIMITS | KL_F_IDEM},
    {KL_EV_USAGE_RECORDED, "UsageRecorded", KL_CAT_USAGE, KL_F_ID | KL_F_USAGE,
     KL_F_ID | KL_F_USAGE | KL_F_FLOW_USAGE},
    {KL_EV_AUTH_FAILED, "AuthFailed", KL_CAT_AUTH, KL_F_AUTH, KL_F_AUTH | KL_F_ID},
    {KL_EV_ALERT_RAISED, "AlertRaised", KL_CAT_ALERTS,
     KL_F_ID | KL_F_ALERT | KL_F_CONTENT, KL_F_ID | KL_F_ALERT | KL_F_CONTENT | KL_F_REF},
    {KL_EV_ALERT_ACKNOWLEDGED, "AlertAcknowledged", KL_CAT_ALERTS, KL_F_ID,
     KL_F_ID | KL_F_IDEM},
    {KL_EV_COMPUTER_CREATED, "ComputerCreated", KL_CAT_RESOURCES,
     KL_F_ID | KL_F_NAME | KL_F_OWNER, KL_F_ID | KL_F_NAME | KL_F_OWNER | KL_F_IDEM},
    {KL_EV_COMPUTER_RESTARTED, "ComputerRestarted", KL_CAT_RESOURCES, KL_F_ID,
     KL_F_ID | KL_F_IDEM},
    {KL_EV_COMPUTER_DELETED, "ComputerDeleted", KL_CAT_RESOURCES, KL_F_ID,
     KL_F_ID | KL_F_IDEM},
    {KL_EV_SESSION_CREATED, "SessionCreated", KL_CAT_RESOURCES, KL_F_ID,
     KL_F_ID | KL_F_TITLE | KL_F_REF | KL_F_IDEM},
    {KL_EV_MESSAGE_POSTED, "MessagePosted", KL_CAT_RESOURCES,
     KL_F_ID | KL_F_REF | KL_F_AUTHOR | KL_F_CONTENT,
     KL_F_ID | KL_F_REF | KL_F_AUTHOR | KL_F_CONTENT | KL_F_IDEM},
    {KL_EV_SESSION_DELETED, "SessionDeleted", KL_CAT_RESOURCES, KL_F_ID,
     KL_F_ID | KL_F_IDEM},
    {KL_EV_LOG_COMPACTED, "LogCompacted", KL_CAT_CONTROL, KL_F_COMPACT, KL_F_COMPACT},
};
enum { NCAT = sizeof catalogue / sizeof catalogue[0] };

static void test_catalogue_names(void **state)
{
    (void)state;
    assert_int_equal(NCAT, KL_EV_TYPE_COUNT - 1);
    for (size_t i = 0; i < NCAT; i++) {
        const spec *sp = &catalogue[i];
        assert_string_equal(kl_event_type_name(sp->type), sp->name);
        assert_int_equal(kl_event_type_parse(sp->name, strlen(sp->name)), sp->type);
        assert_int_equal(kl_event_category(sp->type), sp->cat);
    }
    assert_string_equal(kl_event_type_name(KL_EV_NONE), "?");
    assert_string_equal(kl_event_type_name(KL_EV_TYPE_COUNT), "?");
    assert_int_equal(kl_event_type_parse("KeyCreate", 9), KL_EV_NONE);
    assert_int_equal(kl_event_type_parse("KeyCreatedX", 11), KL_EV_NONE);
    assert_int_equal(kl_event_type_parse("keycreated", 10), KL_EV_NONE);
    assert_int_equal(kl_event_type_parse("", 0), KL_EV_NONE);
    /* Length bounds the comparison: "KeyCreated" inside a longer buffer. */
    assert_int_equal(kl_event_type_parse("KeyCreatedXYZ", 10), KL_EV_KEY_CREATED);
    assert_string_equal(kl_category_name(KL_CAT_CONTROL), "control");
    assert_string_equal(kl_category_name(KL_CAT_KEYS), "keys");
    assert_string_equal(kl_category_name(KL_CAT_USAGE), "usage");
    assert_string_equal(kl_category_name(KL_CAT_AUTH), "auth");
    assert_string_equal(kl_category_name(KL_CAT_ALERTS), "alerts");
    assert_string_equal(kl_category_name(KL_CAT_RESOURCES), "resources");
}

static void test_enum_names(void **state)
{
    (void)state;
    static const char *const roles[] = {"", "owner", "manager", "member", "guest"};
    for (int r = 1; r <= 4; r++) {
        assert_string_equal(kl_role_name((kl_role)r), roles[r]);
        assert_int_equal(kl_role_parse(roles[r], strlen(roles[r])), r);
    }
    assert_int_equal(kl_role_parse("admin", 5), KL_ROLE_NONE);
    assert_int_equal(kl_role_parse("", 0), KL_ROLE_NONE);
    assert_int_equal(kl_role_parse("Owner", 5), KL_ROLE_NONE);
    assert_string_equal(kl_role_name((kl_role)9), "");
    static const char *const access[] = {"", "full", "read_only", "flows"};
    for (int a = 1; a <= 3; a++) {
        assert_string_equal(kl_access_name((kl_access)a), access[a]);
        assert_int_equal(kl_access_parse(access[a], strlen(access[a])), a);
    }
    assert_int_equal(kl_access_parse("read", 4), KL_ACCESS_NONE);
    assert_string_equal(kl_env_name(KL_ENV_LIVE), "live");
    assert_string_equal(kl_env_name(KL_ENV_TEST), "test");
    assert_int_equal(kl_env_parse("live", 4), KL_ENV_LIVE);
    assert_int_equal(kl_env_parse("test", 4), KL_ENV_TEST);
    assert_int_equal(kl_env_parse("prod", 4), KL_ENV_NONE);
    assert_int_equal(kl_env_parse("liv", 3), KL_ENV_NONE);
    assert_string_equal(kl_principal_name(KL_PRINCIPAL_USER), "user");
    assert_string_equal(kl_principal_name(KL_PRINCIPAL_SA), "service_account");
    assert_string_equal(kl_principal_name(KL_PRINCIPAL_SYSTEM), "system");
}

/* ---- round trips ------------------------------------------------------------ */

static void test_round_trip_each_type(void **state)
{
    (void)state;
    uint64_t seq = 1;

    kl_event ev = base_event(KL_EV_ORG_CREATED);
    ev.has = KL_F_NAME;
    ev.name = S("Acme");
    ev.actor = (kl_actor){KL_PRINCIPAL_SYSTEM, {{0}}, {{0}}};
    ev.request_id = (kl_id){{0}};       /* nil on the wire */
    round_trip(&ev, seq++);

    ev = base_event(KL_EV_USER_INVITED);
    ev.has = KL_F_ID | KL_F_EMAIL | KL_F_ROLE | KL_F_NAME | KL_F_IDEM;
    ev.id = id_of(7);
    ev.email = S("grace@example.com");
    ev.role = KL_ROLE_OWNER;
    ev.name = S("Grace");
    ev.idem_key = S("invite-1");
    memset(ev.idem_fp, 0x42, 16);
    round_trip(&ev, seq++);

    ev = base_event(KL_EV_USER_ROLE_CHANGED);
    ev.has = KL_F_ID | KL_F_ROLE;
    ev.id = id_of(7);
    ev.role = KL_ROLE_GUEST;
    round_trip(&ev, seq++);

    ev = base_event(KL_EV_SA_CREATED);
    ev.has = KL_F_ID | KL_F_NAME | KL_F_ROLE | KL_F_DESCRIPTION | KL_F_IDEM;
    ev.id = id_of(8);
    ev.name = S("ci");
    ev.role = KL_ROLE_MEMBER;
    ev.description = S("");
    ev.idem_key = S("k");
    round_trip(&ev, seq++);

    ev = base_event(KL_EV_SA_UPDATED);
    ev.has = KL_F_ID | KL_F_DESCRIPTION | KL_F_ROLE;
    ev.id = id_of(8);
    ev.description = S("builds things");
    ev.role = KL_ROLE_GUEST;
    ev.actor.type = KL_PRINCIPAL_SA;
    ev.actor.key_id = (kl_id){{0}};
    round_trip(&ev, seq++);

    kl_event_type sa_simple[] = {KL_EV_SA_DEACTIVATED, KL_EV_SA_REACTIVATED,
                                 KL_EV_SA_DELETED, KL_EV_USER_REMOVED,
                                 KL_EV_KEY_DELETED, KL_EV_USER_UPDATED};
    for (size_t i = 0; i < sizeof sa_simple / sizeof *sa_simple; i++) {
        ev = base_event(sa_simple[i]);
        ev.has = KL_F_ID;
        ev.id = id_of(9);
        round_trip(&ev, seq++);
    }

    ev = base_event(KL_EV_KEY_CREATED);
    ev.has = KL_F_ID | KL_F_NAME | KL_F_DESCRIPTION | KL_F_OWNER | KL_F_HASH |
             KL_F_PREFIX | KL_F_ENV | KL_F_ACCESS | KL_F_RATE_LIMIT |
             KL_F_EXPIRES | KL_F_IDEM;
    ev.id = id_of(10);
    ev.name = S("prod deploy");
    ev.description = S("rotates monthly");
    ev.owner_type = KL_PRINCIPAL_USER;
    ev.owner = id_of(7);
    for (int i = 0; i < KL_HASH_LEN; i++)
        ev.hash[i] = (uint8_t)(255 - i);
    ev.prefix = S("kl_live_01jhx3k9");
    ev.env = KL_ENV_LIVE;
    ev.access = KL_ACCESS_FLOWS;
    ev.nflows = 2;
    ev.flows[0] = S("payments.write");
    ev.flows[1] = S("payments.read");
    ev.rl_minute = 120;
    ev.rl_day = 0;
    ev.expires_at = 1893456000000;      /* 2030-01-01 */
    ev.idem_key = S("create-0001");
    memset(ev.idem_fp, 0xab, 16);
    round_trip(&ev, seq++);

    /* The most flows allowed, and an access without flows. */
    static char flow_text[KL_MAX_FLOWS][8];
    for (uint32_t i = 0; i < KL_MAX_FLOWS; i++) {
        snprintf(flow_text[i], sizeof flow_text[i], "f%u", i);
        ev.flows[i] = S(flow_text[i]);
    }
    ev.nflows = KL_MAX_FLOWS;
    round_trip(&ev, seq++);
    ev.access = KL_ACCESS_FULL;
    ev.nflows = 0;
    round_trip(&ev, seq++);

    ev = base_event(KL_EV_KEY_UPDATED);
    ev.has = KL_F_ID | KL_F_NAME | KL_F_ACCESS | KL_F_RATE_LIMIT | KL_F_EXPIRES;
    ev.id = id_of(10);
    ev.name = S("renamed");
    ev.access = KL_ACCESS_READ_ONLY;
    ev.rl_minute = UINT32_MAX;
    ev.rl_day = 1;
    ev.expires_at = 0;                  /* cleared: never */
    round_trip(&ev, seq++);

    ev = base_event(KL_EV_KEY_REGENERATED);
    ev.has = KL_F_ID | KL_F_HASH | KL_F_PREFIX | KL_F_GRACE;
    ev.id = id_of(10);
    memset(ev.hash, 0x11, KL_HASH_LEN);
    ev.prefix = S("kl_live_01jhx3ka");
    ev.grace_until = 1768476600000;
    round_trip(&ev, seq++);

    ev = base_event(KL_EV_KEY_REVOKED);
    ev.has = KL_F_ID | KL_F_COMMENT;
    ev.id = id_of(10);
    ev.comment = S("committed to a public repo");
    round_trip(&ev, seq++);

    ev = base_event(KL_EV_USAGE_LIMITS_CHANGED);
    ev.has = KL_F_LIMITS | KL_F_IDEM;
    ev.lim_minute = 600;
    ev.lim_day = 0;
    ev.lim_month = 10000000;
    ev.idem_key = S("lim");
    round_trip(&ev, seq++);

    ev = base_event(KL_EV_USAGE_RECORDED);
    ev.has = KL_F_ID | KL_F_USAGE;
    ev.id = id_of(10);
    ev.usage_from = 1768471200000;
    ev.usage_to = 1768471260000;
    ev.successes = 17;
    ev.failures = 0;
    ev.last_used = 0;                   /* none accepted in the period */
    ev.actor = (kl_actor){KL_PRINCIPAL_SYSTEM, {{0}}, {{0}}};
    ev.request_id = (kl_id){{0}};
    round_trip(&ev, seq++);

    /* Refusals by reason: of one key, or of no key (zero org). */
    ev = base_event(KL_EV_AUTH_FAILED);
    ev.has = KL_F_AUTH | KL_F_ID;
    ev.id = id_of(12);
    ev.usage_from = 1768471200000;
    ev.usage_to = 1768471201000;
    ev.auth_counts[KL_FAIL_EXPIRED] = 3;
    ev.auth_counts[KL_FAIL_OWNER_DISABLED] = UINT32_MAX;
    ev.actor = (kl_actor){KL_PRINCIPAL_SYSTEM, {{0}}, {{0}}};
    round_trip(&ev, seq++);
    ev.has = KL_F_AUTH;
    ev.id = (kl_id){{0}};
    ev.org = (kl_id){{0}};
    round_trip(&ev, seq++);

    /* Envelope extremes: a negative time, the largest seq. */
    ev = base_event(KL_EV_KEY_DELETED);
    ev.has = KL_F_ID;
    ev.id = id_of(11);
    ev.ts = -1;
    round_trip(&ev, UINT64_MAX);
    ev.ts = INT64_MIN;
    round_trip(&ev, 1);
    ev.ts = INT64_MAX;
    round_trip(&ev, 1ull << 40);
}

/* Every type with its required fields alone, and with each allowed field
 * added: all of it comes back. */
static void test_round_trip_every_allowed_field(void **state)
{
    (void)state;
    uint64_t seq = 1;
    for (size_t i = 0; i < NCAT; i++) {
        const spec *sp = &catalogue[i];
        kl_event ev = full_event(sp->type, sp->required);
        round_trip(&ev, seq++);
        for (uint32_t bit = 1; bit != 0; bit <<= 1) {
            if ((sp->allowed & bit) && !(sp->required & bit)) {
                ev = full_event(sp->type, sp->required | bit);
                round_trip(&ev, seq++);
            }
        }
        ev = full_event(sp->type, sp->allowed);
        round_trip(&ev, seq++);
    }
}

/* The decoder's strings stay valid after it returns (they point into the
 * payload, not into msgpack's memory) and change when the payload does. */
static void test_strings_point_into_payload(void **state)
{
    (void)state;
    kl_event ev = full_event(KL_EV_KEY_CREATED,
                             catalogue[KL_EV_KEY_CREATED - 1].allowed);
    kl_buf b = {0};
    frame_by_hand(&ev, 42, &b);
    uint8_t *payload;
    kl_record_head head;
    kl_event got;
    kl_err err = {0};
    assert_int_equal(decode_exact(b.data, b.len, &head, &got, &err, &payload), KL_OK);
    /* Many more decodes in between reuse and free msgpack's zones. */
    for (int i = 0; i < 50; i++) {
        kl_event other;
        assert_int_equal(kl_event_decode((const uint8_t *)b.data, b.len, &head,
                                         &other, &err), KL_OK);
    }
    assert_in(got.name, payload, b.len);
    assert_str_eq(got.name, ev.name);
    assert_str_eq(got.flows[2], S("deploy.*"));
    assert_str_eq(got.idem_key, S("create-0001"));
    /* Overwrite the name's bytes in the payload: the event sees it. */
    memset((void *)got.name.ptr, 'x', got.name.len);
    for (uint32_t i = 0; i < got.name.len; i++)
        assert_int_equal(got.name.ptr[i], 'x');
    free(payload);
    kl_buf_free(&b);
}

/* kl_log_frame writes the prefix this test builds by hand. */
static int rm_entry(const char *path, const struct stat *st, int flag,
                    struct FTW *ftw)
{
    (void)st; (void)flag; (void)ftw;
    return remove(path);
}

static int frame_payload(uint64_t seq, const uint8_t *payload, size_t len,
                         const uint8_t hash[KL_HASH_LEN], void *arg)
{
    kl_buf *out = arg;
    out->len = 0;
    return kl_buf_append(out, payload, len);
}

/* A temp dir for the test, removed by the teardown even when it fails. */
static int tmp_setup(void **state)
{
    char *dir = malloc(512);
    if (dir == NULL)
        return -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, 512, "%s/kl-test-event-XXXXXX",
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

static void test_frame_matches_log(void **state)
{
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = *state;
    cfg.fsync = KL_FSYNC_OFF;
    kl_err err = {0};
    kl_log *log = NULL;
    kl_log_recovery rec;
    assert_int_equal(kl_log_create(&cfg, &err), KL_OK);
    assert_int_equal(kl_log_open(&log, &cfg, &rec, &err), KL_OK);
    kl_event ev = full_event(KL_EV_KEY_CREATED,
                             catalogue[KL_EV_KEY_CREATED - 1].allowed);
    kl_buf body = {0}, batch = {0}, got = {0};
    assert_int_equal(kl_event_encode(&ev, &body), KL_OK);
    kl_log_mark m;
    kl_log_mark_get(log, &m);
    uint64_t seq;
    assert_int_equal(kl_log_frame(log, (const uint8_t *)body.data, body.len,
                                  false, &batch, &seq), KL_OK);
    assert_int_equal(kl_log_frame(log, (const uint8_t *)body.data, body.len,
                                  false, &batch, &seq), KL_OK);
    assert_int_equal(kl_log_write(log, &batch, &m, &err), KL_OK);
    assert_int_equal(kl_log_replay(log, 2, true, frame_payload, &got, &err), KL_OK);
    kl_log_close(log);

    assert_int_equal(got.len, PREFIX + body.len);
    kl_record_head head;
    kl_event dec;
    assert_int_equal(kl_event_decode((const uint8_t *)got.data, got.len, &head,
                                     &dec, &err), KL_OK);
    assert_int_equal(head.seq, 2);
    /* prev of seq 2 is SHA-256 of the payload of seq 1. */
    kl_buf first = {0};
    assert_int_equal(kl_buf_append(&first, got.data, 12), KL_OK);
    first.data[9] = 1;                  /* seq 1 */
    static const uint8_t zero[KL_HASH_LEN];
    assert_int_equal(kl_buf_append(&first, zero, KL_HASH_LEN), KL_OK);
    assert_int_equal(kl_buf_append(&first, got.data + 44, 1), KL_OK);
    assert_int_equal(kl_buf_append(&first, body.data, body.len), KL_OK);
    uint8_t h1[KL_HASH_LEN];
    kl_sha256(first.data, first.len, h1);
    assert_memory_equal(head.prev, h1, KL_HASH_LEN);
    assert_decoded(&dec, &ev, (const uint8_t *)got.data, got.len);
    /* Byte for byte what the hand framing makes, prev aside. */
    kl_buf hand = {0};
    frame_by_hand(&ev, 2, &hand);
    assert_int_equal(hand.len, got.len);
    assert_memory_equal(hand.data, got.data, 12);
    assert_memory_equal(hand.data + PREFIX, got.data + PREFIX, body.len);
    kl_buf_free(&hand);
    kl_buf_free(&first);
    kl_buf_free(&body);
    kl_buf_free(&batch);
    kl_buf_free(&got);
}

/* ---- encode refuses what the catalogue does not allow ----------------------- */

static void test_encode_checks_fields(void **state)
{
    (void)state;
    for (size_t i = 0; i < NCAT; i++) {
        const spec *sp = &catalogue[i];
        kl_buf out = {0};
        kl_event ev = full_event(sp->type, sp->required);
        assert_int_equal(kl_event_encode(&ev, &out), KL_OK);
        ev.has = sp->allowed;
        assert_int_equal(kl_event_encode(&ev, &out), KL_OK);
        size_t len = out.len;
        for (uint32_t bit = 1; bit != 0; bit <<= 1) {
            if (sp->required & bit) {
                ev.has = sp->required & ~bit;
                if (kl_event_encode(&ev, &out) != KL_EINVAL)
                    fail_msg("%s encoded without required field 0x%x",
                             sp->name, bit);
            }
            if (!(sp->allowed & bit)) {
                ev.has = sp->required | bit;
                if (kl_event_encode(&ev, &out) != KL_EINVAL)
                    fail_msg("%s encoded with disallowed field 0x%x",
                             sp->name, bit);
            }
        }
        /* Refusals write nothing. */
        assert_int_equal(out.len, len);
        kl_buf_free(&out);
    }
    kl_buf out = {0};
    kl_event ev = full_event(KL_EV_NONE, 0);
    assert_int_equal(kl_event_encode(&ev, &out), KL_EINVAL);
    ev.type = KL_EV_TYPE_COUNT;
    assert_int_equal(kl_event_encode(&ev, &out), KL_EINVAL);
    ev.type = (kl_event_type)-1;
    assert_int_equal(kl_event_encode(&ev, &out), KL_EINVAL);
    assert_int_equal(out.len, 0);
    kl_buf_free(&out);
}

/* ---- hand-made payloads ------------------------------------------------------ */

typedef void (*pack_fn)(msgpack_packer *pk);

static void p_bin(msgpack_packer *pk, size_t n, uint8_t fill)
{
    uint8_t b[64];
    memset(b, fill, sizeof b);
    assert_int_equal(msgpack_pack_bin(pk, n), 0);
    assert_int_equal(msgpack_pack_bin_body(pk, b, n), 0);
}

static void p_str(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    assert_int_equal(msgpack_pack_str(pk, n), 0);
    assert_int_equal(msgpack_pack_str_body(pk, s, n), 0);
}

/* Good values. */
static void v_id(msgpack_packer *pk) { p_bin(pk, 16, 5); }
static void v_name(msgpack_packer *pk) { p_str(pk, "k"); }
static void v_owner(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint8(pk, KL_PRINCIPAL_USER);
    p_bin(pk, 16, 6);
}
static void v_hash(msgpack_packer *pk) { p_bin(pk, 32, 7); }
static void v_prefix(msgpack_packer *pk) { p_str(pk, "kl_live_abc"); }
static void v_env(msgpack_packer *pk) { msgpack_pack_uint8(pk, KL_ENV_LIVE); }
static void v_access(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint8(pk, KL_ACCESS_FLOWS);
    msgpack_pack_array(pk, 2);
    p_str(pk, "a");
    p_str(pk, "b");
}
static void v_int(msgpack_packer *pk) { msgpack_pack_int64(pk, 1234); }
static void v_rl(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint32(pk, 1);
    msgpack_pack_uint32(pk, 2);
}
static void v_lim(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 3);
    msgpack_pack_uint32(pk, 1);
    msgpack_pack_uint32(pk, 2);
    msgpack_pack_uint32(pk, 3);
}
static void v_true(msgpack_packer *pk) { msgpack_pack_true(pk); }
static void v_role(msgpack_packer *pk) { msgpack_pack_uint8(pk, KL_ROLE_MEMBER); }
static void v_usage(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 5);
    msgpack_pack_int64(pk, 1);
    msgpack_pack_int64(pk, 2);
    msgpack_pack_uint32(pk, 3);
    msgpack_pack_uint32(pk, 4);
    msgpack_pack_int64(pk, 0);
}
static void v_idem(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    p_str(pk, "x");
    p_bin(pk, 16, 1);
}

/* Bad values. */
static void b_nil(msgpack_packer *pk) { msgpack_pack_nil(pk); }
static void b_int(msgpack_packer *pk) { msgpack_pack_int64(pk, 7); }
static void b_neg(msgpack_packer *pk) { msgpack_pack_int64(pk, -1); }
static void b_u33(msgpack_packer *pk) { msgpack_pack_uint64(pk, 1ull << 32); }
static void b_u64max(msgpack_packer *pk) { msgpack_pack_uint64(pk, UINT64_MAX); }
static void b_float(msgpack_packer *pk) { msgpack_pack_double(pk, 1.5); }
static void b_str(msgpack_packer *pk) { p_str(pk, "x"); }
static void b_true(msgpack_packer *pk) { msgpack_pack_true(pk); }
static void b_map(msgpack_packer *pk) { msgpack_pack_map(pk, 0); }
static void b_array0(msgpack_packer *pk) { msgpack_pack_array(pk, 0); }
static void b_bin0(msgpack_packer *pk) { p_bin(pk, 0, 0); }
static void b_bin15(msgpack_packer *pk) { p_bin(pk, 15, 1); }
static void b_bin17(msgpack_packer *pk) { p_bin(pk, 17, 1); }
static void b_bin31(msgpack_packer *pk) { p_bin(pk, 31, 1); }
static void b_bin33(msgpack_packer *pk) { p_bin(pk, 33, 1); }
static void b_zero(msgpack_packer *pk) { msgpack_pack_uint8(pk, 0); }
static void b_three(msgpack_packer *pk) { msgpack_pack_uint8(pk, 3); }
static void b_four(msgpack_packer *pk) { msgpack_pack_uint8(pk, 4); }
static void b_five(msgpack_packer *pk) { msgpack_pack_uint8(pk, 5); }
static void b_long_str(msgpack_packer *pk)
{
    static char s[65538];          /* one more than any string may hold */
    memset(s, 'a', sizeof s - 1);
    s[sizeof s - 1] = '\0';
    p_str(pk, s);
}
static void b_owner_len1(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 1);
    msgpack_pack_uint8(pk, KL_PRINCIPAL_USER);
}
static void b_owner_system(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint8(pk, KL_PRINCIPAL_SYSTEM);
    p_bin(pk, 16, 6);
}
static void b_owner_bin15(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint8(pk, KL_PRINCIPAL_USER);
    p_bin(pk, 15, 6);
}
static void b_owner_swapped(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    p_bin(pk, 16, 6);
    msgpack_pack_uint8(pk, KL_PRINCIPAL_USER);
}
static void b_access_mode0(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint8(pk, 0);
    msgpack_pack_array(pk, 0);
}
static void b_access_mode4(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint8(pk, 4);
    msgpack_pack_array(pk, 0);
}
static void b_access_flows_not_array(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint8(pk, KL_ACCESS_FLOWS);
    p_str(pk, "a");
}
static void b_access_flow_int(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint8(pk, KL_ACCESS_FLOWS);
    msgpack_pack_array(pk, 2);
    p_str(pk, "a");
    msgpack_pack_int64(pk, 1);
}
static void b_access_65_flows(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint8(pk, KL_ACCESS_FLOWS);
    msgpack_pack_array(pk, KL_MAX_FLOWS + 1);
    for (int i = 0; i < KL_MAX_FLOWS + 1; i++)
        p_str(pk, "f");
}
static void b_access_len3(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 3);
    msgpack_pack_uint8(pk, KL_ACCESS_FULL);
    msgpack_pack_array(pk, 0);
    msgpack_pack_nil(pk);
}
static void b_rl_len1(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 1);
    msgpack_pack_uint32(pk, 1);
}
static void b_rl_big(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint32(pk, 1);
    msgpack_pack_uint64(pk, 1ull << 32);
}
static void b_rl_neg(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_int64(pk, -5);
    msgpack_pack_uint32(pk, 1);
}
static void b_lim_len2(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    msgpack_pack_uint32(pk, 1);
    msgpack_pack_uint32(pk, 2);
}
static void b_usage_len4(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 4);
    for (int i = 0; i < 4; i++)
        msgpack_pack_uint32(pk, 1);
}
static void b_usage_count_neg(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 5);
    msgpack_pack_int64(pk, 1);
    msgpack_pack_int64(pk, 2);
    msgpack_pack_int64(pk, -3);
    msgpack_pack_uint32(pk, 4);
    msgpack_pack_int64(pk, 0);
}
static void b_usage_count_big(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 5);
    msgpack_pack_int64(pk, 1);
    msgpack_pack_int64(pk, 2);
    msgpack_pack_uint32(pk, 3);
    msgpack_pack_uint64(pk, 1ull << 32);
    msgpack_pack_int64(pk, 0);
}
static void b_usage_time_str(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 5);
    msgpack_pack_int64(pk, 1);
    msgpack_pack_int64(pk, 2);
    msgpack_pack_uint32(pk, 3);
    msgpack_pack_uint32(pk, 4);
    p_str(pk, "now");
}
static void b_idem_fp15(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    p_str(pk, "x");
    p_bin(pk, 15, 1);
}
static void b_idem_key_bin(msgpack_packer *pk)
{
    msgpack_pack_array(pk, 2);
    p_bin(pk, 1, 'x');
    p_bin(pk, 16, 1);
}

typedef struct entry {
    const char *key;
    pack_fn val;
} entry;

/* A valid KeyCreated body, every allowed field present. */
static const entry key_created[] = {
    {"id", v_id},       {"name", v_name},     {"desc", v_name},
    {"owner", v_owner}, {"hash", v_hash},     {"prefix", v_prefix},
    {"env", v_env},     {"access", v_access}, {"rl", v_rl},
    {"exp", v_int},     {"idem", v_idem},
};
enum { NKC = sizeof key_created / sizeof key_created[0] };

typedef struct payload_spec {
    const char *type;
    uint64_t version;
    const entry *body;
    size_t nbody;
    const char *skip;           /* leave this key out */
    const char *swap_key;       /* give this key another value ... */
    pack_fn swap_val;           /* ... (added when not in the body) */
    const char *dup_key;        /* write this key twice */
} payload_spec;

/* Envelope as kl_event_encode writes it, then the body. */
static void pack_payload(msgpack_sbuffer *sb, const payload_spec *ps)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 10);
    msgpack_pack_uint64(&pk, 77);
    p_bin(&pk, 32, 0xee);
    msgpack_pack_false(&pk);
    p_str(&pk, ps->type);
    msgpack_pack_uint64(&pk, ps->version);
    msgpack_pack_int64(&pk, 1768473000000);
    p_bin(&pk, 16, 1);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint8(&pk, KL_PRINCIPAL_USER);
    p_bin(&pk, 16, 2);
    msgpack_pack_nil(&pk);
    msgpack_pack_nil(&pk);
    bool swap_in_body = false;
    size_t n = 0;
    for (size_t i = 0; i < ps->nbody; i++) {
        if (ps->skip != NULL && strcmp(ps->body[i].key, ps->skip) == 0)
            continue;
        if (ps->swap_key != NULL && strcmp(ps->body[i].key, ps->swap_key) == 0)
            swap_in_body = true;
        n++;
    }
    if (ps->swap_key != NULL && !swap_in_body)
        n++;
    if (ps->dup_key != NULL)
        n++;
    msgpack_pack_map(&pk, n);
    for (size_t i = 0; i < ps->nbody; i++) {
        const entry *e = &ps->body[i];
        if (ps->skip != NULL && strcmp(e->key, ps->skip) == 0)
            continue;
        p_str(&pk, e->key);
        if (ps->swap_key != NULL && strcmp(e->key, ps->swap_key) == 0)
            ps->swap_val(&pk);
        else
            e->val(&pk);
        if (ps->dup_key != NULL && strcmp(e->key, ps->dup_key) == 0) {
            p_str(&pk, e->key);
            e->val(&pk);
        }
    }
    if (ps->swap_key != NULL && !swap_in_body) {
        p_str(&pk, ps->swap_key);
        ps->swap_val(&pk);
    }
}

static int decode_spec(const payload_spec *ps, kl_err *err)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_payload(&sb, ps);
    kl_record_head head;
    kl_event ev;
    memset(err, 0, sizeof *err);
    int rc = decode_exact(sb.data, sb.size, &head, &ev, err, NULL);
    msgpack_sbuffer_destroy(&sb);
    return rc;
}

static void test_hand_made_control(void **state)
{
    (void)state;
    payload_spec ps = {"KeyCreated", 1, key_created, NKC, NULL, NULL, NULL, NULL};
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_payload(&sb, &ps);
    kl_record_head head;
    kl_event ev;
    kl_err err = {0};
    uint8_t *copy;
    int rc = decode_exact(sb.data, sb.size, &head, &ev, &err, &copy);
    if (rc != KL_OK)
        fail_msg("the valid hand-made payload was refused: %s", err.msg);
    assert_int_equal(head.seq, 77);
    assert_int_equal(ev.type, KL_EV_KEY_CREATED);
    assert_int_equal(ev.has, KL_F_ID | KL_F_NAME | KL_F_DESCRIPTION | KL_F_OWNER |
                                 KL_F_HASH | KL_F_PREFIX | KL_F_ENV |
                                 KL_F_ACCESS | KL_F_RATE_LIMIT | KL_F_EXPIRES |
                                 KL_F_IDEM);
    assert_int_equal(ev.nflows, 2);
    assert_int_equal(ev.expires_at, 1234);
    assert_int_equal(ev.actor.type, KL_PRINCIPAL_USER);
    assert_true(kl_id_is_zero(&ev.actor.key_id));
    assert_true(kl_id_is_zero(&ev.request_id));
    free(copy);
    msgpack_sbuffer_destroy(&sb);

    /* Key order does not matter; a required field may come last. */
    static const entry reordered[] = {
        {"idem", v_idem}, {"access", v_access}, {"env", v_env},
        {"prefix", v_prefix}, {"hash", v_hash}, {"owner", v_owner},
        {"name", v_name}, {"id", v_id},
    };
    payload_spec ro = {"KeyCreated", 1, reordered, 8, NULL, NULL, NULL, NULL};
    assert_int_equal(decode_spec(&ro, &err), KL_OK);
}

static void test_unknown_type_or_version(void **state)
{
    (void)state;
    kl_err err;
    const char *unknown[] = {"KeyExploded", "keycreated", "KeyCreated ", "",
                             "KL_EV_KEY_CREATED", "?"};
    for (size_t i = 0; i < sizeof unknown / sizeof *unknown; i++) {
        payload_spec ps = {unknown[i], 1, key_created, NKC, NULL, NULL, NULL, NULL};
        assert_int_equal(decode_spec(&ps, &err), KL_EUNKNOWN);
        assert_non_null(strstr(err.msg, "unknown event type"));
    }
    /* A version above the one this build writes. */
    payload_spec ps = {"KeyCreated", 2, key_created, NKC, NULL, NULL, NULL, NULL};
    assert_int_equal(decode_spec(&ps, &err), KL_EUNKNOWN);
    ps.version = UINT32_MAX;
    assert_int_equal(decode_spec(&ps, &err), KL_EUNKNOWN);
    ps.version = 0;                     /* no type has a version 0 */
    assert_int_equal(decode_spec(&ps, &err), KL_EUNKNOWN);
    /* Beyond u32 is not a version at all. */
    ps.version = 1ull << 32;
    assert_int_equal(decode_spec(&ps, &err), KL_ECORRUPT);
    /* Unknown wins over a body this build would refuse: a newer build may
     * have added the field. */
    static const entry future[] = {{"id", v_id}, {"colour", v_name}};
    payload_spec fut = {"KeyRecoloured", 1, future, 2, NULL, NULL, NULL, NULL};
    assert_int_equal(decode_spec(&fut, &err), KL_EUNKNOWN);
    payload_spec fut2 = {"KeyCreated", 2, future, 2, NULL, NULL, NULL, NULL};
    assert_int_equal(decode_spec(&fut2, &err), KL_EUNKNOWN);
}

static void test_missing_required_field(void **state)
{
    (void)state;
    const char *required[] = {"id", "name", "owner", "hash", "prefix", "env",
                              "access"};
    kl_err err;
    for (size_t i = 0; i < sizeof required / sizeof *required; i++) {
        payload_spec ps = {"KeyCreated", 1, key_created, NKC, required[i],
                           NULL, NULL, NULL};
        if (decode_spec(&ps, &err) != KL_ECORRUPT)
            fail_msg("KeyCreated without %s was accepted", required[i]);
        assert_non_null(strstr(err.msg, "missing"));
    }
    /* Optional ones may go. */
    const char *optional[] = {"desc", "rl", "exp", "idem"};
    for (size_t i = 0; i < sizeof optional / sizeof *optional; i++) {
        payload_spec ps = {"KeyCreated", 1, key_created, NKC, optional[i],
                           NULL, NULL, NULL};
        assert_int_equal(decode_spec(&ps, &err), KL_OK);
    }
    static const entry empty[] = {{"id", v_id}};
    payload_spec lim = {"UsageLimitsChanged", 1, empty, 1, "id", NULL, NULL, NULL};
    assert_int_equal(decode_spec(&lim, &err), KL_ECORRUPT);
    payload_spec revoke = {"KeyRevoked", 1, empty, 1, "id", NULL, NULL, NULL};
    assert_int_equal(decode_spec(&revoke, &err), KL_ECORRUPT);
}

static void test_unexpected_field(void **state)
{
    (void)state;
    kl_err err;
    const entry extra[] = {
        {"grace", v_int}, {"comment", v_name}, {"email", v_name},
        {"role", v_role}, {"active", v_true}, {"lim", v_lim},
        {"usage", v_usage}, {"zzz", v_int}, {"", v_int}, {"Name", v_name},
        {"id ", v_id},
    };
    for (size_t i = 0; i < sizeof extra / sizeof *extra; i++) {
        payload_spec ps = {"KeyCreated", 1, key_created, NKC, NULL,
                           extra[i].key, extra[i].val, NULL};
        if (decode_spec(&ps, &err) != KL_ECORRUPT)
            fail_msg("KeyCreated with \"%s\" was accepted", extra[i].key);
        assert_non_null(strstr(err.msg, "KeyCreated"));
    }
    /* The same key twice. */
    const char *dups[] = {"id", "name", "access", "idem"};
    for (size_t i = 0; i < sizeof dups / sizeof *dups; i++) {
        payload_spec ps = {"KeyCreated", 1, key_created, NKC, NULL, NULL, NULL,
                           dups[i]};
        if (decode_spec(&ps, &err) != KL_ECORRUPT)
            fail_msg("KeyCreated with two \"%s\" was accepted", dups[i]);
    }
    /* A field that belongs to other types only. */
    static const entry org[] = {{"name", v_name}, {"id", v_id}};
    payload_spec ps = {"OrgCreated", 1, org, 2, NULL, NULL, NULL, NULL};
    assert_int_equal(decode_spec(&ps, &err), KL_ECORRUPT);
    static const entry no_auth[] = {{"id", v_id}};
    payload_spec us = {"AuthFailed", 1, no_auth, 1, NULL, NULL, NULL, NULL};
    assert_int_equal(decode_spec(&us, &err), KL_ECORRUPT);   /* auth missing */
    static const entry usage[] = {{"id", v_id}, {"usage", v_usage},
                                  {"name", v_name}};
    payload_spec un = {"UsageRecorded", 1, usage, 3, NULL, NULL, NULL, NULL};
    assert_int_equal(decode_spec(&un, &err), KL_ECORRUPT);
    un.nbody = 2;
    assert_int_equal(decode_spec(&un, &err), KL_OK);
    un.skip = "usage";
    assert_int_equal(decode_spec(&un, &err), KL_ECORRUPT);
    static const entry revoke[] = {{"id", v_id}, {"grace", v_int}};
    payload_spec rv = {"KeyRevoked", 1, revoke, 2, NULL, NULL, NULL, NULL};
    assert_int_equal(decode_spec(&rv, &err), KL_ECORRUPT);
}

static void test_wrong_value_types(void **state)
{
    (void)state;
    const entry bad[] = {
        {"id", b_nil}, {"id", b_str}, {"id", b_bin15}, {"id", b_bin17},
        {"id", b_bin0},
        {"name", b_int}, {"name", b_nil}, {"name", b_bin15}, {"name", b_long_str},
        {"desc", b_true}, {"prefix", b_array0},
        {"owner", b_str}, {"owner", b_owner_len1}, {"owner", b_owner_system},
        {"owner", b_owner_bin15}, {"owner", b_owner_swapped}, {"owner", b_array0},
        {"hash", b_bin31}, {"hash", b_bin33}, {"hash", b_str}, {"hash", b_nil},
        {"env", b_zero}, {"env", b_three}, {"env", b_neg}, {"env", b_str},
        {"env", b_float}, {"env", b_u64max},
        {"access", b_access_mode0}, {"access", b_access_mode4},
        {"access", b_access_flows_not_array}, {"access", b_access_flow_int},
        {"access", b_access_65_flows}, {"access", b_access_len3},
        {"access", b_map}, {"access", b_int},
        {"rl", b_rl_len1}, {"rl", b_rl_big}, {"rl", b_rl_neg}, {"rl", b_int},
        {"rl", b_map}, {"env", b_u33},
        {"exp", b_str}, {"exp", b_float}, {"exp", b_u64max}, {"exp", b_nil},
        {"exp", b_true},
        {"idem", b_idem_fp15}, {"idem", b_idem_key_bin}, {"idem", b_str},
        {"idem", b_array0},
    };
    kl_err err;
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        payload_spec ps = {"KeyCreated", 1, key_created, NKC, NULL, bad[i].key,
                           bad[i].val, NULL};
        if (decode_spec(&ps, &err) != KL_ECORRUPT)
            fail_msg("KeyCreated with bad value #%zu for \"%s\" was accepted",
                     i, bad[i].key);
    }
    /* Fields of other types. */
    static const entry user[] = {{"id", v_id}, {"email", v_name}, {"role", v_role}};
    const entry bad_user[] = {{"role", b_zero}, {"role", b_five}, {"role", b_str},
                              {"email", b_int}};
    for (size_t i = 0; i < sizeof bad_user / sizeof *bad_user; i++) {
        payload_spec ps = {"UserInvited", 1, user, 3, NULL, bad_user[i].key,
                           bad_user[i].val, NULL};
        assert_int_equal(decode_spec(&ps, &err), KL_ECORRUPT);
    }
    payload_spec ok = {"UserInvited", 1, user, 3, NULL, "role", b_four, NULL};
    assert_int_equal(decode_spec(&ok, &err), KL_OK);        /* guest */
    static const entry lim[] = {{"lim", v_lim}};
    const pack_fn bad_lim[] = {b_lim_len2, b_rl_big, b_int, b_nil, b_map};
    for (size_t i = 0; i < sizeof bad_lim / sizeof *bad_lim; i++) {
        payload_spec ps = {"UsageLimitsChanged", 1, lim, 1, NULL, "lim",
                           bad_lim[i], NULL};
        assert_int_equal(decode_spec(&ps, &err), KL_ECORRUPT);
    }
    static const entry usage[] = {{"id", v_id}, {"usage", v_usage}};
    const pack_fn bad_usage[] = {b_usage_len4, b_usage_count_neg,
                                 b_usage_count_big, b_usage_time_str, b_int,
                                 b_nil, b_map, b_str};
    for (size_t i = 0; i < sizeof bad_usage / sizeof *bad_usage; i++) {
        payload_spec ps = {"UsageRecorded", 1, usage, 2, NULL, "usage",
                           bad_usage[i], NULL};
        assert_int_equal(decode_spec(&ps, &err), KL_ECORRUPT);
    }
    static const entry regen[] = {{"id", v_id}, {"hash", v_hash},
                                  {"prefix", v_prefix}, {"grace", v_int}};
    const pack_fn bad_grace[] = {b_str, b_float, b_u64max, b_nil};
    for (size_t i = 0; i < sizeof bad_grace / sizeof *bad_grace; i++) {
        payload_spec ps = {"KeyRegenerated", 1, regen, 4, NULL, "grace",
                           bad_grace[i], NULL};
        assert_int_equal(decode_spec(&ps, &err), KL_ECORRUPT);
    }
}

/* The envelope, element by element. */
static void pack_envelope_variant(msgpack_sbuffer *sb, int bad)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    if (bad == 1) {
        msgpack_pack_map(&pk, 0);
        return;
    }
    msgpack_pack_array(&pk, bad == 2 ? 9 : bad == 3 ? 11 : 10);
    /* seq */
    if (bad == 4) msgpack_pack_int64(&pk, -1);
    else if (bad == 5) p_str(&pk, "1");
    else msgpack_pack_uint64(&pk, 3);
    /* prev */
    if (bad == 6) p_bin(&pk, 31, 0);
    else if (bad == 7) p_str(&pk, "prev");
    else p_bin(&pk, 32, 0);
    /* more */
    if (bad == 27) msgpack_pack_uint8(&pk, 1);
    else if (bad == 28) msgpack_pack_nil(&pk);
    else msgpack_pack_true(&pk);
    /* type */
    if (bad == 8) p_bin(&pk, 10, 'K');
    else p_str(&pk, "OrgCreated");
    /* version */
    if (bad == 9) msgpack_pack_int64(&pk, -1);
    else if (bad == 10) p_str(&pk, "1");
    else msgpack_pack_uint64(&pk, 1);
    /* ts */
    if (bad == 11) msgpack_pack_double(&pk, 1.0);
    else if (bad == 12) p_str(&pk, "2026-01-01T00:00:00Z");
    else if (bad == 13) msgpack_pack_uint64(&pk, (uint64_t)INT64_MAX + 1);
    else msgpack_pack_int64(&pk, 5);
    /* org */
    if (bad == 14) p_bin(&pk, 15, 1);
    else if (bad == 15) msgpack_pack_nil(&pk);
    else p_bin(&pk, 16, 1);
    /* actor */
    if (bad == 16) {
        msgpack_pack_array(&pk, 2);
        msgpack_pack_uint8(&pk, 1);
        msgpack_pack_nil(&pk);
    } else {
        msgpack_pack_array(&pk, 3);
        if (bad == 17) msgpack_pack_uint8(&pk, 0);
        else if (bad == 18) msgpack_pack_uint8(&pk, 4);
        else if (bad == 19) p_str(&pk, "user");
        else msgpack_pack_uint8(&pk, 3);
        if (bad == 20) p_bin(&pk, 15, 2);
        else msgpack_pack_nil(&pk);
        if (bad == 21) p_str(&pk, "key");
        else msgpack_pack_nil(&pk);
    }
    /* request id */
    if (bad == 22) p_bin(&pk, 17, 3);
    else if (bad == 23) msgpack_pack_false(&pk);
    else p_bin(&pk, 16, 3);
    /* body */
    if (bad == 24) {
        msgpack_pack_array(&pk, 2);
        p_str(&pk, "name");
        p_str(&pk, "o");
    } else if (bad == 25) {
        msgpack_pack_nil(&pk);
    } else if (bad == 26) {
        msgpack_pack_map(&pk, 2);
        p_str(&pk, "name");
        p_str(&pk, "o");
        msgpack_pack_uint8(&pk, 1);     /* a key that is not a string */
        p_str(&pk, "x");
    } else {
        msgpack_pack_map(&pk, 1);
        p_str(&pk, "name");
        p_str(&pk, "o");
    }
    if (bad == 3)
        msgpack_pack_nil(&pk);
}

static void test_malformed_envelope(void **state)
{
    (void)state;
    kl_err err;
    for (int bad = 0; bad <= 28; bad++) {
        msgpack_sbuffer sb;
        msgpack_sbuffer_init(&sb);
        pack_envelope_variant(&sb, bad);
        kl_record_head head;
        kl_event ev;
        memset(&err, 0, sizeof err);
        int rc = decode_exact(sb.data, sb.size, &head, &ev, &err, NULL);
        if (bad == 0) {
            if (rc != KL_OK)
                fail_msg("valid envelope refused: %s", err.msg);
            assert_int_equal(head.seq, 3);
            assert_true(head.more);
            assert_int_equal(ev.actor.type, KL_PRINCIPAL_SYSTEM);
            assert_int_equal(ev.ts, 5);
        } else if (rc != KL_ECORRUPT) {
            fail_msg("envelope variant %d gave %d", bad, rc);
        } else {
            assert_true(err.msg[0] != '\0');
        }
        msgpack_sbuffer_destroy(&sb);
    }

    /* Not one msgpack value: nothing, bytes after it, a bare prefix. */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_envelope_variant(&sb, 0);
    kl_record_head head;
    kl_event ev;
    assert_int_equal(decode_exact(sb.data, 0, &head, &ev, &err, NULL), KL_ECORRUPT);
    msgpack_sbuffer_write(&sb, "\xc0", 1);
    assert_int_equal(decode_exact(sb.data, sb.size, &head, &ev, &err, NULL),
                     KL_ECORRUPT);
    msgpack_sbuffer_destroy(&sb);
    static const uint8_t junk[] = {0xc1};       /* never used in msgpack */
    assert_int_equal(decode_exact(junk, 1, &head, &ev, &err, NULL), KL_ECORRUPT);
    static const uint8_t deep[] = {0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x90};
    assert_int_equal(decode_exact(deep, sizeof deep, &head, &ev, &err, NULL),
                     KL_ECORRUPT);
    /* A large declared array that is not there. (msgpack-c allocates the
     * declared count before reading: a 32-bit count would ask for up to
     * 128 GiB, which a sanitizer build treats as fatal, so 16 bits here.) */
    static const uint8_t huge[] = {0xdc, 0xff, 0xff, 0xc0};
    assert_int_equal(decode_exact(huge, sizeof huge, &head, &ev, &err, NULL),
                     KL_ECORRUPT);
}

/* Every prefix of every valid payload is refused as corrupt. */
static void test_truncated_payloads(void **state)
{
    (void)state;
    for (size_t i = 0; i < NCAT; i++) {
        const spec *sp = &catalogue[i];
        kl_event ev = full_event(sp->type, sp->allowed);
        kl_buf b = {0};
        frame_by_hand(&ev, 9, &b);
        for (size_t n = 0; n < b.len; n++) {
            kl_record_head head;
            kl_event got;
            kl_err err = {0};
            int rc = decode_exact(b.data, n, &head, &got, &err, NULL);
            if (rc != KL_ECORRUPT)
                fail_msg("%s cut to %zu of %zu bytes gave %d", sp->name, n,
                         b.len, rc);
        }
        kl_buf_free(&b);
    }
}

/* Flipped bytes: refused or decoded, never a crash, and what decodes is
 * still bounded by the payload. */
static void test_byte_flips(void **state)
{
    (void)state;
    static const uint8_t masks[] = {0x01, 0x10, 0x80, 0xff, 0x3c};
    size_t decoded = 0, refused = 0;
    for (size_t i = 0; i < NCAT; i++) {
        const spec *sp = &catalogue[i];
        kl_event ev = full_event(sp->type, sp->allowed);
        kl_buf b = {0};
        frame_by_hand(&ev, 9, &b);
        for (size_t pos = 0; pos < b.len; pos++) {
            for (size_t m = 0; m < sizeof masks; m++) {
                b.data[pos] = (char)(b.data[pos] ^ masks[m]);
                kl_record_head head;
                kl_event got;
                kl_err err = {0};
                uint8_t *copy;
                int rc = decode_exact(b.data, b.len, &head, &got, &err, &copy);
                assert_true(rc == KL_OK || rc == KL_ECORRUPT || rc == KL_EUNKNOWN);
                if (rc == KL_OK) {
                    decoded++;
                    assert_in_range(got.nflows, 0, KL_MAX_FLOWS);
                    assert_in(got.name, copy, b.len);
                    assert_in(got.description, copy, b.len);
                    assert_in(got.email, copy, b.len);
                    assert_in(got.comment, copy, b.len);
                    assert_in(got.prefix, copy, b.len);
                    assert_in(got.idem_key, copy, b.len);
                    for (uint32_t f = 0; f < got.nflows; f++)
                        assert_in(got.flows[f], copy, b.len);
                } else {
                    refused++;
                    assert_true(err.msg[0] != '\0');
                }
                free(copy);
                b.data[pos] = (char)(b.data[pos] ^ masks[m]);
            }
        }
        kl_buf_free(&b);
    }
    /* Both outcomes happen: flips inside string bodies still decode. */
    assert_true(decoded > 0);
    assert_true(refused > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_catalogue_names),
        cmocka_unit_test(test_enum_names),
        cmocka_unit_test(test_round_trip_each_type),
        cmocka_unit_test(test_round_trip_every_allowed_field),
        cmocka_unit_test(test_strings_point_into_payload),
        cmocka_unit_test_setup_teardown(test_frame_matches_log, tmp_setup,
                                        tmp_teardown),
        cmocka_unit_test(test_encode_checks_fields),
        cmocka_unit_test(test_hand_made_control),
        cmocka_unit_test(test_unknown_type_or_version),
        cmocka_unit_test(test_missing_required_field),
        cmocka_unit_test(test_unexpected_field),
        cmocka_unit_test(test_wrong_value_types),
        cmocka_unit_test(test_malformed_envelope),
        cmocka_unit_test(test_truncated_payloads),
        cmocka_unit_test(test_byte_flips),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
