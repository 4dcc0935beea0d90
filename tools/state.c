/*
 * keyledger state --at TIME: the projection as it stood at TIME, folded
 * with the daemon's own kl_proj_apply from the start of the log, and
 * printed as one indented JSON object: per organization its users (removed
 * ones too), service accounts (deleted ones too, marked "deleted": true)
 * and API keys (revoked and deleted ones too, deleted marked the same
 * way), each key with its status and is_active as of TIME. The auditor's
 * "who could get in on that day".
 *
 * The fold takes events in seq order and stops at the first one that
 * occurred after TIME: the log is in seq order and times are only close to
 * monotonic, so "as it stood at TIME" means every event up to the last one
 * at or before TIME. The output is written an object at a time, so only
 * the state itself is held whole.
 */
#include "tools.h"

#include "projections.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct state_ctx {
    kl_proj *proj;
    int64_t at;                 /* ms: fold events with ts <= at */
    kl_key **deleted;           /* deleted keys (the org's list drops them) */
    size_t ndeleted, cap_deleted;
    kl_err err;
} state_ctx;

static int on_record(uint64_t seq, const uint8_t *payload, size_t len,
                     const uint8_t hash[KL_HASH_LEN], void *arg)
{
    state_ctx *c = arg;
    kl_record_head head;
    kl_event ev;
    int rc = kl_event_decode(payload, len, &head, &ev, &c->err);
    if (rc != KL_OK)
        return rc;
    if (ev.ts > c->at)
        return KL_TOOL_STOP;
    if ((rc = kl_proj_apply(c->proj, &ev, &c->err)) != KL_OK)
        return rc;
    if (ev.type == KL_EV_KEY_DELETED) {
        if (c->ndeleted == c->cap_deleted) {
            size_t cap = c->cap_deleted ? 2 * c->cap_deleted : 64;
            kl_key **p = realloc(c->deleted, cap * sizeof *p);
            if (p == NULL) {
                kl_err_set(&c->err, "out of memory at seq %" PRIu64, seq);
                return KL_ENOMEM;
            }
            c->deleted = p;
            c->cap_deleted = cap;
        }
        c->deleted[c->ndeleted++] = kl_proj_key(c->proj, &ev.id);
    }
    return 0;
}

/* Deleted keys by org id, then key id: each org's run is in id order. */
static int cmp_org_key(const void *x, const void *y)
{
    const kl_key *a = *(kl_key *const *)x, *b = *(kl_key *const *)y;
    int r = memcmp(kl_key_org(a)->id.b, kl_key_org(b)->id.b, sizeof a->id.b);
    return r != 0 ? r : memcmp(a->id.b, b->id.b, sizeof a->id.b);
}

/* ---- output --------------------------------------------------------- */

/* Lists inside an org object: their items sit 8 spaces in. */
enum { ITEM_INDENT = 8 };

typedef struct writer {
    FILE *out;
    uint32_t items;             /* written in the open list */
    int rc;                     /* first failure: KL_ENOMEM */
} writer;

/* Writes `v` (owned: released here) as JSON_INDENT(2) text whose lines
 * after the first are pushed `indent` spaces right. Strings never hold a
 * raw newline (JSON escapes it), so every newline is the layout's. */
static void put_json(writer *w, json_t *v, int indent)
{
    char *text = v != NULL ? json_dumps(v, JSON_INDENT(2)) : NULL;
    json_decref(v);
    if (text == NULL) {
        w->rc = KL_ENOMEM;
        return;
    }
    static const char spaces[] = "                ";
    const char *p = text, *nl;
    while ((nl = strchr(p, '\n')) != NULL) {
        fwrite(p, 1, (size_t)(nl + 1 - p), w->out);
        fwrite(spaces, 1, (size_t)indent, w->out);
        p = nl + 1;
    }
    fputs(p, w->out);
    free(text);
}

static void list_open(writer *w, const char *name)
{
    fprintf(w->out, ",\n      \"%s\": [", name);
    w->items = 0;
}

static void list_item(writer *w, json_t *v)
{
    fputs(w->items++ == 0 ? "\n        " : ",\n        ", w->out);
    put_json(w, v, ITEM_INDENT);
}

static void list_close(writer *w)
{
    fputs(w->items == 0 ? "]" : "\n      ]", w->out);
}

/* A deleted service account or key, still listed: who could get in is
 * answered by is_active, and nothing deleted can (a deleted key gets 401,
 * whatever its status was when it went). */
static json_t *mark_deleted(json_t *o)
{
    if (o != NULL) {
        json_object_set_new(o, "is_active", json_false());
        json_object_set_new(o, "deleted", json_true());
    }
    return o;
}

static void put_org(writer *w, const state_ctx *c, const kl_org *o)
{
    fputs("    {\n      \"org\": ", w->out);
    put_json(w, kl_render_org(o), 6);

    list_open(w, "users");
    for (uint32_t i = 0; i < o->users.len; i++)
        list_item(w, kl_render_user(o->users.items[i]));
    list_close(w);

    list_open(w, "service_accounts");
    for (uint32_t i = 0; i < o->sas.len; i++) {
        const kl_sa *s = o->sas.items[i];
        json_t *v = kl_render_sa(s);
        /* An account deleted while active has no deactivated_at of its own
         * (the fold leaves it 0): it stopped when it was deleted. */
        if (v != NULL && s->deleted && s->deactivated_at == 0)
            json_object_set_new(v, "deactivated_at", kl_json_time(s->updated_at));
        list_item(w, s->deleted ? mark_deleted(v) : v);
    }
    list_close(w);

    /* The live keys and this org's run of deleted ones, merged by id. */
    size_t lo = 0, hi = c->ndeleted;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (memcmp(kl_key_org(c->deleted[mid])->id.b, o->id.b, sizeof o->id.b) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    size_t d = lo;
    uint32_t i = 0;
    list_open(w, "api_keys");
    for (;;) {
        const kl_key *live = i < o->keys.len ? o->keys.items[i] : NULL;
        const kl_key *gone = d < c->ndeleted && kl_key_org(c->deleted[d]) == o
                                 ? c->deleted[d] : NULL;
        if (live == NULL && gone == NULL)
            break;
        if (gone == NULL ||
            (live != NULL && memcmp(live->id.b, gone->id.b, sizeof live->id.b) < 0)) {
            list_item(w, kl_render_key(live, c->at));
            i++;
        } else {
            list_item(w, mark_deleted(kl_render_key(gone, c->at)));
            d++;
        }
    }
    list_close(w);
    fputs("\n    }", w->out);
}

static int put_state(const state_ctx *c, const kl_org *only)
{
    writer w = {.out = stdout};
    char at[KL_TIME_TEXT_LEN + 1];
    kl_time_format(c->at, at);
    printf("{\n  \"at\": \"%s\",\n  \"seq\": %" PRIu64 ",\n  \"orgs\": [", at,
           kl_proj_seq(c->proj));
    uint32_t n = only != NULL ? 1 : kl_proj_org_count(c->proj);
    for (uint32_t i = 0; i < n && w.rc == KL_OK; i++) {
        fputs(i == 0 ? "\n" : ",\n", stdout);
        put_org(&w, c, only != NULL ? only : kl_proj_org_at(c->proj, i));
    }
    fputs(n == 0 ? "]\n}\n" : "\n  ]\n}\n", stdout);
    if (w.rc != KL_OK) {
        fprintf(stderr, "keyledger: out of memory writing the state\n");
        return 1;
    }
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "keyledger: cannot write the output: %s\n", strerror(errno));
        return 1;
    }
    return 0;
}

/* ---- the command ------------------------------------------------------ */

int kl_tool_state(int argc, char **argv)
{
    static const struct option opts[] = {
        {"data", required_argument, NULL, 'd'},
        {"at", required_argument, NULL, 'a'},
        {"org", required_argument, NULL, 'o'},
        {NULL, 0, NULL, 0},
    };
    const char *data = NULL, *at = NULL;
    bool has_org = false;
    kl_id org_id;
    state_ctx c = {0};
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'd':
            data = optarg;
            break;
        case 'a':
            at = optarg;
            if (kl_time_parse(at, strlen(at), &c.at) != KL_OK) {
                fprintf(stderr, "keyledger: --at must be an RFC 3339 time such "
                        "as 2026-01-15T10:30:00.000Z, not \"%s\"\n", at);
                goto usage;
            }
            break;
        case 'o':
            if (kl_id_parse(KL_ID_ORG, optarg, strlen(optarg), &org_id) != KL_OK) {
                fprintf(stderr, "keyledger: --org must be an organization id "
                        "(org_ and 26 characters), not \"%s\"\n", optarg);
                goto usage;
            }
            has_org = true;
            break;
        default:
            goto usage;
        }
    }
    if (optind != argc || data == NULL || at == NULL)
        goto usage;

    if (kl_proj_new(&c.proj) != KL_OK) {
        fprintf(stderr, "keyledger: out of memory\n");
        return 1;
    }
    setvbuf(stdout, NULL, _IOFBF, (size_t)1 << 16);
    int rc = kl_tool_walk(data, 0, on_record, &c, &c.err);
    const kl_org *only = NULL;
    if (rc == 0 && has_org && (only = kl_proj_org(c.proj, &org_id)) == NULL) {
        fprintf(stderr, "keyledger: no such organization at that time\n");
        rc = 1;
    }
    if (rc == 0) {
        if (c.ndeleted > 1)
            qsort(c.deleted, c.ndeleted, sizeof *c.deleted, cmp_org_key);
        rc = put_state(&c, only);
    }
    free(c.deleted);
    kl_proj_free(c.proj);
    return rc;
usage:
    fprintf(stderr, "usage: keyledger state --data DIR --at TIME [--org ID]\n");
    return 2;
}
