/*
 * http/request.c — what a handler may ask of its request: headers by name,
 * decoded query parameters, and the peer's address.
 *
 * Header names and values are slices of the connection's read buffer, kept
 * as llhttp delivered them (leading blanks already skipped; trailing ones are
 * trimmed here). Query parameters follow application/x-www-form-urlencoded:
 * pairs split on '&', name and value on the first '=', '+' is a space and
 * %XX a byte.
 */
#include <stdbool.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

int kl_http_conn_header(const kl_http_conn *c, const char *name,
                        kl_http_slice *out)
{
    size_t nlen = strlen(name);
    unsigned i;

    for (i = 0; i < c->nheaders; i++) {
        const kl_http_header_span *h = &c->headers[i];
        const char *v;
        size_t vlen;

        if (h->name.len != nlen ||
            strncasecmp(c->in.ptr + h->name.off, name, nlen) != 0)
            continue;
        v = c->in.ptr + h->value.off;
        vlen = h->value.len;
        while (vlen > 0 && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
            vlen--;
        out->ptr = vlen > 0 ? v : "";
        out->len = vlen;
        return 1;
    }
    out->ptr = NULL;
    out->len = 0;
    return 0;
}

int kl_http_header(const kl_http_request *req, const char *name,
                   kl_http_slice *out)
{
    return kl_http_conn_header(req->conn, name, out);
}

static int hex_value(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Decodes the byte at *p (advancing it); -1 on a bad %XX escape. */
static int decode_byte(const char **p, const char *end)
{
    const char *s = *p;
    int hi;
    int lo;

    if (*s == '+') {
        *p = s + 1;
        return ' ';
    }
    if (*s != '%') {
        *p = s + 1;
        return (unsigned char)*s;
    }
    if (end - s < 3)
        return -1;
    hi = hex_value(s[1]);
    lo = hex_value(s[2]);
    if (hi < 0 || lo < 0)
        return -1;
    *p = s + 3;
    return hi * 16 + lo;
}

/* Whether the encoded name [s, end) decodes to exactly `name`. */
static bool name_equals(const char *s, const char *end, const char *name)
{
    while (s < end) {
        int ch = decode_byte(&s, end);

        if (ch < 0 || *name == '\0' || (unsigned char)*name != ch)
            return false;
        name++;
    }
    return *name == '\0';
}

int kl_http_query(const kl_http_request *req, const char *name, char *buf,
                  size_t buflen)
{
    const char *q = req->query.ptr;
    const char *end = q + req->query.len;

    if (q == NULL)
        return 0;
    while (q < end) {
        const char *amp = memchr(q, '&', (size_t)(end - q));
        const char *eq;
        const char *v;
        size_t n = 0;

        if (amp == NULL)
            amp = end;
        eq = memchr(q, '=', (size_t)(amp - q));
        if (!name_equals(q, eq != NULL ? eq : amp, name)) {
            q = amp + 1;
            continue;
        }
        v = eq != NULL ? eq + 1 : amp;
        while (v < amp) {
            int ch = decode_byte(&v, amp);

            /* An embedded NUL would silently cut the C string short. */
            if (ch <= 0 || n + 1 >= buflen)
                return -1;
            buf[n++] = (char)ch;
        }
        if (buflen == 0)
            return -1;
        buf[n] = '\0';
        return 1;
    }
    return 0;
}

const char *kl_http_peer(const kl_http_request *req)
{
    return req->conn->peer;
}
