/*
 * Entities as the contract's JSON objects. Fields without a value are
 * omitted (API.md §2), except those the contract always lists.
 */
#include "daemon.h"

json_t *kl_json_id(kl_id_kind kind, const kl_id *id)
{
    char text[KL_ID_TEXT_MAX];
    kl_id_format(kind, id, text);
    return json_string(text);
}

json_t *kl_json_time(int64_t ms)
{
    char text[KL_TIME_TEXT_LEN + 1];
    kl_time_format(ms, text);
    return json_string(text);
}

json_t *kl_json_ref(const kl_ref *r)
{
    switch (r->type) {
    case KL_PRINCIPAL_USER:
        return kl_json_id(KL_ID_USER, &r->id);
    case KL_PRINCIPAL_SA:
        return kl_json_id(KL_ID_SA, &r->id);
    default:
        return json_string("system");
    }
}

static json_t *principal(const kl_ref *r)
{
    return json_pack("{s:s,s:o}", "type", kl_principal_name(r->type), "id",
                     kl_json_ref(r));
}

json_t *kl_render_key(const kl_key *k, int64_t now)
{
    kl_key_status st = kl_key_status_at(k, now);
    char prefix[sizeof k->prefix + 3];
    snprintf(prefix, sizeof prefix, "%s...", k->prefix);

    json_t *o = json_object();
    json_object_set_new(o, "id", kl_json_id(KL_ID_KEY, &k->id));
    json_object_set_new(o, "org_id", kl_json_id(KL_ID_ORG, &k->org->id));
    json_object_set_new(o, "name", json_string(k->name));
    json_object_set_new(o, "description", json_string(k->description));
    json_object_set_new(o, "prefix", json_string(prefix));
    json_object_set_new(o, "environment", json_string(kl_env_name(k->env)));
    json_object_set_new(o, "owner", principal(&k->owner));
    json_object_set_new(o, "created_by", kl_json_ref(&k->created_by));
    json_t *perm = json_pack("{s:s}", "access", kl_access_name(k->access));
    if (k->access == KL_ACCESS_FLOWS) {
        json_t *flows = json_array();
        for (uint32_t i = 0; i < k->nflows; i++)
            json_array_append_new(flows, json_string(k->flows[i]));
        json_object_set_new(perm, "flows", flows);
    }
    json_object_set_new(o, "permissions", perm);
    if (k->rl_minute != 0 || k->rl_day != 0) {
        json_t *rl = json_object();
        if (k->rl_minute != 0)
            json_object_set_new(rl, "requests_per_minute", json_integer(k->rl_minute));
        if (k->rl_day != 0)
            json_object_set_new(rl, "requests_per_day", json_integer(k->rl_day));
        json_object_set_new(o, "rate_limit", rl);
    }
    json_object_set_new(o, "created_at", kl_json_time(k->created_at));
    json_object_set_new(o, "updated_at", kl_json_time(k->updated_at));
    if (k->last_used_at != 0)
        json_object_set_new(o, "last_used_at", kl_json_time(k->last_used_at));
    if (k->expires_at != 0)
        json_object_set_new(o, "expires_at", kl_json_time(k->expires_at));
    json_object_set_new(o, "is_active", json_boolean(kl_key_usable(k, now)));
    json_object_set_new(o, "status", json_string(kl_key_status_name(st)));
    if (k->revoked) {
        json_object_set_new(o, "revoked_at", kl_json_time(k->revoked_at));
        json_object_set_new(o, "revoked_by", kl_json_ref(&k->revoked_by));
        if (k->revoked_comment != NULL)
            json_object_set_new(o, "revoked_comment", json_string(k->revoked_comment));
    }
    json_object_set_new(o, "version", json_integer((json_int_t)k->version));
    return o;
}

json_t *kl_render_limits(const kl_org *org)
{
    json_t *lim = json_object();
    if (org->lim_minute != 0)
        json_object_set_new(lim, "requests_per_minute", json_integer(org->lim_minute));
    if (org->lim_day != 0)
        json_object_set_new(lim, "requests_per_day", json_integer(org->lim_day));
    if (org->lim_month != 0)
        json_object_set_new(lim, "requests_per_month", json_integer(org->lim_month));
    return lim;
}

json_t *kl_render_org(const kl_org *org)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", kl_json_id(KL_ID_ORG, &org->id));
    json_object_set_new(o, "name", json_string(org->name));
    json_object_set_new(o, "created_at", kl_json_time(org->created_at));
    json_object_set_new(o, "usage_limits", kl_render_limits(org));
    return o;
}

json_t *kl_render_user(const kl_user *u)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", kl_json_id(KL_ID_USER, &u->id));
    json_object_set_new(o, "org_id", kl_json_id(KL_ID_ORG, &u->org->id));
    json_object_set_new(o, "email", json_string(u->email));
    json_object_set_new(o, "name", json_string(u->name));
    json_object_set_new(o, "role", json_string(kl_role_name(u->role)));
    json_object_set_new(o, "status", json_string(u->removed ? "removed" : "active"));
    json_object_set_new(o, "created_at", kl_json_time(u->created_at));
    json_object_set_new(o, "updated_at", kl_json_time(u->updated_at));
    json_object_set_new(o, "version", json_integer((json_int_t)u->version));
    return o;
}

json_t *kl_render_sa(const kl_sa *s)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", kl_json_id(KL_ID_SA, &s->id));
    json_object_set_new(o, "org_id", kl_json_id(KL_ID_ORG, &s->org->id));
    json_object_set_new(o, "name", json_string(s->name));
    json_object_set_new(o, "description", json_string(s->description));
    json_object_set_new(o, "role", json_string(kl_role_name(s->role)));
    json_object_set_new(o, "is_active", json_boolean(s->active));
    json_object_set_new(o, "created_at", kl_json_time(s->created_at));
    json_object_set_new(o, "created_by", kl_json_ref(&s->created_by));
    json_object_set_new(o, "updated_at", kl_json_time(s->updated_at));
    if (!s->active)
        json_object_set_new(o, "deactivated_at", kl_json_time(s->deactivated_at));
    json_object_set_new(o, "version", json_integer((json_int_t)s->version));
    return o;
}

json_t *kl_render_computer(const kl_computer *c)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", kl_json_id(KL_ID_COMPUTER, &c->id));
    json_object_set_new(o, "name", json_string(c->name));
    json_object_set_new(o, "owner", principal(&c->owner));
    json_object_set_new(o, "status", json_string(c->deleted ? "deleted" : "running"));
    json_object_set_new(o, "created_by", kl_json_ref(&c->created_by));
    json_object_set_new(o, "created_at", kl_json_time(c->created_at));
    if (c->restarted_at != 0)
        json_object_set_new(o, "restarted_at", kl_json_time(c->restarted_at));
    json_object_set_new(o, "version", json_integer((json_int_t)c->version));
    return o;
}

json_t *kl_render_session(const kl_session *s)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", kl_json_id(KL_ID_SESSION, &s->id));
    if (s->title != NULL)
        json_object_set_new(o, "title", json_string(s->title));
    if (!kl_id_is_zero(&s->computer))
        json_object_set_new(o, "computer_id", kl_json_id(KL_ID_COMPUTER, &s->computer));
    json_object_set_new(o, "created_by", kl_json_ref(&s->created_by));
    json_object_set_new(o, "created_at", kl_json_time(s->created_at));
    json_object_set_new(o, "version", json_integer((json_int_t)s->version));
    return o;
}

json_t *kl_render_message(const kl_message *m)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", kl_json_id(KL_ID_MESSAGE, &m->id));
    json_object_set_new(o, "session_id", kl_json_id(KL_ID_SESSION, &m->session->id));
    json_object_set_new(o, "role", json_string(kl_author_name(m->author)));
    json_object_set_new(o, "content", json_string(m->content));
    json_object_set_new(o, "created_by", kl_json_ref(&m->created_by));
    json_object_set_new(o, "created_at", kl_json_time(m->created_at));
    return o;
}
