/*
 * http/ — keyledger's HTTP/1.1 server: libuv sockets, llhttp parsing,
 * limits, keep-alive and pipelining, one route table, and the one place that
 * writes responses and errors in the contract's shape.
 *
 * The module knows nothing of keys or events: the daemon hands it a route
 * table and a context pointer, and handlers answer through kl_http_respond*.
 *
 * Lifecycle of a request: the connection parses one message, pauses the
 * parser, routes it and calls the handler. The handler answers now or later
 * (after a durable write) with exactly one kl_http_respond* call. The request
 * and every slice it points to stay valid until that call, even if the peer
 * hangs up meanwhile. After the response is written, the parser resumes on
 * the bytes left over (pipelining).
 */
#ifndef KL_HTTP_H
#define KL_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct kl_http_server kl_http_server;
typedef struct kl_http_conn kl_http_conn;

/* A borrowed byte range; not NUL-terminated. */
typedef struct kl_http_slice {
    const char *ptr;
    size_t len;
} kl_http_slice;

enum { KL_HTTP_MAX_PARAMS = 4 };

typedef struct kl_http_request {
    kl_http_conn *conn;        /* owner; opaque */
    int method;                /* llhttp's enum llhttp_method (HTTP_GET, ...);
                                  -1 if the request line was not understood */
    kl_http_slice path;        /* decoded-nothing path, without the query */
    kl_http_slice query;       /* after '?', without it; len 0 when absent */
    kl_http_slice body;
    kl_http_slice params[KL_HTTP_MAX_PARAMS]; /* {name} captures, in order */
    int nparams;
    char request_id[31];       /* "req_" + 26 base32 chars, NUL-terminated */
    const char *route;         /* the matched pattern, for metrics and logs;
                                  "" when no route matched (404, 405 and the
                                  server's own 400/408/413/431), never NULL */
    int route_index;           /* the matched entry's index in the route
                                  table, -1 when none: lets an observer
                                  count per route in a fixed array */
    void *ctx;                 /* the server's handler context */
    uint64_t start_ns;         /* uv_hrtime() when the message completed */
} kl_http_request;

typedef void (*kl_http_handler)(kl_http_request *req);

typedef struct kl_http_route {
    int method;                /* HTTP_GET, HTTP_POST, ... */
    const char *pattern;       /* "/v1/api-keys/{id}/revoke" */
    kl_http_handler handler;
} kl_http_route;

/* Called once per request, on the loop thread, when its answer is queued
 * (before it is written; also when the peer is already gone and the answer
 * is dropped), for metrics: req->route / req->route_index / req->method say
 * what was asked, `status` what was answered, `duration_ns` the time since
 * the message completed (req->start_ns). `ctx` is the server's handler
 * context. It must not answer or keep `req`. */
typedef void (*kl_http_observer)(const kl_http_request *req, int status,
                                 uint64_t duration_ns, void *ctx);

/* Fills request_id (31 bytes, NUL-terminated "req_…"). */
typedef void (*kl_http_id_fn)(char out[31], void *ctx);

/* Timeouts of 0 mean none. A request over a limit gets its error answer
 * and the connection closes after it. */
typedef struct kl_http_config {
    size_t max_header_bytes;     /* request line + headers; over it: 431
                                    (also more than 64 header lines) */
    size_t max_body_bytes;       /* over it: 413 */
    unsigned max_connections;    /* over it: new connections are closed */
    unsigned idle_timeout_ms;    /* keep-alive connection with nothing sent */
    unsigned request_timeout_ms; /* a request must arrive whole within this */
    unsigned max_requests_per_conn; /* then "Connection: close"; 0 = no limit */
} kl_http_config;

/* 16 KiB headers, 1 MiB body, 4096 connections, 60 s idle, 10 s request,
 * 1000 requests per connection. */
void kl_http_config_defaults(kl_http_config *cfg);

/*
 * Create a server on `loop` (borrowed). If SIGPIPE still has its default
 * action it is set to ignored: a write to a peer that reset must fail with
 * EPIPE, not kill the daemon. `routes` (borrowed, must outlive the
 * server) is terminated by an entry with handler == NULL. `ctx` is handed to
 * handlers via req->ctx. `id_fn` makes request ids. Returns 0 or a negative
 * uv error code.
 */
int kl_http_server_new(kl_http_server **out, uv_loop_t *loop,
                       const kl_http_config *cfg, const kl_http_route *routes,
                       kl_http_id_fn id_fn, void *ctx);
/* From now on `fn` (NULL: none) sees every request's answer. */
void kl_http_server_set_observer(kl_http_server *s, kl_http_observer fn);

/* Bind and listen on HOST (numeric IPv4/IPv6, "[::1]", or a name resolved
 * once) and PORT (0 picks one). */
int kl_http_server_listen(kl_http_server *s, const char *host, int port);
/* The bound port (after listen), for tests using port 0. */
int kl_http_server_port(const kl_http_server *s);

/*
 * Stop accepting; requests in flight are answered, then their connections
 * close; idle connections (and partly received requests) close now.
 * `on_closed` runs once every handle is closed and every request handed to a
 * handler has been answered; then free the server. Always needed before
 * kl_http_server_free, even if listen was never called or failed.
 */
void kl_http_server_shutdown(kl_http_server *s, void (*on_closed)(void *arg),
                             void *arg);
void kl_http_server_free(kl_http_server *s);
unsigned kl_http_server_connections(const kl_http_server *s);

/* Request accessors. Header names are matched case-insensitively; the first
 * header of that name wins. Returns 1 and fills `out` (trailing blanks
 * trimmed) if present, 0 if absent (`out` = {NULL, 0}). */
int kl_http_header(const kl_http_request *req, const char *name,
                   kl_http_slice *out);
/* Query parameter, percent-decoded into `buf` (NUL-terminated). Returns
 * 1 if present, 0 if absent, -1 if it does not fit or is badly encoded. */
int kl_http_query(const kl_http_request *req, const char *name, char *buf,
                  size_t buflen);
/* The peer's address, for per-address throttles (IPv4 or IPv6 text). */
const char *kl_http_peer(const kl_http_request *req);

/*
 * Answer the request. `headers` is extra header lines, each ending in
 * "\r\n" (may be NULL). The body is copied. Exactly one respond call per
 * request. Returns 0, or a negative error if the connection is gone (the
 * request is released either way).
 */
int kl_http_respond(kl_http_request *req, int status, const char *content_type,
                    const char *headers, const char *body, size_t body_len);
int kl_http_respond_json(kl_http_request *req, int status, const char *headers,
                         const char *json, size_t len);
/* {"error":{"code","message","field"?,"request_id"}}; field may be NULL. */
int kl_http_respond_error(kl_http_request *req, int status, const char *code,
                          const char *message, const char *field,
                          const char *headers);

/* Reason phrase lookup, e.g. 404 -> "Not Found"; never NULL. */
const char *kl_http_reason(int status);

/*
 * Route matching alone (for tests and /openapi.json coverage checks).
 * Patterns and the path split on '/'; "{name}" captures one non-empty
 * segment; no trailing-slash or case folding. First match in table order
 * wins. On KL_HTTP_ROUTE_BAD_METHOD, `allow` (may be NULL) gets the path's
 * methods in table order without repeats, e.g. "GET, DELETE".
 */
typedef enum {
    KL_HTTP_ROUTE_FOUND = 0,
    KL_HTTP_ROUTE_NOT_FOUND = -1,
    KL_HTTP_ROUTE_BAD_METHOD = -2
} kl_http_route_result;
kl_http_route_result kl_http_route_match(const kl_http_route *routes,
                                         int method, kl_http_slice path,
                                         const kl_http_route **out,
                                         kl_http_slice params[KL_HTTP_MAX_PARAMS],
                                         int *nparams, char *allow,
                                         size_t allow_len);

#endif
