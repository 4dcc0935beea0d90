/*
 * Snapshots: the state at a seq, written whole beside the segments
 * (docs/log-format.md, "Snapshots"). This file knows the container, not
 * what is in it (projections/snapshot.c).
 */
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/*
 * snapshot-NNNNNNNNNNNNNNNNNNNN.kls, named by the seq of the last record it
 * covers: a 72-byte header, then the payload (projections/snapshot.c).
 *
 *   magic "KLSNAPSH" (8) | format u32 (1) | header size u32 (72) | seq u64
 *   | chain hash of record seq (32) | payload length u64 | CRC-32C of the
 *   payload u32 | CRC-32C of the 68 bytes before it u32
 *
 * Written as every file here is: temp, fsync, rename, fsync the dir.
 */
enum { SNAP_HEADER = 72, SNAP_FORMAT = 1 };
static const char SNAP_MAGIC[8] = {'K', 'L', 'S', 'N', 'A', 'P', 'S', 'H'};
#define KL_SNAPSHOT_MAX ((uint64_t)16 << 30)

static void snapshot_name(uint64_t seq, char out[48])
{
    snprintf(out, 48, "snapshot-%020llu.kls", (unsigned long long)seq);
}

int kl_snapshot_write(const char *dir, uint64_t seq, const uint8_t hash[KL_HASH_LEN],
                      const void *payload, size_t len, kl_err *err)
{
    uint8_t h[SNAP_HEADER];
    memcpy(h, SNAP_MAGIC, 8);
    put_u32(h + 8, SNAP_FORMAT);
    put_u32(h + 12, SNAP_HEADER);
    put_u64(h + 16, seq);
    memcpy(h + 24, hash, KL_HASH_LEN);
    put_u64(h + 56, len);
    put_u32(h + 64, kl_crc32c(0, payload, len));
    put_u32(h + 68, kl_crc32c(0, h, 68));
    char name[48];
    snapshot_name(seq, name);
    return kl_write_file_atomic(dir, name, h, sizeof h, payload, len, err);
}

void kl_snapshot_release(kl_snapshot_data *s)
{
    if (s->map != NULL)
        munmap(s->map, s->map_len);
    if (s->opened)
        close(s->fd);
    memset(s, 0, sizeof *s);
}

int kl_snapshot_open(const char *dir, uint64_t seq, kl_snapshot_data *out,
                     uint8_t hash[KL_HASH_LEN], kl_err *err)
{
    char name[48];
    snapshot_name(seq, name);
    memset(out, 0, sizeof *out);
    char *path = kl_path_join(dir, name);
    if (path == NULL)
        return KL_ENOMEM;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    free(path);
    if (fd < 0) {
        kl_err_set(err, "open %s: %s", name, strerror(errno));
        return KL_EIO;
    }
    uint8_t h[SNAP_HEADER];
    struct stat st;
    if (fstat(fd, &st) != 0 || pread(fd, h, sizeof h, 0) != (ssize_t)sizeof h ||
        memcmp(h, SNAP_MAGIC, 8) != 0 || get_u32(h + 68) != kl_crc32c(0, h, 68)) {
        kl_err_set(err, "%s: not a whole snapshot header", name);
        close(fd);
        return KL_ECORRUPT;
    }
    uint64_t len = get_u64(h + 56);
    if (get_u32(h + 8) != SNAP_FORMAT || get_u32(h + 12) != SNAP_HEADER ||
        get_u64(h + 16) != seq || len > KL_SNAPSHOT_MAX ||
        (uint64_t)st.st_size != SNAP_HEADER + len) {
        kl_err_set(err, "%s: header does not fit the file", name);
        close(fd);
        return KL_ECORRUPT;
    }
    out->fd = fd;
    out->opened = true;
    out->len = (size_t)len;
    out->crc = get_u32(h + 64);
    memcpy(hash, h + 24, KL_HASH_LEN);
    return KL_OK;
}

bool kl_snapshot_pread(const kl_snapshot_data *s, void *buf, size_t n, uint64_t off)
{
    return off <= s->len && n <= s->len - off &&
           kl_read_all(s->fd, buf, n, SNAP_HEADER + off) == (ssize_t)n;
}

bool kl_snapshot_check(const kl_snapshot_data *s)
{
    if (s->data != NULL)
        return kl_crc32c(0, s->data, s->len) == s->crc;
    enum { PIECE = 1 << 20 };
    uint8_t *buf = malloc(PIECE);
    uint32_t crc = 0;
    size_t off = 0;
    for (; buf != NULL && off < s->len; off += PIECE) {
        size_t n = s->len - off < PIECE ? s->len - off : PIECE;
        if (!kl_snapshot_pread(s, buf, n, off))
            break;
        crc = kl_crc32c(crc, buf, n);
    }
    bool whole = buf != NULL && off >= s->len && crc == s->crc;
    free(buf);
    return whole;
}

/* Mapped, not read: verify and the tools read the payload once, front to
 * back, and the page cache already holds it. */
int kl_snapshot_read(const char *dir, uint64_t seq, kl_snapshot_data *out,
                     uint8_t hash[KL_HASH_LEN], kl_err *err)
{
    int rc = kl_snapshot_open(dir, seq, out, hash, err);
    if (rc != KL_OK)
        return rc;
    out->map_len = SNAP_HEADER + out->len;
    out->map = mmap(NULL, out->map_len, PROT_READ, MAP_PRIVATE, out->fd, 0);
    char name[48];
    snapshot_name(seq, name);
    if (out->map == MAP_FAILED) {
        out->map = NULL;
        kl_err_set(err, "map %s: %s", name, strerror(errno));
        rc = errno == ENOMEM ? KL_ENOMEM : KL_EIO;
    } else {
        madvise(out->map, out->map_len, MADV_SEQUENTIAL);
        out->data = (const uint8_t *)out->map + SNAP_HEADER;
        if (!kl_snapshot_check(out)) {
            kl_err_set(err, "%s: payload checksum does not match", name);
            rc = KL_ECORRUPT;
        }
    }
    if (rc != KL_OK)
        kl_snapshot_release(out);
    return rc;
}

/* The seq a file name says it is the snapshot of, if it is one. */
bool kl_snapshot_file(const char *name, uint64_t *seq)
{
    unsigned long long s;
    char tail[8];
    if (strlen(name) != 33 || sscanf(name, "snapshot-%20llu.%7s", &s, tail) != 2 ||
        strcmp(tail, "kls") != 0)
        return false;
    *seq = s;
    return true;
}

int kl_snapshot_list(const char *dir, uint64_t *seqs, size_t max, size_t *n,
                     kl_err *err)
{
    DIR *dp = opendir(dir);
    if (dp == NULL) {
        kl_err_set(err, "open %s: %s", dir, strerror(errno));
        return KL_EIO;
    }
    *n = 0;
    struct dirent *e;
    uint64_t s;
    while ((e = readdir(dp)) != NULL)
        if (kl_snapshot_file(e->d_name, &s) && *n < max)
            seqs[(*n)++] = s;
    closedir(dp);
    for (size_t i = 1; i < *n; i++)         /* a handful: insertion sort */
        for (size_t j = i; j > 0 && seqs[j - 1] > seqs[j]; j--) {
            uint64_t t = seqs[j];
            seqs[j] = seqs[j - 1];
            seqs[j - 1] = t;
        }
    return KL_OK;
}
