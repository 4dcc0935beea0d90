/*
 * http/internal.h — private to http/: the server and connection structs and
 * the few functions the module's files share. Nothing outside http/ may
 * include it; the public surface is http.h.
 */
#ifndef KL_HTTP_INTERNAL_H
#define KL_HTTP_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <llhttp.h>
#include <uv.h>

#include "http.h"

#define KL_HTTP_CONTAINER_OF(ptr, type, member) \
    ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

enum {
    KL_HTTP_MAX_HEADERS = 64,      /* one more is 431 */
    KL_HTTP_IN_INLINE = 8192,      /* read buffer inside the connection */
    KL_HTTP_OUT_INLINE = 2048,     /* response buffer inside the connection */
    KL_HTTP_BUF_RETAIN = 65536,    /* bigger heap buffers are freed between requests */
    KL_HTTP_READ_MIN = 4096,       /* grow the read buffer below this much room */
    KL_HTTP_LINGER_MS = 2000,      /* after a closing answer, wait for the peer's FIN */
    KL_HTTP_BACKLOG = 511,
    KL_HTTP_PEER_LEN = 46          /* INET6_ADDRSTRLEN */
};

/*
 * A byte buffer that starts in storage inside the connection allocation and
 * moves to the heap only when a message or an answer does not fit.
 */
typedef struct kl_http_buf {
    char *ptr;         /* inline_ptr or a heap block */
    size_t len;        /* bytes in use */
    size_t cap;        /* bytes available at ptr */
    char *inline_ptr;  /* fixed storage inside the connection */
    size_t inline_cap;
} kl_http_buf;

/* An offset range in the read buffer: the buffer may move while a message
 * is still arriving, so slices become pointers only at dispatch. */
typedef struct kl_http_span {
    uint32_t off;
    uint32_t len;
} kl_http_span;

typedef struct kl_http_header_span {
    kl_http_span name;
    kl_http_span value;
} kl_http_header_span;

typedef enum {
    KL_HTTP_TIMER_NONE = 0,
    KL_HTTP_TIMER_IDLE,     /* keep-alive, no byte of a next request yet */
    KL_HTTP_TIMER_REQUEST,  /* armed at a request's first byte, never extended */
    KL_HTTP_TIMER_WRITE,    /* the answer is not draining */
    KL_HTTP_TIMER_LINGER    /* FIN sent, waiting for the peer's */
} kl_http_timer_mode;

typedef enum {
    KL_HTTP_HDR_NONE = 0,
    KL_HTTP_HDR_FIELD,
    KL_HTTP_HDR_VALUE
} kl_http_hdr_state;

struct kl_http_conn {
    uv_tcp_t tcp;                /* the socket; data = this */
    uv_timer_t timer;            /* fires at or before `deadline`; data = this */
    uv_write_t write_req;        /* the rest of an answer uv_try_write left */
    uv_write_t continue_req;     /* the rest of an interim "100 Continue" */
    uv_shutdown_t shutdown_req;  /* FIN before a lingering close */
    llhttp_t parser;             /* data = this */
    kl_http_server *server;      /* borrowed */
    kl_http_conn *prev;          /* the server's list of connections */
    kl_http_conn *next;
    kl_http_request req;         /* the message being answered */

    kl_http_buf in;              /* bytes read; the current message starts at 0 */
    kl_http_buf out;             /* the answer being written */
    size_t parse_pos;            /* in.ptr[0..parse_pos) went through llhttp */

    kl_http_span url;
    kl_http_header_span headers[KL_HTTP_MAX_HEADERS];
    unsigned nheaders;
    kl_http_hdr_state hdr_state; /* which header span llhttp is extending */
    size_t head_end;             /* end of the last URL/header byte seen */
    size_t body_off;             /* the body, compacted over chunk framing */
    size_t body_len;
    int fail_status;             /* 413 or 431 decided inside a callback */

    unsigned nrequests;          /* answers fully written */
    int open_handles;            /* tcp + timer until their close callbacks */
    kl_http_timer_mode timer_mode;
    uint64_t deadline;           /* loop time (ms) the current state ends */

    bool headers_done;           /* later header callbacks are trailers */
    bool keep_alive;             /* llhttp's verdict on the finished message */
    bool http10;
    bool reading;                /* uv_read_start is in effect */
    bool paused;                 /* llhttp stopped at a message end */
    bool req_active;             /* a handler owns req until it responds */
    bool writing;                /* write_req is in flight */
    bool continuing;             /* continue_req is in flight */
    bool in_process;             /* conn_process is on the stack */
    bool close_after;            /* this answer is the connection's last */
    bool lingering;              /* FIN sent, discarding input */
    bool no_linger;             /* close at once after the answer (timeouts) */
    bool closing;                /* uv_close called on both handles */
    bool dead;                   /* handles closed, waiting for respond to free */

    char peer[KL_HTTP_PEER_LEN]; /* the peer's address as text */
    char store[];                /* in's inline storage, then out's */
};

struct kl_http_server {
    uv_loop_t *loop;             /* borrowed */
    uv_tcp_t listener;           /* data = this */
    kl_http_config cfg;
    size_t in_limit;             /* the most a read buffer may grow to */
    const kl_http_route *routes; /* borrowed */
    kl_http_id_fn id_fn;
    void *ctx;                   /* borrowed, handed to handlers and id_fn */
    kl_http_observer observer;
    kl_http_conn *conns;         /* every connection not yet freed */
    unsigned nconns;
    unsigned nrejects;           /* over-limit sockets still closing */
    int port;
    bool listening;
    bool shutting_down;
    bool listener_closed;
    bool closed_notified;
    void (*on_closed)(void *arg);
    void *on_closed_arg;
};

/* conn.c */
void kl_http_conn_accept(kl_http_server *s);
/* Close now: no answer, no linger (shutdown of an idle connection). */
void kl_http_conn_close(kl_http_conn *c);
/* Ends the active request after respond built its answer in c->out
 * (build_rc < 0 when that failed): observe, then write or drop. */
int kl_http_conn_complete(kl_http_conn *c, int status, int build_rc);
int kl_http_buf_reserve(kl_http_buf *b, size_t need, size_t limit);

/* server.c */
/* Runs on_closed once the listener and every connection are gone. */
void kl_http_server_check_closed(kl_http_server *s);

/* respond.c */
/* Writes status line, headers and body into c->out. */
int kl_http_response_build(kl_http_conn *c, int status,
                           const char *content_type, const char *headers,
                           const char *body, size_t body_len);

/* request.c */
/* Header lookup on the connection's parsed spans, usable before dispatch. */
int kl_http_conn_header(const kl_http_conn *c, const char *name,
                        kl_http_slice *out);

#endif
