/*
 * The event log on disk.
 *
 * A data dir holds:
 *
 *   LOCK        flock()ed by the one writer (daemon or writing tool); holds
 *               the writer's pid, for the error message of the next one.
 *   MANIFEST    a few text lines, replaced atomically (temp, fsync, rename,
 *               fsync dir):
 *                 keyledger-manifest 1
 *                 first 00000000000000000001.log
 *                 last 00000000000000001234.log
 *               "first" is where the log begins, "last" the newest segment
 *               known when the manifest was written (a newer one may exist
 *               after a crash during a roll; an older one missing is damage).
 *   NNNNNNNNNNNNNNNNNNNN.log   segments, named by their first seq (20 digits).
 *
 * A segment is a 64-byte header followed by records, all integers little
 * endian:
 *
 *   header:  magic "KLEDGERL" (8) | format version u32 (1) | header size u32
 *            (64) | first seq u64 | chain hash carried in (32) | reserved u32
 *            (0) | CRC-32C of the 60 bytes before it u32
 *   record:  payload length u32 | CRC-32C of the payload u32 | payload
 *
 * A payload is a msgpack array (log/event.c) whose first four elements are
 * written with fixed encodings so they can be read without a parser:
 *
 *   0x9a | 0xcf seq (u64 big endian) | 0xc4 0x20 prev (32 bytes) |
 *   more (0xc2 false, 0xc3 true) | ...
 *
 * `more` groups records: one command's events are written together and
 * only the last has more = false. A group is all or nothing: a log whose
 * last record says more = true ends in the middle of a command (a crash
 * while its batch was being written), and recovery treats the whole
 * unfinished group as torn. Segments roll only between batches, so a group
 * never spans two segments.
 *
 * The hash chain: prev is the hash of the record before (zeros for seq 1),
 * and a record's hash is SHA-256 of its whole payload, so each hash covers
 * the one before it. A segment header carries the hash of the record before
 * its first one.
 *
 * A record is valid when its length is within 1..KL_LOG_MAX_RECORD, it lies
 * wholly inside the file, its CRC matches, its payload starts with the fixed
 * prefix, and its seq is one more than the record before it.
 *
 * Room: a writer with cfg.room_bytes writes zeros ahead of its records and
 * then writes its records over them, so that the fdatasync after a batch
 * writes the batch only, not also the file's new size (a second write to
 * the disk on every sync). A zero length field, with nothing but zeros
 * from there to the end of the file, is room: the records end there. The
 * writer cuts the room when it rolls, closes or opens; a crash leaves it,
 * and readers stop at it.
 *
 * Recovery (kl_log_open): every segment but the last must be valid to its
 * end (or its room) and end on a finished group. In the last, the first
 * invalid record is a torn tail when no valid record starts anywhere after
 * it: the file is cut there (or where the unfinished group before it
 * began) and fsynced, and the cut is reported. If a valid record does
 * follow, that is damage and the open fails naming the segment and offset. Startup checks CRCs and links
 * between segments; the full chain (every prev against the hash of the
 * record before) is checked by kl_log_verify, which `keyledger verify` runs.
 *
 * Snapshots (snapshot.c) and the switch to a compacted log (compact.c) live
 * beside the segments; log/internal.h is what the three files share.
 *
 * Writing: kl_log_frame builds records in memory and advances the head;
 * kl_log_write puts a batch at the end of the last segment with pwrite and
 * syncs it. A failed or short write is cut back so the file ends on a record
 * boundary again. A failed fsync makes the log read-only for good: the
 * kernel may have dropped the dirty pages, so a later fsync proves nothing.
 */
#include "internal.h"

#include <dirent.h>
#include <stdarg.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

enum {
    HEADER_SIZE = 64,
    FORMAT_VERSION = 2,
    PREFIX_SIZE = KL_RECORD_PREFIX_LEN, /* 0x9a, seq (9), prev (34), more (1) */
    MAX_SEGMENTS = 1 << 20
};
#define KL_LOG_MAX_RECORD (1u << 20)
static const char MAGIC[8] = {'K', 'L', 'E', 'D', 'G', 'E', 'R', 'L'};

/* Open remembers where every MARK_EVERY-th record of a segment it scanned
 * starts, so a replay from a seq deep in a segment (the tail after a
 * snapshot) need not walk every record before it. */
enum { MARK_EVERY = 4096 };

typedef struct segment {
    uint64_t first_seq;
    uint64_t size;              /* bytes that are valid (after any cut) */
    uint64_t *marks;            /* marks[i]: record first_seq + i * MARK_EVERY */
    size_t nmarks;
} segment;

struct kl_log {
    kl_log_config cfg;
    char *dir;
    int lock_fd;
    int fd;                     /* the last segment, open for writing */
    segment *segs;
    size_t nsegs, cap_segs;
    uint64_t head_seq;          /* last framed record */
    uint8_t head_hash[KL_HASH_LEN];
    uint8_t first_prev[KL_HASH_LEN];    /* the hash the log goes on from */
    uint64_t room;              /* the last segment's file size: zeros from
                                   its records' end to here */
    bool failed;                /* an fsync failed: read-only until reopened */
};

/* ---- small helpers ---------------------------------------------------- */

/* Errors about a place in the log name the segment and the byte offset, in
 * the message and in err->segment / err->offset. */
__attribute__((format(printf, 4, 5)))
static void err_where(kl_err *err, const char *seg, uint64_t offset,
                      const char *fmt, ...)
{
    char what[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    kl_err_set(err, "segment %s offset %" PRIu64 ": %s", seg, offset, what);
    snprintf(err->segment, sizeof err->segment, "%s", seg);
    err->offset = offset;
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

void kl_segment_name(uint64_t first_seq, char out[32])
{
    snprintf(out, 32, "%020" PRIu64 ".log", first_seq);
}

char *kl_path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p != NULL)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int kl_write_all(int fd, const void *p, size_t n, off_t off)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = pwrite(fd, c, n, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno == ENOSPC || errno == EDQUOT ? KL_ENOSPC : KL_EIO;
        }
        if (w == 0)
            return KL_ENOSPC;
        c += w;
        n -= (size_t)w;
        off += w;
    }
    return KL_OK;
}

ssize_t kl_read_all(int fd, void *p, size_t n, uint64_t off)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (char *)p + got, n - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

int kl_fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return KL_EIO;
    int rc = fsync(fd) == 0 ? KL_OK : KL_EIO;
    close(fd);
    return rc;
}

/* Writes `head` then `body` as file `name` in dir: temp, fsync, rename,
 * fsync the dir, so the file is either whole or not there. */
int kl_write_file_atomic(const char *dir, const char *name, const void *head,
                             size_t head_len, const void *body, size_t body_len,
                             kl_err *err)
{
    int rc = KL_EIO, fd = -1;
    char tmpname[64];
    snprintf(tmpname, sizeof tmpname, "%s.tmp", name);
    char *tmp = kl_path_join(dir, tmpname), *dst = kl_path_join(dir, name);
    if (tmp == NULL || dst == NULL) {
        rc = KL_ENOMEM;
        goto cleanup;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        kl_err_set(err, "create %s: %s", tmp, strerror(errno));
        goto cleanup;
    }
    rc = kl_write_all(fd, head, head_len, 0);
    if (rc == KL_OK && body_len > 0)
        rc = kl_write_all(fd, body, body_len, (off_t)head_len);
    if (rc != KL_OK) {
        kl_err_set(err, "write %s: %s", tmp, strerror(errno));
        goto cleanup;
    }
    if (fsync(fd) != 0 || rename(tmp, dst) != 0 || kl_fsync_dir(dir) != KL_OK) {
        kl_err_set(err, "replace %s: %s", dst, strerror(errno));
        rc = KL_EIO;
        goto cleanup;
    }
    rc = KL_OK;
cleanup:
    if (fd >= 0)
        close(fd);
    if (rc != KL_OK && tmp != NULL)
        unlink(tmp);
    free(tmp);
    free(dst);
    return rc;
}

static int write_manifest(const char *dir, uint64_t first, uint64_t last,
                          kl_err *err)
{
    char a[32], b[32], text[160];
    kl_segment_name(first, a);
    kl_segment_name(last, b);
    int n = snprintf(text, sizeof text, "keyledger-manifest 1\nfirst %s\nlast %s\n",
                     a, b);
    return kl_write_file_atomic(dir, "MANIFEST", text, (size_t)n, NULL, 0, err);
}

int kl_read_manifest(const char *dir, uint64_t *first, uint64_t *last,
                         kl_err *err)
{
    char *path = kl_path_join(dir, "MANIFEST");
    if (path == NULL)
        return KL_ENOMEM;
    FILE *fp = fopen(path, "re");
    free(path);
    if (fp == NULL) {
        kl_err_set(err, "no keyledger log in %s (MANIFEST: %s); create one "
                   "with `keyledger init`", dir, strerror(errno));
        return KL_ENOENT;
    }
    char text[256];
    size_t n = fread(text, 1, sizeof text - 1, fp);
    fclose(fp);
    text[n] = '\0';
    unsigned long long f, l;
    if (sscanf(text, "keyledger-manifest 1\nfirst %20llu.log\nlast %20llu.log\n",
               &f, &l) != 2 || f == 0 || l < f) {
        kl_err_set(err, "%s/MANIFEST is not a keyledger manifest of format 1",
                   dir);
        return KL_ECORRUPT;
    }
    *first = f;
    *last = l;
    return KL_OK;
}

static void header_build(uint8_t h[HEADER_SIZE], uint64_t first_seq,
                         const uint8_t prev[KL_HASH_LEN])
{
    memset(h, 0, HEADER_SIZE);
    memcpy(h, MAGIC, 8);
    put_u32(h + 8, FORMAT_VERSION);
    put_u32(h + 12, HEADER_SIZE);
    put_u64(h + 16, first_seq);
    memcpy(h + 24, prev, KL_HASH_LEN);
    put_u32(h + 60, kl_crc32c(0, h, 60));
}

/* Creates a segment whole (temp + rename) so a segment file with its final
 * name always has a complete header. */
static int segment_create(const char *dir, uint64_t first_seq,
                          const uint8_t prev[KL_HASH_LEN], kl_err *err)
{
    uint8_t h[HEADER_SIZE];
    char name[32];
    header_build(h, first_seq, prev);
    kl_segment_name(first_seq, name);
    return kl_write_file_atomic(dir, name, h, sizeof h, NULL, 0, err);
}

/* ---- reading segments -------------------------------------------------- */

/* A segment's bytes. A replay by the writer maps the file (nobody else
 * changes it while the writer holds the lock, and a replay from a mark
 * touches only the pages after it). A read-only log copies its files
 * instead: a running daemon may cut a file it reads (its room at a roll, a
 * torn tail at its start), and a mapping past a file's new end faults the
 * reader; a copy just ends sooner. An open's scan, which reads every byte,
 * copies each file into a buffer its scanner keeps from one segment to the
 * next (`into`): on a VM the first touch of each page of a mapping costs
 * more than the copy (the scan of a million events took ~55 ms, not 155-170). */
typedef struct mapped {
    const uint8_t *data;
    size_t size;
    bool copied;                /* data is a copy, not a mapping */
    kl_buf own;                 /* the copy, when the caller gave no buffer */
} mapped;

static int segment_map(const kl_log *log, uint64_t first_seq, kl_buf *into, mapped *m,
                       kl_err *err)
{
    char name[32];
    kl_segment_name(first_seq, name);
    char *path = kl_path_join(log->dir, name);
    if (path == NULL)
        return KL_ENOMEM;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    free(path);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        kl_err_set(err, "segment %s: %s", name, strerror(errno));
        if (fd >= 0)
            close(fd);
        return KL_EIO;
    }
    *m = (mapped){.size = (size_t)st.st_size, .copied = into != NULL || log->cfg.read_only};
    int rc = KL_OK;
    if (m->size > 0 && m->copied) {
        kl_buf *b = into != NULL ? into : &m->own;
        ssize_t got = 0;
        b->len = 0;
        if (kl_buf_reserve(b, m->size) != KL_OK) {
            kl_err_set(err, "segment %s: out of memory", name);
            rc = KL_ENOMEM;
        } else if ((got = kl_read_all(fd, b->data, m->size, 0)) < 0) {
            kl_err_set(err, "segment %s: %s", name, strerror(errno));
            rc = KL_EIO;
        } else {
            m->data = (const uint8_t *)b->data;
            m->size = (size_t)got;      /* less if it was cut meanwhile */
        }
        if (rc != KL_OK)
            kl_buf_free(&m->own);
    } else if (m->size > 0) {
        void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            kl_err_set(err, "segment %s: mmap: %s", name, strerror(errno));
            rc = KL_EIO;
        } else {
            madvise(p, m->size, MADV_SEQUENTIAL);
            m->data = p;
        }
    }
    close(fd);
    return rc;
}

static void segment_unmap(mapped *m)
{
    if (m->data != NULL && !m->copied)
        munmap((void *)m->data, m->size);
    kl_buf_free(&m->own);
    m->data = NULL;
}

typedef enum { REC_OK = 0, REC_TORN, REC_BAD } rec_status;

/* The fixed payload prefix: array header, seq, prev, more. */
static bool prefix_ok(const uint8_t *p)
{
    return p[0] == 0x9a && p[1] == 0xcf && p[10] == 0xc4 && p[11] == 0x20 &&
           (p[44] == 0xc2 || p[44] == 0xc3);
}

/* Does another record of the same command follow this one? */
static bool record_more(const mapped *m, size_t off)
{
    return m->data[off + 8 + 44] == 0xc3;
}

/* Checks the record at `off`: framing, the fixed payload prefix and (with
 * `crc`) the CRC. REC_TORN: it runs past the end of the file. */
static rec_status record_check(const mapped *m, size_t off, bool crc,
                               uint32_t *len_out, uint64_t *seq_out)
{
    if (m->size - off < 8)
        return REC_TORN;
    uint32_t len = get_u32(m->data + off);
    if (len < PREFIX_SIZE || len > KL_LOG_MAX_RECORD)
        return REC_BAD;
    if (m->size - off - 8 < len)
        return REC_TORN;
    const uint8_t *p = m->data + off + 8;
    if (!prefix_ok(p))
        return REC_BAD;
    if (crc && kl_crc32c(0, p, len) != get_u32(m->data + off + 4))
        return REC_BAD;
    *len_out = len;
    *seq_out = get_be64(p + 2);
    return REC_OK;
}

/* Room (see the top): from `off` to the end of the file only zeros. */
static bool is_room(const mapped *m, size_t off)
{
    static const uint8_t zeros[4096];
    while (off < m->size) {
        size_t n = m->size - off < sizeof zeros ? m->size - off : sizeof zeros;
        if (memcmp(m->data + off, zeros, n) != 0)
            return false;
        off += n;
    }
    return true;
}

/* After an invalid record at `bad`: does a valid record start anywhere
 * later? Then the invalid one is damage, not a torn tail. */
static bool valid_record_after(const mapped *m, size_t bad)
{
    for (size_t off = bad + 1; off + 8 + PREFIX_SIZE <= m->size; off++) {
        if (!prefix_ok(m->data + off + 8))
            continue;           /* cheap filter before the CRC */
        uint32_t len;
        uint64_t seq;
        if (record_check(m, off, true, &len, &seq) == REC_OK)
            return true;
    }
    return false;
}

static int header_check(const mapped *m, uint64_t first_seq, const char *name,
                        uint8_t prev[KL_HASH_LEN], kl_err *err)
{
    const uint8_t *h = m->data;
    if (m->size < HEADER_SIZE || memcmp(h, MAGIC, 8) != 0 ||
        get_u32(h + 60) != kl_crc32c(0, h, 60)) {
        err_where(err, name, 0, "bad segment header");
        return KL_ECORRUPT;
    }
    if (get_u32(h + 8) != FORMAT_VERSION || get_u32(h + 12) != HEADER_SIZE) {
        kl_err_set(err, "segment %s: format version %u is not supported",
                   name, get_u32(h + 8));
        return KL_EUNKNOWN;
    }
    if (get_u64(h + 16) != first_seq) {
        err_where(err, name, 16, "header says first seq %" PRIu64,
                  get_u64(h + 16));
        return KL_ECORRUPT;
    }
    memcpy(prev, h + 24, KL_HASH_LEN);
    return KL_OK;
}

/* ---- listing --------------------------------------------------------- */

static int cmp_seg(const void *a, const void *b)
{
    uint64_t x = ((const segment *)a)->first_seq, y = ((const segment *)b)->first_seq;
    return x < y ? -1 : x > y;
}

static int segs_push(kl_log *log, uint64_t first)
{
    if (log->nsegs == log->cap_segs) {
        size_t cap = log->cap_segs ? log->cap_segs * 2 : 16;
        segment *p = realloc(log->segs, cap * sizeof *p);
        if (p == NULL)
            return KL_ENOMEM;
        log->segs = p;
        log->cap_segs = cap;
    }
    log->segs[log->nsegs++] = (segment){first, 0, NULL, 0};
    return KL_OK;
}

bool kl_segment_file(const char *n, uint64_t *first)
{
    return strlen(n) == 24 && strcmp(n + 20, ".log") == 0 &&
           kl_parse_u64(n, 20, first) && *first > 0;
}

static int list_segments(kl_log *log, uint64_t first, uint64_t last, kl_err *err)
{
    DIR *d = opendir(log->dir);
    if (d == NULL) {
        kl_err_set(err, "open data dir %s: %s", log->dir, strerror(errno));
        return KL_EIO;
    }
    int rc = KL_OK;
    struct dirent *de;
    while (rc == KL_OK && (de = readdir(d)) != NULL) {
        uint64_t s;
        if (kl_segment_file(de->d_name, &s) && s >= first) {
            if (log->nsegs >= MAX_SEGMENTS) {
                kl_err_set(err, "more than %d segments in %s", MAX_SEGMENTS,
                           log->dir);
                rc = KL_ECORRUPT;
            } else {
                rc = segs_push(log, s);
            }
        }
    }
    closedir(d);
    if (rc != KL_OK)
        return rc;
    qsort(log->segs, log->nsegs, sizeof *log->segs, cmp_seg);
    if (log->nsegs == 0 || log->segs[0].first_seq != first) {
        char name[32];
        kl_segment_name(first, name);
        kl_err_set(err, "segment %s named in MANIFEST is missing from %s", name,
                   log->dir);
        return KL_ECORRUPT;
    }
    if (log->segs[log->nsegs - 1].first_seq < last) {
        char name[32];
        kl_segment_name(last, name);
        kl_err_set(err, "segment %s named in MANIFEST is missing from %s", name,
                   log->dir);
        return KL_ECORRUPT;
    }
    return KL_OK;
}

/* ---- open and recovery ------------------------------------------------ */

void kl_log_config_defaults(kl_log_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->segment_bytes = 64u << 20;
    cfg->fsync = KL_FSYNC_ALWAYS;
}

static int lock_dir(kl_log *log, kl_err *err)
{
    char *path = kl_path_join(log->dir, "LOCK");
    if (path == NULL)
        return KL_ENOMEM;
    log->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    free(path);
    if (log->lock_fd < 0) {
        kl_err_set(err, "open %s/LOCK: %s", log->dir, strerror(errno));
        return KL_EIO;
    }
    if (flock(log->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        char pid[32] = "";
        ssize_t n = pread(log->lock_fd, pid, sizeof pid - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        kl_err_set(err, "data dir %s is in use by another keyledger process%s%s%s",
                   log->dir, pid[0] ? " (pid " : "", pid, pid[0] ? ")" : "");
        return KL_ELOCKED;
    }
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(log->lock_fd, 0) != 0 ||
        kl_write_all(log->lock_fd, pid, (size_t)n, 0) != KL_OK) {
        kl_err_set(err, "write %s/LOCK: %s", log->dir, strerror(errno));
        return KL_EIO;
    }
    return KL_OK;
}

/* Marks record `seq` at `off` if it is the next one due. Without memory
 * for one, marking stops: the replay walks from the mark before, slower,
 * not wrong. */
static void mark(segment *seg, uint64_t seq, uint64_t off)
{
    if (seq - seg->first_seq != (uint64_t)seg->nmarks * MARK_EVERY)
        return;
    if ((seg->nmarks & (seg->nmarks - 1)) == 0) {   /* 0, 1, 2, 4, ...: full */
        uint64_t *p = realloc(seg->marks, (seg->nmarks ? seg->nmarks * 2 : 1) * sizeof *p);
        if (p == NULL)
            return;
        seg->marks = p;
    }
    seg->marks[seg->nmarks++] = off;
}

/* What scanning one segment found. The scans of a log's segments run side
 * by side (scan_all); what ties each to the one before is checked after,
 * in order. */
typedef struct scan {
    const kl_log *log;
    segment *seg;
    bool is_last;
    bool header_ok;             /* rc is about the records, not the header */
    int rc;
    kl_err err;
    uint8_t carried[KL_HASH_LEN];   /* the header's: the chain before it */
    uint8_t hash[KL_HASH_LEN];      /* its last record's (carried if none) */
    uint64_t records;           /* records in whole groups */
    uint64_t torn_bytes, torn_offset;
} scan;

/* Walks one segment's records, checking framing, CRC, sequence and groups.
 * Sets seg->size to the end of the last whole group; anything after it is
 * torn in the last segment, damage in any other. */
static void segment_scan(scan *sc, kl_buf *buf)
{
    segment *seg = sc->seg;
    mapped m;
    char name[32];
    kl_segment_name(seg->first_seq, name);
    sc->rc = segment_map(sc->log, seg->first_seq, buf, &m, &sc->err);
    if (sc->rc != KL_OK)
        return;
    sc->rc = header_check(&m, seg->first_seq, name, sc->carried, &sc->err);
    if (sc->rc != KL_OK)
        goto cleanup;
    sc->header_ok = true;
    memcpy(sc->hash, sc->carried, KL_HASH_LEN);
    /* `done` is the end of the last finished group: everything before it
     * is whole commands; `last` the last record before it (for the hash). */
    size_t off = HEADER_SIZE, done = HEADER_SIZE, last_off = 0;
    uint32_t last_len = 0;
    uint64_t expect = seg->first_seq;
    size_t end = m.size;        /* where the records end: the file's end
                                   or the start of its room */
    while (off < end) {
        uint32_t len;
        uint64_t seq;
        if (m.data[off] == 0 && is_room(&m, off)) {
            end = off;
            break;
        }
        rec_status st = record_check(&m, off, true, &len, &seq);
        if (st == REC_OK && seq != expect) {
            err_where(&sc->err, name, off, "seq %" PRIu64 " where %"
                       PRIu64 " was expected", seq, expect);
            sc->rc = KL_ECORRUPT;
            goto cleanup;
        }
        if (st != REC_OK) {
            if (!sc->is_last || valid_record_after(&m, off)) {
                err_where(&sc->err, name, off, "%s record",
                           st == REC_TORN ? "truncated" : "corrupt");
                sc->rc = KL_ECORRUPT;
                goto cleanup;
            }
            break;
        }
        if (off == HEADER_SIZE &&
            memcmp(m.data + off + 8 + 12, sc->carried, KL_HASH_LEN) != 0) {
            err_where(&sc->err, name, off, "first record's prev does "
                       "not match the segment header");
            sc->rc = KL_ECORRUPT;
            goto cleanup;
        }
        mark(seg, seq, off);
        bool more = record_more(&m, off);
        off += 8 + (size_t)len;
        expect++;
        if (!more) {
            last_off = off - 8 - len;
            last_len = len;
            done = off;
            sc->records = expect - seg->first_seq;
        }
    }
    if (!sc->is_last && done != off) {
        err_where(&sc->err, name, done, "the segment ends inside a command's "
                   "group of records");
        sc->rc = KL_ECORRUPT;
        goto cleanup;
    }
    if (done != end) {          /* a torn record or an unfinished group */
        sc->torn_bytes = end - done;
        sc->torn_offset = done;
    }
    seg->size = done;
    while (seg->nmarks > 0 && seg->marks[seg->nmarks - 1] >= done)
        seg->nmarks--;          /* records that were cut */
    if (last_len != 0)
        kl_sha256(m.data + last_off + 8, last_len, sc->hash);
cleanup:
    segment_unmap(&m);
}

/* Scanners take the segments in turn from a shared counter. */
typedef struct scan_pool {
    scan *scans;
    size_t n;
    size_t next;                /* atomic */
} scan_pool;

static void *scan_worker(void *arg)
{
    scan_pool *pool = arg;
    kl_buf buf = {0};           /* each segment's bytes in turn */
    for (size_t i; (i = __atomic_fetch_add(&pool->next, 1, __ATOMIC_RELAXED)) < pool->n;)
        segment_scan(&pool->scans[i], &buf);
    kl_buf_free(&buf);
    return NULL;
}

/* Scans every segment, two at a time when there are several (checking a
 * million records' CRCs is most of an open), then checks in order what
 * ties each to the one before. The first problem in log order is the one
 * reported, as a scan of one segment after the other would. Sets the head
 * seq and hash, and the hash the log goes on from. */
static int scan_all(kl_log *log, uint64_t first, kl_log_recovery *rec, kl_err *err)
{
    uint8_t *hash = log->head_hash;
    scan *scans = calloc(log->nsegs > 0 ? log->nsegs : 1, sizeof *scans);
    if (scans == NULL)
        return KL_ENOMEM;
    for (size_t i = 0; i < log->nsegs; i++)
        scans[i] = (scan){.log = log, .seg = &log->segs[i],
                          .is_last = i + 1 == log->nsegs};
    scan_pool pool = {scans, log->nsegs, 0};
    pthread_t t;
    bool helper = log->nsegs > 1 && pthread_create(&t, NULL, scan_worker, &pool) == 0;
    scan_worker(&pool);
    if (helper)
        pthread_join(t, NULL);

    int rc = KL_OK;
    uint64_t expect = first;
    for (size_t i = 0; i < log->nsegs && rc == KL_OK; i++) {
        const scan *sc = &scans[i];
        char name[32];
        kl_segment_name(sc->seg->first_seq, name);
        if (i == 0) {
            /* A log compaction replaced starts later: the chain goes on
             * from the hash its first segment's header carries in. */
            memset(hash, 0, KL_HASH_LEN);
            if (first != 1 && sc->header_ok)
                memcpy(hash, sc->carried, KL_HASH_LEN);
            memcpy(log->first_prev, hash, KL_HASH_LEN);
        }
        if (!sc->header_ok) {
            rc = sc->rc;
            *err = sc->err;
        } else if (sc->seg->first_seq != expect) {
            err_where(err, name, 0, "expected first seq %" PRIu64
                       " (a segment is missing?)", expect);
            rc = KL_ECORRUPT;
        } else if (memcmp(sc->carried, hash, KL_HASH_LEN) != 0) {
            err_where(err, name, 24, "carried chain hash does not "
                       "match the previous segment's last record");
            rc = KL_ECORRUPT;
        } else if (sc->rc != KL_OK) {
            rc = sc->rc;
            *err = sc->err;
        } else {
            expect += sc->records;
            rec->records += sc->records;
            memcpy(hash, sc->hash, KL_HASH_LEN);
            if (sc->torn_bytes != 0) {
                rec->torn_bytes = sc->torn_bytes;
                rec->torn_offset = sc->torn_offset;
                memcpy(rec->torn_segment, name, sizeof name);
            }
        }
    }
    free(scans);
    log->head_seq = expect - 1;
    return rc;
}

static int log_open(kl_log **out, const kl_log_config *cfg, kl_log_recovery *rec,
                    uint64_t *first_used, kl_err *err);

/*
 * A reader without the lock can lose a race with a compaction: it reads the
 * MANIFEST, the switch then replaces it and deletes the segments it named.
 * What looks like a missing segment is then a log that moved on: when the
 * MANIFEST names another first segment than the one the open used, the
 * open starts over (a few times: compactions are minutes apart).
 */
int kl_log_open(kl_log **out, const kl_log_config *cfg, kl_log_recovery *rec,
                kl_err *err)
{
    for (int attempt = 0;; attempt++) {
        uint64_t used = 0, first, last;
        kl_err again = {0};
        int rc = log_open(out, cfg, rec, &used, err);
        if (rc == KL_OK || !cfg->read_only || attempt == 3 || used == 0 ||
            kl_read_manifest(cfg->dir, &first, &last, &again) != KL_OK || first == used)
            return rc;
    }
}

static int log_open(kl_log **out, const kl_log_config *cfg, kl_log_recovery *rec,
                    uint64_t *first_used, kl_err *err)
{
    int rc;
    uint64_t first, last;
    kl_log *log = calloc(1, sizeof *log);
    if (log == NULL)
        return KL_ENOMEM;
    memset(rec, 0, sizeof *rec);
    log->cfg = *cfg;
    log->lock_fd = log->fd = -1;
    log->dir = strdup(cfg->dir);
    if (log->dir == NULL) {
        rc = KL_ENOMEM;
        goto cleanup;
    }
    log->cfg.dir = log->dir;
    /* Read twice: finishing a compaction replaces the MANIFEST. */
    if ((rc = kl_read_manifest(log->dir, &first, &last, err)) != KL_OK ||
        (!cfg->read_only && (rc = lock_dir(log, err)) != KL_OK) ||
        (rc = kl_compaction_leftovers(log->dir, !cfg->read_only, cfg->logger, err)) != KL_OK ||
        (rc = kl_read_manifest(log->dir, &first, &last, err)) != KL_OK)
        goto cleanup;
    *first_used = first;
    if ((rc = list_segments(log, first, last, err)) != KL_OK)
        goto cleanup;

    if ((rc = scan_all(log, first, rec, err)) != KL_OK)
        goto cleanup;

    segment *tail = &log->segs[log->nsegs - 1];
    char name[32];
    kl_segment_name(tail->first_seq, name);
    if (!cfg->read_only) {
        char *path = kl_path_join(log->dir, name);
        if (path == NULL) {
            rc = KL_ENOMEM;
            goto cleanup;
        }
        log->fd = open(path, O_RDWR | O_CLOEXEC);
        free(path);
        if (log->fd < 0) {
            kl_err_set(err, "open segment %s: %s", name, strerror(errno));
            rc = KL_EIO;
            goto cleanup;
        }
        /* Cut a torn tail, and room a crash left (it is made again). */
        struct stat st;
        if (fstat(log->fd, &st) != 0 ||
            ((uint64_t)st.st_size != tail->size &&
             (ftruncate(log->fd, (off_t)tail->size) != 0 || fsync(log->fd) != 0))) {
            kl_err_set(err, "cut the tail of %s: %s", name, strerror(errno));
            rc = KL_EIO;
            goto cleanup;
        }
        log->room = tail->size;
        if (tail->first_seq != last &&
            (rc = write_manifest(log->dir, first, tail->first_seq, err)) != KL_OK)
            goto cleanup;
    }
    *out = log;
    return KL_OK;
cleanup:
    kl_log_close(log);
    return rc;
}

/* The room past the records of the last segment cut off (before a roll
 * and at close), so that a stopped log holds records only. */
static void cut_room(kl_log *log, const segment *tail)
{
    if (log->room > tail->size && ftruncate(log->fd, (off_t)tail->size) == 0 &&
        fdatasync(log->fd) == 0)
        log->room = tail->size;
}

void kl_log_close(kl_log *log)
{
    if (log == NULL)
        return;
    if (log->fd >= 0) {
        cut_room(log, &log->segs[log->nsegs - 1]);
        close(log->fd);
    }
    if (log->lock_fd >= 0)
        close(log->lock_fd);   /* releases the flock */
    for (size_t i = 0; i < log->nsegs; i++)
        free(log->segs[i].marks);
    free(log->segs);
    free(log->dir);
    free(log);
}

int kl_log_create(const kl_log_config *cfg, kl_err *err)
{
    static const uint8_t zero[KL_HASH_LEN];
    return kl_log_create_after(cfg, 0, zero, err);
}

/* Whether dir holds a MANIFEST or any segment (a log whose MANIFEST was
 * lost is still a log). */
static bool holds_a_log(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return false;
    bool found = false;
    struct dirent *e;
    uint64_t s;
    while (!found && (e = readdir(d)) != NULL)
        found = strcmp(e->d_name, "MANIFEST") == 0 || kl_segment_file(e->d_name, &s);
    closedir(d);
    return found;
}

int kl_log_create_after(const kl_log_config *cfg, uint64_t seq,
                        const uint8_t hash[KL_HASH_LEN], kl_err *err)
{
    if (mkdir(cfg->dir, 0700) != 0 && errno != EEXIST) {
        kl_err_set(err, "create data dir %s: %s", cfg->dir, strerror(errno));
        return KL_EIO;
    }
    if (holds_a_log(cfg->dir)) {
        kl_err_set(err, "%s already holds a keyledger log", cfg->dir);
        return KL_EEXIST;
    }
    int rc = segment_create(cfg->dir, seq + 1, hash, err);
    if (rc == KL_OK)
        rc = write_manifest(cfg->dir, seq + 1, seq + 1, err);
    return rc;
}

/* ---- replay ---------------------------------------------------------- */

int kl_log_replay(kl_log *log, uint64_t from_seq, bool with_hashes,
                  kl_log_record_fn fn, void *arg, kl_err *err)
{
    uint64_t expect = log->segs[0].first_seq;
    uint8_t hash[KL_HASH_LEN];
    for (size_t i = 0; i < log->nsegs; i++) {
        segment *seg = &log->segs[i];
        if (i + 1 < log->nsegs && log->segs[i + 1].first_seq <= from_seq) {
            expect = log->segs[i + 1].first_seq;
            continue;           /* wholly before from_seq */
        }
        char name[32];
        kl_segment_name(seg->first_seq, name);
        mapped m;
        int rc = segment_map(log, seg->first_seq, NULL, &m, err);
        if (rc != KL_OK)
            return rc;
        if (m.size < seg->size || m.size < HEADER_SIZE) {
            kl_err_set(err, "segment %s shrank while reading", name);
            segment_unmap(&m);
            return KL_ECORRUPT;
        }
        memcpy(hash, m.data + 24, KL_HASH_LEN);
        size_t off = HEADER_SIZE;
        if (!with_hashes && from_seq > expect && seg->nmarks > 0) {
            size_t k = (size_t)((from_seq - expect) / MARK_EVERY);
            k = k < seg->nmarks ? k : seg->nmarks - 1;
            off = (size_t)seg->marks[k];
            expect += (uint64_t)k * MARK_EVERY;
        }
        /* Only what open checked, CRCs included: records appended since
         * are not read, and the checked ones cannot change (the writer
         * holds the lock and only appends), so their CRCs are not computed
         * again; framing and sequence are, to notice a file swapped
         * underneath. */
        while (off < seg->size && expect <= log->head_seq) {
            uint32_t len;
            uint64_t seq;
            if (record_check(&m, off, false, &len, &seq) != REC_OK || seq != expect) {
                err_where(err, name, off, "record changed while "
                           "reading");
                segment_unmap(&m);
                return KL_ECORRUPT;
            }
            const uint8_t *p = m.data + off + 8;
            if (with_hashes) {
                if (memcmp(p + 12, hash, KL_HASH_LEN) != 0) {
                    err_where(err, name, off, "prev does not match "
                               "the hash of record %" PRIu64, seq - 1);
                    segment_unmap(&m);
                    return KL_ECORRUPT;
                }
                kl_sha256(p, len, hash);
            }
            if (seq >= from_seq) {
                rc = fn(seq, p, len, with_hashes ? hash : NULL, arg);
                if (rc != 0) {
                    /* Say where the walk stopped; the message is fn's. */
                    snprintf(err->segment, sizeof err->segment, "%s", name);
                    err->offset = off;
                    segment_unmap(&m);
                    return rc;
                }
            }
            off += 8 + (size_t)len;
            expect++;
        }
        segment_unmap(&m);
    }
    return KL_OK;
}

uint64_t kl_log_head_seq(const kl_log *log) { return log->head_seq; }
uint64_t kl_log_first_seq(const kl_log *log) { return log->segs[0].first_seq; }

void kl_log_head_hash(const kl_log *log, uint8_t out[KL_HASH_LEN])
{
    memcpy(out, log->head_hash, KL_HASH_LEN);
}

bool kl_log_is_read_only(const kl_log *log) { return log->failed; }

/* ---- writing --------------------------------------------------------- */

void kl_log_mark_get(const kl_log *log, kl_log_mark *m)
{
    m->seq = log->head_seq;
    memcpy(m->hash, log->head_hash, KL_HASH_LEN);
}

void kl_log_rewind(kl_log *log, const kl_log_mark *m)
{
    log->head_seq = m->seq;
    memcpy(log->head_hash, m->hash, KL_HASH_LEN);
}

int kl_log_frame(kl_log *log, const uint8_t *body, size_t body_len, bool more,
                 kl_buf *batch, uint64_t *seq_out)
{
    size_t len = PREFIX_SIZE + body_len;
    if (len > KL_LOG_MAX_RECORD)
        return KL_EINVAL;
    if (kl_buf_reserve(batch, 8 + len) != KL_OK)
        return KL_ENOMEM;
    uint8_t *r = (uint8_t *)batch->data + batch->len;
    uint8_t *p = r + 8;
    uint64_t seq = log->head_seq + 1;
    p[0] = 0x9a;
    p[1] = 0xcf;
    for (int i = 0; i < 8; i++)
        p[2 + i] = (uint8_t)(seq >> (56 - 8 * i));
    p[10] = 0xc4;
    p[11] = 0x20;
    memcpy(p + 12, log->head_hash, KL_HASH_LEN);
    p[44] = more ? 0xc3 : 0xc2;
    memcpy(p + PREFIX_SIZE, body, body_len);
    put_u32(r, (uint32_t)len);
    put_u32(r + 4, kl_crc32c(0, p, len));
    kl_sha256(p, len, log->head_hash);
    log->head_seq = seq;
    batch->len += 8 + len;
    *seq_out = seq;
    return KL_OK;
}

int kl_log_frame_event(kl_log *log, const kl_event *ev, bool more, kl_buf *batch)
{
    kl_buf body = {0};
    uint64_t seq;
    int rc = kl_event_encode(ev, &body);
    if (rc == KL_OK)
        rc = kl_log_frame(log, (const uint8_t *)body.data, body.len, more, batch,
                          &seq);
    kl_buf_free(&body);
    return rc;
}

static int roll(kl_log *log, const kl_log_mark *start, kl_err *err)
{
    cut_room(log, &log->segs[log->nsegs - 1]);
    uint64_t first = start->seq + 1;
    int rc = segment_create(log->dir, first, start->hash, err);
    if (rc != KL_OK)
        return rc;
    char name[32];
    kl_segment_name(first, name);
    char *path = kl_path_join(log->dir, name);
    if (path == NULL)
        return KL_ENOMEM;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    free(path);
    if (fd < 0) {
        kl_err_set(err, "open segment %s: %s", name, strerror(errno));
        return KL_EIO;
    }
    if ((rc = segs_push(log, first)) != KL_OK ||
        (rc = write_manifest(log->dir, log->segs[0].first_seq, first, err)) != KL_OK) {
        close(fd);
        if (rc == KL_OK)
            log->nsegs--;
        return rc;
    }
    close(log->fd);
    log->fd = fd;
    log->segs[log->nsegs - 1].size = HEADER_SIZE;
    log->room = HEADER_SIZE;
    return KL_OK;
}

int kl_log_sync(kl_log *log, kl_err *err)
{
    if (log->failed)
        return KL_EREADONLY;
    if (fdatasync(log->fd) != 0) {
        log->failed = true;
        kl_err_set(err, "fsync failed: %s; the log is read-only until restart",
                   strerror(errno));
        return KL_EREADONLY;
    }
    return KL_OK;
}

/* Zeros ahead of the records (see Room at the top), cfg.room_bytes at a
 * time, when the batch would not fit in what there is. Best effort: a full
 * disk or any other failure leaves the file as it was and the batch to
 * grow it as without room. */
static void make_room(kl_log *log, const segment *tail, size_t need)
{
    static const char zeros[64 << 10];
    if (log->cfg.room_bytes == 0 || log->room >= tail->size + need)
        return;
    uint64_t from = log->room, to = tail->size + need + log->cfg.room_bytes;
    for (uint64_t off = from; off < to; off += sizeof zeros) {
        size_t n = to - off < sizeof zeros ? (size_t)(to - off) : sizeof zeros;
        if (kl_write_all(log->fd, zeros, n, (off_t)off) != KL_OK) {
            if (ftruncate(log->fd, (off_t)from) != 0)
                log->room = to;     /* zeros of unknown length: cut later */
            return;
        }
    }
    log->room = to;
}

int kl_log_write(kl_log *log, const kl_buf *batch, const kl_log_mark *start,
                 kl_err *err)
{
    int rc;
    if (log->failed) {
        kl_err_set(err, "the log is read-only after a failed fsync");
        rc = KL_EREADONLY;
        goto rewind;
    }
    segment *tail = &log->segs[log->nsegs - 1];
    if (tail->size >= log->cfg.segment_bytes && tail->size > HEADER_SIZE) {
        if ((rc = roll(log, start, err)) != KL_OK)
            goto rewind;
        tail = &log->segs[log->nsegs - 1];
    }
    make_room(log, tail, batch->len);
    rc = kl_write_all(log->fd, batch->data, batch->len, (off_t)tail->size);
    if (rc != KL_OK) {
        int e = errno;
        /* Leave the file ending on a record boundary again. */
        if (ftruncate(log->fd, (off_t)tail->size) != 0)
            log->failed = true;
        log->room = tail->size;
        kl_err_set(err, "append at offset %" PRIu64 ": %s", tail->size,
                   rc == KL_ENOSPC && e == 0 ? "short write" : strerror(e));
        goto rewind;
    }
    if (log->cfg.fsync == KL_FSYNC_ALWAYS && (rc = kl_log_sync(log, err)) != KL_OK) {
        /* Best effort: take the unsynced batch back out of the file, so a
         * write that was answered 503 does not reappear after a restart. */
        if (ftruncate(log->fd, (off_t)tail->size) != 0)
            KL_LOGF(log->cfg.logger, KL_ERROR, "cut back after failed fsync: %s",
                    strerror(errno));
        log->room = tail->size;
        goto rewind;
    }
    tail->size += batch->len;
    if (log->room < tail->size)
        log->room = tail->size;
    return KL_OK;
rewind:
    kl_log_rewind(log, start);
    return rc;
}

/* ---- verify ---------------------------------------------------------- */

typedef struct verify_walk {
    kl_log_verify_report *rep;
    kl_log_record_fn check;
    void *arg;
} verify_walk;

static int verify_record(uint64_t seq, const uint8_t *payload, size_t len,
                         const uint8_t hash[KL_HASH_LEN], void *arg)
{
    verify_walk *w = arg;
    if (w->check != NULL) {
        int rc = w->check(seq, payload, len, hash, w->arg);
        if (rc != 0)
            return rc;
    }
    w->rep->events++;
    w->rep->head_seq = seq;
    memcpy(w->rep->head_hash, hash, KL_HASH_LEN);
    return 0;
}

int kl_log_verify(const char *dir, kl_log_record_fn check, void *arg,
                  kl_log_verify_report *rep, kl_err *err)
{
    memset(rep, 0, sizeof *rep);
    memset(err, 0, sizeof *err);    /* the report copies it, set or not */
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = dir;
    cfg.read_only = true;
    kl_log *log;
    kl_log_recovery rec;
    int rc = kl_log_open(&log, &cfg, &rec, err);
    if (rc == KL_OK) {
        verify_walk w = {rep, check, arg};
        /* An empty log's head is where it begins (after a compaction,
         * the old head it goes on from). */
        rep->head_seq = kl_log_first_seq(log) - 1;
        memcpy(rep->head_hash, log->first_prev, KL_HASH_LEN);
        rc = kl_log_replay(log, 0, true, verify_record, &w, err);
        rep->torn_bytes = rec.torn_bytes;
        kl_log_close(log);
    }
    rep->ok = rc == KL_OK;
    if (!rep->ok) {
        snprintf(rep->problem, sizeof rep->problem, "%s", err->msg);
        snprintf(rep->segment, sizeof rep->segment, "%s", err->segment);
        rep->offset = err->offset;
    }
    return rc;
}
