/*
 * /v1/api-keys: create, list, get, update, regenerate, revoke, delete
 * (API.md §4 "API keys"). Handlers parse and check the request; decide_*
 * check it against the state and build the event; render_* answer once the
 * event is durable and applied.
 */
#include "daemon.h"

#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

enum {
    NAME_MAX_CHARS = 128,
    DESCRIPTION_MAX_CHARS = 1024,
    COMMENT_MAX_CHARS = 1024,
    MAX_EXPIRY_DAYS = 366,
    MAX_GRACE_SECONDS = 604800,
    RATE_MAX = 1000000000
};
static const int64_t DAY_MS = 24 * 3600 * 1000LL;

/* A request's key settings; strings borrowed from the command's body. */
typedef struct key_input {
    uint32_t has;               /* KL_F_* given */
    kl_str name, description;
    kl_access access;
    kl_str flows[KL_MAX_FLOWS];
    uint32_t nflows;
    uint32_t rl_minute, rl_day;
    int64_t expires_at;
    kl_env env;
    kl_principal owner_type;
    kl_id owner;
    uint64_t grace_seconds;
    kl_str comment;
} key_input;

static const char *const PERMISSION_FIELDS[] = {"access", "flows", NULL};
static const char *const RATE_FIELDS[] = {"requests_per_minute",
                                          "requests_per_day", NULL};

static int parse_permissions(kl_http_request *req, json_t *body, key_input *in)
{
    json_t *p = json_object_get(body, "permissions");
    if (p == NULL)
        return 0;
    if (!json_is_object(p)) {
        kl_api_bad_arg(req, "permissions", "permissions must be an object");
        return -1;
    }
    if (kl_api_only_fields(req, p, "permissions", PERMISSION_FIELDS) != 0)
        return -1;
    kl_str access;
    int r = kl_api_get_str(req, p, "access", "permissions.access", 1, 32, &access);
    if (r < 0)
        return -1;
    in->access = r > 0 ? kl_access_parse(access.ptr, access.len) : KL_ACCESS_NONE;
    if (in->access == KL_ACCESS_NONE) {
        kl_api_bad_arg(req, "permissions.access",
                       "permissions.access must be full, read_only or flows");
        return -1;
    }
    json_t *flows = json_object_get(p, "flows");
    if (in->access != KL_ACCESS_FLOWS) {
        if (flows != NULL) {
            kl_api_bad_arg(req, "permissions.flows",
                           "permissions.flows is only for access \"flows\"");
            return -1;
        }
    } else {
        if (!json_is_array(flows) || json_array_size(flows) == 0 ||
            json_array_size(flows) > KL_MAX_FLOWS) {
            kl_api_bad_arg(req, "permissions.flows",
                           "permissions.flows must be a list of 1 to 64 flow ids");
            return -1;
        }
        size_t i;
        json_t *f;
        json_array_foreach(flows, i, f) {
            if (kl_api_str_value(req, f, "permissions.flows", 1, KL_MAX_FLOW_LEN,
                                 &in->flows[i]) < 0)
                return -1;
            for (size_t j = 0; j < i; j++) {
                if (in->flows[j].len == in->flows[i].len &&
                    memcmp(in->flows[j].ptr, in->flows[i].ptr, in->flows[i].len) == 0) {
                    kl_api_bad_arg(req, "permissions.flows",
                                   "permissions.flows lists a flow twice");
                    return -1;
                }
            }
        }
        in->nflows = (uint32_t)json_array_size(flows);
    }
    in->has |= KL_F_ACCESS;
    return 0;
}

static int parse_rate_limit(kl_http_request *req, json_t *body, key_input *in)
{
    json_t *rl = json_object_get(body, "rate_limit");
    if (rl == NULL)
        return 0;
    in->has |= KL_F_RATE_LIMIT;
    if (json_is_null(rl))
        return 0;               /* no limit */
    if (!json_is_object(rl)) {
        kl_api_bad_arg(req, "rate_limit", "rate_limit must be an object");
        return -1;
    }
    if (kl_api_only_fields(req, rl, "rate_limit", RATE_FIELDS) != 0)
        return -1;
    uint64_t v;
    int r = kl_api_get_uint(req, rl, "requests_per_minute",
                            "rate_limit.requests_per_minute", 1, RATE_MAX, &v);
    if (r < 0)
        return -1;
    in->rl_minute = r > 0 ? (uint32_t)v : 0;
    r = kl_api_get_uint(req, rl, "requests_per_day", "rate_limit.requests_per_day",
                        1, RATE_MAX, &v);
    if (r < 0)
        return -1;
    in->rl_day = r > 0 ? (uint32_t)v : 0;
    return 0;
}

/* expires_at (or, when creating, expires_in_days): in the future and at
 * most 366 days away; null (PATCH) removes the expiry. */
static int parse_expiry(kl_http_request *req, json_t *body, int64_t now,
                        bool creating, key_input *in)
{
    json_t *at = json_object_get(body, "expires_at");
    json_t *days = creating ? json_object_get(body, "expires_in_days") : NULL;
    if (at != NULL && days != NULL) {
        kl_api_bad_arg(req, "expires_in_days",
                       "send expires_at or expires_in_days, not both");
        return -1;
    }
    if (days != NULL) {
        uint64_t d;
        if (kl_api_get_uint(req, body, "expires_in_days", "expires_in_days", 1,
                            MAX_EXPIRY_DAYS, &d) < 0)
            return -1;
        in->expires_at = now + (int64_t)d * DAY_MS;
        in->has |= KL_F_EXPIRES;
        return 0;
    }
    if (at == NULL)
        return 0;
    in->has |= KL_F_EXPIRES;
    if (json_is_null(at) && !creating) {
        in->expires_at = 0;
        return 0;
    }
    if (kl_api_get_time(req, body, "expires_at", "expires_at", &in->expires_at) < 0)
        return -1;
    if (in->expires_at <= now) {
        kl_api_bad_arg(req, "expires_at", "expires_at must be in the future");
        return -1;
    }
    if (in->expires_at > now + MAX_EXPIRY_DAYS * DAY_MS) {
        kl_api_bad_arg(req, "expires_at",
                       "expires_at must be at most 366 days from now");
        return -1;
    }
    return 0;
}

/* The settings shared by create and update. */
static int parse_settings(kl_http_request *req, json_t *body, int64_t now,
                          bool creating, key_input *in)
{
    int r = kl_api_get_str(req, body, "name", "name", 1, NAME_MAX_CHARS, &in->name);
    if (r < 0)
        return -1;
    if (r > 0)
        in->has |= KL_F_NAME;
    else if (creating) {
        kl_api_bad_arg(req, "name", "name is required");
        return -1;
    }
    json_t *desc = json_object_get(body, "description");
    if (desc != NULL && json_is_null(desc)) {
        in->description = (kl_str){"", 0};
        in->has |= KL_F_DESCRIPTION;
    } else {
        r = kl_api_get_str(req, body, "description", "description", 0,
                           DESCRIPTION_MAX_CHARS, &in->description);
        if (r < 0)
            return -1;
        if (r > 0)
            in->has |= KL_F_DESCRIPTION;
    }
    if (parse_permissions(req, body, in) != 0 || parse_rate_limit(req, body, in) != 0 ||
        parse_expiry(req, body, now, creating, in) != 0)
        return -1;
    return 0;
}

/* Fills the event's settings fields from the input. */
static void settings_to_event(const key_input *in, kl_event *ev)
{
    ev->has |= in->has & (KL_F_NAME | KL_F_DESCRIPTION | KL_F_ACCESS |
                          KL_F_RATE_LIMIT | KL_F_EXPIRES);
    ev->name = in->name;
    ev->description = in->description;
    ev->access = in->access;
    memcpy(ev->flows, in->flows, in->nflows * sizeof in->flows[0]);
    ev->nflows = in->nflows;
    ev->rl_minute = in->rl_minute;
    ev->rl_day = in->rl_day;
    ev->expires_at = in->expires_at;
}

/* The caller's key in its org, not deleted; answers 404 otherwise. */
static kl_key *org_key(kl_daemon *d, kl_cmd *c)
{
    kl_key *k = kl_proj_key(d->proj, &c->target);
    if (k == NULL || k->deleted || kl_key_org(k) != c->caller.org) {
        kl_api_error(c->req, 404, "not_found", "no such API key", NULL);
        return NULL;
    }
    return k;
}

/* ---- render ----------------------------------------------------------- */

/* Written as text, not built as a tree and dumped: creating keys is the
 * busiest write, and its answer was a quarter of the loop's time. */
static int render_key(kl_daemon *d, kl_cmd *c, int status)
{
    const kl_key *k = kl_proj_key(d->proj, &c->target);
    const char *secret = c->secret[0] != '\0' ? c->secret : NULL;
    size_t max = kl_render_key_max(k, secret);
    char stack[4096], *text = max <= sizeof stack ? stack : malloc(max);
    if (text == NULL) {
        kl_api_error(c->req, 500, "internal", "out of memory", NULL);
        return 0;
    }
    kl_jw w = {text, text + max, false};
    kl_render_key_text(&w, k, kl_daemon_now(d), secret);
    if (w.full)     /* kl_render_key_max is wrong: never a cut answer */
        kl_api_error(c->req, 500, "internal", "answer too long", NULL);
    else
        kl_cmd_answer_text(d, c, status, text, (size_t)(w.p - text));
    OPENSSL_cleanse(text, (size_t)(w.p - text));    /* it may hold a new secret */
    if (text != stack)
        free(text);
    return 0;
}

static int render_created(kl_daemon *d, kl_cmd *c) { return render_key(d, c, 201); }
static int render_ok(kl_daemon *d, kl_cmd *c) { return render_key(d, c, 200); }
static int render_deleted(kl_daemon *d, kl_cmd *c)
{
    kl_cmd_answer(d, c, 204, NULL);
    return 0;
}

/* ---- create ----------------------------------------------------------- */

/* A new key's owner must be in the caller's org and able to act. */
static int owner_can_hold_keys(kl_daemon *d, kl_cmd *c, const key_input *in)
{
    const kl_org *org = c->caller.org;
    if (in->owner_type == KL_PRINCIPAL_USER) {
        const kl_user *u = kl_proj_user(d->proj, &in->owner);
        if (u == NULL || u->org != org) {
            kl_api_error(c->req, 404, "not_found", "no such user", NULL);
            return -1;
        }
        if (u->removed) {
            kl_api_error(c->req, 409, "conflict", "the user was removed", NULL);
            return -1;
        }
        return 0;
    }
    const kl_sa *s = kl_proj_sa(d->proj, &in->owner);
    if (s == NULL || s->org != org || s->deleted) {
        kl_api_error(c->req, 404, "not_found", "no such service account", NULL);
        return -1;
    }
    if (!s->active) {
        kl_api_error(c->req, 409, "conflict", "the service account is deactivated",
                     NULL);
        return -1;
    }
    return 0;
}

static int decide_create(kl_daemon *d, kl_cmd *c)
{
    key_input *in = c->data;
    if (owner_can_hold_keys(d, c, in) != 0)
        return -1;
    kl_event ev = {.type = KL_EV_KEY_CREATED, .has = KL_F_ID | KL_F_OWNER |
                   KL_F_HASH | KL_F_PREFIX | KL_F_ENV | KL_F_ACCESS};
    settings_to_event(in, &ev);
    if (!(in->has & KL_F_ACCESS))
        ev.access = KL_ACCESS_FULL;
    if (!(in->has & KL_F_DESCRIPTION))
        ev.description = (kl_str){"", 0};
    ev.has |= KL_F_DESCRIPTION;
    ev.owner_type = in->owner_type;
    ev.owner = in->owner;
    ev.env = in->env;
    char display[KL_DISPLAY_PREFIX_LEN + 1];
    if (kl_id_new(&d->ids, c->now, &ev.id) != KL_OK ||
        kl_secret_new(d->cfg.key_prefix, ev.env, &ev.id, c->secret, ev.hash,
                      display) != KL_OK) {
        kl_api_error(c->req, 503, "unavailable", "no randomness available", NULL);
        return -1;
    }
    ev.prefix = (kl_str){display, KL_DISPLAY_PREFIX_LEN};
    c->target = ev.id;
    return kl_api_emit(d, c, &ev);
}

static const char *const CREATE_FIELDS[] = {
    "name", "description", "expires_at", "expires_in_days", "permissions",
    "rate_limit", "environment", NULL};

/* Shared by POST /v1/api-keys and the per-owner routes: a key for `owner`. */
void kl_keys_create_for(kl_daemon *d, kl_http_request *req, const kl_caller *caller,
                        const kl_ref *owner)
{
    json_t *body;
    if (kl_api_body(req, CREATE_FIELDS, &body) != 0)
        return;
    kl_cmd *c = kl_api_cmd(d, req, caller, body, sizeof(key_input));
    if (c == NULL)
        return;
    key_input *in = c->data;
    kl_str env;
    int r = parse_settings(req, body, c->now, true, in);
    if (r == 0)
        r = kl_api_get_str(req, body, "environment", "environment", 1, 16, &env);
    if (r < 0) {
        kl_cmd_free(c);
        return;
    }
    in->env = r > 0 ? kl_env_parse(env.ptr, env.len) : KL_ENV_LIVE;
    if (in->env == KL_ENV_NONE) {
        kl_api_bad_arg(req, "environment", "environment must be live or test");
        kl_cmd_free(c);
        return;
    }
    in->owner_type = owner->type;
    in->owner = owner->id;
    kl_cmd_lock_shared(c, &owner->id);
    c->decide = decide_create;
    c->render = render_created;
    kl_cmd_submit(d, c);
}

void kl_h_keys_create(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    if (kl_api_auth(d, req, KL_NEED_WRITE, &caller) != 0)
        return;
    kl_keys_create_for(d, req, &caller, &caller.principal);
}

/* ---- list and get ----------------------------------------------------- */

void kl_h_keys_list(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_page pg;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_page(req, KL_ID_KEY, &pg) != 0)
        return;
    bool include_revoked = false;
    if (kl_api_query_bool(req, "include_revoked", &include_revoked) != 0)
        return;
    char buf[64];
    kl_ref owner = {KL_PRINCIPAL_NONE, {{0}}};
    int q = kl_http_query(req, "owner", buf, sizeof buf);
    if (q != 0) {
        size_t n = q > 0 ? strlen(buf) : 0;
        if (q > 0 && kl_id_parse(KL_ID_USER, buf, n, &owner.id) == KL_OK)
            owner.type = KL_PRINCIPAL_USER;
        else if (q > 0 && kl_id_parse(KL_ID_SA, buf, n, &owner.id) == KL_OK)
            owner.type = KL_PRINCIPAL_SA;
        else {
            kl_api_bad_arg(req, "owner", "owner must be a user or service account id");
            return;
        }
    }
    kl_daemon_list_keys(d, req, caller.org, &pg, include_revoked,
                        owner.type != KL_PRINCIPAL_NONE ? &owner : NULL);
}

void kl_daemon_list_keys(kl_daemon *d, kl_http_request *req, const kl_org *org,
                         const kl_page *pg, bool include_revoked,
                         const kl_ref *owner)
{
    int64_t now = kl_daemon_now(d);
    json_t *items = json_array();
    const kl_vec *keys = &org->keys;
    const kl_id *last = NULL;
    bool more = false;
    uint32_t n = 0;
    for (uint32_t i = kl_vec_after(keys, pg->has_cursor ? &pg->cursor : NULL);
         i < keys->len; i++) {
        const kl_key *k = keys->items[i];
        if ((k->revoked && !include_revoked) ||
            (owner != NULL && !kl_id_eq(&owner->id, kl_key_owner_id(k))))
            continue;
        if (n == pg->limit) {
            more = true;
            break;
        }
        json_array_append_new(items, kl_render_key(k, now));
        last = &k->id;
        n++;
    }
    kl_api_json(req, 200, kl_api_page_body("api_keys", items, KL_ID_KEY, last, more),
                NULL);
}

void kl_h_keys_get(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller caller;
    kl_id id;
    if (kl_api_auth(d, req, KL_NEED_READ, &caller) != 0 ||
        kl_api_path_id(req, 0, KL_ID_KEY, &id) != 0)
        return;
    kl_key *k = kl_proj_key(d->proj, &id);
    if (k == NULL || k->deleted || kl_key_org(k) != caller.org) {
        kl_api_error(req, 404, "not_found", "no such API key", NULL);
        return;
    }
    kl_api_json(req, 200, kl_render_key(k, kl_daemon_now(d)), NULL);
}

/* ---- changes to one key ----------------------------------------------- */

/* Common start of PATCH, regenerate, revoke and DELETE: auth, the id, the
 * body. */
static kl_cmd *key_cmd(kl_http_request *req, const char *const *fields,
                       kl_cmd_fn decide, kl_cmd_fn render)
{
    kl_daemon *d = req->ctx;
    kl_cmd *c = kl_api_write_cmd(d, req, KL_ID_KEY, fields, sizeof(key_input));
    if (c == NULL)
        return NULL;
    /* Deleting a service account revokes its keys: keep the two apart. */
    const kl_key *k = kl_proj_key(d->proj, &c->target);
    if (k != NULL)
        kl_cmd_lock_shared(c, kl_key_owner_id(k));
    c->decide = decide;
    c->render = render;
    return c;
}

/* The key must exist in the caller's org and match If-Match. */
static kl_key *decide_key(kl_daemon *d, kl_cmd *c)
{
    kl_key *k = org_key(d, c);
    if (k == NULL || kl_api_if_match(c->req, k->version) != 0)
        return NULL;
    return k;
}

static int emit(kl_daemon *d, kl_cmd *c, kl_event *ev)
{
    ev->id = c->target;
    ev->has |= KL_F_ID;
    return kl_api_emit(d, c, ev);
}

static int decide_update(kl_daemon *d, kl_cmd *c)
{
    if (decide_key(d, c) == NULL)
        return -1;
    key_input *in = c->data;
    if (in->has == 0)
        return 0;               /* nothing to change: answer as it is */
    kl_event ev = {.type = KL_EV_KEY_UPDATED};
    settings_to_event(in, &ev);
    return emit(d, c, &ev);
}

static const char *const UPDATE_FIELDS[] = {"name", "description", "permissions",
                                            "rate_limit", "expires_at", NULL};

void kl_h_keys_update(kl_http_request *req)
{
    kl_cmd *c = key_cmd(req, UPDATE_FIELDS, decide_update, render_ok);
    if (c == NULL)
        return;
    if (parse_settings(req, c->body, c->now, false, c->data) != 0) {
        kl_cmd_free(c);
        return;
    }
    kl_cmd_submit(req->ctx, c);
}

static int decide_regenerate(kl_daemon *d, kl_cmd *c)
{
    kl_key *k = decide_key(d, c);
    if (k == NULL)
        return -1;
    if (k->revoked) {
        kl_api_error(c->req, 409, "conflict", "a revoked key cannot be regenerated",
                     NULL);
        return -1;
    }
    /* A new secret is a new key in hand: the rule for minting holds, or a
     * manager could regenerate an owner's key and act as that owner. */
    if (k->owner_type == KL_PRINCIPAL_USER &&
        !kl_api_may_mint_for_user(&c->caller, kl_key_owner_id(k))) {
        kl_api_error(c->req, 403, "permission_denied",
                     "a manager may regenerate only their own keys and service "
                     "accounts' keys", NULL);
        return -1;
    }
    key_input *in = c->data;
    kl_event ev = {.type = KL_EV_KEY_REGENERATED, .has = KL_F_HASH | KL_F_PREFIX};
    char display[KL_DISPLAY_PREFIX_LEN + 1];
    if (kl_secret_new(d->cfg.key_prefix, k->env, &k->id, c->secret, ev.hash,
                      display) != KL_OK) {
        kl_api_error(c->req, 503, "unavailable", "no randomness available", NULL);
        return -1;
    }
    ev.prefix = (kl_str){display, KL_DISPLAY_PREFIX_LEN};
    if (in->grace_seconds > 0) {
        ev.has |= KL_F_GRACE;
        ev.grace_until = c->now + (int64_t)in->grace_seconds * 1000;
    }
    return emit(d, c, &ev);
}

static const char *const REGENERATE_FIELDS[] = {"grace_period_seconds", NULL};

void kl_h_keys_regenerate(kl_http_request *req)
{
    kl_cmd *c = key_cmd(req, REGENERATE_FIELDS, decide_regenerate, render_ok);
    if (c == NULL)
        return;
    key_input *in = c->data;
    if (kl_api_get_uint(req, c->body, "grace_period_seconds", "grace_period_seconds",
                        0, MAX_GRACE_SECONDS, &in->grace_seconds) < 0) {
        kl_cmd_free(c);
        return;
    }
    kl_cmd_submit(req->ctx, c);
}

static int decide_revoke(kl_daemon *d, kl_cmd *c)
{
    kl_key *k = decide_key(d, c);
    if (k == NULL)
        return -1;
    if (k->revoked) {
        kl_api_error(c->req, 409, "conflict", "the key is already revoked", NULL);
        return -1;
    }
    key_input *in = c->data;
    kl_event ev = {.type = KL_EV_KEY_REVOKED};
    if (in->comment.ptr != NULL) {
        ev.has |= KL_F_COMMENT;
        ev.comment = in->comment;
    }
    return emit(d, c, &ev);
}

static const char *const REVOKE_FIELDS[] = {"comment", NULL};

void kl_h_keys_revoke(kl_http_request *req)
{
    kl_cmd *c = key_cmd(req, REVOKE_FIELDS, decide_revoke, render_ok);
    if (c == NULL)
        return;
    key_input *in = c->data;
    if (kl_api_get_str(req, c->body, "comment", "comment", 0, COMMENT_MAX_CHARS,
                       &in->comment) < 0) {
        kl_cmd_free(c);
        return;
    }
    kl_cmd_submit(req->ctx, c);
}

static int decide_delete(kl_daemon *d, kl_cmd *c)
{
    if (decide_key(d, c) == NULL)
        return -1;
    kl_event ev = {.type = KL_EV_KEY_DELETED};
    return emit(d, c, &ev);
}

static const char *const NO_FIELDS[] = {NULL};

void kl_h_keys_delete(kl_http_request *req)
{
    kl_cmd *c = key_cmd(req, NO_FIELDS, decide_delete, render_deleted);
    if (c != NULL)
        kl_cmd_submit(req->ctx, c);
}

