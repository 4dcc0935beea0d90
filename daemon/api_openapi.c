/*
 * GET /openapi.json: the OpenAPI 3.1 document of the contract
 * (docs/openapi.json), embedded in the binary at build time by
 * cmake/embed.cmake (see daemon/CMakeLists.txt), so the daemon needs no
 * file at run time. No authentication: it describes the API, it holds no
 * state. tests/unit/test_openapi.c checks it against kl_routes and
 * tests/e2e/test_openapi.py against the running daemon.
 */
#include "daemon.h"

void kl_h_openapi(kl_http_request *req)
{
    kl_http_respond_json(req, 200, NULL, kl_openapi_json, kl_openapi_json_len);
}
