/*
 * Service accounts (API.md §4 "Service accounts"): non-human principals
 * with their own role (manager or member) and keys. A name is immutable and
 * taken forever, even after the account is deleted, so an old key's audit
 * trail can never point at a different account. Deleting an account is one
 * command: the account, each of its keys revoked, each computer it owns and
 * each session it created deleted, written as one all-or-nothing group.
 */
#include "daemon.h"

#include <string.h>

enum { SA_NAME_MIN = 2, SA_NAME_MAX = 63, DESCRIPTION_MAX_CHARS = 1024 };

typedef struct sa_input {
    kl_str name, description;
    bool has_description;
    kl_role role;               /* KL_ROLE_NONE: not given */
    int active;                 /* -1 not given, else 0/1 */
} sa_input;

/* ^[a-z0-9][a-z0-9-]{1,62}$ */
static bool name_ok(kl_str s)
{
    if (s.len < SA_NAME_MIN || s.len > SA_NAME_MAX || s.ptr[0] == '-')
        return false;
    for (uint32_t i = 0; i < s.len; i++) {
        char ch = s.ptr[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-'))
            return false;
    }
    return true;
}

/* A live (not deleted) service account of the caller's org, or NULL
 * (answered 404). */
static kl_sa *org_sa(kl_daemon *d, kl_http_request *req, const kl_org *org,
                     const kl_id *id)
{
    kl_sa *s = kl_proj_sa(d->proj, id);
    if (s == NULL || s->org != org || s->deleted) {
        kl_api_error(req, 404, "not_found", "no such service account", NULL);
        return NULL;
    }
    return s;
}

/* role: manager or member. */
static int parse_role(kl_http_request *req, json_t *body, kl_role *out)
{
    kl_str r;
    int got = kl_api_get_str(req, body, "role", "role", 1, 16, &r);
    if (got <= 0)
        return got;
    *out = kl_role_parse(r.ptr, r.len);
    if (*out != KL_ROLE_MANAGER && *out != KL_ROLE_MEMBER) {
        kl_api_bad_arg(req, "role",
                       "a service account's role is manager or member");
        return -1;
    }
    return 1;
}

static int parse_description(kl_http_request *req, json_t *body, sa_input *in)
{
    int r = kl_api_get_str(req, body, "description", "description", 0,
                           DESCRIPTION_MAX_CHARS, &in->description);
    in->has_description = r > 0;
    return r < 0 ? -1 : 0;
}

static int render_sa(kl_daemon *d, kl_cmd *c, int status)
{
    kl_cmd_answer(d, c, status, kl_render_sa(kl_proj_sa(d->proj, &c->target)));
    return 0;
}
static int render_created(kl_daemon *d, kl_cmd *c) { return render_sa(d, c, 201); }
static int render_ok(kl_daemon *d, kl_cmd *c) { return render_sa(d, c, 200); }
static int render_none(kl_daemon *d, kl_cmd *c)
{
    kl_cmd_answer(d, c, 204, NULL);
    return 0;
}

/* ---- create ----------------------------------------------------------- */

static int decide_create(kl_daemon *d, kl_cmd *c)
{
    sa_input *in = c->data;
    if (kl_proj_sa_by_name(c->caller.org, in->name.ptr, in->name.len) != NULL) {
        kl_api_error(c->req, 409, "conflict",
                     "this service account name is taken (names are never reused)",
                     "name");
        return -1;
    }
    kl_event ev = {.type = KL_EV_SA_CREATED,
                   .has = KL_F_ID | KL_F_NAME | KL_F_ROLE | KL_F_DESCRIPTION,
                   .name = in->name, .role = in->role,
                   .description = in->has_description ? in->description
                                                      : (kl_str){"", 0}};
    return kl_api_emit_new(d, c, &ev);
}

static const char *const CREATE_FIELDS[] = {"name", "description", "role", NULL};

void kl_h_sa_create(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_cmd *c = kl_api_write_cmd(d, req, KL_ID_KIND_COUNT, CREATE_FIELDS,
                                 sizeof(sa_input));
    if (c == NULL)
        return;
    json_t *body = c->body;
    sa_input *in = c->data;
    int r = kl_api_get_str(req, body, "name", "name", 1, SA_NAME_MAX, &in->name);
    if (r == 0) {
        kl_api_bad_arg(req, "name", "name is required");
        r = -1;
    } else if (r > 0 && !name_ok(in->name)) {
        kl_api_bad_arg(req, "name", "name must match ^[a-z0-9][a-z0-9-]{1,62}$");
        r = -1;
    }
    if (r < 0 || parse_description(req, body, in) != 0 ||
        parse_role(req, body, &in->role) < 0) {
        kl_cmd_free(c);
        return;
    }
    if (in->role == KL_ROLE_NONE)
        in->role = KL_ROLE_MANAGER;
    kl_cmd_lock(c, &c->caller.org->id);   /* names are unique in the org */
    c->decide = decide_create;
    c->render = render_created;
    kl_cmd_submit(d, c);
}

/* ---- list and get ----------------------------------------------------- */

void kl_h_sa_list(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_page pg;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_page(req, KL_ID_SA, &pg) != 0)
        return;
    const kl_vec *sas = &caller.org->sas;
    json_t *items = json_array();
    const kl_id *last = NULL;
    bool more = false;
    uint32_t n = 0;
    for (uint32_t i = kl_vec_after(sas, pg.has_cursor ? &pg.cursor : NULL);
         i < sas->len; i++) {
        const kl_sa *s = sas->items[i];
        if (s->deleted)
            continue;
        if (n == pg.limit) {
            more = true;
            break;
        }
        json_array_append_new(items, kl_render_sa(s));
        last = &s->id;
        n++;
    }
    kl_api_json(req, 200, kl_api_page_body("service_accounts", items, KL_ID_SA,
                                           last, more), NULL);
}

void kl_h_sa_get(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id id;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_SA, &id) != 0)
        return;
    const kl_sa *s = org_sa(d, req, caller.org, &id);
    if (s != NULL)
        kl_api_json(req, 200, kl_render_sa(s), NULL);
}

/* ---- update ----------------------------------------------------------- */

static kl_sa *decide_sa(kl_daemon *d, kl_cmd *c)
{
    kl_sa *s = org_sa(d, c->req, c->caller.org, &c->target);
    if (s == NULL || kl_api_if_match(c->req, s->version) != 0)
        return NULL;
    return s;
}

static int decide_update(kl_daemon *d, kl_cmd *c)
{
    kl_sa *s = decide_sa(d, c);
    if (s == NULL)
        return -1;
    sa_input *in = c->data;
    kl_event ev = {.type = KL_EV_SA_UPDATED, .has = KL_F_ID, .id = s->id};
    if (in->has_description && (strlen(s->description) != in->description.len ||
                                memcmp(s->description, in->description.ptr,
                                       in->description.len) != 0)) {
        ev.has |= KL_F_DESCRIPTION;
        ev.description = in->description;
    }
    if (in->role != KL_ROLE_NONE && in->role != s->role) {
        ev.has |= KL_F_ROLE;
        ev.role = in->role;
    }
    if (ev.has != KL_F_ID && kl_api_emit(d, c, &ev) != 0)
        return -1;
    if (in->active >= 0 && (bool)in->active != s->active) {
        kl_event act = {.type = in->active ? KL_EV_SA_REACTIVATED : KL_EV_SA_DEACTIVATED,
                        .has = KL_F_ID, .id = s->id};
        return kl_api_emit(d, c, &act);
    }
    return 0;
}

static const char *const UPDATE_FIELDS[] = {"name", "description", "is_active",
                                            "role", NULL};

void kl_h_sa_update(kl_http_request *req)
{
    kl_cmd *c = kl_api_write_cmd(req->ctx, req, KL_ID_SA, UPDATE_FIELDS,
                                 sizeof(sa_input));
    if (c == NULL)
        return;
    sa_input *in = c->data;
    in->active = -1;
    json_t *active = json_object_get(c->body, "is_active");
    int r = 0;
    if (json_object_get(c->body, "name") != NULL) {
        kl_api_bad_arg(req, "name", "a service account's name cannot be changed; "
                       "create a new service account instead");
        r = -1;
    } else if (active != NULL && !json_is_boolean(active)) {
        kl_api_bad_arg(req, "is_active", "is_active must be true or false");
        r = -1;
    } else if (active != NULL) {
        in->active = json_is_true(active);
    }
    if (r < 0 || parse_description(req, c->body, in) != 0 ||
        parse_role(req, c->body, &in->role) < 0) {
        kl_cmd_free(c);
        return;
    }
    c->decide = decide_update;
    c->render = render_ok;
    kl_cmd_submit(req->ctx, c);
}

/* ---- delete ----------------------------------------------------------- */

static int decide_delete(kl_daemon *d, kl_cmd *c)
{
    kl_sa *s = decide_sa(d, c);
    if (s == NULL)
        return -1;
    const kl_org *o = s->org;
    /* The account first: it names the request (Idempotency-Key replays). */
    kl_event ev = {.type = KL_EV_SA_DELETED, .has = KL_F_ID, .id = s->id};
    if (kl_api_emit(d, c, &ev) != 0)
        return -1;
    for (uint32_t i = 0; i < o->keys.len; i++) {
        const kl_key *k = o->keys.items[i];
        if (k->owner_type != KL_PRINCIPAL_SA || !kl_id_eq(kl_key_owner_id(k), &s->id) ||
            k->revoked)
            continue;
        kl_event rev = {.type = KL_EV_KEY_REVOKED, .has = KL_F_ID | KL_F_COMMENT,
                        .id = k->id, .comment = {"service account deleted", 23}};
        if (kl_api_emit(d, c, &rev) != 0)
            return -1;
    }
    for (uint32_t i = 0; i < o->computers.len; i++) {
        const kl_computer *m = o->computers.items[i];
        if (m->deleted || m->owner.type != KL_PRINCIPAL_SA ||
            !kl_id_eq(&m->owner.id, &s->id))
            continue;
        kl_event del = {.type = KL_EV_COMPUTER_DELETED, .has = KL_F_ID, .id = m->id};
        if (kl_api_emit(d, c, &del) != 0)
            return -1;
    }
    for (uint32_t i = 0; i < o->sessions.len; i++) {
        const kl_session *x = o->sessions.items[i];
        if (x->deleted || x->created_by.type != KL_PRINCIPAL_SA ||
            !kl_id_eq(&x->created_by.id, &s->id))
            continue;
        kl_event del = {.type = KL_EV_SESSION_DELETED, .has = KL_F_ID, .id = x->id};
        if (kl_api_emit(d, c, &del) != 0)
            return -1;
    }
    return 0;
}

static const char *const NO_FIELDS[] = {NULL};

void kl_h_sa_delete(kl_http_request *req)
{
    kl_cmd *c = kl_api_write_cmd(req->ctx, req, KL_ID_SA, NO_FIELDS, sizeof(sa_input));
    if (c == NULL)
        return;
    c->decide = decide_delete;
    c->render = render_none;
    kl_cmd_submit(req->ctx, c);
}

/* ---- its keys --------------------------------------------------------- */

void kl_h_sa_keys_create(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id id;
    if (kl_api_auth(d, req, KL_NEED_WRITE, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_SA, &id) != 0 ||
        org_sa(d, req, caller.org, &id) == NULL)
        return;
    kl_ref owner = {KL_PRINCIPAL_SA, id};
    kl_keys_create_for(d, req, &caller, &owner);
}

void kl_h_sa_keys_list(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id id;
    kl_page pg;
    bool include_revoked = false;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_SA, &id) != 0 ||
        org_sa(d, req, caller.org, &id) == NULL ||
        kl_api_page(req, KL_ID_KEY, &pg) != 0 ||
        kl_api_query_bool(req, "include_revoked", &include_revoked) != 0)
        return;
    kl_ref owner = {KL_PRINCIPAL_SA, id};
    kl_daemon_list_keys(d, req, caller.org, &pg, include_revoked, &owner);
}
