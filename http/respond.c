/*
 * http/respond.c — the one place answers are written: status line, the
 * headers every answer carries, the caller's extra headers and the body, in
 * one buffer for one write; and the contract's error body
 * {"error":{"code","message","field"?,"request_id"}}.
 *
 * Header order is fixed so tests can compare answers byte for byte:
 *   HTTP/1.1 <status> <reason>
 *   Content-Type      (only with a body)
 *   Content-Length    (not on 1xx, 204, 304)
 *   X-Request-Id
 *   <caller's headers>
 *   Connection        ("close" on a last answer; "keep-alive" for HTTP/1.0)
 */
#include <assert.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "internal.h"

typedef struct kl_http_reason_entry {
    int status;
    const char *reason;
} kl_http_reason_entry;

static const kl_http_reason_entry kl_http_reasons[] = {
    {100, "Continue"},
    {101, "Switching Protocols"},
    {200, "OK"},
    {201, "Created"},
    {202, "Accepted"},
    {204, "No Content"},
    {206, "Partial Content"},
    {301, "Moved Permanently"},
    {302, "Found"},
    {303, "See Other"},
    {304, "Not Modified"},
    {307, "Temporary Redirect"},
    {308, "Permanent Redirect"},
    {400, "Bad Request"},
    {401, "Unauthorized"},
    {403, "Forbidden"},
    {404, "Not Found"},
    {405, "Method Not Allowed"},
    {406, "Not Acceptable"},
    {408, "Request Timeout"},
    {409, "Conflict"},
    {410, "Gone"},
    {411, "Length Required"},
    {412, "Precondition Failed"},
    {413, "Content Too Large"},
    {414, "URI Too Long"},
    {415, "Unsupported Media Type"},
    {416, "Range Not Satisfiable"},
    {417, "Expectation Failed"},
    {422, "Unprocessable Content"},
    {426, "Upgrade Required"},
    {428, "Precondition Required"},
    {429, "Too Many Requests"},
    {431, "Request Header Fields Too Large"},
    {500, "Internal Server Error"},
    {501, "Not Implemented"},
    {502, "Bad Gateway"},
    {503, "Service Unavailable"},
    {504, "Gateway Timeout"},
    {505, "HTTP Version Not Supported"},
};

static const char *const kl_http_class_reasons[] = {
    "Unknown", "Informational", "Success", "Redirection", "Client Error",
    "Server Error",
};

const char *kl_http_reason(int status)
{
    size_t i;

    for (i = 0; i < sizeof(kl_http_reasons) / sizeof(kl_http_reasons[0]); i++) {
        if (kl_http_reasons[i].status == status)
            return kl_http_reasons[i].reason;
    }
    if (status >= 100 && status <= 599)
        return kl_http_class_reasons[status / 100];
    return kl_http_class_reasons[0];
}

/* Appends to a buffer already reserved large enough. */
typedef struct kl_http_writer {
    char *p;
} kl_http_writer;

static void put_mem(kl_http_writer *w, const char *s, size_t n)
{
    memcpy(w->p, s, n);
    w->p += n;
}

static void put_str(kl_http_writer *w, const char *s)
{
    put_mem(w, s, strlen(s));
}

static void put_u64(kl_http_writer *w, uint64_t v)
{
    char tmp[20];
    size_t n = 0;

    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    while (n > 0)
        *w->p++ = tmp[--n];
}

int kl_http_response_build(kl_http_conn *c, int status,
                           const char *content_type, const char *headers,
                           const char *body, size_t body_len)
{
    const char *reason = kl_http_reason(status);
    /* RFC 9110: these statuses never have content. */
    bool bodiless = status < 200 || status == 204 || status == 304;
    bool send_body = !bodiless && c->req.method != HTTP_HEAD && body_len > 0;
    bool with_type = !bodiless && content_type != NULL && body_len > 0;
    const char *conn_hdr = NULL;
    size_t headers_len = headers != NULL ? strlen(headers) : 0;
    size_t need;
    kl_http_writer w;
    int rc;

    assert(status >= 100 && status <= 999);
    if (bodiless)
        body_len = 0;
    if (c->close_after)
        conn_hdr = "Connection: close\r\n";
    else if (c->http10)
        conn_hdr = "Connection: keep-alive\r\n";

    need = sizeof("HTTP/1.1 000 \r\n") + strlen(reason) +
           sizeof("Content-Length: 18446744073709551615\r\n") +
           sizeof("X-Request-Id: \r\n") + sizeof(c->req.request_id) +
           headers_len + sizeof("Connection: keep-alive\r\n") + 2 +
           (send_body ? body_len : 0);
    if (with_type)
        need += sizeof("Content-Type: \r\n") + strlen(content_type);

    c->out.len = 0;
    rc = kl_http_buf_reserve(&c->out, need, SIZE_MAX);
    if (rc < 0)
        return rc;

    w.p = c->out.ptr;
    put_str(&w, "HTTP/1.1 ");
    put_u64(&w, (uint64_t)status);
    put_str(&w, " ");
    put_str(&w, reason);
    put_str(&w, "\r\n");
    if (with_type) {
        put_str(&w, "Content-Type: ");
        put_str(&w, content_type);
        put_str(&w, "\r\n");
    }
    if (!bodiless) {
        put_str(&w, "Content-Length: ");
        put_u64(&w, (uint64_t)body_len);
        put_str(&w, "\r\n");
    }
    put_str(&w, "X-Request-Id: ");
    put_str(&w, c->req.request_id);
    put_str(&w, "\r\n");
    if (headers_len > 0)
        put_mem(&w, headers, headers_len);
    if (conn_hdr != NULL)
        put_str(&w, conn_hdr);
    put_str(&w, "\r\n");
    if (send_body)
        put_mem(&w, body, body_len);
    c->out.len = (size_t)(w.p - c->out.ptr);
    assert(c->out.len <= need);
    return 0;
}

int kl_http_respond(kl_http_request *req, int status, const char *content_type,
                    const char *headers, const char *body, size_t body_len)
{
    kl_http_conn *c;
    int rc = 0;

    if (req == NULL || req->conn == NULL)
        return UV_EINVAL;
    c = req->conn;
    assert(&c->req == req);
    if (!c->req_active)
        return UV_EINVAL; /* a second answer to the same request */
    /* Build before anything is released: body and headers may point into
     * the request's own buffer. */
    if (!c->closing && !c->dead)
        rc = kl_http_response_build(c, status, content_type, headers, body,
                                    body_len);
    return kl_http_conn_complete(c, status, rc);
}

int kl_http_respond_json(kl_http_request *req, int status, const char *headers,
                         const char *json, size_t len)
{
    return kl_http_respond(req, status, "application/json", headers, json, len);
}

/* A JSON string for s; bytes that are not valid UTF-8 (jansson refuses
 * them) become '?', so an error answer always goes out. */
static json_t *json_text(const char *s)
{
    json_t *j;
    char *copy;
    size_t i;

    if (s == NULL)
        s = "";
    j = json_string(s);
    if (j != NULL)
        return j;
    copy = strdup(s);
    if (copy == NULL)
        return NULL;
    for (i = 0; copy[i] != '\0'; i++) {
        if ((unsigned char)copy[i] >= 0x80)
            copy[i] = '?';
    }
    j = json_string(copy);
    free(copy);
    return j;
}

int kl_http_respond_error(kl_http_request *req, int status, const char *code,
                          const char *message, const char *field,
                          const char *headers)
{
    json_t *root = NULL;
    json_t *err = NULL;
    char stack[512];
    char *heap = NULL;
    size_t n = 0;
    int rc;

    if (req == NULL || req->conn == NULL)
        return UV_EINVAL;

    err = json_object();
    if (err == NULL ||
        json_object_set_new(err, "code", json_text(code)) < 0 ||
        json_object_set_new(err, "message", json_text(message)) < 0 ||
        (field != NULL &&
         json_object_set_new(err, "field", json_text(field)) < 0) ||
        json_object_set_new(err, "request_id", json_string(req->request_id)) < 0)
        goto cleanup;
    root = json_object();
    if (root == NULL || json_object_set(root, "error", err) < 0)
        goto cleanup;

    /* jansson keeps insertion order, which is the contract's order. */
    n = json_dumpb(root, stack, sizeof(stack), JSON_COMPACT);
    if (n > sizeof(stack)) {
        heap = malloc(n);
        if (heap == NULL) {
            n = 0;
            goto cleanup;
        }
        n = json_dumpb(root, heap, n, JSON_COMPACT);
    }

cleanup:
    /* Out of memory still answers (with no body): the request must be
     * released and the client must not hang. */
    if (n == 0)
        rc = kl_http_respond(req, status, NULL, headers, NULL, 0);
    else
        rc = kl_http_respond(req, status, "application/json", headers,
                             heap != NULL ? heap : stack, n);
    json_decref(root);
    json_decref(err);
    free(heap);
    return rc;
}
