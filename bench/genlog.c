/*
 * genlog: writes a data dir holding one organization, its owner and N keys,
 * straight through the log library (no daemon), for the startup and memory
 * benchmarks. Each key looks like one a client would create: a name, a
 * description, a flows permission and a rate limit.
 *
 *   genlog [--no-limits] [--print-secret FILE [--spread K]]
 *          [--usage K [--usage-days D] [--usage-keys M]] DIR N
 *
 * --no-limits      keys get no rate limit (the org never has one), so a
 *                  verification of them measures the lookup, not the limiter
 * --print-secret   writes the secret of the last key created, and a newline,
 *                  to FILE ("-" for stdout), for the verification benchmark
 * --spread K       writes K secrets instead, one a line, of keys spread evenly
 *                  over the org (every N/K-th, ending with the last), so that
 *                  a benchmark can verify keys that are not all in the cache
 * --usage K        after the keys, appends K UsageRecorded events (actor
 *                  system, as the daemon's flush writes them) for the
 *                  compaction benchmark: each of the M keys in turn (round
 *                  robin, so a group never names a key twice when M >= 256),
 *                  a period of one second ending at the event's time, a few
 *                  accepted calls in flow_orders and, on every tenth, a
 *                  refused one or two in flow_refunds. Their times are spread
 *                  evenly over the D days before now (the last one now), in
 *                  time order, so a compaction with a shorter retention
 *                  folds most of them. They go out in groups of 256 (every
 *                  record of a group but its last framed with more = true),
 *                  as the daemon writes a flush. With --usage the org, its
 *                  owner and the keys are made before the first usage
 *                  period (without it, at now, as always).
 * --usage-days D   the days the usage is spread over (default 30)
 * --usage-keys M   the keys that are used: M spread evenly over the org
 *                  (every N/M-th; default all N). Compaction folds a key's
 *                  events of one UTC day into one: with K/M events a key over
 *                  D days, K/(M*D) a day, it only shrinks the log when that
 *                  is well over 1
 */
#include "log.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int usage(void)
{
    fprintf(stderr, "usage: genlog [--no-limits] [--print-secret FILE [--spread K]]\n"
                    "              [--usage K [--usage-days D] [--usage-keys M]] DIR N\n");
    return 2;
}

enum { USAGE_GROUP = 256, MAX_USAGE_DAYS = 36500 };
#define DAY_MS INT64_C(86400000)

/* A count option: a whole number from 0 to max, or -1. */
static long count_arg(const char *s, long max)
{
    char *end;
    long v = strtol(s, &end, 10);
    return end == s || *end != '\0' || v < 0 || v > max ? -1 : v;
}

/* Appends the K UsageRecorded events of --usage to the batch, in groups of
 * USAGE_GROUP, writing the batch whenever it is big and a group has ended
 * (a group never spans two batches, so never two segments). */
static int gen_usage(kl_log *log, kl_buf *batch, kl_log_mark *mark, const kl_id *org,
                     const kl_id *keys, long n, long m, long k, int64_t start,
                     int64_t span, kl_err *err)
{
    kl_event ev = {.type = KL_EV_USAGE_RECORDED, .org = *org,
                   .actor = {.type = KL_PRINCIPAL_SYSTEM}};
    int rc = KL_OK;
    for (long j = 0; j < k && rc == KL_OK; j++) {
        /* Evenly over (start, start + span], in time order. */
        int64_t to = start + (int64_t)((__int128)span * (j + 1) / k);
        ev.has = KL_F_ID | KL_F_USAGE | KL_F_FLOW_USAGE;
        ev.id = keys[j % m * (n / m)];
        ev.ts = to;
        ev.usage_from = to - 1000;
        ev.usage_to = to;
        ev.successes = 1 + (uint32_t)(j % 7);
        ev.failures = j % 10 == 0 ? 1 + (uint32_t)(j / 10 % 2) : 0;
        ev.last_used = to - 1 - j % 997;
        ev.flows[0] = (kl_str){"flow_orders", 11};
        ev.flow_successes[0] = ev.successes;
        ev.flow_failures[0] = 0;
        ev.nflows = 1;
        if (ev.failures > 0) {
            ev.flows[1] = (kl_str){"flow_refunds", 12};
            ev.flow_successes[1] = 0;
            ev.flow_failures[1] = ev.failures;
            ev.nflows = 2;
        }
        bool more = j % USAGE_GROUP != USAGE_GROUP - 1 && j != k - 1;
        rc = kl_log_frame_event(log, &ev, more, batch);
        if (rc == KL_OK && !more && batch->len > (4u << 20)) {
            rc = kl_log_write(log, batch, mark, err);
            batch->len = 0;
            kl_log_mark_get(log, mark);
        }
    }
    return rc;
}

int main(int argc, char **argv)
{
    const char *pos[2], *secret_out = NULL;
    int npos = 0;
    long spread = 1, nusage = 0, usage_days = 30, usage_keys = 0;
    bool limits = true;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--no-limits") == 0)
            limits = false;
        else if (strcmp(argv[i], "--print-secret") == 0 && i + 1 < argc)
            secret_out = argv[++i];
        else if (strcmp(argv[i], "--spread") == 0 && i + 1 < argc)
            spread = atol(argv[++i]);
        else if (strcmp(argv[i], "--usage") == 0 && i + 1 < argc) {
            if ((nusage = count_arg(argv[++i], LONG_MAX)) < 0)
                return usage();
        } else if (strcmp(argv[i], "--usage-days") == 0 && i + 1 < argc) {
            if ((usage_days = count_arg(argv[++i], MAX_USAGE_DAYS)) < 1)
                return usage();
        } else if (strcmp(argv[i], "--usage-keys") == 0 && i + 1 < argc) {
            if ((usage_keys = count_arg(argv[++i], LONG_MAX)) < 1)
                return usage();
        }
        else if (argv[i][0] == '-' && argv[i][1] == '-')
            return usage();
        else if (npos < 2)
            pos[npos++] = argv[i];
        else
            return usage();
    }
    if (npos != 2)
        return usage();
    char *end;
    long n = strtol(pos[1], &end, 10);
    if (*end != '\0' || n < 0)
        return usage();
    if (secret_out != NULL && n == 0) {
        fprintf(stderr, "genlog: --print-secret needs at least one key\n");
        return 2;
    }
    if (nusage > 0 && n == 0) {
        fprintf(stderr, "genlog: --usage needs at least one key\n");
        return 2;
    }
    if (usage_keys == 0 || usage_keys > n)
        usage_keys = n;
    if (spread < 1 || spread > n)
        spread = spread < 1 ? 1 : n;
    long step = n / spread > 0 ? n / spread : 1;
    char (*kept)[KL_SECRET_MAX] = NULL;
    long nkept = 0;
    kl_id *keys = NULL;         /* the keys' ids, for --usage */
    if ((secret_out != NULL && (kept = calloc((size_t)spread, sizeof *kept)) == NULL) ||
        (nusage > 0 && (keys = calloc((size_t)n, sizeof *keys)) == NULL)) {
        fprintf(stderr, "genlog: out of memory\n");
        return 1;
    }
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = pos[0];
    cfg.fsync = KL_FSYNC_OFF;
    kl_err err;
    kl_log *log;
    kl_log_recovery rec;
    if (kl_log_create(&cfg, &err) != KL_OK || kl_log_open(&log, &cfg, &rec, &err) != KL_OK) {
        fprintf(stderr, "genlog: %s\n", err.msg);
        return 1;
    }
    kl_idgen ids;
    kl_idgen_init(&ids);
    int64_t now = kl_now_ms();
    /* With --usage, the keys exist before the first usage period (a second
     * before it, one millisecond apart as always). */
    int64_t usage_span = usage_days * DAY_MS, usage_start = now - usage_span;
    if (nusage > 0)
        now = usage_start - 1000 - n;
    kl_event ev = {.ts = now, .actor = {.type = KL_PRINCIPAL_SYSTEM}};
    kl_id user;
    kl_buf batch = {0};
    kl_log_mark mark;
    kl_log_mark_get(log, &mark);
    kl_id_new(&ids, now, &ev.org);
    kl_id_new(&ids, now, &user);
    ev.type = KL_EV_ORG_CREATED;
    ev.has = KL_F_NAME;
    ev.name = (kl_str){"Bench", 5};
    int rc = kl_log_frame_event(log, &ev, true, &batch);
    ev.type = KL_EV_USER_INVITED;
    ev.has = KL_F_ID | KL_F_EMAIL | KL_F_ROLE;
    ev.id = user;
    ev.email = (kl_str){"owner@bench.test", 16};
    ev.role = KL_ROLE_OWNER;
    rc = rc ? rc : kl_log_frame_event(log, &ev, false, &batch);
    ev.actor = (kl_actor){KL_PRINCIPAL_USER, user, {{0}}};
    for (long i = 0; i < n && rc == KL_OK; i++) {
        char name[32], secret[KL_SECRET_MAX], display[KL_DISPLAY_PREFIX_LEN + 1];
        snprintf(name, sizeof name, "service key %ld", i);
        ev.type = KL_EV_KEY_CREATED;
        ev.has = KL_F_ID | KL_F_NAME | KL_F_DESCRIPTION | KL_F_OWNER | KL_F_HASH |
                 KL_F_PREFIX | KL_F_ENV | KL_F_ACCESS | (limits ? KL_F_RATE_LIMIT : 0);
        ev.ts = now + i;
        kl_id_new(&ids, ev.ts, &ev.id);
        if (keys != NULL)
            keys[i] = ev.id;
        ev.name = (kl_str){name, (uint32_t)strlen(name)};
        ev.description = (kl_str){"used by the order sync job", 26};
        ev.owner_type = KL_PRINCIPAL_USER;
        ev.owner = user;
        ev.env = KL_ENV_LIVE;
        ev.access = KL_ACCESS_FLOWS;
        ev.flows[0] = (kl_str){"flow_orders", 11};
        ev.nflows = 1;
        ev.rl_minute = limits ? 600 : 0;
        ev.rl_day = limits ? 100000 : 0;
        rc = kl_secret_new("kl", KL_ENV_LIVE, &ev.id, secret, ev.hash, display);
        if (kept != NULL && (n - 1 - i) % step == 0 && n - 1 - i < step * spread)
            memcpy(kept[nkept++], secret, sizeof secret);
        ev.prefix = (kl_str){display, KL_DISPLAY_PREFIX_LEN};
        rc = rc ? rc : kl_log_frame_event(log, &ev, false, &batch);
        if (rc == KL_OK && batch.len > (4u << 20)) {
            rc = kl_log_write(log, &batch, &mark, &err);
            batch.len = 0;
            kl_log_mark_get(log, &mark);
        }
    }
    if (rc == KL_OK && nusage > 0)
        rc = gen_usage(log, &batch, &mark, &ev.org, keys, n, usage_keys, nusage,
                       usage_start, usage_span, &err);
    free(keys);
    if (rc == KL_OK && batch.len > 0)
        rc = kl_log_write(log, &batch, &mark, &err);
    if (rc == KL_OK)
        rc = kl_log_sync(log, &err);
    kl_buf_free(&batch);
    kl_log_close(log);
    if (rc != KL_OK) {
        fprintf(stderr, "genlog: failed (%d) %s\n", rc, err.msg);
        return 1;
    }
    if (secret_out != NULL) {
        FILE *f = strcmp(secret_out, "-") == 0 ? stdout : fopen(secret_out, "w");
        bool ok = f != NULL;
        for (long i = 0; ok && i < nkept; i++)
            ok = fprintf(f, "%s\n", kept[i]) >= 0;
        if (f != NULL && f != stdout)
            ok = fclose(f) == 0 && ok;
        free(kept);
        if (!ok) {
            fprintf(stderr, "genlog: cannot write the secrets to %s\n", secret_out);
            return 1;
        }
    }
    return 0;
}
