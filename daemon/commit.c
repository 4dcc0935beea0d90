/*
 * The command service: from a decided command to a durable, applied event
 * and an answer, with group commit.
 *
 *   submit ──► deferred (an entity it locks has an event not yet applied)
 *     │            │ when that event is applied
 *     ▼            ▼
 *   decide ──► unapplied ──► writer thread: frame every command queued
 *                            since its last batch into one batch, write,
 *                            fsync ──► loop: decode each record, apply,
 *                            render, answer
 *
 * The writer thread takes the next batch the moment it is done with one:
 * everything decided while a batch was on the disk goes out together in
 * the next, so N concurrent writers share one fsync, and the disk never
 * waits for the loop. The loop applies events from the very bytes written,
 * through the same decoder as startup replay, and only once durable: no
 * reader sees a write before it is safe.
 *
 * Framing (seqs, the hash chain) and writing are the writer's alone; the
 * loop owns the state, the queues' order and the answers. They share the
 * `unapplied` queue (the loop appends and pops, under `mu`; the writer
 * reads the commands from `unframed` to the tail it saw under `mu`) and
 * the list of finished batches, handed to the loop by `done_async`.
 *
 * Locks are ids (key, user, org, ...) a command will change. Deciding a
 * command against a state that lacks another command's unapplied event on
 * the same entity could produce events that do not fit (revoking a key
 * twice): such a command waits in `deferred`, in arrival order, until that
 * event is applied.
 */
#include "daemon.h"

#include <assert.h>
#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

enum { SYNC_INTERVAL_MS = 10 };

typedef struct queue {
    kl_cmd *head, *tail;
} queue;

/* One batch the writer finished: what the loop needs to apply and answer. */
typedef struct batch {
    struct batch *next;
    uint32_t ncmds;             /* the first ncmds commands of `unapplied` */
    uint32_t nrecords;
    kl_buf records;             /* framed, as written */
    int rc;
    bool synced;                /* it ended with an fsync ... */
    uint64_t sync_ns;           /* ... of this long (with the write) */
    kl_err err;
} batch;

struct kl_commit {
    kl_daemon *d;
    /* The loop's. */
    queue deferred;
    uv_check_t wake;            /* wakes the writer after I/O polling */
    uv_async_t done_async;
    void (*drain_cb)(kl_daemon *d);
    const char *unavailable;    /* why writes fail now, or NULL */
    /* Shared, under mu (the loop alone changes unapplied's links). */
    uv_mutex_t mu;
    uv_cond_t cv;
    queue unapplied;
    kl_cmd *unframed;           /* the first command no batch holds yet */
    batch *done_head, *done_tail;
    bool stop;                  /* drain: sync if needed and exit when idle */
    /* The writer's. */
    uv_thread_t thread;
    bool running;
    bool dirty;                 /* written but not fsynced (batch/off) */
    uint64_t last_sync_ns;
};

/* ---- queues ----------------------------------------------------------- */

static void q_push(queue *q, kl_cmd *c)
{
    c->next = NULL;
    if (q->tail != NULL)
        q->tail->next = c;
    else
        q->head = c;
    q->tail = c;
}

static kl_cmd *q_pop(queue *q)
{
    kl_cmd *c = q->head;
    if (c != NULL) {
        q->head = c->next;
        if (q->head == NULL)
            q->tail = NULL;
        c->next = NULL;
    }
    return c;
}

static bool shares_lock(const kl_cmd *a, const kl_cmd *b)
{
    for (int i = 0; i < a->nlocks; i++)
        for (int j = 0; j < b->nlocks; j++)
            if (!(a->shared[i] && b->shared[j]) &&
                kl_id_eq(&a->locks[i], &b->locks[j]))
                return true;
    return false;
}

static bool q_conflicts(const queue *q, const kl_cmd *c)
{
    for (const kl_cmd *o = q->head; o != NULL; o = o->next)
        if (shares_lock(o, c))
            return true;
    return false;
}

/* ---- commands --------------------------------------------------------- */

kl_cmd *kl_cmd_new(kl_daemon *d, kl_http_request *req, const kl_caller *caller)
{
    kl_cmd *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->req = req;
    if (caller != NULL)
        c->caller = *caller;
    c->now = kl_daemon_now(d);
    return c;
}

void kl_cmd_free(kl_cmd *c)
{
    if (c == NULL)
        return;
    kl_buf_free(&c->events);
    free(c->event_ends);
    json_decref(c->body);
    if (c->data_free != NULL && c->data != NULL)
        c->data_free(c->data);
    free(c->data);
    /* The secret was in memory only for the answer. */
    OPENSSL_cleanse(c->secret, sizeof c->secret);
    free(c);
}

static void lock(kl_cmd *c, const kl_id *id, bool shared)
{
    for (int i = 0; i < c->nlocks; i++) {
        if (kl_id_eq(&c->locks[i], id)) {
            c->shared[i] = c->shared[i] && shared;
            return;
        }
    }
    /* Handlers take at most a few; running out is a bug, not input. */
    assert(c->nlocks < KL_CMD_MAX_LOCKS);
    c->shared[c->nlocks] = shared;
    c->locks[c->nlocks++] = *id;
}

void kl_cmd_lock(kl_cmd *c, const kl_id *id) { lock(c, id, false); }
void kl_cmd_lock_shared(kl_cmd *c, const kl_id *id) { lock(c, id, true); }

int kl_cmd_event(kl_daemon *d, kl_cmd *c, kl_event *ev)
{
    if (c->nevents == c->cap_events) {
        uint32_t cap = c->cap_events ? c->cap_events * 2 : 4;
        uint32_t *ends = realloc(c->event_ends, cap * sizeof *ends);
        if (ends == NULL)
            return KL_ENOMEM;
        c->event_ends = ends;
        c->cap_events = cap;
    }
    ev->ts = c->now;
    if (c->caller.org != NULL)
        ev->org = c->caller.org->id;
    if (c->caller.key != NULL) {
        ev->actor.type = c->caller.principal.type;
        ev->actor.id = c->caller.principal.id;
        ev->actor.key_id = c->caller.key->id;
    } else if (ev->actor.type == KL_PRINCIPAL_NONE) {
        ev->actor.type = KL_PRINCIPAL_SYSTEM;
    }
    if (c->req != NULL)
        kl_id_parse(KL_ID_REQUEST, c->req->request_id,
                    strlen(c->req->request_id), &ev->request_id);
    if (c->has_idem && c->nevents == 0) {
        ev->has |= KL_F_IDEM;
        ev->idem_key = (kl_str){c->idem_key, (uint32_t)strlen(c->idem_key)};
        memcpy(ev->idem_fp, c->idem_fp, sizeof ev->idem_fp);
    }
    int rc = kl_event_encode(ev, &c->events);
    if (rc == KL_OK)
        c->event_ends[c->nevents++] = (uint32_t)c->events.len;
    return rc;
}

/* The command's events will not be written: say so to whoever waits. */
static void answer_unavailable(kl_daemon *d, kl_cmd *c, const char *why)
{
    if (c->req != NULL)
        kl_api_error(c->req, 503, "unavailable", why, NULL);
    if (c->failed != NULL)
        c->failed(d, c);
}

static void on_wake(uv_check_t *h)
{
    kl_commit *cm = h->data;
    uv_check_stop(h);
    uv_mutex_lock(&cm->mu);
    uv_cond_signal(&cm->cv);
    uv_mutex_unlock(&cm->mu);
}

/* Decide a command whose locks are free. */
static void run(kl_commit *cm, kl_cmd *c)
{
    kl_daemon *d = cm->d;
    /* Idempotency is checked here, not in the handler: an earlier request
     * with the same key (same lock) is durable by now. */
    if ((c->has_idem && kl_api_idem_replay(d, c) != 0) || c->decide(d, c) != 0) {
        kl_cmd_free(c);         /* decide answered the request */
        return;
    }
    if (c->nevents == 0) {      /* nothing to write: answer now */
        if (c->render != NULL)
            c->render(d, c);
        kl_cmd_free(c);
        return;
    }
    uv_mutex_lock(&cm->mu);
    q_push(&cm->unapplied, c);
    if (cm->unframed == NULL)
        cm->unframed = c;
    uv_mutex_unlock(&cm->mu);
    /* The writer, if idle, is woken once the loop has read every socket
     * that was ready: one batch for all of them (Redis's beforeSleep). */
    uv_check_start(&cm->wake, on_wake);
}

void kl_cmd_submit(kl_daemon *d, kl_cmd *c)
{
    kl_commit *cm = d->commit;
    const char *why = kl_commit_unavailable(cm);
    if (why != NULL) {
        answer_unavailable(d, c, why);
        kl_cmd_free(c);
        return;
    }
    if (q_conflicts(&cm->unapplied, c) || q_conflicts(&cm->deferred, c)) {
        q_push(&cm->deferred, c);
        return;
    }
    run(cm, c);
}

/* ---- the writer thread ------------------------------------------------ */

/* Frames the commands from first to last (the writer owns them until the
 * batch is posted) and writes them: fsync per --fsync. */
static void write_batch(kl_commit *cm, batch *b, kl_cmd *first, kl_cmd *last)
{
    kl_daemon *d = cm->d;
    kl_log_mark mark;
    kl_log_mark_get(d->log, &mark);
    int rc = KL_OK;
    for (kl_cmd *c = first;; c = c->next) {
        uint32_t start = 0;
        for (uint32_t i = 0; i < c->nevents && rc == KL_OK; i++) {
            uint64_t seq;
            rc = kl_log_frame(d->log, (const uint8_t *)c->events.data + start,
                              c->event_ends[i] - start, i + 1 < c->nevents,
                              &b->records, &seq);
            start = c->event_ends[i];
        }
        b->ncmds++;
        b->nrecords += c->nevents;
        if (c == last)
            break;
    }
    if (rc != KL_OK) {
        kl_log_rewind(d->log, &mark);
        kl_err_set(&b->err, "framing a batch failed (%d)", rc);
        b->rc = rc;
        return;
    }
    uint64_t t0 = uv_hrtime();
    /* --fsync always: kl_log_write syncs (so its time is the write's and
     * the fsync's together). batch: at most every 10 ms, here or when
     * idle. off: never. */
    b->rc = kl_log_write(d->log, &b->records, &mark, &b->err);
    b->synced = b->rc == KL_OK && d->cfg.fsync == KL_FSYNC_ALWAYS;
    b->sync_ns = uv_hrtime() - t0;
    if (b->rc == KL_OK && d->cfg.fsync == KL_FSYNC_BATCH &&
        uv_hrtime() - cm->last_sync_ns >= SYNC_INTERVAL_MS * 1000000ull) {
        t0 = uv_hrtime();
        b->rc = kl_log_sync(d->log, &b->err);
        b->synced = b->rc == KL_OK;
        b->sync_ns = uv_hrtime() - t0;
    }
    if (b->rc == KL_OK) {
        cm->dirty = !b->synced;
        if (b->synced)
            cm->last_sync_ns = uv_hrtime();
    }
}

/* An fsync of what was written without one (--fsync batch when idle, and
 * at the end). */
static void sync_batch(kl_commit *cm, batch *b)
{
    uint64_t t0 = uv_hrtime();
    b->rc = kl_log_sync(cm->d->log, &b->err);
    b->synced = b->rc == KL_OK;
    b->sync_ns = uv_hrtime() - t0;
    cm->dirty = false;
    cm->last_sync_ns = uv_hrtime();
}

static void writer_main(void *arg)
{
    kl_commit *cm = arg;
    bool may_sync = cm->d->cfg.fsync != KL_FSYNC_OFF;
    uv_mutex_lock(&cm->mu);
    for (;;) {
        kl_cmd *first = cm->unframed, *last = cm->unapplied.tail;
        bool sync_only = false;
        if (first == NULL) {
            bool unsynced = cm->dirty && may_sync;
            if (!unsynced && cm->stop)
                break;
            if (!unsynced) {
                uv_cond_wait(&cm->cv, &cm->mu);
                continue;
            }
            /* --fsync batch: what was written without a sync is synced
             * once it is 10 ms old, and before a stop. */
            uint64_t age = uv_hrtime() - cm->last_sync_ns;
            uint64_t wait = SYNC_INTERVAL_MS * 1000000ull;
            if (!cm->stop && age < wait &&
                uv_cond_timedwait(&cm->cv, &cm->mu, wait - age) == 0)
                continue;       /* woken: look again */
            if (cm->unframed != NULL)
                continue;       /* a batch came meanwhile: it syncs */
            sync_only = true;
        }
        cm->unframed = NULL;    /* the loop's next command starts a batch */
        uv_mutex_unlock(&cm->mu);

        batch *b = calloc(1, sizeof *b);
        if (b == NULL) {
            /* Nothing to post the failure with: wait for memory. */
            uv_sleep(1);
            uv_mutex_lock(&cm->mu);
            if (!sync_only)
                cm->unframed = first;
            continue;
        }
        if (sync_only)
            sync_batch(cm, b);
        else
            write_batch(cm, b, first, last);

        uv_mutex_lock(&cm->mu);
        if (cm->done_tail != NULL)
            cm->done_tail->next = b;
        else
            cm->done_head = b;
        cm->done_tail = b;
        uv_async_send(&cm->done_async);
    }
    uv_mutex_unlock(&cm->mu);
}

/* ---- back on the loop -------------------------------------------------- */

static void fatal_apply(kl_daemon *d, const kl_err *err)
{
    /* The event is durable but the projection refused it: the daemon's
     * state and its log disagree. Serving on would answer from a state the
     * next start will not rebuild: refuse writes and stop. */
    KL_LOGF(&d->logger, KL_ERROR, "applying a written event failed: %s; "
            "stopping", err->msg);
    d->commit->unavailable = "keyledgerd is stopping after an internal error";
    kl_daemon_stop(d, 1);
}

/* Apply the records of the written batch, in order, to the projection. */
static int apply_batch(kl_daemon *d, const kl_buf *records)
{
    size_t off = 0;
    while (off < records->len) {
        const uint8_t *r = (const uint8_t *)records->data + off;
        uint32_t len = (uint32_t)r[0] | (uint32_t)r[1] << 8 |
                       (uint32_t)r[2] << 16 | (uint32_t)r[3] << 24;
        kl_err err;
        if (kl_proj_apply_record(d->proj, r + 8, len, &err) != KL_OK) {
            fatal_apply(d, &err);
            return -1;
        }
        off += 8 + (size_t)len;
    }
    return 0;
}

static void retry_deferred(kl_commit *cm)
{
    queue waiting = cm->deferred;
    cm->deferred = (queue){NULL, NULL};
    kl_cmd *c;
    while ((c = q_pop(&waiting)) != NULL) {
        /* Still blocked by something unapplied, or by an earlier deferred
         * command with a shared lock (keeps arrival order). */
        if (q_conflicts(&cm->unapplied, c) || q_conflicts(&cm->deferred, c))
            q_push(&cm->deferred, c);
        else
            run(cm, c);
    }
}

/* A finished batch: metrics, the log's health, and its commands, applied
 * and moved to `answer`. */
static void batch_done(kl_commit *cm, batch *b, queue *answer)
{
    kl_daemon *d = cm->d;
    int rc = b->rc;
    if (rc != KL_OK) {
        kl_metrics_log_error(d->metrics);
    } else {
        if (b->ncmds > 0)
            kl_metrics_log_batch(d->metrics, b->nrecords, b->records.len);
        if (b->synced)
            kl_metrics_log_fsync(d->metrics, b->sync_ns);
    }
    if (rc == KL_EREADONLY) {
        if (cm->unavailable == NULL)
            KL_LOGF(&d->logger, KL_ERROR, "%s; writes refused until restart",
                    b->err.msg);
        cm->unavailable = "the log is read-only after a failed fsync; "
                          "restart keyledgerd";
    } else if (rc != KL_OK) {
        KL_LOGF(&d->logger, KL_ERROR, "log write failed: %s; answering 503",
                b->err.msg);
    }
    if (rc == KL_OK && b->ncmds > 0 && apply_batch(d, &b->records) != 0)
        rc = KL_EIO;
    const char *why = rc == KL_ENOSPC ? "the log cannot be written: the disk is full"
                      : cm->unavailable != NULL ? cm->unavailable
                                                : "the log cannot be written";
    uv_mutex_lock(&cm->mu);
    for (uint32_t i = 0; i < b->ncmds; i++) {
        kl_cmd *c = q_pop(&cm->unapplied);
        c->result = rc;
        c->why = why;
        q_push(answer, c);
    }
    uv_mutex_unlock(&cm->mu);
}

static void maybe_drained(kl_commit *cm);

static void take_done(kl_commit *cm, queue *answer)
{
    uv_mutex_lock(&cm->mu);
    batch *b = cm->done_head;
    cm->done_head = cm->done_tail = NULL;
    uv_mutex_unlock(&cm->mu);
    while (b != NULL) {
        batch *next = b->next;
        batch_done(cm, b, answer);
        kl_buf_free(&b->records);
        free(b);
        b = next;
    }
}

/* The writer finished batches: apply them, decide what they unblocked
 * (the writer takes it on its next batch), then answer. */
static void on_done(uv_async_t *h)
{
    kl_commit *cm = h->data;
    queue answer = {NULL, NULL};
    take_done(cm, &answer);
    retry_deferred(cm);
    kl_cmd *c;
    while ((c = q_pop(&answer)) != NULL) {
        if (c->result == KL_OK) {
            if (c->render != NULL)
                c->render(cm->d, c);
        } else {
            answer_unavailable(cm->d, c, c->why);
        }
        kl_cmd_free(c);
    }
    maybe_drained(cm);
}

static void stop_writer(kl_commit *cm)
{
    if (!cm->running)
        return;
    uv_mutex_lock(&cm->mu);
    cm->stop = true;
    uv_cond_signal(&cm->cv);
    uv_mutex_unlock(&cm->mu);
    uv_thread_join(&cm->thread);
    cm->running = false;
}

static void maybe_drained(kl_commit *cm)
{
    if (cm->drain_cb == NULL || cm->unapplied.head != NULL || cm->deferred.head != NULL)
        return;
    /* Nothing left to write: the writer syncs what is not yet synced and
     * ends; its last result is only its fsync. */
    stop_writer(cm);
    queue none = {NULL, NULL};
    take_done(cm, &none);
    void (*cb)(kl_daemon *) = cm->drain_cb;
    cm->drain_cb = NULL;
    cb(cm->d);
}

/* ---- lifecycle -------------------------------------------------------- */

int kl_commit_new(kl_daemon *d, kl_commit **out)
{
    kl_commit *cm = calloc(1, sizeof *cm);
    if (cm == NULL)
        return KL_ENOMEM;
    cm->d = d;
    cm->last_sync_ns = uv_hrtime();
    int rc = uv_mutex_init(&cm->mu);
    if (rc != 0) {
        free(cm);
        return rc;
    }
    if ((rc = uv_cond_init(&cm->cv)) != 0) {
        uv_mutex_destroy(&cm->mu);
        free(cm);
        return rc;
    }
    uv_check_init(d->loop, &cm->wake);
    cm->wake.data = cm;
    uv_async_init(d->loop, &cm->done_async, on_done);
    cm->done_async.data = cm;
    *out = cm;      /* kl_commit_free from here on */
    if ((rc = uv_thread_create(&cm->thread, writer_main, cm)) != 0)
        return rc;
    cm->running = true;
    return KL_OK;
}

void kl_commit_drain(kl_commit *cm, void (*cb)(kl_daemon *d))
{
    cm->drain_cb = cb;
    maybe_drained(cm);
}

static void on_async_closed(uv_handle_t *h)
{
    kl_commit *cm = h->data;
    uv_cond_destroy(&cm->cv);
    uv_mutex_destroy(&cm->mu);
    free(cm);
}

static void on_wake_closed(uv_handle_t *h)
{
    kl_commit *cm = h->data;
    uv_close((uv_handle_t *)&cm->done_async, on_async_closed);
}

void kl_commit_free(kl_commit *cm)
{
    if (cm == NULL)
        return;
    stop_writer(cm);
    for (batch *b = cm->done_head, *next; b != NULL; b = next) {
        next = b->next;
        kl_buf_free(&b->records);
        free(b);
    }
    kl_cmd *c;
    while ((c = q_pop(&cm->deferred)) != NULL)
        kl_cmd_free(c);
    while ((c = q_pop(&cm->unapplied)) != NULL)
        kl_cmd_free(c);
    uv_close((uv_handle_t *)&cm->wake, on_wake_closed);
}

const char *kl_commit_unavailable(const kl_commit *cm)
{
    return cm->unavailable;
}
