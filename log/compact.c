/*
 * The compaction switch: replacing a data dir's log with a rewritten one,
 * all or nothing (docs/log-format.md, "Compaction"). The rewrite itself is
 * keyledger compact's (tools/compact.c).
 */
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/*
 * `keyledger compact` builds the new log whole in DATA/compact.tmp: segments
 * numbered on from the old head and chained to it (so no name can collide
 * with an old segment), a snapshot and a MANIFEST. Renaming that directory
 * to DATA/compact.ready is the commit: before it the old log is the log,
 * after it the new one is. kl_log_compact_finish then moves the new
 * MANIFEST in (from then on the old segments are outside the log: they are
 * before its first seq), moves the new segments and snapshot in, deletes
 * the old segments and snapshots, and removes the directory. Every step can
 * be run again, so whoever next opens the dir as its writer finishes a
 * compaction a crash interrupted; readers without the lock refuse until
 * then. A compact.tmp left by a crash before the commit is thrown away.
 */
#define COMPACT_TMP "compact.tmp"
#define COMPACT_READY "compact.ready"

/* Deletes the plain files in dir, then dir itself. */
static int remove_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return errno == ENOENT ? KL_OK : KL_EIO;
    struct dirent *e;
    int rc = KL_OK;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (unlinkat(dirfd(d), e->d_name, 0) != 0 && errno != ENOENT)
            rc = KL_EIO;
    }
    closedir(d);
    if (rc == KL_OK && rmdir(dir) != 0 && errno != ENOENT)
        rc = KL_EIO;
    return rc;
}

char *kl_log_compact_prepare(const char *data, kl_err *err)
{
    char *dir = kl_path_join(data, COMPACT_TMP);
    if (dir == NULL)
        return NULL;
    if (remove_dir(dir) != KL_OK || mkdir(dir, 0700) != 0) {
        kl_err_set(err, "make %s: %s", dir, strerror(errno));
        free(dir);
        return NULL;
    }
    return dir;
}

void kl_log_compact_abandon(const char *data)
{
    char *dir = kl_path_join(data, COMPACT_TMP);
    if (dir != NULL)
        remove_dir(dir);
    free(dir);
}

int kl_log_compact_commit(const char *data, const kl_logger *lg, kl_err *err)
{
    char *tmp = kl_path_join(data, COMPACT_TMP), *ready = kl_path_join(data, COMPACT_READY);
    int rc = KL_ENOMEM;
    if (tmp != NULL && ready != NULL) {
        rc = KL_OK;
        if (kl_fsync_dir(tmp) != KL_OK || rename(tmp, ready) != 0 ||
            kl_fsync_dir(data) != KL_OK) {
            kl_err_set(err, "commit %s: %s", ready, strerror(errno));
            rc = KL_EIO;
        }
    }
    free(tmp);
    free(ready);
    return rc == KL_OK ? kl_log_compact_finish(data, lg, err) : rc;
}

/* Moves (when `move`) or deletes each segment and snapshot file of `from`
 * that is (move) at or past / (delete) before `first`. */
static int sweep(const char *from, const char *data, uint64_t first, bool move,
                 kl_err *err)
{
    DIR *d = opendir(from);
    if (d == NULL) {
        kl_err_set(err, "open %s: %s", from, strerror(errno));
        return KL_EIO;
    }
    struct dirent *e;
    int rc = KL_OK;
    while (rc == KL_OK && (e = readdir(d)) != NULL) {
        uint64_t s;
        if (!kl_segment_file(e->d_name, &s) && !kl_snapshot_file(e->d_name, &s))
            continue;
        if (move != (s >= first))
            continue;
        char *src = kl_path_join(from, e->d_name), *dst = kl_path_join(data, e->d_name);
        if (src == NULL || dst == NULL)
            rc = KL_ENOMEM;
        else if (move ? rename(src, dst) != 0 : (unlink(src) != 0 && errno != ENOENT)) {
            kl_err_set(err, "%s %s: %s", move ? "move" : "delete", src, strerror(errno));
            rc = KL_EIO;
        }
        free(src);
        free(dst);
    }
    closedir(d);
    return rc;
}

int kl_log_compact_finish(const char *data, const kl_logger *lg, kl_err *err)
{
    char *ready = kl_path_join(data, COMPACT_READY);
    char *manifest = kl_path_join(ready ? ready : "", "MANIFEST");
    char *live = kl_path_join(data, "MANIFEST");
    int rc = KL_ENOMEM;
    uint64_t first, last;
    if (ready == NULL || manifest == NULL || live == NULL)
        goto cleanup;
    rc = KL_OK;
    if (access(ready, F_OK) != 0)
        goto cleanup;               /* nothing to finish */
    KL_LOGF(lg, KL_INFO, "switching %s to its compacted log", data);
    if (access(manifest, F_OK) == 0 &&
        (rename(manifest, live) != 0 || kl_fsync_dir(data) != KL_OK)) {
        kl_err_set(err, "move %s: %s", manifest, strerror(errno));
        rc = KL_EIO;
        goto cleanup;
    }
    if ((rc = kl_read_manifest(data, &first, &last, err)) != KL_OK ||
        (rc = sweep(ready, data, first, true, err)) != KL_OK)
        goto cleanup;
    if (kl_fsync_dir(data) != KL_OK) {
        kl_err_set(err, "fsync %s: %s", data, strerror(errno));
        rc = KL_EIO;
        goto cleanup;
    }
    if ((rc = sweep(data, data, first, false, err)) != KL_OK)
        goto cleanup;
    if (remove_dir(ready) != KL_OK || kl_fsync_dir(data) != KL_OK) {
        kl_err_set(err, "remove %s: %s", ready, strerror(errno));
        rc = KL_EIO;
    }
cleanup:
    free(ready);
    free(manifest);
    free(live);
    return rc;
}

/* What the writer does with compaction leftovers before it reads the
 * MANIFEST; what a reader without the lock says about them. */
int kl_compaction_leftovers(const char *dir, bool writer, const kl_logger *lg,
                                kl_err *err)
{
    char *tmp = kl_path_join(dir, COMPACT_TMP), *ready = kl_path_join(dir, COMPACT_READY);
    int rc = KL_ENOMEM;
    if (tmp == NULL || ready == NULL)
        goto cleanup;
    rc = KL_OK;
    if (!writer) {
        if (access(ready, F_OK) == 0) {
            kl_err_set(err, "%s holds a compaction that was committed but not "
                       "finished; start keyledgerd or run `keyledger compact` "
                       "to finish it", dir);
            rc = KL_EINVAL;
        }
    } else if (access(tmp, F_OK) == 0) {
        KL_LOGF(lg, KL_WARN, "removing %s: a compaction that never committed "
                "(the log is as it was before it)", tmp);
        rc = remove_dir(tmp);
        if (rc != KL_OK)
            kl_err_set(err, "remove %s: %s", tmp, strerror(errno));
    }
    if (rc == KL_OK && writer)
        rc = kl_log_compact_finish(dir, lg, err);
cleanup:
    free(tmp);
    free(ready);
    return rc;
}

