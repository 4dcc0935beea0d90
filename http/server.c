/*
 * http/server.c — the listening socket and the server's lifecycle: create,
 * listen, accept (handed to conn.c), graceful shutdown and free.
 *
 * Shutdown order: the listener closes at once; connections with nothing in
 * flight close at once (a partly received request is dropped); a connection
 * whose handler still owns a request answers it with "Connection: close" and
 * closes after the write. on_closed runs when the last connection has been
 * freed, which for a request the handler still holds is only after its
 * respond call, so the server outlives every request it handed out.
 */
#include <assert.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

void kl_http_config_defaults(kl_http_config *cfg)
{
    cfg->max_header_bytes = 16384;
    cfg->max_body_bytes = 1024 * 1024;
    cfg->max_connections = 4096;
    cfg->idle_timeout_ms = 60000;
    cfg->request_timeout_ms = 10000;
    cfg->max_requests_per_conn = 1000;
}

static int config_check(const kl_http_config *cfg)
{
    /* Spans are 32-bit offsets into the read buffer. */
    const size_t span_max = (size_t)UINT32_MAX / 4;

    if (cfg->max_header_bytes < 64 || cfg->max_header_bytes > span_max)
        return UV_EINVAL;
    if (cfg->max_body_bytes > span_max)
        return UV_EINVAL;
    if (cfg->max_connections == 0)
        return UV_EINVAL;
    return 0;
}

/*
 * A write to a peer that has reset raises SIGPIPE, whose default action kills
 * the process; libuv writes with plain write(2), so the only cure is the
 * disposition. Left alone if the program already chose one.
 */
static int sigpipe_ignore(void)
{
    struct sigaction old;
    struct sigaction ign;

    if (sigaction(SIGPIPE, NULL, &old) < 0)
        return UV_EINVAL;
    if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == SIG_DFL) {
        memset(&ign, 0, sizeof(ign));
        ign.sa_handler = SIG_IGN;
        sigemptyset(&ign.sa_mask);
        if (sigaction(SIGPIPE, &ign, NULL) < 0)
            return UV_EINVAL;
    }
    return 0;
}

int kl_http_server_new(kl_http_server **out, uv_loop_t *loop,
                       const kl_http_config *cfg, const kl_http_route *routes,
                       kl_http_id_fn id_fn, void *ctx)
{
    kl_http_server *s = NULL;
    int rc;

    *out = NULL;
    if (loop == NULL || routes == NULL || id_fn == NULL)
        return UV_EINVAL;

    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return UV_ENOMEM;
    if (cfg != NULL)
        s->cfg = *cfg;
    else
        kl_http_config_defaults(&s->cfg);
    rc = config_check(&s->cfg);
    if (rc < 0)
        goto cleanup;
    rc = sigpipe_ignore();
    if (rc < 0)
        goto cleanup;

    s->loop = loop;
    s->routes = routes;
    s->id_fn = id_fn;
    s->ctx = ctx;
    /* A message's head and body plus one read of whatever follows it. */
    s->in_limit = s->cfg.max_header_bytes + s->cfg.max_body_bytes +
                  4 * (size_t)KL_HTTP_READ_MIN;

    rc = uv_tcp_init(loop, &s->listener);
    if (rc < 0)
        goto cleanup;
    s->listener.data = s;
    *out = s;
    return 0;

cleanup:
    free(s);
    return rc;
}

void kl_http_server_set_observer(kl_http_server *s, kl_http_observer fn)
{
    s->observer = fn;
}

static void on_connection(uv_stream_t *listener, int status)
{
    kl_http_server *s = listener->data;

    if (status < 0) {
        /* EMFILE and friends: the listener keeps going; nothing to accept. */
        fprintf(stderr, "http: accept failed: %s\n", uv_strerror(status));
        return;
    }
    kl_http_conn_accept(s);
}

/* Resolves host into *ss: numeric IPv4 or IPv6 first ("[::1]" allowed),
 * then a blocking getaddrinfo, which is fine once at startup. */
static int resolve(uv_loop_t *loop, const char *host, int port,
                   struct sockaddr_storage *ss)
{
    char name[256];
    size_t n = strlen(host);
    uv_getaddrinfo_t req;
    struct addrinfo hints;
    int rc;

    if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
        if (n - 2 >= sizeof(name))
            return UV_EINVAL;
        memcpy(name, host + 1, n - 2);
        name[n - 2] = '\0';
    } else {
        if (n >= sizeof(name))
            return UV_EINVAL;
        memcpy(name, host, n + 1);
    }

    memset(ss, 0, sizeof(*ss));
    if (uv_ip4_addr(name, port, (struct sockaddr_in *)ss) == 0)
        return 0;
    if (uv_ip6_addr(name, port, (struct sockaddr_in6 *)ss) == 0)
        return 0;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = uv_getaddrinfo(loop, &req, NULL, name, NULL, &hints);
    if (rc < 0)
        return rc;
    if (req.addrinfo == NULL || req.addrinfo->ai_addrlen > sizeof(*ss)) {
        rc = UV_EADDRNOTAVAIL;
        goto cleanup;
    }
    memcpy(ss, req.addrinfo->ai_addr, req.addrinfo->ai_addrlen);
    if (ss->ss_family == AF_INET)
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    else
        ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
    rc = 0;

cleanup:
    uv_freeaddrinfo(req.addrinfo);
    return rc;
}

int kl_http_server_listen(kl_http_server *s, const char *host, int port)
{
    struct sockaddr_storage ss;
    int len = (int)sizeof(ss);
    int rc;

    if (host == NULL || port < 0 || port > 65535)
        return UV_EINVAL;
    if (s->listening || s->shutting_down)
        return UV_EALREADY;
    rc = resolve(s->loop, host, port, &ss);
    if (rc < 0)
        return rc;
    rc = uv_tcp_bind(&s->listener, (const struct sockaddr *)&ss, 0);
    if (rc < 0)
        return rc;
    rc = uv_listen((uv_stream_t *)&s->listener, KL_HTTP_BACKLOG, on_connection);
    if (rc < 0)
        return rc;
    s->listening = true;

    rc = uv_tcp_getsockname(&s->listener, (struct sockaddr *)&ss, &len);
    if (rc < 0)
        return rc;
    if (ss.ss_family == AF_INET)
        s->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    else
        s->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return 0;
}

int kl_http_server_port(const kl_http_server *s)
{
    return s->port;
}

unsigned kl_http_server_connections(const kl_http_server *s)
{
    return s->nconns;
}

static void on_listener_closed(uv_handle_t *h)
{
    kl_http_server *s = h->data;

    s->listener_closed = true;
    kl_http_server_check_closed(s);
}

void kl_http_server_check_closed(kl_http_server *s)
{
    if (!s->shutting_down || !s->listener_closed || s->conns != NULL ||
        s->nrejects != 0 || s->closed_notified)
        return;
    s->closed_notified = true;
    /* Last thing we do: on_closed may free the server. */
    if (s->on_closed != NULL)
        s->on_closed(s->on_closed_arg);
}

void kl_http_server_shutdown(kl_http_server *s, void (*on_closed)(void *arg),
                             void *arg)
{
    kl_http_conn *c;
    kl_http_conn *next;

    if (s->shutting_down)
        return;
    s->shutting_down = true;
    s->on_closed = on_closed;
    s->on_closed_arg = arg;
    uv_close((uv_handle_t *)&s->listener, on_listener_closed);

    /* kl_http_conn_close only starts closing (frees come in close
     * callbacks), so the list stays intact while we walk it. */
    for (c = s->conns; c != NULL; c = next) {
        next = c->next;
        if (c->closing)
            continue;
        if (c->req_active || c->writing)
            c->close_after = true;
        else
            kl_http_conn_close(c);
    }
}

void kl_http_server_free(kl_http_server *s)
{
    if (s == NULL)
        return;
    /* With handles still open the loop would point into freed memory, so a
     * premature free leaks instead; the caller must wait for on_closed. */
    assert(s->closed_notified);
    if (!s->closed_notified) {
        fprintf(stderr, "http: server freed before shutdown completed\n");
        return;
    }
    free(s);
}
