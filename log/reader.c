/*
 * Random access to the log by seq: what the audit queries read events with,
 * while the daemon goes on appending.
 *
 * It reads the files described at the top of log/log.c, and of them only:
 *
 *   MANIFEST    "first NNNNNNNNNNNNNNNNNNNN.log": where the log begins
 *   NNNNNNNNNNNNNNNNNNNN.log   segments named by their first seq (20 digits)
 *   segment:    64-byte header (magic "KLEDGERL", header size u32 at 12,
 *               first seq u64 at 16, CRC-32C of bytes 0..59 at 60), then
 *               records  u32 length (LE) | u32 CRC-32C (LE) | payload
 *
 * Records are walked by their length framing alone; the payload is never
 * looked into (its fixed prefix belongs to log.c and event.c), only
 * checked against its CRC when it is read. Record i of a segment is seq
 * first_seq + i: sequence continuity is what kl_log_open and
 * kl_log_verify check; here the caller checks the seq it decodes.
 *
 * The index (seq -> segment, offset) is built lazily: a segment is walked
 * only when a seq in it is asked for, and only up to that seq. Offsets are
 * 4 bytes; the rare segment over 4 GiB (segment_bytes allows 1 TiB) adds
 * one entry per 4 GiB crossed. New records are found by walking on from
 * where the index ends; new segments by listing the directory again.
 *
 * Concurrency: the reader has its own read-only descriptors, never takes
 * the LOCK and only uses pread. The writer only appends, and cuts back only
 * records it never acknowledged (a failed write, a torn tail at startup).
 * A zero length is the writer's room (log/log.c): the records end there.
 * Because the index never goes past the seq asked for, it covers only
 * acknowledged records as long as callers ask only for those (the daemon
 * asks for seqs it has applied); a seq past the written end is KL_ENOENT.
 */
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum {
    HEADER_SIZE = 64,
    MAX_RECORD = 1 << 20,
    CHUNK = 64 << 10,           /* bytes read at a time to walk headers */
    MAX_OPEN = 8,               /* descriptors kept open at once */
    MAX_SEGMENTS = 1 << 20
};

typedef struct rseg {
    uint64_t first_seq;
    int fd;                     /* -1 while closed */
    uint64_t used;              /* reader tick of the last use */
    uint64_t end;               /* just past the last indexed record; 0 =
                                   header not checked yet */
    uint32_t *offs;             /* low 32 bits of record i's offset */
    uint64_t n, cap;
    uint64_t *wraps;            /* wraps[k]: first record at or past
                                   (k + 1) << 32 bytes */
    uint32_t nwraps;
} rseg;

struct kl_log_reader {
    char *dir;
    uint64_t first_seq;         /* where the log begins (MANIFEST) */
    rseg *segs;                 /* ascending first_seq */
    size_t nsegs, cap_segs;
    unsigned nopen;
    uint64_t tick;
    uint8_t *chunk;             /* CHUNK bytes */
};

/* ---- helpers ---------------------------------------------------------- */

__attribute__((format(printf, 4, 5)))
static void err_at(kl_err *err, const rseg *s, uint64_t offset, const char *fmt, ...)
{
    char name[32], what[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    kl_segment_name(s->first_seq, name);
    kl_err_set(err, "segment %s offset %" PRIu64 ": %s", name, offset, what);
    snprintf(err->segment, sizeof err->segment, "%s", name);
    err->offset = offset;
}

static int read_manifest(kl_log_reader *r, kl_err *err)
{
    uint64_t last;
    return kl_read_manifest(r->dir, &r->first_seq, &last, err);
}

/* ---- segments --------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Adds the segments newer than the last one known. Earlier ones never
 * appear while a log is in use: the writer only rolls forward. */
static int list_segments(kl_log_reader *r, kl_err *err)
{
    DIR *d = opendir(r->dir);
    if (d == NULL) {
        kl_err_set(err, "open data dir %s: %s", r->dir, strerror(errno));
        return KL_EIO;
    }
    uint64_t after = r->nsegs ? r->segs[r->nsegs - 1].first_seq : r->first_seq - 1;
    uint64_t *found = NULL;
    size_t nfound = 0, cap = 0;
    int rc = KL_OK;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        uint64_t s;
        if (!kl_segment_file(de->d_name, &s) || s <= after)
            continue;
        if (r->nsegs + nfound >= MAX_SEGMENTS) {
            kl_err_set(err, "more than %d segments in %s", MAX_SEGMENTS, r->dir);
            rc = KL_ECORRUPT;
            goto cleanup;
        }
        if (nfound == cap) {
            cap = cap ? cap * 2 : 16;
            uint64_t *p = realloc(found, cap * sizeof *p);
            if (p == NULL) {
                rc = KL_ENOMEM;
                goto cleanup;
            }
            found = p;
        }
        found[nfound++] = s;
    }
    if (r->nsegs + nfound > r->cap_segs) {
        size_t c = r->cap_segs ? r->cap_segs : 16;
        while (c < r->nsegs + nfound)
            c *= 2;
        rseg *p = realloc(r->segs, c * sizeof *p);
        if (p == NULL) {
            rc = KL_ENOMEM;
            goto cleanup;
        }
        r->segs = p;
        r->cap_segs = c;
    }
    if (nfound > 0)
        qsort(found, nfound, sizeof *found, cmp_u64);
    for (size_t i = 0; i < nfound; i++)
        r->segs[r->nsegs++] = (rseg){.first_seq = found[i], .fd = -1};
cleanup:
    closedir(d);
    free(found);
    return rc;
}

static void seg_close(kl_log_reader *r, rseg *s)
{
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
        r->nopen--;
    }
}

/* Opens a segment (closing the least recently used one past MAX_OPEN) and
 * checks its header the first time. */
static int seg_open(kl_log_reader *r, rseg *s, kl_err *err)
{
    int rc = KL_OK;
    s->used = ++r->tick;
    if (s->fd >= 0)
        return KL_OK;
    if (r->nopen >= MAX_OPEN) {
        rseg *lru = NULL;
        for (size_t i = 0; i < r->nsegs; i++)
            if (r->segs[i].fd >= 0 && (lru == NULL || r->segs[i].used < lru->used))
                lru = &r->segs[i];
        seg_close(r, lru);
    }
    char name[32], path[4200];
    kl_segment_name(s->first_seq, name);
    snprintf(path, sizeof path, "%s/%s", r->dir, name);
    s->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (s->fd < 0) {
        kl_err_set(err, "segment %s: %s", name, strerror(errno));
        return KL_EIO;
    }
    r->nopen++;
    if (s->end != 0)
        return KL_OK;
    uint8_t h[HEADER_SIZE];
    ssize_t got = kl_read_all(s->fd, h, sizeof h, 0);
    if (got < 0) {
        err_at(err, s, 0, "read header: %s", strerror(errno));
        rc = KL_EIO;
    } else if (got != HEADER_SIZE || memcmp(h, "KLEDGERL", 8) != 0 ||
               get_u32(h + 60) != kl_crc32c(0, h, 60) ||
               get_u32(h + 12) != HEADER_SIZE || get_u64(h + 16) != s->first_seq) {
        err_at(err, s, 0, "bad segment header");
        rc = KL_ECORRUPT;
    }
    if (rc != KL_OK) {
        seg_close(r, s);        /* checked again next time */
        return rc;
    }
    s->end = HEADER_SIZE;
    return KL_OK;
}

static uint64_t seg_offset(const rseg *s, uint64_t i)
{
    uint64_t hi = 0;
    while (hi < s->nwraps && s->wraps[hi] <= i)
        hi++;
    return hi << 32 | s->offs[i];
}

static int seg_push(rseg *s, uint64_t off)
{
    if (s->n == s->cap) {
        uint64_t cap = s->cap ? s->cap * 2 : 256;
        uint32_t *p = realloc(s->offs, cap * sizeof *p);
        if (p == NULL)
            return KL_ENOMEM;
        s->offs = p;
        s->cap = cap;
    }
    /* A record is at most 1 MiB, so offsets cross 4 GiB lines one at a time. */
    if (off >> 32 > s->nwraps) {
        uint64_t *w = realloc(s->wraps, (s->nwraps + 1) * sizeof *w);
        if (w == NULL)
            return KL_ENOMEM;
        s->wraps = w;
        s->wraps[s->nwraps++] = s->n;
    }
    s->offs[s->n++] = (uint32_t)off;
    return KL_OK;
}

/* Walks on from the end of the index until record `want` is indexed or the
 * file ends (also in a record still being written: not an error). */
static int seg_walk(kl_log_reader *r, rseg *s, uint64_t want, kl_err *err)
{
    int rc = seg_open(r, s, err);
    if (rc != KL_OK)
        return rc;
    struct stat st;
    if (fstat(s->fd, &st) != 0) {
        err_at(err, s, s->end, "stat: %s", strerror(errno));
        return KL_EIO;
    }
    uint64_t size = (uint64_t)st.st_size;
    while (s->n <= want && size > s->end && size - s->end >= 8) {
        uint64_t n = size - s->end < CHUNK ? size - s->end : CHUNK;
        ssize_t got = kl_read_all(s->fd, r->chunk, (size_t)n, s->end);
        if (got < 0) {
            err_at(err, s, s->end, "read: %s", strerror(errno));
            return KL_EIO;
        }
        if (got < 8)
            break;              /* the file shrank: nothing more to index */
        uint64_t pos = 0;
        while (s->n <= want && pos + 8 <= (uint64_t)got) {
            uint64_t off = s->end + pos;
            uint32_t len = get_u32(r->chunk + pos);
            if (len == 0)
                break;          /* the writer's room: nothing written yet */
            if (len > MAX_RECORD) {
                err_at(err, s, off, "record length %" PRIu32 " out of bounds", len);
                return KL_ECORRUPT;
            }
            if (size - off - 8 < len)
                break;          /* not wholly written (yet) */
            if ((rc = seg_push(s, off)) != KL_OK)
                return rc;
            pos += 8 + (uint64_t)len;
        }
        if (pos == 0)
            break;
        s->end += pos;
    }
    return KL_OK;
}

/* Index of the segment that would hold `seq`, or -1 if it is before all. */
static ptrdiff_t seg_find(const kl_log_reader *r, uint64_t seq)
{
    size_t lo = 0, hi = r->nsegs;  /* the answer is lo - 1 */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (r->segs[mid].first_seq <= seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (ptrdiff_t)lo - 1;
}

/* ---- the reader --------------------------------------------------------- */

int kl_log_reader_open(const char *dir, kl_log_reader **out, kl_err *err)
{
    int rc;
    kl_log_reader *r = calloc(1, sizeof *r);
    if (r == NULL)
        return KL_ENOMEM;
    r->dir = strdup(dir);
    r->chunk = malloc(CHUNK);
    if (r->dir == NULL || r->chunk == NULL) {
        rc = KL_ENOMEM;
        goto cleanup;
    }
    if (strlen(dir) > 4096) {
        kl_err_set(err, "data dir path too long");
        rc = KL_EINVAL;
        goto cleanup;
    }
    if ((rc = read_manifest(r, err)) != KL_OK || (rc = list_segments(r, err)) != KL_OK)
        goto cleanup;
    if (r->nsegs == 0 || r->segs[0].first_seq != r->first_seq) {
        char name[32];
        kl_segment_name(r->first_seq, name);
        kl_err_set(err, "segment %s named in MANIFEST is missing from %s", name,
                   r->dir);
        rc = KL_ECORRUPT;
        goto cleanup;
    }
    *out = r;
    return KL_OK;
cleanup:
    kl_log_reader_close(r);
    return rc;
}

void kl_log_reader_close(kl_log_reader *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->nsegs; i++) {
        seg_close(r, &r->segs[i]);
        free(r->segs[i].offs);
        free(r->segs[i].wraps);
    }
    free(r->segs);
    free(r->chunk);
    free(r->dir);
    free(r);
}

/* n bytes at off, all of them, for the record at `rec`. */
static int read_exact(rseg *s, void *buf, size_t n, uint64_t off, uint64_t rec,
                      kl_err *err)
{
    ssize_t got = kl_read_all(s->fd, buf, n, off);
    if (got < 0) {
        err_at(err, s, rec, "read: %s", strerror(errno));
        return KL_EIO;
    }
    if ((size_t)got != n) {
        err_at(err, s, rec, "record cut short (the segment shrank)");
        return KL_ECORRUPT;
    }
    return KL_OK;
}

static int record_read(kl_log_reader *r, rseg *s, uint64_t i, kl_buf *payload,
                       uint8_t hash[KL_HASH_LEN], kl_err *err)
{
    int rc = seg_open(r, s, err);
    if (rc != KL_OK)
        return rc;
    uint64_t off = seg_offset(s, i);
    uint8_t h[8];
    if ((rc = read_exact(s, h, sizeof h, off, off, err)) != KL_OK)
        return rc;
    uint32_t len = get_u32(h);
    if (len == 0 || len > MAX_RECORD) {
        err_at(err, s, off, "record length %" PRIu32 " out of bounds", len);
        return KL_ECORRUPT;
    }
    payload->len = 0;
    if (kl_buf_reserve(payload, len) != KL_OK)
        return KL_ENOMEM;
    if ((rc = read_exact(s, payload->data, len, off + 8, off, err)) != KL_OK)
        return rc;
    if (kl_crc32c(0, payload->data, len) != get_u32(h + 4)) {
        err_at(err, s, off, "record CRC does not match");
        return KL_ECORRUPT;
    }
    payload->len = len;
    if (hash != NULL)
        kl_sha256(payload->data, len, hash);
    return KL_OK;
}

int kl_log_reader_get(kl_log_reader *r, uint64_t seq, kl_buf *payload,
                      uint8_t hash[KL_HASH_LEN], kl_err *err)
{
    /* A seq past the known segments may be in one rolled since the last
     * listing: list once more, then give up. */
    for (int pass = 0; seq >= r->first_seq && pass < 2; pass++) {
        ptrdiff_t i = seg_find(r, seq);
        if (i >= 0) {
            rseg *s = &r->segs[i];
            uint64_t want = seq - s->first_seq;
            int rc = seg_walk(r, s, want, err);
            if (rc != KL_OK)
                return rc;
            if (want < s->n)
                return record_read(r, s, want, payload, hash, err);
            if ((size_t)i + 1 < r->nsegs) {
                err_at(err, s, s->end, "segment ends at seq %" PRIu64 " but the "
                       "next one begins at %" PRIu64, s->first_seq + s->n - 1,
                       r->segs[i + 1].first_seq);
                return KL_ECORRUPT;
            }
        }
        if (pass == 0) {
            int rc = list_segments(r, err);
            if (rc != KL_OK)
                return rc;
        }
    }
    kl_err_set(err, "seq %" PRIu64 " is not in the log", seq);
    return KL_ENOENT;
}
