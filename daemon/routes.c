/*
 * The route table: every endpoint keyledgerd serves. Handlers check
 * readiness themselves where it matters (the router serves /healthz and
 * /readyz during replay).
 */
#include "daemon.h"

const kl_http_route kl_routes[] = {
    {HTTP_GET, "/healthz", kl_h_healthz},
    {HTTP_GET, "/readyz", kl_h_readyz},
    {HTTP_GET, "/openapi.json", kl_h_openapi},  /* no authentication */
    {HTTP_GET, "/metrics", kl_h_metrics},   /* no authentication: no ids, no secrets */
    {HTTP_GET, "/v1/me", kl_h_me},
    {HTTP_POST, "/v1/keys/verify", kl_h_verify},
    {HTTP_GET, "/v1/audit-events", kl_h_audit_events},
    {HTTP_GET, "/v1/audit-events/head", kl_h_audit_head},
    {HTTP_GET, "/v1/alerts", kl_h_alerts_list},
    {HTTP_POST, "/v1/alerts/{id}/ack", kl_h_alerts_ack},
    {HTTP_GET, "/v1/org", kl_h_org},
    {HTTP_GET, "/v1/org/users", kl_h_users_list},
    {HTTP_POST, "/v1/org/users", kl_h_users_invite},
    {HTTP_GET, "/v1/org/users/{id}", kl_h_users_get},
    {HTTP_PATCH, "/v1/org/users/{id}", kl_h_users_update},
    {HTTP_DELETE, "/v1/org/users/{id}", kl_h_users_remove},
    {HTTP_POST, "/v1/org/users/{id}/api-keys", kl_h_users_keys_create},
    {HTTP_GET, "/v1/org/users/{id}/api-keys", kl_h_users_keys_list},
    {HTTP_GET, "/v1/org/usage-limits", kl_h_limits_get},
    {HTTP_PUT, "/v1/org/usage-limits", kl_h_limits_put},
    {HTTP_POST, "/v1/service-accounts", kl_h_sa_create},
    {HTTP_GET, "/v1/service-accounts", kl_h_sa_list},
    {HTTP_GET, "/v1/service-accounts/{id}", kl_h_sa_get},
    {HTTP_PATCH, "/v1/service-accounts/{id}", kl_h_sa_update},
    {HTTP_DELETE, "/v1/service-accounts/{id}", kl_h_sa_delete},
    {HTTP_POST, "/v1/service-accounts/{id}/api-keys", kl_h_sa_keys_create},
    {HTTP_GET, "/v1/service-accounts/{id}/api-keys", kl_h_sa_keys_list},
    {HTTP_POST, "/v1/computers", kl_h_computers_create},
    {HTTP_GET, "/v1/computers", kl_h_computers_list},
    {HTTP_GET, "/v1/computers/{id}", kl_h_computers_get},
    {HTTP_POST, "/v1/computers/{id}/restart", kl_h_computers_restart},
    {HTTP_DELETE, "/v1/computers/{id}", kl_h_computers_delete},
    {HTTP_POST, "/v1/sessions", kl_h_sessions_create},
    {HTTP_GET, "/v1/sessions", kl_h_sessions_list},
    {HTTP_GET, "/v1/sessions/{id}", kl_h_sessions_get},
    {HTTP_POST, "/v1/sessions/{id}/messages", kl_h_messages_post},
    {HTTP_GET, "/v1/sessions/{id}/messages", kl_h_messages_list},
    {HTTP_POST, "/v1/api-keys", kl_h_keys_create},
    {HTTP_GET, "/v1/api-keys", kl_h_keys_list},
    {HTTP_GET, "/v1/api-keys/{id}", kl_h_keys_get},
    {HTTP_PATCH, "/v1/api-keys/{id}", kl_h_keys_update},
    {HTTP_DELETE, "/v1/api-keys/{id}", kl_h_keys_delete},
    {HTTP_POST, "/v1/api-keys/{id}/regenerate", kl_h_keys_regenerate},
    {HTTP_POST, "/v1/api-keys/{id}/revoke", kl_h_keys_revoke},
    {HTTP_GET, "/v1/api-keys/{id}/usage", kl_h_keys_usage},
    {HTTP_GET, "/v1/usage", kl_h_org_usage},
    {HTTP_GET, "/v1/org/control-history", kl_h_control_history},
    {0, NULL, NULL}
};
