/*
 * log/ — keyledger's durable event log and the vocabulary every other module
 * speaks: typed ids, timestamps, checksums, the event catalogue and its
 * msgpack codec, and the segment files on disk.
 *
 * The file format is described at the top of log/log.c and in
 * docs/log-format.md; the events in log/event.c and docs/events.md.
 *
 * Threading: a kl_log is used by one thread at a time. The daemon frames
 * records on its loop thread (kl_log_frame) and hands whole batches to a
 * worker thread (kl_log_write); it never frames while a write is running.
 */
#ifndef KL_LOG_H
#define KL_LOG_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- errors --------------------------------------------------------- */

enum {
    KL_OK = 0,
    KL_EIO = -1,        /* read/write/fsync failed: see errno text */
    KL_ENOSPC = -2,     /* disk full or short write: retry later */
    KL_ECORRUPT = -3,   /* damage that is not a torn tail */
    KL_ELOCKED = -4,    /* another process holds the data dir */
    KL_EEXIST = -5,     /* a log already exists where one is created */
    KL_ENOENT = -6,     /* no log in the data dir */
    KL_EINVAL = -7,     /* bad argument or malformed input */
    KL_ENOMEM = -8,
    KL_EREADONLY = -9,  /* an fsync failed earlier: no more writes */
    KL_EUNKNOWN = -10   /* unknown event type or schema version */
};

/* An error message buffer filled where the failure happens. */
typedef struct kl_err {
    char msg[512];
    char segment[32];   /* for damage in the log: where ("" if not) */
    uint64_t offset;
} kl_err;
void kl_err_set(kl_err *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* ---- diagnostics ---------------------------------------------------- */

typedef enum { KL_ERROR = 0, KL_WARN, KL_INFO, KL_DEBUG } kl_level;

typedef struct kl_logger {
    kl_level level;     /* messages above this level are not evaluated */
    void *fp;           /* FILE *; stderr when NULL */
} kl_logger;

void kl_logger_write(const kl_logger *lg, kl_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The level is checked before the arguments are evaluated. */
#define KL_LOGF(lg, lvl, ...)                                                \
    do {                                                                     \
        if ((lg) != NULL && (lvl) <= (lg)->level)                            \
            kl_logger_write((lg), (lvl), __VA_ARGS__);                       \
    } while (0)

/* ---- growable byte buffer -------------------------------------------- */

typedef struct kl_buf {
    char *data;
    size_t len;
    size_t cap;
} kl_buf;

int kl_buf_reserve(kl_buf *b, size_t extra);
int kl_buf_append(kl_buf *b, const void *p, size_t n);
int kl_buf_printf(kl_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void kl_buf_free(kl_buf *b);

/* At the top of main: re-executes the program once with glibc's heaps on
 * transparent huge pages (log/util.c says why); returns if it cannot. */
void kl_use_huge_pages(char **argv);

/* A decimal of 1 to 20 digits (no sign, no spaces) that fits 64 bits. */
bool kl_parse_u64(const char *s, size_t len, uint64_t *out);

/* ---- ids and time ----------------------------------------------------- */

/* A 128-bit time-ordered id (48-bit ms timestamp, 80 random bits), shown as
 * a type prefix plus 26 lowercase Crockford base32 characters. */
typedef struct kl_id {
    uint8_t b[16];
} kl_id;

typedef enum {
    KL_ID_ORG = 0, KL_ID_USER, KL_ID_SA, KL_ID_KEY, KL_ID_ALERT,
    KL_ID_COMPUTER, KL_ID_SESSION, KL_ID_MESSAGE, KL_ID_REQUEST,
    KL_ID_KIND_COUNT
} kl_id_kind;

enum { KL_ID_BODY_LEN = 26, KL_ID_TEXT_MAX = 32 }; /* "sa_" + 26 + NUL fits */

/* Source of ids: monotonic within a millisecond, random from the OS. */
typedef struct kl_idgen {
    int64_t last_ms;
    uint8_t last[10];   /* the random part of the previous id */
} kl_idgen;

void kl_idgen_init(kl_idgen *g);
int kl_id_new(kl_idgen *g, int64_t now_ms, kl_id *out);
bool kl_id_is_zero(const kl_id *id);
bool kl_id_eq(const kl_id *a, const kl_id *b);
int64_t kl_id_time_ms(const kl_id *id);
/* "key_0123…": writes prefix + 26 chars + NUL into out (KL_ID_TEXT_MAX). */
void kl_id_format(kl_id_kind kind, const kl_id *id, char *out);
/* Only the 26 base32 characters (no NUL). */
void kl_id_body(const kl_id *id, char out[KL_ID_BODY_LEN]);
int kl_id_parse_body(const char *s, size_t len, kl_id *out);
/* Parses "<prefix>_<26 chars>" of exactly `kind`; KL_EINVAL otherwise. */
int kl_id_parse(kl_id_kind kind, const char *s, size_t len, kl_id *out);
const char *kl_id_prefix(kl_id_kind kind);

/* RFC 3339 UTC with milliseconds: "2026-01-15T10:30:00.000Z" (24 chars). */
enum { KL_TIME_TEXT_LEN = 24 };
void kl_time_format(int64_t ms, char out[KL_TIME_TEXT_LEN + 1]);
/* Accepts RFC 3339 with optional fraction (up to 9 digits) and Z or
 * +hh:mm / -hh:mm offsets. */
int kl_time_parse(const char *s, size_t len, int64_t *ms_out);
int64_t kl_now_ms(void);
/* UTC windows: the start of the hour, day and month holding `ms`, and the
 * start of the month after it. */
int64_t kl_time_hour_start(int64_t ms);
int64_t kl_time_day_start(int64_t ms);
int64_t kl_time_month_start(int64_t ms);
int64_t kl_time_next_month(int64_t ms);

/* ---- checksums ------------------------------------------------------- */

uint32_t kl_crc32c(uint32_t crc, const void *data, size_t len);
/* The CRC-32C of A then B from the CRC of A, the CRC of B and B's length:
 * pieces checksummed apart (on two threads, say) give the whole's. */
uint32_t kl_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
enum { KL_HASH_LEN = 32 };
void kl_sha256(const void *data, size_t len, uint8_t out[KL_HASH_LEN]);
/* n bytes from a CSPRNG (OpenSSL's, pooled per thread); KL_EIO if it
 * cannot be seeded. */
int kl_random(void *out, size_t n);
void kl_hex(const uint8_t *p, size_t n, char *out); /* 2n chars + NUL */

/* ---- the event catalogue ---------------------------------------------- */

typedef enum {
    KL_EV_NONE = 0,
    KL_EV_ORG_CREATED,
    KL_EV_USER_INVITED,
    KL_EV_USER_UPDATED,
    KL_EV_USER_ROLE_CHANGED,
    KL_EV_USER_REMOVED,
    KL_EV_SA_CREATED,
    KL_EV_SA_UPDATED,
    KL_EV_SA_DEACTIVATED,
    KL_EV_SA_REACTIVATED,
    KL_EV_SA_DELETED,
    KL_EV_KEY_CREATED,
    KL_EV_KEY_UPDATED,
    KL_EV_KEY_REGENERATED,
    KL_EV_KEY_REVOKED,
    KL_EV_KEY_DELETED,
    KL_EV_USAGE_LIMITS_CHANGED,
    KL_EV_USAGE_RECORDED,
    KL_EV_AUTH_FAILED,
    KL_EV_ALERT_RAISED,
    KL_EV_ALERT_ACKNOWLEDGED,
    KL_EV_COMPUTER_CREATED,
    KL_EV_COMPUTER_RESTARTED,
    KL_EV_COMPUTER_DELETED,
    KL_EV_SESSION_CREATED,
    KL_EV_MESSAGE_POSTED,
    KL_EV_SESSION_DELETED,
    KL_EV_LOG_COMPACTED,
    KL_EV_TYPE_COUNT
} kl_event_type;

typedef enum { KL_ROLE_NONE = 0, KL_ROLE_OWNER, KL_ROLE_MANAGER,
               KL_ROLE_MEMBER, KL_ROLE_GUEST } kl_role;
typedef enum { KL_PRINCIPAL_NONE = 0, KL_PRINCIPAL_USER,
               KL_PRINCIPAL_SA, KL_PRINCIPAL_SYSTEM } kl_principal;
typedef enum { KL_ACCESS_NONE = 0, KL_ACCESS_FULL, KL_ACCESS_READ_ONLY,
               KL_ACCESS_FLOWS } kl_access;
typedef enum { KL_ENV_NONE = 0, KL_ENV_LIVE, KL_ENV_TEST } kl_env;
/* Who wrote a session message. */
typedef enum { KL_AUTHOR_NONE = 0, KL_AUTHOR_USER, KL_AUTHOR_ASSISTANT } kl_author;

const char *kl_role_name(kl_role r);
kl_role kl_role_parse(const char *s, size_t len);
const char *kl_principal_name(kl_principal p);
const char *kl_access_name(kl_access a);
kl_access kl_access_parse(const char *s, size_t len);
const char *kl_env_name(kl_env e);
kl_env kl_env_parse(const char *s, size_t len);
const char *kl_author_name(kl_author a);
kl_author kl_author_parse(const char *s, size_t len);

/* A borrowed string: points into a decoded record or a request. */
typedef struct kl_str {
    const char *ptr;
    uint32_t len;
} kl_str;

enum { KL_MAX_FLOWS = 64, KL_MAX_FLOW_LEN = 128 };

/* Which optional body fields an event carries (kl_event.has). */
enum {
    KL_F_ID = 1u << 0,           /* id: the subject (key, user, sa, ...) */
    KL_F_NAME = 1u << 1,
    KL_F_DESCRIPTION = 1u << 2,
    KL_F_EMAIL = 1u << 3,
    KL_F_ROLE = 1u << 4,
    KL_F_OWNER = 1u << 5,        /* owner_type + owner */
    KL_F_HASH = 1u << 6,         /* secret hash */
    KL_F_PREFIX = 1u << 7,
    KL_F_ENV = 1u << 8,
    KL_F_ACCESS = 1u << 9,       /* access + flows */
    KL_F_RATE_LIMIT = 1u << 10,  /* rl_minute, rl_day (0 = none) */
    KL_F_EXPIRES = 1u << 11,     /* expires_at (0 = never) */
    KL_F_GRACE = 1u << 12,       /* old secret valid until grace_until */
    KL_F_COMMENT = 1u << 13,
    KL_F_ACTIVE = 1u << 14,
    KL_F_LIMITS = 1u << 15,      /* org limits: minute, day, month (0 = none) */
    KL_F_IDEM = 1u << 16,        /* idempotency key + request fingerprint */
    KL_F_USAGE = 1u << 17,       /* usage counts of one key over a period */
    KL_F_TITLE = 1u << 18,
    KL_F_REF = 1u << 19,         /* the entity this one belongs to: a
                                    session's computer, a message's session */
    KL_F_CONTENT = 1u << 20,
    KL_F_AUTHOR = 1u << 21,      /* a message's role: user or assistant */
    KL_F_FLOW_USAGE = 1u << 22,  /* usage by flow: flows[i] with counts */
    KL_F_ALERT = 1u << 23,       /* alert type + the condition it is about */
    KL_F_AUTH = 1u << 24,        /* refused authentications by reason */
    KL_F_COMPACT = 1u << 25      /* what a compaction rewrote (LogCompacted) */
};

/* Why an authentication was refused (the 401 never says; the audit does). */
typedef enum {
    KL_FAIL_NONE = 0, KL_FAIL_UNKNOWN_KEY, KL_FAIL_BAD_CHECKSUM,
    KL_FAIL_WRONG_SECRET, KL_FAIL_EXPIRED, KL_FAIL_REVOKED, KL_FAIL_DELETED,
    KL_FAIL_OWNER_DISABLED, KL_FAIL_REASONS
} kl_fail_reason;
const char *kl_fail_reason_name(kl_fail_reason r);

/* What an alert is about (API.md "Alerts"). */
typedef enum {
    KL_ALERT_NONE = 0, KL_ALERT_FAILED_AUTH_SPIKE, KL_ALERT_USAGE_THRESHOLD,
    KL_ALERT_UNUSED_KEY, KL_ALERT_EXPIRING_SOON, KL_ALERT_ROTATION_DUE,
    KL_ALERT_UNUSUAL_ACTIVITY
} kl_alert_type;
const char *kl_alert_type_name(kl_alert_type t);
kl_alert_type kl_alert_type_parse(const char *s, size_t len);

typedef struct kl_actor {
    kl_principal type;
    kl_id id;           /* zero for the system */
    kl_id key_id;       /* the key that authenticated, zero if none */
} kl_actor;

/*
 * One decoded event. Strings are borrowed from the record it was decoded
 * from (or from the caller that built it); copy what you keep.
 */
typedef struct kl_event {
    uint64_t seq;
    int64_t ts;                 /* ms since epoch; the only clock apply sees */
    kl_event_type type;
    uint32_t version;           /* schema version of this type */
    kl_id org;
    kl_actor actor;
    kl_id request_id;           /* zero if none */
    uint32_t has;               /* KL_F_* */
    kl_id id;
    kl_str name, description, email, comment, prefix, title, content;
    kl_id ref;
    kl_author author;
    /* AuthFailed: refusals between usage_from and usage_to by reason. */
    uint32_t auth_counts[KL_FAIL_REASONS];
    kl_alert_type alert;        /* AlertRaised: its type ... */
    kl_id cond;                 /* ... and a hash naming its condition */
    kl_role role;
    kl_principal owner_type;
    kl_id owner;
    uint8_t hash[KL_HASH_LEN];
    kl_env env;
    kl_access access;
    kl_str flows[KL_MAX_FLOWS];
    uint32_t nflows;
    uint32_t rl_minute, rl_day;
    uint32_t lim_minute, lim_day, lim_month;
    int64_t expires_at;
    int64_t grace_until;
    bool active;
    kl_str idem_key;
    uint8_t idem_fp[16];        /* fingerprint of the request body */
    /* UsageRecorded: calls with the key between from and to (ms): accepted
     * (successes) and refused (failures: wrong secret, expired, revoked,
     * owner disabled), and the last accepted use (0 = none in the period). */
    int64_t usage_from, usage_to, last_used;
    uint32_t successes, failures;
    /* ... and by flow (KL_F_FLOW_USAGE, version 2): the calls that named
     * flows[i] (names in `flows`, nflows of them). */
    uint32_t flow_successes[KL_MAX_FLOWS], flow_failures[KL_MAX_FLOWS];
    /* LogCompacted: the old log ended at through_seq with chain hash
     * through_hash (the new one goes on from there); UsageRecorded events
     * that ended before `cutoff` (folded of them) became `totals` daily
     * totals. */
    struct {
        uint64_t through_seq;
        uint8_t through_hash[KL_HASH_LEN];
        int64_t cutoff;
        uint64_t folded, totals;
    } compact;
} kl_event;

typedef enum {
    KL_CAT_CONTROL = 0, KL_CAT_KEYS, KL_CAT_USAGE, KL_CAT_AUTH,
    KL_CAT_ALERTS, KL_CAT_RESOURCES
} kl_category;

const char *kl_event_type_name(kl_event_type t);
kl_event_type kl_event_type_parse(const char *s, size_t len);
kl_category kl_event_category(kl_event_type t);
const char *kl_category_name(kl_category c);

/* A payload's fixed prefix (array header, seq, prev, more): what
 * kl_log_frame writes in front of what kl_event_encode wrote. A record's
 * payload past these bytes can be framed again as is. */
enum { KL_RECORD_PREFIX_LEN = 45 };

/* Envelope fields of a record's payload, before the body. */
typedef struct kl_record_head {
    uint64_t seq;
    uint8_t prev[KL_HASH_LEN];  /* chain hash of the record before */
    bool more;                  /* the next record is of the same command */
} kl_record_head;

/*
 * Encode the event's type, version, envelope and body (everything but seq,
 * prev and more, which kl_log_frame adds) into `out` (appended). ev->seq is
 * ignored.
 */
int kl_event_encode(const kl_event *ev, kl_buf *out);
/*
 * Decode one record payload. Strings in `ev` point into `payload`, which
 * must outlive `ev`. Every length and count is bounded; KL_EUNKNOWN for a
 * type or version this build does not know, KL_ECORRUPT for anything else
 * malformed (with a message in err).
 */
int kl_event_decode(const uint8_t *payload, size_t len, kl_record_head *head,
                    kl_event *ev, kl_err *err);

/* ---- API key secrets ---------------------------------------------------- */

/*
 * "<prefix>_<env>_<key id: 26 base32><random: 40 base62><crc: 6 base62>",
 * the crc being CRC-32 (zlib's) of every character before it, written in
 * base62 most significant digit first, zero-padded. Only SHA-256 of the
 * whole string is ever stored.
 */
enum { KL_SECRET_RANDOM_LEN = 40, KL_SECRET_MAX = 128, KL_PREFIX_MAX = 16,
       KL_DISPLAY_PREFIX_LEN = 16 };

/* Makes a new secret for `key_id` into out (KL_SECRET_MAX, NUL-terminated),
 * its hash, and the display prefix (first 16 characters + NUL). */
int kl_secret_new(const char *prefix, kl_env env, const kl_id *key_id,
                  char out[KL_SECRET_MAX], uint8_t hash[KL_HASH_LEN],
                  char display[KL_DISPLAY_PREFIX_LEN + 1]);
/* Checks shape and checksum without any lookup; gives the key id and env.
 * KL_EINVAL for anything that is not a well-formed secret of `prefix` (of
 * any prefix of 1-16 characters a-z0-9 when NULL: keys made before the
 * product prefix was changed keep working). */
int kl_secret_parse(const char *s, size_t len, const char *prefix,
                    kl_id *key_id, kl_env *env);

/* ---- the log on disk -------------------------------------------------- */

typedef enum { KL_FSYNC_ALWAYS = 0, KL_FSYNC_BATCH, KL_FSYNC_OFF } kl_fsync;

typedef struct kl_log_config {
    const char *dir;
    uint64_t segment_bytes;     /* roll after this many bytes (64 MiB) */
    kl_fsync fsync;
    bool read_only;             /* replay/verify/state: no lock, no writes */
    uint64_t room_bytes;        /* zeros written ahead of the records this
                                   many bytes at a time (log.c, "Room"):
                                   a sync then does not change the file's
                                   size. 0: none (the tools) */
    const kl_logger *logger;
} kl_log_config;

void kl_log_config_defaults(kl_log_config *cfg);

typedef struct kl_log kl_log;

/* What opening found and did. */
typedef struct kl_log_recovery {
    uint64_t records;           /* records found intact */
    uint64_t torn_bytes;        /* cut from the tail (0 if none) */
    char torn_segment[32];      /* segment file that was cut */
    uint64_t torn_offset;       /* offset of the cut */
} kl_log_recovery;

/* Create an empty log in `dir` (made if missing). KL_EEXIST if one exists. */
int kl_log_create(const kl_log_config *cfg, kl_err *err);
/* ... one whose first record will be seq + 1, chained to `hash` (the chain
 * head it goes on from): what compaction writes. */
int kl_log_create_after(const kl_log_config *cfg, uint64_t seq,
                        const uint8_t hash[KL_HASH_LEN], kl_err *err);

/*
 * Open the log: lock the dir (unless read_only), check every segment, cut a
 * torn tail of the last one (unless read_only: then it is just reported),
 * and leave the log ready to append after the last record.
 */
int kl_log_open(kl_log **out, const kl_log_config *cfg, kl_log_recovery *rec,
                kl_err *err);
void kl_log_close(kl_log *log);

/* Called for every record in order during kl_log_replay. `payload` is valid
 * only during the call. Return 0 to go on, anything else to stop with it. */
typedef int (*kl_log_record_fn)(uint64_t seq, const uint8_t *payload,
                                size_t len, const uint8_t hash[KL_HASH_LEN],
                                void *arg);

/*
 * Feed every record with seq >= from_seq to fn. When `with_hashes` is true
 * each record's chain hash is computed and checked against the next record's
 * prev (verify, audit); when false only CRCs and sequence are checked and
 * `hash` is NULL (startup replay).
 */
int kl_log_replay(kl_log *log, uint64_t from_seq, bool with_hashes,
                  kl_log_record_fn fn, void *arg, kl_err *err);

uint64_t kl_log_head_seq(const kl_log *log);
/* The seq the log begins at: 1, or one past the head a compaction went on
 * from. */
uint64_t kl_log_first_seq(const kl_log *log);
void kl_log_head_hash(const kl_log *log, uint8_t out[KL_HASH_LEN]);

/*
 * Writing is two steps so that the costly part can run off the loop:
 * kl_log_frame appends one framed record (header + payload with seq and
 * prev, CRC) to `batch` and advances the in-memory head; kl_log_write writes
 * the batch at the end of the last segment, rolls segments, and syncs per
 * policy. If kl_log_write fails, the file is cut back to where the batch
 * began and the head rewinds to `batch_start` (from kl_log_mark).
 *
 * `more` says the next record belongs to the same command: a command's
 * records are framed into one batch, all but the last with more = true, and
 * recovery keeps all of them or none.
 */
typedef struct kl_log_mark {
    uint64_t seq;
    uint8_t hash[KL_HASH_LEN];
} kl_log_mark;

void kl_log_mark_get(const kl_log *log, kl_log_mark *m);
int kl_log_frame(kl_log *log, const uint8_t *body, size_t body_len, bool more,
                 kl_buf *batch, uint64_t *seq_out);
/* kl_event_encode + kl_log_frame, for writers that hold the event whole
 * (the tools). */
int kl_log_frame_event(kl_log *log, const kl_event *ev, bool more, kl_buf *batch);
int kl_log_write(kl_log *log, const kl_buf *batch, const kl_log_mark *start,
                 kl_err *err);
/* Forget records framed since `m` without writing them. */
void kl_log_rewind(kl_log *log, const kl_log_mark *m);
/* fdatasync the last segment (for --fsync batch, on a timer). A failure
 * makes the log read-only: KL_EREADONLY from then on. */
int kl_log_sync(kl_log *log, kl_err *err);
/* After KL_EREADONLY, every write fails until the log is reopened. */
bool kl_log_is_read_only(const kl_log *log);

/* Checks everything: framing, CRC, seq, prev links, the chain. */
typedef struct kl_log_verify_report {
    uint64_t events;
    uint64_t head_seq;
    uint8_t head_hash[KL_HASH_LEN];
    bool ok;
    uint64_t torn_bytes;        /* an unfinished tail the daemon will cut */
    char segment[32];           /* where the first problem is */
    uint64_t offset;
    char problem[512];
} kl_log_verify_report;
/* `check` (optional) sees every record after its framing and chain link
 * passed; non-zero from it stops the walk as damage at that record. */
int kl_log_verify(const char *dir, kl_log_record_fn check, void *arg,
                  kl_log_verify_report *rep, kl_err *err);

/* ---- reading records by seq (reader.c) ---------------------------------- */

/*
 * Random access for the audit queries: read-only descriptors of its own, no
 * LOCK, so it works while the daemon writes. Ask only for seqs known to be
 * written (the daemon: applied ones); the index never goes past the seq
 * asked for, so records a failed write later cuts back are never in it.
 */
typedef struct kl_log_reader kl_log_reader;
int kl_log_reader_open(const char *dir, kl_log_reader **out, kl_err *err);
void kl_log_reader_close(kl_log_reader *r);   /* NULL is a no-op */
/* The payload of record `seq` (copied into *payload, replaced) and its chain
 * hash (SHA-256 of the payload; hash may be NULL to skip it). KL_ENOENT when
 * seq is past the end (or before the start), KL_ECORRUPT with the segment
 * and offset in err when the record's framing or CRC is bad. */
int kl_log_reader_get(kl_log_reader *r, uint64_t seq, kl_buf *payload,
                      uint8_t hash[KL_HASH_LEN], kl_err *err);

/* ---- compaction (docs/log-format.md) ----------------------------------- */

/*
 * Switching a data dir to a rewritten log, all or nothing. The caller holds
 * the dir's lock (an open kl_log) throughout:
 *   kl_log_compact_prepare  empties and makes DATA/compact.tmp and returns
 *                           its path (malloc'd; NULL with err set) for the
 *                           new log (kl_log_create_after), its snapshot;
 *   kl_log_compact_commit   makes it the log (the atomic step), then
 *                           finishes the switch.
 * kl_log_open (as writer) finishes a switch a crash interrupted and throws
 * away a compact.tmp that was never committed; read-only opens refuse while
 * a committed switch is unfinished.
 */
char *kl_log_compact_prepare(const char *data, kl_err *err);
/* Throws away compact.tmp after a failure before the commit. */
void kl_log_compact_abandon(const char *data);
int kl_log_compact_commit(const char *data, const kl_logger *lg, kl_err *err);
int kl_log_compact_finish(const char *data, const kl_logger *lg, kl_err *err);

/* ---- snapshots (docs/log-format.md) ---------------------------------- */

/* Writes the state's bytes as the snapshot of record `seq` whose chain hash
 * is `hash` (atomically: temp, fsync, rename, fsync the dir). */
int kl_snapshot_write(const char *dir, uint64_t seq, const uint8_t hash[KL_HASH_LEN],
                      const void *payload, size_t len, kl_err *err);
/* A snapshot file: its header checked, its payload still in the file
 * (kl_snapshot_open) or mapped read-only (kl_snapshot_read: data). */
typedef struct kl_snapshot_data {
    const uint8_t *data;        /* NULL until read */
    size_t len;
    uint32_t crc;               /* what the header says the payload's is */
    int fd;
    bool opened;                /* fd is the file's */
    void *map;                  /* the mapping (private) */
    size_t map_len;
} kl_snapshot_data;
/* Opens snapshot `seq` and checks its header; the payload is left in the
 * file for kl_snapshot_pread, and its checksum to whoever reads it (a
 * loader checksums each piece as it reads it: see kl_crc32c_combine).
 * KL_ECORRUPT when the header is not whole. Release what it gave with
 * kl_snapshot_release (a zeroed kl_snapshot_data is fine to release). */
int kl_snapshot_open(const char *dir, uint64_t seq, kl_snapshot_data *out,
                     uint8_t hash[KL_HASH_LEN], kl_err *err);
/* n bytes of the payload from offset off: false if they are not all there
 * (an I/O error, or the file was cut since it was opened). */
bool kl_snapshot_pread(const kl_snapshot_data *s, void *buf, size_t n, uint64_t off);
/* Whether the payload matches its checksum (read from the file in pieces
 * if it is not in memory). */
bool kl_snapshot_check(const kl_snapshot_data *s);
/* kl_snapshot_open, then the payload mapped and checked (KL_ECORRUPT,
 * released, when it is not whole). */
int kl_snapshot_read(const char *dir, uint64_t seq, kl_snapshot_data *out,
                     uint8_t hash[KL_HASH_LEN], kl_err *err);
void kl_snapshot_release(kl_snapshot_data *s);
/* The seqs of the snapshot files in dir (at most max), ascending. */
int kl_snapshot_list(const char *dir, uint64_t *seqs, size_t max, size_t *n,
                     kl_err *err);

#endif
