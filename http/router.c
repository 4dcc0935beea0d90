/*
 * http/router.c — matching a request path against the route table.
 *
 * A pattern is split on '/', like the path. A segment "{name}" captures one
 * non-empty path segment; any other segment must equal the path's exactly
 * (case-sensitive, no decoding). So "/v1/keys/" does not match "/v1/keys"
 * (the trailing empty segment has nothing to match) nor "/v1/keys/{id}" (a
 * capture is never empty). The first route in table order whose pattern and
 * method both match wins; put literal routes before captures that could
 * shadow them. A path some route matches under other methods only is a 405,
 * with those methods listed for the Allow header.
 */
#include <assert.h>
#include <stdbool.h>
#include <string.h>

#include "internal.h"

/* Returns true if pattern matches path, with the captures in caps. */
static bool pattern_match(const char *pattern, kl_http_slice path,
                          kl_http_slice caps[KL_HTTP_MAX_PARAMS], int *ncaps)
{
    const char *p = pattern;
    const char *s = path.ptr;
    const char *s_end = path.ptr + path.len;
    int n = 0;

    if (path.len == 0 || *s != '/' || *p != '/')
        return false;
    for (;;) {
        const char *pe;
        const char *se;
        size_t plen;
        size_t slen;

        /* p and s are each at a '/' */
        p++;
        s++;
        pe = strchr(p, '/');
        if (pe == NULL)
            pe = p + strlen(p);
        se = memchr(s, '/', (size_t)(s_end - s));
        if (se == NULL)
            se = s_end;
        plen = (size_t)(pe - p);
        slen = (size_t)(se - s);

        if (plen >= 2 && p[0] == '{' && p[plen - 1] == '}') {
            /* Our own table: a pattern with too many captures is a bug. */
            assert(n < KL_HTTP_MAX_PARAMS);
            if (slen == 0 || n >= KL_HTTP_MAX_PARAMS)
                return false;
            caps[n].ptr = s;
            caps[n].len = slen;
            n++;
        } else if (plen != slen || memcmp(p, s, slen) != 0) {
            return false;
        }

        if (*pe == '\0' || se == s_end) {
            if (*pe != '\0' || se != s_end)
                return false; /* one has more segments than the other */
            *ncaps = n;
            return true;
        }
        p = pe;
        s = se;
    }
}

/* Appends ", NAME" (or "NAME" first) unless NAME is listed already, and
 * only whole: a truncated method name would mislead. */
static void allow_add(char *allow, size_t allow_len, size_t *used,
                      const char *name)
{
    size_t nlen = strlen(name);
    const char *at = allow;
    size_t need;

    while (at != NULL && *at != '\0') {
        const char *comma = strchr(at, ',');
        size_t len = comma != NULL ? (size_t)(comma - at) : strlen(at);

        if (len == nlen && memcmp(at, name, nlen) == 0)
            return;
        at = comma != NULL ? comma + 2 : NULL;
    }
    need = (*used > 0 ? 2 : 0) + nlen + 1;
    if (*used + need > allow_len)
        return;
    if (*used > 0) {
        memcpy(allow + *used, ", ", 2);
        *used += 2;
    }
    memcpy(allow + *used, name, nlen + 1);
    *used += nlen;
}

kl_http_route_result kl_http_route_match(const kl_http_route *routes,
                                         int method, kl_http_slice path,
                                         const kl_http_route **out,
                                         kl_http_slice params[KL_HTTP_MAX_PARAMS],
                                         int *nparams, char *allow,
                                         size_t allow_len)
{
    const kl_http_route *r;
    bool path_seen = false;
    size_t used = 0;

    *out = NULL;
    *nparams = 0;
    if (allow != NULL && allow_len > 0)
        allow[0] = '\0';
    if (path.ptr == NULL)
        return KL_HTTP_ROUTE_NOT_FOUND;

    for (r = routes; r->handler != NULL; r++) {
        kl_http_slice caps[KL_HTTP_MAX_PARAMS];
        int n = 0;

        if (!pattern_match(r->pattern, path, caps, &n))
            continue;
        if (r->method == method) {
            *out = r;
            memcpy(params, caps, (size_t)n * sizeof(caps[0]));
            *nparams = n;
            return KL_HTTP_ROUTE_FOUND;
        }
        path_seen = true;
        if (allow != NULL && allow_len > 0)
            allow_add(allow, allow_len, &used,
                      llhttp_method_name((llhttp_method_t)r->method));
    }
    return path_seen ? KL_HTTP_ROUTE_BAD_METHOD : KL_HTTP_ROUTE_NOT_FOUND;
}
