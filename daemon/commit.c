/*
 * The command service: from a decided command to a durable, applied event
 * and an answer, with group commit.
 *
 *   submit ──► deferred (an entity it locks has an event not yet durable)
 *     │            │ when that event is applied
 *     ▼            ▼
 *   decide ──► pending ──► (no job running) frame all pending into one
 *                          batch ──► pool thread: write + fsync ──► loop:
 *                          decode each record, apply, send the next
 *                          batch, then render and answer
 *
 * Only one job (write or sync) runs at a time; everything decided while it
 * runs waits in `pending` and goes out in the next batch, so N concurrent
 * writers share one fsync. Events are applied from the very bytes written,
 * through the same decoder as startup replay, and only once durable: no
 * reader sees a write before it is safe.
 *
 * Locks are ids (key, user, org, ...) a command will change. Deciding a
 * command against a state that lacks another command's pending event on the
 * same entity could produce events that do not fit (revoking a key twice):
 * such a command waits in `deferred`, in arrival order, until that event is
 * applied.
 */
#include "daemon.h"

#include <assert.h>
#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

enum { SYNC_INTERVAL_MS = 10 };

typedef enum { JOB_WRITE, JOB_SYNC } job_kind;

typedef struct queue {
    kl_cmd *head, *tail;
} queue;

struct kl_commit {
    kl_daemon *d;
    uv_work_t work;
    bool busy;                  /* a job runs on the pool */
    job_kind job;
    queue deferred, pending, inflight;
    kl_buf batch;               /* framed records of the inflight batch */
    kl_log_mark mark;           /* the head before the batch */
    int result;
    bool synced;                /* the job ended with an fsync */
    uint64_t sync_ns;           /* how long that fsync took (measured on the
                                   pool, counted on the loop) */
    uint32_t nrecords;          /* records in the inflight batch */
    kl_err err;
    bool dirty;                 /* written but not fsynced (batch/off) */
    uint64_t last_sync_ns;
    uv_timer_t sync_timer;
    uv_check_t seal;            /* frames pending commands after I/O polling */
    void (*drain_cb)(kl_daemon *d);
    const char *unavailable;    /* why writes fail now, or NULL */
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

static bool q_conflicts(const queue *q, const kl_cmd *c, const kl_cmd *stop)
{
    for (const kl_cmd *o = q->head; o != NULL && o != stop; o = o->next)
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

static void kick(kl_commit *cm);

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
    q_push(&cm->pending, c);
    kick(cm);
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
    if (q_conflicts(&cm->inflight, c, NULL) || q_conflicts(&cm->pending, c, NULL) ||
        q_conflicts(&cm->deferred, c, NULL)) {
        q_push(&cm->deferred, c);
        return;
    }
    run(cm, c);
}

/* ---- jobs ------------------------------------------------------------- */

static void on_work(uv_work_t *w)
{
    kl_commit *cm = w->data;
    kl_daemon *d = cm->d;
    uint64_t t0 = uv_hrtime();
    cm->synced = false;
    if (cm->job == JOB_SYNC) {
        cm->result = kl_log_sync(d->log, &cm->err);
        cm->synced = true;
        cm->sync_ns = uv_hrtime() - t0;
        return;
    }
    /* --fsync always: kl_log_write syncs (so its time is the write's and
     * the fsync's together). batch: at most every 10 ms, here or on the
     * timer. off: never. */
    cm->result = kl_log_write(d->log, &cm->batch, &cm->mark, &cm->err);
    cm->synced = d->cfg.fsync == KL_FSYNC_ALWAYS;
    cm->sync_ns = uv_hrtime() - t0;
    if (cm->result == KL_OK && d->cfg.fsync == KL_FSYNC_BATCH &&
        uv_hrtime() - cm->last_sync_ns >= SYNC_INTERVAL_MS * 1000000ull) {
        t0 = uv_hrtime();
        cm->result = kl_log_sync(d->log, &cm->err);
        cm->synced = true;
        cm->sync_ns = uv_hrtime() - t0;
    }
}

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
static int apply_batch(kl_daemon *d, const kl_buf *batch)
{
    size_t off = 0;
    while (off < batch->len) {
        const uint8_t *r = (const uint8_t *)batch->data + off;
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

static void start_job(kl_commit *cm, job_kind job);
static void seal(kl_commit *cm);

static void retry_deferred(kl_commit *cm)
{
    queue waiting = cm->deferred;
    cm->deferred = (queue){NULL, NULL};
    kl_cmd *c;
    while ((c = q_pop(&waiting)) != NULL) {
        /* Still blocked by something pending, or by an earlier deferred
         * command with a shared lock (keeps arrival order). */
        if (q_conflicts(&cm->inflight, c, NULL) ||
            q_conflicts(&cm->pending, c, NULL) ||
            q_conflicts(&cm->deferred, c, NULL))
            q_push(&cm->deferred, c);
        else
            run(cm, c);
    }
}

static void maybe_drained(kl_commit *cm)
{
    if (cm->drain_cb == NULL || cm->busy || cm->pending.head != NULL ||
        cm->deferred.head != NULL)
        return;
    if (cm->dirty && cm->d->cfg.fsync != KL_FSYNC_OFF &&
        kl_commit_unavailable(cm) == NULL) {
        start_job(cm, JOB_SYNC);
        return;
    }
    void (*cb)(kl_daemon *) = cm->drain_cb;
    cm->drain_cb = NULL;
    cb(cm->d);
}

static void on_work_done(uv_work_t *w, int status)
{
    kl_commit *cm = w->data;
    kl_daemon *d = cm->d;
    cm->busy = false;
    int rc = status == 0 ? cm->result : KL_EIO;

    if (rc != KL_OK) {
        kl_metrics_log_error(d->metrics);
    } else {
        if (cm->job == JOB_WRITE)
            kl_metrics_log_batch(d->metrics, cm->nrecords, cm->batch.len);
        if (cm->synced)
            kl_metrics_log_fsync(d->metrics, cm->sync_ns);
    }

    if (rc == KL_OK && cm->synced) {
        cm->dirty = false;
        cm->last_sync_ns = uv_hrtime();
    } else if (rc == KL_OK) {
        cm->dirty = true;
    }
    if (rc == KL_EREADONLY) {
        cm->unavailable = "the log is read-only after a failed fsync; "
                          "restart keyledgerd";
        KL_LOGF(&d->logger, KL_ERROR, "%s; writes refused until restart",
                cm->err.msg);
    } else if (rc != KL_OK) {
        KL_LOGF(&d->logger, KL_ERROR, "log write failed: %s; answering 503",
                cm->err.msg);
    }

    /* The batch is applied, the commands it unblocks are decided, and the
     * next batch goes to the disk before the answers to this one are
     * written: the disk works while the loop answers. */
    queue done = {NULL, NULL};
    if (cm->job == JOB_WRITE) {
        if (rc == KL_OK && apply_batch(d, &cm->batch) != 0)
            rc = KL_EIO;
        done = cm->inflight;
        cm->inflight = (queue){NULL, NULL};
        cm->batch.len = 0;
    }
    retry_deferred(cm);
    seal(cm);
    const char *why = rc == KL_ENOSPC ? "the log cannot be written: the disk is full"
                      : cm->unavailable != NULL ? cm->unavailable
                                                : "the log cannot be written";
    kl_cmd *c;
    while ((c = q_pop(&done)) != NULL) {
        if (rc == KL_OK) {
            if (c->render != NULL)
                c->render(d, c);
        } else {
            answer_unavailable(d, c, why);
        }
        kl_cmd_free(c);
    }
    kick(cm);
    maybe_drained(cm);
}

static void start_job(kl_commit *cm, job_kind job)
{
    cm->job = job;
    cm->busy = true;
    cm->work.data = cm;
    int rc = uv_queue_work(cm->d->loop, &cm->work, on_work, on_work_done);
    if (rc != 0) {
        /* Cannot happen with a valid loop; answer rather than hang. */
        cm->busy = false;
        cm->result = KL_EIO;
        kl_err_set(&cm->err, "uv_queue_work: %s", uv_strerror(rc));
        on_work_done(&cm->work, 0);
    }
}

/* Frame everything pending into one batch and write it. Called when a job
 * ends (what waited for it goes at once) and from the check phase, after
 * the loop has read every socket that was ready, so a batch holds all the
 * writes that arrived meanwhile (Redis does the same in beforeSleep). */
static void on_seal(uv_check_t *h)
{
    uv_check_stop(h);
    seal(h->data);
}

static void seal(kl_commit *cm)
{
    if (cm->busy || cm->pending.head == NULL)
        return;
    kl_daemon *d = cm->d;
    kl_log_mark_get(d->log, &cm->mark);
    cm->batch.len = 0;
    cm->nrecords = 0;
    int rc = KL_OK;
    for (kl_cmd *c = cm->pending.head; c != NULL && rc == KL_OK; c = c->next) {
        uint32_t start = 0;
        for (uint32_t i = 0; i < c->nevents && rc == KL_OK; i++) {
            uint64_t seq;
            rc = kl_log_frame(d->log, (const uint8_t *)c->events.data + start,
                              c->event_ends[i] - start, i + 1 < c->nevents,
                              &cm->batch, &seq);
            if (i == 0)
                c->first_seq = seq;
            start = c->event_ends[i];
        }
        cm->nrecords += c->nevents;
    }
    cm->inflight = cm->pending;
    cm->pending = (queue){NULL, NULL};
    if (rc != KL_OK) {
        kl_log_rewind(d->log, &cm->mark);
        cm->result = rc;
        kl_err_set(&cm->err, "framing a batch failed (%d)", rc);
        cm->job = JOB_WRITE;
        on_work_done(&cm->work, 0);
        return;
    }
    start_job(cm, JOB_WRITE);
}

static void kick(kl_commit *cm)
{
    if (!cm->busy && cm->pending.head != NULL)
        uv_check_start(&cm->seal, on_seal);
}

static void on_sync_timer(uv_timer_t *t)
{
    kl_commit *cm = t->data;
    if (cm->dirty && !cm->busy && cm->unavailable == NULL)
        start_job(cm, JOB_SYNC);
}

/* ---- lifecycle -------------------------------------------------------- */

int kl_commit_new(kl_daemon *d, kl_commit **out)
{
    kl_commit *cm = calloc(1, sizeof *cm);
    if (cm == NULL)
        return KL_ENOMEM;
    cm->d = d;
    cm->last_sync_ns = uv_hrtime();
    int rc = uv_timer_init(d->loop, &cm->sync_timer);
    if (rc != 0) {
        free(cm);
        return rc;
    }
    cm->sync_timer.data = cm;
    uv_check_init(d->loop, &cm->seal);
    cm->seal.data = cm;
    if (d->cfg.fsync == KL_FSYNC_BATCH)
        uv_timer_start(&cm->sync_timer, on_sync_timer, SYNC_INTERVAL_MS,
                       SYNC_INTERVAL_MS);
    *out = cm;
    return KL_OK;
}

void kl_commit_drain(kl_commit *cm, void (*on_done)(kl_daemon *d))
{
    cm->drain_cb = on_done;
    uv_timer_stop(&cm->sync_timer);
    maybe_drained(cm);
}

static void on_seal_closed(uv_handle_t *h)
{
    kl_commit *cm = h->data;
    kl_buf_free(&cm->batch);
    free(cm);
}

static void on_timer_closed(uv_handle_t *h)
{
    kl_commit *cm = h->data;
    uv_close((uv_handle_t *)&cm->seal, on_seal_closed);
}

void kl_commit_free(kl_commit *cm)
{
    if (cm == NULL)
        return;
    kl_cmd *c;
    while ((c = q_pop(&cm->deferred)) != NULL)
        kl_cmd_free(c);
    while ((c = q_pop(&cm->pending)) != NULL)
        kl_cmd_free(c);
    uv_close((uv_handle_t *)&cm->sync_timer, on_timer_closed);
}

const char *kl_commit_unavailable(const kl_commit *cm)
{
    if (cm->unavailable != NULL)
        return cm->unavailable;
    return kl_log_is_read_only(cm->d->log)
               ? "the log is read-only after a failed write; restart keyledgerd"
               : NULL;
}
