/*
 * A test-only shim, loaded into a keyledger program with LD_PRELOAD: it
 * counts the calls that change the disk (write, pwrite, pwrite64, writev,
 * fsync, fdatasync, rename, renameat, renameat2, unlink, unlinkat, rmdir,
 * mkdir, ftruncate, and open/openat/open64/openat64 with O_CREAT) and,
 * when the count reaches KL_FAULT_KILL_AT, raises SIGKILL before making
 * that call. Running a program with KL_FAULT_KILL_AT = 1, 2, 3, ... stops
 * it once before each step it takes on the disk: the crash-at-each-step
 * tests of `keyledger compact` (tests/e2e/test_compact.py).
 *
 * Nothing is counted unless KL_FAULT_KILL_AT is set; 0 counts without
 * killing. With KL_FAULT_KILL_TRACE naming a file, each counted call
 * appends a line "N function [path [path]]" to it (written with the real
 * calls, not counted), so a test can see which step is which (the commit
 * rename, say). Writes of stdio go through glibc's internal calls and are
 * not seen. Never linked into keyledger itself.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static void *real(const char *name)
{
    void *f = dlsym(RTLD_NEXT, name);
    if (f == NULL)
        abort();                /* a shim that cannot forward must not guess */
    return f;
}

#define REAL(name, type) ((type)real(name))

static int trace_fd = -2;       /* -2: not opened yet; -1: no trace */

static void trace(long n, const char *what, const char *a, const char *b)
{
    if (trace_fd == -2) {
        const char *path = getenv("KL_FAULT_KILL_TRACE");
        int (*ropen)(const char *, int, ...) =
            REAL("open", int (*)(const char *, int, ...));
        trace_fd = path != NULL && path[0] != '\0'
                       ? ropen(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600)
                       : -1;
    }
    if (trace_fd < 0)
        return;
    char line[8192];
    int len = snprintf(line, sizeof line, "%ld %s%s%s%s%s\n", n, what, a ? " " : "",
                       a ? a : "", b ? " " : "", b ? b : "");
    if (len < 0)
        return;
    if ((size_t)len >= sizeof line)
        len = (int)sizeof line - 1;
    ssize_t (*rwrite)(int, const void *, size_t) =
        REAL("write", ssize_t (*)(int, const void *, size_t));
    (void)rwrite(trace_fd, line, (size_t)len);
}

/* One more step: dies here if it is the chosen one. */
static void step(const char *what, const char *a, const char *b)
{
    static long count;
    const char *at = getenv("KL_FAULT_KILL_AT");
    if (at == NULL)
        return;
    long n = __atomic_add_fetch(&count, 1, __ATOMIC_SEQ_CST);
    trace(n, what, a, b);
    if (n == strtol(at, NULL, 10))
        raise(SIGKILL);
}

static char *fd_path(int fd, char *buf, size_t size)
{
    snprintf(buf, size, "fd %d", fd);
    return buf;
}

ssize_t write(int fd, const void *buf, size_t n)
{
    char p[32];
    step("write", fd_path(fd, p, sizeof p), NULL);
    return REAL("write", ssize_t (*)(int, const void *, size_t))(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    char p[32];
    step("pwrite", fd_path(fd, p, sizeof p), NULL);
    return REAL("pwrite", ssize_t (*)(int, const void *, size_t, off_t))(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
    char p[32];
    step("pwrite64", fd_path(fd, p, sizeof p), NULL);
    return REAL("pwrite64", ssize_t (*)(int, const void *, size_t, off64_t))(fd, buf, n,
                                                                            off);
}

ssize_t writev(int fd, const struct iovec *iov, int n)
{
    char p[32];
    step("writev", fd_path(fd, p, sizeof p), NULL);
    return REAL("writev", ssize_t (*)(int, const struct iovec *, int))(fd, iov, n);
}

int fsync(int fd)
{
    char p[32];
    step("fsync", fd_path(fd, p, sizeof p), NULL);
    return REAL("fsync", int (*)(int))(fd);
}

int fdatasync(int fd)
{
    char p[32];
    step("fdatasync", fd_path(fd, p, sizeof p), NULL);
    return REAL("fdatasync", int (*)(int))(fd);
}

int rename(const char *from, const char *to)
{
    step("rename", from, to);
    return REAL("rename", int (*)(const char *, const char *))(from, to);
}

int renameat(int dfrom, const char *from, int dto, const char *to)
{
    step("renameat", from, to);
    return REAL("renameat", int (*)(int, const char *, int, const char *))(dfrom, from,
                                                                          dto, to);
}

int renameat2(int dfrom, const char *from, int dto, const char *to, unsigned flags)
{
    step("renameat2", from, to);
    return REAL("renameat2", int (*)(int, const char *, int, const char *, unsigned))(
        dfrom, from, dto, to, flags);
}

int unlink(const char *path)
{
    step("unlink", path, NULL);
    return REAL("unlink", int (*)(const char *))(path);
}

int unlinkat(int dir, const char *path, int flags)
{
    step("unlinkat", path, NULL);
    return REAL("unlinkat", int (*)(int, const char *, int))(dir, path, flags);
}

int rmdir(const char *path)
{
    step("rmdir", path, NULL);
    return REAL("rmdir", int (*)(const char *))(path);
}

int mkdir(const char *path, mode_t mode)
{
    step("mkdir", path, NULL);
    return REAL("mkdir", int (*)(const char *, mode_t))(path, mode);
}

int ftruncate(int fd, off_t len)
{
    char p[32];
    step("ftruncate", fd_path(fd, p, sizeof p), NULL);
    return REAL("ftruncate", int (*)(int, off_t))(fd, len);
}

/* The open family: a step only when it may create a file. The mode is
 * there only with O_CREAT or O_TMPFILE (va_start must be in the function
 * itself, hence a macro). */
#define OPEN_STEP(name, path, flags, mode)                                   \
    do {                                                                     \
        if (((flags) & O_CREAT) || ((flags) & O_TMPFILE) == O_TMPFILE) {     \
            va_list ap;                                                      \
            va_start(ap, flags);                                             \
            mode = (mode_t)va_arg(ap, int);                                  \
            va_end(ap);                                                      \
        }                                                                    \
        if ((flags) & O_CREAT)                                               \
            step(name, path, NULL);                                          \
    } while (0)

int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    OPEN_STEP("open", path, flags, mode);
    return REAL("open", int (*)(const char *, int, ...))(path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
    mode_t mode = 0;
    OPEN_STEP("open64", path, flags, mode);
    return REAL("open64", int (*)(const char *, int, ...))(path, flags, mode);
}

int openat(int dir, const char *path, int flags, ...)
{
    mode_t mode = 0;
    OPEN_STEP("openat", path, flags, mode);
    return REAL("openat", int (*)(int, const char *, int, ...))(dir, path, flags, mode);
}

int openat64(int dir, const char *path, int flags, ...)
{
    mode_t mode = 0;
    OPEN_STEP("openat64", path, flags, mode);
    return REAL("openat64", int (*)(int, const char *, int, ...))(dir, path, flags, mode);
}
