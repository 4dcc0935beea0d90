/*
 * keyledger verify: every record's framing, CRC, sequence and chain link
 * (log/), and that every event decodes and fits the state built from the
 * ones before it (the daemon's own fold). Prints one JSON summary line.
 */
#include "tools.h"

#include "projections.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

typedef struct fold {
    kl_proj *proj;
    kl_err err;
} fold;

static int fold_record(uint64_t seq, const uint8_t *payload, size_t len,
                       const uint8_t *hash, void *arg)
{
    fold *f = arg;
    return kl_proj_apply_record(f->proj, payload, len, &f->err);
}

int kl_tool_verify(int argc, char **argv)
{
    static const struct option opts[] = {
        {"data", required_argument, NULL, 'd'},
        {NULL, 0, NULL, 0},
    };
    const char *data = NULL;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (ch != 'd')
            goto usage;
        data = optarg;
    }
    if (optind != argc || data == NULL)
        goto usage;

    fold f = {0};
    if (kl_proj_new(&f.proj) != KL_OK) {
        fprintf(stderr, "keyledger: out of memory\n");
        return 1;
    }
    kl_log_verify_report rep;
    kl_err err;
    int rc = kl_log_verify(data, fold_record, &f, &rep, &err);
    kl_proj_free(f.proj);
    char hash[2 * KL_HASH_LEN + 1];
    kl_hex(rep.head_hash, KL_HASH_LEN, hash);
    if (rc == KL_OK) {
        printf("{\"events\":%llu,\"head_seq\":%llu,\"head_hash\":\"%s\",\"ok\":true",
               (unsigned long long)rep.events, (unsigned long long)rep.head_seq, hash);
        if (rep.torn_bytes != 0)
            printf(",\"torn_tail_bytes\":%llu", (unsigned long long)rep.torn_bytes);
        printf("}\n");
        return 0;
    }
    /* A fold failure names the seq, not the place: say where it stopped. */
    const char *problem = err.msg[0] != '\0' ? err.msg : f.err.msg;
    if (err.msg[0] == '\0' && f.err.msg[0] != '\0')
        snprintf(err.msg, sizeof err.msg, "%s", f.err.msg);
    printf("{\"events\":%llu,\"head_seq\":%llu,\"ok\":false,\"segment\":\"%s\","
           "\"offset\":%llu}\n", (unsigned long long)rep.events,
           (unsigned long long)rep.head_seq, rep.segment,
           (unsigned long long)rep.offset);
    fprintf(stderr, "keyledger: verify failed: %s\n", problem);
    return 1;
usage:
    fprintf(stderr, "usage: keyledger verify --data DIR\n");
    return 2;
}
