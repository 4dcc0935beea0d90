/*
 * keyledger replay: the log's events as JSON lines, oldest first, each
 * exactly as GET /v1/audit-events shows it (kl_render_event, compact, with
 * its record's chain hash). Read-only and lock-free, so it runs beside the
 * daemon; it streams, holding one record at a time, and checks the hash
 * chain as it goes. Also the read-only walk that `keyledger state` shares.
 *
 * Ranges are half-open, as the audit API's since/until are: --from SEQ is
 * the first seq printed, --until SEQ the first one not printed, and
 * --until TIME drops events with occurred_at at or after TIME (every event
 * is looked at: times are only close to monotonic in seq order).
 * docs/audit.md "keyledger replay and state" is the reference.
 */
#include "tools.h"

#include "projections.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

int kl_tool_walk(const char *data, uint64_t from_seq, kl_log_record_fn fn,
                 void *arg, kl_err *fn_err)
{
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = data;
    cfg.read_only = true;
    kl_log *log;
    kl_log_recovery rec;
    kl_err err = {0};
    memset(fn_err, 0, sizeof *fn_err);
    int rc = kl_log_open(&log, &cfg, &rec, &err);
    if (rc != KL_OK) {
        /* Damage found by the open names its segment and offset already. */
        fprintf(stderr, "keyledger: %s\n", err.msg);
        return 1;
    }
    rc = kl_log_replay(log, from_seq, true, fn, arg, &err);
    kl_log_close(log);
    if (rc == KL_OK || rc == KL_TOOL_STOP)
        return 0;
    if (fn_err->msg[0] == '\0')          /* the log's own: place included */
        fprintf(stderr, "keyledger: %s\n", err.msg);
    else if (rc == KL_EIO)               /* writing the output: no place */
        fprintf(stderr, "keyledger: %s\n", fn_err->msg);
    else
        fprintf(stderr, "keyledger: segment %s offset %" PRIu64 ": %s\n",
                err.segment, err.offset, fn_err->msg);
    return 1;
}

typedef struct replay_args {
    const char *data;
    uint64_t from;
    bool has_until_seq, has_until_time, has_org;
    uint64_t until_seq;
    int64_t until_time;         /* ms, exclusive */
    kl_event_type type;         /* KL_EV_NONE = every type */
    kl_id org;
} replay_args;

typedef struct replay_ctx {
    const replay_args *a;
    FILE *out;
    kl_buf line;                /* one event's text, reused: one fwrite each */
    kl_err err;
} replay_ctx;

static bool all_digits(const char *s)
{
    return s[0] != '\0' && strspn(s, "0123456789") == strlen(s);
}

static void print_types(FILE *f)
{
    for (int t = KL_EV_NONE + 1; t < KL_EV_TYPE_COUNT; t++)
        fprintf(f, "%s%s", t == KL_EV_NONE + 1 ? "" : ", ",
                kl_event_type_name((kl_event_type)t));
    fputc('\n', f);
}

static int parse(int argc, char **argv, replay_args *a)
{
    static const struct option opts[] = {
        {"data", required_argument, NULL, 'd'},
        {"from", required_argument, NULL, 'f'},
        {"until", required_argument, NULL, 'u'},
        {"type", required_argument, NULL, 't'},
        {"org", required_argument, NULL, 'o'},
        {NULL, 0, NULL, 0},
    };
    memset(a, 0, sizeof *a);
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'd':
            a->data = optarg;
            break;
        case 'f':
            if (!kl_parse_u64(optarg, strlen(optarg), &a->from)) {
                fprintf(stderr, "keyledger: --from must be a seq (a decimal "
                        "number), not \"%s\"\n", optarg);
                goto usage;
            }
            break;
        case 'u':
            a->has_until_seq = a->has_until_time = false;
            if (all_digits(optarg)) {
                if (!kl_parse_u64(optarg, strlen(optarg), &a->until_seq)) {
                    fprintf(stderr, "keyledger: --until %s is too large\n", optarg);
                    goto usage;
                }
                a->has_until_seq = true;
            } else if (kl_time_parse(optarg, strlen(optarg), &a->until_time) == KL_OK) {
                a->has_until_time = true;
            } else {
                fprintf(stderr, "keyledger: --until must be a seq or an RFC 3339 "
                        "time such as 2026-01-15T10:30:00.000Z, not \"%s\"\n", optarg);
                goto usage;
            }
            break;
        case 't':
            a->type = kl_event_type_parse(optarg, strlen(optarg));
            if (a->type == KL_EV_NONE) {
                fprintf(stderr, "keyledger: unknown event type \"%s\"; the types "
                        "are: ", optarg);
                print_types(stderr);
                goto usage;
            }
            break;
        case 'o':
            if (kl_id_parse(KL_ID_ORG, optarg, strlen(optarg), &a->org) != KL_OK) {
                fprintf(stderr, "keyledger: --org must be an organization id "
                        "(org_ and 26 characters), not \"%s\"\n", optarg);
                goto usage;
            }
            a->has_org = true;
            break;
        default:
            goto usage;
        }
    }
    if (optind != argc || a->data == NULL)
        goto usage;
    return 0;
usage:
    fprintf(stderr, "usage: keyledger replay --data DIR [--from SEQ] "
            "[--until SEQ|TIME] [--type TYPE] [--org ID]\n");
    return 2;
}

static bool wanted(const replay_args *a, const kl_event *ev)
{
    return (a->type == KL_EV_NONE || ev->type == a->type) &&
           (!a->has_until_time || ev->ts < a->until_time) &&
           (!a->has_org || kl_id_eq(&ev->org, &a->org));
}

static int on_record(uint64_t seq, const uint8_t *payload, size_t len,
                     const uint8_t hash[KL_HASH_LEN], void *arg)
{
    replay_ctx *c = arg;
    if (c->a->has_until_seq && seq >= c->a->until_seq)
        return KL_TOOL_STOP;
    kl_record_head head;
    kl_event ev;
    int rc = kl_event_decode(payload, len, &head, &ev, &c->err);
    if (rc != KL_OK || !wanted(c->a, &ev))
        return rc;
    json_t *o = kl_render_event(&ev, hash);
    if (o == NULL) {
        kl_err_set(&c->err, "out of memory rendering seq %" PRIu64, seq);
        return KL_ENOMEM;
    }
    /* The daemon's jsonl bytes: json_dumpb with JSON_COMPACT, then "\n". */
    size_t n = json_dumpb(o, c->line.data, c->line.cap, JSON_COMPACT);
    if (n >= c->line.cap && n != 0) {
        if (kl_buf_reserve(&c->line, n + 1) == KL_OK)
            n = json_dumpb(o, c->line.data, c->line.cap, JSON_COMPACT);
        else
            n = 0;
    }
    json_decref(o);
    if (n == 0 || n >= c->line.cap) {
        kl_err_set(&c->err, "out of memory rendering seq %" PRIu64, seq);
        return KL_ENOMEM;
    }
    c->line.data[n++] = '\n';
    if (fwrite(c->line.data, 1, n, c->out) != n) {
        kl_err_set(&c->err, "cannot write the output: %s", strerror(errno));
        return KL_EIO;
    }
    return 0;
}

int kl_tool_replay(int argc, char **argv)
{
    replay_args a;
    int rc = parse(argc, argv, &a);
    if (rc != 0)
        return rc;
    /* Many small lines: write them in big blocks, even to a terminal. */
    setvbuf(stdout, NULL, _IOFBF, (size_t)1 << 16);
    replay_ctx c = {.a = &a, .out = stdout};
    rc = kl_tool_walk(a.data, a.from, on_record, &c, &c.err);
    kl_buf_free(&c.line);
    if (fflush(stdout) != 0 && rc == 0) {
        fprintf(stderr, "keyledger: cannot write the output: %s\n", strerror(errno));
        rc = 1;
    }
    return rc;
}
