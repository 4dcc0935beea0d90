/*
 * keyledgerd's configuration: built-in defaults, then a JSON file
 * (--config), then command-line flags. Every key the file may hold is in
 * the table below; an unknown key is an error, so a typo never passes
 * silently.
 */
#include "daemon.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void kl_config_defaults(kl_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->listen_host, sizeof cfg->listen_host, "127.0.0.1");
    cfg->listen_port = 8080;
    cfg->fsync = KL_FSYNC_ALWAYS;
    snprintf(cfg->key_prefix, sizeof cfg->key_prefix, "kl");
    cfg->segment_bytes = 64u << 20;
    kl_http_config_defaults(&cfg->http);
    cfg->log_level = KL_INFO;
    cfg->usage_flush_ms = 1000;
    cfg->verify_failures_per_minute = 100;
    cfg->alert_check_ms = 1000;
    cfg->alert_expiring_s = 7 * 86400;
    cfg->alert_rotation_live_s = 90 * 86400;
    cfg->alert_rotation_test_s = 30 * 86400;
    cfg->alert_unused_s = 90 * 86400;
    cfg->alert_failed_auth_per_minute = 20;
    cfg->alert_unusual_factor = 10;
    cfg->alert_unusual_min = 100;
}

int kl_config_listen(kl_config *cfg, const char *text, kl_err *err)
{
    const char *colon = strrchr(text, ':');
    if (colon == NULL || colon == text) {
        kl_err_set(err, "listen address \"%s\" must be HOST:PORT", text);
        return KL_EINVAL;
    }
    char *end;
    errno = 0;
    long port = strtol(colon + 1, &end, 10);
    if (errno != 0 || *end != '\0' || colon[1] == '\0' || port < 0 || port > 65535) {
        kl_err_set(err, "listen address \"%s\": bad port", text);
        return KL_EINVAL;
    }
    const char *host = text;
    size_t n = (size_t)(colon - text);
    if (host[0] == '[' && n >= 2 && host[n - 1] == ']') {   /* [::1]:8080 */
        host++;
        n -= 2;
    }
    if (n == 0 || n >= sizeof cfg->listen_host) {
        kl_err_set(err, "listen address \"%s\": bad host", text);
        return KL_EINVAL;
    }
    memcpy(cfg->listen_host, host, n);
    cfg->listen_host[n] = '\0';
    cfg->listen_port = (int)port;
    return KL_OK;
}

int kl_config_fsync(kl_config *cfg, const char *text, kl_err *err)
{
    if (strcmp(text, "always") == 0)
        cfg->fsync = KL_FSYNC_ALWAYS;
    else if (strcmp(text, "batch") == 0)
        cfg->fsync = KL_FSYNC_BATCH;
    else if (strcmp(text, "off") == 0)
        cfg->fsync = KL_FSYNC_OFF;
    else {
        kl_err_set(err, "fsync must be always, batch or off, not \"%s\"", text);
        return KL_EINVAL;
    }
    return KL_OK;
}

typedef enum { T_UINT, T_SIZE, T_U64, T_BOOL, T_STRING } ftype;

typedef struct field {
    const char *key;
    ftype type;
    size_t offset;
    uint64_t min, max;
} field;

#define OFF(m) offsetof(kl_config, m)
static const field fields[] = {
    {"max_header_bytes", T_SIZE, OFF(http.max_header_bytes), 1024, 1 << 20},
    {"max_body_bytes", T_SIZE, OFF(http.max_body_bytes), 1024, 64 << 20},
    {"max_connections", T_UINT, OFF(http.max_connections), 1, 1000000},
    {"idle_timeout_ms", T_UINT, OFF(http.idle_timeout_ms), 10, 86400000},
    {"request_timeout_ms", T_UINT, OFF(http.request_timeout_ms), 10, 3600000},
    {"max_requests_per_conn", T_UINT, OFF(http.max_requests_per_conn), 0, UINT32_MAX},
    {"usage_flush_ms", T_UINT, OFF(usage_flush_ms), 10, 3600000},
    {"verify_failures_per_minute", T_UINT, OFF(verify_failures_per_minute), 1,
     UINT32_MAX},
    {"alert_check_ms", T_UINT, OFF(alert_check_ms), 10, 3600000},
    {"alert_expiring_seconds", T_UINT, OFF(alert_expiring_s), 1, UINT32_MAX},
    {"alert_rotation_live_seconds", T_UINT, OFF(alert_rotation_live_s), 1, UINT32_MAX},
    {"alert_rotation_test_seconds", T_UINT, OFF(alert_rotation_test_s), 1, UINT32_MAX},
    {"alert_unused_seconds", T_UINT, OFF(alert_unused_s), 1, UINT32_MAX},
    {"alert_failed_auth_per_minute", T_UINT, OFF(alert_failed_auth_per_minute), 1,
     UINT32_MAX},
    {"alert_unusual_factor", T_UINT, OFF(alert_unusual_factor), 1, 1000000},
    {"alert_unusual_min_requests", T_UINT, OFF(alert_unusual_min), 1, UINT32_MAX},
    {"segment_bytes", T_U64, OFF(segment_bytes), 4096, 1ull << 40},
    {"allow_query_key", T_BOOL, OFF(allow_query_key), 0, 0},
    {"listen", T_STRING, 0, 0, 0},
    {"fsync", T_STRING, 0, 0, 0},
    {"key_prefix", T_STRING, 0, 0, 0},
    {"log_level", T_STRING, 0, 0, 0},
};

static int set_string(kl_config *cfg, const char *key, const char *v, kl_err *err)
{
    if (strcmp(key, "listen") == 0)
        return kl_config_listen(cfg, v, err);
    if (strcmp(key, "fsync") == 0)
        return kl_config_fsync(cfg, v, err);
    if (strcmp(key, "key_prefix") == 0) {
        size_t n = strlen(v);
        bool ok = n >= 1 && n <= KL_PREFIX_MAX;
        for (size_t i = 0; ok && i < n; i++)
            ok = (v[i] >= 'a' && v[i] <= 'z') || (v[i] >= '0' && v[i] <= '9');
        if (!ok) {
            kl_err_set(err, "key_prefix must be 1 to %d characters of a-z and 0-9",
                       KL_PREFIX_MAX);
            return KL_EINVAL;
        }
        memcpy(cfg->key_prefix, v, n + 1);
        return KL_OK;
    }
    static const char *const levels[] = {"error", "warn", "info", "debug"};
    for (int i = 0; i < 4; i++) {
        if (strcmp(v, levels[i]) == 0) {
            cfg->log_level = (kl_level)i;
            return KL_OK;
        }
    }
    kl_err_set(err, "log_level must be error, warn, info or debug");
    return KL_EINVAL;
}

int kl_config_load(kl_config *cfg, const char *path, kl_err *err)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        kl_err_set(err, "config %s: line %d column %d: %s", path, jerr.line,
                   jerr.column, jerr.text);
        return KL_EINVAL;
    }
    int rc = KL_OK;
    if (!json_is_object(root)) {
        kl_err_set(err, "config %s: must be a JSON object", path);
        rc = KL_EINVAL;
        goto cleanup;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        const field *f = NULL;
        for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
            if (strcmp(fields[i].key, key) == 0)
                f = &fields[i];
        if (f == NULL) {
            kl_err_set(err, "config %s: unknown key \"%s\"", path, key);
            rc = KL_EINVAL;
            goto cleanup;
        }
        char *base = (char *)cfg + f->offset;
        if (f->type == T_BOOL) {
            if (!json_is_boolean(v))
                goto bad_type;
            *(bool *)base = json_is_true(v);
        } else if (f->type == T_STRING) {
            if (!json_is_string(v))
                goto bad_type;
            if ((rc = set_string(cfg, key, json_string_value(v), err)) != KL_OK) {
                char why[sizeof err->msg];
                snprintf(why, sizeof why, "%s", err->msg);
                kl_err_set(err, "config %s: %s", path, why);
                goto cleanup;
            }
        } else {
            json_int_t n = json_is_integer(v) ? json_integer_value(v) : -1;
            if (n < 0 || (uint64_t)n < f->min || (uint64_t)n > f->max) {
                kl_err_set(err, "config %s: %s must be an integer from %llu to %llu",
                           path, key, (unsigned long long)f->min,
                           (unsigned long long)f->max);
                rc = KL_EINVAL;
                goto cleanup;
            }
            if (f->type == T_U64)
                *(uint64_t *)base = (uint64_t)n;
            else if (f->type == T_SIZE)
                *(size_t *)base = (size_t)n;
            else
                *(unsigned *)base = (unsigned)n;
        }
        continue;
bad_type:
        kl_err_set(err, "config %s: %s has the wrong type", path, key);
        rc = KL_EINVAL;
        goto cleanup;
    }
cleanup:
    json_decref(root);
    return rc;
}
