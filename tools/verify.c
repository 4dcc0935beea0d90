/*
 * keyledger verify: every record's framing, CRC, sequence and chain link
 * (log/), that every event decodes and fits the state built from the ones
 * before it (the daemon's own fold), and that every snapshot in the data
 * dir is exactly the state the log had at its seq, with that record's chain
 * hash. Prints one JSON summary line.
 */
#include "tools.h"

#include "projections.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_SNAPSHOTS = 256 };

typedef struct fold {
    kl_proj *proj;
    kl_err err;
    const char *dir;
    uint64_t snaps[MAX_SNAPSHOTS];  /* snapshot seqs, ascending */
    size_t nsnaps, next;
} fold;

/* The snapshot of seq must hold this state and this chain hash, byte for
 * byte: an edited snapshot, or one of another log, is caught here. */
static int check_snapshot(fold *f, uint64_t seq, const uint8_t *hash)
{
    kl_snapshot_data file = {0};
    kl_buf mine = {0};
    uint8_t file_hash[KL_HASH_LEN];
    int rc = kl_snapshot_read(f->dir, seq, &file, file_hash, &f->err);
    int format = rc == KL_OK ? kl_proj_snapshot_format(file.data, file.len) : 0;
    if (rc == KL_OK && format != KL_SNAPSHOT_FORMAT) {
        /* Not a lie, but not something this build can check or start from. */
        kl_err_set(&f->err, "snapshot-%020llu.kls is in snapshot format %d, not %d: "
                   "take a new one with `keyledger snapshot` and remove it",
                   (unsigned long long)seq, format, KL_SNAPSHOT_FORMAT);
        rc = KL_ECORRUPT;
    }
    if (rc == KL_OK && kl_proj_snapshot(f->proj, &mine) != KL_OK)
        rc = KL_ENOMEM;
    if (rc == KL_OK && (memcmp(file_hash, hash, KL_HASH_LEN) != 0 ||
                        file.len != mine.len || memcmp(file.data, mine.data, file.len) != 0)) {
        kl_err_set(&f->err, "snapshot-%020llu.kls is not the state of the log at "
                   "seq %llu (edited, or of another log)", (unsigned long long)seq,
                   (unsigned long long)seq);
        rc = KL_ECORRUPT;
    }
    kl_snapshot_release(&file);
    kl_buf_free(&mine);
    return rc;
}

static int fold_record(uint64_t seq, const uint8_t *payload, size_t len,
                       const uint8_t *hash, void *arg)
{
    fold *f = arg;
    int rc = kl_proj_apply_record(f->proj, payload, len, &f->err);
    for (; rc == KL_OK && f->next < f->nsnaps && f->snaps[f->next] <= seq; f->next++)
        if (f->snaps[f->next] == seq)
            rc = check_snapshot(f, seq, hash);
    return rc;
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

    fold *f = calloc(1, sizeof *f);
    kl_err err;
    if (f == NULL || kl_proj_new(&f->proj) != KL_OK) {
        fprintf(stderr, "keyledger: out of memory\n");
        free(f);
        return 1;
    }
    f->dir = data;
    if (kl_snapshot_list(data, f->snaps, MAX_SNAPSHOTS, &f->nsnaps, &err) != KL_OK) {
        fprintf(stderr, "keyledger: %s\n", err.msg);
        kl_proj_free(f->proj);
        free(f);
        return 1;
    }
    kl_log_verify_report rep;
    int rc = kl_log_verify(data, fold_record, f, &rep, &err);
    /* A snapshot of a seq past the log's end covers records that are not
     * there. */
    if (rc == KL_OK && f->next < f->nsnaps) {
        kl_err_set(&f->err, "snapshot-%020llu.kls is of a seq past the end of the log",
                   (unsigned long long)f->snaps[f->next]);
        snprintf(err.msg, sizeof err.msg, "%s", f->err.msg);
        rep.ok = false;
        rc = KL_ECORRUPT;
    }
    kl_proj_free(f->proj);
    char hash[2 * KL_HASH_LEN + 1];
    kl_hex(rep.head_hash, KL_HASH_LEN, hash);
    if (rc == KL_OK) {
        printf("{\"events\":%llu,\"head_seq\":%llu,\"head_hash\":\"%s\",\"ok\":true",
               (unsigned long long)rep.events, (unsigned long long)rep.head_seq, hash);
        if (rep.torn_bytes != 0)
            printf(",\"torn_tail_bytes\":%llu", (unsigned long long)rep.torn_bytes);
        printf("}\n");
        free(f);
        return 0;
    }
    /* A fold or snapshot failure names the seq, not the place: say where it
     * stopped. */
    printf("{\"events\":%llu,\"head_seq\":%llu,\"ok\":false,\"segment\":\"%s\","
           "\"offset\":%llu}\n", (unsigned long long)rep.events,
           (unsigned long long)rep.head_seq, rep.segment,
           (unsigned long long)rep.offset);
    fprintf(stderr, "keyledger: verify failed: %s\n",
            err.msg[0] != '\0' ? err.msg : f->err.msg);
    free(f);
    return 1;
usage:
    fprintf(stderr, "usage: keyledger verify --data DIR\n");
    return 2;
}
