/*
 * keyledger snapshot: writes the state at the head of the log as a
 * snapshot file in the data dir, so the next start loads it and replays
 * only what came after (docs/log-format.md, "Snapshots"). It takes the
 * data dir's lock: not while the daemon runs.
 */
#include "tools.h"

#include "projections.h"

#include <getopt.h>
#include <stdio.h>

int kl_tool_write_snapshot(kl_log *log, const char *data, const kl_logger *lg,
                           uint64_t *bytes, kl_err *err)
{
    kl_proj *p = NULL;
    kl_buf out = {0};
    uint64_t from;
    uint8_t hash[KL_HASH_LEN];
    kl_log_head_hash(log, hash);
    int rc = kl_proj_rebuild(&p, log, data, lg, &from, err);
    if (rc == KL_OK)
        rc = kl_proj_snapshot(p, &out);
    if (rc == KL_OK)
        rc = kl_snapshot_write(data, kl_proj_seq(p), hash, out.data, out.len, err);
    *bytes = out.len + 72;      /* the header: log/snapshot.c */
    kl_buf_free(&out);
    kl_proj_free(p);
    return rc;
}

int kl_tool_snapshot(int argc, char **argv)
{
    static const struct option opts[] = {
        {"data", required_argument, NULL, 'd'},
        {NULL, 0, NULL, 0},
    };
    const char *data = NULL;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (ch != 'd') {
            fprintf(stderr, "usage: keyledger snapshot --data DIR\n");
            return 2;
        }
        data = optarg;
    }
    if (optind != argc || data == NULL) {
        fprintf(stderr, "usage: keyledger snapshot --data DIR\n");
        return 2;
    }
    kl_logger lg = {KL_WARN, NULL};
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = data;
    cfg.logger = &lg;
    kl_log *log;
    kl_log_recovery rec;
    kl_err err = {0};
    if (kl_log_open(&log, &cfg, &rec, &err) != KL_OK) {
        fprintf(stderr, "keyledger: %s\n", err.msg);
        return 1;
    }
    uint64_t bytes = 0;
    int rc = kl_tool_write_snapshot(log, data, &lg, &bytes, &err);
    uint64_t seq = kl_log_head_seq(log);
    if (rc == KL_OK)
        printf("{\"snapshot\":\"snapshot-%020llu.kls\",\"seq\":%llu,\"bytes\":%llu}\n",
               (unsigned long long)seq, (unsigned long long)seq,
               (unsigned long long)bytes);
    else
        fprintf(stderr, "keyledger: %s\n", rc == KL_ENOMEM ? "out of memory" : err.msg);
    kl_log_close(log);
    return rc == KL_OK ? 0 : 1;
}
