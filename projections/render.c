/*
 * The state and the events as the contract's JSON objects: what the
 * daemon answers and what `keyledger state` and `replay` print. Fields
 * without a value are omitted (API.md §2), except those the contract always
 * lists.
 */
#include "projections.h"

#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

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
    json_object_set_new(o, "org_id", kl_json_id(KL_ID_ORG, &kl_key_org(k)->id));
    json_object_set_new(o, "name", json_string(kl_key_name(k)));
    json_object_set_new(o, "description", json_string(kl_key_description(k)));
    json_object_set_new(o, "prefix", json_string(prefix));
    json_object_set_new(o, "environment", json_string(kl_env_name(k->env)));
    kl_ref owner = kl_key_owner(k);
    json_object_set_new(o, "owner", principal(&owner));
    json_object_set_new(o, "created_by", kl_json_ref(&k->created_by));
    json_t *perm = json_pack("{s:s}", "access", kl_access_name(k->access));
    if (k->access == KL_ACCESS_FLOWS) {
        json_t *flows = json_array();
        for (uint32_t i = 0; i < kl_key_nflows(k); i++)
            json_array_append_new(flows, json_string(kl_key_flow(k, i)));
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
    const kl_key_revocation *r = kl_key_revocation_of(k);
    if (r != NULL) {
        json_object_set_new(o, "revoked_at", kl_json_time(r->at));
        json_object_set_new(o, "revoked_by", kl_json_ref(&r->by));
        if (r->comment != NULL)
            json_object_set_new(o, "revoked_comment", json_string(r->comment));
    }
    json_object_set_new(o, "version", json_integer((json_int_t)k->version));
    return o;
}

/* ---- JSON text without a tree ------------------------------------------ */

void kl_jw_raw(kl_jw *w, const char *s, size_t n)
{
    if (w->full || (size_t)(w->end - w->p) < n) {
        w->full = true;
        return;
    }
    memcpy(w->p, s, n);
    w->p += n;
}

void kl_jw_lit(kl_jw *w, const char *s) { kl_jw_raw(w, s, strlen(s)); }

/* As jansson's dump: '"', '\\' and the five short escapes, \u00XX for the
 * other control characters, everything else (UTF-8 included) as it is. */
void kl_jw_str(kl_jw *w, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    kl_jw_raw(w, "\"", 1);
    const char *run = s;
    for (const unsigned char *c = (const unsigned char *)s;; c++) {
        if (*c >= 0x20 && *c != '"' && *c != '\\')
            continue;
        kl_jw_raw(w, run, (size_t)((const char *)c - run));
        if (*c == '\0')
            break;
        char esc[6] = {'\\', (char)*c};
        size_t n = 2;
        switch (*c) {
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '"': case '\\': break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[*c >> 4];
            esc[5] = hex[*c & 15];
            n = 6;
        }
        kl_jw_raw(w, esc, n);
        run = (const char *)c + 1;
    }
    kl_jw_raw(w, "\"", 1);
}

void kl_jw_id(kl_jw *w, kl_id_kind kind, const kl_id *id)
{
    char text[KL_ID_TEXT_MAX + 2];
    text[0] = '"';
    kl_id_format(kind, id, text + 1);
    size_t n = strlen(text);
    text[n] = '"';
    kl_jw_raw(w, text, n + 1);
}

void kl_jw_time(kl_jw *w, int64_t ms)
{
    char text[KL_TIME_TEXT_LEN + 3];
    text[0] = '"';
    kl_time_format(ms, text + 1);
    text[KL_TIME_TEXT_LEN + 1] = '"';
    kl_jw_raw(w, text, KL_TIME_TEXT_LEN + 2);
}

void kl_jw_uint(kl_jw *w, uint64_t v)
{
    char text[24];
    int n = snprintf(text, sizeof text, "%" PRIu64, v);
    kl_jw_raw(w, text, (size_t)n);
}

static void jw_ref(kl_jw *w, const kl_ref *r)
{
    if (r->type == KL_PRINCIPAL_USER || r->type == KL_PRINCIPAL_SA)
        kl_jw_id(w, r->type == KL_PRINCIPAL_USER ? KL_ID_USER : KL_ID_SA, &r->id);
    else
        kl_jw_lit(w, "\"system\"");
}

/* Every text of the key escaped at worst (6 bytes a byte) plus the fixed
 * part: ids, times, names of enums and the members' names. */
size_t kl_render_key_max(const kl_key *k, const char *secret)
{
    size_t n = strlen(kl_key_name(k)) + strlen(kl_key_description(k)) + sizeof k->prefix;
    for (uint32_t i = 0; i < kl_key_nflows(k); i++)
        n += strlen(kl_key_flow(k, i)) + 3;
    const kl_key_revocation *r = kl_key_revocation_of(k);
    if (r != NULL && r->comment != NULL)
        n += strlen(r->comment);
    if (secret != NULL)
        n += strlen(secret);
    return 6 * n + 1024;
}

/* Member for member what kl_render_key builds, in its order. */
void kl_render_key_text(kl_jw *w, const kl_key *k, int64_t now, const char *secret)
{
    char prefix[sizeof k->prefix + 3];
    snprintf(prefix, sizeof prefix, "%s...", k->prefix);
    kl_jw_lit(w, "{\"id\":");
    kl_jw_id(w, KL_ID_KEY, &k->id);
    kl_jw_lit(w, ",\"org_id\":");
    kl_jw_id(w, KL_ID_ORG, &kl_key_org(k)->id);
    kl_jw_lit(w, ",\"name\":");
    kl_jw_str(w, kl_key_name(k));
    kl_jw_lit(w, ",\"description\":");
    kl_jw_str(w, kl_key_description(k));
    kl_jw_lit(w, ",\"prefix\":");
    kl_jw_str(w, prefix);
    kl_jw_lit(w, ",\"environment\":\"");
    kl_jw_lit(w, kl_env_name(k->env));
    kl_jw_lit(w, "\",\"owner\":{\"type\":\"");
    kl_jw_lit(w, kl_principal_name(k->owner_type));
    kl_jw_lit(w, "\",\"id\":");
    kl_ref owner = kl_key_owner(k);
    jw_ref(w, &owner);
    kl_jw_lit(w, "},\"created_by\":");
    jw_ref(w, &k->created_by);
    kl_jw_lit(w, ",\"permissions\":{\"access\":\"");
    kl_jw_lit(w, kl_access_name(k->access));
    kl_jw_lit(w, "\"");
    if (k->access == KL_ACCESS_FLOWS) {
        kl_jw_lit(w, ",\"flows\":[");
        for (uint32_t i = 0; i < kl_key_nflows(k); i++) {
            if (i > 0)
                kl_jw_raw(w, ",", 1);
            kl_jw_str(w, kl_key_flow(k, i));
        }
        kl_jw_raw(w, "]", 1);
    }
    kl_jw_raw(w, "}", 1);
    if (k->rl_minute != 0 || k->rl_day != 0) {
        kl_jw_lit(w, ",\"rate_limit\":{");
        if (k->rl_minute != 0) {
            kl_jw_lit(w, "\"requests_per_minute\":");
            kl_jw_uint(w, k->rl_minute);
        }
        if (k->rl_day != 0) {
            kl_jw_lit(w, k->rl_minute != 0 ? ",\"requests_per_day\":"
                                           : "\"requests_per_day\":");
            kl_jw_uint(w, k->rl_day);
        }
        kl_jw_raw(w, "}", 1);
    }
    kl_jw_lit(w, ",\"created_at\":");
    kl_jw_time(w, k->created_at);
    kl_jw_lit(w, ",\"updated_at\":");
    kl_jw_time(w, k->updated_at);
    if (k->last_used_at != 0) {
        kl_jw_lit(w, ",\"last_used_at\":");
        kl_jw_time(w, k->last_used_at);
    }
    if (k->expires_at != 0) {
        kl_jw_lit(w, ",\"expires_at\":");
        kl_jw_time(w, k->expires_at);
    }
    kl_jw_lit(w, kl_key_usable(k, now) ? ",\"is_active\":true,\"status\":\""
                                       : ",\"is_active\":false,\"status\":\"");
    kl_jw_lit(w, kl_key_status_name(kl_key_status_at(k, now)));
    kl_jw_raw(w, "\"", 1);
    const kl_key_revocation *r = kl_key_revocation_of(k);
    if (r != NULL) {
        kl_jw_lit(w, ",\"revoked_at\":");
        kl_jw_time(w, r->at);
        kl_jw_lit(w, ",\"revoked_by\":");
        jw_ref(w, &r->by);
        if (r->comment != NULL) {
            kl_jw_lit(w, ",\"revoked_comment\":");
            kl_jw_str(w, r->comment);
        }
    }
    kl_jw_lit(w, ",\"version\":");
    kl_jw_uint(w, k->version);
    if (secret != NULL) {
        kl_jw_lit(w, ",\"key\":");
        kl_jw_str(w, secret);
    }
    kl_jw_raw(w, "}", 1);
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

json_t *kl_render_alert(const kl_proj *p, const kl_alert *a)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", kl_json_id(KL_ID_ALERT, &a->id));
    json_object_set_new(o, "type", json_string(kl_alert_type_name(a->type)));
    if (!kl_id_is_zero(&a->key)) {
        json_object_set_new(o, "key_id", kl_json_id(KL_ID_KEY, &a->key));
        const kl_key *k = kl_proj_key(p, &a->key);
        if (k != NULL && k->owner_type == KL_PRINCIPAL_SA)
            json_object_set_new(o, "service_account_id",
                                kl_json_id(KL_ID_SA, kl_key_owner_id(k)));
    }
    json_object_set_new(o, "created_at", kl_json_time(a->created_at));
    json_object_set_new(o, "status", json_string(a->acked ? "acknowledged" : "open"));
    json_t *det = json_loads(a->details, 0, NULL);
    json_object_set_new(o, "details", det != NULL ? det : json_object());
    if (a->acked) {
        json_object_set_new(o, "acknowledged_at", kl_json_time(a->acked_at));
        json_object_set_new(o, "acknowledged_by", kl_json_ref(&a->acked_by));
    }
    json_object_set_new(o, "version", json_integer((json_int_t)a->version));
    return o;
}

/* ---- an event as JSON ------------------------------------------------- */

/* What an event is about, from its type's name: the catalogue names every
 * type for its subject (KeyRevoked, SessionCreated), so types added later
 * map themselves. First match wins. */
static const struct {
    const char *prefix;
    kl_id_kind kind;
} TARGETS[] = {
    {"Org", KL_ID_ORG},
    {"UsageLimits", KL_ID_ORG},
    {"User", KL_ID_USER},
    {"ServiceAccount", KL_ID_SA},
    {"Key", KL_ID_KEY},
    {"Usage", KL_ID_KEY},       /* UsageRecorded: one key's counts */
    {"Auth", KL_ID_KEY},        /* AuthFailed: refusals of one key */
    {"Computer", KL_ID_COMPUTER},
    {"Session", KL_ID_SESSION},
    {"Message", KL_ID_MESSAGE},
    {"Alert", KL_ID_ALERT},
};

static const char *const TARGET_TYPES[KL_ID_KIND_COUNT] = {
    [KL_ID_ORG] = "org",           [KL_ID_USER] = "user",
    [KL_ID_SA] = "service_account", [KL_ID_KEY] = "api_key",
    [KL_ID_ALERT] = "alert",       [KL_ID_COMPUTER] = "computer",
    [KL_ID_SESSION] = "session",   [KL_ID_MESSAGE] = "message",
};

/* The kind of entity events of this type are about, or -1. */
static int target_kind(kl_event_type t)
{
    const char *name = kl_event_type_name(t);
    for (size_t i = 0; i < ARRAY_LEN(TARGETS); i++)
        if (strncmp(name, TARGETS[i].prefix, strlen(TARGETS[i].prefix)) == 0)
            return (int)TARGETS[i].kind;
    return -1;
}

/* The org itself for org events; otherwise the event's id, if it has one. */
bool kl_event_target(const kl_event *ev, kl_id_kind *kind, kl_id *id)
{
    int k = target_kind(ev->type);
    if (k < 0 || (k != KL_ID_ORG && !(ev->has & KL_F_ID)))
        return false;
    *kind = (kl_id_kind)k;
    *id = k == KL_ID_ORG ? ev->org : ev->id;
    return true;
}

/* Text fields of `data`, shown as they are. */
static const struct {
    uint32_t bit;
    const char *name;
    size_t off;
} TEXT_FIELDS[] = {
    {KL_F_NAME, "name", offsetof(kl_event, name)},
    {KL_F_DESCRIPTION, "description", offsetof(kl_event, description)},
    {KL_F_EMAIL, "email", offsetof(kl_event, email)},
    {KL_F_COMMENT, "comment", offsetof(kl_event, comment)},
    {KL_F_TITLE, "title", offsetof(kl_event, title)},
    {KL_F_CONTENT, "content", offsetof(kl_event, content)},
};

/* KL_F_REF, named as the API names it, by what the event is about. */
static const struct {
    kl_id_kind of;
    kl_id_kind kind;
    const char *name;
} REFS[] = {
    {KL_ID_SESSION, KL_ID_COMPUTER, "computer_id"},
    {KL_ID_MESSAGE, KL_ID_SESSION, "session_id"},
    {KL_ID_ALERT, KL_ID_KEY, "key_id"},
};

/* {names[i]: values[i]} for the values that are set (0 = no limit). */
static json_t *limits_json(const char *const *names, const uint32_t *values,
                           size_t n)
{
    json_t *o = json_object();
    for (size_t i = 0; i < n; i++)
        if (values[i] != 0)
            json_object_set_new(o, names[i], json_integer(values[i]));
    return o;
}

static json_t *principal_json(kl_principal type, const kl_id *id)
{
    kl_ref r = {type, *id};
    return json_pack("{s:s,s:o}", "type", kl_principal_name(type), "id",
                     kl_json_ref(&r));
}

/*
 * The event's body fields, one block per KL_F_ bit. Never shown: KL_F_HASH
 * (a secret's hash, API.md) and KL_F_IDEM (the caller's idempotency key and
 * our fingerprint of its request); KL_F_ID is the target.
 */
static json_t *event_data(const kl_event *ev)
{
    static const char *const RATE[] = {"requests_per_minute", "requests_per_day"};
    static const char *const LIMITS[] = {"requests_per_minute", "requests_per_day",
                                         "requests_per_month"};
    json_t *d = json_object();
    uint32_t has = ev->has;
    if (has & KL_F_ALERT) {
        /* An alert's content is its details, a JSON object. */
        json_object_set_new(d, "alert_type", json_string(kl_alert_type_name(ev->alert)));
        json_t *det = json_loadb(ev->content.ptr, ev->content.len, 0, NULL);
        json_object_set_new(d, "details", det != NULL ? det : json_object());
        has &= ~(uint32_t)KL_F_CONTENT;
    }
    for (size_t i = 0; i < ARRAY_LEN(TEXT_FIELDS); i++) {
        if (has & TEXT_FIELDS[i].bit) {
            const kl_str *s = (const kl_str *)((const char *)ev + TEXT_FIELDS[i].off);
            json_object_set_new(d, TEXT_FIELDS[i].name, json_stringn(s->ptr, s->len));
        }
    }
    if (ev->has & KL_F_PREFIX) {
        char p[64];
        snprintf(p, sizeof p, "%.*s...", (int)(ev->prefix.len < 48 ? ev->prefix.len : 48),
                 ev->prefix.ptr);
        json_object_set_new(d, "prefix", json_string(p));
    }
    if (ev->has & KL_F_ROLE)
        json_object_set_new(d, "role", json_string(kl_role_name(ev->role)));
    if (ev->has & KL_F_OWNER)
        json_object_set_new(d, "owner", principal_json(ev->owner_type, &ev->owner));
    if (ev->has & KL_F_ENV)
        json_object_set_new(d, "environment", json_string(kl_env_name(ev->env)));
    if (ev->has & KL_F_ACCESS) {
        json_t *perm = json_pack("{s:s}", "access", kl_access_name(ev->access));
        if (ev->access == KL_ACCESS_FLOWS) {
            json_t *flows = json_array();
            for (uint32_t i = 0; i < ev->nflows; i++)
                json_array_append_new(flows, json_stringn(ev->flows[i].ptr,
                                                          ev->flows[i].len));
            json_object_set_new(perm, "flows", flows);
        }
        json_object_set_new(d, "permissions", perm);
    }
    if (ev->has & KL_F_RATE_LIMIT) {
        /* Both 0: the limit was taken away (PATCH "rate_limit": null). */
        uint32_t v[] = {ev->rl_minute, ev->rl_day};
        json_object_set_new(d, "rate_limit", v[0] || v[1]
                                                 ? limits_json(RATE, v, 2)
                                                 : json_null());
    }
    if (ev->has & KL_F_EXPIRES)
        json_object_set_new(d, "expires_at", ev->expires_at != 0
                                                 ? kl_json_time(ev->expires_at)
                                                 : json_null());
    if (ev->has & KL_F_GRACE)
        json_object_set_new(d, "grace_until", kl_json_time(ev->grace_until));
    if (ev->has & KL_F_ACTIVE)
        json_object_set_new(d, "is_active", json_boolean(ev->active));
    if (ev->has & KL_F_LIMITS) {
        uint32_t v[] = {ev->lim_minute, ev->lim_day, ev->lim_month};
        json_object_set_new(d, "usage_limits", limits_json(LIMITS, v, 3));
    }
    if (ev->has & KL_F_AUTHOR)          /* a message's role, as posted */
        json_object_set_new(d, "role", json_string(kl_author_name(ev->author)));
    for (size_t i = 0; (ev->has & KL_F_REF) && i < ARRAY_LEN(REFS); i++)
        if ((int)REFS[i].of == target_kind(ev->type))
            json_object_set_new(d, REFS[i].name, kl_json_id(REFS[i].kind, &ev->ref));
    if (ev->has & KL_F_USAGE) {
        json_t *u = json_pack("{s:o,s:o,s:I,s:I}", "from", kl_json_time(ev->usage_from),
                              "to", kl_json_time(ev->usage_to),
                              "successes", (json_int_t)ev->successes,
                              "failures", (json_int_t)ev->failures);
        if (ev->last_used != 0)
            json_object_set_new(u, "last_used_at", kl_json_time(ev->last_used));
        json_object_set_new(d, "usage", u);
    }
    if (ev->has & KL_F_AUTH) {
        json_t *why = json_object();
        for (int i = 1; i < KL_FAIL_REASONS; i++)
            if (ev->auth_counts[i] != 0)
                json_object_set_new(why, kl_fail_reason_name((kl_fail_reason)i),
                                    json_integer((json_int_t)ev->auth_counts[i]));
        json_object_set_new(d, "from", kl_json_time(ev->usage_from));
        json_object_set_new(d, "to", kl_json_time(ev->usage_to));
        json_object_set_new(d, "reasons", why);
    }
    if (ev->has & KL_F_COMPACT) {
        char hex[2 * KL_HASH_LEN + 1];
        kl_hex(ev->compact.through_hash, KL_HASH_LEN, hex);
        json_object_set_new(d, "through_seq", json_integer((json_int_t)ev->compact.through_seq));
        json_object_set_new(d, "through_hash", json_string(hex));
        json_object_set_new(d, "usage_folded_before", kl_json_time(ev->compact.cutoff));
        json_object_set_new(d, "usage_events_folded",
                            json_integer((json_int_t)ev->compact.folded));
        json_object_set_new(d, "daily_totals", json_integer((json_int_t)ev->compact.totals));
    }
    if (ev->has & KL_F_FLOW_USAGE) {
        json_t *flows = json_array();
        for (uint32_t i = 0; i < ev->nflows; i++)
            json_array_append_new(flows, json_pack("{s:s%,s:I,s:I}", "flow",
                                                   ev->flows[i].ptr,
                                                   (size_t)ev->flows[i].len,
                                                   "successes",
                                                   (json_int_t)ev->flow_successes[i],
                                                   "failures",
                                                   (json_int_t)ev->flow_failures[i]));
        json_object_set_new(d, "flows", flows);
    }
    return d;
}

json_t *kl_render_event(const kl_event *ev, const uint8_t hash[KL_HASH_LEN])
{
    /* Events have no id of their own in the log: the seq is their identity
     * in the chain, the same after every restart and replay. The id is that
     * seq as 20 digits after "evt_": sortable as text, and never taken for
     * one of the contract's 26-character typed ids. */
    char id[32], hex[2 * KL_HASH_LEN + 1];
    snprintf(id, sizeof id, "evt_%020" PRIu64, ev->seq);
    kl_hex(hash, KL_HASH_LEN, hex);

    json_t *actor = principal_json(ev->actor.type, &ev->actor.id);
    if (!kl_id_is_zero(&ev->actor.key_id))
        json_object_set_new(actor, "key_id", kl_json_id(KL_ID_KEY, &ev->actor.key_id));
    json_t *o = json_object();
    json_object_set_new(o, "seq", json_integer((json_int_t)ev->seq));
    json_object_set_new(o, "id", json_string(id));
    json_object_set_new(o, "type", json_string(kl_event_type_name(ev->type)));
    json_object_set_new(o, "category",
                        json_string(kl_category_name(kl_event_category(ev->type))));
    json_object_set_new(o, "occurred_at", kl_json_time(ev->ts));
    json_object_set_new(o, "org_id", kl_json_id(KL_ID_ORG, &ev->org));
    json_object_set_new(o, "actor", actor);
    kl_id_kind kind;
    kl_id target;
    if (kl_event_target(ev, &kind, &target))
        json_object_set_new(o, "target", json_pack("{s:s,s:o}", "type", TARGET_TYPES[kind],
                                                   "id", kl_json_id(kind, &target)));
    json_object_set_new(o, "data", event_data(ev));
    if (!kl_id_is_zero(&ev->request_id))
        json_object_set_new(o, "request_id", kl_json_id(KL_ID_REQUEST, &ev->request_id));
    json_object_set_new(o, "hash", json_string(hex));
    return o;
}
