/*
 * keyledgerd: parse the command line, open (and if need be repair) the log,
 * listen, replay the log into the projection on the thread pool while
 * /healthz and /readyz answer, then serve until SIGTERM or SIGINT: stop
 * accepting, finish what is in flight, flush, exit 0.
 */
#include "daemon.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char USAGE[] =
    "usage: keyledgerd --data DIR [--listen HOST:PORT] [--fsync always|batch|off]\n"
    "                  [--allow-query-key] [--config FILE]\n";

int64_t kl_daemon_now(const kl_daemon *d)
{
    (void)d;
    return kl_now_ms();
}

static void make_request_id(char out[31], void *ctx)
{
    kl_daemon *d = ctx;
    kl_id id;
    if (kl_id_new(&d->ids, kl_now_ms(), &id) != KL_OK)
        memset(&id, 0, sizeof id);
    kl_id_format(KL_ID_REQUEST, &id, out);
}

/* ---- replay ----------------------------------------------------------- */

typedef struct replay_job {
    uv_work_t work;
    kl_daemon *d;
    int rc;
    uint64_t from;              /* the snapshot started from (0: none) */
    kl_err err;
} replay_job;

/* On the thread pool: the loop does not touch the state until `ready`. */
static void on_replay(uv_work_t *w)
{
    replay_job *job = w->data;
    kl_daemon *d = job->d;
    uint64_t t0 = uv_hrtime();
    kl_proj *p;
    job->rc = kl_proj_rebuild(&p, d->log, d->cfg.data_dir, &d->logger, &job->from,
                              &job->err);
    if (job->rc == KL_OK) {
        kl_proj_free(d->proj);
        d->proj = p;
    }
    d->replay_ns = uv_hrtime() - t0;
}


static void on_replay_done(uv_work_t *w, int status)
{
    replay_job *job = w->data;
    kl_daemon *d = job->d;
    if (job->rc != KL_OK || status != 0) {
        KL_LOGF(&d->logger, KL_ERROR, "replay failed: %s; check the log with "
                "`keyledger verify --data %s`", job->err.msg, d->cfg.data_dir);
        free(job);
        kl_daemon_stop(d, 1);
        return;
    }
    d->ready = true;
    if (job->from > 0)
        KL_LOGF(&d->logger, KL_INFO, "loaded the snapshot of seq %llu and replayed "
                "%llu events after it in %.1f ms; ready", (unsigned long long)job->from,
                (unsigned long long)(kl_proj_seq(d->proj) - job->from),
                (double)d->replay_ns / 1e6);
    else
        KL_LOGF(&d->logger, KL_INFO, "replayed %llu events in %.1f ms; ready",
                (unsigned long long)kl_proj_seq(d->proj), (double)d->replay_ns / 1e6);
    free(job);
}

/* ---- shutdown ---------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h) { (void)h; }

static void on_drained(kl_daemon *d)
{
    uv_close((uv_handle_t *)&d->sigterm, on_handle_closed);
    uv_close((uv_handle_t *)&d->sigint, on_handle_closed);
    kl_commit_free(d->commit);
    d->commit = NULL;
}

static void on_http_closed(void *arg)
{
    kl_daemon *d = arg;
    /* Every request is answered: count their usage, then flush it all. */
    if (d->ready)
        kl_usage_flush(d->usage);
    kl_usage_free(d->usage);
    d->usage = NULL;
    kl_alerts_free(d->alerts);
    d->alerts = NULL;
    kl_commit_drain(d->commit, on_drained);
}

void kl_daemon_stop(kl_daemon *d, int code)
{
    if (code != 0)
        d->exit_code = code;
    if (d->stopping)
        return;
    d->stopping = true;
    uv_signal_stop(&d->sigterm);
    uv_signal_stop(&d->sigint);
    kl_http_server_shutdown(d->http, on_http_closed, d);
}

static void on_signal(uv_signal_t *s, int signum)
{
    kl_daemon *d = s->data;
    KL_LOGF(&d->logger, KL_INFO, "signal %d: finishing requests in flight, then "
            "exiting", signum);
    kl_daemon_stop(d, 0);
}

/* ---- command line ----------------------------------------------------- */

static int parse_args(int argc, char **argv, kl_config *cfg)
{
    static const struct option opts[] = {
        {"data", required_argument, NULL, 'd'},
        {"listen", required_argument, NULL, 'l'},
        {"fsync", required_argument, NULL, 'f'},
        {"allow-query-key", no_argument, NULL, 'q'},
        {"config", required_argument, NULL, 'c'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *listen = NULL, *fsync_mode = NULL, *config = NULL, *data = NULL;
    bool query_key = false;
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'd': data = optarg; break;
        case 'l': listen = optarg; break;
        case 'f': fsync_mode = optarg; break;
        case 'q': query_key = true; break;
        case 'c': config = optarg; break;
        case 'h': fputs(USAGE, stdout); exit(0);
        default: fputs(USAGE, stderr); return 2;
        }
    }
    if (optind != argc || data == NULL) {
        fputs(data == NULL ? "keyledgerd: --data DIR is required\n" : "", stderr);
        fputs(USAGE, stderr);
        return 2;
    }
    kl_err err;
    if ((config != NULL && kl_config_load(cfg, config, &err) != KL_OK) ||
        (listen != NULL && kl_config_listen(cfg, listen, &err) != KL_OK) ||
        (fsync_mode != NULL && kl_config_fsync(cfg, fsync_mode, &err) != KL_OK)) {
        fprintf(stderr, "keyledgerd: %s\n", err.msg);
        return 2;
    }
    if (query_key)
        cfg->allow_query_key = true;
    if (strlen(data) >= sizeof cfg->data_dir) {
        fputs("keyledgerd: --data path too long\n", stderr);
        return 2;
    }
    snprintf(cfg->data_dir, sizeof cfg->data_dir, "%s", data);
    return 0;
}

static int open_log(kl_daemon *d)
{
    kl_log_config lc;
    kl_log_config_defaults(&lc);
    lc.dir = d->cfg.data_dir;
    lc.segment_bytes = d->cfg.segment_bytes;
    lc.fsync = d->cfg.fsync;
    /* Zeros ahead of the records: an fsync then writes the batch alone. */
    lc.room_bytes = d->cfg.fsync != KL_FSYNC_OFF ? 4u << 20 : 0;
    lc.logger = &d->logger;
    kl_log_recovery rec;
    kl_err err;
    int rc = kl_log_open(&d->log, &lc, &rec, &err);
    if (rc != KL_OK) {
        KL_LOGF(&d->logger, KL_ERROR, "cannot open the log: %s", err.msg);
        if (rc == KL_ECORRUPT || rc == KL_EUNKNOWN)
            KL_LOGF(&d->logger, KL_ERROR, "refusing to start; run `keyledger "
                    "verify --data %s` for a full report", d->cfg.data_dir);
        return rc;
    }
    if (rec.torn_bytes != 0)
        KL_LOGF(&d->logger, KL_WARN, "cut a torn tail of %llu bytes from segment "
                "%s at offset %llu (an unfinished write; nothing acknowledged "
                "was in it)", (unsigned long long)rec.torn_bytes,
                rec.torn_segment, (unsigned long long)rec.torn_offset);
    return KL_OK;
}

int main(int argc, char **argv)
{
    static kl_daemon daemon;    /* one per process; lives until exit */
    kl_daemon *d = &daemon;
    kl_use_huge_pages(argv);
    kl_config_defaults(&d->cfg);
    int rc = parse_args(argc, argv, &d->cfg);
    if (rc != 0)
        return rc;
    signal(SIGPIPE, SIG_IGN);
    d->logger.level = d->cfg.log_level;
    d->loop = uv_default_loop();
    kl_idgen_init(&d->ids);

    if (open_log(d) != KL_OK)
        return 1;
    if (kl_proj_new(&d->proj) != KL_OK || kl_idem_cache_new(&d->idem) != KL_OK ||
        kl_commit_new(d, &d->commit) != KL_OK ||
        kl_usage_new(d, d->cfg.usage_flush_ms, &d->usage) != KL_OK ||
        kl_verify_init(d) != KL_OK || kl_alerts_new(d, &d->alerts) != KL_OK ||
        kl_metrics_new(&d->metrics, kl_routes, kl_now_ms()) != KL_OK) {
        KL_LOGF(&d->logger, KL_ERROR, "out of memory at startup");
        return 1;
    }
    rc = kl_http_server_new(&d->http, d->loop, &d->cfg.http, kl_routes,
                            make_request_id, d);
    if (rc != 0) {
        KL_LOGF(&d->logger, KL_ERROR, "cannot start the HTTP server: %s",
                uv_strerror(rc));
        return 1;
    }
    kl_http_server_set_observer(d->http, kl_metrics_observe);
    rc = kl_http_server_listen(d->http, d->cfg.listen_host, d->cfg.listen_port);
    if (rc != 0) {
        KL_LOGF(&d->logger, KL_ERROR, "cannot listen on %s:%d: %s",
                d->cfg.listen_host, d->cfg.listen_port, uv_strerror(rc));
        return 1;
    }
    KL_LOGF(&d->logger, KL_INFO, "listening on %s:%d (data %s, fsync %s)",
            d->cfg.listen_host, kl_http_server_port(d->http), d->cfg.data_dir,
            (const char *[]){"always", "batch", "off"}[d->cfg.fsync]);

    uv_signal_init(d->loop, &d->sigterm);
    uv_signal_init(d->loop, &d->sigint);
    d->sigterm.data = d->sigint.data = d;
    uv_signal_start(&d->sigterm, on_signal, SIGTERM);
    uv_signal_start(&d->sigint, on_signal, SIGINT);

    replay_job *job = calloc(1, sizeof *job);
    if (job == NULL)
        return 1;
    job->d = d;
    job->work.data = job;
    uv_queue_work(d->loop, &job->work, on_replay, on_replay_done);

    uv_run(d->loop, UV_RUN_DEFAULT);

    kl_http_server_free(d->http);
    kl_metrics_free(d->metrics);
    kl_idem_cache_free(d->idem);
    kl_verify_free(d);
    kl_proj_free(d->proj);
    kl_log_reader_close(d->reader);
    kl_log_close(d->log);
    uv_loop_close(d->loop);
    if (d->exit_code == 0)
        KL_LOGF(&d->logger, KL_INFO, "stopped");
    return d->exit_code;
}
