/*
 * The caller and its organization (GET /v1/me, GET /v1/org) and the
 * operations endpoints (/healthz, /readyz).
 */
#include "daemon.h"

void kl_h_healthz(kl_http_request *req)
{
    static const char ok[] = "{\"status\":\"ok\"}";
    kl_http_respond_json(req, 200, NULL, ok, sizeof ok - 1);
}

void kl_h_readyz(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    const char *why = !d->ready ? "replaying the log"
                                : d->commit != NULL ? kl_commit_unavailable(d->commit)
                                                    : NULL;
    if (why != NULL) {
        kl_api_error(req, 503, "unavailable", why, NULL);   /* the error shape */
        return;
    }
    kl_api_json(req, 200, json_pack("{s:s,s:I}", "status", "ready", "seq",
                                    (json_int_t)kl_proj_seq(d->proj)), NULL);
}

void kl_h_me(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller c;
    if (kl_api_auth(d, req, KL_NEED_ANY, &c) != 0)
        return;
    json_t *o = json_object();
    json_object_set_new(o, "org_id", kl_json_id(KL_ID_ORG, &c.org->id));
    json_object_set_new(o, "principal",
                        json_pack("{s:s,s:o}", "type", kl_principal_name(c.principal.type),
                                  "id", kl_json_ref(&c.principal)));
    json_object_set_new(o, "role", json_string(kl_role_name(c.role)));
    json_object_set_new(o, "key_id", kl_json_id(KL_ID_KEY, &c.key->id));
    kl_api_json(req, 200, o, NULL);
}

void kl_h_org(kl_http_request *req)
{
    kl_daemon *d = req->ctx;
    kl_caller c;
    if (kl_api_auth(d, req, KL_NEED_READ, &c) != 0)
        return;
    kl_api_json(req, 200, kl_render_org(c.org), NULL);
}
