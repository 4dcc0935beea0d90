/*
 * Small shared utilities of the log module: error messages, the diagnostic
 * logger, the growable byte buffer used by every writer, and the process's
 * memory setup.
 */
#include "log.h"

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void kl_err_set(kl_err *err, const char *fmt, ...)
{
    if (err == NULL)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
}

void kl_logger_write(const kl_logger *lg, kl_level level, const char *fmt, ...)
{
    static const char *const names[] = {"error", "warn", "info", "debug"};
    FILE *fp = lg->fp != NULL ? (FILE *)lg->fp : stderr;
    char when[KL_TIME_TEXT_LEN + 1];
    kl_time_format(kl_now_ms(), when);

    /* One fprintf per line so concurrent writers do not interleave. */
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(fp, "%s %s keyledgerd: %s\n", when, names[level], line);
    fflush(fp);
}

int kl_buf_reserve(kl_buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return KL_OK;
    size_t cap = b->cap != 0 ? b->cap : 256;
    while (cap - b->len < extra) {
        if (cap > SIZE_MAX / 2)
            return KL_ENOMEM;
        cap *= 2;
    }
    char *p = realloc(b->data, cap);
    if (p == NULL)
        return KL_ENOMEM;
    b->data = p;
    b->cap = cap;
    return KL_OK;
}

int kl_buf_append(kl_buf *b, const void *p, size_t n)
{
    if (kl_buf_reserve(b, n) != KL_OK)
        return KL_ENOMEM;
    if (n != 0)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    return KL_OK;
}

int kl_buf_printf(kl_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || kl_buf_reserve(b, (size_t)n + 1) != KL_OK)
        return KL_ENOMEM;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return KL_OK;
}

bool kl_parse_u64(const char *s, size_t len, uint64_t *out)
{
    uint64_t v = 0;
    if (len == 0 || len > 20)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9' || v > (UINT64_MAX - 9) / 10)
            return false;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return true;
}

void kl_buf_free(kl_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/*
 * The state is millions of small allocations made in one go at startup. On
 * 4 KiB pages each new page is a fault, and in a virtual machine a fault
 * costs microseconds: they were two thirds of a start from a snapshot.
 * glibc can back its heaps with transparent huge pages (madvise, so it
 * works where THP is "madvise", the common default), but only through the
 * GLIBC_TUNABLES environment variable read at exec: so the programs that
 * rebuild state exec themselves once with it set. An operator's own
 * glibc.malloc.hugetlb setting is left alone; if the exec fails, the
 * process goes on as it is. glibc advises huge pages for its main heap as
 * it grows, but for a thread's heap only its first part: the daemon builds
 * its state on a worker thread, so every thread shares the main heap (one
 * arena; the loop thread is the only one that allocates much).
 */
void kl_use_huge_pages(char **argv)
{
    static const char TUNE[] = "glibc.malloc.hugetlb=1";
    mallopt(M_ARENA_MAX, 1);
    const char *old = getenv("GLIBC_TUNABLES");
    if (old != NULL && strstr(old, "glibc.malloc.hugetlb") != NULL)
        return;
    /* The file's own path, not /proc/self/exe: the process keeps its name
     * (ps, pgrep, the kernel's messages). */
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0 || (size_t)n >= sizeof self - 1)
        return;
    self[n] = '\0';
    kl_buf v = {0};
    if (kl_buf_printf(&v, "%s%s%s", old ? old : "", old ? ":" : "", TUNE) != KL_OK)
        return;
    if (setenv("GLIBC_TUNABLES", v.data, 1) == 0)
        execv(self, argv);
    kl_buf_free(&v);
}
