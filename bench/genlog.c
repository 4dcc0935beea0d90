/*
 * genlog: writes a data dir holding one organization, its owner and N keys,
 * straight through the log library (no daemon), for the startup and memory
 * benchmarks. Each key looks like one a client would create: a name, a
 * description, a flows permission and a rate limit.
 *
 *   genlog [--no-limits] [--print-secret FILE [--spread K]] DIR N
 *
 * --no-limits      keys get no rate limit (the org never has one), so a
 *                  verification of them measures the lookup, not the limiter
 * --print-secret   writes the secret of the last key created, and a newline,
 *                  to FILE ("-" for stdout), for the verification benchmark
 * --spread K       writes K secrets instead, one a line, of keys spread evenly
 *                  over the org (every N/K-th, ending with the last), so that
 *                  a benchmark can verify keys that are not all in the cache
 */
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int usage(void)
{
    fprintf(stderr, "usage: genlog [--no-limits] [--print-secret FILE [--spread K]] DIR N\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *pos[2], *secret_out = NULL;
    int npos = 0;
    long spread = 1;
    bool limits = true;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--no-limits") == 0)
            limits = false;
        else if (strcmp(argv[i], "--print-secret") == 0 && i + 1 < argc)
            secret_out = argv[++i];
        else if (strcmp(argv[i], "--spread") == 0 && i + 1 < argc)
            spread = atol(argv[++i]);
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
    if (spread < 1 || spread > n)
        spread = spread < 1 ? 1 : n;
    long step = n / spread > 0 ? n / spread : 1;
    char (*kept)[KL_SECRET_MAX] = NULL;
    long nkept = 0;
    if (secret_out != NULL && (kept = calloc((size_t)spread, sizeof *kept)) == NULL) {
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
