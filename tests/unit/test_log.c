/*
 * tests/unit/test_log.c — the file log: framing, replay, the hash chain,
 * segment rolls, what opening does with every kind of damage, and the switch
 * to a compacted log (a log that goes on from an old head).
 *
 * Each test gets a fresh data dir (mkdtemp) holding a newly created log and
 * removes it at the end. Record bodies are a deterministic function of their
 * seq, so a record written again after a cut has the very same bytes, and the
 * segment files are read back with a small parser of the documented format
 * (see the top of log/log.c) that shares no code with the log.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/sha.h>

#include "log.h"

/* Defined in log/checksum.c for this test: the table-driven CRC-32C that is
 * used when the CPU has no CRC instruction. */
uint32_t kl_crc32c_portable(uint32_t crc, const void *data, size_t len);

enum { HEADER = 64, PREFIX = 45, MAX_BODY = 160, MAX_RECS = 4096 };

/* ---- fixture ----------------------------------------------------------- */

typedef struct fx {
    char dir[512];
    kl_log_config cfg;
} fx;

static int rm_entry(const char *path, const struct stat *st, int flag,
                    struct FTW *ftw)
{
    (void)st; (void)flag; (void)ftw;
    return remove(path);
}

static void rm_rf(const char *dir)
{
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    if (f == NULL)
        return -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof f->dir, "%s/kl-test-log-XXXXXX",
             tmp != NULL && tmp[0] != '\0' ? tmp : P_tmpdir);
    if (mkdtemp(f->dir) == NULL) {
        free(f);
        return -1;
    }
    kl_log_config_defaults(&f->cfg);
    f->cfg.dir = f->dir;
    f->cfg.fsync = KL_FSYNC_OFF;
    kl_err err = {0};
    if (kl_log_create(&f->cfg, &err) != KL_OK) {
        fprintf(stderr, "create: %s\n", err.msg);
        rm_rf(f->dir);
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    rm_rf(f->dir);
    free(f);
    return 0;
}

/* ---- files ------------------------------------------------------------- */

static void seg_name(uint64_t first, char out[32])
{
    snprintf(out, 32, "%020llu.log", (unsigned long long)first);
}

static void path_of(const fx *f, const char *name, char out[600])
{
    snprintf(out, 600, "%s/%s", f->dir, name);
}

static uint8_t *read_all(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    assert_int_equal(fseek(fp, 0, SEEK_END), 0);
    long n = ftell(fp);
    assert_true(n >= 0);
    rewind(fp);
    uint8_t *p = malloc((size_t)n + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    *len = (size_t)n;
    return p;
}

static void write_all_file(const char *path, const void *p, size_t n)
{
    int fd = open(path, O_WRONLY | O_TRUNC | O_CREAT, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, p, n), (ssize_t)n);
    close(fd);
}

static void append_file(const char *path, const void *p, size_t n)
{
    int fd = open(path, O_WRONLY | O_APPEND);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, p, n), (ssize_t)n);
    close(fd);
}

static uint64_t file_size(const char *path)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (uint64_t)st.st_size;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* First seqs of the segment files in the dir, ascending. */
static size_t list_segments(const fx *f, uint64_t *out, size_t max)
{
    DIR *d = opendir(f->dir);
    assert_non_null(d);
    size_t n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        const char *s = de->d_name;
        if (strlen(s) != 24 || strcmp(s + 20, ".log") != 0)
            continue;
        uint64_t v = 0;
        for (int i = 0; i < 20; i++) {
            assert_true(s[i] >= '0' && s[i] <= '9');
            v = v * 10 + (uint64_t)(s[i] - '0');
        }
        assert_true(n < max);
        out[n++] = v;
    }
    closedir(d);
    qsort(out, n, sizeof *out, cmp_u64);
    return n;
}

/* ---- record bodies ------------------------------------------------------ */

static size_t body_len(uint64_t seq) { return 1 + (size_t)(seq * 37 % 120); }

static size_t body_for(uint64_t seq, uint8_t out[MAX_BODY])
{
    size_t n = body_len(seq);
    for (size_t i = 0; i < n; i++)
        out[i] = (uint8_t)(seq * 131 + i * 7 + 3);
    return n;
}

/* Frames and writes n records in batches of per_batch, checking each seq. */
static void append_records(kl_log *log, uint64_t n, uint64_t per_batch)
{
    uint64_t done = 0;
    while (done < n) {
        kl_log_mark m;
        kl_log_mark_get(log, &m);
        assert_int_equal(m.seq, kl_log_head_seq(log));
        kl_buf b = {0};
        uint64_t k = n - done < per_batch ? n - done : per_batch;
        for (uint64_t i = 0; i < k; i++) {
            uint8_t body[MAX_BODY];
            size_t bl = body_for(m.seq + 1 + i, body);
            uint64_t seq = 0;
            assert_int_equal(kl_log_frame(log, body, bl, false, &b, &seq), KL_OK);
            assert_int_equal(seq, m.seq + 1 + i);
            assert_int_equal(kl_log_head_seq(log), seq);
        }
        kl_err err = {0};
        int rc = kl_log_write(log, &b, &m, &err);
        if (rc != KL_OK)
            fail_msg("kl_log_write: %d %s", rc, err.msg);
        kl_buf_free(&b);
        done += k;
    }
}

/* Writes n records as one command's group: all but the last say more. */
static void append_group(kl_log *log, uint64_t n)
{
    kl_log_mark m;
    kl_log_mark_get(log, &m);
    kl_buf b = {0};
    for (uint64_t i = 0; i < n; i++) {
        uint8_t body[MAX_BODY];
        size_t bl = body_for(m.seq + 1 + i, body);
        uint64_t seq = 0;
        assert_int_equal(kl_log_frame(log, body, bl, i + 1 < n, &b, &seq), KL_OK);
    }
    kl_err err = {0};
    assert_int_equal(kl_log_write(log, &b, &m, &err), KL_OK);
    kl_buf_free(&b);
}

static kl_log *open_ok(fx *f, kl_log_recovery *rec)
{
    kl_log *log = NULL;
    kl_err err = {0};
    int rc = kl_log_open(&log, &f->cfg, rec, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_open: %d %s", rc, err.msg);
    return log;
}

/* ---- a reader of the documented format --------------------------------- */

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* Bit at a time, straight from the definition (reflected 0x82F63B78). */
static uint32_t crc32c_ref(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
    }
    return ~crc;
}

typedef struct rec_pos {
    uint64_t off;       /* of the 8-byte record header in the segment */
    uint32_t len;       /* payload length */
    uint64_t seq;
} rec_pos;

typedef struct seg_info {
    uint64_t first_seq;
    uint8_t carried[KL_HASH_LEN];
    size_t nrec;
    rec_pos recs[MAX_RECS];
    uint8_t *bytes;
    size_t size;
} seg_info;

/* Reads a whole, undamaged segment and checks it against the format. */
static void seg_read(const fx *f, uint64_t first, seg_info *si)
{
    char name[32], path[600];
    seg_name(first, name);
    path_of(f, name, path);
    memset(si, 0, sizeof *si);
    si->bytes = read_all(path, &si->size);
    const uint8_t *h = si->bytes;
    assert_true(si->size >= HEADER);
    assert_memory_equal(h, "KLEDGERL", 8);
    assert_int_equal(le32(h + 8), 2);
    assert_int_equal(le32(h + 12), HEADER);
    assert_int_equal(le64(h + 16), first);
    assert_int_equal(le32(h + 56), 0);
    assert_int_equal(le32(h + 60), crc32c_ref(0, h, 60));
    si->first_seq = first;
    memcpy(si->carried, h + 24, KL_HASH_LEN);
    size_t off = HEADER;
    while (off < si->size) {
        assert_true(si->size - off >= 8);
        uint32_t len = le32(si->bytes + off);
        assert_true(len >= PREFIX);
        assert_true(si->size - off - 8 >= len);
        const uint8_t *p = si->bytes + off + 8;
        assert_int_equal(le32(si->bytes + off + 4), crc32c_ref(0, p, len));
        assert_int_equal(p[0], 0x9a);
        assert_int_equal(p[1], 0xcf);
        assert_int_equal(p[10], 0xc4);
        assert_int_equal(p[11], 0x20);
        assert_true(si->nrec < MAX_RECS);
        si->recs[si->nrec] = (rec_pos){off, len, be64(p + 2)};
        assert_int_equal(si->recs[si->nrec].seq, first + si->nrec);
        si->nrec++;
        off += 8 + len;
    }
}

static void seg_free(seg_info *si)
{
    free(si->bytes);
    si->bytes = NULL;
}

/* ---- replay collector --------------------------------------------------- */

typedef struct seen {
    uint64_t next;              /* seq expected next */
    uint64_t count;
    bool hashes;                /* replayed with_hashes */
    uint8_t last_hash[KL_HASH_LEN];
    bool have_last;
    uint64_t stop_at;           /* return 99 at this seq (0: never) */
} seen;

static int on_record(uint64_t seq, const uint8_t *payload, size_t len,
                     const uint8_t hash[KL_HASH_LEN], void *arg)
{
    seen *s = arg;
    assert_int_equal(seq, s->next);
    uint8_t body[MAX_BODY];
    size_t bl = body_for(seq, body);
    assert_int_equal(len, PREFIX + bl);
    assert_int_equal(payload[0], 0x9a);
    assert_int_equal(payload[1], 0xcf);
    assert_int_equal(be64(payload + 2), seq);
    assert_int_equal(payload[10], 0xc4);
    assert_int_equal(payload[11], 0x20);
    assert_memory_equal(payload + PREFIX, body, bl);
    static const uint8_t zero[KL_HASH_LEN];
    if (seq == 1)
        assert_memory_equal(payload + 12, zero, KL_HASH_LEN);
    else if (s->have_last)
        assert_memory_equal(payload + 12, s->last_hash, KL_HASH_LEN);
    uint8_t h[KL_HASH_LEN];
    SHA256(payload, len, h);
    if (s->hashes) {
        assert_non_null(hash);
        assert_memory_equal(hash, h, KL_HASH_LEN);
    } else {
        assert_null(hash);
    }
    memcpy(s->last_hash, h, KL_HASH_LEN);
    s->have_last = true;
    s->next++;
    s->count++;
    return seq == s->stop_at ? 99 : 0;
}

static void replay_all(kl_log *log, uint64_t from, bool hashes, uint64_t expect_n)
{
    seen s = {.next = from ? from : 1, .hashes = hashes};
    kl_err err = {0};
    int rc = kl_log_replay(log, from, hashes, on_record, &s, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_replay: %d %s", rc, err.msg);
    assert_int_equal(s.count, expect_n);
    if (expect_n > 0 && s.next - 1 == kl_log_head_seq(log)) {
        uint8_t head[KL_HASH_LEN];
        kl_log_head_hash(log, head);
        assert_memory_equal(head, s.last_hash, KL_HASH_LEN);
    }
}

static void verify_ok(const fx *f, uint64_t events)
{
    kl_log_verify_report rep;
    kl_err err = {0};
    int rc = kl_log_verify(f->dir, NULL, NULL, &rep, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_verify: %d %s", rc, err.msg);
    assert_true(rep.ok);
    assert_int_equal(rep.events, events);
    assert_int_equal(rep.head_seq, events);
    assert_int_equal(rep.torn_bytes, 0);
}

/* ---- CRC-32C ------------------------------------------------------------ */

static void test_crc32c_vectors(void **state)
{
    (void)state;
    const char *s = "123456789";
    assert_int_equal(kl_crc32c(0, s, 9), 0xE3069283u);
    assert_int_equal(kl_crc32c_portable(0, s, 9), 0xE3069283u);
    assert_int_equal(crc32c_ref(0, (const uint8_t *)s, 9), 0xE3069283u);
    assert_int_equal(kl_crc32c(0, "", 0), 0);
    assert_int_equal(kl_crc32c(0, "a", 1), 0xC1D04330u);

    /* The RFC 3720 (iSCSI) vectors. */
    uint8_t buf[32];
    memset(buf, 0, sizeof buf);
    assert_int_equal(kl_crc32c(0, buf, 32), 0x8A9136AAu);
    assert_int_equal(kl_crc32c_portable(0, buf, 32), 0x8A9136AAu);
    memset(buf, 0xff, sizeof buf);
    assert_int_equal(kl_crc32c(0, buf, 32), 0x62A8AB43u);
    assert_int_equal(kl_crc32c_portable(0, buf, 32), 0x62A8AB43u);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)i;
    assert_int_equal(kl_crc32c(0, buf, 32), 0x46DD794Eu);
    assert_int_equal(kl_crc32c_portable(0, buf, 32), 0x46DD794Eu);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)(31 - i);
    assert_int_equal(kl_crc32c(0, buf, 32), 0x113FDB5Cu);
    assert_int_equal(kl_crc32c_portable(0, buf, 32), 0x113FDB5Cu);

    /* The first argument continues a running CRC. */
    assert_int_equal(kl_crc32c(kl_crc32c(0, s, 4), s + 4, 5), 0xE3069283u);
    assert_int_equal(kl_crc32c_portable(kl_crc32c_portable(0, s, 1), s + 1, 8),
                     0xE3069283u);
}

/* Big buffers take the three-stream path: every length around its blocks
 * (3 lanes of 8 KiB), from any running CRC, agrees with the table. */
static void test_crc32c_long_buffers(void **state)
{
    (void)state;
    enum { BLOCK = 3 * 8192, MAX = 5 * BLOCK + 64 };
    uint8_t *buf = malloc(MAX);
    assert_non_null(buf);
    uint64_t x = 0x9e3779b97f4a7c15u;
    for (size_t i = 0; i < MAX; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = (uint8_t)x;
    }
    const size_t lens[] = {BLOCK - 1, BLOCK, BLOCK + 1, BLOCK + 7, 2 * BLOCK - 8,
                           2 * BLOCK, 3 * BLOCK + 13, 5 * BLOCK, MAX};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        for (size_t off = 0; off < 3; off++) {
            size_t n = lens[i] - off;
            uint32_t want = kl_crc32c_portable(0, buf + off, n);
            assert_int_equal(kl_crc32c(0, buf + off, n), want);
            /* Split anywhere: the second part continues the first. */
            size_t cut = n / 3 + off;
            assert_int_equal(kl_crc32c(kl_crc32c(0, buf + off, cut), buf + off + cut,
                                       n - cut), want);
            /* Or checksummed apart and combined, whatever the lengths
             * (an empty part included). */
            size_t cuts[] = {0, 1, cut, n - 1, n};
            for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++)
                assert_int_equal(kl_crc32c_combine(kl_crc32c(0, buf + off, cuts[c]),
                                                   kl_crc32c(0, buf + off + cuts[c],
                                                             n - cuts[c]),
                                                   n - cuts[c]),
                                 want);
        }
    }
    free(buf);
}

static uint64_t xorshift(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void test_crc32c_paths_agree(void **state)
{
    (void)state;
    enum { N = 9000 };
    uint8_t *buf = malloc(N + 16);
    assert_non_null(buf);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < N + 16; i++)
        buf[i] = (uint8_t)xorshift(&x);
    /* Every length up to 300 at every alignment 0..7, then longer ones. */
    for (size_t len = 0; len <= 300; len++) {
        for (size_t a = 0; a < 8; a++) {
            uint32_t hw = kl_crc32c(0, buf + a, len);
            assert_int_equal(hw, kl_crc32c_portable(0, buf + a, len));
            assert_int_equal(hw, crc32c_ref(0, buf + a, len));
        }
    }
    for (size_t len = 301; len <= N; len += 1 + (size_t)(xorshift(&x) % 97)) {
        uint32_t seed = (uint32_t)xorshift(&x);
        size_t a = (size_t)(xorshift(&x) % 16);
        uint32_t hw = kl_crc32c(seed, buf + a, len);
        assert_int_equal(hw, kl_crc32c_portable(seed, buf + a, len));
        assert_int_equal(hw, crc32c_ref(seed, buf + a, len));
    }
    free(buf);
}

/* ---- writing and reading back ------------------------------------------ */

static void test_empty_log(void **state)
{
    fx *f = *state;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    assert_int_equal(rec.records, 0);
    assert_int_equal(rec.torn_bytes, 0);
    assert_int_equal(kl_log_head_seq(log), 0);
    uint8_t h[KL_HASH_LEN], zero[KL_HASH_LEN] = {0};
    kl_log_head_hash(log, h);
    assert_memory_equal(h, zero, KL_HASH_LEN);
    replay_all(log, 1, true, 0);
    kl_log_close(log);
    kl_log_close(NULL);

    char path[600];
    path_of(f, "MANIFEST", path);
    size_t n;
    char *m = (char *)read_all(path, &n);
    m[n] = '\0';
    assert_string_equal(m, "keyledger-manifest 1\nfirst 00000000000000000001.log\n"
                           "last 00000000000000000001.log\n");
    free(m);
    path_of(f, "00000000000000000001.log", path);
    assert_int_equal(file_size(path), HEADER);
    verify_ok(f, 0);
}

static void test_write_reopen_replay(void **state)
{
    fx *f = *state;
    f->cfg.fsync = KL_FSYNC_ALWAYS;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 1, 1);
    append_records(log, 5, 5);
    append_records(log, 10, 10);
    assert_int_equal(kl_log_head_seq(log), 16);
    uint8_t head[KL_HASH_LEN];
    kl_log_head_hash(log, head);
    /* Records written are readable before a reopen. */
    replay_all(log, 1, false, 16);
    replay_all(log, 1, true, 16);
    kl_log_close(log);

    log = open_ok(f, &rec);
    assert_int_equal(rec.records, 16);
    assert_int_equal(rec.torn_bytes, 0);
    assert_string_equal(rec.torn_segment, "");
    assert_int_equal(kl_log_head_seq(log), 16);
    uint8_t head2[KL_HASH_LEN];
    kl_log_head_hash(log, head2);
    assert_memory_equal(head, head2, KL_HASH_LEN);
    replay_all(log, 1, false, 16);
    replay_all(log, 1, true, 16);
    replay_all(log, 10, false, 7);
    replay_all(log, 16, true, 1);
    replay_all(log, 17, true, 0);

    /* A non-zero return stops the walk and comes back as the result. */
    seen s = {.next = 1, .stop_at = 3};
    kl_err err = {0};
    assert_int_equal(kl_log_replay(log, 1, false, on_record, &s, &err), 99);
    assert_int_equal(s.count, 3);

    /* The chain continues across the reopen. */
    append_records(log, 4, 2);
    kl_log_close(log);
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, 20);
    replay_all(log, 1, true, 20);
    kl_log_close(log);

    /* The file is exactly the header plus the framed records. */
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    seg_read(f, 1, si);
    assert_int_equal(si->nrec, 20);
    uint64_t expect = HEADER;
    for (uint64_t seq = 1; seq <= 20; seq++)
        expect += 8 + PREFIX + body_len(seq);
    assert_int_equal(si->size, expect);
    uint8_t zero[KL_HASH_LEN] = {0};
    assert_memory_equal(si->carried, zero, KL_HASH_LEN);
    seg_free(si);
    free(si);
    verify_ok(f, 20);
}

/* A replay from a seq deep in a segment starts at the mark open left
 * before it (one every 4,096 records) and gives exactly the records from
 * that seq on: at marks, between them, past the last one, among records
 * appended since the open (which have none), and after a torn record cut. */
static void test_replay_from_marks(void **state)
{
    fx *f = *state;
    f->cfg.segment_bytes = 64u << 20;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 3 * 4096 + 100, 50);
    kl_log_close(log);
    log = open_ok(f, &rec);
    append_records(log, 10, 1);
    uint64_t head = 3 * 4096 + 110;
    static const uint64_t froms[] = {2, 4096, 4097, 4098, 8193, 12000, 12289,
                                     12388, 12389, 12390, 12398};
    for (size_t i = 0; i < sizeof froms / sizeof froms[0]; i++)
        replay_all(log, froms[i], false, head - froms[i] + 1);
    replay_all(log, head + 1, false, 0);
    kl_log_close(log);

    /* The last record (seq 12398) torn: what is left replays the same. */
    char name[32], path[600];
    seg_name(1, name);
    path_of(f, name, path);
    size_t n;
    uint8_t *bytes = read_all(path, &n);
    write_all_file(path, bytes, n - 1);
    free(bytes);
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, head - 1);
    replay_all(log, 12289, false, head - 12289);
    replay_all(log, head, false, 0);
    kl_log_close(log);
}

static void test_frame_rejects_oversized(void **state)
{
    fx *f = *state;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    size_t big = (1u << 20) - PREFIX + 1;
    uint8_t *body = calloc(1, big);
    assert_non_null(body);
    kl_buf b = {0};
    uint64_t seq = 0;
    assert_int_equal(kl_log_frame(log, body, big, false, &b, &seq), KL_EINVAL);
    assert_int_equal(b.len, 0);
    assert_int_equal(kl_log_head_seq(log), 0);
    /* The largest record allowed goes through and reads back. */
    assert_int_equal(kl_log_frame(log, body, big - 1, false, &b, &seq), KL_OK);
    assert_int_equal(seq, 1);
    kl_log_mark m = {0};
    kl_err err = {0};
    assert_int_equal(kl_log_write(log, &b, &m, &err), KL_OK);
    kl_buf_free(&b);
    free(body);
    kl_log_close(log);
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, 1);
    assert_int_equal(rec.torn_bytes, 0);
    kl_log_close(log);
}

/* ---- segments ----------------------------------------------------------- */

/* Writes n records into 4 KiB segments in batches of 4; returns segments. */
static size_t make_segmented(fx *f, uint64_t n, uint64_t *firsts, size_t max)
{
    f->cfg.segment_bytes = 4096;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, n, 4);
    kl_log_close(log);
    return list_segments(f, firsts, max);
}

static void test_segment_roll(void **state)
{
    fx *f = *state;
    uint64_t firsts[64];
    size_t nseg = make_segmented(f, 300, firsts, 64);
    assert_true(nseg >= 5);
    assert_int_equal(firsts[0], 1);

    /* Segments are contiguous, each carries the hash of the record before
     * it, and each holds whole batches up to the first one past 4 KiB. */
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    uint64_t next = 1;
    uint8_t prev_hash[KL_HASH_LEN] = {0};
    for (size_t i = 0; i < nseg; i++) {
        seg_read(f, firsts[i], si);
        assert_int_equal(si->first_seq, next);
        assert_memory_equal(si->carried, prev_hash, KL_HASH_LEN);
        assert_true(si->nrec > 0);
        assert_int_equal(si->nrec % 4 == 0 || i + 1 == nseg, true);
        if (i + 1 < nseg) {
            assert_true(si->size >= 4096);
            /* It rolled at the first batch that found it full. */
            rec_pos *r = &si->recs[si->nrec - 4];
            assert_true(r->off < 4096);
        }
        rec_pos *last = &si->recs[si->nrec - 1];
        SHA256(si->bytes + last->off + 8, last->len, prev_hash);
        next += si->nrec;
        seg_free(si);
    }
    free(si);
    assert_int_equal(next, 301);

    char path[600], want[200], a[32], b[32];
    path_of(f, "MANIFEST", path);
    size_t n;
    char *m = (char *)read_all(path, &n);
    m[n] = '\0';
    seg_name(1, a);
    seg_name(firsts[nseg - 1], b);
    snprintf(want, sizeof want, "keyledger-manifest 1\nfirst %s\nlast %s\n", a, b);
    assert_string_equal(m, want);
    free(m);

    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    assert_int_equal(rec.records, 300);
    assert_int_equal(kl_log_head_seq(log), 300);
    uint8_t head[KL_HASH_LEN];
    kl_log_head_hash(log, head);
    assert_memory_equal(head, prev_hash, KL_HASH_LEN);
    replay_all(log, 1, false, 300);
    replay_all(log, 1, true, 300);
    /* Starting inside a later segment skips the ones before. */
    replay_all(log, firsts[2] + 1, true, 300 - firsts[2]);
    replay_all(log, firsts[nseg - 1], false, 301 - firsts[nseg - 1]);
    kl_log_close(log);

    kl_log_verify_report rep;
    kl_err err = {0};
    assert_int_equal(kl_log_verify(f->dir, NULL, NULL, &rep, &err), KL_OK);
    assert_true(rep.ok);
    assert_int_equal(rep.events, 300);
    assert_int_equal(rep.head_seq, 300);
    assert_memory_equal(rep.head_hash, prev_hash, KL_HASH_LEN);
}

/* A check callback sees every record and can stop verify as damage. */
static int count_check(uint64_t seq, const uint8_t *payload, size_t len,
                       const uint8_t hash[KL_HASH_LEN], void *arg)
{
    uint64_t *n = arg;
    (*n)++;
    return seq == 7 ? KL_ECORRUPT : 0;
}

static void test_verify_check_callback(void **state)
{
    fx *f = *state;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 10, 3);
    kl_log_close(log);
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    seg_read(f, 1, si);
    uint64_t n = 0;
    kl_log_verify_report rep;
    kl_err err;
    memset(&err, 0xaa, sizeof err);     /* callers need not clear it */
    assert_int_equal(kl_log_verify(f->dir, count_check, &n, &rep, &err),
                     KL_ECORRUPT);
    assert_int_equal(n, 7);
    assert_false(rep.ok);
    assert_int_equal(rep.events, 6);
    assert_int_equal(rep.head_seq, 6);
    /* The report says where the walk stopped; the message is the check's
     * to give, so the log adds none. */
    assert_string_equal(rep.segment, "00000000000000000001.log");
    assert_int_equal(rep.offset, si->recs[6].off);
    assert_string_equal(rep.problem, "");
    seg_free(si);
    free(si);
}

/* ---- recovery ----------------------------------------------------------- */

static void test_torn_tail_every_offset(void **state)
{
    fx *f = *state;
    uint64_t firsts[64];
    size_t nseg = make_segmented(f, 120, firsts, 64);
    assert_true(nseg >= 2);
    char name[32], path[600];
    seg_name(firsts[nseg - 1], name);
    path_of(f, name, path);

    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    seg_read(f, firsts[nseg - 1], si);
    assert_true(si->nrec >= 2);
    rec_pos last = si->recs[si->nrec - 1];
    assert_int_equal(last.seq, 120);
    assert_int_equal(last.off + 8 + last.len, si->size);
    rec_pos before = si->recs[si->nrec - 2];
    uint8_t h119[KL_HASH_LEN];
    SHA256(si->bytes + before.off + 8, before.len, h119);

    for (uint64_t cut = last.off + 1; cut < si->size; cut++) {
        write_all_file(path, si->bytes, cut);
        kl_log_recovery rec;
        kl_log *log = open_ok(f, &rec);
        assert_int_equal(rec.records, 119);
        assert_int_equal(rec.torn_bytes, cut - last.off);
        assert_int_equal(rec.torn_offset, last.off);
        assert_string_equal(rec.torn_segment, name);
        assert_int_equal(file_size(path), last.off);
        assert_int_equal(kl_log_head_seq(log), 119);
        uint8_t h[KL_HASH_LEN];
        kl_log_head_hash(log, h);
        assert_memory_equal(h, h119, KL_HASH_LEN);

        /* Writing again continues the chain: seq 120 comes out with the
         * same bytes it had before the cut. */
        append_records(log, 1, 1);
        kl_log_close(log);
        size_t n;
        uint8_t *now = read_all(path, &n);
        assert_int_equal(n, si->size);
        assert_memory_equal(now, si->bytes, n);
        free(now);
        verify_ok(f, 120);
    }
    seg_free(si);
    free(si);
}

/* One command's records are all or nothing: a log that ends inside a group
 * (cut at any byte after the group's start, record boundaries included)
 * loses the whole group; a finished group stays. */
static void test_torn_group(void **state)
{
    fx *f = *state;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 5, 5);
    append_group(log, 3);
    kl_log_close(log);
    char name[32], path[600];
    seg_name(1, name);
    path_of(f, name, path);
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    seg_read(f, 1, si);
    assert_int_equal(si->nrec, 8);
    size_t group = si->recs[5].off;
    uint8_t h5[KL_HASH_LEN];
    SHA256(si->bytes + si->recs[4].off + 8, si->recs[4].len, h5);

    for (size_t cut = group + 1; cut < si->size; cut++) {
        write_all_file(path, si->bytes, cut);
        kl_log_verify_report rep;
        kl_err err;
        assert_int_equal(kl_log_verify(f->dir, NULL, NULL, &rep, &err), KL_OK);
        assert_int_equal(rep.events, 5);
        assert_int_equal(rep.torn_bytes, cut - group);
        log = open_ok(f, &rec);
        assert_int_equal(rec.records, 5);
        assert_int_equal(rec.torn_bytes, cut - group);
        assert_int_equal(rec.torn_offset, group);
        assert_int_equal(file_size(path), group);
        assert_int_equal(kl_log_head_seq(log), 5);
        uint8_t h[KL_HASH_LEN];
        kl_log_head_hash(log, h);
        assert_memory_equal(h, h5, KL_HASH_LEN);
        /* The same group written again comes out byte for byte. */
        append_group(log, 3);
        kl_log_close(log);
        size_t n;
        uint8_t *now = read_all(path, &n);
        assert_int_equal(n, si->size);
        assert_memory_equal(now, si->bytes, n);
        free(now);
    }
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, 8);
    assert_int_equal(rec.torn_bytes, 0);
    kl_log_close(log);
    verify_ok(f, 8);
    seg_free(si);
    free(si);
}

/* The last segment may hold a single record that is torn: it becomes an
 * empty segment and the next write goes into it. */
static void test_torn_only_record_of_last_segment(void **state)
{
    fx *f = *state;
    f->cfg.segment_bytes = 4096;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    /* One record at a time: the record that rolls is alone in the new
     * segment. */
    uint64_t firsts[8];
    while (list_segments(f, firsts, 8) < 2)
        append_records(log, 1, 1);
    kl_log_close(log);
    size_t nseg = list_segments(f, firsts, 8);
    assert_int_equal(nseg, 2);
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    seg_read(f, firsts[1], si);
    assert_int_equal(si->nrec, 1);
    char name[32], path[600];
    seg_name(firsts[1], name);
    path_of(f, name, path);
    uint64_t total = firsts[1];

    write_all_file(path, si->bytes, si->size - 3);
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, total - 1);
    assert_int_equal(rec.torn_bytes, si->size - 3 - HEADER);
    assert_int_equal(rec.torn_offset, HEADER);
    assert_int_equal(file_size(path), HEADER);
    uint8_t h[KL_HASH_LEN];
    kl_log_head_hash(log, h);
    assert_memory_equal(h, si->carried, KL_HASH_LEN);
    append_records(log, 1, 1);
    kl_log_close(log);
    size_t n;
    uint8_t *now = read_all(path, &n);
    assert_int_equal(n, si->size);
    assert_memory_equal(now, si->bytes, n);
    free(now);
    seg_free(si);
    free(si);
    verify_ok(f, total);
}

/* A writer with room: zeros ahead of its records in the last segment only;
 * every reader stops at them (no torn tail, no damage); a crash that
 * leaves them is recovered without a report and the room cut; a clean
 * close leaves records only. */
static void test_room(void **state)
{
    fx *f = *state;
    f->cfg.segment_bytes = 16384;
    f->cfg.room_bytes = 8192;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 200, 4);
    uint64_t firsts[64];
    size_t nseg = list_segments(f, firsts, 64);
    assert_true(nseg >= 2);
    char path[600], name[32];
    for (size_t i = 0; i + 1 < nseg; i++) {
        /* Rolled segments were cut to their records: the next one's header
         * carries the hash of the last, so verify would catch any gap, and
         * a rolled segment never ends in room. */
        seg_name(firsts[i], name);
        path_of(f, name, path);
        int fd = open(path, O_RDONLY);
        uint8_t tail[8];
        assert_int_equal(pread(fd, tail, 8, (off_t)file_size(path) - 8), 8);
        close(fd);
        static const uint8_t zeros[8];
        assert_memory_not_equal(tail, zeros, 8);
    }
    seg_name(firsts[nseg - 1], name);
    path_of(f, name, path);
    uint64_t with_room = file_size(path);

    /* Read-only while the writer runs: all records, nothing torn. */
    kl_log_config ro = f->cfg;
    ro.read_only = true;
    kl_log *rlog = NULL;
    kl_err err = {0};
    assert_int_equal(kl_log_open(&rlog, &ro, &rec, &err), KL_OK);
    assert_int_equal(rec.records, 200);
    assert_int_equal(rec.torn_bytes, 0);
    replay_all(rlog, 1, true, 200);
    kl_log_close(rlog);
    verify_ok(f, 200);
    kl_log_reader *r = NULL;
    assert_int_equal(kl_log_reader_open(f->dir, &r, &err), KL_OK);
    kl_buf b = {0};
    assert_int_equal(kl_log_reader_get(r, 200, &b, NULL, &err), KL_OK);
    assert_int_equal(kl_log_reader_get(r, 201, &b, NULL, &err), KL_ENOENT);
    kl_log_reader_close(r);
    kl_buf_free(&b);

    /* The file as a crash would leave it, room and all. */
    uint8_t *crashed = malloc(with_room);
    assert_non_null(crashed);
    int fd = open(path, O_RDONLY);
    assert_int_equal(pread(fd, crashed, with_room, 0), (ssize_t)with_room);
    close(fd);
    kl_log_close(log);
    uint64_t records_only = file_size(path);
    assert_true(records_only < with_room);
    /* The close cut zeros only: the records are the crashed file's. */
    uint8_t *cut = malloc(records_only);
    assert_non_null(cut);
    fd = open(path, O_RDONLY);
    assert_int_equal(pread(fd, cut, records_only, 0), (ssize_t)records_only);
    close(fd);
    assert_memory_equal(cut, crashed, records_only);
    free(cut);
    for (uint64_t i = records_only; i < with_room; i++)
        assert_int_equal(crashed[i], 0);
    fd = open(path, O_WRONLY);
    assert_int_equal(pwrite(fd, crashed, with_room, 0), (ssize_t)with_room);
    close(fd);
    free(crashed);

    log = open_ok(f, &rec);
    assert_int_equal(rec.records, 200);
    assert_int_equal(rec.torn_bytes, 0);
    assert_int_equal(file_size(path), records_only);
    append_records(log, 4, 4);
    kl_log_close(log);
    verify_ok(f, 204);
}

static void test_garbage_after_last_record(void **state)
{
    fx *f = *state;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 9, 3);
    kl_log_close(log);
    char path[600];
    path_of(f, "00000000000000000001.log", path);
    uint64_t good = file_size(path);

    uint8_t junk[4096];
    uint64_t x = 12345;
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (uint8_t)xorshift(&x);

    /* Read-only: reported, not cut. */
    append_file(path, junk, 1000);
    kl_log_config ro = f->cfg;
    ro.read_only = true;
    kl_err err = {0};
    assert_int_equal(kl_log_open(&log, &ro, &rec, &err), KL_OK);
    assert_int_equal(rec.records, 9);
    assert_int_equal(rec.torn_bytes, 1000);
    assert_int_equal(rec.torn_offset, good);
    replay_all(log, 1, true, 9);
    kl_log_close(log);
    assert_int_equal(file_size(path), good + 1000);
    kl_log_verify_report rep;
    assert_int_equal(kl_log_verify(f->dir, NULL, NULL, &rep, &err), KL_OK);
    assert_true(rep.ok);
    assert_int_equal(rep.torn_bytes, 1000);
    assert_int_equal(rep.events, 9);

    /* Writable: cut. */
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, 9);
    assert_int_equal(rec.torn_bytes, 1000);
    assert_int_equal(rec.torn_offset, good);
    assert_string_equal(rec.torn_segment, "00000000000000000001.log");
    assert_int_equal(file_size(path), good);
    append_records(log, 2, 2);
    kl_log_close(log);
    verify_ok(f, 11);
    good = file_size(path);

    /* Zeros, as after a crash on a file system that extends first or in
     * the room a writer made: nothing was written there, so nothing is
     * torn; the writer cuts them all the same. */
    memset(junk, 0, sizeof junk);
    append_file(path, junk, sizeof junk);
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, 11);
    assert_int_equal(rec.torn_bytes, 0);
    assert_int_equal(file_size(path), good);
    kl_log_close(log);
    /* A record cut short, then zeros: torn, up to the end of the file. */
    put_le32(junk, 300);
    junk[4] = 0x5a;
    append_file(path, junk, sizeof junk);
    log = open_ok(f, &rec);
    assert_int_equal(rec.torn_bytes, sizeof junk);
    assert_int_equal(file_size(path), good);
    kl_log_close(log);

    /* A record header whose length runs past the end. */
    uint8_t hdr[8];
    put_le32(hdr, 500);
    put_le32(hdr + 4, 0);
    append_file(path, hdr, sizeof hdr);
    log = open_ok(f, &rec);
    assert_int_equal(rec.torn_bytes, 8);
    assert_int_equal(file_size(path), good);
    kl_log_close(log);
    verify_ok(f, 11);
}

static void expect_open_corrupt(fx *f, const char *seg, uint64_t off)
{
    kl_log *log = NULL;
    kl_log_recovery rec;
    kl_err err = {0};
    int rc = kl_log_open(&log, &f->cfg, &rec, &err);
    if (rc != KL_ECORRUPT)
        fail_msg("open gave %d (%s), expected KL_ECORRUPT at %s:%llu", rc,
                 err.msg, seg, (unsigned long long)off);
    assert_null(log);
    assert_string_equal(err.segment, seg);
    assert_int_equal(err.offset, off);
    assert_non_null(strstr(err.msg, seg));
}

static void test_damage_in_last_segment(void **state)
{
    fx *f = *state;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 6, 2);
    kl_log_close(log);
    const char *name = "00000000000000000001.log";
    char path[600];
    path_of(f, name, path);
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    seg_read(f, 1, si);
    assert_int_equal(si->nrec, 6);
    rec_pos r3 = si->recs[2];

    uint8_t *copy = malloc(si->size);
    assert_non_null(copy);
    for (uint64_t b = r3.off; b < r3.off + 8 + r3.len; b++) {
        memcpy(copy, si->bytes, si->size);
        copy[b] ^= 0xff;
        write_all_file(path, copy, si->size);
        expect_open_corrupt(f, name, r3.off);
        /* Damage is never cut away. */
        size_t n;
        uint8_t *now = read_all(path, &n);
        assert_int_equal(n, si->size);
        assert_memory_equal(now, copy, n);
        free(now);
    }
    /* Read-only opens and verify refuse it too. */
    kl_log_config ro = f->cfg;
    ro.read_only = true;
    kl_err err = {0};
    assert_int_equal(kl_log_open(&log, &ro, &rec, &err), KL_ECORRUPT);
    kl_log_verify_report rep;
    assert_int_equal(kl_log_verify(f->dir, NULL, NULL, &rep, &err), KL_ECORRUPT);
    assert_false(rep.ok);
    assert_string_equal(rep.segment, name);
    assert_int_equal(rep.offset, r3.off);
    assert_true(rep.problem[0] != '\0');

    /* A record with a seq out of order, its CRC fixed, is damage too. */
    memcpy(copy, si->bytes, si->size);
    copy[r3.off + 8 + 9] ^= 0x01;   /* low byte of the big-endian seq */
    put_le32(copy + r3.off + 4, crc32c_ref(0, copy + r3.off + 8, r3.len));
    write_all_file(path, copy, si->size);
    expect_open_corrupt(f, name, r3.off);

    write_all_file(path, si->bytes, si->size);
    verify_ok(f, 6);
    free(copy);
    seg_free(si);
    free(si);
}

static void test_damage_in_earlier_segment(void **state)
{
    fx *f = *state;
    uint64_t firsts[64];
    size_t nseg = make_segmented(f, 200, firsts, 64);
    assert_true(nseg >= 3);
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    for (size_t s = 0; s + 1 < nseg; s++) {
        char name[32], path[600];
        seg_name(firsts[s], name);
        path_of(f, name, path);
        seg_read(f, firsts[s], si);
        /* A middle record, and the last record of the segment: no valid
         * record follows it in its file, but later segments do. */
        size_t picks[2] = {si->nrec / 2, si->nrec - 1};
        for (int k = 0; k < 2; k++) {
            rec_pos r = si->recs[picks[k]];
            si->bytes[r.off + 8 + PREFIX] ^= 0x5a;
            write_all_file(path, si->bytes, si->size);
            expect_open_corrupt(f, name, r.off);
            si->bytes[r.off + 8 + PREFIX] ^= 0x5a;
        }
        /* Cut short: a torn tail is only allowed in the last segment. */
        rec_pos r = si->recs[si->nrec - 1];
        write_all_file(path, si->bytes, si->size - 1);
        expect_open_corrupt(f, name, r.off);
        assert_int_equal(file_size(path), si->size - 1);
        /* A damaged header. */
        si->bytes[20] ^= 0x01;
        write_all_file(path, si->bytes, si->size);
        kl_log *log = NULL;
        kl_log_recovery rec;
        kl_err err = {0};
        assert_int_equal(kl_log_open(&log, &f->cfg, &rec, &err), KL_ECORRUPT);
        assert_non_null(strstr(err.msg, name));
        si->bytes[20] ^= 0x01;
        write_all_file(path, si->bytes, si->size);
        seg_free(si);
    }
    free(si);
    verify_ok(f, 200);
}

/* Segments are scanned two at a time: with damage in two of them, the open
 * names the first in log order, whichever scan finished first. */
static void test_first_damage_named(void **state)
{
    fx *f = *state;
    uint64_t firsts[64];
    size_t nseg = make_segmented(f, 200, firsts, 64);
    assert_true(nseg >= 4);
    seg_info *si[2];
    char path[2][600];
    size_t at[2] = {1, nseg - 2};
    for (int k = 1; k >= 0; k--) {      /* the later one first */
        char name[32];
        si[k] = malloc(sizeof *si[k]);
        assert_non_null(si[k]);
        seg_name(firsts[at[k]], name);
        path_of(f, name, path[k]);
        seg_read(f, firsts[at[k]], si[k]);
        rec_pos r = si[k]->recs[si[k]->nrec / 2];
        si[k]->bytes[r.off + 8 + PREFIX] ^= 0x5a;
        write_all_file(path[k], si[k]->bytes, si[k]->size);
        if (k == 0) {
            for (int round = 0; round < 20; round++)
                expect_open_corrupt(f, name, r.off);
        }
    }
    for (int k = 0; k < 2; k++) {
        rec_pos r = si[k]->recs[si[k]->nrec / 2];
        si[k]->bytes[r.off + 8 + PREFIX] ^= 0x5a;
        write_all_file(path[k], si[k]->bytes, si[k]->size);
        seg_free(si[k]);
        free(si[k]);
    }
    verify_ok(f, 200);
}

static void test_missing_segment(void **state)
{
    fx *f = *state;
    uint64_t firsts[64];
    size_t nseg = make_segmented(f, 200, firsts, 64);
    assert_true(nseg >= 3);
    char name[32], next[32], path[600];
    seg_name(firsts[1], name);
    seg_name(firsts[2], next);
    path_of(f, name, path);
    size_t n;
    uint8_t *saved = read_all(path, &n);

    /* A middle one: the one after it starts at the wrong seq. */
    assert_int_equal(unlink(path), 0);
    expect_open_corrupt(f, next, 0);
    kl_log_verify_report rep;
    kl_err err = {0};
    assert_int_equal(kl_log_verify(f->dir, NULL, NULL, &rep, &err), KL_ECORRUPT);
    assert_false(rep.ok);
    write_all_file(path, saved, n);
    free(saved);

    /* The first and the last (both named in MANIFEST). */
    for (int k = 0; k < 2; k++) {
        seg_name(k == 0 ? firsts[0] : firsts[nseg - 1], name);
        path_of(f, name, path);
        saved = read_all(path, &n);
        assert_int_equal(unlink(path), 0);
        kl_log *log = NULL;
        kl_log_recovery rec;
        assert_int_equal(kl_log_open(&log, &f->cfg, &rec, &err), KL_ECORRUPT);
        assert_non_null(strstr(err.msg, name));
        write_all_file(path, saved, n);
        free(saved);
    }
    verify_ok(f, 200);
}

static void test_lock_and_create(void **state)
{
    fx *f = *state;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    kl_log *second = NULL;
    kl_err err = {0};
    assert_int_equal(kl_log_open(&second, &f->cfg, &rec, &err), KL_ELOCKED);
    assert_null(second);
    char pid[32];
    snprintf(pid, sizeof pid, "pid %ld", (long)getpid());
    assert_non_null(strstr(err.msg, pid));

    /* Readers need no lock. */
    kl_log_config ro = f->cfg;
    ro.read_only = true;
    assert_int_equal(kl_log_open(&second, &ro, &rec, &err), KL_OK);
    kl_log_close(second);

    assert_int_equal(kl_log_create(&f->cfg, &err), KL_EEXIST);
    kl_log_close(log);
    assert_int_equal(kl_log_create(&f->cfg, &err), KL_EEXIST);

    /* The lock goes with the close. */
    log = open_ok(f, &rec);
    kl_log_close(log);

    /* No log at all. */
    char empty[600];
    path_of(f, "empty", empty);
    assert_int_equal(mkdir(empty, 0700), 0);
    kl_log_config c = f->cfg;
    c.dir = empty;
    second = NULL;
    assert_int_equal(kl_log_open(&second, &c, &rec, &err), KL_ENOENT);
    assert_null(second);
    /* A segment without a MANIFEST still counts as an existing log. */
    char seg[600];
    path_of(f, "empty/00000000000000000001.log", seg);
    write_all_file(seg, "x", 1);
    assert_int_equal(kl_log_create(&c, &err), KL_EEXIST);
}

static int count_records(uint64_t seq, const uint8_t *payload, size_t len,
                         const uint8_t hash[KL_HASH_LEN], void *arg)
{
    uint64_t *n = arg;
    (*n)++;
    return seq == *n ? 0 : -1;
}

/* Tampering that keeps the framing valid: only the chain can see it. */
static void test_verify_detects_chain_tamper(void **state)
{
    fx *f = *state;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 8, 4);
    kl_log_close(log);
    const char *name = "00000000000000000001.log";
    char path[600];
    path_of(f, name, path);
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    seg_read(f, 1, si);
    rec_pos r4 = si->recs[3], r5 = si->recs[4];
    uint8_t *copy = malloc(si->size);
    assert_non_null(copy);

    /* (1) record 4's prev altered, its CRC recomputed. */
    memcpy(copy, si->bytes, si->size);
    copy[r4.off + 8 + 12 + 5] ^= 0x80;
    put_le32(copy + r4.off + 4, crc32c_ref(0, copy + r4.off + 8, r4.len));
    write_all_file(path, copy, si->size);

    log = open_ok(f, &rec);             /* framing is fine */
    assert_int_equal(rec.records, 8);
    assert_int_equal(rec.torn_bytes, 0);
    /* Startup replay does not look at the chain. */
    uint64_t n = 0;
    kl_err err = {0};
    assert_int_equal(kl_log_replay(log, 1, false, count_records, &n, &err), KL_OK);
    assert_int_equal(n, 8);
    seen s = {.next = 1, .hashes = true};
    assert_int_equal(kl_log_replay(log, 1, true, on_record, &s, &err), KL_ECORRUPT);
    assert_int_equal(s.count, 3);
    assert_string_equal(err.segment, name);
    assert_int_equal(err.offset, r4.off);
    kl_log_close(log);

    kl_log_verify_report rep;
    assert_int_equal(kl_log_verify(f->dir, NULL, NULL, &rep, &err), KL_ECORRUPT);
    assert_false(rep.ok);
    assert_int_equal(rep.events, 3);
    assert_string_equal(rep.segment, name);
    assert_int_equal(rep.offset, r4.off);
    assert_non_null(strstr(rep.problem, "prev"));

    /* (2) record 4's body altered, its CRC recomputed: record 5's prev no
     * longer matches. */
    memcpy(copy, si->bytes, si->size);
    copy[r4.off + 8 + PREFIX] ^= 0x01;
    put_le32(copy + r4.off + 4, crc32c_ref(0, copy + r4.off + 8, r4.len));
    write_all_file(path, copy, si->size);
    assert_int_equal(kl_log_verify(f->dir, NULL, NULL, &rep, &err), KL_ECORRUPT);
    assert_int_equal(rep.events, 4);
    assert_string_equal(rep.segment, name);
    assert_int_equal(rep.offset, r5.off);

    /* (3) the first record's prev altered: open already checks that one
     * against the segment header. */
    memcpy(copy, si->bytes, si->size);
    copy[HEADER + 8 + 12] ^= 0x01;
    put_le32(copy + HEADER + 4, crc32c_ref(0, copy + HEADER + 8, si->recs[0].len));
    write_all_file(path, copy, si->size);
    expect_open_corrupt(f, name, HEADER);

    write_all_file(path, si->bytes, si->size);
    verify_ok(f, 8);
    free(copy);
    seg_free(si);
    free(si);
}

/* ---- mark, rewind and failed writes ------------------------------------ */

static void test_rewind(void **state)
{
    fx *f = *state;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 2, 2);
    uint8_t h2[KL_HASH_LEN];
    kl_log_head_hash(log, h2);

    kl_log_mark m;
    kl_log_mark_get(log, &m);
    assert_int_equal(m.seq, 2);
    assert_memory_equal(m.hash, h2, KL_HASH_LEN);

    /* Frame three records with bodies that are not the pattern, forget
     * them, and frame the real ones in their place. */
    kl_buf b = {0};
    uint64_t seq;
    uint8_t junk[10] = {0};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(kl_log_frame(log, junk, sizeof junk, false, &b, &seq), KL_OK);
        assert_int_equal(seq, 3 + (uint64_t)i);
    }
    uint8_t moved[KL_HASH_LEN];
    kl_log_head_hash(log, moved);
    assert_memory_not_equal(moved, h2, KL_HASH_LEN);
    kl_log_rewind(log, &m);
    assert_int_equal(kl_log_head_seq(log), 2);
    uint8_t h[KL_HASH_LEN];
    kl_log_head_hash(log, h);
    assert_memory_equal(h, h2, KL_HASH_LEN);
    kl_buf_free(&b);

    for (uint64_t i = 3; i <= 5; i++) {
        uint8_t body[MAX_BODY];
        size_t bl = body_for(i, body);
        assert_int_equal(kl_log_frame(log, body, bl, false, &b, &seq), KL_OK);
        assert_int_equal(seq, i);
    }
    kl_err err = {0};
    assert_int_equal(kl_log_write(log, &b, &m, &err), KL_OK);
    kl_buf_free(&b);
    assert_int_equal(kl_log_head_seq(log), 5);
    replay_all(log, 1, true, 5);
    kl_log_close(log);
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, 5);
    replay_all(log, 1, true, 5);
    kl_log_close(log);
    verify_ok(f, 5);
}

/* A write the file system refuses: the file is cut back to the batch's
 * start, the head rewinds, and the next batch reuses the seqs. RLIMIT_FSIZE
 * makes pwrite fail for real (EFBIG) part way through the batch. */
static void test_failed_write_rewinds(void **state)
{
    fx *f = *state;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 3, 3);
    char path[600];
    path_of(f, "00000000000000000001.log", path);
    uint64_t before = file_size(path);
    uint8_t h3[KL_HASH_LEN];
    kl_log_head_hash(log, h3);

    kl_log_mark m;
    kl_log_mark_get(log, &m);
    kl_buf b = {0};
    for (uint64_t i = 4; i <= 13; i++) {
        uint8_t body[MAX_BODY];
        size_t bl = body_for(i, body);
        uint64_t seq;
        assert_int_equal(kl_log_frame(log, body, bl, false, &b, &seq), KL_OK);
    }
    assert_int_equal(kl_log_head_seq(log), 13);
    assert_true(b.len > 200);

    struct rlimit old, lim;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    void (*prev_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    lim = old;
    lim.rlim_cur = (rlim_t)(before + 100);  /* part of the batch fits */
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    kl_err err = {0};
    int rc = kl_log_write(log, &b, &m, &err);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, prev_handler);

    assert_int_equal(rc, KL_EIO);
    assert_true(err.msg[0] != '\0');
    assert_int_equal(file_size(path), before);
    assert_int_equal(kl_log_head_seq(log), 3);
    uint8_t h[KL_HASH_LEN];
    kl_log_head_hash(log, h);
    assert_memory_equal(h, h3, KL_HASH_LEN);
    assert_false(kl_log_is_read_only(log));
    kl_buf_free(&b);

    append_records(log, 5, 5);
    assert_int_equal(kl_log_head_seq(log), 8);
    replay_all(log, 1, true, 8);
    kl_log_close(log);
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, 8);
    assert_int_equal(rec.torn_bytes, 0);
    kl_log_close(log);
    verify_ok(f, 8);
}

static void test_sync(void **state)
{
    fx *f = *state;
    f->cfg.fsync = KL_FSYNC_BATCH;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 4, 2);
    kl_err err = {0};
    assert_int_equal(kl_log_sync(log, &err), KL_OK);
    assert_false(kl_log_is_read_only(log));
    kl_log_close(log);
    verify_ok(f, 4);
}

/* ---- reading by seq (kl_log_reader) ------------------------------------ */

enum { READER_RECS = 520 };

/* Every record's payload and chain hash, as replay sees them: what the
 * reader must give back, byte for byte. */
typedef struct expected {
    uint8_t *payload[READER_RECS + 1];
    size_t len[READER_RECS + 1];
    uint8_t hash[READER_RECS + 1][KL_HASH_LEN];
} expected;

static int on_expected(uint64_t seq, const uint8_t *payload, size_t len,
                       const uint8_t hash[KL_HASH_LEN], void *arg)
{
    expected *x = arg;
    assert_true(seq <= READER_RECS);
    free(x->payload[seq]);
    x->payload[seq] = malloc(len);
    assert_non_null(x->payload[seq]);
    memcpy(x->payload[seq], payload, len);
    x->len[seq] = len;
    memcpy(x->hash[seq], hash, KL_HASH_LEN);
    return 0;
}

static void expected_load(kl_log *log, expected *x)
{
    kl_err err = {0};
    int rc = kl_log_replay(log, 1, true, on_expected, x, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_replay: %d %s", rc, err.msg);
}

static void expected_free(expected *x)
{
    for (size_t i = 0; i <= READER_RECS; i++)
        free(x->payload[i]);
    free(x);
}

static void reader_expect(kl_log_reader *r, const expected *x, uint64_t seq,
                          kl_buf *b)
{
    uint8_t hash[KL_HASH_LEN];
    kl_err err = {0};
    int rc = kl_log_reader_get(r, seq, b, hash, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_reader_get(%llu): %d %s", (unsigned long long)seq, rc,
                 err.msg);
    assert_int_equal(b->len, x->len[seq]);
    assert_memory_equal(b->data, x->payload[seq], b->len);
    assert_memory_equal(hash, x->hash[seq], KL_HASH_LEN);
    /* The record's own body is at the end, whatever the prefix holds. */
    uint8_t body[MAX_BODY];
    size_t bl = body_for(seq, body);
    assert_memory_equal(b->data + b->len - bl, body, bl);
}

/* Records in many small segments, read newest first, in a scattered order
 * and oldest first (more segments than the reader keeps open); records and
 * segments written after the reader opened are found; a seq past the end
 * is KL_ENOENT. */
static void test_reader_by_seq(void **state)
{
    fx *f = *state;
    f->cfg.segment_bytes = 4096;
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 300, 4);
    expected *x = calloc(1, sizeof *x);
    assert_non_null(x);
    expected_load(log, x);

    kl_log_reader *r = NULL;
    kl_err err = {0};
    int rc = kl_log_reader_open(f->dir, &r, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_reader_open: %d %s", rc, err.msg);
    kl_buf b = {0};
    for (uint64_t seq = 300; seq >= 1; seq--)
        reader_expect(r, x, seq, &b);
    for (uint64_t i = 0; i < 300; i++)
        reader_expect(r, x, 1 + i * 7 % 300, &b);
    assert_int_equal(kl_log_reader_get(r, 301, &b, NULL, &err), KL_ENOENT);
    assert_int_equal(kl_log_reader_get(r, 0, &b, NULL, &err), KL_ENOENT);

    /* The daemon goes on writing: the tail of the last segment grows and
     * new segments roll. */
    append_records(log, READER_RECS - 300, 4);
    expected_load(log, x);
    uint64_t firsts[256];
    assert_true(list_segments(f, firsts, 256) > 12);
    reader_expect(r, x, READER_RECS, &b);
    for (uint64_t seq = 1; seq <= READER_RECS; seq++)
        reader_expect(r, x, seq, &b);
    assert_int_equal(kl_log_reader_get(r, READER_RECS + 1, &b, NULL, &err),
                     KL_ENOENT);

    /* hash may be NULL. */
    assert_int_equal(kl_log_reader_get(r, 5, &b, NULL, &err), KL_OK);
    assert_int_equal(b.len, x->len[5]);
    kl_buf_free(&b);
    kl_log_reader_close(r);
    kl_log_close(log);
    expected_free(x);
    kl_log_reader_close(NULL);
}

/* A record whose payload changed fails its CRC when read, naming the
 * segment and offset; a length out of bounds stops the walk the same way;
 * records before the damage still read. */
static void test_reader_detects_damage(void **state)
{
    fx *f = *state;
    uint64_t firsts[64];
    make_segmented(f, 100, firsts, 64);
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    seg_read(f, 1, si);
    assert_true(si->nrec > 12);
    char path[600];
    path_of(f, "00000000000000000001.log", path);
    si->bytes[si->recs[2].off + 8 + si->recs[2].len - 1] ^= 0x40;
    put_le32(si->bytes + si->recs[9].off, 0xfffffff0u);
    write_all_file(path, si->bytes, si->size);

    kl_log_reader *r = NULL;
    kl_err err = {0};
    assert_int_equal(kl_log_reader_open(f->dir, &r, &err), KL_OK);
    kl_buf b = {0};
    assert_int_equal(kl_log_reader_get(r, 2, &b, NULL, &err), KL_OK);
    memset(&err, 0, sizeof err);
    assert_int_equal(kl_log_reader_get(r, 3, &b, NULL, &err), KL_ECORRUPT);
    assert_string_equal(err.segment, "00000000000000000001.log");
    assert_int_equal(err.offset, si->recs[2].off);
    assert_int_equal(kl_log_reader_get(r, 9, &b, NULL, &err), KL_OK);
    memset(&err, 0, sizeof err);
    assert_int_equal(kl_log_reader_get(r, 11, &b, NULL, &err), KL_ECORRUPT);
    assert_int_equal(err.offset, si->recs[9].off);
    /* Later segments do not depend on the damaged one. */
    assert_int_equal(kl_log_reader_get(r, 100, &b, NULL, &err), KL_OK);
    kl_buf_free(&b);
    kl_log_reader_close(r);
    seg_free(si);
    free(si);
}

/* ---- compaction: a log that goes on from a head, and the switch ---------- */

/* A data dir of its own inside the test's dir (removed with it); with
 * `create`, holding a new empty log. */
static void sub_fx(const fx *f, const char *name, fx *sub, bool create)
{
    *sub = *f;
    int n = snprintf(sub->dir, sizeof sub->dir, "%s/%s", f->dir, name);
    assert_true(n > 0 && (size_t)n < sizeof sub->dir);
    sub->cfg.dir = sub->dir;
    if (create) {
        kl_err err = {0};
        int rc = kl_log_create(&sub->cfg, &err);
        if (rc != KL_OK)
            fail_msg("kl_log_create(%s): %d %s", sub->dir, rc, err.msg);
    }
}

static void snap_name(uint64_t seq, char out[48])
{
    snprintf(out, 48, "snapshot-%020llu.kls", (unsigned long long)seq);
}

static size_t snap_payload(uint64_t seq, char out[64])
{
    return (size_t)snprintf(out, 64, "the state at %llu", (unsigned long long)seq);
}

static void snapshot_ok(const char *dir, uint64_t seq, const uint8_t hash[KL_HASH_LEN])
{
    char payload[64];
    size_t n = snap_payload(seq, payload);
    kl_err err = {0};
    int rc = kl_snapshot_write(dir, seq, hash, payload, n, &err);
    if (rc != KL_OK)
        fail_msg("kl_snapshot_write(%s, %llu): %d %s", dir, (unsigned long long)seq,
                 rc, err.msg);
}

/* The dir holds exactly one snapshot, of `seq`, whole and with its hash. */
static void snapshot_expect(const char *dir, uint64_t seq, const uint8_t hash[KL_HASH_LEN])
{
    uint64_t seqs[8];
    size_t n = 0;
    kl_err err = {0};
    assert_int_equal(kl_snapshot_list(dir, seqs, 8, &n, &err), KL_OK);
    assert_int_equal(n, 1);
    assert_int_equal(seqs[0], seq);
    kl_snapshot_data sd = {0};
    uint8_t h[KL_HASH_LEN];
    int rc = kl_snapshot_read(dir, seq, &sd, h, &err);
    if (rc != KL_OK)
        fail_msg("kl_snapshot_read: %d %s", rc, err.msg);
    char payload[64];
    size_t pl = snap_payload(seq, payload);
    assert_int_equal(sd.len, pl);
    assert_memory_equal(sd.data, payload, pl);
    assert_memory_equal(h, hash, KL_HASH_LEN);
    kl_snapshot_release(&sd);
}

enum { NAME_LEN = 64, MAX_NAMES = 256, LISTING = MAX_NAMES * NAME_LEN };

static int cmp_name(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* The names, sorted, one space between: what a listing is compared as. */
static void names_join(char (*v)[NAME_LEN], size_t n, char *out)
{
    qsort(v, n, sizeof *v, cmp_name);
    out[0] = '\0';
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        int w = snprintf(out + len, LISTING - len, "%s%s", i ? " " : "", v[i]);
        assert_true(w > 0 && (size_t)w < LISTING - len);
        len += (size_t)w;
    }
}

/* Every entry of dir but . and .. (into out, LISTING bytes). */
static void dir_listing(const char *dir, char *out)
{
    char (*v)[NAME_LEN] = calloc(MAX_NAMES, NAME_LEN);
    assert_non_null(v);
    DIR *d = opendir(dir);
    if (d == NULL)
        fail_msg("opendir %s: %s", dir, strerror(errno));
    size_t n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        assert_true(n < MAX_NAMES);
        size_t len = strlen(de->d_name);
        assert_true(len < NAME_LEN);
        memcpy(v[n++], de->d_name, len + 1);
    }
    closedir(d);
    names_join(v, n, out);
    free(v);
}

static void expect_listing(const char *dir, const char *want)
{
    char *got = malloc(LISTING);
    assert_non_null(got);
    dir_listing(dir, got);
    assert_string_equal(got, want);
    free(got);
}

static bool exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

static void manifest_expect(const fx *f, uint64_t first, uint64_t last)
{
    char path[600], want[200], a[32], b[32];
    path_of(f, "MANIFEST", path);
    size_t n;
    char *m = (char *)read_all(path, &n);
    m[n] = '\0';
    seg_name(first, a);
    seg_name(last, b);
    snprintf(want, sizeof want, "keyledger-manifest 1\nfirst %s\nlast %s\n", a, b);
    assert_string_equal(m, want);
    free(m);
}

/* Replays (from 0 or `after` + 1) a log that goes on from record `after`
 * whose hash is after_hash: seqs from after + 1, the first record's prev
 * after_hash, the chain unbroken to the log's head. */
static void replay_after(kl_log *log, uint64_t after,
                         const uint8_t after_hash[KL_HASH_LEN], uint64_t from,
                         bool hashes, uint64_t expect_n)
{
    seen s = {.next = after + 1, .hashes = hashes, .have_last = true};
    memcpy(s.last_hash, after_hash, KL_HASH_LEN);
    kl_err err = {0};
    int rc = kl_log_replay(log, from, hashes, on_record, &s, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_replay: %d %s", rc, err.msg);
    assert_int_equal(s.count, expect_n);
    assert_int_equal(s.next - 1, kl_log_head_seq(log));
    uint8_t head[KL_HASH_LEN];
    kl_log_head_hash(log, head);
    assert_memory_equal(head, s.last_hash, KL_HASH_LEN);
}

static void verify_head(const char *dir, uint64_t events, uint64_t head_seq,
                        const uint8_t head_hash[KL_HASH_LEN])
{
    kl_log_verify_report rep;
    kl_err err = {0};
    int rc = kl_log_verify(dir, NULL, NULL, &rep, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_verify(%s): %d %s", dir, rc, err.msg);
    assert_true(rep.ok);
    assert_int_equal(rep.events, events);
    assert_int_equal(rep.head_seq, head_seq);
    assert_memory_equal(rep.head_hash, head_hash, KL_HASH_LEN);
    assert_int_equal(rep.torn_bytes, 0);
}

static void hash_of_text(const char *s, uint8_t out[KL_HASH_LEN])
{
    SHA256((const uint8_t *)s, strlen(s), out);
}

/* A log made with kl_log_create_after(after, after_hash) in `dir`, then
 * given n records in segments of seg_bytes and a snapshot at its head. */
typedef struct newlog {
    uint64_t after;
    uint8_t after_hash[KL_HASH_LEN];
    uint64_t head;
    uint8_t head_hash[KL_HASH_LEN];
    uint64_t segs[64];
    size_t nseg;
} newlog;

/* The old log: n records in f's dir in segments of f->cfg.segment_bytes and a
 * snapshot at its head. It is left open: the compaction tool holds the lock
 * from before it prepares until after it commits. */
static kl_log *make_old(fx *f, uint64_t n, uint64_t *head, uint8_t hash[KL_HASH_LEN])
{
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, n, 4);
    *head = kl_log_head_seq(log);
    kl_log_head_hash(log, hash);
    snapshot_ok(f->dir, *head, hash);
    return log;
}

/* The stage kl_log_compact_prepare gives: DIR/compact.tmp, empty. */
static char *prepare_ok(const fx *f)
{
    kl_err err = {0};
    char *stage = kl_log_compact_prepare(f->dir, &err);
    if (stage == NULL)
        fail_msg("kl_log_compact_prepare: %s", err.msg);
    char want[600];
    path_of(f, "compact.tmp", want);
    assert_string_equal(stage, want);
    struct stat st;
    assert_int_equal(stat(stage, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    expect_listing(stage, "");
    return stage;
}

static void build_new(const fx *f, const char *stage, kl_log *old, uint64_t n,
                      uint64_t seg_bytes, newlog *nl)
{
    memset(nl, 0, sizeof *nl);
    nl->after = kl_log_head_seq(old);
    kl_log_head_hash(old, nl->after_hash);
    fx s = *f;
    snprintf(s.dir, sizeof s.dir, "%s", stage);
    s.cfg.dir = s.dir;
    s.cfg.segment_bytes = seg_bytes;
    kl_err err = {0};
    int rc = kl_log_create_after(&s.cfg, nl->after, nl->after_hash, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_create_after: %d %s", rc, err.msg);
    kl_log_recovery rec;
    kl_log *log = open_ok(&s, &rec);
    assert_int_equal(kl_log_head_seq(log), nl->after);
    assert_int_equal(kl_log_first_seq(log), nl->after + 1);
    append_records(log, n, 4);
    nl->head = kl_log_head_seq(log);
    assert_int_equal(nl->head, nl->after + n);
    kl_log_head_hash(log, nl->head_hash);
    kl_log_close(log);
    snapshot_ok(stage, nl->head, nl->head_hash);
    nl->nseg = list_segments(&s, nl->segs, 64);
    assert_true(nl->nseg >= 1);
    assert_int_equal(nl->segs[0], nl->after + 1);
}

/* What a finished switch leaves: the new segments, the new snapshot, the
 * MANIFEST naming them and LOCK; no old file, nothing of compact.*. */
static void expect_switched(const fx *f, const newlog *nl)
{
    char (*v)[NAME_LEN] = calloc(MAX_NAMES, NAME_LEN);
    char *want = malloc(LISTING);
    assert_non_null(v);
    assert_non_null(want);
    size_t n = 0;
    for (size_t i = 0; i < nl->nseg; i++) {
        char name[32];
        seg_name(nl->segs[i], name);
        snprintf(v[n++], NAME_LEN, "%s", name);
    }
    snprintf(v[n++], NAME_LEN, "LOCK");
    snprintf(v[n++], NAME_LEN, "MANIFEST");
    snap_name(nl->head, v[n++]);
    names_join(v, n, want);
    expect_listing(f->dir, want);
    free(v);
    free(want);
    manifest_expect(f, nl->after + 1, nl->segs[nl->nseg - 1]);
    snapshot_expect(f->dir, nl->head, nl->head_hash);
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    seg_read(f, nl->after + 1, si);
    assert_memory_equal(si->carried, nl->after_hash, KL_HASH_LEN);
    seg_free(si);
    free(si);
}

/* The dir opens (as writer, then read-only) as the new log, and verifies. */
static void expect_new_log(fx *f, const newlog *nl)
{
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    assert_int_equal(rec.records, nl->head - nl->after);
    assert_int_equal(rec.torn_bytes, 0);
    assert_int_equal(kl_log_first_seq(log), nl->after + 1);
    assert_int_equal(kl_log_head_seq(log), nl->head);
    uint8_t h[KL_HASH_LEN];
    kl_log_head_hash(log, h);
    assert_memory_equal(h, nl->head_hash, KL_HASH_LEN);
    replay_after(log, nl->after, nl->after_hash, 0, true, nl->head - nl->after);
    kl_log_close(log);
    kl_log_config ro = f->cfg;
    ro.read_only = true;
    kl_err err = {0};
    int rc = kl_log_open(&log, &ro, &rec, &err);
    if (rc != KL_OK)
        fail_msg("read-only kl_log_open: %d %s", rc, err.msg);
    assert_int_equal(kl_log_first_seq(log), nl->after + 1);
    assert_int_equal(kl_log_head_seq(log), nl->head);
    replay_after(log, nl->after, nl->after_hash, nl->after + 1, false,
                 nl->head - nl->after);
    kl_log_close(log);
    verify_head(f->dir, nl->head - nl->after, nl->head, nl->head_hash);
}

static void test_create_after(void **state)
{
    fx *f = *state;
    fx s;
    sub_fx(f, "after", &s, false);
    enum { N = 1000 };
    uint8_t H[KL_HASH_LEN], zero[KL_HASH_LEN] = {0};
    hash_of_text("the head a compaction goes on from", H);
    kl_err err = {0};
    assert_int_equal(kl_log_create_after(&s.cfg, N, H, &err), KL_OK);
    expect_listing(s.dir, "00000000000000001001.log MANIFEST");
    manifest_expect(&s, N + 1, N + 1);
    seg_info *si = malloc(sizeof *si);
    assert_non_null(si);
    seg_read(&s, N + 1, si);
    assert_int_equal(si->size, HEADER);
    assert_memory_equal(si->carried, H, KL_HASH_LEN);
    seg_free(si);

    /* Before any record: the head is the one it goes on from. */
    kl_log_recovery rec;
    kl_log *log = open_ok(&s, &rec);
    assert_int_equal(rec.records, 0);
    assert_int_equal(rec.torn_bytes, 0);
    assert_int_equal(kl_log_first_seq(log), N + 1);
    assert_int_equal(kl_log_head_seq(log), N);
    uint8_t h[KL_HASH_LEN];
    kl_log_head_hash(log, h);
    assert_memory_equal(h, H, KL_HASH_LEN);
    kl_log_mark m;
    kl_log_mark_get(log, &m);
    assert_int_equal(m.seq, N);
    assert_memory_equal(m.hash, H, KL_HASH_LEN);
    replay_after(log, N, H, 0, true, 0);
    kl_log_verify_report rep;
    assert_int_equal(kl_log_verify(s.dir, NULL, NULL, &rep, &err), KL_OK);
    assert_true(rep.ok);
    assert_int_equal(rep.events, 0);
    assert_int_equal(rep.head_seq, N);
    assert_memory_equal(rep.head_hash, H, KL_HASH_LEN);

    /* Not over a log, while it is open or after. */
    assert_int_equal(kl_log_create_after(&s.cfg, N, H, &err), KL_EEXIST);
    assert_int_equal(kl_log_create(&s.cfg, &err), KL_EEXIST);

    /* Records go on from N + 1, the first one chained to H. */
    append_records(log, 1, 1);
    append_records(log, 9, 3);
    assert_int_equal(kl_log_head_seq(log), N + 10);
    assert_int_equal(kl_log_first_seq(log), N + 1);
    uint8_t head[KL_HASH_LEN];
    kl_log_head_hash(log, head);
    assert_memory_not_equal(head, H, KL_HASH_LEN);
    replay_after(log, N, H, 0, true, 10);
    replay_after(log, N, H, 1, false, 10);
    replay_after(log, N, H, N + 1, true, 10);
    seen tail = {.next = N + 4, .hashes = true};
    assert_int_equal(kl_log_replay(log, N + 4, true, on_record, &tail, &err), KL_OK);
    assert_int_equal(tail.count, 7);
    assert_memory_equal(tail.last_hash, head, KL_HASH_LEN);
    seen none = {.next = N + 11};
    assert_int_equal(kl_log_replay(log, N + 11, false, on_record, &none, &err), KL_OK);
    assert_int_equal(none.count, 0);
    kl_log_close(log);

    seg_read(&s, N + 1, si);
    assert_int_equal(si->nrec, 10);
    assert_int_equal(si->recs[0].seq, N + 1);
    assert_int_equal(si->recs[0].off, HEADER);
    assert_memory_equal(si->bytes + HEADER + 8 + 12, H, KL_HASH_LEN);
    assert_memory_not_equal(si->bytes + HEADER + 8 + 12, zero, KL_HASH_LEN);
    seg_free(si);
    free(si);
    verify_head(s.dir, 10, N + 10, head);

    /* The same after a reopen. */
    log = open_ok(&s, &rec);
    assert_int_equal(rec.records, 10);
    assert_int_equal(rec.torn_bytes, 0);
    assert_int_equal(kl_log_first_seq(log), N + 1);
    assert_int_equal(kl_log_head_seq(log), N + 10);
    kl_log_head_hash(log, h);
    assert_memory_equal(h, head, KL_HASH_LEN);
    replay_after(log, N, H, 0, true, 10);
    append_records(log, 2, 2);
    kl_log_head_hash(log, head);
    kl_log_close(log);
    verify_head(s.dir, 12, N + 12, head);
    kl_log_config ro = s.cfg;
    ro.read_only = true;
    assert_int_equal(kl_log_open(&log, &ro, &rec, &err), KL_OK);
    assert_int_equal(kl_log_first_seq(log), N + 1);
    assert_int_equal(kl_log_head_seq(log), N + 12);
    replay_after(log, N, H, 0, true, 12);
    kl_log_close(log);

    /* The reader finds records from N + 1 and nothing before. */
    kl_log_reader *r = NULL;
    assert_int_equal(kl_log_reader_open(s.dir, &r, &err), KL_OK);
    kl_buf b = {0};
    assert_int_equal(kl_log_reader_get(r, N + 1, &b, h, &err), KL_OK);
    assert_int_equal(be64((const uint8_t *)b.data + 2), N + 1);
    assert_memory_equal(b.data + 12, H, KL_HASH_LEN);
    assert_int_equal(kl_log_reader_get(r, N + 12, &b, h, &err), KL_OK);
    assert_memory_equal(h, head, KL_HASH_LEN);
    assert_int_equal(kl_log_reader_get(r, N, &b, NULL, &err), KL_ENOENT);
    assert_int_equal(kl_log_reader_get(r, 1, &b, NULL, &err), KL_ENOENT);
    assert_int_equal(kl_log_reader_get(r, N + 13, &b, NULL, &err), KL_ENOENT);
    kl_buf_free(&b);
    kl_log_reader_close(r);

    /* Never over an existing log: the fixture's (seq 0), or this one with
     * another seq. */
    assert_int_equal(kl_log_create_after(&f->cfg, N, H, &err), KL_EEXIST);
    assert_int_equal(kl_log_create_after(&s.cfg, 5, zero, &err), KL_EEXIST);
    assert_int_equal(kl_log_create_after(&s.cfg, N + 12, head, &err), KL_EEXIST);
    log = open_ok(&s, &rec);
    assert_int_equal(kl_log_head_seq(log), N + 12);
    kl_log_close(log);

    /* Its segments are a log even when the MANIFEST is lost. */
    char manifest[600];
    path_of(&s, "MANIFEST", manifest);
    assert_int_equal(unlink(manifest), 0);
    assert_int_equal(kl_log_create(&s.cfg, &err), KL_EEXIST);
    assert_int_equal(kl_log_create_after(&s.cfg, 5, zero, &err), KL_EEXIST);
}

/* The compaction tool's steps, none interrupted. */
static void test_compact_switch(void **state)
{
    fx *f = *state;
    uint64_t old_head;
    uint8_t old_hash[KL_HASH_LEN];
    kl_log *old = make_old(f, 40, &old_head, old_hash);
    assert_int_equal(old_head, 40);
    char *stage = prepare_ok(f);
    newlog nl;
    build_new(f, stage, old, 7, 64u << 20, &nl);
    assert_int_equal(nl.after, 40);
    assert_int_equal(nl.nseg, 1);
    /* Built, not committed: the old log is still the log. */
    expect_listing(f->dir, "00000000000000000001.log LOCK MANIFEST compact.tmp "
                           "snapshot-00000000000000000040.kls");
    kl_err err = {0};
    int rc = kl_log_compact_commit(f->dir, NULL, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_compact_commit: %d %s", rc, err.msg);
    /* Done before the old log is closed. */
    expect_switched(f, &nl);
    char path[600];
    path_of(f, "compact.tmp", path);
    assert_false(exists(path));
    path_of(f, "compact.ready", path);
    assert_false(exists(path));
    kl_log_close(old);
    free(stage);
    expect_switched(f, &nl);
    expect_new_log(f, &nl);

    /* The new log takes writes on from its head. */
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    append_records(log, 3, 3);
    assert_int_equal(kl_log_head_seq(log), 50);
    replay_after(log, 40, old_hash, 0, true, 10);
    kl_log_close(log);
    /* Finishing when there is nothing to finish changes nothing. */
    assert_int_equal(kl_log_compact_finish(f->dir, NULL, &err), KL_OK);
    manifest_expect(f, 41, 41);
    log = open_ok(f, &rec);
    assert_int_equal(kl_log_head_seq(log), 50);
    kl_log_close(log);
}

/* The switch stopped by a crash after the commit, at each point the finish
 * can be at; finished by the next writer's open (or by calling
 * kl_log_compact_finish again). */
typedef enum {
    STOP_NOTHING_MOVED, STOP_MANIFEST_MOVED, STOP_SOME_SEGMENTS_MOVED,
    STOP_ALL_MOVED, STOP_SOME_OLD_DELETED, STOP_ONLY_LOCK_LEFT, STOP_COUNT
} stop_point;

static void move_in(const char *ready, const char *data, const char *name)
{
    char a[700], b[700];
    snprintf(a, sizeof a, "%s/%s", ready, name);
    snprintf(b, sizeof b, "%s/%s", data, name);
    if (rename(a, b) != 0)
        fail_msg("rename %s %s: %s", a, b, strerror(errno));
}

static void delete_in(const char *dir, const char *name)
{
    char p[700];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    if (unlink(p) != 0)
        fail_msg("unlink %s: %s", p, strerror(errno));
}

static void expect_refused_half_switched(const fx *f)
{
    kl_log_config ro = f->cfg;
    ro.read_only = true;
    kl_log *log = NULL;
    kl_log_recovery rec;
    kl_err err = {0};
    assert_int_equal(kl_log_open(&log, &ro, &rec, &err), KL_EINVAL);
    assert_null(log);
    assert_non_null(strstr(err.msg, "committed but not finished"));
    kl_log_verify_report rep;
    assert_int_equal(kl_log_verify(f->dir, NULL, NULL, &rep, &err), KL_EINVAL);
    assert_false(rep.ok);
    assert_non_null(strstr(rep.problem, "committed but not finished"));
}

static void run_interrupted(fx *f, stop_point stop, bool by_finish)
{
    char name[64];
    snprintf(name, sizeof name, "stop-%d-%s", (int)stop, by_finish ? "finish" : "open");
    fx s;
    sub_fx(f, name, &s, true);
    s.cfg.segment_bytes = 4096;
    uint64_t old_head;
    uint8_t old_hash[KL_HASH_LEN];
    kl_log *old = make_old(&s, 100, &old_head, old_hash);
    uint64_t old_segs[64];
    size_t nold = list_segments(&s, old_segs, 64);
    assert_true(nold >= 3);
    char *stage = prepare_ok(&s);
    newlog nl;
    build_new(&s, stage, old, 90, 4096, &nl);
    assert_true(nl.nseg >= 3);

    /* The commit by hand: the rename, and nothing after it. */
    char ready[600];
    path_of(&s, "compact.ready", ready);
    assert_int_equal(rename(stage, ready), 0);
    free(stage);
    char seg[32], snap[48];
    if (stop >= STOP_MANIFEST_MOVED)
        move_in(ready, s.dir, "MANIFEST");
    if (stop == STOP_SOME_SEGMENTS_MOVED) {
        for (size_t i = 0; i < (nl.nseg + 1) / 2; i++) {
            seg_name(nl.segs[i], seg);
            move_in(ready, s.dir, seg);
        }
    }
    if (stop >= STOP_ALL_MOVED) {
        for (size_t i = 0; i < nl.nseg; i++) {
            seg_name(nl.segs[i], seg);
            move_in(ready, s.dir, seg);
        }
        snap_name(nl.head, snap);
        move_in(ready, s.dir, snap);
    }
    if (stop == STOP_SOME_OLD_DELETED) {
        for (size_t i = 0; i < nold; i += 2) {
            seg_name(old_segs[i], seg);
            delete_in(s.dir, seg);
        }
    }
    if (stop == STOP_ONLY_LOCK_LEFT) {
        for (size_t i = 0; i < nold; i++) {
            seg_name(old_segs[i], seg);
            delete_in(s.dir, seg);
        }
        snap_name(old_head, snap);
        delete_in(s.dir, snap);
        expect_listing(ready, "LOCK");
    }

    char *before = malloc(LISTING), *after = malloc(LISTING);
    assert_non_null(before);
    assert_non_null(after);
    dir_listing(s.dir, before);
    expect_refused_half_switched(&s);
    /* A writer cannot finish while the lock is held, and changes nothing
     * trying. */
    kl_log *log = NULL;
    kl_log_recovery rec;
    kl_err err = {0};
    assert_int_equal(kl_log_open(&log, &s.cfg, &rec, &err), KL_ELOCKED);
    dir_listing(s.dir, after);
    assert_string_equal(after, before);

    if (by_finish) {
        /* The lock's holder finishes it. */
        int rc = kl_log_compact_finish(s.dir, NULL, &err);
        if (rc != KL_OK)
            fail_msg("kl_log_compact_finish (stop %d): %d %s", (int)stop, rc, err.msg);
        kl_log_close(old);
    } else {
        /* The crash: the lock goes with the process. */
        kl_log_close(old);
        int rc = kl_log_open(&log, &s.cfg, &rec, &err);
        if (rc != KL_OK)
            fail_msg("kl_log_open (stop %d): %d %s", (int)stop, rc, err.msg);
        assert_int_equal(rec.records, nl.head - nl.after);
        assert_int_equal(kl_log_first_seq(log), nl.after + 1);
        assert_int_equal(kl_log_head_seq(log), nl.head);
        uint8_t h[KL_HASH_LEN];
        kl_log_head_hash(log, h);
        assert_memory_equal(h, nl.head_hash, KL_HASH_LEN);
        replay_after(log, nl.after, nl.after_hash, 0, true, nl.head - nl.after);
        kl_log_close(log);
    }
    assert_false(exists(ready));
    expect_switched(&s, &nl);

    /* Finishing again is a no-op. */
    dir_listing(s.dir, before);
    assert_int_equal(kl_log_compact_finish(s.dir, NULL, &err), KL_OK);
    dir_listing(s.dir, after);
    assert_string_equal(after, before);
    expect_switched(&s, &nl);
    expect_new_log(&s, &nl);
    for (size_t i = 0; i < nold; i++) {
        char p[600];
        seg_name(old_segs[i], seg);
        path_of(&s, seg, p);
        assert_false(exists(p));
    }
    free(before);
    free(after);
    rm_rf(s.dir);
}

static void test_compact_interrupted(void **state)
{
    fx *f = *state;
    for (int stop = 0; stop < STOP_COUNT; stop++) {
        run_interrupted(f, (stop_point)stop, false);
        run_interrupted(f, (stop_point)stop, true);
    }
}

/* A compact.tmp that never committed: the old log is the log. */
static void test_compact_not_committed(void **state)
{
    fx *f = *state;
    uint64_t old_head;
    uint8_t old_hash[KL_HASH_LEN];
    kl_log *old = make_old(f, 30, &old_head, old_hash);
    char *stage = prepare_ok(f);
    newlog nl;
    build_new(f, stage, old, 12, 64u << 20, &nl);
    char path[600];
    snprintf(path, sizeof path, "%s/MANIFEST", stage);
    assert_true(exists(path));
    const char *old_files = "00000000000000000001.log LOCK MANIFEST "
                            "snapshot-00000000000000000030.kls";
    const char *want = "00000000000000000001.log LOCK MANIFEST compact.tmp "
                       "snapshot-00000000000000000030.kls";
    expect_listing(f->dir, want);
    char *staged = malloc(LISTING);
    assert_non_null(staged);
    dir_listing(stage, staged);
    assert_string_equal(staged, "00000000000000000031.log LOCK MANIFEST "
                                "snapshot-00000000000000000042.kls");
    /* The crash. */
    kl_log_close(old);

    /* Readers see the old log and leave compact.tmp alone. */
    kl_log_config ro = f->cfg;
    ro.read_only = true;
    kl_log *log = NULL;
    kl_log_recovery rec;
    kl_err err = {0};
    int rc = kl_log_open(&log, &ro, &rec, &err);
    if (rc != KL_OK)
        fail_msg("read-only kl_log_open: %d %s", rc, err.msg);
    assert_int_equal(kl_log_first_seq(log), 1);
    assert_int_equal(kl_log_head_seq(log), old_head);
    uint8_t h[KL_HASH_LEN];
    kl_log_head_hash(log, h);
    assert_memory_equal(h, old_hash, KL_HASH_LEN);
    replay_all(log, 1, true, old_head);
    kl_log_close(log);
    verify_ok(f, old_head);
    expect_listing(f->dir, want);
    expect_listing(stage, staged);
    free(staged);

    /* The next writer throws it away and opens the old log. */
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, old_head);
    assert_int_equal(kl_log_first_seq(log), 1);
    assert_int_equal(kl_log_head_seq(log), old_head);
    kl_log_head_hash(log, h);
    assert_memory_equal(h, old_hash, KL_HASH_LEN);
    assert_false(exists(stage));
    expect_listing(f->dir, old_files);
    manifest_expect(f, 1, 1);
    append_records(log, 2, 2);
    kl_log_close(log);
    verify_ok(f, old_head + 2);

    /* A compact.tmp the crash left half made (no MANIFEST yet) goes too. */
    log = open_ok(f, &rec);
    free(stage);
    stage = prepare_ok(f);
    fx s = *f;
    snprintf(s.dir, sizeof s.dir, "%s", stage);
    s.cfg.dir = s.dir;
    uint8_t head[KL_HASH_LEN];
    kl_log_head_hash(log, head);
    assert_int_equal(kl_log_create_after(&s.cfg, old_head + 2, head, &err), KL_OK);
    snprintf(path, sizeof path, "%s/MANIFEST", stage);
    assert_int_equal(unlink(path), 0);
    kl_log_close(log);
    log = open_ok(f, &rec);
    assert_int_equal(kl_log_first_seq(log), 1);
    assert_int_equal(kl_log_head_seq(log), old_head + 2);
    assert_false(exists(stage));
    kl_log_close(log);
    expect_listing(f->dir, old_files);
    verify_ok(f, old_head + 2);
    free(stage);
}

/* kl_log_compact_abandon: compact.tmp goes, the old log is untouched. */
static void test_compact_abandon(void **state)
{
    fx *f = *state;
    uint64_t old_head;
    uint8_t old_hash[KL_HASH_LEN];
    kl_log *old = make_old(f, 25, &old_head, old_hash);
    char *before = malloc(LISTING);
    assert_non_null(before);
    dir_listing(f->dir, before);
    char seg[600];
    path_of(f, "00000000000000000001.log", seg);
    size_t old_len;
    uint8_t *old_bytes = read_all(seg, &old_len);

    char *stage = prepare_ok(f);
    /* Prepare again over a stage with something in it: emptied. */
    char junk[700];
    snprintf(junk, sizeof junk, "%s/leftover", stage);
    write_all_file(junk, "x", 1);
    free(stage);
    stage = prepare_ok(f);
    newlog nl;
    build_new(f, stage, old, 9, 64u << 20, &nl);
    kl_log_compact_abandon(f->dir);
    assert_false(exists(stage));
    expect_listing(f->dir, before);
    size_t n;
    uint8_t *now = read_all(seg, &n);
    assert_int_equal(n, old_len);
    assert_memory_equal(now, old_bytes, n);
    free(now);
    manifest_expect(f, 1, 1);
    snapshot_expect(f->dir, old_head, old_hash);
    /* Nothing to abandon: harmless. */
    kl_log_compact_abandon(f->dir);
    expect_listing(f->dir, before);

    /* The old log goes on as if nothing happened. */
    append_records(old, 3, 3);
    assert_int_equal(kl_log_head_seq(old), old_head + 3);
    kl_log_close(old);
    kl_log_recovery rec;
    kl_log *log = open_ok(f, &rec);
    assert_int_equal(rec.records, old_head + 3);
    assert_int_equal(kl_log_first_seq(log), 1);
    replay_all(log, 1, true, old_head + 3);
    kl_log_close(log);
    verify_ok(f, old_head + 3);
    free(stage);
    free(before);
    free(old_bytes);
}

/* An old log of many segments (and snapshots): every one goes, every new
 * one stays, and the new log rolls on from there. */
static void test_compact_many_segments(void **state)
{
    fx *f = *state;
    f->cfg.segment_bytes = 4096;
    kl_log_recovery rec;
    kl_log *old = open_ok(f, &rec);
    append_records(old, 100, 4);
    uint8_t h100[KL_HASH_LEN];
    kl_log_head_hash(old, h100);
    snapshot_ok(f->dir, 100, h100);
    append_records(old, 200, 4);
    uint64_t old_head = kl_log_head_seq(old);
    uint8_t old_hash[KL_HASH_LEN];
    kl_log_head_hash(old, old_hash);
    snapshot_ok(f->dir, old_head, old_hash);
    uint64_t old_segs[64];
    size_t nold = list_segments(f, old_segs, 64);
    assert_true(nold >= 5);

    char *stage = prepare_ok(f);
    newlog nl;
    build_new(f, stage, old, 120, 4096, &nl);
    assert_true(nl.nseg >= 3);
    assert_true(nl.segs[0] > old_segs[nold - 1]);
    kl_err err = {0};
    int rc = kl_log_compact_commit(f->dir, NULL, &err);
    if (rc != KL_OK)
        fail_msg("kl_log_compact_commit: %d %s", rc, err.msg);
    kl_log_close(old);
    free(stage);
    for (size_t i = 0; i < nold; i++) {
        char name[32], path[600];
        seg_name(old_segs[i], name);
        path_of(f, name, path);
        assert_false(exists(path));
    }
    uint64_t now_segs[64];
    size_t nnow = list_segments(f, now_segs, 64);
    assert_int_equal(nnow, nl.nseg);
    assert_memory_equal(now_segs, nl.segs, nnow * sizeof *now_segs);
    expect_switched(f, &nl);
    expect_new_log(f, &nl);

    /* The new log rolls into more segments; it still begins after the old
     * head. */
    kl_log *log = open_ok(f, &rec);
    append_records(log, 150, 4);
    uint8_t head[KL_HASH_LEN];
    kl_log_head_hash(log, head);
    kl_log_close(log);
    nnow = list_segments(f, now_segs, 64);
    assert_true(nnow > nl.nseg);
    assert_int_equal(now_segs[0], old_head + 1);
    manifest_expect(f, old_head + 1, now_segs[nnow - 1]);
    log = open_ok(f, &rec);
    assert_int_equal(rec.records, 270);
    assert_int_equal(kl_log_head_seq(log), old_head + 270);
    replay_after(log, old_head, old_hash, 0, true, 270);
    /* Starting inside a later segment skips the ones before. */
    seen s = {.next = now_segs[2] + 1, .hashes = true};
    assert_int_equal(kl_log_replay(log, now_segs[2] + 1, true, on_record, &s, &err),
                     KL_OK);
    assert_int_equal(s.count, old_head + 270 - now_segs[2]);
    assert_memory_equal(s.last_hash, head, KL_HASH_LEN);
    kl_log_close(log);
    verify_head(f->dir, 270, old_head + 270, head);
}

/* Compacting a log that is itself a compacted one. */
static void test_compact_again(void **state)
{
    fx *f = *state;
    uint64_t h1;
    uint8_t hash1[KL_HASH_LEN];
    kl_log *old = make_old(f, 20, &h1, hash1);
    char *stage = prepare_ok(f);
    newlog first;
    build_new(f, stage, old, 15, 64u << 20, &first);
    kl_err err = {0};
    assert_int_equal(kl_log_compact_commit(f->dir, NULL, &err), KL_OK);
    kl_log_close(old);
    free(stage);
    expect_switched(f, &first);

    kl_log_recovery rec;
    old = open_ok(f, &rec);
    assert_int_equal(kl_log_first_seq(old), 21);
    assert_int_equal(kl_log_head_seq(old), 35);
    stage = prepare_ok(f);
    newlog second;
    build_new(f, stage, old, 4, 64u << 20, &second);
    assert_int_equal(second.after, 35);
    assert_memory_equal(second.after_hash, first.head_hash, KL_HASH_LEN);
    assert_int_equal(kl_log_compact_commit(f->dir, NULL, &err), KL_OK);
    kl_log_close(old);
    free(stage);
    expect_switched(f, &second);
    expect_new_log(f, &second);
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc32c_vectors),
        cmocka_unit_test(test_crc32c_paths_agree),
        cmocka_unit_test(test_crc32c_long_buffers),
        T(test_empty_log),
        T(test_write_reopen_replay),
        T(test_replay_from_marks),
        T(test_frame_rejects_oversized),
        T(test_segment_roll),
        T(test_verify_check_callback),
        T(test_torn_tail_every_offset),
        T(test_torn_group),
        T(test_torn_only_record_of_last_segment),
        T(test_room),
        T(test_garbage_after_last_record),
        T(test_damage_in_last_segment),
        T(test_damage_in_earlier_segment),
        T(test_first_damage_named),
        T(test_missing_segment),
        T(test_lock_and_create),
        T(test_verify_detects_chain_tamper),
        T(test_rewind),
        T(test_failed_write_rewinds),
        T(test_sync),
        T(test_reader_by_seq),
        T(test_reader_detects_damage),
        T(test_create_after),
        T(test_compact_switch),
        T(test_compact_interrupted),
        T(test_compact_not_committed),
        T(test_compact_abandon),
        T(test_compact_many_segments),
        T(test_compact_again),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
