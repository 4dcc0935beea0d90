/*
 * The route table: every endpoint keyledgerd serves. Handlers check
 * readiness themselves where it matters (the router serves /healthz and
 * /readyz during replay).
 */
#include "daemon.h"

const kl_http_route kl_routes[] = {
    {HTTP_GET, "/healthz", kl_h_healthz},
    {HTTP_GET, "/readyz", kl_h_readyz},
    {HTTP_GET, "/v1/me", kl_h_me},
    {HTTP_GET, "/v1/org", kl_h_org},
    {HTTP_POST, "/v1/api-keys", kl_h_keys_create},
    {HTTP_GET, "/v1/api-keys", kl_h_keys_list},
    {HTTP_GET, "/v1/api-keys/{id}", kl_h_keys_get},
    {HTTP_PATCH, "/v1/api-keys/{id}", kl_h_keys_update},
    {HTTP_DELETE, "/v1/api-keys/{id}", kl_h_keys_delete},
    {HTTP_POST, "/v1/api-keys/{id}/regenerate", kl_h_keys_regenerate},
    {HTTP_POST, "/v1/api-keys/{id}/revoke", kl_h_keys_revoke},
    {0, NULL, NULL}
};
