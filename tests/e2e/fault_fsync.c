/*
 * A test-only shim, loaded into keyledgerd with LD_PRELOAD: fsync and
 * fdatasync fail with EIO while the file named by KL_FAULT_FSYNC_FILE
 * exists. It lets the end-to-end tests see what the daemon does after a
 * failed fsync, which no real disk produces on demand.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int failing(void)
{
    const char *path = getenv("KL_FAULT_FSYNC_FILE");
    return path != NULL && access(path, F_OK) == 0;
}

int fdatasync(int fd)
{
    if (failing()) {
        errno = EIO;
        return -1;
    }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}

int fsync(int fd)
{
    if (failing()) {
        errno = EIO;
        return -1;
    }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}
