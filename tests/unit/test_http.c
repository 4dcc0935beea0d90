/*
 * tests/unit/test_http.c — the http/ module: route matching and query
 * decoding as pure functions, then a real server on 127.0.0.1 (port 0) in
 * this process, spoken to with plain blocking sockets from a second thread,
 * comparing answers byte for byte.
 *
 * Threads: the uv loop runs on the test's thread (cmocka asserts only there);
 * the client thread records what it received into the harness and, when its
 * script ends, signals the loop with a uv_async to shut the server down.
 * Every loopback test ends with every handle closed and uv_loop_close() == 0.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <llhttp.h>
#include <uv.h>

#include "http.h"

/* ---- route matching ---------------------------------------------------- */

static void noop_handler(kl_http_request *req)
{
    (void)kl_http_respond(req, 204, NULL, NULL, NULL, 0);
}

static const kl_http_route match_routes[] = {
    {HTTP_GET, "/v1/api-keys", noop_handler},
    {HTTP_POST, "/v1/api-keys", noop_handler},
    {HTTP_POST, "/v1/keys/verify", noop_handler},
    {HTTP_GET, "/v1/api-keys/{id}", noop_handler},
    {HTTP_PATCH, "/v1/api-keys/{id}", noop_handler},
    {HTTP_DELETE, "/v1/api-keys/{id}", noop_handler},
    {HTTP_GET, "/v1/api-keys/{id}", noop_handler}, /* a repeat: Allow lists GET once */
    {HTTP_POST, "/v1/api-keys/{id}/revoke", noop_handler},
    {HTTP_GET, "/v1/orgs/{org}/users/{user}", noop_handler},
    {HTTP_GET, "/", noop_handler},
    {0, NULL, NULL},
};

static kl_http_slice slice(const char *s)
{
    kl_http_slice sl = {s, strlen(s)};
    return sl;
}

static kl_http_route_result match(int method, const char *path,
                                  const kl_http_route **route,
                                  kl_http_slice params[KL_HTTP_MAX_PARAMS],
                                  int *nparams, char *allow, size_t allow_len)
{
    return kl_http_route_match(match_routes, method, slice(path), route,
                               params, nparams, allow, allow_len);
}

static void assert_slice(kl_http_slice s, const char *want)
{
    char buf[256];

    assert_true(s.len < sizeof(buf));
    memcpy(buf, s.ptr, s.len);
    buf[s.len] = '\0';
    assert_string_equal(buf, want);
}

static void test_route_found(void **state)
{
    const kl_http_route *r;
    kl_http_slice p[KL_HTTP_MAX_PARAMS];
    int n = -1;
    char allow[64];

    assert_int_equal(match(HTTP_GET, "/v1/api-keys", &r, p, &n, allow, sizeof(allow)),
                     KL_HTTP_ROUTE_FOUND);
    assert_ptr_equal(r, &match_routes[0]);
    assert_int_equal(n, 0);

    assert_int_equal(match(HTTP_POST, "/v1/api-keys", &r, p, &n, allow, sizeof(allow)),
                     KL_HTTP_ROUTE_FOUND);
    assert_ptr_equal(r, &match_routes[1]);

    assert_int_equal(match(HTTP_DELETE, "/v1/api-keys/key_123", &r, p, &n, allow,
                           sizeof(allow)),
                     KL_HTTP_ROUTE_FOUND);
    assert_ptr_equal(r, &match_routes[5]);
    assert_int_equal(n, 1);
    assert_slice(p[0], "key_123");

    assert_int_equal(match(HTTP_POST, "/v1/api-keys/k1/revoke", &r, p, &n, allow,
                           sizeof(allow)),
                     KL_HTTP_ROUTE_FOUND);
    assert_string_equal(r->pattern, "/v1/api-keys/{id}/revoke");
    assert_int_equal(n, 1);
    assert_slice(p[0], "k1");

    assert_int_equal(match(HTTP_GET, "/v1/orgs/org_a/users/usr_b", &r, p, &n, allow,
                           sizeof(allow)),
                     KL_HTTP_ROUTE_FOUND);
    assert_int_equal(n, 2);
    assert_slice(p[0], "org_a");
    assert_slice(p[1], "usr_b");

    assert_int_equal(match(HTTP_GET, "/", &r, p, &n, allow, sizeof(allow)),
                     KL_HTTP_ROUTE_FOUND);
    assert_ptr_equal(r, &match_routes[9]);
}

static void test_route_bad_method(void **state)
{
    const kl_http_route *r;
    kl_http_slice p[KL_HTTP_MAX_PARAMS];
    int n;
    char allow[64];

    assert_int_equal(match(HTTP_PUT, "/v1/api-keys/k", &r, p, &n, allow, sizeof(allow)),
                     KL_HTTP_ROUTE_BAD_METHOD);
    assert_null(r);
    assert_string_equal(allow, "GET, PATCH, DELETE");

    assert_int_equal(match(HTTP_DELETE, "/v1/api-keys", &r, p, &n, allow, sizeof(allow)),
                     KL_HTTP_ROUTE_BAD_METHOD);
    assert_string_equal(allow, "GET, POST");

    assert_int_equal(match(HTTP_GET, "/v1/keys/verify", &r, p, &n, allow, sizeof(allow)),
                     KL_HTTP_ROUTE_BAD_METHOD);
    assert_string_equal(allow, "POST");

    /* HEAD is not folded into GET */
    assert_int_equal(match(HTTP_HEAD, "/", &r, p, &n, allow, sizeof(allow)),
                     KL_HTTP_ROUTE_BAD_METHOD);
    assert_string_equal(allow, "GET");

    /* Only whole names fit: "GET, PATCH" needs 11 bytes. */
    assert_int_equal(match(HTTP_PUT, "/v1/api-keys/k", &r, p, &n, allow, 10),
                     KL_HTTP_ROUTE_BAD_METHOD);
    assert_string_equal(allow, "GET");
    assert_int_equal(match(HTTP_PUT, "/v1/api-keys/k", &r, p, &n, NULL, 0),
                     KL_HTTP_ROUTE_BAD_METHOD);
}

static void test_route_not_found(void **state)
{
    static const char *const paths[] = {
        "/v1/api-keys/",            /* trailing slash */
        "/v1/api-keys/k/revoke/",   /* trailing slash */
        "/v1/api-keys//revoke",     /* empty capture */
        "/v1/API-keys",             /* case matters */
        "/v1/api-keys/k/revoke/x",  /* longer */
        "/v1",                      /* shorter */
        "v1/api-keys",              /* not absolute */
        "",
        "//",
        "/v1/orgs/o/users/",
    };
    const kl_http_route *r;
    kl_http_slice p[KL_HTTP_MAX_PARAMS];
    int n;
    char allow[64];
    size_t i;

    for (i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
        r = &match_routes[0];
        assert_int_equal(match(HTTP_GET, paths[i], &r, p, &n, allow, sizeof(allow)),
                         KL_HTTP_ROUTE_NOT_FOUND);
        assert_null(r);
    }
}

/* ---- query decoding and reasons ---------------------------------------- */

static int query(const char *q, const char *name, char *buf, size_t len)
{
    kl_http_request req;

    memset(&req, 0, sizeof(req));
    req.query = slice(q);
    return kl_http_query(&req, name, buf, len);
}

static void test_query(void **state)
{
    char buf[32];
    kl_http_request empty;

    assert_int_equal(query("a=1&b=x%20y+z", "b", buf, sizeof(buf)), 1);
    assert_string_equal(buf, "x y z");
    assert_int_equal(query("a=1&b=x%20y+z", "a", buf, sizeof(buf)), 1);
    assert_string_equal(buf, "1");
    assert_int_equal(query("a=1&b=2", "c", buf, sizeof(buf)), 0);
    assert_int_equal(query("ab=1", "a", buf, sizeof(buf)), 0);
    assert_int_equal(query("a=1&a=2", "a", buf, sizeof(buf)), 1);
    assert_string_equal(buf, "1");
    assert_int_equal(query("flag&x=1", "flag", buf, sizeof(buf)), 1);
    assert_string_equal(buf, "");
    assert_int_equal(query("flag=&x=1", "flag", buf, sizeof(buf)), 1);
    assert_string_equal(buf, "");
    assert_int_equal(query("a%5Fb=%7e", "a_b", buf, sizeof(buf)), 1);
    assert_string_equal(buf, "~");
    assert_int_equal(query("a=%2", "a", buf, sizeof(buf)), -1);
    assert_int_equal(query("a=%zz", "a", buf, sizeof(buf)), -1);
    assert_int_equal(query("a=x%00y", "a", buf, sizeof(buf)), -1);
    assert_int_equal(query("a=12345", "a", buf, 5), -1);
    assert_int_equal(query("a=1234", "a", buf, 5), 1);
    assert_string_equal(buf, "1234");
    assert_int_equal(query("&&a=1&", "a", buf, sizeof(buf)), 1);

    memset(&empty, 0, sizeof(empty));
    assert_int_equal(kl_http_query(&empty, "a", buf, sizeof(buf)), 0);
}

static void test_reason(void **state)
{
    assert_string_equal(kl_http_reason(200), "OK");
    assert_string_equal(kl_http_reason(404), "Not Found");
    assert_string_equal(kl_http_reason(405), "Method Not Allowed");
    assert_string_equal(kl_http_reason(431), "Request Header Fields Too Large");
    assert_string_equal(kl_http_reason(599), "Server Error");
    assert_non_null(kl_http_reason(42));
}

/* ---- the loopback harness ---------------------------------------------- */

enum { RX_CAP = 16384, NRX = 6 };

typedef struct rx {
    char buf[RX_CAP + 1]; /* NUL-terminated for assert_string_equal */
    size_t len;
    bool closed;          /* saw EOF or a reset */
    long ms;              /* how long the wait for it took */
} rx;

typedef struct harness harness;
typedef void (*client_fn)(harness *h);

struct harness {
    uv_loop_t loop;
    kl_http_server *server;
    kl_http_config cfg;
    uv_async_t done;      /* client script over: shut the server down */
    uv_async_t stop;      /* shut down now, while the client still runs */
    uv_thread_t thread;
    client_fn client;
    int port;
    unsigned ids;         /* request ids handed out (loop thread) */
    bool closed;          /* on_closed ran */
    int observed;         /* observer calls */
    int statuses[16];     /* their statuses, in order */
    int late_rc;          /* what a delayed respond returned */
    char *big;            /* the body GET /big answers with */
    size_t big_len;
    rx rx[NRX];           /* written by the client thread, read after join */
    char *big_rx;         /* what the client got for GET /big (malloc) */
    size_t big_rx_len;
    char *echo_rx;        /* what it got for a big POST /echo (malloc) */
    size_t echo_rx_len;
};

static void test_id(char out[31], void *ctx)
{
    harness *h = ctx;

    snprintf(out, 31, "req_%026u", ++h->ids);
}

static void observe(const kl_http_request *req, int status,
                    uint64_t duration_ns, void *ctx)
{
    harness *h = ctx;

    assert_non_null(req->route);
    if (h->observed < 16)
        h->statuses[h->observed] = status;
    h->observed++;
}

static void hello(kl_http_request *req)
{
    (void)kl_http_respond_json(req, 200, NULL, "{\"ok\":true}", 11);
}

static void item_get(kl_http_request *req)
{
    char body[128];
    int n;

    assert_int_equal(req->nparams, 1);
    n = snprintf(body, sizeof(body), "{\"id\":\"%.*s\"}", (int)req->params[0].len,
                 req->params[0].ptr);
    (void)kl_http_respond_json(req, 200, NULL, body, (size_t)n);
}

static void item_delete(kl_http_request *req)
{
    (void)kl_http_respond(req, 204, NULL, NULL, NULL, 0);
}

static void echo(kl_http_request *req)
{
    (void)kl_http_respond(req, 200, "text/plain", NULL, req->body.ptr,
                          req->body.len);
}

static void show(kl_http_request *req)
{
    char q[64];
    char body[256];
    kl_http_slice v;
    int n;

    if (kl_http_header(req, "x-test", &v) != 1)
        v = slice("(none)");
    if (kl_http_query(req, "q", q, sizeof(q)) != 1)
        strcpy(q, "(none)");
    n = snprintf(body, sizeof(body), "x=%.*s;q=%s;peer=%s", (int)v.len, v.ptr, q,
                 kl_http_peer(req));
    (void)kl_http_respond(req, 200, "text/plain", NULL, body, (size_t)n);
}

static void fail_handler(kl_http_request *req)
{
    (void)kl_http_respond_error(req, 400, "invalid_argument", "bad \"name\"\n\\",
                                "name", "X-Extra: 1\r\n");
}

static void big(kl_http_request *req)
{
    harness *h = req->ctx;

    (void)kl_http_respond(req, 200, "application/octet-stream", NULL, h->big,
                          h->big_len);
}

typedef struct later {
    uv_timer_t timer;
    kl_http_request *req;
} later;

static void on_later_closed(uv_handle_t *t)
{
    free(t->data);
}

static void on_later(uv_timer_t *t)
{
    later *l = t->data;
    harness *h = l->req->ctx;

    h->late_rc = kl_http_respond_json(l->req, 200, NULL, "{\"slow\":true}", 13);
    uv_close((uv_handle_t *)&l->timer, on_later_closed);
}

/* Answers 100 ms later, as the daemon does after an fsync. */
static void slow(kl_http_request *req)
{
    later *l = malloc(sizeof(*l));
    harness *h = req->ctx;

    assert_non_null(l);
    l->req = req;
    assert_int_equal(uv_timer_init(&h->loop, &l->timer), 0);
    l->timer.data = l;
    assert_int_equal(uv_timer_start(&l->timer, on_later, 100, 0), 0);
}

static const kl_http_route routes[] = {
    {HTTP_GET, "/hello", hello},
    {HTTP_GET, "/slow", slow},
    {HTTP_POST, "/echo", echo},
    {HTTP_GET, "/items/{id}", item_get},
    {HTTP_DELETE, "/items/{id}", item_delete},
    {HTTP_GET, "/show", show},
    {HTTP_GET, "/fail", fail_handler},
    {HTTP_GET, "/big", big},
    {0, NULL, NULL},
};

static void on_closed(void *arg)
{
    harness *h = arg;

    h->closed = true;
}

static void on_done(uv_async_t *a)
{
    harness *h = a->data;

    kl_http_server_shutdown(h->server, on_closed, h);
    uv_close((uv_handle_t *)&h->done, NULL);
    uv_close((uv_handle_t *)&h->stop, NULL);
}

static void on_stop(uv_async_t *a)
{
    harness *h = a->data;

    kl_http_server_shutdown(h->server, on_closed, h);
}

static void client_main(void *arg)
{
    harness *h = arg;

    h->client(h);
    uv_async_send(&h->done);
}

static harness *harness_new(void)
{
    harness *h = calloc(1, sizeof(*h));

    assert_non_null(h);
    kl_http_config_defaults(&h->cfg);
    h->cfg.idle_timeout_ms = 3000;
    h->cfg.request_timeout_ms = 3000;
    h->late_rc = 1;
    return h;
}

static void harness_run(harness *h, client_fn fn)
{
    assert_int_equal(uv_loop_init(&h->loop), 0);
    assert_int_equal(kl_http_server_new(&h->server, &h->loop, &h->cfg, routes,
                                        test_id, h),
                     0);
    kl_http_server_set_observer(h->server, observe);
    assert_int_equal(kl_http_server_listen(h->server, "127.0.0.1", 0), 0);
    h->port = kl_http_server_port(h->server);
    assert_true(h->port > 0);
    assert_int_equal(uv_async_init(&h->loop, &h->done, on_done), 0);
    h->done.data = h;
    assert_int_equal(uv_async_init(&h->loop, &h->stop, on_stop), 0);
    h->stop.data = h;
    h->client = fn;
    assert_int_equal(uv_thread_create(&h->thread, client_main, h), 0);
    assert_int_equal(uv_run(&h->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_thread_join(&h->thread), 0);
    assert_true(h->closed);
    assert_int_equal(kl_http_server_connections(h->server), 0);
    kl_http_server_free(h->server);
    assert_int_equal(uv_loop_close(&h->loop), 0);
}

/* ---- the client side (runs on the client thread: no cmocka here) -------- */

static long now_ms(void)
{
    return (long)(uv_hrtime() / 1000000);
}

/* rcvbuf > 0 pins the receive buffer (and so the window) small. */
static int cl_connect_rcvbuf(int port, int rcvbuf)
{
    struct sockaddr_in sa;
    struct timeval tv = {3, 0};
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    if (fd < 0)
        return -1;
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (rcvbuf > 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int cl_connect(int port)
{
    return cl_connect_rcvbuf(port, 0);
}

static void cl_send(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);

        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

static void cl_sends(int fd, const char *s)
{
    cl_send(fd, s, strlen(s));
}

/* Length of the first complete answer in buf, or 0. Interim 1xx answers
 * and answers without Content-Length end at their blank line. */
static size_t response_end(const char *buf, size_t len)
{
    const char *head_end = memmem(buf, len, "\r\n\r\n", 4);
    size_t head;
    size_t body = 0;
    const char *p;

    if (head_end == NULL)
        return 0;
    head = (size_t)(head_end - buf) + 4;
    for (p = buf; p < head_end; p++) {
        if (strncasecmp(p, "\r\nContent-Length: ", 18) == 0) {
            body = strtoul(p + 18, NULL, 10);
            break;
        }
    }
    return len >= head + body ? head + body : 0;
}

static int responses_in(const rx *r)
{
    size_t off = 0;
    size_t n;
    int count = 0;

    while ((n = response_end(r->buf + off, r->len - off)) > 0) {
        off += n;
        count++;
    }
    return count;
}

/* One recv into r; false on timeout, EOF or error (closed set for the
 * last two). */
static bool cl_recv(int fd, rx *r)
{
    ssize_t n;

    if (r->len >= RX_CAP)
        return false;
    n = recv(fd, r->buf + r->len, RX_CAP - r->len, 0);
    if (n > 0) {
        r->len += (size_t)n;
        r->buf[r->len] = '\0';
        return true;
    }
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
        r->closed = true;
    return false;
}

static void cl_read_responses(int fd, rx *r, int count)
{
    while (responses_in(r) < count && cl_recv(fd, r))
        ;
}

static void cl_read_to_eof(int fd, rx *r)
{
    long start = now_ms();

    while (cl_recv(fd, r))
        ;
    r->ms = now_ms() - start;
}

/* Reads one answer of up to cap bytes into h->big_rx, until it is complete,
 * or EOF, or a read times out. */
static void cl_read_big(harness *h, int fd, size_t cap)
{
    h->big_rx = malloc(cap);
    h->big_rx_len = 0;
    if (h->big_rx == NULL)
        return;
    while (h->big_rx_len < cap) {
        ssize_t n = recv(fd, h->big_rx + h->big_rx_len, cap - h->big_rx_len, 0);

        if (n <= 0)
            break;
        h->big_rx_len += (size_t)n;
        if (response_end(h->big_rx, h->big_rx_len) > 0)
            break;
    }
}

/* ---- expected answers -------------------------------------------------- */

static const char *expect(char *out, size_t cap, const char *status,
                          const char *type, const char *body, unsigned id,
                          const char *extra, const char *connection)
{
    int n = snprintf(out, cap, "HTTP/1.1 %s\r\n", status);

    if (type != NULL && body[0] != '\0')
        n += snprintf(out + n, cap - (size_t)n, "Content-Type: %s\r\n", type);
    if (strncmp(status, "204", 3) != 0)
        n += snprintf(out + n, cap - (size_t)n, "Content-Length: %zu\r\n",
                      strlen(body));
    n += snprintf(out + n, cap - (size_t)n, "X-Request-Id: req_%026u\r\n%s", id,
                  extra != NULL ? extra : "");
    if (connection != NULL)
        n += snprintf(out + n, cap - (size_t)n, "Connection: %s\r\n", connection);
    snprintf(out + n, cap - (size_t)n, "\r\n%s", body);
    return out;
}

static const char *expect_error(char *out, size_t cap, const char *status,
                                const char *code, const char *message,
                                unsigned id, const char *extra,
                                const char *connection)
{
    char body[512];

    snprintf(body, sizeof(body),
             "{\"error\":{\"code\":\"%s\",\"message\":\"%s\",\"request_id\":\"req_%026u\"}}",
             code, message, id);
    return expect(out, cap, status, "application/json", body, id, extra,
                  connection);
}

#define HELLO_OK(buf, id, conn) \
    expect(buf, sizeof(buf), "200 OK", "application/json", "{\"ok\":true}", id, NULL, conn)

/* ---- loopback tests ---------------------------------------------------- */

static void client_simple(harness *h)
{
    int fd = cl_connect(h->port);

    cl_sends(fd, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    cl_read_responses(fd, &h->rx[0], 1);
    /* keep-alive: the same socket serves a second request */
    cl_sends(fd, "GET /items/42 HTTP/1.1\r\nHost: x\r\n\r\n");
    cl_read_responses(fd, &h->rx[1], 1);
    /* absolute-form targets lose scheme and host */
    cl_sends(fd, "GET http://example.test/hello?x=1 HTTP/1.1\r\n\r\n");
    cl_read_responses(fd, &h->rx[2], 1);
    close(fd);
}

static void test_simple_get(void **state)
{
    harness *h = harness_new();
    char want[1024];

    harness_run(h, client_simple);
    assert_string_equal(h->rx[0].buf, HELLO_OK(want, 1, NULL));
    assert_string_equal(h->rx[1].buf,
                        expect(want, sizeof(want), "200 OK", "application/json",
                               "{\"id\":\"42\"}", 2, NULL, NULL));
    assert_string_equal(h->rx[2].buf, HELLO_OK(want, 3, NULL));
    assert_int_equal(h->observed, 3);
    assert_int_equal(h->statuses[0], 200);
    free(h);
}

static void client_pipelined(harness *h)
{
    int fd = cl_connect(h->port);

    cl_sends(fd, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
                 "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                 "GET /items/7 HTTP/1.1\r\nHost: x\r\n\r\n");
    cl_read_responses(fd, &h->rx[0], 3);
    close(fd);
}

static void test_pipelined(void **state)
{
    harness *h = harness_new();
    char want[2048];
    char part[512];

    harness_run(h, client_pipelined);
    strcpy(want, HELLO_OK(part, 1, NULL));
    strcat(want, expect(part, sizeof(part), "200 OK", "text/plain", "hello", 2,
                        NULL, NULL));
    strcat(want, expect(part, sizeof(part), "200 OK", "application/json",
                        "{\"id\":\"7\"}", 3, NULL, NULL));
    assert_string_equal(h->rx[0].buf, want);
    free(h);
}

static void client_async(harness *h)
{
    int fd = cl_connect(h->port);

    /* The slow answer must come first although the second is instant. */
    cl_sends(fd, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                 "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    cl_read_responses(fd, &h->rx[0], 2);
    close(fd);
}

static void test_async_handler(void **state)
{
    harness *h = harness_new();
    char want[2048];
    char part[512];

    harness_run(h, client_async);
    strcpy(want, expect(part, sizeof(part), "200 OK", "application/json",
                        "{\"slow\":true}", 1, NULL, NULL));
    strcat(want, HELLO_OK(part, 2, NULL));
    assert_string_equal(h->rx[0].buf, want);
    assert_int_equal(h->late_rc, 0);
    free(h);
}

static void client_split(harness *h)
{
    int fd = cl_connect(h->port);

    /* Head and chunked body arrive in pieces: spans must join across reads. */
    cl_sends(fd, "GET /sh");
    uv_sleep(20);
    cl_sends(fd, "ow?q=a%20b+c&z=1 HTTP/1.1\r\nHost: x\r\nX-Te");
    uv_sleep(20);
    cl_sends(fd, "st:  some value \t\r\n\r\n");
    cl_read_responses(fd, &h->rx[0], 1);

    cl_sends(fd, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel");
    uv_sleep(20);
    cl_sends(fd, "lo\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n");
    cl_read_responses(fd, &h->rx[1], 1);

    cl_sends(fd, "POST /echo HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    cl_read_responses(fd, &h->rx[2], 1); /* the interim 100 */
    cl_sends(fd, "12345");
    cl_read_responses(fd, &h->rx[2], 2);
    close(fd);
}

static void test_split_chunked_expect(void **state)
{
    harness *h = harness_new();
    char want[1024];
    char part[512];

    harness_run(h, client_split);
    assert_string_equal(h->rx[0].buf,
                        expect(want, sizeof(want), "200 OK", "text/plain",
                               "x=some value;q=a b c;peer=127.0.0.1", 1, NULL,
                               NULL));
    assert_string_equal(h->rx[1].buf,
                        expect(want, sizeof(want), "200 OK", "text/plain",
                               "hello world", 2, NULL, NULL));
    strcpy(want, "HTTP/1.1 100 Continue\r\n\r\n");
    strcat(want, expect(part, sizeof(part), "200 OK", "text/plain", "12345", 3,
                        NULL, NULL));
    assert_string_equal(h->rx[2].buf, want);
    free(h);
}

static void client_big_headers(harness *h)
{
    char req[8192];
    int fd;
    int n;
    int i;

    fd = cl_connect(h->port);
    n = snprintf(req, sizeof(req), "GET /hello HTTP/1.1\r\nX-Big: ");
    memset(req + n, 'a', 4000);
    n += 4000;
    n += snprintf(req + n, sizeof(req) - (size_t)n, "\r\n\r\n");
    cl_send(fd, req, (size_t)n);
    cl_read_to_eof(fd, &h->rx[0]);
    close(fd);

    /* 65 short header lines fit in the byte limit but not the count. */
    fd = cl_connect(h->port);
    n = snprintf(req, sizeof(req), "GET /hello HTTP/1.1\r\n");
    for (i = 0; i < 65; i++)
        n += snprintf(req + n, sizeof(req) - (size_t)n, "H%d: v\r\n", i);
    n += snprintf(req + n, sizeof(req) - (size_t)n, "\r\n");
    cl_send(fd, req, (size_t)n);
    cl_read_to_eof(fd, &h->rx[1]);
    close(fd);

    /* The same head in dribs: the running total trips the limit too. */
    fd = cl_connect(h->port);
    cl_sends(fd, "GET /hello HTTP/1.1\r\nX-Big: ");
    for (i = 0; i < 6 && !h->rx[2].closed; i++) {
        memset(req, 'b', 256);
        cl_send(fd, req, 256);
        uv_sleep(5);
    }
    cl_read_to_eof(fd, &h->rx[2]);
    close(fd);
}

static void test_431(void **state)
{
    harness *h = harness_new();
    char want[1024];

    h->cfg.max_header_bytes = 1024;
    h->cfg.idle_timeout_ms = 200; /* nothing here may wait for it */
    harness_run(h, client_big_headers);
    for (unsigned i = 0; i < 3; i++) {
        assert_string_equal(h->rx[i].buf,
                            expect_error(want, sizeof(want),
                                         "431 Request Header Fields Too Large",
                                         "invalid_argument",
                                         "request headers too large", i + 1,
                                         NULL, "close"));
        assert_true(h->rx[i].closed);
    }
    free(h);
}

static void client_big_body(harness *h)
{
    char body[200];
    int fd;

    memset(body, 'x', sizeof(body));

    /* Refused on the announced length, before any body byte is sent. */
    fd = cl_connect(h->port);
    cl_sends(fd, "POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n");
    cl_read_to_eof(fd, &h->rx[0]);
    close(fd);

    /* Chunked: refused on the running total. */
    fd = cl_connect(h->port);
    cl_sends(fd, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "40\r\n");
    cl_send(fd, body, 64);
    cl_sends(fd, "\r\n40\r\n");
    cl_send(fd, body, 64);
    cl_sends(fd, "\r\n0\r\n\r\n");
    cl_read_to_eof(fd, &h->rx[1]);
    close(fd);

    /* Exactly at the limit is fine. */
    fd = cl_connect(h->port);
    cl_sends(fd, "POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\n");
    cl_send(fd, body, 100);
    cl_read_responses(fd, &h->rx[2], 1);
    close(fd);
}

static void test_413(void **state)
{
    harness *h = harness_new();
    char want[1024];
    char body[101];

    h->cfg.max_body_bytes = 100;
    harness_run(h, client_big_body);
    assert_string_equal(h->rx[0].buf,
                        expect_error(want, sizeof(want), "413 Content Too Large",
                                     "payload_too_large", "request body too large",
                                     1, NULL, "close"));
    assert_true(h->rx[0].closed);
    assert_string_equal(h->rx[1].buf,
                        expect_error(want, sizeof(want), "413 Content Too Large",
                                     "payload_too_large", "request body too large",
                                     2, NULL, "close"));
    assert_true(h->rx[1].closed);
    memset(body, 'x', 100);
    body[100] = '\0';
    assert_string_equal(h->rx[2].buf, expect(want, sizeof(want), "200 OK",
                                             "text/plain", body, 3, NULL, NULL));
    free(h);
}

static void client_errors(harness *h)
{
    int fd;

    fd = cl_connect(h->port);
    cl_sends(fd, "GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n");
    cl_read_to_eof(fd, &h->rx[0]);
    close(fd);

    /* 405 and 404 keep the connection. */
    fd = cl_connect(h->port);
    cl_sends(fd, "POST /items/7 HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    cl_read_responses(fd, &h->rx[1], 1);
    cl_sends(fd, "GET /nope HTTP/1.1\r\n\r\nGET /hello/ HTTP/1.1\r\n\r\n");
    cl_read_responses(fd, &h->rx[2], 2);
    cl_sends(fd, "GET /fail HTTP/1.1\r\n\r\n");
    cl_read_responses(fd, &h->rx[3], 1);
    close(fd);

    /* A folded header line (obs-fold) is refused, not glued together. */
    fd = cl_connect(h->port);
    cl_sends(fd, "GET /show HTTP/1.1\r\nX-Test: a\r\n b\r\n\r\n");
    cl_read_to_eof(fd, &h->rx[4]);
    close(fd);
}

static void test_400_404_405(void **state)
{
    harness *h = harness_new();
    char want[2048];
    char part[1024];

    harness_run(h, client_errors);
    assert_string_equal(h->rx[0].buf,
                        expect_error(want, sizeof(want), "400 Bad Request",
                                     "invalid_argument", "malformed HTTP request",
                                     1, NULL, "close"));
    assert_true(h->rx[0].closed);
    assert_string_equal(h->rx[1].buf,
                        expect_error(want, sizeof(want), "405 Method Not Allowed",
                                     "method_not_allowed", "method not allowed",
                                     2, "Allow: GET, DELETE\r\n", NULL));
    strcpy(want, expect_error(part, sizeof(part), "404 Not Found", "not_found",
                              "no such route", 3, NULL, NULL));
    strcat(want, expect_error(part, sizeof(part), "404 Not Found", "not_found",
                              "no such route", 4, NULL, NULL));
    assert_string_equal(h->rx[2].buf, want);
    /* The error body escapes quotes, newline and backslash, and has field. */
    assert_string_equal(
        h->rx[3].buf,
        expect(want, sizeof(want), "400 Bad Request", "application/json",
               "{\"error\":{\"code\":\"invalid_argument\",\"message\":"
               "\"bad \\\"name\\\"\\n\\\\\",\"field\":\"name\","
               "\"request_id\":\"req_00000000000000000000000005\"}}",
               5, "X-Extra: 1\r\n", NULL));
    assert_string_equal(h->rx[4].buf,
                        expect_error(want, sizeof(want), "400 Bad Request",
                                     "invalid_argument", "malformed HTTP request",
                                     6, NULL, "close"));
    assert_true(h->rx[4].closed);
    assert_int_equal(h->observed, 6);
    assert_int_equal(h->statuses[0], 400);
    assert_int_equal(h->statuses[1], 405);
    assert_int_equal(h->statuses[2], 404);
    free(h);
}

static void client_idle(harness *h)
{
    int fd;

    /* Nothing sent at all. */
    fd = cl_connect(h->port);
    cl_read_to_eof(fd, &h->rx[0]);
    close(fd);

    /* Idle after one answer. */
    fd = cl_connect(h->port);
    cl_sends(fd, "GET /hello HTTP/1.1\r\n\r\n");
    cl_read_responses(fd, &h->rx[1], 1);
    h->rx[1].len = 0; /* only the wait for EOF matters here */
    cl_read_to_eof(fd, &h->rx[1]);
    close(fd);
}

static void test_idle_timeout(void **state)
{
    harness *h = harness_new();

    h->cfg.idle_timeout_ms = 150;
    harness_run(h, client_idle);
    for (unsigned i = 0; i < 2; i++) {
        assert_true(h->rx[i].closed);
        assert_int_equal(h->rx[i].len, 0);
        assert_true(h->rx[i].ms >= 100);
        assert_true(h->rx[i].ms < 1500);
    }
    free(h);
}

/* Requests 100 ms apart on one connection, each inside the 300 ms idle
 * timeout: the idle deadline moves with each answer, so the connection
 * outlives the first deadline, then closes 300 ms after the last answer. */
static void client_idle_moves(harness *h)
{
    int fd = cl_connect(h->port);
    long start = now_ms(), last = 0;

    for (int i = 0; i < 6; i++) {
        if (i > 0)
            uv_sleep(100);
        h->rx[0].len = 0;
        cl_sends(fd, "GET /hello HTTP/1.1\r\n\r\n");
        cl_read_responses(fd, &h->rx[0], 1);
        if (responses_in(&h->rx[0]) == 1 && !h->rx[0].closed)
            h->rx[2].ms++;      /* answered, still open */
        last = now_ms();
    }
    h->rx[1].ms = last - start;
    h->rx[0].len = 0;
    cl_read_to_eof(fd, &h->rx[0]);
    h->rx[0].ms = now_ms() - last;
    close(fd);
}

static void test_idle_deadline_moves(void **state)
{
    harness *h = harness_new();

    h->cfg.idle_timeout_ms = 300;
    harness_run(h, client_idle_moves);
    assert_int_equal(h->rx[2].ms, 6);
    assert_true(h->rx[1].ms >= 450);     /* open past the first deadline */
    assert_true(h->rx[0].closed);
    assert_int_equal(h->rx[0].len, 0);
    assert_true(h->rx[0].ms >= 250);     /* idle measured from the last answer */
    assert_true(h->rx[0].ms < 1500);
    free(h);
}

static void client_slowloris(harness *h)
{
    int fd = cl_connect(h->port);
    struct pollfd pfd = {fd, POLLIN, 0};
    long start = now_ms();
    int i;

    /* One header line every 40 ms, each well inside the idle timeout: only
     * the request deadline can stop this. */
    cl_sends(fd, "GET /hello HTTP/1.1\r\n");
    for (i = 0; i < 50; i++) {
        char line[32];

        uv_sleep(40);
        if (poll(&pfd, 1, 0) > 0)
            break;
        snprintf(line, sizeof(line), "X-%d: %d\r\n", i, i);
        cl_sends(fd, line);
    }
    cl_read_to_eof(fd, &h->rx[0]);
    h->rx[0].ms = now_ms() - start;
    close(fd);
}

static void test_request_timeout(void **state)
{
    harness *h = harness_new();
    char want[1024];

    h->cfg.request_timeout_ms = 250;
    h->cfg.idle_timeout_ms = 2000;
    harness_run(h, client_slowloris);
    assert_string_equal(h->rx[0].buf,
                        expect_error(want, sizeof(want), "408 Request Timeout",
                                     "invalid_argument", "request timeout", 1,
                                     NULL, "close"));
    assert_true(h->rx[0].closed);
    assert_true(h->rx[0].ms >= 200);
    assert_true(h->rx[0].ms < 1500);
    free(h);
}

static void client_max_requests(harness *h)
{
    int fd = cl_connect(h->port);

    cl_sends(fd, "GET /hello HTTP/1.1\r\n\r\n");
    cl_read_responses(fd, &h->rx[0], 1);
    /* Pipelined past the limit: the third is never answered. */
    cl_sends(fd, "GET /hello HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n");
    cl_read_to_eof(fd, &h->rx[1]);
    close(fd);

    /* HTTP/1.0 keeps the connection only when asked to. */
    fd = cl_connect(h->port);
    cl_sends(fd, "GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    cl_read_responses(fd, &h->rx[2], 1);
    cl_sends(fd, "GET /hello HTTP/1.0\r\n\r\n");
    cl_read_to_eof(fd, &h->rx[3]);
    close(fd);
}

static void test_max_requests_and_http10(void **state)
{
    harness *h = harness_new();
    char want[1024];

    h->cfg.max_requests_per_conn = 2;
    harness_run(h, client_max_requests);
    assert_string_equal(h->rx[0].buf, HELLO_OK(want, 1, NULL));
    assert_string_equal(h->rx[1].buf, HELLO_OK(want, 2, "close"));
    assert_true(h->rx[1].closed);
    assert_string_equal(h->rx[2].buf, HELLO_OK(want, 3, "keep-alive"));
    assert_string_equal(h->rx[3].buf, HELLO_OK(want, 4, "close"));
    assert_true(h->rx[3].closed);
    assert_int_equal(h->observed, 4);
    free(h);
}

static void client_max_conns(harness *h)
{
    int a = cl_connect(h->port);
    int b;

    cl_sends(a, "GET /hello HTTP/1.1\r\n\r\n");
    cl_read_responses(a, &h->rx[0], 1); /* a is surely accepted now */
    b = cl_connect(h->port);
    cl_read_to_eof(b, &h->rx[1]);
    close(b);
    cl_sends(a, "GET /hello HTTP/1.1\r\n\r\n");
    cl_read_responses(a, &h->rx[2], 1);
    close(a);
}

static void test_max_connections(void **state)
{
    harness *h = harness_new();
    char want[1024];

    h->cfg.max_connections = 1;
    harness_run(h, client_max_conns);
    assert_string_equal(h->rx[0].buf, HELLO_OK(want, 1, NULL));
    assert_true(h->rx[1].closed);
    assert_int_equal(h->rx[1].len, 0);
    assert_true(h->rx[1].ms < 1000);
    assert_string_equal(h->rx[2].buf, HELLO_OK(want, 2, NULL));
    free(h);
}

static void client_disconnect(harness *h)
{
    int fd = cl_connect(h->port);

    cl_sends(fd, "GET /slow HTTP/1.1\r\n\r\n");
    uv_sleep(30);
    close(fd);
    /* The handler answers ~70 ms after the peer left; wait past that. */
    uv_sleep(250);
}

static void test_respond_after_disconnect(void **state)
{
    harness *h = harness_new();

    harness_run(h, client_disconnect);
    assert_int_equal(h->observed, 1);
    assert_int_equal(h->statuses[0], 200);
    assert_true(h->late_rc <= 0);
    free(h);
}

static void client_shutdown(harness *h)
{
    int busy = cl_connect(h->port);
    int idle = cl_connect(h->port);

    cl_sends(idle, "GET /hello HTTP/1.1\r\n\r\n");
    cl_read_responses(idle, &h->rx[1], 1);
    cl_sends(busy, "GET /slow HTTP/1.1\r\n\r\n");
    uv_sleep(30);
    uv_async_send(&h->stop);
    /* The idle one closes at once; the busy one gets its answer, marked as
     * the last, then EOF. */
    h->rx[1].len = 0;
    cl_read_to_eof(idle, &h->rx[1]);
    cl_read_to_eof(busy, &h->rx[0]);
    close(idle);
    close(busy);
}

static void test_graceful_shutdown(void **state)
{
    harness *h = harness_new();
    char want[1024];

    harness_run(h, client_shutdown);
    assert_string_equal(h->rx[0].buf,
                        expect(want, sizeof(want), "200 OK", "application/json",
                               "{\"slow\":true}", 2, NULL, "close"));
    assert_true(h->rx[0].closed);
    assert_true(h->rx[1].closed);
    assert_int_equal(h->rx[1].len, 0);
    assert_true(h->rx[1].ms < 1000);
    free(h);
}

static const char dribble_req[] =
    "GET /show?q=%41+b HTTP/1.1\r\nX-Test: v1\r\n\r\n"
    "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    "3\r\nabc\r\n1;ext=1\r\nd\r\n0\r\n\r\n"
    "POST /echo HTTP/1.1\r\nContent-Length: 4\r\n\r\nwxyz"
    "GET /items/abc HTTP/1.1\r\n\r\n";

static void client_dribble(harness *h)
{
    int fd = cl_connect(h->port);
    int one = 1;
    size_t i;

    /* One byte per segment: every read boundary the server can meet. */
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    for (i = 0; i < sizeof(dribble_req) - 1; i++)
        cl_send(fd, dribble_req + i, 1);
    cl_read_responses(fd, &h->rx[0], 4);
    close(fd);
}

static void test_byte_at_a_time(void **state)
{
    harness *h = harness_new();
    char want[2048];
    char part[512];

    harness_run(h, client_dribble);
    strcpy(want, expect(part, sizeof(part), "200 OK", "text/plain",
                        "x=v1;q=A b;peer=127.0.0.1", 1, NULL, NULL));
    strcat(want, expect(part, sizeof(part), "200 OK", "text/plain", "abcd", 2,
                        NULL, NULL));
    strcat(want, expect(part, sizeof(part), "200 OK", "text/plain", "wxyz", 3,
                        NULL, NULL));
    strcat(want, expect(part, sizeof(part), "200 OK", "application/json",
                        "{\"id\":\"abc\"}", 4, NULL, NULL));
    assert_string_equal(h->rx[0].buf, want);
    free(h);
}

static void fill_big(harness *h, size_t len)
{
    size_t i;

    h->big = malloc(len);
    assert_non_null(h->big);
    h->big_len = len;
    for (i = 0; i < len; i++)
        h->big[i] = (char)('a' + i % 23);
}

static void client_big(harness *h)
{
    int fd = cl_connect(h->port);
    char *up = malloc(300000);
    size_t i;

    /* A body spread over many reads (the read buffer grows), echoed back. */
    for (i = 0; i < 300000; i++)
        up[i] = (char)('A' + i % 26);
    cl_sends(fd, "POST /echo HTTP/1.1\r\nContent-Length: 300000\r\n\r\n");
    cl_send(fd, up, 300000);
    free(up);
    cl_read_big(h, fd, 300000 + 4096);
    h->echo_rx = h->big_rx;
    h->echo_rx_len = h->big_rx_len;

    /* An answer bigger than the socket buffers, read late: uv_try_write
     * takes part, uv_write the rest. */
    cl_sends(fd, "GET /big HTTP/1.1\r\n\r\n");
    uv_sleep(50);
    cl_read_big(h, fd, h->big_len + 4096);
    /* The connection still works, on buffers back to their usual size. */
    cl_sends(fd, "GET /hello HTTP/1.1\r\n\r\n");
    cl_read_responses(fd, &h->rx[0], 1);
    close(fd);
}

static void test_big_answer(void **state)
{
    harness *h = harness_new();
    char want[1024];
    int head;
    size_t i;

    fill_big(h, 3 * 1024 * 1024);
    harness_run(h, client_big);

    head = snprintf(want, sizeof(want),
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    "Content-Length: 300000\r\nX-Request-Id: req_%026u\r\n\r\n",
                    1u);
    assert_non_null(h->echo_rx);
    assert_int_equal(h->echo_rx_len, (size_t)head + 300000);
    assert_memory_equal(h->echo_rx, want, (size_t)head);
    for (i = 0; i < 300000; i++) {
        if (h->echo_rx[(size_t)head + i] != (char)('A' + i % 26))
            fail_msg("echo differs at byte %zu", i);
    }

    head = snprintf(want, sizeof(want),
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    "Content-Length: %zu\r\nX-Request-Id: req_%026u\r\n\r\n",
                    h->big_len, 2u);
    assert_non_null(h->big_rx);
    assert_int_equal(h->big_rx_len, (size_t)head + h->big_len);
    assert_memory_equal(h->big_rx, want, (size_t)head);
    for (i = 0; i < h->big_len; i++) {
        if (h->big_rx[(size_t)head + i] != h->big[i])
            fail_msg("body differs at byte %zu", i);
    }
    assert_string_equal(h->rx[0].buf, HELLO_OK(want, 3, NULL));
    free(h->echo_rx);
    free(h->big_rx);
    free(h->big);
    free(h);
}

static void client_crlf_after_body(harness *h)
{
    int fd = cl_connect(h->port);
    char *up = malloc(100000);

    /* A body big enough to move the read buffer to the heap, then the
     * blank line some clients send after a body: llhttp skips it without
     * starting a message, so nothing of the answered message may linger. */
    memset(up, 'u', 100000);
    cl_sends(fd, "POST /echo HTTP/1.1\r\nContent-Length: 100000\r\n\r\n");
    cl_send(fd, up, 100000);
    cl_sends(fd, "\r\n");
    free(up);
    cl_read_big(h, fd, 100000 + 4096);
    uv_sleep(20);
    cl_sends(fd, "GET /hello HTTP/1.1\r\n\r\n");
    cl_read_responses(fd, &h->rx[0], 1);
    close(fd);
}

static void test_crlf_after_body(void **state)
{
    harness *h = harness_new();
    char want[1024];

    harness_run(h, client_crlf_after_body);
    assert_non_null(h->big_rx);
    assert_true(h->big_rx_len > 100000);
    assert_string_equal(h->rx[0].buf, HELLO_OK(want, 2, NULL));
    free(h->big_rx);
    free(h);
}

static void client_stalled_reader(harness *h)
{
    int fd = cl_connect_rcvbuf(h->port, 4096);
    struct timeval tv = {1, 0};

    cl_sends(fd, "GET /big HTTP/1.1\r\n\r\n");
    /* Read nothing for longer than the write deadline. */
    uv_sleep(600);
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    cl_read_big(h, fd, h->big_len + 4096);
    /* Then the server is gone: EOF or reset, not a timeout. */
    {
        char b;
        ssize_t n = recv(fd, &b, 1, 0);

        h->rx[0].closed = n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
    }
    close(fd);
}

static void test_write_timeout(void **state)
{
    harness *h = harness_new();

    fill_big(h, 16 * 1024 * 1024);
    h->cfg.request_timeout_ms = 200;
    harness_run(h, client_stalled_reader);
    assert_true(h->rx[0].closed);
    assert_non_null(h->big_rx);
    assert_true(h->big_rx_len > 0);
    assert_true(h->big_rx_len < h->big_len);
    assert_int_equal(h->observed, 1);
    free(h->big_rx);
    free(h->big);
    free(h);
}

static void client_close_upgrade(harness *h)
{
    int fd = cl_connect(h->port);

    cl_sends(fd, "GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n");
    cl_read_to_eof(fd, &h->rx[0]);
    close(fd);

    fd = cl_connect(h->port);
    cl_sends(fd, "GET /hello HTTP/1.1\r\nConnection: Upgrade\r\n"
                 "Upgrade: websocket\r\n\r\nthis is not HTTP");
    cl_read_to_eof(fd, &h->rx[1]);
    close(fd);
}

static void test_connection_close_and_upgrade(void **state)
{
    harness *h = harness_new();
    char want[1024];

    harness_run(h, client_close_upgrade);
    assert_string_equal(h->rx[0].buf, HELLO_OK(want, 1, "close"));
    assert_true(h->rx[0].closed);
    assert_string_equal(h->rx[1].buf, HELLO_OK(want, 2, "close"));
    assert_true(h->rx[1].closed);
    free(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_found),
        cmocka_unit_test(test_route_bad_method),
        cmocka_unit_test(test_route_not_found),
        cmocka_unit_test(test_query),
        cmocka_unit_test(test_reason),
        cmocka_unit_test(test_simple_get),
        cmocka_unit_test(test_pipelined),
        cmocka_unit_test(test_async_handler),
        cmocka_unit_test(test_split_chunked_expect),
        cmocka_unit_test(test_byte_at_a_time),
        cmocka_unit_test(test_431),
        cmocka_unit_test(test_413),
        cmocka_unit_test(test_400_404_405),
        cmocka_unit_test(test_idle_timeout),
        cmocka_unit_test(test_idle_deadline_moves),
        cmocka_unit_test(test_request_timeout),
        cmocka_unit_test(test_max_requests_and_http10),
        cmocka_unit_test(test_max_connections),
        cmocka_unit_test(test_respond_after_disconnect),
        cmocka_unit_test(test_graceful_shutdown),
        cmocka_unit_test(test_big_answer),
        cmocka_unit_test(test_write_timeout),
        cmocka_unit_test(test_crlf_after_body),
        cmocka_unit_test(test_connection_close_and_upgrade),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
