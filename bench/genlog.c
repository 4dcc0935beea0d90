/*
 * genlog: writes a data dir holding one organization, its owner and N keys,
 * straight through the log library (no daemon), for the startup and memory
 * benchmarks. Each key looks like one a client would create: a name, a
 * description, a flows permission and a rate limit.
 *
 *   genlog DIR N
 */
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: genlog DIR N\n");
        return 2;
    }
    long n = atol(argv[2]);
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = argv[1];
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
                 KL_F_PREFIX | KL_F_ENV | KL_F_ACCESS | KL_F_RATE_LIMIT;
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
        ev.rl_minute = 600;
        ev.rl_day = 100000;
        rc = kl_secret_new("kl", KL_ENV_LIVE, &ev.id, secret, ev.hash, display);
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
    return 0;
}
