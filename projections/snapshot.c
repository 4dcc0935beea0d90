/*
 * Snapshots of the state: every entity the fold built, at one seq, so a
 * start can load it and replay only the records after it.
 *
 * The payload is a stream of msgpack values (any msgpack tool can read it):
 *
 *   header  ["keyledger-state", 2, seq, orgs, users, service accounts,
 *            keys, computers, sessions, messages, alerts, idempotency,
 *            key split]
 *   then that many entities of each kind, in that order, each an array
 *   (the fields are listed where they are written below). The key split is
 *   the payload offset of key number keys / 2 when there are SPLIT_KEYS or
 *   more (else 0), written as a 9-byte uint 64 so it can be filled in once
 *   known: a loader gives the second half to a second thread.
 *
 * Entities refer to each other by id (a user's org, a key's owner) and come
 * after what they refer to, so loading is one pass. Each kind is written in
 * the order its lists keep (ids ascending within an org), so loading only
 * appends. Nothing loaded is trusted: every value is read with bounds and
 * types checked, every reference must resolve, and a snapshot that does not
 * is refused whole (the caller replays the log instead).
 *
 * Reading uses a small reader for the msgpack subset written here rather
 * than msgpack-c's unpacker: a million keys load in a fraction of the time
 * the object tree would take, and memory stays the state's own.
 */
#include "internal.h"

#include <msgpack.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* KL_SNAPSHOT_FORMAT 2 added the key split: with at least SPLIT_KEYS keys,
 * the keys load as two halves on two threads. */
enum { FORMAT = KL_SNAPSHOT_FORMAT, MAX_TEXT = 65536, SPLIT_KEYS = 20000 };
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "an org's history is written in host order: little endian");
static const char MAGIC[] = "keyledger-state";

/* ---- writing ---------------------------------------------------------- */

static int buf_write(void *data, const char *p, size_t n)
{
    return kl_buf_append(data, p, n) == KL_OK ? 0 : -1;
}

typedef struct wr {
    msgpack_packer pk;
    int rc;                     /* sticky: any failure makes it non-zero */
} wr;

static void w_arr(wr *w, size_t n) { w->rc |= msgpack_pack_array(&w->pk, n); }
static void w_u(wr *w, uint64_t v) { w->rc |= msgpack_pack_uint64(&w->pk, v); }
static void w_i(wr *w, int64_t v) { w->rc |= msgpack_pack_int64(&w->pk, v); }
static void w_b(wr *w, bool v)
{
    w->rc |= v ? msgpack_pack_true(&w->pk) : msgpack_pack_false(&w->pk);
}
static void w_bin(wr *w, const void *p, size_t n)
{
    w->rc |= msgpack_pack_bin(&w->pk, n) || msgpack_pack_bin_body(&w->pk, p, n);
}
static void w_id(wr *w, const kl_id *id) { w_bin(w, id->b, 16); }
static void w_s(wr *w, const char *s)      /* NULL is nil */
{
    if (s == NULL) {
        w->rc |= msgpack_pack_nil(&w->pk);
        return;
    }
    size_t n = strlen(s);
    w->rc |= msgpack_pack_str(&w->pk, n) || msgpack_pack_str_body(&w->pk, s, n);
}
static void w_ref(wr *w, const kl_ref *r)
{
    w_u(w, (uint64_t)r->type);
    w_id(w, &r->id);
}

static void write_key(wr *w, const kl_key *k)
{
    /* [id, org, owner type, owner, creator type, creator, name, desc,
     *  prefix, env, access, [flows], rl minute, rl day, created, updated,
     *  expires, rotated, last used, version, hash, grace hash|nil, grace
     *  until, revoked [at, by type, by, comment|nil]|nil, deleted, usage
     *  buckets bin (hour i64, flow u32, successes u32, failures u32 LE)] */
    w_arr(w, 26);
    w_id(w, &k->id);
    w_id(w, &kl_key_org(k)->id);
    kl_ref owner = kl_key_owner(k);
    w_ref(w, &owner);
    w_ref(w, &k->created_by);
    w_s(w, kl_key_name(k));
    w_s(w, kl_key_description(k));
    w_s(w, k->prefix);
    w_u(w, (uint64_t)k->env);
    w_u(w, (uint64_t)k->access);
    w_arr(w, kl_key_nflows(k));
    for (uint32_t i = 0; i < kl_key_nflows(k); i++)
        w_s(w, kl_key_flow(k, i));
    w_u(w, k->rl_minute);
    w_u(w, k->rl_day);
    w_i(w, k->created_at);
    w_i(w, k->updated_at);
    w_i(w, k->expires_at);
    w_i(w, k->rotated_at);
    w_i(w, k->last_used_at);
    w_u(w, k->version);
    w_bin(w, k->hash, KL_HASH_LEN);
    const kl_key_grace *g = kl_key_grace_of(k);
    const kl_key_revocation *rv = kl_key_revocation_of(k);
    if (g != NULL)
        w_bin(w, g->old_hash, KL_HASH_LEN);
    else
        w_s(w, NULL);
    w_i(w, g != NULL ? g->until : 0);
    if (rv != NULL) {
        w_arr(w, 4);
        w_i(w, rv->at);
        w_ref(w, &rv->by);
        w_s(w, rv->comment);
    } else {
        w_s(w, NULL);
    }
    w_b(w, k->deleted);
    const kl_usage_series *u = k->usage;
    uint32_t n = u != NULL ? u->len : 0;
    uint8_t *packed = n > 0 ? malloc((size_t)n * 20) : NULL;
    if (n > 0 && packed == NULL) {
        w->rc = -1;
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *p = packed + (size_t)i * 20;
        uint64_t h = (uint64_t)u->items[i].hour;
        uint32_t f[3] = {u->items[i].flow, u->items[i].successes, u->items[i].failures};
        for (int b = 0; b < 8; b++)
            p[b] = (uint8_t)(h >> (8 * b));
        for (int j = 0; j < 3; j++)
            for (int b = 0; b < 4; b++)
                p[8 + 4 * j + b] = (uint8_t)(f[j] >> (8 * b));
    }
    w_bin(w, packed, (size_t)n * 20);
    free(packed);
}

typedef struct counts {
    uint64_t orgs, users, sas, keys, computers, sessions, messages, alerts, idem;
} counts;

static void count(const kl_proj *p, counts *c)
{
    memset(c, 0, sizeof *c);
    c->orgs = p->orgs.len;
    for (uint32_t i = 0; i < p->orgs.len; i++) {
        const kl_org *o = p->orgs.items[i];
        c->users += o->users.len;
        c->sas += o->sas.len;
        c->keys += o->keys.len + o->deleted_keys.len;
        c->computers += o->computers.len;
        c->sessions += o->sessions.len;
        for (uint32_t j = 0; j < o->sessions.len; j++)
            c->messages += ((const kl_session *)o->sessions.items[j])->messages.len;
        c->alerts += o->alerts.len;
    }
    c->idem = p->idem_by_slot.len;
}

int kl_proj_snapshot(const kl_proj *p, kl_buf *out)
{
    wr w = {.rc = 0};
    msgpack_packer_init(&w.pk, out, buf_write);
    counts c;
    count(p, &c);
    size_t base = out->len;
    w_arr(&w, 13);
    w_s(&w, MAGIC);
    w_u(&w, FORMAT);
    w_u(&w, p->seq);
    uint64_t n[9] = {c.orgs, c.users, c.sas, c.keys, c.computers, c.sessions,
                     c.messages, c.alerts, c.idem};
    for (int i = 0; i < 9; i++)
        w_u(&w, n[i]);
    /* The key split: a uint 64 of 0 in full (the packer writes through to
     * `out` as it goes), filled in at key keys / 2. */
    static const char U64[9] = {(char)0xcf};
    size_t split_at = out->len;
    w.rc |= buf_write(out, U64, sizeof U64);
    /* Orgs: [id, name, created, updated, version, lim minute, day, month,
     * [flow names], used day start, used day, used month start, used
     * month, history bin (u64 LE each)]. */
    for (uint32_t i = 0; i < p->orgs.len; i++) {
        const kl_org *o = p->orgs.items[i];
        w_arr(&w, 14);
        w_id(&w, &o->id);
        w_s(&w, o->name);
        w_i(&w, o->created_at);
        w_i(&w, o->updated_at);
        w_u(&w, o->version);
        w_u(&w, o->lim_minute);
        w_u(&w, o->lim_day);
        w_u(&w, o->lim_month);
        w_arr(&w, o->nflow_names);
        for (uint32_t j = 0; j < o->nflow_names; j++)
            w_s(&w, o->flow_names[j]);
        w_i(&w, o->used_day_start);
        w_u(&w, o->used_day);
        w_i(&w, o->used_month_start);
        w_u(&w, o->used_month);
        /* Host order, which is little endian (checked below); the reader
         * checks the length. */
        w_bin(&w, o->history, o->history_len * sizeof *o->history);
    }
    /* Users: [id, org, email, name, role, removed, created, updated, version]. */
    for (uint32_t i = 0; i < p->orgs.len; i++) {
        const kl_org *o = p->orgs.items[i];
        for (uint32_t j = 0; j < o->users.len; j++) {
            const kl_user *u = o->users.items[j];
            w_arr(&w, 9);
            w_id(&w, &u->id);
            w_id(&w, &o->id);
            w_s(&w, u->email);
            w_s(&w, u->name);
            w_u(&w, (uint64_t)u->role);
            w_b(&w, u->removed);
            w_i(&w, u->created_at);
            w_i(&w, u->updated_at);
            w_u(&w, u->version);
        }
    }
    /* Service accounts: [id, org, name, desc, role, active, deleted,
     * creator type, creator, created, updated, deactivated, version]. */
    for (uint32_t i = 0; i < p->orgs.len; i++) {
        const kl_org *o = p->orgs.items[i];
        for (uint32_t j = 0; j < o->sas.len; j++) {
            const kl_sa *s = o->sas.items[j];
            w_arr(&w, 13);
            w_id(&w, &s->id);
            w_id(&w, &o->id);
            w_s(&w, s->name);
            w_s(&w, s->description);
            w_u(&w, (uint64_t)s->role);
            w_b(&w, s->active);
            w_b(&w, s->deleted);
            w_ref(&w, &s->created_by);
            w_i(&w, s->created_at);
            w_i(&w, s->updated_at);
            w_i(&w, s->deactivated_at);
            w_u(&w, s->version);
        }
    }
    uint64_t nth = 0, half = c.keys >= SPLIT_KEYS ? c.keys / 2 : UINT64_MAX;
    for (uint32_t i = 0; i < p->orgs.len; i++) {
        const kl_org *o = p->orgs.items[i];
        const kl_vec *lists[2] = {&o->keys, &o->deleted_keys};
        for (int l = 0; l < 2; l++)
            for (uint32_t j = 0; j < lists[l]->len; j++) {
                if (nth++ == half && w.rc == 0) {
                    uint64_t off = out->len - base;
                    for (int b = 0; b < 8; b++)
                        out->data[split_at + 1 + b] = (char)(off >> (56 - 8 * b));
                }
                write_key(&w, lists[l]->items[j]);
            }
    }
    /* Computers: [id, org, name, owner type, owner, creator type, creator,
     * deleted, created, updated, restarted, version]. */
    for (uint32_t i = 0; i < p->orgs.len; i++) {
        const kl_org *o = p->orgs.items[i];
        for (uint32_t j = 0; j < o->computers.len; j++) {
            const kl_computer *m = o->computers.items[j];
            w_arr(&w, 12);
            w_id(&w, &m->id);
            w_id(&w, &o->id);
            w_s(&w, m->name);
            w_ref(&w, &m->owner);
            w_ref(&w, &m->created_by);
            w_b(&w, m->deleted);
            w_i(&w, m->created_at);
            w_i(&w, m->updated_at);
            w_i(&w, m->restarted_at);
            w_u(&w, m->version);
        }
    }
    /* Sessions: [id, org, title|nil, computer, creator type, creator,
     * deleted, created, updated, version]; then their messages: [id,
     * session, author, creator type, creator, created, content]. */
    for (uint32_t i = 0; i < p->orgs.len; i++) {
        const kl_org *o = p->orgs.items[i];
        for (uint32_t j = 0; j < o->sessions.len; j++) {
            const kl_session *s = o->sessions.items[j];
            w_arr(&w, 10);
            w_id(&w, &s->id);
            w_id(&w, &o->id);
            w_s(&w, s->title);
            w_id(&w, &s->computer);
            w_ref(&w, &s->created_by);
            w_b(&w, s->deleted);
            w_i(&w, s->created_at);
            w_i(&w, s->updated_at);
            w_u(&w, s->version);
        }
    }
    for (uint32_t i = 0; i < p->orgs.len; i++) {
        const kl_org *o = p->orgs.items[i];
        for (uint32_t j = 0; j < o->sessions.len; j++) {
            const kl_session *s = o->sessions.items[j];
            for (uint32_t k = 0; k < s->messages.len; k++) {
                const kl_message *m = s->messages.items[k];
                w_arr(&w, 7);
                w_id(&w, &m->id);
                w_id(&w, &s->id);
                w_u(&w, (uint64_t)m->author);
                w_ref(&w, &m->created_by);
                w_i(&w, m->created_at);
                w_s(&w, m->content);
            }
        }
    }
    /* Alerts: [id, org, type, key, cond, details, created, acked, acked at,
     * acked by type, acked by, version]. */
    for (uint32_t i = 0; i < p->orgs.len; i++) {
        const kl_org *o = p->orgs.items[i];
        for (uint32_t j = 0; j < o->alerts.len; j++) {
            const kl_alert *a = o->alerts.items[j];
            w_arr(&w, 12);
            w_id(&w, &a->id);
            w_id(&w, &o->id);
            w_u(&w, (uint64_t)a->type);
            w_id(&w, &a->key);
            w_id(&w, &a->cond);
            w_s(&w, a->details);
            w_i(&w, a->created_at);
            w_b(&w, a->acked);
            w_i(&w, a->acked_at);
            w_ref(&w, &a->acked_by);
            w_u(&w, a->version);
        }
    }
    /* Idempotency records: [slot, fingerprint, type, target, ts]. */
    for (uint32_t i = 0; i < p->idem_by_slot.cap; i++) {
        const kl_idem *r = kl_idmap_at(&p->idem_by_slot, i);
        if (r == NULL)
            continue;
        w_arr(&w, 5);
        w_id(&w, &r->slot);
        w_bin(&w, r->fp, sizeof r->fp);
        w_u(&w, (uint64_t)r->type);
        w_id(&w, &r->target);
        w_i(&w, r->ts);
    }
    return w.rc == 0 ? KL_OK : KL_ENOMEM;
}

/* ---- reading ---------------------------------------------------------- */

/* A cursor over untrusted bytes: every read checks the bounds and the
 * type, and a failure makes every later read fail too.
 *
 * The bytes are in memory (kl_proj_load) or in a snapshot file, where the
 * cursor reads them in pieces as it needs them into a buffer of its own,
 * each piece checksummed as it comes in, while it is in the cache. (The
 * file was mapped before; on a virtual machine the first touch of each
 * page of a mapping is a trip to the host, and reading the pieces into one
 * small buffer cost a third of what that did: measured.) A piece goes
 * after what the buffer holds, so what a read returned stays where it is
 * until r_mark, between two entities, moves the unread bytes back to the
 * buffer's start. The buffer has room for the reader's whole range: an
 * entity of any size fits, and only the pages used are ever touched.
 *
 * The readers run some thirty times a key; inlined, each folds to the few
 * instructions of what its caller expects (as calls, a load took a fifth
 * longer).
 */
#define READER static inline __attribute__((always_inline))
enum { PIECE = 256 << 10, WINDOW = 2 << 20 };

typedef struct rd {
    const uint8_t *p, *end;     /* the bytes at hand */
    bool bad;
    const kl_snapshot_data *file;   /* NULL: every byte is at hand */
    uint8_t *buf;               /* what is at hand, from payload offset `at` */
    uint64_t at;
    uint64_t start, next, stop; /* the range: its start, the next byte to
                                   read, its end */
    uint32_t crc;               /* of [start, next) */
    uint32_t crc_before;        /* of [0, start) */
} rd;

static rd r_mem(const uint8_t *data, size_t len)
{
    return (rd){.p = data, .end = data + len, .buf = (uint8_t *)data,
                .next = len, .stop = len};
}

/* A reader of the file's bytes [start, stop). */
static int r_file(rd *r, const kl_snapshot_data *file, uint64_t start, uint64_t stop)
{
    *r = (rd){.file = file, .at = start, .start = start, .next = start, .stop = stop};
    r->buf = malloc(stop - start > 0 ? (size_t)(stop - start) : 1);
    r->p = r->end = r->buf;
    return r->buf != NULL ? KL_OK : KL_ENOMEM;
}

static void r_free(rd *r)
{
    if (r->file != NULL)
        free(r->buf);
    r->buf = NULL;
}

/* Reads on until n bytes are at hand: a piece at least. Out of line: the
 * reads that need it are one in thousands. */
__attribute__((noinline)) static bool r_fill(rd *r, size_t n)
{
    size_t have = (size_t)(r->end - r->p);
    if (r->file == NULL || n - have > r->stop - r->next)
        return false;
    size_t want = n - have > PIECE ? n - have : PIECE;
    if (want > r->stop - r->next)
        want = (size_t)(r->stop - r->next);
    uint8_t *to = r->buf + (r->next - r->at);       /* the range fits */
    if (!kl_snapshot_pread(r->file, to, want, r->next))
        return false;
    r->crc = kl_crc32c(r->crc, to, want);
    r->next += want;
    r->end = to + want;
    return true;
}

READER const uint8_t *r_take(rd *r, size_t n)
{
    if (r->bad || ((size_t)(r->end - r->p) < n && !r_fill(r, n))) {
        r->bad = true;
        return NULL;
    }
    const uint8_t *at = r->p;
    r->p += n;
    return at;
}

/* The next byte, not taken; -1 at the end. */
static int r_peek(rd *r)
{
    return !r->bad && (r->p < r->end || r_fill(r, 1)) ? *r->p : -1;
}

/* Between two entities: nothing read before is pointed to any more. */
static void r_mark(rd *r)
{
    size_t used = (size_t)(r->p - r->buf);
    if (r->file == NULL || used < WINDOW)
        return;
    memmove(r->buf, r->p, (size_t)(r->end - r->p));
    r->at += used;
    r->end -= used;
    r->p = r->buf;
}

/* The payload offset of the next byte. */
static uint64_t r_pos(const rd *r)
{
    return r->at + (uint64_t)(r->p - r->buf);
}

/* The checksum of the payload's bytes [0, next). */
static uint32_t r_crc(const rd *r)
{
    return r->start == 0 ? r->crc : kl_crc32c_combine(r->crc_before, r->crc, r->next - r->start);
}

/* Whether every byte of the range was read. */
static bool r_done(const rd *r)
{
    return !r->bad && r->p == r->end && r->next == r->stop;
}

READER uint64_t r_be(rd *r, size_t n)
{
    const uint8_t *b = r_take(r, n);
    uint64_t v = 0;
    for (size_t i = 0; b != NULL && i < n; i++)
        v = v << 8 | b[i];
    return v;
}

READER uint8_t r_tag(rd *r)
{
    const uint8_t *b = r_take(r, 1);
    return b != NULL ? *b : 0xc1;       /* 0xc1: never used by msgpack */
}

/* An array header: its count, which must be at most max. */
READER uint32_t r_arr_max(rd *r, uint32_t max)
{
    uint8_t t = r_tag(r);
    uint64_t n = t >= 0x90 && t <= 0x9f ? (uint64_t)(t & 0x0f)
                 : t == 0xdc             ? r_be(r, 2)
                 : t == 0xdd             ? r_be(r, 4)
                                         : UINT64_MAX;
    if (n > max)
        r->bad = true;
    return r->bad ? 0 : (uint32_t)n;
}

READER void r_arr(rd *r, uint32_t want)
{
    if (r_arr_max(r, want) != want)
        r->bad = true;
}

READER uint64_t r_u(rd *r, uint64_t max)
{
    uint8_t t = r_tag(r);
    uint64_t v = t <= 0x7f ? t
                 : t == 0xcc ? r_be(r, 1)
                 : t == 0xcd ? r_be(r, 2)
                 : t == 0xce ? r_be(r, 4)
                 : t == 0xcf ? r_be(r, 8)
                             : UINT64_MAX;
    if (v > max)
        r->bad = true;
    return r->bad ? 0 : v;
}

READER int64_t r_i(rd *r)
{
    uint8_t t = r_tag(r);
    if (t <= 0x7f)
        return t;
    if (t >= 0xe0)
        return (int8_t)t;
    switch (t) {
    case 0xcc: return (int64_t)r_be(r, 1);
    case 0xcd: return (int64_t)r_be(r, 2);
    case 0xce: return (int64_t)r_be(r, 4);
    case 0xcf: {
        uint64_t v = r_be(r, 8);
        if (v > INT64_MAX)
            r->bad = true;
        return r->bad ? 0 : (int64_t)v;
    }
    case 0xd0: return (int8_t)r_be(r, 1);
    case 0xd1: return (int16_t)r_be(r, 2);
    case 0xd2: return (int32_t)r_be(r, 4);
    case 0xd3: return (int64_t)r_be(r, 8);
    default:
        r->bad = true;
        return 0;
    }
}

READER bool r_b(rd *r)
{
    uint8_t t = r_tag(r);
    if (t != 0xc2 && t != 0xc3)
        r->bad = true;
    return t == 0xc3;
}

/* A string (into the buffer, not NUL-terminated), or nil when nil_ok:
 * then *is_nil is set. */
READER kl_str r_s(rd *r, bool nil_ok, bool *is_nil)
{
    uint8_t t = r_tag(r);
    uint64_t n;
    if (is_nil != NULL)
        *is_nil = false;
    if (t == 0xc0 && nil_ok) {
        *is_nil = true;
        return (kl_str){"", 0};
    }
    n = t >= 0xa0 && t <= 0xbf ? (uint64_t)(t & 0x1f)
        : t == 0xd9            ? r_be(r, 1)
        : t == 0xda            ? r_be(r, 2)
        : t == 0xdb            ? r_be(r, 4)
                               : UINT64_MAX;
    if (n > MAX_TEXT)
        r->bad = true;
    const uint8_t *at = r->bad ? NULL : r_take(r, (size_t)n);
    /* Strings become C strings: a NUL inside would cut them short. */
    if (at != NULL && memchr(at, '\0', (size_t)n) != NULL)
        r->bad = true;
    return r->bad ? (kl_str){"", 0} : (kl_str){(const char *)at, (uint32_t)n};
}

/* A bin header: the length of the bytes that follow. */
READER uint64_t r_bin_len(rd *r)
{
    uint8_t t = r_tag(r);
    uint64_t n = t == 0xc4 ? r_be(r, 1) : t == 0xc5 ? r_be(r, 2)
                 : t == 0xc6 ? r_be(r, 4) : UINT64_MAX;
    if (n == UINT64_MAX)
        r->bad = true;
    return r->bad ? 0 : n;
}

READER const uint8_t *r_bin(rd *r, size_t *len)
{
    uint64_t n = r_bin_len(r);
    const uint8_t *at = r->bad ? NULL : r_take(r, (size_t)n);
    *len = at != NULL ? (size_t)n : 0;
    return at;
}

/* The next n bytes into out. From a file, what is not at hand yet is read
 * straight there (an org's history is megabytes: through the buffer it
 * would be fresh memory to fault in and a copy more); the buffer then goes
 * on after those bytes, where nothing points. */
static void r_copy(rd *r, void *out, size_t n)
{
    size_t have = (size_t)(r->end - r->p);
    if (r->file == NULL || r->bad || have >= n) {
        const uint8_t *at = r_take(r, n);
        if (at != NULL)
            memcpy(out, at, n);
        return;
    }
    uint8_t *to = (uint8_t *)out + have;
    size_t rest = n - have;
    if (rest > r->stop - r->next || !kl_snapshot_pread(r->file, to, rest, r->next)) {
        r->bad = true;
        return;
    }
    memcpy(out, r->p, have);
    r->crc = kl_crc32c(r->crc, to, rest);
    r->next += rest;
    r->p = r->end = r->buf + (r->next - r->at);
}

READER void r_fixed(rd *r, void *out, size_t want)
{
    size_t n;
    const uint8_t *b = r_bin(r, &n);
    if (b == NULL || n != want)
        r->bad = true;
    else
        memcpy(out, b, want);
}

READER void r_id(rd *r, kl_id *id) { r_fixed(r, id->b, 16); }

READER void r_ref(rd *r, kl_ref *ref)
{
    ref->type = (kl_principal)r_u(r, KL_PRINCIPAL_SYSTEM);
    r_id(r, &ref->id);
}

/* ---- loading ---------------------------------------------------------- */

typedef struct loader {
    rd r;
    kl_proj *p;
    int rc;                     /* KL_ENOMEM wins over KL_ECORRUPT */
    const char *what;           /* what was being read, for the message */
    /* Loading keys, maybe two loaders at once (each its own half): what
     * they share is read only but for the flow lists, under flows_lock. */
    pthread_mutex_t *flows_lock;
    kl_text_chunk *texts;       /* this loader's key texts */
    kl_org *org;                /* the last org and owner looked up: keys */
    void *owner;                /* come grouped by org, often by owner */
    kl_principal owner_type;
    const kl_flowset *flows;    /* the last key's flow list */
    uint32_t flows_held;        /* keys holding it not yet counted */
    struct key_group *groups;   /* the keys loaded, by org list */
    size_t ngroups, cap_groups;
    uint32_t indexed;           /* keys this loader put in the index */
} loader;

/* Keys in a row that go to one org list (live or deleted), in id order. */
typedef struct key_group {
    kl_vec *list;
    kl_key *first;
    uint32_t n;
} key_group;

static bool bad(loader *l) { return l->r.bad || l->rc != KL_OK; }

static char *dup(loader *l, kl_str s)
{
    char *c = kl_p_str_dup(s);
    if (c == NULL)
        l->rc = KL_ENOMEM;
    return c;
}

/* Appends to a list kept in id order: the snapshot wrote it in order. */
static void push_ordered(loader *l, kl_vec *v, void *item)
{
    if (v->len > 0 && memcmp(((kl_id *)v->items[v->len - 1])->b, ((kl_id *)item)->b,
                             16) >= 0)
        l->r.bad = true;
    else if (kl_p_vec_reserve(v) != KL_OK)
        l->rc = KL_ENOMEM;
    else
        v->items[v->len++] = item;
}

/* Puts a new entity in its index; a duplicate id is damage. The entity is
 * the state's from here on (freed with it). */
static bool put(loader *l, kl_idmap *m, void *entity)
{
    int rc = kl_idmap_add(m, entity);
    if (rc == KL_EEXIST)
        l->r.bad = true;
    else if (rc != KL_OK)
        l->rc = rc;
    return rc == KL_OK;
}

static kl_org *org_of(loader *l, const kl_id *id)
{
    if (l->org != NULL && memcmp(l->org->id.b, id->b, 16) == 0)
        return l->org;
    kl_org *o = kl_idmap_get(&l->p->org_by_id, id);
    if (o == NULL)
        l->r.bad = true;
    else
        l->org = o;
    return o;
}

static void load_org(loader *l)
{
    rd *r = &l->r;
    r_arr(r, 14);
    kl_org *o = calloc(1, sizeof *o);
    if (o == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    r_id(r, &o->id);
    if (bad(l) || !put(l, &l->p->org_by_id, o)) {
        free(o);
        return;
    }
    if (kl_p_vec_reserve(&l->p->orgs) != KL_OK) {
        l->rc = KL_ENOMEM;
        return;
    }
    l->p->orgs.items[l->p->orgs.len++] = o;
    o->name = dup(l, r_s(r, false, NULL));
    o->created_at = r_i(r);
    o->updated_at = r_i(r);
    o->version = r_u(r, UINT64_MAX);
    o->lim_minute = (uint32_t)r_u(r, UINT32_MAX);
    o->lim_day = (uint32_t)r_u(r, UINT32_MAX);
    o->lim_month = (uint32_t)r_u(r, UINT32_MAX);
    uint32_t nf = r_arr_max(r, 1024);
    if (nf > 0 && !bad(l)) {
        o->flow_names = calloc(nf, sizeof *o->flow_names);
        if (o->flow_names == NULL)
            l->rc = KL_ENOMEM;
        o->cap_flow_names = nf;
    }
    for (uint32_t i = 0; i < nf && !bad(l); i++) {
        o->flow_names[i] = dup(l, r_s(r, false, NULL));
        o->nflow_names = i + 1;
    }
    o->used_day_start = r_i(r);
    o->used_day = r_u(r, UINT64_MAX);
    o->used_month_start = r_i(r);
    o->used_month = r_u(r, UINT64_MAX);
    uint64_t n = r_bin_len(r);
    if (bad(l) || n % 8 != 0 || n > r->stop - r_pos(r))
        r->bad = true;
    else if (n > 0) {
        if ((o->history = kl_big_alloc((size_t)n)) == NULL) {
            l->rc = KL_ENOMEM;
            return;
        }
        r_copy(r, o->history, (size_t)n);
        o->history_len = o->history_cap = n / 8;
    }
}

static void load_user(loader *l)
{
    rd *r = &l->r;
    r_arr(r, 9);
    kl_user *u = calloc(1, sizeof *u);
    if (u == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    r_id(r, &u->id);
    if (bad(l) || !put(l, &l->p->user_by_id, u)) {
        free(u);
        return;
    }
    kl_id org;
    r_id(r, &org);
    u->org = org_of(l, &org);
    u->email = dup(l, r_s(r, false, NULL));
    u->name = dup(l, r_s(r, false, NULL));
    u->role = (kl_role)r_u(r, KL_ROLE_GUEST);
    u->removed = r_b(r);
    u->created_at = r_i(r);
    u->updated_at = r_i(r);
    u->version = r_u(r, UINT64_MAX);
    if (u->role == KL_ROLE_NONE)
        r->bad = true;
    if (!bad(l)) {
        push_ordered(l, &u->org->users, u);
        u->org->active_owners += u->role == KL_ROLE_OWNER && !u->removed;
    }
}

static void load_sa(loader *l)
{
    rd *r = &l->r;
    r_arr(r, 13);
    kl_sa *s = calloc(1, sizeof *s);
    if (s == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    r_id(r, &s->id);
    if (bad(l) || !put(l, &l->p->sa_by_id, s)) {
        free(s);
        return;
    }
    kl_id org;
    r_id(r, &org);
    s->org = org_of(l, &org);
    s->name = dup(l, r_s(r, false, NULL));
    s->description = dup(l, r_s(r, false, NULL));
    s->role = (kl_role)r_u(r, KL_ROLE_GUEST);
    s->active = r_b(r);
    s->deleted = r_b(r);
    r_ref(r, &s->created_by);
    s->created_at = r_i(r);
    s->updated_at = r_i(r);
    s->deactivated_at = r_i(r);
    s->version = r_u(r, UINT64_MAX);
    if (!bad(l))
        push_ordered(l, &s->org->sas, s);
}

/* The owner a key's ref names, in the key's org. */
static void *owner_of(loader *l, const kl_org *o, const kl_ref *ref)
{
    void *e = NULL;
    if (l->owner != NULL && l->owner_type == ref->type &&
        memcmp(l->owner, ref->id.b, 16) == 0)
        e = l->owner;           /* an entity begins with its id */
    else if (ref->type == KL_PRINCIPAL_USER)
        e = kl_idmap_get(&l->p->user_by_id, &ref->id);
    else if (ref->type == KL_PRINCIPAL_SA)
        e = kl_idmap_get(&l->p->sa_by_id, &ref->id);
    const kl_org *in = e == NULL                       ? NULL
                       : ref->type == KL_PRINCIPAL_USER ? ((const kl_user *)e)->org
                                                        : ((const kl_sa *)e)->org;
    if (in == NULL || in != o) {
        l->r.bad = true;
        return NULL;
    }
    l->owner = e;
    l->owner_type = ref->type;
    return e;
}

/* The name and description, NUL after each, from the loader's chunks. */
static void key_texts(loader *l, kl_key *k, kl_str name, kl_str desc)
{
    char *t = kl_keys_text(&l->texts, (size_t)name.len + desc.len + 2);
    if (t == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    memcpy(t, name.ptr, name.len);
    t[name.len] = '\0';
    memcpy(t + name.len + 1, desc.ptr, desc.len);
    t[name.len + 1 + desc.len] = '\0';
    k->strings = t;
    k->texts_in_chunk = true;
}

/* The shared list of these flows. Keys in a row often name the same: the
 * loader keeps the last one and counts its new holders without the lock. */
static const kl_flowset *flows_of(loader *l, const kl_str *flows, uint32_t n)
{
    if (n == 0)
        return NULL;
    if (l->flows != NULL && kl_flowset_is(l->flows, flows, n)) {
        l->flows_held++;
        return l->flows;
    }
    const kl_flowset *set = NULL;
    pthread_mutex_lock(l->flows_lock);
    if (l->flows != NULL)
        kl_flowsets_hold(l->flows, l->flows_held);
    if (kl_flowsets_get(&l->p->flowsets, flows, n, &set) != KL_OK)
        l->rc = KL_ENOMEM;
    pthread_mutex_unlock(l->flows_lock);
    l->flows = set;
    l->flows_held = 0;
    return set;
}

/* A loaded key goes into its loader's last group if it follows that
 * group's last key in the same org list, else into a new group: the groups
 * go to the org lists once the loaders are done (join_groups). */
static void place_key(loader *l, kl_key *k)
{
    kl_org *o = kl_key_org(k);
    kl_vec *list = k->deleted ? &o->deleted_keys : &o->keys;
    key_group *g = l->ngroups > 0 ? &l->groups[l->ngroups - 1] : NULL;
    if (g != NULL && g->list == list && g->first + g->n == k) {
        if (memcmp(k[-1].id.b, k->id.b, 16) >= 0)
            l->r.bad = true;    /* a list out of order */
        g->n++;
        return;
    }
    if (l->ngroups == l->cap_groups) {
        size_t cap = l->cap_groups ? 2 * l->cap_groups : 16;
        key_group *more = realloc(l->groups, cap * sizeof *more);
        if (more == NULL) {
            l->rc = KL_ENOMEM;
            return;
        }
        l->groups = more;
        l->cap_groups = cap;
    }
    l->groups[l->ngroups++] = (key_group){list, k, 1};
}

/* Fills k (zeroed, in the snapshot's key block) from the next key. A key
 * that fails stays in the block half filled, in no list or index: the
 * whole state is then freed. */
static void load_key(loader *l, kl_key *k)
{
    rd *r = &l->r;
    r_arr(r, 26);
    r_id(r, &k->id);
    kl_id org;
    r_id(r, &org);
    kl_ref owner;
    r_ref(r, &owner);
    r_ref(r, &k->created_by);
    if (bad(l))
        return;
    kl_org *o = org_of(l, &org);
    k->owner_type = (uint8_t)owner.type;
    k->owner_ptr = o != NULL ? owner_of(l, o, &owner) : NULL;
    kl_str name = r_s(r, false, NULL);
    kl_str desc = r_s(r, false, NULL);
    kl_str prefix = r_s(r, false, NULL);
    k->env = (uint8_t)r_u(r, KL_ENV_TEST);
    k->access = (uint8_t)r_u(r, KL_ACCESS_FLOWS);
    kl_str flows[KL_MAX_FLOWS];
    uint32_t nflows = r_arr_max(r, KL_MAX_FLOWS);
    for (uint32_t i = 0; i < nflows; i++)
        flows[i] = r_s(r, false, NULL);
    if (bad(l) || k->env == KL_ENV_NONE || k->access == KL_ACCESS_NONE) {
        r->bad = true;
        return;
    }
    key_texts(l, k, name, desc);
    k->flows = flows_of(l, flows, nflows);
    kl_p_prefix_set(k, prefix);
    k->rl_minute = (uint32_t)r_u(r, UINT32_MAX);
    k->rl_day = (uint32_t)r_u(r, UINT32_MAX);
    k->created_at = r_i(r);
    k->updated_at = r_i(r);
    k->expires_at = r_i(r);
    k->rotated_at = r_i(r);
    k->last_used_at = r_i(r);
    k->version = (uint32_t)r_u(r, UINT32_MAX);
    r_fixed(r, k->hash, KL_HASH_LEN);
    bool none;
    if (r_peek(r) == 0xc0) {
        r_s(r, true, &none);            /* no grace period */
        r_i(r);
    } else if ((k->aside.grace = malloc(sizeof *k->aside.grace)) == NULL) {
        l->rc = KL_ENOMEM;
        return;
    } else {
        r_fixed(r, k->aside.grace->old_hash, KL_HASH_LEN);
        k->aside.grace->until = r_i(r);
    }
    if (r_peek(r) == 0xc0) {
        r_s(r, true, &none);            /* not revoked */
    } else if (k->aside.grace != NULL) {
        r->bad = true;                  /* revoked in a grace period: never */
        return;
    } else {
        kl_key_revocation *rv = calloc(1, sizeof *rv);
        if (rv == NULL) {
            l->rc = KL_ENOMEM;
            return;
        }
        k->aside.revocation = rv;
        k->revoked = true;
        r_arr(r, 4);
        rv->at = r_i(r);
        r_ref(r, &rv->by);
        kl_str c = r_s(r, true, &none);
        if (!none && !bad(l))
            rv->comment = dup(l, c);
    }
    k->deleted = r_b(r);
    size_t n;
    const uint8_t *u = r_bin(r, &n);
    if (bad(l) || n % 20 != 0) {
        r->bad = true;
        return;
    }
    if (n > 0) {
        k->usage = calloc(1, sizeof *k->usage);
        if (k->usage == NULL || (k->usage->items = malloc(n / 20 * sizeof(kl_usage_bucket))) == NULL) {
            l->rc = KL_ENOMEM;
            return;
        }
        k->usage->len = k->usage->cap = (uint32_t)(n / 20);
        for (uint32_t i = 0; i < k->usage->len; i++) {
            const uint8_t *b = u + (size_t)i * 20;
            uint64_t h = 0;
            uint32_t f[3] = {0, 0, 0};
            for (int j = 7; j >= 0; j--)
                h = h << 8 | b[j];
            for (int j = 0; j < 3; j++)
                for (int x = 3; x >= 0; x--)
                    f[j] = f[j] << 8 | b[8 + 4 * j + x];
            k->usage->items[i] = (kl_usage_bucket){(int64_t)h, f[0], f[1], f[2]};
        }
    }
    place_key(l, k);
}

/* A loader's cursor changes with every value it reads: two runs side by
 * side must not share a cache line. */
typedef struct key_run {
    _Alignas(64) loader l;
    kl_key *keys;
    uint64_t n;
} key_run;

/* A run's keys into the id index (both runs share it). Each insert misses
 * the cache: the slots of the keys INDEX_AHEAD further on are fetched
 * meanwhile, so the misses overlap instead of following one another (the
 * inserts were half of a loader's time when each key went in as it was
 * read). */
enum { INDEX_AHEAD = 16 };

static void index_keys(loader *l, kl_key *keys, uint64_t n)
{
    kl_idmap *m = &l->p->key_by_id;
    uint64_t hash[INDEX_AHEAD];     /* of keys i .. i + INDEX_AHEAD - 1 */
    for (uint64_t i = 0; i < n && i < INDEX_AHEAD; i++)
        hash[i] = kl_idmap_prefetch(m, &keys[i].id);
    for (uint64_t i = 0; i < n && !bad(l); i++) {
        uint64_t h = hash[i % INDEX_AHEAD];
        if (i + INDEX_AHEAD < n)
            hash[i % INDEX_AHEAD] = kl_idmap_prefetch(m, &keys[i + INDEX_AHEAD].id);
        int rc = kl_idmap_add_concurrent(m, &keys[i], h);
        if (rc == KL_EEXIST)
            l->r.bad = true;    /* one id for two keys */
        else if (rc != KL_OK)
            l->rc = rc;
        else
            l->indexed++;
    }
}

static void *load_run(void *arg)
{
    key_run *run = arg;
    for (uint64_t i = 0; i < run->n && !bad(&run->l); i++) {
        r_mark(&run->l.r);
        load_key(&run->l, &run->keys[i]);
    }
    index_keys(&run->l, run->keys, run->n);
    return NULL;
}

/* What a run leaves to the state: its texts and its flow list holders. */
static void end_run(key_run *run)
{
    loader *l = &run->l;
    kl_keys_adopt_texts(&l->p->keys, l->texts);
    l->texts = NULL;
    if (l->flows != NULL)
        kl_flowsets_hold(l->flows, l->flows_held);
    l->flows = NULL;
}

/* Group i of the two runs' groups, a's then b's. */
static const key_group *group_at(const key_run *a, const key_run *b, size_t i)
{
    return i < a->l.ngroups ? &a->l.groups[i] : &b->l.groups[i - a->l.ngroups];
}

/* The runs' groups onto the org lists, after what is there. A list's keys
 * are in a row in the snapshot, so its groups follow one another (from the
 * end of the first run into the second): each list grows once, to its
 * size, and stays in id order (checked where groups meet). */
static void join_groups(loader *l, key_run *a, key_run *b)
{
    size_t n = a->l.ngroups + b->l.ngroups;
    for (size_t i = 0; i < n && !bad(l);) {
        kl_vec *v = group_at(a, b, i)->list;
        uint64_t len = v->len;
        for (size_t j = i; j < n && group_at(a, b, j)->list == v; j++)
            len += group_at(a, b, j)->n;
        if (len > UINT32_MAX || kl_p_vec_grow(v, (uint32_t)len) == NULL) {
            l->rc = KL_ENOMEM;
            break;
        }
        for (; i < n && group_at(a, b, i)->list == v; i++) {
            const key_group *g = group_at(a, b, i);
            if (v->len > 0 && memcmp(((const kl_id *)v->items[v->len - 1])->b,
                                     g->first->id.b, 16) >= 0) {
                l->r.bad = true;
                break;
            }
            for (uint32_t j = 0; j < g->n; j++)
                v->items[v->len++] = g->first + j;
        }
    }
    free(a->l.groups);
    free(b->l.groups);
    a->l.groups = b->l.groups = NULL;
}

/* The n keys, into one block; from `split` (a payload offset, 0: none) on
 * by a second thread with a reader of its own. The first half must end
 * exactly where the second begins, and the loader goes on from where the
 * second ends, with its reader. */
static void load_keys(loader *l, uint64_t n, uint64_t split, uint64_t len)
{
    if (n == 0)
        return;
    rd *r = &l->r;
    if (n > (len - r_pos(r)) / 16 ||
        (split != 0 && (n < 2 || split <= r_pos(r) || split >= len ||
                        (r->file != NULL && r->stop != split)))) {
        r->bad = true;          /* a key takes more than 16 bytes */
        return;
    }
    kl_key *keys = kl_idmap_has_room(&l->p->key_by_id, (uint32_t)n)
                       ? kl_keys_take(&l->p->keys, (uint32_t)n)
                       : NULL;
    if (keys == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    key_run a = {*l, keys, n}, b = a;
    a.l.flows_lock = b.l.flows_lock = &lock;
    if (split != 0) {
        a.n = n / 2;
        b.keys = keys + a.n;
        b.n = n - a.n;
        if (r->file == NULL) {
            a.l.r.end = b.l.r.p = r->buf + split;
        } else if (r_file(&b.l.r, r->file, split, len) != KL_OK) {
            l->rc = KL_ENOMEM;
            return;
        }
    }
    pthread_t t;
    bool apart = split != 0 && pthread_create(&t, NULL, load_run, &b) == 0;
    load_run(&a);
    if (apart)
        pthread_join(t, NULL);
    else if (split != 0)
        load_run(&b);
    kl_keys_settle(&l->p->keys);
    end_run(&a);
    if (split != 0) {
        end_run(&b);
        if (!bad(&a.l) && !r_done(&a.l.r))
            a.l.r.bad = true;   /* the first half is not where the split is */
    }
    pthread_mutex_destroy(&lock);
    l->rc = a.l.rc != KL_OK ? a.l.rc : b.l.rc;
    if (split != 0 && !bad(&a.l)) {
        b.l.r.crc_before = r_crc(&a.l.r);
        r_free(&a.l.r);
        *r = b.l.r;
    } else {
        if (split != 0)
            r_free(&b.l.r);
        *r = a.l.r;
    }
    kl_idmap_count_added(&l->p->key_by_id, a.l.indexed + b.l.indexed);
    join_groups(l, &a, &b);
}

static void load_computer(loader *l)
{
    rd *r = &l->r;
    r_arr(r, 12);
    kl_computer *m = calloc(1, sizeof *m);
    if (m == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    r_id(r, &m->id);
    if (bad(l) || !put(l, &l->p->computer_by_id, m)) {
        free(m);
        return;
    }
    kl_id org;
    r_id(r, &org);
    m->org = org_of(l, &org);
    m->name = dup(l, r_s(r, false, NULL));
    r_ref(r, &m->owner);
    r_ref(r, &m->created_by);
    m->deleted = r_b(r);
    m->created_at = r_i(r);
    m->updated_at = r_i(r);
    m->restarted_at = r_i(r);
    m->version = r_u(r, UINT64_MAX);
    if (!bad(l))
        push_ordered(l, &m->org->computers, m);
}

static void load_session(loader *l)
{
    rd *r = &l->r;
    r_arr(r, 10);
    kl_session *s = calloc(1, sizeof *s);
    if (s == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    r_id(r, &s->id);
    if (bad(l) || !put(l, &l->p->session_by_id, s)) {
        free(s);
        return;
    }
    kl_id org;
    r_id(r, &org);
    s->org = org_of(l, &org);
    bool none;
    kl_str title = r_s(r, true, &none);
    if (!none && !bad(l))
        s->title = dup(l, title);
    r_id(r, &s->computer);
    r_ref(r, &s->created_by);
    s->deleted = r_b(r);
    s->created_at = r_i(r);
    s->updated_at = r_i(r);
    s->version = r_u(r, UINT64_MAX);
    if (!bad(l))
        push_ordered(l, &s->org->sessions, s);
}

static void load_message(loader *l)
{
    rd *r = &l->r;
    r_arr(r, 7);
    kl_id id, sid;
    r_id(r, &id);
    r_id(r, &sid);
    kl_session *s = bad(l) ? NULL : kl_idmap_get(&l->p->session_by_id, &sid);
    if (s == NULL) {
        r->bad = true;
        return;
    }
    kl_message *m = calloc(1, sizeof *m);
    if (m == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    m->id = id;
    m->session = s;
    push_ordered(l, &s->messages, m);   /* the session owns it from here */
    if (bad(l)) {
        free(m);
        return;
    }
    if (!put(l, &l->p->message_by_id, m))
        return;
    m->author = (kl_author)r_u(r, KL_AUTHOR_ASSISTANT);
    r_ref(r, &m->created_by);
    m->created_at = r_i(r);
    m->content = dup(l, r_s(r, false, NULL));
}

static void load_alert(loader *l)
{
    rd *r = &l->r;
    r_arr(r, 12);
    kl_alert *a = calloc(1, sizeof *a);
    if (a == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    r_id(r, &a->id);
    if (bad(l) || !put(l, &l->p->alert_by_id, a)) {
        free(a);
        return;
    }
    kl_id org;
    r_id(r, &org);
    a->org = org_of(l, &org);
    a->type = (kl_alert_type)r_u(r, KL_ALERT_UNUSUAL_ACTIVITY);
    r_id(r, &a->key);
    r_id(r, &a->cond);
    a->details = dup(l, r_s(r, false, NULL));
    a->created_at = r_i(r);
    a->acked = r_b(r);
    a->acked_at = r_i(r);
    r_ref(r, &a->acked_by);
    a->version = r_u(r, UINT64_MAX);
    if (bad(l))
        return;
    kl_id *cond = malloc(sizeof *cond);
    if (cond == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    *cond = a->cond;
    if (!put(l, &l->p->alert_by_cond, cond))
        free(cond);
    push_ordered(l, &a->org->alerts, a);
}

static void load_idem(loader *l)
{
    rd *r = &l->r;
    r_arr(r, 5);
    kl_idem *x = calloc(1, sizeof *x);
    if (x == NULL) {
        l->rc = KL_ENOMEM;
        return;
    }
    r_id(r, &x->slot);
    if (bad(l) || !put(l, &l->p->idem_by_slot, x)) {
        free(x);
        return;
    }
    r_fixed(r, x->fp, sizeof x->fp);
    x->type = (kl_event_type)r_u(r, KL_EV_TYPE_COUNT - 1);
    r_id(r, &x->target);
    x->ts = r_i(r);
}

int kl_proj_snapshot_format(const uint8_t *data, size_t len)
{
    rd r = r_mem(data, len);
    r_arr_max(&r, 64);
    kl_str magic = r_s(&r, false, NULL);
    uint64_t format = r_u(&r, INT32_MAX);
    return !r.bad && magic.len == sizeof MAGIC - 1 &&
                   memcmp(magic.ptr, MAGIC, magic.len) == 0 ? (int)format : 0;
}

/* The state in the len bytes r reads (which it frees). */
static int load(kl_proj **out, rd reader, uint64_t len, uint32_t *crc, kl_err *err)
{
    *out = NULL;
    loader l = {.r = reader, .rc = KL_OK, .what = "header"};
    rd *r = &l.r;
    r_arr(r, 13);
    kl_str magic = r_s(r, false, NULL);
    if (bad(&l) || magic.len != sizeof MAGIC - 1 || memcmp(magic.ptr, MAGIC, magic.len) != 0 ||
        r_u(r, UINT64_MAX) != FORMAT) {
        kl_err_set(err, "not a keyledger state snapshot of format %d", FORMAT);
        r_free(r);
        return KL_ECORRUPT;
    }
    uint64_t seq = r_u(r, UINT64_MAX), n[9];
    for (int i = 0; i < 9; i++)
        n[i] = r_u(r, len);             /* every entity takes bytes */
    uint64_t split = r_u(r, len);
    uint64_t stop = split != 0 ? split : len;   /* the second half's is another's */
    if (r->file != NULL && r->next > stop)
        r->bad = true;
    else if (r->file != NULL)
        r->stop = stop;
    if (bad(&l) || kl_proj_new(&l.p) != KL_OK) {
        kl_err_set(err, "snapshot header: %s", bad(&l) ? "malformed" : "out of memory");
        r_free(r);
        return bad(&l) ? KL_ECORRUPT : KL_ENOMEM;
    }
    static const struct {
        void (*load)(loader *);
        const char *what;
    } KINDS[9] = {
        {load_org, "organizations"}, {load_user, "users"},
        {load_sa, "service accounts"}, {NULL, "keys"},
        {load_computer, "computers"}, {load_session, "sessions"},
        {load_message, "messages"}, {load_alert, "alerts"},
        {load_idem, "idempotency records"}};
    /* Size the indexes once from the counts (an entity takes more than 16
     * bytes, so a header that lies cannot ask for more than the file). */
    kl_idmap *maps[9] = {&l.p->org_by_id, &l.p->user_by_id, &l.p->sa_by_id,
                         &l.p->key_by_id, &l.p->computer_by_id, &l.p->session_by_id,
                         &l.p->message_by_id, &l.p->alert_by_id, &l.p->idem_by_slot};
    for (int k = 0; k < 9; k++)
        if (n[k] <= len / 16 && n[k] <= UINT32_MAX)
            kl_idmap_reserve(maps[k], (uint32_t)n[k]);  /* else: grown as loaded */
    for (int k = 0; k < 9 && !bad(&l); k++) {
        l.what = KINDS[k].what;
        if (KINDS[k].load == NULL)
            load_keys(&l, n[k], split, len);
        for (uint64_t i = 0; KINDS[k].load != NULL && i < n[k] && !bad(&l); i++) {
            r_mark(r);
            KINDS[k].load(&l);
        }
    }
    if (!bad(&l) && (!r_done(r) || r->stop != len)) {
        l.what = "the end";
        r->bad = true;
    }
    uint64_t at = r_pos(r);
    *crc = r_crc(r);
    r_free(r);
    if (bad(&l)) {
        int rc = l.rc != KL_OK ? l.rc : KL_ECORRUPT;
        kl_err_set(err, "snapshot: %s reading %s at byte %llu",
                   rc == KL_ENOMEM ? "out of memory" : "malformed or inconsistent",
                   l.what, (unsigned long long)at);
        kl_proj_free(l.p);
        return rc;
    }
    l.p->seq = seq;
    *out = l.p;
    return KL_OK;
}

int kl_proj_load(kl_proj **out, const uint8_t *data, size_t len, kl_err *err)
{
    uint32_t crc;
    return load(out, r_mem(data, len), len, &crc, err);
}

/* Loads the payload of an open snapshot file, and gives its checksum. The
 * header is in its first bytes: the first piece read stops short of any
 * split (the header is far smaller). */
enum { HEADER_MAX = 4096 };

static int load_file(kl_proj **out, const kl_snapshot_data *file, uint32_t *crc,
                     kl_err *err)
{
    rd r;
    *out = NULL;
    if (r_file(&r, file, 0, file->len) != KL_OK)
        return KL_ENOMEM;
    r.stop = file->len < HEADER_MAX ? file->len : HEADER_MAX;
    return load(out, r, file->len, crc, err);
}

/* ---- starting from a snapshot ------------------------------------------ */

typedef struct tail {
    kl_proj *p;
    uint64_t after;             /* the snapshot's seq (0: none) */
    const uint8_t *hash;        /* its chain hash */
    bool unchained;             /* the next record does not follow it */
    kl_err *err;
} tail;

static int apply_tail(uint64_t seq, const uint8_t *payload, size_t len,
                      const uint8_t *hash, void *arg)
{
    (void)hash;
    tail *t = arg;
    /* The record after the snapshot must name it as its prev (payload
     * bytes 12..43: log/log.c): the snapshot is of this log's history. */
    if (seq == t->after + 1 && t->after > 0 && len >= 44 &&
        memcmp(payload + 12, t->hash, KL_HASH_LEN) != 0) {
        t->unchained = true;
        return 1;
    }
    return kl_proj_apply_record(t->p, payload, len, t->err);
}

/* The state in snapshot `seq` if it is whole and of this log's history. */
static int load_snapshot(kl_proj **out, kl_log *log, const char *dir, uint64_t seq,
                         uint8_t hash[KL_HASH_LEN], kl_err *err)
{
    *out = NULL;
    kl_snapshot_data snap;
    int rc = kl_snapshot_open(dir, seq, &snap, hash, err);
    if (rc != KL_OK)
        return rc;
    kl_proj *p = NULL;
    uint32_t crc;
    rc = load_file(&p, &snap, &crc, err);
    /* A loader stops at the first byte it cannot use: whether the file is
     * damaged or of another make, the checksum of the whole says. */
    bool whole = rc == KL_OK ? crc == snap.crc : rc != KL_ECORRUPT || kl_snapshot_check(&snap);
    kl_snapshot_release(&snap);
    uint8_t head_hash[KL_HASH_LEN];
    kl_log_head_hash(log, head_hash);
    if (!whole) {
        kl_err_set(err, "snapshot of seq %llu: payload checksum does not match",
                   (unsigned long long)seq);
        rc = KL_ECORRUPT;
    } else if (rc == KL_OK && (kl_proj_seq(p) != seq || seq < kl_log_first_seq(log) ||
                               (seq == kl_log_head_seq(log) &&
                                memcmp(head_hash, hash, KL_HASH_LEN) != 0))) {
        /* A snapshot from before the log begins is an older log's (one a
         * compaction replaced), even if its hash is the one this log goes
         * on from. */
        kl_err_set(err, "the snapshot of seq %llu is not of this log's history",
                   (unsigned long long)seq);
        rc = KL_ECORRUPT;
    }
    if (rc != KL_OK) {
        kl_proj_free(p);
        return rc;
    }
    *out = p;
    return KL_OK;
}

int kl_proj_rebuild(kl_proj **out, kl_log *log, const char *dir, const kl_logger *lg,
                    uint64_t *from, kl_err *err)
{
    *out = NULL;
    *from = 0;
    uint64_t seqs[256], seq = 0;
    size_t n;
    uint8_t hash[KL_HASH_LEN];
    kl_proj *p = NULL;
    int rc = kl_snapshot_list(dir, seqs, 256, &n, err);
    if (rc != KL_OK) {
        KL_LOGF(lg, KL_WARN, "not starting from a snapshot (%s)", err->msg);
        n = 0;
    }
    /* Newest first: the first whole one of this log's history. */
    for (size_t i = n; i > 0 && p == NULL; i--) {
        if (seqs[i - 1] > kl_log_head_seq(log))
            continue;
        rc = load_snapshot(&p, log, dir, seqs[i - 1], hash, err);
        if (rc == KL_ENOMEM)
            return rc;
        if (rc == KL_OK)
            seq = seqs[i - 1];
        else
            KL_LOGF(lg, KL_WARN, "ignoring a snapshot: %s", err->msg);
    }
    rc = p != NULL ? KL_OK : KL_ENOENT;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (rc != KL_OK) {
            kl_proj_free(p);
            p = NULL;
            seq = 0;
            if (kl_proj_new(&p) != KL_OK)
                return KL_ENOMEM;
        }
        tail t = {p, seq, hash, false, err};
        rc = kl_log_replay(log, seq + 1, false, apply_tail, &t, err);
        if (!t.unchained)
            break;
        KL_LOGF(lg, KL_WARN, "the snapshot of seq %llu does not chain to the record "
                "after it: replaying the whole log", (unsigned long long)seq);
        rc = KL_ECORRUPT;       /* start over without it */
    }
    if (rc != KL_OK) {
        kl_proj_free(p);
        return rc;
    }
    *out = p;
    *from = seq;
    return KL_OK;
}
