/*
 * The organization's users and its usage limits (API.md §4 "Organization
 * and users"): invite, list, get, change name and role, remove; keys minted
 * for a user; GET/PUT /v1/org/usage-limits.
 *
 * The role rules of API.md §3 are checked in decide, against the state the
 * write will change: only an owner grants or takes `owner` or removes an
 * owner, and the last active owner stays. Commands that read an org-wide
 * fact (how many owners, whether an email is taken) lock the org, so two of
 * them never decide on the same stale count.
 */
#include "daemon.h"

#include <stdio.h>
#include <string.h>

enum { EMAIL_MAX_CHARS = 254, NAME_MAX_CHARS = 128, LIMIT_MAX = 1000000000 };

typedef struct user_input {
    kl_str email, name;
    bool has_name;
    kl_role role;               /* KL_ROLE_NONE: not given */
    uint32_t lim[3];            /* usage limits: minute, day, month */
} user_input;

/* The user in the caller's org, or NULL (answered 404). */
static kl_user *org_user(kl_daemon *d, kl_http_request *req, const kl_caller *c,
                         const kl_id *id)
{
    kl_user *u = kl_proj_user(d->proj, id);
    if (u == NULL || u->org != c->org) {
        kl_api_error(req, 404, "not_found", "no such user", NULL);
        return NULL;
    }
    return u;
}

/* Plausible, not RFC 5322: one @, something before it, a dot after it, no
 * spaces or control characters. Mail delivery is the real test. */
static bool email_ok(kl_str e)
{
    const char *at = memchr(e.ptr, '@', e.len);
    if (at == NULL || at == e.ptr || memchr(at + 1, '@', e.len - (size_t)(at + 1 - e.ptr)))
        return false;
    const char *dom = at + 1;
    size_t dlen = e.len - (size_t)(dom - e.ptr);
    const char *dot = memchr(dom, '.', dlen);
    if (dot == NULL || dot == dom || dom[dlen - 1] == '.')
        return false;
    for (uint32_t i = 0; i < e.len; i++)
        if ((unsigned char)e.ptr[i] <= ' ' || e.ptr[i] == 0x7f)
            return false;
    return true;
}

static int parse_role(kl_http_request *req, json_t *body, kl_role *out)
{
    kl_str r;
    int got = kl_api_get_str(req, body, "role", "role", 1, 16, &r);
    if (got <= 0)
        return got;
    *out = kl_role_parse(r.ptr, r.len);
    if (*out == KL_ROLE_NONE) {
        kl_api_bad_arg(req, "role", "role must be owner, manager, member or guest");
        return -1;
    }
    return 1;
}

static int render_user(kl_daemon *d, kl_cmd *c, int status)
{
    kl_cmd_answer(d, c, status, kl_render_user(kl_proj_user(d->proj, &c->target)));
    return 0;
}
static int render_created(kl_daemon *d, kl_cmd *c) { return render_user(d, c, 201); }
static int render_ok(kl_daemon *d, kl_cmd *c) { return render_user(d, c, 200); }
static int render_none(kl_daemon *d, kl_cmd *c)
{
    kl_cmd_answer(d, c, 204, NULL);
    return 0;
}

static int forbid(kl_cmd *c, const char *why)
{
    kl_api_error(c->req, 403, "permission_denied", why, NULL);
    return -1;
}

/* ---- invite ----------------------------------------------------------- */

static int decide_invite(kl_daemon *d, kl_cmd *c)
{
    user_input *in = c->data;
    if (in->role == KL_ROLE_OWNER && c->caller.role != KL_ROLE_OWNER)
        return forbid(c, "only an owner may grant the owner role");
    if (kl_proj_user_by_email(c->caller.org, in->email.ptr, in->email.len) != NULL) {
        kl_api_error(c->req, 409, "conflict",
                     "a user with this email is already in the organization", "email");
        return -1;
    }
    kl_event ev = {.type = KL_EV_USER_INVITED,
                   .has = KL_F_ID | KL_F_EMAIL | KL_F_ROLE | KL_F_NAME,
                   .email = in->email, .role = in->role,
                   .name = in->has_name ? in->name : (kl_str){"", 0}};
    return kl_api_emit_new(d, c, &ev);
}

static const char *const INVITE_FIELDS[] = {"email", "name", "role", NULL};

void kl_h_users_invite(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_cmd *c = kl_api_write_cmd(d, req, KL_ID_KIND_COUNT, INVITE_FIELDS,
                                 sizeof(user_input));
    if (c == NULL)
        return;
    json_t *body = c->body;
    user_input *in = c->data;
    int r = kl_api_get_str(req, body, "email", "email", 1, EMAIL_MAX_CHARS, &in->email);
    if (r == 0) {
        kl_api_bad_arg(req, "email", "email is required");
        r = -1;
    } else if (r > 0 && !email_ok(in->email)) {
        kl_api_bad_arg(req, "email", "email must be an address like name@example.com");
        r = -1;
    }
    if (r > 0)
        r = kl_api_get_str(req, body, "name", "name", 0, NAME_MAX_CHARS, &in->name);
    in->has_name = r > 0;
    if (r >= 0 && (r = parse_role(req, body, &in->role)) == 0) {
        kl_api_bad_arg(req, "role", "role is required");
        r = -1;
    }
    if (r < 0) {
        kl_cmd_free(c);
        return;
    }
    kl_cmd_lock(c, &c->caller.org->id);
    c->decide = decide_invite;
    c->render = render_created;
    kl_cmd_submit(d, c);
}

/* ---- list and get ----------------------------------------------------- */

void kl_h_users_list(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_page pg;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_page(req, KL_ID_USER, &pg) != 0)
        return;
    const kl_vec *users = &caller.org->users;
    json_t *items = json_array();
    const kl_id *last = NULL;
    uint32_t i = kl_vec_after(users, pg.has_cursor ? &pg.cursor : NULL);
    for (uint32_t n = 0; i < users->len && n < pg.limit; i++, n++) {
        const kl_user *u = users->items[i];
        json_array_append_new(items, kl_render_user(u));
        last = &u->id;
    }
    kl_api_json(req, 200, kl_api_page_body("users", items, KL_ID_USER, last,
                                           i < users->len), NULL);
}

void kl_h_users_get(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id id;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_USER, &id) != 0)
        return;
    const kl_user *u = org_user(d, req, &caller, &id);
    if (u != NULL)
        kl_api_json(req, 200, kl_render_user(u), NULL);
}

/* ---- change and remove ------------------------------------------------ */

/* The target user as decide needs it: in the org, not removed, at the
 * version If-Match names. */
static kl_user *decide_user(kl_daemon *d, kl_cmd *c)
{
    kl_user *u = org_user(d, c->req, &c->caller, &c->target);
    if (u == NULL || kl_api_if_match(c->req, u->version) != 0)
        return NULL;
    if (u->removed) {
        kl_api_error(c->req, 409, "conflict", "the user was removed", NULL);
        return NULL;
    }
    return u;
}

/* Taking `owner` away (demotion or removal): owners only, never the last. */
static int may_take_owner(kl_cmd *c, const kl_user *u, const char *what)
{
    if (u->role != KL_ROLE_OWNER)
        return 0;
    if (c->caller.role != KL_ROLE_OWNER) {
        char msg[96];
        snprintf(msg, sizeof msg, "only an owner may %s an owner", what);
        return forbid(c, msg);
    }
    if (u->org->active_owners <= 1) {
        char msg[96];
        snprintf(msg, sizeof msg, "cannot %s the last active owner", what);
        kl_api_error(c->req, 409, "conflict", msg, NULL);
        return -1;
    }
    return 0;
}

static int decide_update(kl_daemon *d, kl_cmd *c)
{
    kl_user *u = decide_user(d, c);
    if (u == NULL)
        return -1;
    user_input *in = c->data;
    if (in->role != KL_ROLE_NONE && in->role != u->role) {
        if (in->role == KL_ROLE_OWNER && c->caller.role != KL_ROLE_OWNER)
            return forbid(c, "only an owner may grant the owner role");
        if (may_take_owner(c, u, "demote") != 0)
            return -1;
    }
    if (in->has_name && (strlen(u->name) != in->name.len ||
                         memcmp(u->name, in->name.ptr, in->name.len) != 0)) {
        kl_event ev = {.type = KL_EV_USER_UPDATED, .has = KL_F_ID | KL_F_NAME,
                       .id = u->id, .name = in->name};
        if (kl_api_emit(d, c, &ev) != 0)
            return -1;
    }
    if (in->role != KL_ROLE_NONE && in->role != u->role) {
        kl_event ev = {.type = KL_EV_USER_ROLE_CHANGED, .has = KL_F_ID | KL_F_ROLE,
                       .id = u->id, .role = in->role};
        return kl_api_emit(d, c, &ev);
    }
    return 0;
}

static const char *const UPDATE_FIELDS[] = {"name", "role", NULL};

/* Common start of PATCH and DELETE on a user. */
static kl_cmd *user_cmd(kl_http_request *req, const char *const *fields)
{
    kl_cmd *c = kl_api_write_cmd(req->ctx, req, KL_ID_USER, fields, sizeof(user_input));
    if (c != NULL)
        kl_cmd_lock(c, &c->caller.org->id);    /* the owner count */
    return c;
}

void kl_h_users_update(kl_http_request *req)
{
    kl_cmd *c = user_cmd(req, UPDATE_FIELDS);
    if (c == NULL)
        return;
    user_input *in = c->data;
    int r = kl_api_get_str(req, c->body, "name", "name", 0, NAME_MAX_CHARS, &in->name);
    in->has_name = r > 0;
    if (r < 0 || parse_role(req, c->body, &in->role) < 0) {
        kl_cmd_free(c);
        return;
    }
    c->decide = decide_update;
    c->render = render_ok;
    kl_cmd_submit(req->ctx, c);
}

static int decide_remove(kl_daemon *d, kl_cmd *c)
{
    kl_user *u = decide_user(d, c);
    if (u == NULL || may_take_owner(c, u, "remove") != 0)
        return -1;
    kl_event ev = {.type = KL_EV_USER_REMOVED, .has = KL_F_ID, .id = u->id};
    return kl_api_emit(d, c, &ev);
}

static const char *const NO_FIELDS[] = {NULL};

void kl_h_users_remove(kl_http_request *req)
{
    kl_cmd *c = user_cmd(req, NO_FIELDS);
    if (c == NULL)
        return;
    c->decide = decide_remove;
    c->render = render_none;
    kl_cmd_submit(req->ctx, c);
}

/* ---- a user's keys ---------------------------------------------------- */

void kl_h_users_keys_create(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id id;
    if (kl_api_auth(d, req, KL_NEED_WRITE, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_USER, &id) != 0 ||
        org_user(d, req, &caller, &id) == NULL)
        return;
    if (!kl_api_may_mint_for_user(&caller, &id)) {
        kl_api_error(req, 403, "permission_denied",
                     "a manager may create API keys only for themself", NULL);
        return;
    }
    kl_ref owner = {KL_PRINCIPAL_USER, id};
    kl_keys_create_for(d, req, &caller, &owner);
}

void kl_h_users_keys_list(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id id;
    kl_page pg;
    bool include_revoked = false;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_USER, &id) != 0 ||
        org_user(d, req, &caller, &id) == NULL ||
        kl_api_page(req, KL_ID_KEY, &pg) != 0 ||
        kl_api_query_bool(req, "include_revoked", &include_revoked) != 0)
        return;
    kl_ref owner = {KL_PRINCIPAL_USER, id};
    kl_daemon_list_keys(d, req, caller.org, &pg, include_revoked, &owner);
}

/* ---- usage limits ----------------------------------------------------- */

void kl_h_limits_get(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    if (kl_api_auth(d, req, KL_NEED_READ | KL_NEED_UNLIMITED, &caller) == 0)
        kl_api_json(req, 200, kl_render_limits(caller.org), NULL);
}

static int render_limits(kl_daemon *d, kl_cmd *c)
{
    kl_cmd_answer(d, c, 200, kl_render_limits(c->caller.org));
    return 0;
}

static int decide_limits(kl_daemon *d, kl_cmd *c)
{
    const user_input *in = c->data;
    const kl_org *o = c->caller.org;
    if (in->lim[0] == o->lim_minute && in->lim[1] == o->lim_day &&
        in->lim[2] == o->lim_month)
        return 0;               /* as it is: nothing to write */
    kl_event ev = {.type = KL_EV_USAGE_LIMITS_CHANGED, .has = KL_F_LIMITS,
                   .lim_minute = in->lim[0], .lim_day = in->lim[1],
                   .lim_month = in->lim[2]};
    return kl_api_emit(d, c, &ev);
}

static const char *const LIMIT_FIELDS[] = {
    "requests_per_minute", "requests_per_day", "requests_per_month", NULL};

void kl_h_limits_put(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    json_t *body;
    if (kl_api_auth(d, req, KL_NEED_WRITE | KL_NEED_UNLIMITED, &caller) != 0)
        return;
    if (caller.role != KL_ROLE_OWNER) {
        kl_api_error(req, 403, "permission_denied",
                     "only an owner may change the usage limits", NULL);
        return;
    }
    if (kl_api_body(req, LIMIT_FIELDS, &body) != 0)
        return;
    kl_cmd *c = kl_api_cmd(d, req, &caller, body, sizeof(user_input));
    if (c == NULL)
        return;
    user_input *in = c->data;
    /* PUT replaces the whole object: absent or null is "no limit". */
    for (int i = 0; i < 3; i++) {
        uint64_t v = 0;
        json_t *j = json_object_get(body, LIMIT_FIELDS[i]);
        if (j != NULL && !json_is_null(j) &&
            kl_api_get_uint(req, body, LIMIT_FIELDS[i], LIMIT_FIELDS[i], 1,
                            LIMIT_MAX, &v) < 0) {
            kl_cmd_free(c);
            return;
        }
        in->lim[i] = (uint32_t)v;
    }
    kl_cmd_lock(c, &caller.org->id);
    c->decide = decide_limits;
    c->render = render_limits;
    kl_cmd_submit(d, c);
}
