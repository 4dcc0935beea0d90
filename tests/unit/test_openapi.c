/*
 * tests/unit/test_openapi.c — the OpenAPI document GET /openapi.json serves
 * (docs/openapi.json, embedded in kl_daemon as kl_openapi_json) against the
 * route table the daemon serves (kl_routes):
 *
 *   - every route is in `paths` with its method, and every path + method of
 *     the document is a route (same pattern, and the router sends a request
 *     for it to that route, not to another that shadows it);
 *   - every $ref resolves inside the document;
 *   - every operation has a 2xx answer, a unique operationId, its path
 *     parameters declared, error answers in the shared Error shape, 429s with
 *     Retry-After (and RateLimit / RateLimit-Policy on the management API),
 *     and closed request bodies (additionalProperties: false);
 *   - security: bearer on every operation under /v1 except
 *     POST /v1/keys/verify, which is public like the operations endpoints.
 *
 * tests/e2e/test_openapi.py checks the same document against a running
 * daemon's answers.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <ctype.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"

/* The route table's handlers reach these; they live in main.c, which is not
 * part of kl_daemon. No handler runs here. */
int64_t kl_daemon_now(const kl_daemon *d)
{
    (void)d;
    return 0;
}

void kl_daemon_stop(kl_daemon *d, int exit_code)
{
    (void)d;
    (void)exit_code;
}

static const char *const METHODS[] = {"get", "put", "post", "delete", "options",
                                      "head", "patch", "trace", NULL};

static json_t *load_doc(void)
{
    json_error_t err;
    json_t *doc = json_loadb(kl_openapi_json, kl_openapi_json_len,
                             JSON_REJECT_DUPLICATES, &err);
    if (doc == NULL)
        fail_msg("docs/openapi.json does not parse: line %d column %d: %s",
                 err.line, err.column, err.text);
    assert_true(json_is_object(doc));
    return doc;
}

static bool is_method(const char *name)
{
    for (const char *const *m = METHODS; *m != NULL; m++)
        if (strcmp(*m, name) == 0)
            return true;
    return false;
}

/* llhttp's method name, lowercased, as OpenAPI spells it. */
static void method_lower(int method, char *out, size_t len)
{
    const char *name = llhttp_method_name((llhttp_method_t)method);
    size_t i = 0;
    for (; name[i] != '\0' && i + 1 < len; i++)
        out[i] = (char)tolower((unsigned char)name[i]);
    out[i] = '\0';
}

static int method_number(const char *lower)
{
    static const struct {
        const char *name;
        int method;
    } MAP[] = {{"get", HTTP_GET},         {"put", HTTP_PUT},
               {"post", HTTP_POST},       {"delete", HTTP_DELETE},
               {"options", HTTP_OPTIONS}, {"head", HTTP_HEAD},
               {"patch", HTTP_PATCH},     {"trace", HTTP_TRACE}};
    for (size_t i = 0; i < sizeof MAP / sizeof MAP[0]; i++)
        if (strcmp(MAP[i].name, lower) == 0)
            return MAP[i].method;
    return -1;
}

/* Resolves a local reference "#/a/b~1c" in doc; NULL when it names
 * nothing. */
static json_t *resolve(json_t *doc, const char *ref)
{
    if (strncmp(ref, "#/", 2) != 0)
        return NULL;
    json_t *at = doc;
    const char *p = ref + 2;
    while (at != NULL) {
        char token[256];
        size_t n = 0;
        for (; *p != '\0' && *p != '/'; p++) {
            char ch = *p;
            if (ch == '~' && (p[1] == '0' || p[1] == '1')) {
                ch = p[1] == '0' ? '~' : '/';
                p++;
            }
            if (n + 1 >= sizeof token)
                return NULL;
            token[n++] = ch;
        }
        token[n] = '\0';
        if (json_is_object(at)) {
            at = json_object_get(at, token);
        } else if (json_is_array(at)) {
            char *end;
            unsigned long i = strtoul(token, &end, 10);
            at = (*token != '\0' && *end == '\0') ? json_array_get(at, i) : NULL;
        } else {
            at = NULL;
        }
        if (*p == '\0')
            return at;
        p++;
    }
    return NULL;
}

/* v, or what its $ref names (followed through chains of refs). */
static json_t *deref(json_t *doc, json_t *v)
{
    for (int hops = 0; hops < 16 && json_is_object(v); hops++) {
        json_t *r = json_object_get(v, "$ref");
        if (!json_is_string(r))
            return v;
        json_t *to = resolve(doc, json_string_value(r));
        if (to == NULL)
            fail_msg("$ref %s names nothing in the document", json_string_value(r));
        v = to;
    }
    return v;
}

/* ---- tests ------------------------------------------------------------- */

static void test_document_header(void **state)
{
    (void)state;
    json_t *doc = load_doc();
    /* The embedded bytes are the file's, NUL-terminated after them. */
    assert_int_equal(strlen(kl_openapi_json), kl_openapi_json_len);
    const char *version = json_string_value(json_object_get(doc, "openapi"));
    assert_non_null(version);
    assert_int_equal(strncmp(version, "3.1", 3), 0);
    json_t *info = json_object_get(doc, "info");
    assert_string_equal(json_string_value(json_object_get(info, "title")), "keyledger");
    assert_true(json_is_string(json_object_get(info, "version")));
    json_t *server = json_array_get(json_object_get(doc, "servers"), 0);
    assert_string_equal(json_string_value(json_object_get(server, "url")),
                        "http://127.0.0.1:8080");
    json_t *bearer = json_object_get(
        json_object_get(json_object_get(doc, "components"), "securitySchemes"), "bearer");
    assert_string_equal(json_string_value(json_object_get(bearer, "type")), "http");
    assert_string_equal(json_string_value(json_object_get(bearer, "scheme")), "bearer");

    static const char *const SCHEMAS[] = {
        "Error", "Key", "KeyWithSecret", "Org", "UsageLimits", "Me", "User",
        "ServiceAccount", "Computer", "Session", "Message", "Alert", "AuditEvent",
        "AuditHead", "VerifyRequest", "VerifyResponse", "UsageReport", "KeyList",
        "UserList", "ServiceAccountList", "ComputerList", "SessionList",
        "MessageList", "AlertList", "AuditEventList", NULL};
    json_t *schemas = json_object_get(json_object_get(doc, "components"), "schemas");
    for (const char *const *s = SCHEMAS; *s != NULL; s++)
        if (json_object_get(schemas, *s) == NULL)
            fail_msg("components.schemas has no %s", *s);
    static const char *const PARAMS[] = {"limit", "cursor", "IfMatch",
                                         "IdempotencyKey", NULL};
    json_t *params = json_object_get(json_object_get(doc, "components"), "parameters");
    for (const char *const *p = PARAMS; *p != NULL; p++)
        if (json_object_get(params, *p) == NULL)
            fail_msg("components.parameters has no %s", *p);
    json_decref(doc);
}

/* Every route the router serves is documented with its method. */
static void test_every_route_is_documented(void **state)
{
    (void)state;
    json_t *doc = load_doc();
    json_t *paths = json_object_get(doc, "paths");
    assert_true(json_is_object(paths));
    int n = 0;
    for (const kl_http_route *r = kl_routes; r->handler != NULL; r++, n++) {
        char m[16];
        method_lower(r->method, m, sizeof m);
        json_t *item = json_object_get(paths, r->pattern);
        if (item == NULL)
            fail_msg("route %s %s: no such path in docs/openapi.json", m, r->pattern);
        if (!json_is_object(json_object_get(item, m)))
            fail_msg("route %s %s: the path has no %s operation in docs/openapi.json",
                     m, r->pattern, m);
    }
    assert_true(n > 40);
    json_decref(doc);
}

/* Every documented operation is a route, and the router sends it there. */
static void test_every_operation_is_a_route(void **state)
{
    (void)state;
    json_t *doc = load_doc();
    const char *path;
    json_t *item;
    json_object_foreach(json_object_get(doc, "paths"), path, item) {
        const char *name;
        json_t *o;
        json_object_foreach(item, name, o) {
            if (!is_method(name))
                continue;
            int method = method_number(name);
            const kl_http_route *found = NULL;
            for (const kl_http_route *r = kl_routes; r->handler != NULL && !found; r++)
                if (r->method == method && strcmp(r->pattern, path) == 0)
                    found = r;
            if (found == NULL)
                fail_msg("%s %s is in docs/openapi.json but not in kl_routes", name, path);

            /* A concrete request for it: each {param} filled in. */
            char concrete[512];
            size_t n = 0;
            for (const char *p = path; *p != '\0' && n + 8 < sizeof concrete; p++) {
                if (*p == '{') {
                    const char *close = strchr(p, '}');
                    assert_non_null(close);
                    memcpy(concrete + n, "x0", 2);
                    n += 2;
                    p = close;
                } else {
                    concrete[n++] = *p;
                }
            }
            concrete[n] = '\0';
            const kl_http_route *got = NULL;
            kl_http_slice params[KL_HTTP_MAX_PARAMS];
            int nparams = 0;
            kl_http_route_result rr = kl_http_route_match(
                kl_routes, method, (kl_http_slice){concrete, n}, &got, params,
                &nparams, NULL, 0);
            if (rr != KL_HTTP_ROUTE_FOUND || got != found)
                fail_msg("%s %s (as %s) does not reach its own route", name, path,
                         concrete);
        }
    }
    json_decref(doc);
}

/* Walks v; fails on a $ref that names nothing. Returns how many it saw. */
static int check_refs(json_t *doc, json_t *v)
{
    int n = 0;
    if (json_is_object(v)) {
        const char *k;
        json_t *x;
        json_object_foreach(v, k, x) {
            if (strcmp(k, "$ref") == 0 && json_is_string(x)) {
                const char *ref = json_string_value(x);
                if (strncmp(ref, "#/", 2) != 0)
                    fail_msg("$ref %s is not local to the document", ref);
                if (resolve(doc, ref) == NULL)
                    fail_msg("$ref %s names nothing in the document", ref);
                n++;
            } else {
                n += check_refs(doc, x);
            }
        }
    } else if (json_is_array(v)) {
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x)
            n += check_refs(doc, x);
    }
    return n;
}

static void test_every_ref_resolves(void **state)
{
    (void)state;
    json_t *doc = load_doc();
    assert_true(check_refs(doc, doc) > 100);
    json_decref(doc);
}

/* Does a security requirement list (array of objects) name `scheme`? */
static bool requires(json_t *security, const char *scheme)
{
    size_t i;
    json_t *req;
    json_array_foreach(security, i, req)
        if (json_object_get(req, scheme) != NULL)
            return true;
    return false;
}

/* Path parameters: every {name} of the template is declared in: path and
 * required, and nothing else is declared in: path. */
static void check_path_params(json_t *doc, const char *path, const char *method,
                              json_t *item, json_t *op)
{
    char declared[KL_HTTP_MAX_PARAMS][64];
    int ndeclared = 0;
    json_t *lists[2] = {json_object_get(item, "parameters"),
                        json_object_get(op, "parameters")};
    for (int l = 0; l < 2; l++) {
        size_t i;
        json_t *p;
        json_array_foreach(lists[l], i, p) {
            p = deref(doc, p);
            const char *in = json_string_value(json_object_get(p, "in"));
            const char *name = json_string_value(json_object_get(p, "name"));
            if (in == NULL || name == NULL)
                fail_msg("%s %s: a parameter without in or name", method, path);
            if (strcmp(in, "path") != 0)
                continue;
            if (!json_is_true(json_object_get(p, "required")))
                fail_msg("%s %s: path parameter %s is not required", method, path, name);
            char pattern[80];
            snprintf(pattern, sizeof pattern, "{%s}", name);
            if (strstr(path, pattern) == NULL)
                fail_msg("%s %s: path parameter %s is not in the path", method, path,
                         name);
            assert_true(ndeclared < KL_HTTP_MAX_PARAMS);
            snprintf(declared[ndeclared++], sizeof declared[0], "%s", name);
        }
    }
    for (const char *p = strchr(path, '{'); p != NULL; p = strchr(p + 1, '{')) {
        const char *close = strchr(p, '}');
        assert_non_null(close);
        bool ok = false;
        for (int i = 0; i < ndeclared && !ok; i++)
            ok = strlen(declared[i]) == (size_t)(close - p - 1) &&
                 memcmp(declared[i], p + 1, (size_t)(close - p - 1)) == 0;
        if (!ok)
            fail_msg("%s %s: {%.*s} is not declared as a path parameter", method, path,
                     (int)(close - p - 1), p + 1);
    }
}

static void check_responses(json_t *doc, const char *path, const char *method,
                            json_t *op, bool management)
{
    json_t *responses = json_object_get(op, "responses");
    if (!json_is_object(responses) || json_object_size(responses) == 0)
        fail_msg("%s %s has no responses", method, path);
    bool has_2xx = false;
    const char *status;
    json_t *resp;
    json_object_foreach(responses, status, resp) {
        resp = deref(doc, resp);
        if (!json_is_string(json_object_get(resp, "description")))
            fail_msg("%s %s: response %s has no description", method, path, status);
        if (status[0] == '2')
            has_2xx = true;
        if (status[0] != '4' && status[0] != '5')
            continue;
        json_t *schema = json_object_get(
            json_object_get(json_object_get(resp, "content"), "application/json"),
            "schema");
        const char *ref = json_string_value(json_object_get(schema, "$ref"));
        if (ref == NULL || strcmp(ref, "#/components/schemas/Error") != 0)
            fail_msg("%s %s: response %s is not the shared Error schema", method, path,
                     status);
        if (strcmp(status, "429") == 0) {
            json_t *headers = json_object_get(resp, "headers");
            if (json_object_get(headers, "Retry-After") == NULL)
                fail_msg("%s %s: 429 without Retry-After", method, path);
            if (management && (json_object_get(headers, "RateLimit") == NULL ||
                               json_object_get(headers, "RateLimit-Policy") == NULL))
                fail_msg("%s %s: 429 without RateLimit and RateLimit-Policy", method,
                         path);
        }
    }
    if (!has_2xx)
        fail_msg("%s %s has no 2xx response", method, path);
    /* The management API: a key that is over a limit gets 429. */
    if (management && json_object_get(responses, "429") == NULL)
        fail_msg("%s %s: no 429 response", method, path);
    if (management && json_object_get(responses, "401") == NULL)
        fail_msg("%s %s: no 401 response", method, path);
}

/* Unknown body fields are 400: request bodies are closed objects. */
static void check_body(json_t *doc, const char *path, const char *method, json_t *op)
{
    json_t *body = json_object_get(op, "requestBody");
    if (body == NULL)
        return;
    body = deref(doc, body);
    json_t *schema = deref(doc, json_object_get(json_object_get(
        json_object_get(body, "content"), "application/json"), "schema"));
    if (schema == NULL)
        fail_msg("%s %s: a request body that is not application/json", method, path);
    if (!json_is_false(json_object_get(schema, "additionalProperties")))
        fail_msg("%s %s: the request body does not set additionalProperties: false "
                 "(unknown fields are 400)", method, path);
    if (json_object_get(json_object_get(op, "responses"), "400") == NULL ||
        json_object_get(json_object_get(op, "responses"), "415") == NULL)
        fail_msg("%s %s: a request body but no 400 or 415 response", method, path);
}

static void test_every_operation(void **state)
{
    (void)state;
    json_t *doc = load_doc();
    json_t *global = json_object_get(doc, "security");
    json_t *ids = json_object();
    const char *path;
    json_t *item;
    int nops = 0;
    json_object_foreach(json_object_get(doc, "paths"), path, item) {
        const char *method;
        json_t *op;
        json_object_foreach(item, method, op) {
            if (!is_method(method))
                continue;
            nops++;
            const char *id = json_string_value(json_object_get(op, "operationId"));
            if (id == NULL)
                fail_msg("%s %s has no operationId", method, path);
            if (json_object_get(ids, id) != NULL)
                fail_msg("operationId %s is used twice", id);
            json_object_set_new(ids, id, json_true());

            json_t *security = json_object_get(op, "security");
            if (security == NULL)
                security = global;
            if (!json_is_array(security))
                fail_msg("%s %s: no security requirements", method, path);
            bool v1 = strncmp(path, "/v1/", 4) == 0;
            bool verify = strcmp(path, "/v1/keys/verify") == 0;
            bool management = v1 && !verify;
            if (management && !requires(security, "bearer"))
                fail_msg("%s %s: not secured by bearer", method, path);
            if (!management && json_array_size(security) != 0)
                fail_msg("%s %s: should be public (security: [])", method, path);

            check_path_params(doc, path, method, item, op);
            check_responses(doc, path, method, op, management);
            check_body(doc, path, method, op);
        }
    }
    assert_true(nops > 40);
    json_decref(ids);
    json_decref(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_document_header),
        cmocka_unit_test(test_every_route_is_documented),
        cmocka_unit_test(test_every_operation_is_a_route),
        cmocka_unit_test(test_every_ref_resolves),
        cmocka_unit_test(test_every_operation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
