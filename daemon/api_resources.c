/*
 * Owned resources from the Factory public API (API.md §4 "Owned
 * resources"): computers and sessions with their messages. keyledger keeps
 * the record of them (who owns and created each, what happened when), not
 * the machines: a restart completes at once.
 *
 * Every command locks, shared, the principals its events depend on (the
 * owner, the caller, the session's creator), so that deleting a service
 * account, which deletes what it owns, never interleaves with them.
 */
#include "daemon.h"

#include <string.h>

enum { NAME_MAX_CHARS = 128, TITLE_MAX_CHARS = 256, CONTENT_MAX_CHARS = 16384 };

typedef struct res_input {
    kl_str name, title, content;
    bool has_title;
    kl_ref owner;
    kl_id computer;             /* zero: none */
    kl_id session;
    kl_author author;
} res_input;

static int render_none(kl_daemon *d, kl_cmd *c)
{
    kl_cmd_answer(d, c, 204, NULL);
    return 0;
}

/* One page of the entities of `v` (each starts with its id) that `skip`
 * does not leave out. */
typedef json_t *(*render_fn)(const void *entity);
typedef bool (*skip_fn)(const void *entity);

static void list_page(kl_http_request *req, const kl_vec *v, const kl_page *pg,
                      skip_fn skip, render_fn render, const char *name,
                      kl_id_kind kind)
{
    json_t *items = json_array();
    const kl_id *last = NULL;
    bool more = false;
    uint32_t n = 0;
    for (uint32_t i = kl_vec_after(v, pg->has_cursor ? &pg->cursor : NULL);
         i < v->len; i++) {
        if (skip != NULL && skip(v->items[i]))
            continue;
        if (n == pg->limit) {
            more = true;
            break;
        }
        json_array_append_new(items, render(v->items[i]));
        last = v->items[i];
        n++;
    }
    kl_api_json(req, 200, kl_api_page_body(name, items, kind, last, more), NULL);
}

/* ---- computers -------------------------------------------------------- */

/* The computer in the caller's org (deleted ones too), or NULL (404). */
static kl_computer *org_computer(kl_daemon *d, kl_http_request *req,
                                 const kl_org *org, const kl_id *id)
{
    kl_computer *m = kl_proj_computer(d->proj, id);
    if (m == NULL || m->org != org) {
        kl_api_error(req, 404, "not_found", "no such computer", NULL);
        return NULL;
    }
    return m;
}

static int render_computer(kl_daemon *d, kl_cmd *c, int status)
{
    kl_cmd_answer(d, c, status,
                  kl_render_computer(kl_proj_computer(d->proj, &c->target)));
    return 0;
}
static int render_computer_created(kl_daemon *d, kl_cmd *c)
{
    return render_computer(d, c, 201);
}
static int render_computer_ok(kl_daemon *d, kl_cmd *c)
{
    return render_computer(d, c, 200);
}

static int decide_computer_create(kl_daemon *d, kl_cmd *c)
{
    res_input *in = c->data;
    if (in->owner.type == KL_PRINCIPAL_SA) {
        const kl_sa *s = kl_proj_sa(d->proj, &in->owner.id);
        if (s == NULL || s->org != c->caller.org || s->deleted) {
            kl_api_error(c->req, 404, "not_found", "no such service account", "owner");
            return -1;
        }
        if (!s->active) {
            kl_api_error(c->req, 409, "conflict", "the service account is deactivated",
                         "owner");
            return -1;
        }
    }
    kl_event ev = {.type = KL_EV_COMPUTER_CREATED,
                   .has = KL_F_ID | KL_F_NAME | KL_F_OWNER, .name = in->name,
                   .owner_type = in->owner.type, .owner = in->owner.id};
    return kl_api_emit_new(d, c, &ev);
}

static const char *const COMPUTER_FIELDS[] = {"name", "owner", NULL};

void kl_h_computers_create(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_cmd *c = kl_api_write_cmd(d, req, KL_ID_KIND_COUNT, COMPUTER_FIELDS,
                                 sizeof(res_input));
    if (c == NULL)
        return;
    json_t *body = c->body;
    res_input *in = c->data;
    kl_str owner;
    int r = kl_api_get_str(req, body, "name", "name", 1, NAME_MAX_CHARS, &in->name);
    if (r == 0) {
        kl_api_bad_arg(req, "name", "name is required");
        r = -1;
    }
    if (r > 0)
        r = kl_api_get_str(req, body, "owner", "owner", 1, KL_ID_TEXT_MAX, &owner);
    if (r > 0) {
        in->owner.type = KL_PRINCIPAL_SA;
        if (kl_id_parse(KL_ID_SA, owner.ptr, owner.len, &in->owner.id) != KL_OK) {
            kl_api_bad_arg(req, "owner", "owner must be a service account id (sa_...)");
            r = -1;
        }
    } else if (r == 0) {
        in->owner = c->caller.principal;
    }
    if (r < 0) {
        kl_cmd_free(c);
        return;
    }
    kl_cmd_lock_shared(c, &in->owner.id);
    kl_cmd_lock_shared(c, &c->caller.principal.id);
    c->decide = decide_computer_create;
    c->render = render_computer_created;
    kl_cmd_submit(d, c);
}

static bool computer_deleted(const void *e) { return ((const kl_computer *)e)->deleted; }
static json_t *computer_json(const void *e) { return kl_render_computer(e); }

void kl_h_computers_list(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_page pg;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_page(req, KL_ID_COMPUTER, &pg) != 0)
        return;
    list_page(req, &caller.org->computers, &pg, computer_deleted, computer_json,
              "computers", KL_ID_COMPUTER);
}

void kl_h_computers_get(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id id;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_COMPUTER, &id) != 0)
        return;
    const kl_computer *m = org_computer(d, req, caller.org, &id);
    if (m != NULL)
        kl_api_json(req, 200, kl_render_computer(m), NULL);
}

/* Restart and delete: the computer must be there and not deleted. */
static int decide_computer_change(kl_daemon *d, kl_cmd *c, kl_event_type type)
{
    kl_computer *m = org_computer(d, c->req, c->caller.org, &c->target);
    if (m == NULL || kl_api_if_match(c->req, m->version) != 0)
        return -1;
    if (m->deleted) {
        kl_api_error(c->req, 409, "conflict", "the computer was deleted", NULL);
        return -1;
    }
    kl_event ev = {.type = type, .has = KL_F_ID, .id = m->id};
    return kl_api_emit(d, c, &ev);
}
static int decide_restart(kl_daemon *d, kl_cmd *c)
{
    return decide_computer_change(d, c, KL_EV_COMPUTER_RESTARTED);
}
static int decide_computer_delete(kl_daemon *d, kl_cmd *c)
{
    return decide_computer_change(d, c, KL_EV_COMPUTER_DELETED);
}

static void computer_cmd(kl_http_request *req, kl_cmd_fn decide, kl_cmd_fn render)
{
    static const char *const no_fields[] = {NULL};
    kl_daemon *d = req->ctx;
    kl_cmd *c = kl_api_write_cmd(d, req, KL_ID_COMPUTER, no_fields, sizeof(res_input));
    if (c == NULL)
        return;
    const kl_computer *m = kl_proj_computer(d->proj, &c->target);
    if (m != NULL)
        kl_cmd_lock_shared(c, &m->owner.id);
    c->decide = decide;
    c->render = render;
    kl_cmd_submit(d, c);
}

void kl_h_computers_restart(kl_http_request *req)
{
    computer_cmd(req, decide_restart, render_computer_ok);
}

void kl_h_computers_delete(kl_http_request *req)
{
    computer_cmd(req, decide_computer_delete, render_none);
}

/* ---- sessions and messages -------------------------------------------- */

/* A live session of the caller's org, or NULL (404). */
static kl_session *org_session(kl_daemon *d, kl_http_request *req,
                               const kl_org *org, const kl_id *id)
{
    kl_session *s = kl_proj_session(d->proj, id);
    if (s == NULL || s->org != org || s->deleted) {
        kl_api_error(req, 404, "not_found", "no such session", NULL);
        return NULL;
    }
    return s;
}

static int render_session_created(kl_daemon *d, kl_cmd *c)
{
    kl_cmd_answer(d, c, 201, kl_render_session(kl_proj_session(d->proj, &c->target)));
    return 0;
}

static int decide_session_create(kl_daemon *d, kl_cmd *c)
{
    res_input *in = c->data;
    kl_event ev = {.type = KL_EV_SESSION_CREATED, .has = KL_F_ID};
    if (!kl_id_is_zero(&in->computer)) {
        const kl_computer *m = kl_proj_computer(d->proj, &in->computer);
        if (m == NULL || m->org != c->caller.org || m->deleted) {
            kl_api_error(c->req, 404, "not_found", "no such computer", "computer_id");
            return -1;
        }
        ev.has |= KL_F_REF;
        ev.ref = in->computer;
    }
    if (in->has_title) {
        ev.has |= KL_F_TITLE;
        ev.title = in->title;
    }
    return kl_api_emit_new(d, c, &ev);
}

static const char *const SESSION_FIELDS[] = {"title", "computer_id", NULL};

void kl_h_sessions_create(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_cmd *c = kl_api_write_cmd(d, req, KL_ID_KIND_COUNT, SESSION_FIELDS,
                                 sizeof(res_input));
    if (c == NULL)
        return;
    json_t *body = c->body;
    res_input *in = c->data;
    kl_str cid;
    int r = kl_api_get_str(req, body, "title", "title", 0, TITLE_MAX_CHARS, &in->title);
    in->has_title = r > 0;
    if (r >= 0)
        r = kl_api_get_str(req, body, "computer_id", "computer_id", 1,
                           KL_ID_TEXT_MAX, &cid);
    if (r > 0 && kl_id_parse(KL_ID_COMPUTER, cid.ptr, cid.len, &in->computer) != KL_OK) {
        kl_api_bad_arg(req, "computer_id", "computer_id must be a computer id (cmp_...)");
        r = -1;
    }
    if (r < 0) {
        kl_cmd_free(c);
        return;
    }
    if (!kl_id_is_zero(&in->computer))
        kl_cmd_lock_shared(c, &in->computer);
    kl_cmd_lock_shared(c, &c->caller.principal.id);
    c->decide = decide_session_create;
    c->render = render_session_created;
    kl_cmd_submit(d, c);
}

static bool session_deleted(const void *e) { return ((const kl_session *)e)->deleted; }
static json_t *session_json(const void *e) { return kl_render_session(e); }

void kl_h_sessions_list(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_page pg;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_page(req, KL_ID_SESSION, &pg) != 0)
        return;
    list_page(req, &caller.org->sessions, &pg, session_deleted, session_json,
              "sessions", KL_ID_SESSION);
}

void kl_h_sessions_get(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id id;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_SESSION, &id) != 0)
        return;
    const kl_session *s = org_session(d, req, caller.org, &id);
    if (s != NULL)
        kl_api_json(req, 200, kl_render_session(s), NULL);
}

static int render_message(kl_daemon *d, kl_cmd *c)
{
    kl_cmd_answer(d, c, 201, kl_render_message(kl_proj_message(d->proj, &c->target)));
    return 0;
}

static int decide_message(kl_daemon *d, kl_cmd *c)
{
    res_input *in = c->data;
    const kl_session *s = org_session(d, c->req, c->caller.org, &in->session);
    if (s == NULL)
        return -1;
    kl_event ev = {.type = KL_EV_MESSAGE_POSTED,
                   .has = KL_F_ID | KL_F_REF | KL_F_AUTHOR | KL_F_CONTENT,
                   .ref = s->id, .author = in->author, .content = in->content};
    return kl_api_emit_new(d, c, &ev);
}

static const char *const MESSAGE_FIELDS[] = {"role", "content", NULL};

void kl_h_messages_post(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id sid;
    json_t *body;
    if (kl_api_auth(d, req, KL_NEED_WRITE, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_SESSION, &sid) != 0)
        return;
    const kl_session *s = org_session(d, req, caller.org, &sid);
    if (s == NULL || kl_api_body(req, MESSAGE_FIELDS, &body) != 0)
        return;
    kl_cmd *c = kl_api_cmd(d, req, &caller, body, sizeof(res_input));
    if (c == NULL)
        return;
    res_input *in = c->data;
    in->session = sid;
    kl_str role;
    int r = kl_api_get_str(req, body, "role", "role", 1, 16, &role);
    if (r > 0)
        in->author = kl_author_parse(role.ptr, role.len);
    if (r >= 0 && in->author == KL_AUTHOR_NONE) {
        kl_api_bad_arg(req, "role", "role must be user or assistant");
        r = -1;
    }
    if (r > 0)
        r = kl_api_get_str(req, body, "content", "content", 1, CONTENT_MAX_CHARS,
                           &in->content);
    if (r == 0) {
        kl_api_bad_arg(req, "content", "content is required");
        r = -1;
    }
    if (r < 0) {
        kl_cmd_free(c);
        return;
    }
    kl_cmd_lock_shared(c, &sid);
    kl_cmd_lock_shared(c, &s->created_by.id);
    c->decide = decide_message;
    c->render = render_message;
    kl_cmd_submit(d, c);
}

static json_t *message_json(const void *e) { return kl_render_message(e); }

void kl_h_messages_list(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id sid;
    kl_page pg;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_SESSION, &sid) != 0)
        return;
    const kl_session *s = org_session(d, req, caller.org, &sid);
    if (s == NULL || kl_api_page(req, KL_ID_MESSAGE, &pg) != 0)
        return;
    list_page(req, &s->messages, &pg, NULL, message_json, "messages", KL_ID_MESSAGE);
}
