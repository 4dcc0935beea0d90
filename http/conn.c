/*
 * http/conn.c — one HTTP/1.1 connection: read bytes, feed llhttp, route the
 * finished message, write the answer, then resume on whatever the client
 * pipelined behind it.
 *
 * A connection is one allocation: both handles, the parser, the request
 * being answered and inline storage for the read and answer buffers (they
 * move to the heap only for big bodies or big answers).
 *
 * A request goes through these states:
 *   reading     uv_read_start; the timer is the idle deadline while no byte
 *               of a next request has arrived, then the request deadline,
 *               armed once at the first byte so that dribbling bytes does
 *               not extend it (slow clients are dropped with a 408).
 *   req_active  the message is complete and llhttp is paused just after it;
 *               the handler owns c->req until it calls kl_http_respond*, now
 *               or from a later callback; in the latter case reading stops
 *               when the handler returns, and resumes after the answer.
 *   writing     uv_try_write could not take the whole answer; the rest is in
 *               a uv_write and the timer is the write deadline.
 *   then        keep-alive: drop the answered message, resume llhttp on the
 *               leftover bytes and go on; or the answer was the last: send
 *               FIN and linger, discarding input, until the peer closes or
 *               the linger timer fires (closing at once with unread input
 *               would send a RST that can destroy the answer in flight).
 *
 * Buffer layout: the current message always starts at in.ptr[0], because
 * after each answer the unparsed leftover moves to the front. URL and header
 * slices are kept as offsets since the buffer may grow (and move) while a
 * message is arriving; they become pointers at dispatch, after reading has
 * stopped, so nothing moves while a handler holds them. A chunked body is
 * compacted in place over its chunk framing so the body is one slice.
 *
 * Memory is freed only in close callbacks, or, when the handles closed while
 * a handler still held the request, in that request's respond call.
 */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

static void conn_process(kl_http_conn *c);

/* ---- buffers ---------------------------------------------------------- */

int kl_http_buf_reserve(kl_http_buf *b, size_t need, size_t limit)
{
    size_t cap;
    char *p;

    if (need <= b->cap)
        return 0;
    if (need > limit)
        return UV_ENOBUFS;
    cap = b->cap * 2;
    if (cap < need)
        cap = need;
    if (cap > limit)
        cap = limit;
    if (b->ptr == b->inline_ptr) {
        p = malloc(cap);
        if (p == NULL)
            return UV_ENOMEM;
        memcpy(p, b->ptr, b->len);
    } else {
        p = realloc(b->ptr, cap);
        if (p == NULL)
            return UV_ENOMEM;
    }
    b->ptr = p;
    b->cap = cap;
    return 0;
}

/* Between requests: go back to inline storage when the contents fit, so an
 * idle connection does not keep a big heap block from one large request. */
static void buf_shrink(kl_http_buf *b)
{
    if (b->ptr == b->inline_ptr || b->cap <= KL_HTTP_BUF_RETAIN)
        return;
    if (b->len > b->inline_cap)
        return;
    memcpy(b->inline_ptr, b->ptr, b->len);
    free(b->ptr);
    b->ptr = b->inline_ptr;
    b->cap = b->inline_cap;
}

static void buf_release(kl_http_buf *b)
{
    if (b->ptr != b->inline_ptr)
        free(b->ptr);
    b->ptr = b->inline_ptr;
    b->cap = b->inline_cap;
    b->len = 0;
}

/* ---- timers ----------------------------------------------------------- */

static void on_timer(uv_timer_t *t);

/*
 * Each state has one deadline, but the timer is not moved with every
 * request (a stop and a start of libuv's timer heap per request were 2%
 * of the verify path's CPU): a later deadline leaves the armed timer
 * alone, and when it fires early it sleeps again for the rest. Only an
 * earlier deadline, or no timer armed, starts it.
 */
static void timer_arm(kl_http_conn *c, uint64_t due)
{
    uint64_t now = uv_now(c->tcp.loop);
    int rc = uv_timer_start(&c->timer, on_timer, due > now ? due - now : 0, 0);
    if (rc < 0)
        fprintf(stderr, "http: timer start failed: %s\n", uv_strerror(rc));
}

static void conn_timer_set(kl_http_conn *c, kl_http_timer_mode mode,
                           unsigned ms)
{
    c->timer_mode = mode;
    if (mode == KL_HTTP_TIMER_NONE || ms == 0) {
        c->deadline = UINT64_MAX;   /* an armed timer fires and finds none */
        return;
    }
    uint64_t now = uv_now(c->tcp.loop);
    c->deadline = now + ms;
    if (!uv_is_active((uv_handle_t *)&c->timer) ||
        now + uv_timer_get_due_in(&c->timer) > c->deadline)
        timer_arm(c, c->deadline);
}

/* ---- closing ---------------------------------------------------------- */

static void conn_free(kl_http_conn *c)
{
    kl_http_server *s = c->server;

    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    s->nconns--;
    buf_release(&c->in);
    buf_release(&c->out);
    free(c);
    kl_http_server_check_closed(s);
}

static void on_handle_closed(uv_handle_t *h)
{
    kl_http_conn *c = h->data;

    if (--c->open_handles > 0)
        return;
    if (c->req_active) {
        /* The handler still holds c->req; its respond call frees us. */
        c->dead = true;
        return;
    }
    conn_free(c);
}

void kl_http_conn_close(kl_http_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    c->reading = false;
    /* Pending writes and the shutdown request are cancelled (their
     * callbacks see UV_ECANCELED) before the close callbacks run. */
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
}

static void on_shutdown_done(uv_shutdown_t *req, int status)
{
    kl_http_conn *c = KL_HTTP_CONTAINER_OF(req, kl_http_conn, shutdown_req);

    if (status < 0 && !c->closing)
        kl_http_conn_close(c);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
static void conn_read_stop(kl_http_conn *c);

static void conn_linger(kl_http_conn *c)
{
    int rc;

    c->lingering = true;
    c->in.len = 0;
    c->parse_pos = 0;
    rc = uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown_done);
    if (rc < 0)
        goto fail;
    if (!c->reading) {
        rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
        if (rc < 0)
            goto fail;
        c->reading = true;
    }
    conn_timer_set(c, KL_HTTP_TIMER_LINGER, KL_HTTP_LINGER_MS);
    return;

fail:
    kl_http_conn_close(c);
}

/* ---- reading ---------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    kl_http_conn *c = h->data;
    size_t room;

    if (c->lingering) {
        /* Input is discarded: any room will do. */
        *buf = uv_buf_init(c->in.ptr, (unsigned)c->in.cap);
        return;
    }
    assert(c->in.len <= c->in.cap);
    if (c->req_active || c->writing) {
        /* A handler holds slices of the buffer: it must not move. Read
         * into the room there is (conn_process stopped reading if that was
         * less than KL_HTTP_READ_MIN). */
        *buf = uv_buf_init(c->in.ptr + c->in.len, (unsigned)(c->in.cap - c->in.len));
        return;
    }
    if (c->in.cap - c->in.len < KL_HTTP_READ_MIN) {
        /* On failure read into what is left; no room at all gives the read
         * callback UV_ENOBUFS, which closes the connection. */
        (void)kl_http_buf_reserve(&c->in, c->in.len + KL_HTTP_READ_MIN,
                                  c->server->in_limit);
    }
    room = c->in.cap - c->in.len;
    if (room > UINT32_MAX)
        room = UINT32_MAX;
    *buf = uv_buf_init(c->in.ptr + c->in.len, (unsigned)room);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    kl_http_conn *c = stream->data;

    if (nread == 0)
        return; /* EAGAIN */
    if (nread < 0) {
        if (nread == UV_EOF && (c->req_active || c->writing)) {
            /* The peer finished sending while its request is being
             * answered: answer, then close. */
            conn_read_stop(c);
            c->close_after = true;
            return;
        }
        /* EOF, reset, or no room: nothing is owed to a peer that left in
         * the middle of a request. */
        kl_http_conn_close(c);
        return;
    }
    if (c->lingering)
        return;
    c->in.len += (size_t)nread;
    conn_process(c);
}

static void conn_read_stop(kl_http_conn *c)
{
    if (!c->reading)
        return;
    /* uv_read_stop cannot fail on an open TCP handle. */
    (void)uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
}

static void conn_wait_for_data(kl_http_conn *c)
{
    const kl_http_config *cfg = &c->server->cfg;
    int rc;

    if (!c->reading) {
        rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
        if (rc < 0) {
            kl_http_conn_close(c);
            return;
        }
        c->reading = true;
    }
    if (c->in.len == 0) {
        if (c->timer_mode != KL_HTTP_TIMER_IDLE)
            conn_timer_set(c, KL_HTTP_TIMER_IDLE, cfg->idle_timeout_ms);
    } else if (c->timer_mode != KL_HTTP_TIMER_REQUEST) {
        conn_timer_set(c, KL_HTTP_TIMER_REQUEST, cfg->request_timeout_ms);
    }
}

/* ---- llhttp callbacks ------------------------------------------------- */

static int conn_fail_in_parser(kl_http_conn *c, int status)
{
    c->fail_status = status;
    return HPE_USER;
}

/* Extends a span with the next piece llhttp reports. Pieces of one span
 * split by a read boundary are contiguous (a new execute starts where the
 * previous one ended, and the buffer is not cut back while head spans are
 * open). A gap means llhttp skipped bytes inside a header value: an obs-fold
 * ("X: a\r\n b"), which RFC 9112 lets a server refuse with 400, and which
 * we do, as proxies disagree on what a folded header means. */
static int span_extend(kl_http_conn *c, kl_http_span *sp, const char *at,
                       size_t len)
{
    size_t off = (size_t)(at - c->in.ptr);

    if (len == 0)
        return 0;
    if (sp->len == 0)
        sp->off = (uint32_t)off;
    else if ((size_t)sp->off + sp->len != off)
        return conn_fail_in_parser(c, 400);
    sp->len += (uint32_t)len;
    if (off + len > c->head_end)
        c->head_end = off + len;
    if (c->head_end > c->server->cfg.max_header_bytes)
        return conn_fail_in_parser(c, 431);
    return 0;
}

/* Forgets the parse state of one message. Needed both when the next one
 * begins and as soon as an answered one is dropped: llhttp skips blank lines
 * between messages without starting one, and the offsets of a message whose
 * bytes are gone must not steer the buffer meanwhile. */
static void conn_message_reset(kl_http_conn *c)
{
    c->url.off = 0;
    c->url.len = 0;
    c->nheaders = 0;
    c->hdr_state = KL_HTTP_HDR_NONE;
    c->head_end = 0;
    c->headers_done = false;
    c->body_off = 0;
    c->body_len = 0;
    c->fail_status = 0;
}

static int on_message_begin(llhttp_t *p)
{
    conn_message_reset(p->data);
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    kl_http_conn *c = p->data;

    return span_extend(c, &c->url, at, len);
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    kl_http_conn *c = p->data;
    kl_http_header_span *h;

    if (c->headers_done)
        return 0; /* a chunked trailer: not kept */
    if (c->hdr_state != KL_HTTP_HDR_FIELD) {
        if (c->nheaders == KL_HTTP_MAX_HEADERS)
            return conn_fail_in_parser(c, 431);
        h = &c->headers[c->nheaders++];
        memset(h, 0, sizeof(*h));
        c->hdr_state = KL_HTTP_HDR_FIELD;
    }
    h = &c->headers[c->nheaders - 1];
    return span_extend(c, &h->name, at, len);
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    kl_http_conn *c = p->data;

    if (c->headers_done)
        return 0;
    assert(c->nheaders > 0);
    c->hdr_state = KL_HTTP_HDR_VALUE;
    return span_extend(c, &c->headers[c->nheaders - 1].value, at, len);
}

/* The interim answer a client waits for before sending a body it announced
 * with "Expect: 100-continue" (common HTTP clients do this for bodies over
 * about 1 KiB, and would otherwise stall a second before sending). */
static const char kl_http_continue[] = "HTTP/1.1 100 Continue\r\n\r\n";

static void on_continue_written(uv_write_t *req, int status)
{
    kl_http_conn *c = KL_HTTP_CONTAINER_OF(req, kl_http_conn, continue_req);

    /* A failure shows up again on the final answer's write. */
    c->continuing = false;
}

static void conn_send_continue(kl_http_conn *c)
{
    size_t len = sizeof(kl_http_continue) - 1;
    /* libuv never writes into a buffer it sends; the cast only satisfies
     * uv_buf_t's non-const base. */
    uv_buf_t b = uv_buf_init((char *)(uintptr_t)kl_http_continue,
                             (unsigned)len);
    int n;

    /* The previous one still queued means the client is not reading; it
     * can do without a second. */
    if (c->continuing)
        return;
    n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (n == UV_EAGAIN || n == UV_ENOSYS)
        n = 0;
    if (n < 0 || (size_t)n == len)
        return;
    b = uv_buf_init(b.base + n, (unsigned)(len - (size_t)n));
    if (uv_write(&c->continue_req, (uv_stream_t *)&c->tcp, &b, 1,
                 on_continue_written) == 0)
        c->continuing = true;
}

static bool slice_ieq(kl_http_slice s, const char *lit)
{
    size_t n = strlen(lit);

    return s.len == n && strncasecmp(s.ptr, lit, n) == 0;
}

static int on_headers_complete(llhttp_t *p)
{
    kl_http_conn *c = p->data;
    const kl_http_config *cfg = &c->server->cfg;
    kl_http_slice expect;
    bool has_body;

    c->headers_done = true;
    /* Everything after the last head byte up to the first body byte is
     * framing, so the body may be laid down from here. */
    c->body_off = c->head_end;
    c->body_len = 0;

    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > cfg->max_body_bytes) {
        c->fail_status = 413;
        return -1;
    }
    has_body = (p->flags & F_CHUNKED) ||
               ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
    if (has_body && p->http_major == 1 && p->http_minor == 1 &&
        kl_http_conn_header(c, "Expect", &expect) == 1 &&
        slice_ieq(expect, "100-continue"))
        conn_send_continue(c);
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    kl_http_conn *c = p->data;
    char *dst;

    if (c->body_len + len > c->server->cfg.max_body_bytes)
        return conn_fail_in_parser(c, 413);
    /* Only chunk framing lies between dst and at, and llhttp is done with
     * it; for a Content-Length body dst == at. */
    dst = c->in.ptr + c->body_off + c->body_len;
    if (dst != at)
        memmove(dst, at, len);
    c->body_len += len;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    kl_http_conn *c = p->data;

    /* llhttp resets its flags when it resumes, so decide keep-alive now. */
    c->keep_alive = llhttp_should_keep_alive(p) && !llhttp_get_upgrade(p);
    c->http10 = p->http_major == 1 && p->http_minor == 0;
    c->req.start_ns = uv_hrtime();
    /* Stop right after this message: it is answered before the next one
     * (pipelining) is even parsed. */
    return HPE_PAUSED;
}

static const llhttp_settings_t kl_http_parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- requests --------------------------------------------------------- */

/* Splits the request target into path and query. Absolute-form targets
 * ("http://host/p?q", which servers must accept) lose scheme and host. */
static void request_split_url(kl_http_request *req, const char *u, size_t n)
{
    static const char root[] = "/";
    const char *end = u + n;
    const char *q;
    const char *hash;

    if (n > 0 && u[0] != '/') {
        const char *sep = n >= 3 ? memchr(u, ':', n) : NULL;
        if (sep != NULL && (size_t)(end - sep) >= 3 && sep[1] == '/' &&
            sep[2] == '/') {
            const char *a = sep + 3;
            while (a < end && *a != '/' && *a != '?' && *a != '#')
                a++;
            u = a;
        }
    }
    hash = memchr(u, '#', (size_t)(end - u));
    if (hash != NULL)
        end = hash;
    q = memchr(u, '?', (size_t)(end - u));
    req->path.ptr = u;
    req->path.len = (size_t)((q != NULL ? q : end) - u);
    if (req->path.len == 0) {
        /* "http://host" or "http://host?x": the path is "/" */
        req->path.ptr = root;
        req->path.len = 1;
    }
    if (q != NULL) {
        req->query.ptr = q + 1;
        req->query.len = (size_t)(end - q - 1);
    }
}

/* Fills c->req from what has been parsed; also used for the server's own
 * errors, where parts may be missing. */
static void request_fill(kl_http_conn *c, bool complete)
{
    kl_http_server *s = c->server;
    kl_http_request *req = &c->req;
    uint64_t start_ns = complete ? req->start_ns : uv_hrtime();

    memset(req, 0, sizeof(*req));
    req->conn = c;
    req->method = c->url.len > 0 ? (int)llhttp_get_method(&c->parser) : -1;
    if (c->url.len > 0)
        request_split_url(req, c->in.ptr + c->url.off, c->url.len);
    if (c->headers_done) {
        req->body.ptr = c->in.ptr + c->body_off;
        req->body.len = c->body_len;
    }
    req->route = "";
    req->route_index = -1;
    req->ctx = s->ctx;
    req->start_ns = start_ns;
    s->id_fn(req->request_id, s->ctx);
    req->request_id[sizeof(req->request_id) - 1] = '\0';
}

static void conn_dispatch(kl_http_conn *c)
{
    kl_http_server *s = c->server;
    kl_http_request *req = &c->req;
    const kl_http_route *route = NULL;
    char allow[128];
    char hdr[160];
    unsigned max_req = s->cfg.max_requests_per_conn;

    /* Reading stops only if the handler keeps the request (see the end of
     * conn_process): a synchronous answer then costs no epoll change. */
    conn_timer_set(c, KL_HTTP_TIMER_NONE, 0);
    c->close_after = !c->keep_alive || s->shutting_down ||
                     (max_req != 0 && c->nrequests + 1 >= max_req);
    request_fill(c, true);
    c->req_active = true;

    switch (kl_http_route_match(s->routes, req->method, req->path, &route,
                                req->params, &req->nparams, allow,
                                sizeof(allow))) {
    case KL_HTTP_ROUTE_FOUND:
        req->route = route->pattern;
        req->route_index = (int)(route - s->routes);
        route->handler(req);
        break;
    case KL_HTTP_ROUTE_BAD_METHOD:
        snprintf(hdr, sizeof(hdr), "Allow: %s\r\n", allow);
        (void)kl_http_respond_error(req, 405, "method_not_allowed",
                                    "method not allowed", NULL, hdr);
        break;
    case KL_HTTP_ROUTE_NOT_FOUND:
    default:
        (void)kl_http_respond_error(req, 404, "not_found", "no such route",
                                    NULL, NULL);
        break;
    }
}

/* Answers with an error of the server's own and closes after it. When an
 * answer is already owed or under way there is no room for another one in
 * the byte stream, so the connection just closes. */
static void conn_fail(kl_http_conn *c, int status, const char *code,
                      const char *message)
{
    if (c->req_active || c->writing || c->closing || c->lingering) {
        kl_http_conn_close(c);
        return;
    }
    conn_read_stop(c);
    conn_timer_set(c, KL_HTTP_TIMER_NONE, 0);
    c->close_after = true;
    request_fill(c, false);
    c->req_active = true;
    (void)kl_http_respond_error(&c->req, status, code, message, NULL, NULL);
}

/* A parse that stopped on an error: a limit our callbacks hit, or bytes
 * that are not HTTP (fail_status 0 or 400). The contract has no code of its
 * own for 431. */
static void conn_fail_parse(kl_http_conn *c)
{
    switch (c->fail_status) {
    case 413:
        conn_fail(c, 413, "payload_too_large", "request body too large");
        break;
    case 431:
        conn_fail(c, 431, "invalid_argument", "request headers too large");
        break;
    default:
        conn_fail(c, 400, "invalid_argument", "malformed HTTP request");
        break;
    }
}

/*
 * Feeds buffered bytes to llhttp until it needs more input or a request is
 * being answered. Re-entry (a handler answering synchronously from inside
 * dispatch) only marks progress; the outer call's loop carries on.
 */
static void conn_process(kl_http_conn *c)
{
    llhttp_errno_t err;

    if (c->in_process)
        return;
    c->in_process = true;
    while (!c->closing && !c->lingering && !c->req_active && !c->writing) {
        if (c->parse_pos == c->in.len) {
            conn_wait_for_data(c);
            break;
        }
        if (c->paused) {
            llhttp_resume(&c->parser);
            c->paused = false;
        }
        err = llhttp_execute(&c->parser, c->in.ptr + c->parse_pos,
                             c->in.len - c->parse_pos);
        if (err == HPE_OK) {
            /* llhttp took every byte. */
            c->parse_pos = c->in.len;
            if (c->headers_done) {
                /* In a body: drop trailing chunk framing so a chunked body
                 * costs buffer space only for its data. */
                c->in.len = c->parse_pos = c->body_off + c->body_len;
            } else if (c->in.len > c->server->cfg.max_header_bytes) {
                c->fail_status = 431;
                conn_fail_parse(c);
                break;
            }
            continue;
        }
        if (err == HPE_PAUSED || err == HPE_PAUSED_UPGRADE) {
            c->paused = true;
            c->parse_pos = (size_t)(llhttp_get_error_pos(&c->parser) - c->in.ptr);
            conn_dispatch(c);
            continue;
        }
        conn_fail_parse(c);
        break;
    }
    /* While a request is being answered, reading goes on only into the
     * room the buffer already has (a handler holds slices of it, so it must
     * not move): a client that does not read its answers cannot pile up
     * more than one buffer of requests. Not stopping and restarting the
     * read for every request saves two epoll_ctl calls per answer. */
    if (!c->closing && (c->req_active || c->writing) &&
        c->in.cap - c->in.len < KL_HTTP_READ_MIN)
        conn_read_stop(c);
    c->in_process = false;
}

/* ---- writing ---------------------------------------------------------- */

static void conn_on_sent(kl_http_conn *c)
{
    kl_http_server *s = c->server;
    size_t left;

    c->nrequests++;
    c->out.len = 0;
    if (c->close_after) {
        /* In a shutdown nobody waits for the linger, and a client too slow
         * to send its request gets no more of our time. */
        if (s->shutting_down || c->no_linger)
            kl_http_conn_close(c);
        else
            conn_linger(c);
        return;
    }
    conn_timer_set(c, KL_HTTP_TIMER_NONE, 0);
    /* Drop the answered message; keep what the client pipelined after it. */
    left = c->in.len - c->parse_pos;
    memmove(c->in.ptr, c->in.ptr + c->parse_pos, left);
    c->in.len = left;
    c->parse_pos = 0;
    conn_message_reset(c);
    buf_shrink(&c->in);
    buf_shrink(&c->out);
    conn_process(c);
}

static void on_write_done(uv_write_t *req, int status)
{
    kl_http_conn *c = KL_HTTP_CONTAINER_OF(req, kl_http_conn, write_req);

    c->writing = false;
    if (c->closing)
        return;
    if (status < 0) {
        kl_http_conn_close(c);
        return;
    }
    conn_on_sent(c);
}

static int conn_send(kl_http_conn *c)
{
    uv_buf_t b = uv_buf_init(c->out.ptr, (unsigned)c->out.len);
    int n;
    int rc;

    assert(c->out.len <= UINT32_MAX);
    n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (n == UV_EAGAIN || n == UV_ENOSYS)
        n = 0;
    if (n < 0) {
        kl_http_conn_close(c);
        return n;
    }
    if ((size_t)n == c->out.len) {
        conn_on_sent(c);
        return 0;
    }
    b = uv_buf_init(c->out.ptr + n, (unsigned)(c->out.len - (size_t)n));
    rc = uv_write(&c->write_req, (uv_stream_t *)&c->tcp, &b, 1, on_write_done);
    if (rc < 0) {
        kl_http_conn_close(c);
        return rc;
    }
    c->writing = true;
    conn_timer_set(c, KL_HTTP_TIMER_WRITE, c->server->cfg.request_timeout_ms);
    return 0;
}

int kl_http_conn_complete(kl_http_conn *c, int status, int build_rc)
{
    kl_http_server *s = c->server;

    c->req_active = false;
    if (s->observer != NULL)
        s->observer(&c->req, status, uv_hrtime() - c->req.start_ns, s->ctx);
    if (c->dead) {
        /* The peer is gone and both handles are closed: drop the answer. */
        conn_free(c);
        return UV_ECANCELED;
    }
    if (c->closing)
        return UV_ECANCELED; /* freed by the close callbacks */
    if (build_rc < 0) {
        kl_http_conn_close(c);
        return build_rc;
    }
    return conn_send(c);
}

/* ---- timers and accept ------------------------------------------------ */

static void on_timer(uv_timer_t *t)
{
    kl_http_conn *c = t->data;

    if (c->deadline == UINT64_MAX)
        return;                 /* the state it was armed for is over */
    if (uv_now(t->loop) < c->deadline) {
        timer_arm(c, c->deadline);  /* armed for an earlier deadline */
        return;
    }
    switch (c->timer_mode) {
    case KL_HTTP_TIMER_REQUEST:
        c->timer_mode = KL_HTTP_TIMER_NONE;
        c->no_linger = true;
        conn_fail(c, 408, "invalid_argument", "request timeout");
        break;
    case KL_HTTP_TIMER_IDLE:
    case KL_HTTP_TIMER_WRITE:
    case KL_HTTP_TIMER_LINGER:
        kl_http_conn_close(c);
        break;
    case KL_HTTP_TIMER_NONE:
    default:
        break;
    }
}

typedef struct kl_http_reject {
    uv_tcp_t tcp;
    kl_http_server *server;
} kl_http_reject;

static void on_reject_closed(uv_handle_t *h)
{
    kl_http_reject *r = KL_HTTP_CONTAINER_OF(h, kl_http_reject, tcp);
    kl_http_server *s = r->server;

    free(r);
    s->nrejects--;
    kl_http_server_check_closed(s);
}

/* Over the connection limit: accept (else libuv stops watching the
 * listener until someone does) and close at once. */
static void conn_reject(kl_http_server *s)
{
    kl_http_reject *r = malloc(sizeof(*r));

    if (r == NULL) {
        fprintf(stderr, "http: out of memory rejecting a connection\n");
        return;
    }
    r->server = s;
    if (uv_tcp_init(s->loop, &r->tcp) < 0) {
        free(r);
        return;
    }
    (void)uv_accept((uv_stream_t *)&s->listener, (uv_stream_t *)&r->tcp);
    s->nrejects++;
    uv_close((uv_handle_t *)&r->tcp, on_reject_closed);
}

static void conn_peer_name(kl_http_conn *c)
{
    struct sockaddr_storage ss;
    int len = (int)sizeof(ss);

    c->peer[0] = '\0';
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) < 0)
        return;
    if (ss.ss_family == AF_INET)
        (void)uv_ip4_name((struct sockaddr_in *)&ss, c->peer, sizeof(c->peer));
    else if (ss.ss_family == AF_INET6)
        (void)uv_ip6_name((struct sockaddr_in6 *)&ss, c->peer, sizeof(c->peer));
}

void kl_http_conn_accept(kl_http_server *s)
{
    kl_http_conn *c;
    int rc;

    if (s->shutting_down || s->nconns >= s->cfg.max_connections) {
        conn_reject(s);
        return;
    }
    c = calloc(1, sizeof(*c) + KL_HTTP_IN_INLINE + KL_HTTP_OUT_INLINE);
    if (c == NULL) {
        conn_reject(s);
        return;
    }
    c->server = s;
    c->in.ptr = c->in.inline_ptr = c->store;
    c->in.cap = c->in.inline_cap = KL_HTTP_IN_INLINE;
    c->out.ptr = c->out.inline_ptr = c->store + KL_HTTP_IN_INLINE;
    c->out.cap = c->out.inline_cap = KL_HTTP_OUT_INLINE;

    rc = uv_tcp_init(s->loop, &c->tcp);
    if (rc < 0) {
        free(c);
        conn_reject(s);
        return;
    }
    c->tcp.data = c;
    c->open_handles = 1;
    c->next = s->conns;
    if (s->conns != NULL)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;

    rc = uv_timer_init(s->loop, &c->timer);
    if (rc < 0) {
        c->closing = true;
        uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
        return;
    }
    c->timer.data = c;
    c->open_handles = 2;
    rc = uv_accept((uv_stream_t *)&s->listener, (uv_stream_t *)&c->tcp);
    if (rc < 0) {
        kl_http_conn_close(c);
        return;
    }
    conn_peer_name(c);
    /* Answers are written whole; Nagle would only delay them. */
    (void)uv_tcp_nodelay(&c->tcp, 1);
    llhttp_init(&c->parser, HTTP_REQUEST, &kl_http_parser_settings);
    c->parser.data = c;
    conn_process(c);
}
