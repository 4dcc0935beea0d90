/*
 * daemon/ — keyledgerd: configuration, startup replay, the command service
 * (validate against the projection, build events, append, apply after the
 * append is durable, answer) and the HTTP handlers of the contract.
 *
 * One libuv loop thread owns the projection and is the only one that frames
 * log records; the only other thread is libuv's pool, which runs the write
 * and fsync of one batch at a time (commit.c).
 */
#ifndef KL_DAEMON_H
#define KL_DAEMON_H

#include <jansson.h>
#include <uv.h>

#include <llhttp.h>

#include "http.h"
#include "log.h"
#include "projections.h"

/* ---- configuration ---------------------------------------------------- */

typedef struct kl_config {
    char data_dir[4096];
    char listen_host[256];
    int listen_port;
    kl_fsync fsync;
    bool allow_query_key;
    char key_prefix[KL_PREFIX_MAX + 1];
    uint64_t segment_bytes;
    kl_http_config http;
    kl_level log_level;
    unsigned usage_flush_ms;    /* how often usage counts are written */
    unsigned verify_failures_per_minute; /* per client address, then 429 */
    /* Alerts: how often keys are looked at, and the thresholds. */
    unsigned alert_check_ms;
    unsigned alert_expiring_s, alert_rotation_live_s, alert_rotation_test_s;
    unsigned alert_unused_s;
    unsigned alert_failed_auth_per_minute;
    unsigned alert_unusual_factor, alert_unusual_min;
} kl_config;

void kl_config_defaults(kl_config *cfg);
/* Applies a JSON config file over cfg. */
int kl_config_load(kl_config *cfg, const char *path, kl_err *err);
/* "HOST:PORT" or "[v6]:PORT". */
int kl_config_listen(kl_config *cfg, const char *text, kl_err *err);
int kl_config_fsync(kl_config *cfg, const char *text, kl_err *err);

/* ---- the daemon ------------------------------------------------------- */

typedef struct kl_cmd kl_cmd;
typedef struct kl_commit kl_commit;
typedef struct kl_idem_cache kl_idem_cache;
typedef struct kl_usage kl_usage;
typedef struct kl_throttle kl_throttle;
typedef struct kl_alerts kl_alerts;
typedef struct kl_metrics kl_metrics;

typedef struct kl_daemon {
    kl_config cfg;
    kl_logger logger;
    uv_loop_t *loop;
    kl_log *log;
    kl_proj *proj;
    kl_commit *commit;
    kl_http_server *http;
    kl_idgen ids;
    kl_idem_cache *idem;
    kl_usage *usage;
    kl_throttle *throttle;      /* failed verifications per address */
    kl_alerts *alerts;
    kl_metrics *metrics;        /* what GET /metrics shows */
    kl_log_reader *reader;      /* audit reads; opened on first use */
    bool ready;                 /* replay done */
    bool stopping;
    uv_signal_t sigterm, sigint;
    uint64_t replay_ns;
    int exit_code;              /* what main returns */
} kl_daemon;

/* Stop serving: stop accepting, finish requests in flight, flush, and
 * exit with `exit_code` (main.c). */
void kl_daemon_stop(kl_daemon *d, int exit_code);

/* ---- the command service (commit.c) ---------------------------------- */

/*
 * A write request on its way to the log. Handlers fill in what the request
 * asked for, the ids of the entities it will change (locks), a decide
 * function and a render function, then call kl_cmd_submit.
 *
 * decide runs when none of the locked ids has an event waiting to become
 * durable, so it sees every earlier write that touches the same entities;
 * it checks the request against the projection and appends events with
 * kl_cmd_event, or answers an error and returns non-zero. After the events
 * are durable and applied, render answers the request. If the write fails,
 * the command service answers 503 itself.
 */
enum { KL_CMD_MAX_LOCKS = 4 };

typedef struct kl_caller {
    kl_key *key;                /* the key that authenticated */
    kl_org *org;
    kl_ref principal;           /* the key's owner */
    kl_role role;               /* the owner's current role */
} kl_caller;

typedef int (*kl_cmd_fn)(kl_daemon *d, kl_cmd *c);

struct kl_cmd {
    kl_cmd *next;               /* in the commit queues */
    kl_http_request *req;       /* NULL for internal writes */
    kl_caller caller;
    kl_id locks[KL_CMD_MAX_LOCKS];
    bool shared[KL_CMD_MAX_LOCKS]; /* reads the entity, does not change it */
    int nlocks;
    kl_cmd_fn decide;
    kl_cmd_fn render;           /* after its events are applied */
    kl_cmd_fn failed;           /* instead, when they cannot be written */
    int64_t now;                /* the time stamped on its events */
    kl_buf events;              /* encoded event bodies, back to back */
    uint32_t *event_ends;       /* where each body ends in events */
    uint32_t nevents, cap_events;
    int result;                 /* of its write, once written */
    const char *why;            /* when that failed: the 503's message */
    /* Idempotency-Key, when the request had one. */
    bool has_idem;
    char idem_key[256];
    kl_id idem_slot;
    uint8_t idem_fp[16];
    /* What the handler parsed, for decide and render. */
    json_t *body;               /* owned */
    kl_id target;
    void *data;                 /* handler's own, freed with free() ... */
    void (*data_free)(void *);  /* ... after this, when set */
    char secret[KL_SECRET_MAX]; /* a new key's secret, shown once */
};

/* Allocates a command for `req` with the caller stamped in. */
kl_cmd *kl_cmd_new(kl_daemon *d, kl_http_request *req, const kl_caller *c);
void kl_cmd_free(kl_cmd *c);
/* Locks: a command that changes an entity takes it exclusively; one that
 * only needs it to stay as it is (a new key needs its owner) shares it, so
 * many such commands go out in one batch. */
void kl_cmd_lock(kl_cmd *c, const kl_id *id);
void kl_cmd_lock_shared(kl_cmd *c, const kl_id *id);
/* Encode one event; fills org, actor, request id, ts and idempotency. */
int kl_cmd_event(kl_daemon *d, kl_cmd *c, kl_event *ev);
/* Takes ownership of c: decides (now or when its locks free up), appends,
 * applies, renders. */
void kl_cmd_submit(kl_daemon *d, kl_cmd *c);

int kl_commit_new(kl_daemon *d, kl_commit **out);
/* Finish what is queued, then call on_done (for shutdown). */
void kl_commit_drain(kl_commit *c, void (*on_done)(kl_daemon *d));
void kl_commit_free(kl_commit *c);
/* Why writes are refused now, or NULL when they are accepted. */
const char *kl_commit_unavailable(const kl_commit *c);

/* ---- usage (usage.c) -------------------------------------------------- */

int kl_usage_new(kl_daemon *d, unsigned interval_ms, kl_usage **out);
/* `n` accepted calls with key k, naming `flow` (empty: none). */
void kl_usage_note(kl_usage *u, kl_key *k, kl_str flow, uint32_t n, int64_t now);
/* One refused call: with key k (NULL when the secret named no key), for
 * an authentication reason (KL_FAIL_NONE when the key was good but the
 * call was not allowed: wrong flow, over a limit). Refusals by reason
 * become AuthFailed events at the flush. */
void kl_usage_refused(kl_usage *u, kl_key *k, kl_fail_reason why, kl_str flow,
                      int64_t now);

/* The tightest of a key's and its org's windows (limit 0: no window). */
typedef struct kl_ratelimit {
    const char *window;         /* "minute", "day", "org-minute", ... */
    uint64_t limit, remaining;
    int64_t reset_at;           /* ms */
} kl_ratelimit;

typedef enum {
    KL_RL_OK = 0,
    KL_RL_RATE,                 /* a per-minute window is full */
    KL_RL_QUOTA                 /* a day or month quota is used up */
} kl_rl_verdict;

/* May k make `cost` more calls now? If so they are taken from every
 * window. *rl describes the tightest window either way. */
kl_rl_verdict kl_usage_admit(kl_usage *u, kl_key *k, uint32_t cost, int64_t now,
                             kl_ratelimit *rl);
/* Write everything counted and not yet written, now (at a clean stop):
 * commands of at most a few hundred events, all submitted before it
 * returns. The interval timer instead spreads each flush over loop turns,
 * one command at a time. */
void kl_usage_flush(kl_usage *u);
void kl_usage_free(kl_usage *u);

/* ---- metrics (metrics.c) ---------------------------------------------- */

/*
 * The numbers GET /metrics shows (Prometheus text format 0.0.4; the
 * families are listed in docs/api-notes.md "Metrics"). Counted only on the
 * loop thread: what is measured on the pool (fsync time) is handed over in
 * the job's after-work callback, so nothing needs atomics. The arrays are
 * sized from the route table once; counting never allocates. Every
 * kl_metrics_* call takes m == NULL and then counts nothing.
 */

/* Verification outcomes: the codes verify.c answers, by outcome index. */
enum { KL_VERIFY_NCODES = 8 };
extern const char *const kl_verify_codes[KL_VERIFY_NCODES];

/* `routes` (borrowed, must outlive the metrics) is the server's table,
 * `start_ms` the wall-clock time the process started. */
int kl_metrics_new(kl_metrics **out, const kl_http_route *routes,
                   int64_t start_ms);
void kl_metrics_free(kl_metrics *m);
/* The HTTP server's observer (kl_http_observer; ctx is the daemon). */
void kl_metrics_observe(const kl_http_request *req, int status,
                        uint64_t duration_ns, void *ctx);
/* One verification answered 200 with kl_verify_codes[outcome]. */
void kl_metrics_verify(kl_metrics *m, int outcome);
/* A batch of `records` records, `bytes` bytes in all, is in the log. */
void kl_metrics_log_batch(kl_metrics *m, uint32_t records, uint64_t bytes);
/* An fsync of the log took `ns` (with --fsync always: the batch's write
 * and its fsync together). */
void kl_metrics_log_fsync(kl_metrics *m, uint64_t ns);
/* A batch could not be framed, written or synced, or a sync failed. */
void kl_metrics_log_error(kl_metrics *m);
/* GET /metrics, without authentication: counts, durations and sizes, no
 * ids and no secrets. */
void kl_h_metrics(kl_http_request *req);

/* ---- verification (verify.c) ------------------------------------------ */

/* Sets up what verification needs (the throttle table, jansson's
 * allocator); once, before serving. */
int kl_verify_init(kl_daemon *d);
void kl_verify_free(kl_daemon *d);

/* ---- alerts (alerts.c) ------------------------------------------------- */

int kl_alerts_new(kl_daemon *d, kl_alerts **out);
void kl_alerts_free(kl_alerts *a);
/* Raises an alert of org for the condition named by cond_text, unless one
 * was raised for it before. Takes `details` (a JSON object). */
void kl_alert_raise(kl_daemon *d, kl_org *org, kl_alert_type type, const kl_key *key,
                    const char *cond_text, json_t *details);
/* `failures` failed attempts this minute with key k (from address addr, or
 * with the key when addr is NULL): a failed_auth_spike when that crosses
 * the threshold. */
void kl_alert_failures(kl_daemon *d, const kl_key *k, const char *addr,
                       uint32_t failures, int64_t now);
void kl_h_alerts_list(kl_http_request *req);
void kl_h_alerts_ack(kl_http_request *req);

/* ---- idempotency (idem.c) -------------------------------------------- */

int kl_idem_cache_new(kl_idem_cache **out);
void kl_idem_cache_free(kl_idem_cache *c);
/* Remember a response (while this process lives). */
void kl_idem_cache_put(kl_idem_cache *c, const kl_id *slot, int status,
                       const char *body, size_t len, int64_t now);
/* A remembered response, or NULL. */
int kl_idem_cache_get(kl_idem_cache *c, const kl_id *slot, int64_t now,
                      const char **body, size_t *len, int *status);

/* Pagination: limit (1..500, default 50) and cursor (an id of `kind`). */
typedef struct kl_page {
    uint32_t limit;
    bool has_cursor;
    kl_id cursor;
} kl_page;

/* ---- handlers (api.c and api_*.c) ------------------------------------- */

extern const kl_http_route kl_routes[];

/* Route handlers (the table is in routes.c). */
void kl_h_healthz(kl_http_request *req);
void kl_h_readyz(kl_http_request *req);
/* GET /openapi.json (api_openapi.c): docs/openapi.json, embedded at build
 * time as these bytes (NUL-terminated; the length leaves the NUL out). */
void kl_h_openapi(kl_http_request *req);
extern const char kl_openapi_json[];
extern const size_t kl_openapi_json_len;
void kl_h_me(kl_http_request *req);
void kl_h_verify(kl_http_request *req);
void kl_h_org(kl_http_request *req);
void kl_h_keys_create(kl_http_request *req);
void kl_h_keys_list(kl_http_request *req);
void kl_h_keys_get(kl_http_request *req);
void kl_h_keys_update(kl_http_request *req);
void kl_h_keys_delete(kl_http_request *req);
void kl_h_keys_regenerate(kl_http_request *req);
void kl_h_keys_revoke(kl_http_request *req);
void kl_h_keys_usage(kl_http_request *req);    /* api_usage.c */
void kl_h_org_usage(kl_http_request *req);
void kl_h_users_invite(kl_http_request *req);
void kl_h_users_list(kl_http_request *req);
void kl_h_users_get(kl_http_request *req);
void kl_h_users_update(kl_http_request *req);
void kl_h_users_remove(kl_http_request *req);
void kl_h_users_keys_create(kl_http_request *req);
void kl_h_users_keys_list(kl_http_request *req);
void kl_h_limits_get(kl_http_request *req);
void kl_h_limits_put(kl_http_request *req);
void kl_h_sa_create(kl_http_request *req);
void kl_h_sa_list(kl_http_request *req);
void kl_h_sa_get(kl_http_request *req);
void kl_h_sa_update(kl_http_request *req);
void kl_h_sa_delete(kl_http_request *req);
void kl_h_sa_keys_create(kl_http_request *req);
void kl_h_sa_keys_list(kl_http_request *req);
void kl_h_computers_create(kl_http_request *req);
void kl_h_computers_list(kl_http_request *req);
void kl_h_computers_get(kl_http_request *req);
void kl_h_computers_restart(kl_http_request *req);
void kl_h_computers_delete(kl_http_request *req);
void kl_h_sessions_create(kl_http_request *req);
void kl_h_sessions_list(kl_http_request *req);
void kl_h_sessions_get(kl_http_request *req);
void kl_h_messages_post(kl_http_request *req);
void kl_h_messages_list(kl_http_request *req);

/* A key for `owner` (POST /v1/api-keys and the per-owner routes). */
void kl_keys_create_for(kl_daemon *d, kl_http_request *req,
                        const kl_caller *caller, const kl_ref *owner);
/* One page of the org's keys, optionally of one owner only. */
void kl_daemon_list_keys(kl_daemon *d, kl_http_request *req, const kl_org *org,
                         const kl_page *pg, bool include_revoked,
                         const kl_ref *owner);

/* Access a handler needs. */
typedef enum {
    KL_NEED_ANY = 0,            /* any valid key (GET /v1/me) */
    KL_NEED_READ,               /* management read: owner/manager, not flows */
    KL_NEED_WRITE,              /* management write: also not read_only */
    KL_NEED_LEVEL = 3,          /* the bits of the three above */
    KL_NEED_UNLIMITED = 4       /* or'ed in: the call is not counted against
                                   the key's and org's limits (the usage
                                   limits themselves, so an org at its quota
                                   can still raise it) */
} kl_need;

/* Authenticates and authorizes; on failure answers the request and returns
 * non-zero. */
int kl_api_auth(kl_daemon *d, kl_http_request *req, kl_need need, kl_caller *c);
/* The key a secret names (NULL if none: bad checksum, unknown id) and, in
 * *why, why it may not be used now (KL_FAIL_NONE: it may). */
kl_key *kl_api_lookup_secret(kl_daemon *d, const char *secret, size_t len,
                             int64_t now, kl_fail_reason *why);
/* Checks Content-Type and parses the body as a JSON object whose keys are
 * all in `allowed` (NULL-terminated). An empty body is {}. Answers the
 * request and returns non-zero on failure. */
int kl_api_body(kl_http_request *req, const char *const *allowed, json_t **out);
/* A member of a flat JSON body (kl_api_flat_body). */
typedef enum { KL_FIELD_ABSENT = 0, KL_FIELD_STRING, KL_FIELD_NUMBER } kl_field_kind;
typedef struct kl_api_field {
    kl_field_kind kind;
    kl_str str;                 /* borrowed from the request body */
    uint64_t num;
} kl_api_field;
/* The hot path's parse: true when the body is a JSON object of allowed,
 * distinct members that are plain ASCII strings (no escapes) or unsigned
 * integers, with out[i] set for allowed[i]; false for anything else, and
 * then kl_api_body reads it (and answers any error). Answers nothing. */
bool kl_api_flat_body(kl_http_request *req, const char *const *allowed,
                      kl_api_field *out);
/* If-Match: "<version>" against `version`; answers 412 and returns non-zero
 * on mismatch, 400 when malformed. */
int kl_api_if_match(kl_http_request *req, uint64_t version);
/* Reads Idempotency-Key into c (and locks its slot); answers 400 and
 * returns non-zero when it is malformed. */
int kl_api_idempotency(kl_cmd *c);
/* Called by the command service before decide: answers a replay (or 422
 * for a different request with the same key) and returns non-zero, or 0
 * when this is the first request with the key. */
int kl_api_idem_replay(kl_daemon *d, kl_cmd *c);
/* Answer a command with `body` (dumped and freed; NULL for 204) and keep the
 * answer for Idempotency-Key replays. */
void kl_cmd_answer(kl_daemon *d, kl_cmd *c, int status, json_t *body);
/* The same with an answer already written as JSON text (NULL for 204). */
void kl_cmd_answer_text(kl_daemon *d, kl_cmd *c, int status, const char *text,
                        size_t len);
/* Starts a write command for req: `data_size` zeroed bytes of handler data
 * in c->data, the body owned, Idempotency-Key read. Answers the request and
 * returns NULL on failure. */
kl_cmd *kl_api_cmd(kl_daemon *d, kl_http_request *req, const kl_caller *caller,
                   json_t *body, size_t data_size);
/* The start every write handler shares: authenticate for writing, the id
 * of kind `target` from the path (KL_ID_KIND_COUNT: none, as for a create),
 * the body (only `fields`), then kl_api_cmd; with a target, it is the
 * command's target and locked. NULL when it answered the request. */
kl_cmd *kl_api_write_cmd(kl_daemon *d, kl_http_request *req, kl_id_kind target,
                         const char *const *fields, size_t data_size);
/* kl_cmd_event for decide functions: answers 503 and returns -1 when the
 * event cannot be built. */
int kl_api_emit(kl_daemon *d, kl_cmd *c, kl_event *ev);
/* May the caller get a new secret for a key of `user` (minting or
 * regenerating)? An owner for anyone, anyone else only for themself: a
 * manager with a key of someone else could borrow a higher role. */
bool kl_api_may_mint_for_user(const kl_caller *c, const kl_id *user);
/* kl_api_emit for an event that makes something new: gives it a fresh id,
 * which becomes the command's target. */
int kl_api_emit_new(kl_daemon *d, kl_cmd *c, kl_event *ev);
/* ?name=true|false into *out (left alone when absent); 400 otherwise. */
int kl_api_query_bool(kl_http_request *req, const char *name, bool *out);
/* Path parameter i as an id of `kind`; answers 404 otherwise. */
int kl_api_path_id(kl_http_request *req, int i, kl_id_kind kind, kl_id *out);

/* Typed body fields: 1 present (in *out), 0 absent, -1 invalid (answered
 * 400 naming `field`). Strings are borrowed from obj. */
int kl_api_get_str(kl_http_request *req, json_t *obj, const char *key,
                   const char *field, size_t min_chars, size_t max_chars,
                   kl_str *out);
/* The same check on a value already in hand (list elements). */
int kl_api_str_value(kl_http_request *req, json_t *v, const char *field,
                     size_t min_chars, size_t max_chars, kl_str *out);
int kl_api_get_uint(kl_http_request *req, json_t *obj, const char *key,
                    const char *field, uint64_t min, uint64_t max, uint64_t *out);
int kl_api_get_time(kl_http_request *req, json_t *obj, const char *key,
                    const char *field, int64_t *out);
/* A nested object's keys must all be in `allowed` ("parent.key" named). */
int kl_api_only_fields(kl_http_request *req, json_t *obj, const char *parent,
                       const char *const *allowed);
void kl_api_bad_arg(kl_http_request *req, const char *field, const char *message);

/* RateLimit-Policy and RateLimit (IETF httpapi draft) for rl, and
 * Retry-After when `retry`, as header lines into out ("" without a
 * window). */
void kl_api_ratelimit_headers(const kl_ratelimit *rl, int64_t now, bool retry,
                              char *out, size_t len);
/* Answers: JSON body (dumped and freed), error. */
void kl_api_json(kl_http_request *req, int status, json_t *body,
                 const char *headers);
void kl_api_error(kl_http_request *req, int status, const char *code,
                  const char *message, const char *field);

int kl_api_page(kl_http_request *req, kl_id_kind kind, kl_page *pg);
/* {"<name>": items, "next_cursor": last id or null} */
json_t *kl_api_page_body(const char *name, json_t *items, kl_id_kind kind,
                         const kl_id *last, bool more);


/* The time used for a request: wall clock in ms. */
int64_t kl_daemon_now(const kl_daemon *d);

/* ---- audit history (audit.c, docs/audit.md) --------------------------- */

/* Sets of categories, as masks of kl_category bits: what a view serves. */
#define KL_AUDIT_CAT(c) (1u << (c))
/* GET /v1/org/control-history: the control plane (people, roles,
 * service accounts, keys, org limits). */
#define KL_AUDIT_CONTROL_PLANE (KL_AUDIT_CAT(KL_CAT_CONTROL) | KL_AUDIT_CAT(KL_CAT_KEYS))
/* GET /v1/audit-events: everything. */
#define KL_AUDIT_ALL (KL_AUDIT_CAT(KL_CAT_CONTROL) | KL_AUDIT_CAT(KL_CAT_KEYS) | \
                      KL_AUDIT_CAT(KL_CAT_USAGE) | KL_AUDIT_CAT(KL_CAT_AUTH) |   \
                      KL_AUDIT_CAT(KL_CAT_ALERTS) | KL_AUDIT_CAT(KL_CAT_RESOURCES))

/* What an audit query asks for; the query string of API.md, parsed. */
typedef struct kl_audit_filter {
    uint32_t categories;        /* KL_AUDIT_CAT mask */
    kl_event_type type;         /* KL_EV_NONE: any */
    bool has_since, has_until;
    int64_t since, until;       /* ms: since <= occurred_at < until */
    bool has_actor;
    kl_ref actor;               /* type KL_PRINCIPAL_SYSTEM for "system" */
    bool has_target;
    kl_id_kind target_kind;
    kl_id target;
    uint64_t cursor;            /* only events below this seq; 0: from the newest */
    uint32_t limit;
    bool jsonl;                 /* format=jsonl */
} kl_audit_filter;

/* One event as the audit API shows it; `hash` is its record's chain hash. */
/* Parses the query string for a view serving `categories` (the category
 * filter may narrow it, not widen it). Answers 400 and returns non-zero
 * on a bad parameter. */
int kl_audit_parse(kl_daemon *d, kl_http_request *req, uint32_t categories,
                   kl_audit_filter *f);
/* Appends to `events` the org's events that pass f, newest first, at most
 * f->limit; *next is the cursor of the next page, 0 on the last. Reads
 * through d->reader. */
int kl_audit_query(kl_daemon *d, const kl_org *org, const kl_audit_filter *f,
                   json_t *events, uint64_t *next, kl_err *err);
/* Parse, query and answer: a whole audit view of `org`, once authorized. */
void kl_audit_serve(kl_daemon *d, kl_http_request *req, const kl_org *org,
                    uint32_t categories);
void kl_h_control_history(kl_http_request *req);
void kl_h_audit_events(kl_http_request *req);
void kl_h_audit_head(kl_http_request *req);

#endif
