/*
 * Private to log/: what the segment files (log.c), snapshots (snapshot.c)
 * and the compaction switch (compact.c) share.
 */
#ifndef KL_LOG_INTERNAL_H
#define KL_LOG_INTERNAL_H

#include "log.h"

#include <sys/types.h>

/* Little-endian integers in file headers. */
static inline void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline void put_u64(uint8_t *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}
static inline uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}
static inline uint64_t get_u64(const uint8_t *p)
{
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

char *kl_path_join(const char *dir, const char *name);     /* malloc'd */
/* "NNNNNNNNNNNNNNNNNNNN.log": the segment whose first record is first_seq. */
void kl_segment_name(uint64_t first_seq, char out[32]);
/* pwrite all of it: KL_ENOSPC for a full disk or short write, else KL_EIO. */
int kl_write_all(int fd, const void *p, size_t n, off_t off);
/* pread until n bytes or the end of the file: how many, or -1 (errno). */
ssize_t kl_read_all(int fd, void *p, size_t n, uint64_t off);
int kl_fsync_dir(const char *dir);
/* Writes `head` then `body` as file `name` in dir: temp, fsync, rename,
 * fsync the dir, so the file is either whole or not there. */
int kl_write_file_atomic(const char *dir, const char *name, const void *head,
                         size_t head_len, const void *body, size_t body_len,
                         kl_err *err);
/* The MANIFEST's first and last segment (by first seq). */
int kl_read_manifest(const char *dir, uint64_t *first, uint64_t *last, kl_err *err);
/* Whether a file name is a segment's / a snapshot's, and its seq. */
bool kl_segment_file(const char *name, uint64_t *first);
bool kl_snapshot_file(const char *name, uint64_t *seq);
/* Before the MANIFEST is read: the writer (holding the lock) finishes a
 * committed compaction and throws away an uncommitted one; a reader
 * refuses while a committed one is unfinished (compact.c). */
int kl_compaction_leftovers(const char *dir, bool writer, const kl_logger *lg,
                            kl_err *err);

#endif
